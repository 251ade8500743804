//! Endpoint choice as ztunnel's `load_balance` makes it: routing preferences against the
//! source's locality (`Strict`, `Failover`), capacity weights, health policy, `Passthrough`,
//! and the same fields arriving over xDS.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use proptest::prelude::*;
use prost::Message;

use super::*;
use crate::config::{parse, LoadBalancerMode, LoadBalancerScope, Snapshot, Workload};

const VIP: &str = "10.96.0.20:80";
const HOST: &str = "svc.ns.svc.cluster.local";

/// One endpoint of the test service: name, region/zone/subzone, capacity, healthy.
#[derive(Clone, Debug)]
struct Ep {
    name: String,
    locality: [String; 3],
    capacity: u32,
    healthy: bool,
}

fn ep(name: &str, locality: [&str; 3], capacity: u32) -> Ep {
    Ep {
        name: name.into(),
        locality: locality.map(str::to_owned),
        capacity,
        healthy: true,
    }
}

/// A config with the source workload `client` (r1/z1/s1, node n1, cluster c1) and the
/// service at [`VIP`] with `eps` as endpoints (node and cluster: `n1`/`c1` when in zone `z1`,
/// else `n2`/`c2`) and `lb` as its `loadBalancer` (YAML, or empty for none).
fn config(lb: &str, eps: &[Ep]) -> Snapshot {
    let mut text = String::from(
        "workloads:\n- {uid: c//Pod/ns/client, name: client, namespace: ns, protocol: HBONE, \
         workloadIps: [10.0.1.1], node: n1, clusterId: c1, \
         locality: {region: r1, zone: z1, subzone: s1}, services: {}}\n",
    );
    for (i, e) in eps.iter().enumerate() {
        let [region, zone, subzone] = &e.locality;
        let near = zone == "z1";
        text.push_str(&format!(
            "- {{uid: c//Pod/ns/{n}, name: {n}, namespace: ns, protocol: HBONE, \
             workloadIps: [10.0.2.{ip}], node: {node}, clusterId: {cluster}, \
             locality: {{region: '{region}', zone: '{zone}', subzone: '{subzone}'}}, \
             capacity: {c}, status: {status}, services: {{\"ns/{HOST}\": {{80: 8080}}}}}}\n",
            n = e.name,
            ip = i + 1,
            node = if near { "n1" } else { "n2" },
            cluster = if near { "c1" } else { "c2" },
            c = e.capacity,
            status = if e.healthy { "Healthy" } else { "Unhealthy" },
        ));
    }
    let lb = if lb.is_empty() {
        String::new()
    } else {
        format!(", loadBalancer: {lb}")
    };
    text.push_str(&format!(
        "services:\n- {{name: svc, namespace: ns, hostname: {HOST}, vips: [/{}], \
         ports: {{80: 8080}}{lb}}}\n",
        VIP.trim_end_matches(":80")
    ));
    match parse(Path::new("t.yaml"), &text) {
        Ok(l) => Snapshot::new(l.config, 1),
        Err(e) => panic!("{e}\n{text}"),
    }
}

fn scope() -> Scope {
    Scope {
        workload: None,
        service_account: None,
        node: None,
        identity: ringtun_hbone::Identity::new("cluster.local", "ns", "client"),
        trust_domain: "cluster.local".into(),
        own_ports: vec![15001, 15006, 15008],
    }
}

fn client(s: &Snapshot) -> Option<&Workload> {
    s.workload_by_name("ns", "client")
}

/// Where `n` connections from the client to the VIP go: workload name → count (`-`: refused).
fn picks(s: &Snapshot, n: usize, seed: u64) -> BTreeMap<String, usize> {
    let mut bal = Balancer::seeded(seed);
    let mut seen = BTreeMap::new();
    let dst: SocketAddr = VIP.parse().unwrap();
    for _ in 0..n {
        let name = match route(&scope(), s, &mut bal, client(s), dst) {
            // Each endpoint has its own address.
            Route::Hbone { target, .. } => s
                .workload_by_ip(target.ip())
                .map_or("?".to_owned(), |w| w.name.clone()),
            Route::NoEndpoint { service } => {
                assert_eq!(service, HOST);
                "-".to_owned()
            }
            other => panic!("{other:?}"),
        };
        *seen.entry(name).or_insert(0) += 1;
    }
    seen
}

/// The names `n` connections reach, each once.
fn reached(s: &Snapshot) -> Vec<String> {
    picks(s, 200, 3).into_keys().collect()
}

