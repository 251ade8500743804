//! Outbound routing: where a captured connection to `dst` goes, as ztunnel decides it.

use std::net::SocketAddr;

use ringtun_hbone::connect::Baggage;
use ringtun_hbone::Identity;

use super::balance::{self, Balancer};
use super::Scope;
use crate::config::{LoadBalancerMode, Protocol, Snapshot, Workload};

/// Where the destination lookup says a connection should go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Over HBONE to a mesh workload.
    Hbone {
        /// `<workload ip>:<target port>`, the CONNECT authority.
        target: SocketAddr,
        /// Identities the peer may present.
        identities: Vec<Identity>,
        /// Service hostname when a VIP was dialled.
        service: Option<String>,
    },
    /// Plain TCP to this address (destination protocol TCP, not in the mesh, or a
    /// `Passthrough` service).
    Direct {
        /// Where to connect.
        target: SocketAddr,
        /// Service hostname when a VIP was dialled.
        service: Option<String>,
    },
    /// A service VIP with no endpoint for that port that the load-balancing rules allow
    /// (ztunnel's "no healthy upstream").
    NoEndpoint {
        /// The service hostname.
        service: String,
    },
}

/// Decides where a captured connection from `src` (the source workload, where known) to `dst`
/// goes, as ztunnel's `find_upstream`: a service VIP picks one of its endpoints for that port
/// by the service's load-balancing rules ([`balance::pick`]) and goes to the target port the
/// index settled; a `Passthrough` service goes to `dst` itself, as traffic outside the mesh
/// (no service named); a workload IP goes to that workload; anything else passes through.
pub fn route(
    scope: &Scope,
    snap: &Snapshot,
    bal: &mut Balancer,
    src: Option<&Workload>,
    dst: SocketAddr,
) -> Route {
    let (workload, port, service): (&Workload, u16, Option<String>) =
        if let Some(svc) = snap.service_by_vip(dst.ip()) {
            let host = svc.service.hostname.clone();
            let lb = svc.service.load_balancer.as_ref();
            // ztunnel's `OriginalDestination`: no endpoint is chosen, and the connection is
            // not reported as the service's.
            if lb.is_some_and(|lb| lb.mode == LoadBalancerMode::Passthrough) {
                return Route::Direct {
                    target: dst,
                    service: None,
                };
            }
            match balance::pick(lb, src, snap.endpoints(svc, dst.port()), bal) {
                Some((w, target_port)) => (w, target_port, Some(host)),
                None => return Route::NoEndpoint { service: host },
            }
        } else if let Some(w) = snap.workload_by_ip(dst.ip()) {
            (w, dst.port(), None)
        } else {
            return Route::Direct {
                target: dst,
                service: None,
            };
        };
    // A VIP maps to the workload's address in the same family where it has one.
    let ip = workload
        .workload_ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .or_else(|| workload.workload_ips.first().copied())
        .unwrap_or(dst.ip());
    let target = SocketAddr::new(ip, port);
    if workload.protocol != Protocol::Hbone {
        return Route::Direct { target, service };
    }
    let mut identities = vec![scope.workload_identity(workload)];
    if let Some(svc) = service.as_ref().and_then(|_| snap.service_by_vip(dst.ip())) {
        identities.extend(
            svc.service
                .subject_alt_names
                .iter()
                .filter_map(|san| Identity::parse(san).ok()),
        );
    }
    Route::Hbone {
        target,
        identities,
        service,
    }
}

/// The `baggage` a CONNECT carries: who the source is, with ztunnel's defaults for fields its
/// workload entry lacks (`cluster_id`: `--cluster-id`; type `deployment`; version `latest`).
pub fn request_baggage(w: Option<&Workload>, cluster_id: &str) -> Baggage {
    let Some(w) = w else {
        return Baggage::default();
    };
    let kind = if w.workload_type.is_empty() {
        "deployment"
    } else {
        &w.workload_type
    };
    let name = [&w.workload_name, &w.name]
        .into_iter()
        .find(|s| !s.is_empty())
        .cloned()
        .unwrap_or_default();
    Baggage {
        cluster: if w.cluster_id.is_empty() {
            cluster_id.to_owned()
        } else {
            w.cluster_id.clone()
        },
        namespace: w.namespace.clone(),
        workload_type: kind.to_owned(),
        service: if w.canonical_name.is_empty() {
            name.clone()
        } else {
            w.canonical_name.clone()
        },
        version: if w.canonical_revision.is_empty() {
            "latest".to_owned()
        } else {
            w.canonical_revision.clone()
        },
        workload_name: name,
    }
}
