//! [`parse`] and [`load`]: YAML text → [`LocalConfig`] plus warnings.

use super::error::ConfigError;
use super::model::LocalConfig;
use super::validate::{self, Presence};
use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};
use std::fmt::Write as _;
use std::path::Path;

/// A parsed config and the warnings about it (unknown fields, ztunnel incompatibilities,
/// inconsistencies). Warnings are sentences naming the entity (`workloads[1] (ns/name)`)
/// or field path; they do not repeat the file name, which the caller prints.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The config.
    pub config: LocalConfig,
    /// Human-readable warnings; empty for a clean file.
    pub warnings: Vec<String>,
}

/// Reads and parses the config file at `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Parses config `text`; `path` is only used in messages. An empty (or comment-only)
/// document is a valid empty config, as in ztunnel.
pub fn parse(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let mut unknown = Vec::new();
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let config: LocalConfig = serde_ignored::deserialize(de, |p| unknown.push(format_path(&p)))
        .map_err(|e| ConfigError::from_yaml(path, &e))?;

    let mut warnings = Vec::new();
    for field in unknown {
        // ztunnel denies unknown fields everywhere except inside policy matches and
        // `locality`, which it silently ignores.
        let ztunnel = if field.contains(".rules[") || field.contains(".locality.") {
            "ztunnel ignores it too"
        } else {
            "ztunnel would refuse this file"
        };
        warnings.push(format!("unknown field `{field}` ignored ({ztunnel})"));
    }
    let presence = probe(text);
    validate::cross_check(&config, &presence, &mut warnings);
    Ok(Loaded { config, warnings })
}

/// Re-reads the (already valid) text, recording only key presence.
fn probe(text: &str) -> Presence {
    #[derive(Deserialize, Default)]
    struct Probe {
        #[serde(default)]
        workloads: Vec<ProbeWorkload>,
        #[serde(default)]
        policies: Vec<ProbePolicy>,
    }
    #[derive(Deserialize)]
    struct ProbeWorkload {
        #[serde(default)]
        services: Present,
    }
    #[derive(Deserialize)]
    struct ProbePolicy {
        #[serde(default, rename = "dryRun")]
        dry_run: Present,
    }
    #[derive(Default)]
    struct Present(bool);
    impl<'de> Deserialize<'de> for Present {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            IgnoredAny::deserialize(d).map(|_| Present(true))
        }
    }

    match serde_yaml_ng::from_str::<Probe>(text) {
        Ok(p) => Presence {
            workload_services: p.workloads.into_iter().map(|w| w.services.0).collect(),
            policy_dry_run: p.policies.into_iter().map(|p| p.dry_run.0).collect(),
        },
        // Cannot happen after a successful parse; report nothing rather than guess.
        Err(_) => Presence::default(),
    }
}