fn two_zones() -> Vec<Ep> {
    vec![
        ep("near", ["r1", "z1", "s1"], 1),
        ep("far", ["r1", "z2", "s1"], 1),
    ]
}

const STRICT_ZONE: &str = "{routingPreferences: [Zone], mode: Strict, healthPolicy: OnlyHealthy}";
const FAILOVER_LOCALITY: &str =
    "{routingPreferences: [Region, Zone, Subzone], mode: Failover, healthPolicy: OnlyHealthy}";

#[test]
fn strict_keeps_only_endpoints_matching_every_scope() {
    assert_eq!(reached(&config(STRICT_ZONE, &two_zones())), ["near"]);
    let far_only = [ep("far", ["r1", "z2", "s1"], 1)];
    assert_eq!(reached(&config(STRICT_ZONE, &far_only)), ["-"]);
    // Every listed scope: the same zone in another region does not do.
    let lb = "{routingPreferences: [Region, Zone], mode: Strict, healthPolicy: OnlyHealthy}";
    let other_region = [
        ep("elsewhere", ["r2", "z1", "s1"], 1),
        ep("near", ["r1", "z1", "s9"], 1),
    ];
    assert_eq!(reached(&config(lb, &other_region)), ["near"]);
    // No preference listed: every endpoint matches all of none.
    let lb = "{routingPreferences: [], mode: Strict, healthPolicy: OnlyHealthy}";
    assert_eq!(reached(&config(lb, &two_zones())), ["far", "near"]);
}

#[test]
fn strict_without_a_source_workload_has_no_endpoint() {
    let s = config(STRICT_ZONE, &two_zones());
    let mut bal = Balancer::seeded(1);
    let r = route(&scope(), &s, &mut bal, None, VIP.parse().unwrap());
    assert_eq!(
        r,
        Route::NoEndpoint {
            service: HOST.into()
        }
    );
}

#[test]
fn strict_matches_node_cluster_and_network_too() {
    for scope in ["Node", "Cluster"] {
        let lb =
            format!("{{routingPreferences: [{scope}], mode: Strict, healthPolicy: OnlyHealthy}}");
        assert_eq!(reached(&config(&lb, &two_zones())), ["near"], "{scope}");
    }
    // Both endpoints share the client's (empty) network.
    let lb = "{routingPreferences: [Network], mode: Strict, healthPolicy: OnlyHealthy}";
    assert_eq!(reached(&config(lb, &two_zones())), ["far", "near"]);
}

#[test]
fn failover_prefers_the_most_leading_scopes_then_falls_back() {
    let all = [
        ep("subzone", ["r1", "z1", "s1"], 1),
        ep("zone", ["r1", "z1", "s2"], 1),
        ep("region", ["r1", "z2", "s1"], 1),
        // Same zone and subzone names in another region: the region breaks the chain first.
        ep("none", ["r2", "z1", "s1"], 1),
    ];
    for (n, want) in ["subzone", "zone", "region", "none"].iter().enumerate() {
        let s = config(FAILOVER_LOCALITY, &all[n..]);
        assert_eq!(reached(&s), [*want], "with {:?}", &all[n..]);
    }
    // Endpoints of one rank share the traffic.
    let tied = [
        ep("a", ["r1", "z2", "s1"], 1),
        ep("b", ["r1", "z3", "s1"], 1),
        ep("c", ["r2", "z1", "s1"], 1),
    ];
    assert_eq!(reached(&config(FAILOVER_LOCALITY, &tied)), ["a", "b"]);
}

#[test]
fn standard_mode_ignores_routing_preferences() {
    let lb = "{routingPreferences: [Zone], mode: Standard, healthPolicy: OnlyHealthy}";
    assert_eq!(reached(&config(lb, &two_zones())), ["far", "near"]);
    assert_eq!(reached(&config("", &two_zones())), ["far", "near"]);
}

#[test]
fn passthrough_goes_to_the_dialled_address() {
    let lb = "{routingPreferences: [], mode: Passthrough, healthPolicy: OnlyHealthy}";
    let s = config(lb, &two_zones());
    let mut bal = Balancer::seeded(1);
    let r = route(&scope(), &s, &mut bal, client(&s), VIP.parse().unwrap());
    assert_eq!(
        r,
        Route::Direct {
            target: VIP.parse().unwrap(),
            service: None
        }
    );
}

