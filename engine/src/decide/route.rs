//! Outbound routing: where a captured connection to `dst` goes, as ztunnel decides it.

use std::collections::HashMap;
use std::net::SocketAddr;

use ringtun_hbone::connect::Baggage;
use ringtun_hbone::Identity;

use super::Scope;
use crate::config::{Protocol, Snapshot, Workload};

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
        /// `ns/name` of the chosen workload.
        workload: String,
    },
    /// Plain TCP to this address (destination protocol TCP, or not in the mesh).
    Direct {
        /// Where to connect.
        target: SocketAddr,
        /// Service hostname when a VIP was dialled.
        service: Option<String>,
    },
    /// A service VIP with no endpoint for that port.
    NoEndpoint {
        /// The service hostname.
        service: String,
    },
}

/// Round-robin cursors per (service index, port), valid for one config generation: a new
/// generation starts every service at its first endpoint again.
#[derive(Debug, Default)]
pub struct RoundRobin {
    generation: u64,
    cursors: HashMap<(usize, u16), usize>,
}

impl RoundRobin {
    /// Next position for `port` of the service at `service` in `generation`'s config.
    pub fn next(&mut self, generation: u64, service: usize, port: u16) -> usize {
        if self.generation != generation {
            self.generation = generation;
            self.cursors.clear();
        }
        let c = self.cursors.entry((service, port)).or_insert(0);
        let v = *c;
        *c = c.wrapping_add(1);
        v
    }
}

/// Decides where a captured connection to `dst` goes, as ztunnel would: a service VIP picks an
/// endpoint round-robin (skipping workloads without that port); a workload IP goes to that
/// workload; anything else passes through.
pub fn route(scope: &Scope, snap: &Snapshot, rr: &mut RoundRobin, dst: SocketAddr) -> Route {
    let (workload, port, service): (&Workload, u16, Option<String>) =
        if let Some(svc) = snap.service_by_vip(dst.ip()) {
            let eps = snap.endpoints(svc, dst.port());
            let host = svc.service.hostname.clone();
            if eps.is_empty() {
                return Route::NoEndpoint { service: host };
            }
            let i = rr.next(snap.generation, svc.index, dst.port()) % eps.len();
            match eps.get(i) {
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
        workload: workload.display_name(),
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
