//! Applying deltas one by one must give what building the final config at once gives.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use proptest::prelude::*;

use super::{parse, Delta, EntryKey, LocalConfig, Snapshot};
use super::{HealthStatus, LoadBalancer, LoadBalancerHealthPolicy, NetworkAddress};
use super::{NetworkMode, Policy, PolicyScope, Protocol, Service, ServiceEndpoint, Workload};

const BASE: &str = r#"
workloads:
- {uid: u, name: n, namespace: ns, workloadIps: [], services: {}}
services:
- {name: s, namespace: ns, hostname: h, vips: [], ports: {}}
policies:
- {name: p, namespace: ns, scope: Namespace, action: Deny, dryRun: false, rules: [[[{destinationPorts: [1]}]]]}
"#;

fn base() -> LocalConfig {
    match parse(std::path::Path::new("t.yaml"), BASE) {
        Ok(l) => l.config,
        Err(e) => panic!("{e}"),
    }
}

/// Small pools, so that IPs, names, uids, VIPs, hostnames and policy keys collide often.
const NAMESPACES: [&str; 3] = ["", "a", "b"];
const HOSTS: [&str; 3] = ["x", "y", "a/x"];
const PORTS: [u16; 2] = [80, 443];

fn ip(i: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, i % 4])
}

fn vip(i: u8) -> IpAddr {
    IpAddr::from([10, 96, 0, i % 4])
}

fn service_key(i: u8) -> String {
    let i = usize::from(i);
    format!("{}/{}", NAMESPACES[i % 3], HOSTS[i / 3 % 3])
}

fn workload() -> impl Strategy<Value = Workload> {
    let w = base().workloads.remove(0);
    (
        (0u8..4, 0u8..3, 0u8..4, any::<bool>(), any::<bool>()),
        (
            prop::collection::vec(0u8..6, 0..3),
            any::<bool>(),
            any::<bool>(),
        ),
        prop::collection::btree_map(
            0u8..9,
            prop::collection::btree_map(0usize..2, 1u16..4, 0..3),
            0..3,
        ),
        prop::collection::vec(0u8..4, 0..2),
    )
        .prop_map(
            move |((name, ns, uid, pod, hbone), (ips, host, unhealthy), services, listed)| {
                let mut w = w.clone();
                w.name = format!("w{name}");
                w.namespace = NAMESPACES[usize::from(ns)].into();
                w.uid = if pod {
                    format!("c//Pod/{uid}")
                } else {
                    format!("c/x/WorkloadEntry/{uid}")
                };
                w.protocol = if hbone {
                    Protocol::Hbone
                } else {
                    Protocol::Tcp
                };
                w.workload_ips = ips.into_iter().map(ip).collect();
                w.network_mode = if host {
                    NetworkMode::HostNetwork
                } else {
                    NetworkMode::Standard
                };
                w.status = if unhealthy {
                    HealthStatus::Unhealthy
                } else {
                    HealthStatus::Healthy
                };
                w.services = services
                    .into_iter()
                    .map(|(k, ports)| {
                        let ports = ports.into_iter().map(|(p, t)| (PORTS[p], t)).collect();
                        (service_key(k), ports)
                    })
                    .collect();
                w.authorization_policies = listed.into_iter().map(|p| format!("a/p{p}")).collect();
                w
            },
        )
}