#[test]
fn capacity_weights_the_draw() {
    let eps = [
        ep("one", ["r1", "z1", "s1"], 1),
        ep("three", ["r1", "z1", "s1"], 3),
        ep("zero", ["r1", "z1", "s1"], 0),
    ];
    let n = 20_000;
    let seen = picks(&config("", &eps), n, 42);
    assert_eq!(
        seen.get("zero"),
        None,
        "capacity 0 is never drawn: {seen:?}"
    );
    let share = seen["three"] as f64 / n as f64;
    assert!((share - 0.75).abs() < 0.02, "{seen:?}");
    // Equal capacities (the draw without a pass over the list): an even spread.
    let even = [
        ep("a", ["r1", "z1", "s1"], 1),
        ep("b", ["r1", "z2", "s1"], 1),
        ep("c", ["r2", "z1", "s1"], 1),
    ];
    let seen = picks(&config("", &even), 9_000, 5);
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|&c| c.abs_diff(3_000) < 250), "{seen:?}");
    // The same seed draws the same sequence.
    assert_eq!(
        picks(&config("", &eps), 500, 9),
        picks(&config("", &eps), 500, 9)
    );
}

#[test]
fn capacity_zero_everywhere_means_no_endpoint() {
    let eps = [
        ep("a", ["r1", "z1", "s1"], 0),
        ep("b", ["r1", "z2", "s1"], 0),
    ];
    assert_eq!(reached(&config("", &eps)), ["-"]);
    // ztunnel draws among the best rank only: a best rank without capacity does not fall back.
    let eps = [
        ep("near", ["r1", "z1", "s1"], 0),
        ep("far", ["r1", "z2", "s1"], 5),
    ];
    assert_eq!(reached(&config(FAILOVER_LOCALITY, &eps)), ["-"]);
}

#[test]
fn health_policy_skips_unhealthy_unless_allow_all() {
    let mut eps = two_zones();
    eps[0].healthy = false;
    assert_eq!(reached(&config("", &eps)), ["far"]);
    assert_eq!(reached(&config(FAILOVER_LOCALITY, &eps)), ["far"]);
    // Strict: the unhealthy same-zone endpoint is gone, and nothing else may be used.
    assert_eq!(reached(&config(STRICT_ZONE, &eps)), ["-"]);
    let allow = "{routingPreferences: [Zone], mode: Failover, healthPolicy: AllowAll}";
    assert_eq!(reached(&config(allow, &eps)), ["near"]);
    let allow = "{routingPreferences: [], mode: Standard, healthPolicy: AllowAll}";
    assert_eq!(reached(&config(allow, &eps)), ["far", "near"]);
}

