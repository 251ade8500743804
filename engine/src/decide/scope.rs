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
                .workloads_by_name(ns, name)
                .find(|w| self.is_own_workload(w)),
            None => snap.workload_by_ip(src),
        }
    }

    /// Whether `w` is the one workload this scope names (`workload`, and `service_account`
    /// where known): ztunnel finds a pod's workload by this triple, not by the agent's uid
    /// (a Kubernetes pod uid, not the config's workload uid). With `node` too (a pod served in
    /// shared mode with NODE_NAME), only a workload on that node is the pod's, as ztunnel looks
    /// a pod's workload up among its own node's only.
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
            && self.node.as_ref().is_none_or(|node| &w.node == node)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse;

    /// The same pod name, namespace and service account on two nodes (a StatefulSet's pod
    /// recreated elsewhere, or two clusters' configs merged): node-b's is first in the config.
    const TWO_NODES: &str = r#"
workloads:
- {uid: "c//Pod/default/web-b", name: web, namespace: default, serviceAccount: web, workloadName: web-on-b, node: node-b, protocol: HBONE, workloadIps: [10.0.0.12], services: {}}
- {uid: "c//Pod/default/web-a", name: web, namespace: default, serviceAccount: web, workloadName: web-on-a, node: node-a, protocol: HBONE, workloadIps: [10.0.0.11], services: {}}
services: []
policies: []
"#;

    fn pod_on(node: Option<&str>) -> Scope {
        Scope {
            workload: Some(("default".into(), "web".into())),
            service_account: Some("web".into()),
            node: node.map(Into::into),
            identity: Identity::new("cluster.local", "default", "web"),
            trust_domain: "cluster.local".into(),
            own_ports: vec![15001, 15006, 15008],
        }
    }

    /// ztunnel (`WorkloadStore::find_by_info`) looks a pod's workload up only among the
    /// workloads of its own node (NODE_NAME): the pod served on node-a is node-a's workload,
    /// as a source and as a destination, whatever the config's order.
    #[test]
    fn a_pods_workload_is_the_one_on_this_node() {
        let snap = match parse(Path::new("t.yaml"), TWO_NODES) {
            Ok(l) => Snapshot::new(l.config, 1),
            Err(e) => panic!("{e}"),
        };
        let src: IpAddr = "192.0.2.1".parse().expect("ip");
        let on_a = pod_on(Some("node-a"));
        let w = on_a.source_workload(&snap, src).expect("node-a's workload");
        assert_eq!(
            (w.uid.as_str(), w.node.as_str()),
            ("c//Pod/default/web-a", "node-a")
        );
        assert!(on_a.serves(&snap, "10.0.0.11".parse().expect("ip")));
        assert!(
            !on_a.serves(&snap, "10.0.0.12".parse().expect("ip")),
            "the namesake on node-b is not this pod"
        );
        let on_b = pod_on(Some("node-b"));
        let w = on_b.source_workload(&snap, src).expect("node-b's workload");
        assert_eq!(w.uid, "c//Pod/default/web-b");
        // A node with neither: no workload, as ztunnel finds none.
        assert!(pod_on(Some("node-c")).source_workload(&snap, src).is_none());
        // Without NODE_NAME every node counts (ztunnel's `local_node: None`): the first.
        let w = pod_on(None)
            .source_workload(&snap, src)
            .expect("a workload");
        assert_eq!(w.uid, "c//Pod/default/web-b");
    }
}