fn service() -> impl Strategy<Value = Service> {
    let s = base().services.remove(0);
    (
        0u8..9,
        prop::collection::vec(0u8..6, 0..3),
        any::<bool>(),
        0u8..3,
        prop::collection::btree_map(0usize..2, 0u16..3, 0..3),
        // Written endpoints: key, workload uid (the workloads' pool, and one never used),
        // port map, unhealthy.
        prop::collection::vec(
            (
                0u8..5,
                0u8..10,
                prop::collection::btree_map(0usize..2, 1u16..4, 0..2),
                any::<bool>(),
            ),
            0..3,
        ),
    )
        .prop_map(move |(key, vips, allow_all, name, ports, written)| {
            let mut s = s.clone();
            let k = usize::from(key);
            s.namespace = NAMESPACES[k % 3].into();
            s.hostname = HOSTS[k / 3 % 3].into();
            s.name = format!("s{name}");
            // Target 0 makes endpoints depend on the workload maps alone.
            s.ports = ports.into_iter().map(|(p, t)| (PORTS[p], t)).collect();
            s.vips = vips
                .into_iter()
                .map(|v| NetworkAddress {
                    network: String::new(),
                    address: vip(v),
                })
                .collect();
            s.load_balancer = allow_all.then(|| LoadBalancer {
                routing_preferences: Vec::new(),
                mode: Default::default(),
                health_policy: LoadBalancerHealthPolicy::AllowAll,
            });
            s.endpoints = written
                .into_iter()
                .map(|(k, u, ports, unhealthy)| {
                    let uid = |u: u8| match u {
                        0..4 => format!("c//Pod/{u}"),
                        4..8 => format!("c/x/WorkloadEntry/{}", u - 4),
                        _ => "nobody".to_owned(),
                    };
                    let ep = ServiceEndpoint {
                        workload_uid: uid(u),
                        port: ports.into_iter().map(|(p, t)| (PORTS[p], t)).collect(),
                        status: if unhealthy {
                            HealthStatus::Unhealthy
                        } else {
                            HealthStatus::Healthy
                        },
                    };
                    // Keyed mostly by its own uid (as istiod writes them), sometimes not.
                    let key = if k < 4 {
                        ep.workload_uid.clone()
                    } else {
                        uid(k * 2)
                    };
                    (key, ep)
                })
                .collect();
            s
        })
}

fn policy() -> impl Strategy<Value = Policy> {
    let p = base().policies.remove(0);
    (0u8..4, 0u8..3, 0u8..3, 1u16..3).prop_map(move |(name, ns, scope, port)| {
        let mut p = p.clone();
        p.name = format!("p{name}");
        p.namespace = NAMESPACES[usize::from(ns)].into();
        p.scope = [
            PolicyScope::Global,
            PolicyScope::Namespace,
            PolicyScope::WorkloadSelector,
        ][usize::from(scope)];
        p.rules[0].clauses[0].matches[0].destination_ports = vec![port];
        p
    })
}

/// One change: which list, which of a few resource names, and the new value or a removal.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // test input, generated and consumed once
enum Op {
    Workload(u8, Option<Workload>),
    Service(u8, Option<Service>),
    Policy(u8, Option<Policy>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..8, prop::option::weighted(0.8, workload())).prop_map(|(k, w)| Op::Workload(k, w)),
        2 => (0u8..6, prop::option::weighted(0.8, service())).prop_map(|(k, s)| Op::Service(k, s)),
        1 => (0u8..5, prop::option::weighted(0.7, policy())).prop_map(|(k, p)| Op::Policy(k, p)),
    ]
}

/// The final state, by resource name: what istiod would hold.
#[derive(Default)]
struct Held {
    workloads: BTreeMap<String, Workload>,
    services: BTreeMap<String, Service>,
    policies: BTreeMap<String, Policy>,
}

fn change<T: Clone>(held: &mut BTreeMap<String, T>, name: String, v: Option<T>) -> Delta1<T> {
    match &v {
        Some(v) => held.insert(name.clone(), v.clone()),
        None => held.remove(&name),
    };
    (EntryKey::from(name.as_str()), v.map(Arc::new))
}

type Delta1<T> = (EntryKey, Option<Arc<T>>);