/// `workloads[0].fooBar`, in serde_yaml_ng's own path style.
fn format_path(path: &serde_ignored::Path<'_>) -> String {
    fn walk(path: &serde_ignored::Path<'_>, out: &mut String) {
        match path {
            serde_ignored::Path::Root => {}
            serde_ignored::Path::Seq { parent, index } => {
                walk(parent, out);
                let _ = write!(out, "[{index}]");
            }
            serde_ignored::Path::Map { parent, key } => {
                walk(parent, out);
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            serde_ignored::Path::Some { parent }
            | serde_ignored::Path::NewtypeStruct { parent }
            | serde_ignored::Path::NewtypeVariant { parent } => walk(parent, out),
        }
    }
    let mut out = String::new();
    walk(path, &mut out);
    if out.is_empty() {
        out.push('.');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::{
        ApplicationTunnelProtocol, GatewayDestination, HealthStatus, IpFamily, LoadBalancerMode,
        NetworkMode, PolicyAction, PolicyScope, Protocol, StringMatch,
    };

    const P: &str = "/etc/ringtun/config.yaml";

    fn ok(text: &str) -> Loaded {
        match parse(Path::new(P), text) {
            Ok(l) => l,
            Err(e) => panic!("expected success, got {e}"),
        }
    }

    fn err(text: &str) -> ConfigError {
        match parse(Path::new(P), text) {
            Ok(l) => panic!("expected an error, parsed {:?}", l.config),
            Err(e) => e,
        }
    }

    #[test]
    fn empty_and_comment_only_files_are_empty_configs() {
        for text in ["", "\n", "# nothing\n", "---\n", "workloads: []\n"] {
            let l = ok(text);
            assert_eq!(l.config, LocalConfig::default());
            assert!(l.warnings.is_empty(), "{text:?}: {:?}", l.warnings);
        }
    }

    #[test]
    fn null_document_is_refused_like_ztunnel() {
        let e = err("~\n");
        assert!(e.to_string().starts_with(P), "{e}");
    }

    #[test]
    fn a_written_endpoint_without_port_or_status_is_refused_like_ztunnel() {
        let svc = "services:\n- name: s\n  namespace: ns\n  hostname: s\n  vips: []\n  ports: {}\n  endpoints:\n    u: ";
        for (entry, field) in [
            ("{workloadUid: u, status: Healthy}", "port"),
            ("{workloadUid: u, port: {80: 8080}}", "status"),
        ] {
            let e = err(&format!("{svc}{entry}\n")).to_string();
            assert!(
                e.contains(&format!("missing field `{field}`")),
                "{entry}: {e}"
            );
        }
        let l = ok(&format!(
            "{svc}{{workloadUid: u, port: {{}}, status: Unhealthy}}\n"
        ));
        assert_eq!(l.config.services[0].endpoints.len(), 1);
    }

    #[test]
    fn defaults_match_ztunnel_serde_model() {
        let l = ok("workloads:\n- namespace: ns\n  workloadIps: []\n  services: {}\n");
        let w = &l.config.workloads[0];
        assert_eq!(w.protocol, Protocol::Tcp);
        assert_eq!(w.uid, "");
        assert_eq!(w.service_account, "");
        assert_eq!(w.trust_domain, None);
        assert_eq!(w.workload_type, "");
        assert_eq!(w.cluster_id, "");
        assert_eq!(w.network_mode, NetworkMode::Standard);
        assert_eq!(w.status, HealthStatus::Healthy);
        assert_eq!(w.capacity, 1);
        assert!(!w.native_tunnel);
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    }

    #[test]
    fn every_modelled_field_parses() {
        let text = r#"
workloads:
- uid: c//v1/Pod/ns/a
  name: a
  namespace: ns
  serviceAccount: sa
  workloadIps: ["10.0.0.1", "fd00::1"]
  protocol: HBONE
  node: n1
  network: net1
  trustDomain: ""
  workloadType: pod
  workloadName: a-deploy
  canonicalName: a
  canonicalRevision: v1
  clusterId: Kubernetes
  hostname: a.example
  networkMode: HostNetwork
  waypoint: {destination: "ns/waypoint.ns.svc.cluster.local", hboneMtlsPort: 15008}
  networkGateway: {destination: "net2/192.168.0.1", hboneMtlsPort: 15008}
  nativeTunnel: true
  applicationTunnel: {protocol: PROXY, port: 15088}
  authorizationPolicies: ["ns/allow-a"]
  status: Unhealthy
  locality: {region: r, zone: z, subzone: s}
  capacity: 3
  services:
    "ns/svc.ns.svc.cluster.local": {80: 8080, 443: 8443}
services:
- name: svc
  namespace: ns
  hostname: svc.ns.svc.cluster.local
  vips: ["/10.96.0.1", "net1/fd00::10"]
  ports: {80: 8080, 443: 8443}
  subjectAltNames: ["spiffe://cluster.local/ns/ns/sa/sa"]
  endpoints:
    "c//v1/Pod/ns/a": {workloadUid: "c//v1/Pod/ns/a", port: {80: 8080}, status: Healthy}
  loadBalancer: {routingPreferences: [Network, Node], mode: Failover, healthPolicy: AllowAll}
  ipFamilies: IPv6
  canonical: true
policies:
- name: allow-a
  namespace: ns
  scope: WorkloadSelector
  action: Deny
  dryRun: true
  rules:
  - - - principals: [!Prefix "cluster.local/ns/", !Presence [], !Suffix "/sa/x"]
        notNamespaces: [!Exact other]
        serviceAccounts: [{namespace: ns, serviceAccount: sa}]
        sourceIps: ["10.0.0.0/8"]
        notDestinationIps: ["fd00::/64"]
        destinationPorts: [80]
        notDestinationPorts: [9999]
    - []
"#;
        let l = ok(text);
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        let w = &l.config.workloads[0];
        assert_eq!(w.workload_ips.len(), 2);
        assert_eq!(w.trust_domain.as_deref(), Some(""));
        assert_eq!(w.network_mode, NetworkMode::HostNetwork);
        assert!(matches!(
            w.waypoint.as_ref().map(|g| &g.destination),
            Some(GatewayDestination::Hostname(h)) if h.hostname == "waypoint.ns.svc.cluster.local"
        ));
        assert!(matches!(
            w.network_gateway.as_ref().map(|g| &g.destination),
            Some(GatewayDestination::Address(a)) if a.network == "net2"
        ));
        assert_eq!(
            w.application_tunnel.as_ref().map(|t| (t.protocol, t.port)),
            Some((ApplicationTunnelProtocol::Proxy, Some(15088)))
        );
        assert_eq!(w.locality.subzone, "s");
        assert_eq!(w.capacity, 3);
        assert_eq!(w.services["ns/svc.ns.svc.cluster.local"][&443], 8443);
        let s = &l.config.services[0];
        assert_eq!(s.vips[1].network, "net1");
        assert_eq!(s.ip_families, Some(IpFamily::Ipv6));
        assert_eq!(
            s.load_balancer.as_ref().map(|lb| lb.mode),
            Some(LoadBalancerMode::Failover)
        );
        assert_eq!(s.endpoints.len(), 1);
        let p = &l.config.policies[0];
        assert_eq!(p.scope, PolicyScope::WorkloadSelector);
        assert_eq!(p.action, PolicyAction::Deny);
        assert!(p.dry_run);
        assert_eq!(p.rules.len(), 1);
        assert_eq!(p.rules[0].clauses.len(), 2);
        let m = &p.rules[0].clauses[0].matches[0];
        assert_eq!(
            m.principals,
            vec![
                StringMatch::Prefix("cluster.local/ns/".into()),
                StringMatch::Presence,
                StringMatch::Suffix("/sa/x".into())
            ]
        );
        assert_eq!(m.source_ips[0].prefix_len, 8);
        assert_eq!(m.not_destination_ports, vec![9999]);
        assert!(p.rules[0].clauses[1].matches.is_empty());
    }

    #[test]
    fn ztunnel_localhost_example_parses() {
        // istio/ztunnel examples/localhost.yaml
        let text = r#"
workloads:
- uid: cluster1//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  network: ""
  services:
    "default/example.com":
      80: 8080
policies:
  - action: Allow
    rules:
    - - - notDestinationPorts:
          - 9999
    name: deny-9999
    namespace: default
    scope: Namespace
services:
- name: remote
  namespace: default
  hostname: example.com
  vips:
    - remote/127.10.0.2
  ports:
    80: 8080
"#;
        let l = ok(text);
        assert_eq!(
            l.config.policies[0].rules[0].clauses[0].matches[0].not_destination_ports,
            [9999]
        );
        // That example omits `dryRun`, which ztunnel's model requires.
        assert!(l
            .warnings
            .iter()
            .any(|w| w.contains("policies[0]") && w.contains("dryRun")));
    }

    #[test]
    fn unknown_fields_are_warnings_with_paths() {
        let text = "extra: 1\nworkloads:\n- namespace: ns\n  workloadIps: []\n  services: {}\n  fooBar: 2\n  locality: {region: r, planet: earth}\n  waypoint: {destination: /1.2.3.4, hboneMtlsPort: 1, x: y}\npolicies:\n- {name: p, namespace: ns, scope: Global, action: Allow, dryRun: false, rules: [[[{bogus: 1}]]]}\n";
        let l = ok(text);
        let joined = l.warnings.join("\n");
        for path in [
            "`extra`",
            "`workloads[0].fooBar`",
            "`workloads[0].locality.planet`",
            "`workloads[0].waypoint.x`",
            "`policies[0].rules[0][0][0].bogus`",
        ] {
            assert!(joined.contains(path), "missing {path} in:\n{joined}");
        }
        assert!(joined.contains("fooBar` ignored (ztunnel would refuse this file)"));
        assert!(joined.contains("bogus` ignored (ztunnel ignores it too)"));
        assert!(l.warnings.iter().all(|w| !w.contains(P)));
    }

    #[test]
    fn missing_services_key_is_a_warning() {
        let l = ok("workloads:\n- namespace: ns\n  name: a\n  workloadIps: [10.0.0.1]\n");
        assert!(l.config.workloads[0].services.is_empty());
        assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
        assert!(l.warnings[0].contains("workloads[0] (ns/a)"));
        assert!(l.warnings[0].contains("ztunnel refuses"));
    }

    #[test]
    fn error_positions_and_fields() {
        let e = err(
            "workloads:\n- namespace: a\n  workloadIps: []\n  services: {}\n  protocol: HBON\n",
        );
        assert_eq!(
            e.to_string(),
            format!("{P}:5:13: workloads[0].protocol: unknown variant `HBON`, expected `HBONE` or `TCP`")
        );
        assert_eq!(e.field(), Some("workloads[0].protocol"));
        let e = err(
            "workloads:\n- namespace: a\n  workloadIps: [10.0.0.1, 10.0.0.256]\n  services: {}\n",
        );
        assert_eq!(e.location().map(|l| l.0), Some(3));
        assert_eq!(e.field(), Some("workloads[0].workloadIps[1]"));
        assert!(e.to_string().contains("10.0.0.256"), "{e}");
    }

    #[test]
    fn syntax_error_has_position_but_no_field() {
        let e = err("workloads: [\n");
        assert!(
            matches!(e, ConfigError::Invalid { field: None, .. }),
            "{e:?}"
        );
        assert!(!e.to_string().contains(" at line "), "{e}");
    }

    #[test]
    fn several_documents_are_refused() {
        let e = err("workloads: []\n---\nworkloads: []\n");
        assert!(e.to_string().starts_with(P), "{e}");
    }

    #[test]
    fn load_missing_file_names_file_and_os_error() {
        let path = Path::new("/nonexistent/ringtun-config-test.yaml");
        let e = match load(path) {
            Ok(_) => panic!("loaded a missing file"),
            Err(e) => e,
        };
        assert!(matches!(e, ConfigError::Read { .. }));
        let msg = e.to_string();
        assert!(msg.starts_with("/nonexistent/ringtun-config-test.yaml: cannot read config file: "));
        assert!(msg.contains("No such file"), "{msg}");
    }
}
