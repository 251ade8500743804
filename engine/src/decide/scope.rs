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
        if let Some((ns, name)) = &self.workload {
            return &w.namespace == ns && &w.name == name;
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
            Some((ns, name)) => snap.workload_by_name(ns, name),
            None => snap.workload_by_ip(src),
        }
    }
}