/// Every answer the snapshot gives, over the pools, as comparable text.
fn answers(s: &Snapshot) -> Vec<String> {
    let mut out = vec![format!(
        "{} {} {}",
        s.workload_count(),
        s.service_count(),
        s.policy_count()
    )];
    out.push(format!("{:?}", s.workloads().collect::<Vec<_>>()));
    out.push(format!("{:?}", s.services().collect::<Vec<_>>()));
    out.push(format!("{:?}", s.policies().collect::<Vec<_>>()));
    for i in 0..6 {
        out.push(format!("ip {:?}", s.workload_by_ip(ip(i)).map(|w| &w.uid)));
        let svc = s.service_by_vip(vip(i));
        out.push(format!("vip {:?}", svc.map(|r| r.service)));
        for port in PORTS {
            let eps: Vec<_> = svc
                .map(|r| s.endpoints(r, port).iter().collect())
                .unwrap_or_default();
            out.push(format!("endpoints {port} {eps:?}"));
        }
    }
    for ns in NAMESPACES {
        for h in HOSTS {
            let svc = s.service_by_host(ns, h);
            out.push(format!("host {:?}", svc.map(|r| r.service)));
            if let Some(r) = svc {
                let eps: Vec<_> = s.endpoints(r, 80).iter().collect();
                out.push(format!("endpoints {eps:?}"));
            }
        }
        for n in 0..4 {
            let w = s.workload_by_name(ns, &format!("w{n}"));
            out.push(format!("name {:?}", w.map(|w| (&w.uid, &w.workload_ips))));
            out.push(format!("policy {:?}", s.policy(&format!("{ns}/p{n}"))));
        }
        out.push(format!("in {:?}", s.policies_in(ns).collect::<Vec<_>>()));
    }
    for pod in ["c//Pod/", "c/x/WorkloadEntry/"] {
        for u in 0..4 {
            let w = s.workload_by_uid(&format!("{pod}{u}"));
            out.push(format!("uid {:?}", w.map(|w| (&w.name, &w.workload_ips))));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Deltas applied one at a time (each its own generation) answer every lookup as the final
    /// config built at once does; so does one delta carrying them all.
    #[test]
    fn deltas_one_by_one_equal_the_full_build(ops in prop::collection::vec(op(), 1..40)) {
        let mut held = Held::default();
        let mut snap = Snapshot::new(LocalConfig::default(), 1);
        let mut all = Delta::default();
        let mut previous = Vec::new();
        for (g, op) in ops.into_iter().enumerate() {
            let mut d = Delta::default();
            match op {
                Op::Workload(k, w) => d.workloads.push(change(&mut held.workloads, format!("w/{k}"), w)),
                Op::Service(k, s) => d.services.push(change(&mut held.services, format!("s/{k}"), s)),
                Op::Policy(k, p) => d.policies.push(change(&mut held.policies, format!("p/{k}"), p)),
            }
            all.append(d.clone());
            let before = answers(&snap);
            let next = snap.apply(d, g as u64 + 2);
            // The snapshot a delta was applied to is left as it was.
            prop_assert_eq!(answers(&snap), before);
            previous.push(snap);
            snap = next;
        }
        let full = Snapshot::new(
            LocalConfig {
                workloads: held.workloads.into_values().collect(),
                services: held.services.into_values().collect(),
                policies: held.policies.into_values().collect(),
            },
            0,
        );
        let expected = answers(&full);
        prop_assert_eq!(answers(&snap), expected.clone());
        let at_once = Snapshot::new(LocalConfig::default(), 1).apply(all, 2);
        prop_assert_eq!(answers(&at_once), expected);
    }
}

#[test]
fn a_workload_delta_touches_only_its_services() {
    let mut config = base();
    let w = config.workloads.remove(0);
    let s = config.services.remove(0);
    for i in 0..100u8 {
        let mut svc = s.clone();
        svc.hostname = format!("h{i}");
        svc.ports = [(80, 80)].into();
        svc.vips = vec![NetworkAddress {
            network: String::new(),
            address: IpAddr::from([10, 96, 1, i]),
        }];
        config.services.push(svc);
        let mut w = w.clone();
        w.uid = format!("u{i}");
        w.name = format!("w{i}");
        w.workload_ips = vec![IpAddr::from([10, 0, 1, i])];
        w.services = [(format!("ns/h{i}"), [(80, 8080)].into())].into();
        config.workloads.push(w);
    }
    let first = Snapshot::new(config, 1);
    let mut moved = first.workload_by_uid("u7").cloned().expect("u7");
    moved.workload_ips = vec![IpAddr::from([10, 0, 2, 7])];
    let d = Delta {
        workloads: vec![(EntryKey::Position(7), Some(Arc::new(moved)))],
        ..Delta::default()
    };
    let next = first.apply(d, 2);
    assert!(next.workload_by_ip(IpAddr::from([10, 0, 1, 7])).is_none());
    assert_eq!(
        next.workload_by_ip(IpAddr::from([10, 0, 2, 7]))
            .map(|w| w.uid.as_str()),
        Some("u7")
    );
    let svc = next.service_by_host("ns", "h7").expect("h7");
    let eps: Vec<_> = next
        .endpoints(svc, 80)
        .iter()
        .map(|(w, _)| w.workload_ips[0])
        .collect();
    assert_eq!(eps, [IpAddr::from([10, 0, 2, 7])]);
    // The previous generation still answers as it did, and untouched entries are shared.
    let old = first.service_by_host("ns", "h7").expect("h7");
    assert_eq!(
        first
            .endpoints(old, 80)
            .get(0)
            .map(|(w, _)| w.workload_ips[0]),
        Some(IpAddr::from([10, 0, 1, 7]))
    );
    let a = first.workload_by_uid("u8").expect("u8");
    let b = next.workload_by_uid("u8").expect("u8");
    assert!(std::ptr::eq(a, b));
}