#[test]
fn endpoints_without_an_address_are_skipped() {
    let text = format!(
        "workloads:\n\
         - {{uid: a, name: a, namespace: ns, protocol: HBONE, workloadIps: [], services: {{\"ns/{HOST}\": {{80: 1}}}}}}\n\
         - {{uid: b, name: b, namespace: ns, protocol: HBONE, workloadIps: [10.0.2.2], services: {{\"ns/{HOST}\": {{80: 1}}}}}}\n\
         services:\n- {{name: svc, namespace: ns, hostname: {HOST}, vips: [/10.96.0.20], ports: {{80: 1}}}}\n"
    );
    let s = match parse(Path::new("t.yaml"), &text) {
        Ok(l) => Snapshot::new(l.config, 1),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(reached(&s), ["b"]);
}

/// The fields this choice reads arrive over xDS too: a workload's locality and capacity
/// (field 27, a `UInt32Value`) and a service's `load_balancing` (field 8), from their wire
/// bytes as istiod writes them.
#[test]
fn xds_carries_locality_capacity_and_load_balancing() {
    use crate::xds::convert;
    use crate::xds::proto::{XdsService, XdsWorkload};
    // capacity { value: 5 }, locality { region: "r1", zone: "z1" }.
    let w = XdsWorkload::decode(
        &[
            0xda, 0x01, 0x02, 0x08, 0x05, 0xc2, 0x01, 0x08, 0x0a, 0x02, b'r', b'1', 0x12, 0x02,
            b'z', b'1',
        ][..],
    )
    .expect("decodes");
    let w = convert::workload(w).expect("converts");
    assert_eq!(w.capacity, 5);
    assert_eq!(
        (w.locality.region.as_str(), w.locality.zone.as_str()),
        ("r1", "z1")
    );
    // load_balancing { routing_preference: [ZONE, REGION], mode: FAILOVER, health_policy:
    // ALLOW_ALL }; ports [{80 → 8080}] (field 5).
    let s = XdsService::decode(
        &[
            0x42, 0x08, 0x0a, 0x02, 0x02, 0x01, 0x10, 0x02, 0x18, 0x01, 0x2a, 0x05, 0x08, 0x50,
            0x10, 0x90, 0x3f,
        ][..],
    )
    .expect("decodes");
    let s = convert::service(s).expect("converts");
    let lb = s.load_balancer.expect("load balancer");
    assert_eq!(
        lb.routing_preferences,
        [LoadBalancerScope::Zone, LoadBalancerScope::Region]
    );
    assert_eq!(lb.mode, LoadBalancerMode::Failover);
    assert_eq!(
        lb.health_policy,
        crate::config::LoadBalancerHealthPolicy::AllowAll
    );
    assert_eq!(s.ports.get(&80), Some(&8080));
    // An absent capacity is 1, an explicit 0 stays 0 (never drawn).
    let w = convert::workload(XdsWorkload::decode(&[0xda, 0x01, 0x00][..]).expect("decodes"))
        .expect("converts");
    assert_eq!(w.capacity, 0);
    let w = convert::workload(XdsWorkload::default()).expect("converts");
    assert_eq!(w.capacity, 1);
}

fn any_ep() -> impl Strategy<Value = Ep> {
    let part = |p: &'static str| prop::sample::select(vec![format!("{p}1"), format!("{p}2")]);
    (
        part("r"),
        part("z"),
        part("s"),
        0u32..4,
        prop::bool::weighted(0.8),
    )
        .prop_map(|(r, z, s, capacity, healthy)| Ep {
            name: String::new(),
            locality: [r, z, s],
            capacity,
            healthy,
        })
}

fn any_lb() -> impl Strategy<Value = String> {
    let scopes = prop::sample::subsequence(vec!["Region", "Zone", "Subzone", "Node"], 0..4);
    let mode = prop::sample::select(vec!["Standard", "Strict", "Failover"]);
    let health = prop::sample::select(vec!["OnlyHealthy", "AllowAll"]);
    (scopes, mode, health).prop_map(|(scopes, mode, health)| {
        format!(
            "{{routingPreferences: [{}], mode: {mode}, healthPolicy: {health}}}",
            scopes.join(", ")
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The chosen endpoint always serves the port, has capacity, is healthy unless the policy
    /// allows all, matches every scope under `Strict`, and is never outranked by an eligible
    /// endpoint under `Failover`; there is no endpoint only when none is eligible.
    #[test]
    fn the_choice_keeps_every_rule(
        mut eps in prop::collection::vec(any_ep(), 0..6),
        lb in any_lb(),
        seed in any::<u64>(),
    ) {
        for (i, e) in eps.iter_mut().enumerate() {
            e.name = format!("e{i}");
        }
        let s = config(&lb, &eps);
        let svc = s.service_by_vip("10.96.0.20".parse().unwrap()).expect("service");
        let rules = svc.service.load_balancer.clone().expect("load balancer");
        let src = client(&s).expect("client");
        let allow_all = lb.contains("AllowAll");
        let rank = |w: &Workload| {
            rules.routing_preferences.iter().take_while(|&&p| match p {
                LoadBalancerScope::Region => w.locality.region == src.locality.region,
                LoadBalancerScope::Zone => w.locality.zone == src.locality.zone,
                LoadBalancerScope::Subzone => w.locality.subzone == src.locality.subzone,
                LoadBalancerScope::Node => w.node == src.node,
                _ => unreachable!(),
            }).count()
        };
        let eligible: Vec<&Workload> = s.endpoints(svc, 80).iter().map(|(w, _)| w)
            .filter(|w| rules.mode != LoadBalancerMode::Strict || rank(w) == rules.routing_preferences.len())
            .collect();
        let ranked = rules.mode != LoadBalancerMode::Standard;
        let best = eligible.iter().map(|w| if ranked { rank(w) } else { 0 }).max();
        let best_capacity: u32 = eligible.iter()
            .filter(|w| Some(if ranked { rank(w) } else { 0 }) == best)
            .map(|w| w.capacity).sum();
        let mut bal = Balancer::seeded(seed);
        for _ in 0..8 {
            match route(&scope(), &s, &mut bal, Some(src), VIP.parse().unwrap()) {
                Route::Hbone { target, .. } => {
                    prop_assert_eq!(target.port(), 8080);
                    let w = s.workload_by_ip(target.ip()).expect("endpoint");
                    prop_assert!(w.capacity > 0);
                    prop_assert!(allow_all || w.status == crate::config::HealthStatus::Healthy);
                    prop_assert!(eligible.iter().any(|e| e.name == w.name));
                    if ranked {
                        prop_assert_eq!(Some(rank(w)), best);
                    }
                }
                Route::NoEndpoint { .. } => prop_assert_eq!(best_capacity, 0),
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
