//! `/config_dump` on the admin port: the config generation in force and the process's facts,
//! as JSON in ztunnel's field spelling.

use crate::config::Snapshot;
use crate::operate::prometheus::ProcessInfo;

/// What `/config_dump` reports beside the config itself.
pub struct Facts {
    /// Our SPIFFE identity.
    pub identity: String,
    /// Unix time our certificate expires.
    pub not_after: i64,
    /// What the kernel can offload (its debug form), when HBONE connections try kTLS.
    pub ktls: Option<String>,
    /// Worker shards.
    pub shards: usize,
    /// Driver and draining, as `/metrics` reports them.
    pub info: ProcessInfo,
}

/// The JSON body of `/config_dump`.
pub fn render(snap: &Snapshot, facts: &Facts) -> String {
    let workloads: Vec<_> = snap
        .workloads()
        .map(|w| {
            serde_json::json!({
                "uid": w.uid, "name": w.name, "namespace": w.namespace,
                "serviceAccount": w.service_account,
                "workloadIps": w.workload_ips.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "protocol": format!("{:?}", w.protocol).to_uppercase(),
                "node": w.node, "network": w.network, "services": w.services,
                "authorizationPolicies": w.authorization_policies,
            })
        })
        .collect();
    let services: Vec<_> = snap
        .services()
        .map(|s| {
            serde_json::json!({
                "name": s.name, "namespace": s.namespace, "hostname": s.hostname,
                "vips": s.vips.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
                "ports": s.ports, "subjectAltNames": s.subject_alt_names,
            })
        })
        .collect();
    let policies: Vec<_> = snap
        .policies()
        .map(|p| {
            serde_json::json!({
                "name": p.name, "namespace": p.namespace,
                "scope": format!("{:?}", p.scope), "action": format!("{:?}", p.action),
                "rules": p.rules.len(), "dryRun": p.dry_run,
            })
        })
        .collect();
    serde_json::json!({
        "configGeneration": snap.generation,
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "certificates": certificates(facts),
        "shards": facts.shards,
        "driver": facts.info.driver,
        "ktls": facts.ktls,
        "draining": facts.info.draining,
    })
    .to_string()
}

/// Every identity's certificate (state, chain, roots) in ztunnel's shape, or the proxy's own
/// when no list was given.
fn certificates(facts: &Facts) -> serde_json::Value {
    let list = &facts.info.certs.certificates;
    if list.is_empty() {
        return serde_json::json!([{"identity": facts.identity, "notAfterUnix": facts.not_after}]);
    }
    list.iter().map(crate::tls::CertStatus::to_json).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use std::path::Path;

    #[test]
    fn dump_names_config_certificate_and_process() {
        let text = "workloads:\n- uid: u1\n  name: server\n  namespace: default\n  serviceAccount: server\n  workloadIps: [10.77.0.2]\n  protocol: HBONE\n  services: {\"default/server.default.svc.cluster.local\": {80: 5201}}\nservices:\n- name: server\n  namespace: default\n  hostname: server.default.svc.cluster.local\n  vips: [/10.96.0.10]\n  ports: {80: 5201}\npolicies:\n- {name: p, namespace: default, scope: Namespace, action: Deny, rules: [[[{notDestinationPorts: [9999]}]]], dryRun: false}\n";
        let loaded = config::parse(Path::new("c.yaml"), text).expect("config");
        let snap = Snapshot::new(loaded.config, 7);
        let facts = Facts {
            identity: "spiffe://cluster.local/ns/default/sa/server".into(),
            not_after: 1_900_000_000,
            ktls: None,
            shards: 2,
            info: ProcessInfo {
                driver: "io_uring".into(),
                ktls_available: false,
                draining: true,
                certs: Default::default(),
            },
        };
        let dump: serde_json::Value = serde_json::from_str(&render(&snap, &facts)).expect("JSON");
        let want = serde_json::json!({
            "configGeneration": 7,
            "workloads": [{
                "uid": "u1", "name": "server", "namespace": "default",
                "serviceAccount": "server", "workloadIps": ["10.77.0.2"], "protocol": "HBONE",
                "node": "", "network": "",
                "services": {"default/server.default.svc.cluster.local": {"80": 5201}},
                "authorizationPolicies": [],
            }],
            "services": [{
                "name": "server", "namespace": "default",
                "hostname": "server.default.svc.cluster.local", "vips": ["/10.96.0.10"],
                "ports": {"80": 5201}, "subjectAltNames": [],
            }],
            "policies": [{
                "name": "p", "namespace": "default", "scope": "Namespace", "action": "Deny",
                "rules": 1, "dryRun": false,
            }],
            "certificates": [{
                "identity": "spiffe://cluster.local/ns/default/sa/server",
                "notAfterUnix": 1_900_000_000,
            }],
            "shards": 2,
            "driver": "io_uring",
            "ktls": null,
            "draining": true,
        });
        assert_eq!(dump, want, "{dump:#}");
    }
}
