//! [`Scope`]: which workloads this ringtun speaks for, and which ports are its own.

use std::net::IpAddr;

use ringtun_hbone::Identity;

use crate::config::{Snapshot, Workload};

/// Which workloads this ringtun speaks for, fixed at start (from `--workload`, `--node`, its
/// certificate and its listeners).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// `--workload` (`namespace`, `name`): one workload only, as ztunnel's dedicated mode.
    pub workload: Option<(String, String)>,
    /// The service account that workload must have too, where it is known (in-pod mode: the
    /// node agent's `WorkloadInfo`), as ztunnel's `WorkloadInfo::matches` requires: a workload
    /// of the same name with another identity is not the pod's.
    pub service_account: Option<String>,
    /// `--node`: every workload on this node.
    pub node: Option<String>,
    /// Our certificate's identity: without `--workload` or `--node`, every workload with it.
    pub identity: Identity,
    /// Trust domain of workloads whose config names none.
    pub trust_domain: String,
    /// Ports of ringtun's own traffic listeners, which a tunnel must never target (it would
    /// loop into itself).
    pub own_ports: Vec<u16>,
}

impl Scope {
    /// Whether this ringtun serves exactly one workload (`--workload`).
    pub fn is_dedicated(&self) -> bool {
        self.workload.is_some()
    }

    /// The SPIFFE identity of a workload (its own trust domain, or ours).
    pub fn workload_identity(&self, w: &Workload) -> Identity {
        Identity::new(
            w.trust_domain.as_deref().unwrap_or(&self.trust_domain),
            &w.namespace,
            &w.service_account,
        )
    }

    /// Whether inbound traffic for `ip` is ours to deliver: the workload named by `--workload`,
    /// or those on `--node`, or else every workload with our certificate's identity.
    pub fn serves(&self, snap: &Snapshot, ip: IpAddr) -> bool {
        let Some(w) = snap.workload_by_ip(ip) else {
            return false;
        };
        if self.workload.is_some() {
            return self.is_own_workload(w);
        }
        if let Some(node) = &self.node {
            return &w.node == node;
        }
        self.workload_identity(w) == self.identity
    }

    /// Whether `port` is one of ringtun's own traffic listeners.
    pub fn is_own_port(&self, port: u16) -> bool {
        port != 0 && self.own_ports.contains(&port)
    }

    /// The workload this ringtun speaks for when a connection from `src` leaves.
    pub fn source_workload<'a>(&self, snap: &'a Snapshot, src: IpAddr) -> Option<&'a Workload> {
        match &self.workload {
            Some((ns, name)) => snap
                .workload_by_name(ns, name)
                .filter(|w| self.is_own_workload(w)),
            None => snap.workload_by_ip(src),
        }
    }

    /// Whether `w` is the one workload this scope names (`workload`, and `service_account`
    /// where known): ztunnel finds a pod's workload by this triple, not by the agent's uid
    /// (a Kubernetes pod uid, not the config's workload uid).
    fn is_own_workload(&self, w: &Workload) -> bool {
        let Some((ns, name)) = &self.workload else {
            return false;
        };
        &w.namespace == ns
            && &w.name == name
            && self
                .service_account
                .as_ref()
                .is_none_or(|sa| &w.service_account == sa)
    }
}
