//! `/config_dump`'s shape and values from a small config (the shape against the real ztunnel
//! is `engine/tests/e2e_ztunnel_fidelity.rs`'s).

use std::path::Path;

use super::*;
use crate::config;

const CONFIG: &str = "workloads:\n- uid: u1\n  name: server\n  namespace: default\n  serviceAccount: server\n  workloadIps: [10.77.0.2]\n  protocol: HBONE\n  canonicalName: server-app\n  locality: {region: west, zone: west-z, subzone: west-s}\n  services: {\"default/server.default.svc.cluster.local\": {80: 5201}}\nservices:\n- name: server\n  namespace: default\n  hostname: server.default.svc.cluster.local\n  vips: [/10.96.0.10]\n  ports: {80: 5201}\npolicies:\n- {name: p, namespace: default, scope: Namespace, action: Deny, rules: [[[{notDestinationPorts: [9999], principals: [!Exact \"cluster.local/ns/default/sa/client\"]}]]], dryRun: false}\n";

fn dump() -> serde_json::Value {
    dump_with(None)
}

fn dump_with(xds: Option<XdsStatus>) -> serde_json::Value {
    let loaded = config::parse(Path::new("c.yaml"), CONFIG).expect("config");
    let snap = Snapshot::new(loaded.config, 7);
    let mut settings = Map::new();
    settings.insert("numWorkerThreads".into(), json!(2));
    let facts = Facts {
        identity: "spiffe://cluster.local/ns/default/sa/server".into(),
        not_after: 1_900_000_000,
        ktls: None,
        shards: 2,
        info: ProcessInfo {
            driver: "io_uring".into(),
            ktls_available: false,
            draining: true,
            fds: None,
            certs: Default::default(),
            xds,
            workload_manager: None,
            dns: None,
        },
        config: ztunnel_config(settings),
        workload_state: None,
    };
    serde_json::from_str(&render(&snap, &facts)).expect("JSON")
}

fn keys(v: &Value) -> Vec<&str> {
    v.as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect()
}

#[test]
fn sections_are_ztunnels_and_ringtuns_own_is_apart() {
    let d = dump();
    assert_eq!(
        keys(&d),
        [
            "certificates",
            "config",
            "policies",
            "ringtun",
            "services",
            "stagedServices",
            "staticConfig",
            "version",
            "workloads"
        ]
    );
    assert_eq!(
        d["ringtun"],
        json!({"configGeneration": 7, "shards": 2, "driver": "io_uring", "ktls": null, "draining": true})
    );
    assert_eq!(d["config"]["numWorkerThreads"], 2);
    assert_eq!(d["config"]["dnsProxyAddr"], Value::Null);
    assert_eq!(d["config"].as_object().map(Map::len), Some(52));
}

#[test]
fn workloads_services_and_policies_in_ztunnels_spelling() {
    let d = dump();
    assert_eq!(
        d["workloads"][0],
        json!({
            "workloadIps": ["10.77.0.2"], "protocol": "HBONE", "networkMode": "Standard",
            "uid": "u1", "name": "server", "namespace": "default", "serviceAccount": "server",
            "canonicalName": "server-app", "status": "Healthy", "clusterId": "",
            "locality": {"region": "west", "zone": "west-z", "subzone": "west-s"},
            "capacity": 1,
        })
    );
    // The file's view keeps the workload's services; the live one has them as endpoints.
    assert_eq!(
        d["staticConfig"]["workloads"][0]["services"],
        json!({"default/server.default.svc.cluster.local": {"80": 5201}})
    );
    assert_eq!(
        d["services"][0],
        json!({
            "name": "server", "namespace": "default",
            "hostname": "server.default.svc.cluster.local", "vips": ["/10.96.0.10"],
            "ports": {"80": 5201},
            "endpoints": {"u1": {"workloadUid": "u1", "port": {"80": 5201}, "status": "Healthy"}},
            "subjectAltNames": [], "canonical": false, "visibility": "Public",
        })
    );
    assert_eq!(d["staticConfig"]["services"][0]["endpoints"], json!({}));
    assert_eq!(
        d["policies"][0],
        json!({
            "name": "p", "namespace": "default", "scope": "Namespace", "action": "Deny",
            "rules": [[[{
                "principals": [{"Exact": "cluster.local/ns/default/sa/client"}],
                "notDestinationPorts": [9999],
            }]]],
            "dryRun": false,
        })
    );
}

#[test]
fn the_certificate_says_who_and_until_when() {
    let d = dump();
    assert_eq!(
        d["certificates"],
        json!([{
            "identity": "spiffe://cluster.local/ns/default/sa/server",
            "state": "Available",
            "certChain": [{"expirationTime": "2030-03-17T17:46:40Z"}],
            "rootCerts": [],
        }])
    );
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
}

#[test]
fn with_istiod_ringtun_shows_the_xds_state_and_the_last_nack() {
    use crate::xds::session::{ADDRESS_TYPE, TYPES};
    use crate::xds::status::Answered;
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_900_000_000);
    let mut x = XdsStatus::new("https://istiod:15012", &TYPES);
    x.connected(t);
    x.answered(
        Answered {
            type_url: ADDRESS_TYPE,
            version: "v1",
            nonce: "n1",
            resources: 2,
            rejected: vec!["bad-address".into()],
            nack: Some("bad-address: decode"),
        },
        t,
    );
    let d = dump_with(Some(x));
    let xds = &d["ringtun"]["xds"];
    assert_eq!(xds["connected"], true, "{xds:#}");
    assert_eq!(xds["connectedSince"], "2030-03-17T17:46:40Z", "{xds:#}");
    assert_eq!(
        xds["types"][ADDRESS_TYPE]["lastNack"],
        json!({"nonce": "n1", "resources": ["bad-address"], "error": "bad-address: decode", "time": "2030-03-17T17:46:40Z"})
    );
    assert_eq!(xds["types"][ADDRESS_TYPE]["nacks"], 1);
}
