//! Cross-checks after a successful parse. ztunnel loads all of these without error,
//! so they are warnings, each naming the entity.

use super::model::{LocalConfig, NetworkMode};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

/// Which keys the file wrote, for defaults ztunnel does not have (it requires them); the
/// parser records it, since the parsed model cannot tell a default from a written value.
#[derive(Debug, Default)]
pub(crate) struct Presence {
    /// Per workload: whether `services` was written.
    pub workload_services: Vec<bool>,
    /// Per policy: whether `dryRun` was written.
    pub policy_dry_run: Vec<bool>,
}

/// Adds a warning for each inconsistency ztunnel would load anyway, naming the entities.
pub(crate) fn cross_check(config: &LocalConfig, presence: &Presence, warnings: &mut Vec<String>) {
    let mut warn = |msg: String| warnings.push(msg);

    let workload_label = |i: usize| {
        let w = &config.workloads[i];
        format!("workloads[{i}] ({}/{})", w.namespace, w.name)
    };
    let service_label = |i: usize| {
        let s = &config.services[i];
        format!("services[{i}] ({}/{})", s.namespace, s.hostname)
    };

    // Keys ztunnel requires but ringtun defaults.
    for (i, written) in presence.workload_services.iter().enumerate() {
        if !written && i < config.workloads.len() {
            warn(format!(
                "{} has no `services` key; accepted as `services: {{}}`, but ztunnel refuses \
                 such a workload (write `services: {{}}`)",
                workload_label(i)
            ));
        }
    }
    for (i, written) in presence.policy_dry_run.iter().enumerate() {
        if let (false, Some(p)) = (*written, config.policies.get(i)) {
            warn(format!(
                "policies[{i}] ({}/{}) has no `dryRun` key; defaulting to false, but ztunnel \
                 requires it (write `dryRun: false`)",
                p.namespace, p.name
            ));
        }
    }

    // Workloads: uid is ztunnel's primary key; a later duplicate replaces the earlier one.
    let mut uids: HashMap<&str, usize> = HashMap::new();
    for (i, w) in config.workloads.iter().enumerate() {
        if let Some(first) = uids.insert(w.uid.as_str(), i) {
            warn(format!(
                "{} has the same uid `{}` as workloads[{first}]; ztunnel keeps only the last \
                 workload with a given uid",
                workload_label(i),
                w.uid
            ));
        }
    }

    // Workload IPs (lookups by IP ignore the network).
    let mut ips: HashMap<IpAddr, usize> = HashMap::new();
    for (i, w) in config.workloads.iter().enumerate() {
        if w.network_mode == NetworkMode::HostNetwork {
            continue;
        }
        let mut own = HashSet::new();
        for ip in &w.workload_ips {
            if !own.insert(*ip) {
                warn(format!("{} lists IP {ip} twice", workload_label(i)));
                continue;
            }
            if let Some(first) = ips.insert(*ip, i) {
                let other = &config.workloads[first];
                let scope = if other.network == w.network {
                    format!("in network \"{}\"", w.network)
                } else {
                    format!(
                        "in networks \"{}\" and \"{}\" (ringtun's IP lookup ignores the network)",
                        other.network, w.network
                    )
                };
                warn(format!(
                    "IP {ip} is claimed by both workloads[{first}] ({}/{}) and {} {scope}; \
                     lookups by IP prefer a Pod uid, then HBONE, then the later workload",
                    other.namespace,
                    other.name,
                    workload_label(i)
                ));
            }
        }
    }
    let mut names: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, w) in config.workloads.iter().enumerate() {
        if w.name.is_empty() {
            continue;
        }
        if let Some(&first) = names.get(&(w.namespace.as_str(), w.name.as_str())) {
            warn(format!(
                "{} has the same namespace/name as workloads[{first}]; lookups by name return \
                 workloads[{first}]",
                workload_label(i)
            ));
        } else {
            names.insert((w.namespace.as_str(), w.name.as_str()), i);
        }
    }

    // Services.
    let mut keys: HashMap<String, usize> = HashMap::new();
    for (i, s) in config.services.iter().enumerate() {
        if let Some(first) = keys.insert(s.key(), i) {
            warn(format!(
                "{} redefines services[{first}] (same namespace/hostname); ztunnel keeps the last",
                service_label(i)
            ));
        }
    }
    let mut vips: HashMap<IpAddr, usize> = HashMap::new();
    for (i, s) in config.services.iter().enumerate() {
        for vip in &s.vips {
            if let Some(first) = vips.insert(vip.address, i) {
                if first != i {
                    warn(format!(
                        "VIP {vip} of {} is also a VIP of {}; lookups by VIP return the later \
                         service",
                        service_label(i),
                        service_label(first)
                    ));
                } else {
                    warn(format!(
                        "{} lists VIP {} twice",
                        service_label(i),
                        vip.address
                    ));
                }
            }
        }
        if s.vips.iter().any(|v| ips.contains_key(&v.address)) {
            warn(format!(
                "{} has a VIP that is also a workload IP; lookups by VIP and by workload IP \
                 will disagree",
                service_label(i)
            ));
        }
    }

    // Workload → service references.
    for (i, w) in config.workloads.iter().enumerate() {
        for (key, ports) in &w.services {
            match keys.get(key) {
                None => warn(format!(
                    "{} names service `{key}`, which is not in `services`; it cannot be \
                     reached through a VIP",
                    workload_label(i)
                )),
                Some(&s) => {
                    let svc = &config.services[s];
                    for port in ports.keys() {
                        if !svc.ports.contains_key(port) {
                            warn(format!(
                                "{} maps port {port} of service `{key}`, which {} does not \
                                 declare in `ports`",
                                workload_label(i),
                                service_label(s)
                            ));
                        }
                    }
                }
            }
        }
    }

    // Policies: stored under namespace/name; a later duplicate replaces the earlier one.
    let mut policies: HashMap<String, usize> = HashMap::new();
    for (i, p) in config.policies.iter().enumerate() {
        if let Some(first) = policies.insert(p.key(), i) {
            warn(format!(
                "policies[{i}] ({}) redefines policies[{first}]; ztunnel keeps the last",
                p.key()
            ));
        }
    }
    for (i, w) in config.workloads.iter().enumerate() {
        for key in &w.authorization_policies {
            if !policies.contains_key(key) {
                warn(format!(
                    "{} lists authorization policy `{key}`, which is not in `policies`",
                    workload_label(i)
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::parse;
    use std::path::Path;

    fn warnings(text: &str) -> Vec<String> {
        match parse(Path::new("c.yaml"), text) {
            Ok(l) => l.warnings,
            Err(e) => panic!("{e}"),
        }
    }

    fn has(ws: &[String], needles: &[&str]) -> bool {
        ws.iter().any(|w| needles.iter().all(|n| w.contains(n)))
    }

    #[test]
    fn duplicate_workload_ip_and_uid() {
        // Two workloads sharing uid and IP.
        let text = "workloads:\n- namespace: ns\n  name: a\n  uid: u\n  workloadIps: [10.0.0.1]\n  services: {}\n- namespace: ns\n  name: b\n  uid: u\n  workloadIps: [10.0.0.1]\n  services: {}\n";
        let ws = warnings(text);
        assert!(
            has(
                &ws,
                &["IP 10.0.0.1", "workloads[0] (ns/a)", "workloads[1] (ns/b)"]
            ),
            "{ws:?}"
        );
        assert!(has(&ws, &["workloads[1] (ns/b)", "same uid `u`"]), "{ws:?}");
    }

    #[test]
    fn host_network_workloads_do_not_clash_on_ip() {
        let text = "workloads:\n- namespace: ns\n  name: a\n  uid: a\n  workloadIps: [10.0.0.1]\n  services: {}\n- namespace: ns\n  name: b\n  uid: b\n  networkMode: HostNetwork\n  workloadIps: [10.0.0.1]\n  services: {}\n";
        assert!(warnings(text).is_empty());
    }

    #[test]
    fn duplicate_vip_and_unknown_service_key() {
        let text = "services:\n- {name: a, namespace: ns, hostname: a.ns, vips: [/10.96.0.1], ports: {80: 80}}\n- {name: b, namespace: ns, hostname: b.ns, vips: [net2/10.96.0.1], ports: {}}\nworkloads:\n- namespace: ns\n  name: w\n  workloadIps: [10.0.0.1]\n  services: {\"ns/a.ns\": {81: 8081}, \"ns/missing\": {80: 80}}\n";
        let ws = warnings(text);
        assert!(
            has(
                &ws,
                &[
                    "VIP net2/10.96.0.1",
                    "services[1] (ns/b.ns)",
                    "services[0] (ns/a.ns)"
                ]
            ),
            "{ws:?}"
        );
        assert!(
            has(
                &ws,
                &["workloads[0] (ns/w)", "`ns/missing`", "not in `services`"]
            ),
            "{ws:?}"
        );
        assert!(has(&ws, &["port 81", "`ns/a.ns`"]), "{ws:?}");
        assert_eq!(ws.len(), 3, "{ws:?}");
    }

    #[test]
    fn policy_references() {
        let text = "policies:\n- {name: p, namespace: ns, scope: WorkloadSelector, action: Allow, rules: [], dryRun: false}\n- {name: p, namespace: ns, scope: Global, action: Deny, rules: [], dryRun: false}\nworkloads:\n- namespace: ns\n  workloadIps: []\n  services: {}\n  authorizationPolicies: [ns/p, ns/q]\n";
        let ws = warnings(text);
        assert!(
            has(&ws, &["policies[1] (ns/p) redefines policies[0]"]),
            "{ws:?}"
        );
        assert!(has(&ws, &["`ns/q`", "not in `policies`"]), "{ws:?}");
        assert_eq!(ws.len(), 2, "{ws:?}");
    }
}
