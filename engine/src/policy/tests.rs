//! Unit tests: ztunnel's own `src/rbac.rs` test table ported, store/selection edge cases,
//! and property tests (no panics, index ≡ scan, dry-run never changes the decision).

use super::matcher::{policy_matches, Subject};
use super::scan::{has_key, same_key};
use super::*;
use crate::config::{
    parse, Clause, IpNet, LocalConfig, PolicyMatch, Rule, ServiceAccountMatch, StringMatch,
};
use crate::config::{Policy, PolicyAction, PolicyScope, Snapshot, Workload};
use proptest::prelude::*;
use ringtun_hbone::Identity;
use std::net::IpAddr;
use std::path::Path;

fn snap(text: &str) -> Snapshot {
    match parse(Path::new("t.yaml"), text) {
        Ok(l) => Snapshot::new(l.config, 1),
        Err(e) => panic!("{e}"),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn conn<'a>(id: Option<&'a Identity>, src: &str, dst: &str, port: u16) -> Connection<'a> {
    Connection {
        src_identity: id,
        src_ip: ip(src),
        dst_ip: ip(dst),
        dst_port: port,
    }
}

/// Both evaluators, checked against each other.
fn eval(s: &Snapshot, workload: &str, c: &Connection<'_>) -> Evaluation {
    let w = s.workload_by_name("ns", workload).expect("workload");
    let scan = evaluate(s, w, c);
    let indexed = PolicyIndex::new(s).evaluate(w, c);
    assert_eq!(scan, indexed, "scan and index disagree");
    scan
}

fn denied_by(p: &str) -> Decision {
    Decision::Deny {
        policy: p.into(),
        reason: DenyReason::DeniedBy,
    }
}

// --- ztunnel src/rbac.rs tests, ported --------------------------------------------------

fn allow_policy(rules: Vec<Vec<Vec<PolicyMatch>>>) -> Policy {
    Policy {
        name: "p".into(),
        namespace: "namespace".into(),
        scope: PolicyScope::Global,
        action: PolicyAction::Allow,
        rules: rules
            .into_iter()
            .map(|r| Rule {
                clauses: r.into_iter().map(|matches| Clause { matches }).collect(),
            })
            .collect(),
        dry_run: false,
    }
}

fn matches(p: &Policy, c: &Connection<'_>) -> bool {
    policy_matches(p, &Subject::new(c))
}

struct Conns {
    tls: Identity,
    alt: Identity,
}

impl Conns {
    fn new() -> Self {
        Conns {
            tls: Identity::new("td", "namespace", "account"),
            alt: Identity::new("td-alt", "ns-alt", "sa=alt"),
        }
    }
    fn plaintext(&self) -> Connection<'_> {
        conn(None, "127.0.0.1", "127.0.0.2", 8080)
    }
    fn tls(&self) -> Connection<'_> {
        conn(Some(&self.tls), "127.0.0.1", "127.0.0.2", 8080)
    }
    fn tls_alt(&self) -> Connection<'_> {
        conn(Some(&self.alt), "127.0.0.3", "127.0.0.4", 9090)
    }
    /// ztunnel's `rbac_test!`: one match with one field set, against the three connections.
    fn check(&self, name: &str, m: PolicyMatch, expect: [bool; 3]) {
        let p = allow_policy(vec![vec![vec![m]]]);
        let got = [
            matches(&p, &self.plaintext()),
            matches(&p, &self.tls()),
            matches(&p, &self.tls_alt()),
        ];
        assert_eq!(got, expect, "{name}: [plaintext, tls, tls_alt]");
    }
}

#[test]
fn rbac_empty_policy() {
    let c = Conns::new();
    let pt = c.plaintext();
    assert!(!matches(
        &allow_policy(vec![vec![vec![PolicyMatch::default()]]]),
        &pt
    ));
    assert!(matches(&allow_policy(vec![vec![vec![]]]), &pt));
    assert!(matches(&allow_policy(vec![vec![]]), &pt));
    assert!(!matches(&allow_policy(vec![]), &pt));
}

#[test]
fn rbac_field_table() {
    let c = Conns::new();
    let exact = |s: &str| vec![StringMatch::Exact(s.into())];
    let sa = || {
        vec![ServiceAccountMatch {
            namespace: "namespace".into(),
            service_account: "account".into(),
        }]
    };
    let net = |s: &str| vec![IpNet::parse(s).unwrap()];
    let d = PolicyMatch::default;
    #[rustfmt::skip]
    let table: Vec<(&str, PolicyMatch, [bool; 3])> = vec![
        ("namespaces", PolicyMatch { namespaces: exact("namespace"), ..d() }, [false, true, false]),
        ("not_namespaces", PolicyMatch { not_namespaces: exact("namespace"), ..d() }, [true, false, true]),
        ("service_accounts", PolicyMatch { service_accounts: sa(), ..d() }, [false, true, false]),
        ("not_service_accounts", PolicyMatch { not_service_accounts: sa(), ..d() }, [true, false, true]),
        ("principals", PolicyMatch { principals: exact("td/ns/namespace/sa/account"), ..d() }, [false, true, false]),
        ("not_principals", PolicyMatch { not_principals: exact("td/ns/namespace/sa/account"), ..d() }, [true, false, true]),
        ("source_ips", PolicyMatch { source_ips: net("127.0.0.1/32"), ..d() }, [true, true, false]),
        ("not_source_ips", PolicyMatch { not_source_ips: net("127.0.0.1/32"), ..d() }, [false, false, true]),
        ("destination_ips", PolicyMatch { destination_ips: net("127.0.0.2/32"), ..d() }, [true, true, false]),
        ("not_destination_ips", PolicyMatch { not_destination_ips: net("127.0.0.2/32"), ..d() }, [false, false, true]),
        ("cidr_range", PolicyMatch { destination_ips: net("127.0.0.1/24"), ..d() }, [true, true, true]),
        ("destination_ports", PolicyMatch { destination_ports: vec![8080], ..d() }, [true, true, false]),
        ("not_destination_ports", PolicyMatch { not_destination_ports: vec![8080], ..d() }, [false, false, true]),
        // Beyond ztunnel's table: the empty namespace of a plaintext peer.
        ("presence_ns", PolicyMatch { namespaces: vec![StringMatch::Presence], ..d() }, [false, true, true]),
        ("empty_exact_ns", PolicyMatch { namespaces: exact(""), ..d() }, [true, false, false]),
        ("presence_principal", PolicyMatch { principals: vec![StringMatch::Presence], ..d() }, [false, true, true]),
        ("not_presence_principal", PolicyMatch { not_principals: vec![StringMatch::Presence], ..d() }, [true, false, false]),
        ("spiffe_prefix_never", PolicyMatch { principals: vec![StringMatch::Prefix("spiffe://".into())], ..d() }, [false, false, false]),
        ("both_fields", PolicyMatch { namespaces: exact("ns-alt"), destination_ports: vec![9090], ..d() }, [false, false, true]),
        ("pos_and_neg", PolicyMatch { source_ips: net("127.0.0.0/8"), not_source_ips: net("127.0.0.3/32"), ..d() }, [true, true, false]),
    ];
    for (name, m, expect) in table {
        c.check(name, m, expect);
    }
}

#[test]
fn rbac_nesting_and_multi_rule() {
    let ns = |n: &str| PolicyMatch {
        namespaces: vec![StringMatch::Exact(n.into())],
        ..PolicyMatch::default()
    };
    let port = PolicyMatch {
        destination_ports: vec![80],
        ..PolicyMatch::default()
    };
    let nested = allow_policy(vec![vec![vec![ns("a"), ns("b")], vec![port]]]);
    let multi = allow_policy(vec![vec![vec![ns("a")]], vec![vec![ns("b")]]]);
    let [a, b, bad] = ["a", "b", "bad"].map(|n| Identity::new("td", n, "account"));
    let at = |id, p| conn(Some(id), "127.0.0.1", "127.0.0.2", p);
    assert!(matches(&nested, &at(&a, 80)));
    assert!(matches(&nested, &at(&b, 80)));
    assert!(!matches(&nested, &at(&bad, 80)));
    assert!(!matches(&nested, &at(&b, 12345)));
    assert!(matches(&multi, &at(&a, 80)));
    assert!(matches(&multi, &at(&b, 1)));
    assert!(!matches(&multi, &at(&bad, 80)));
}

#[test]
fn ipv4_mapped_addresses_match_ipv4_cidrs() {
    let p = allow_policy(vec![vec![vec![PolicyMatch {
        source_ips: vec![IpNet::parse("10.0.0.0/8").unwrap()],
        destination_ips: vec![IpNet::parse("10.1.0.0/16").unwrap()],
        ..PolicyMatch::default()
    }]]]);
    assert!(matches(
        &p,
        &conn(None, "::ffff:10.0.0.9", "::ffff:10.1.2.3", 1)
    ));
    assert!(!matches(&p, &conn(None, "fd00::1", "10.1.2.3", 1)));
}

// --- selection and store semantics -------------------------------------------------------

const WORKLOADS: &str = r#"
workloads:
- {uid: s, name: server, namespace: ns, workloadIps: [10.0.0.2], services: {}, authorizationPolicies: [ns/sel, other/nsp, ns/sel, ns/missing, ns/glob]}
- {uid: o, name: other, namespace: ns, workloadIps: [10.0.0.3], services: {}}
"#;

fn with_policies(policies: &str) -> Snapshot {
    snap(&format!("{WORKLOADS}policies:\n{policies}"))
}

#[test]
fn no_policies_allows_without_allocating() {
    let s = snap(WORKLOADS);
    let e = eval(&s, "server", &conn(None, "10.0.0.1", "10.0.0.2", 80));
    assert!(e.is_allowed());
    assert_eq!(e.dry_run.capacity(), 0);
}

#[test]
fn listed_policy_applies_whatever_its_scope_and_namespace() {
    // `other/nsp` is Namespace-scoped in another namespace, but `server` lists it.
    let s = with_policies(
        "- {name: nsp, namespace: other, scope: Namespace, action: Deny, dryRun: false, rules: [[]]}\n",
    );
    let c = conn(None, "10.0.0.1", "10.0.0.2", 80);
    assert_eq!(eval(&s, "server", &c).decision, denied_by("other/nsp"));
    assert!(eval(&s, "other", &c).is_allowed());
}

#[test]
fn later_duplicate_replaces_earlier_including_its_scope() {
    // Like ztunnel's `rbac_change_scope`: the later `ns/p` is WorkloadSelector, so the
    // earlier Namespace-scoped one no longer applies to `other`.
    let s = with_policies(
        "- {name: p, namespace: ns, scope: Namespace, action: Deny, dryRun: false, rules: [[]]}\n\
         - {name: p, namespace: ns, scope: WorkloadSelector, action: Deny, dryRun: false, rules: []}\n",
    );
    let c = conn(None, "10.0.0.1", "10.0.0.3", 80);
    assert!(eval(&s, "other", &c).is_allowed());
    let idx = PolicyIndex::new(&s);
    assert_eq!(
        idx.get("ns/p").map(|p| p.scope),
        Some(PolicyScope::WorkloadSelector)
    );
    assert!(idx.get("ns/nope").is_none());
}

#[test]
fn namespace_policy_in_empty_namespace_is_global() {
    let s = with_policies(
        "- {name: p, namespace: \"\", scope: Namespace, action: Deny, dryRun: false, rules: [[]]}\n",
    );
    let c = conn(None, "10.0.0.1", "10.0.0.3", 80);
    assert_eq!(eval(&s, "other", &c).decision, denied_by("/p"));
}

#[test]
fn policy_reached_twice_is_reported_once() {
    // `ns/glob` is Global and listed; `ns/sel` is listed twice.
    let s = with_policies(
        "- {name: glob, namespace: ns, scope: Global, action: Deny, dryRun: true, rules: [[]]}\n\
         - {name: sel, namespace: ns, scope: WorkloadSelector, action: Deny, dryRun: true, rules: [[]]}\n",
    );
    let e = eval(&s, "server", &conn(None, "10.0.0.1", "10.0.0.2", 80));
    assert!(e.is_allowed());
    assert_eq!(
        e.dry_run,
        vec![
            ("ns/glob".to_owned(), denied_by("ns/glob")),
            ("ns/sel".to_owned(), denied_by("ns/sel")),
        ]
    );
}

#[test]
fn dry_run_reports_follow_ztunnel() {
    let c = conn(None, "10.0.0.1", "10.0.0.3", 80);
    // Dry-run DENY is reported even when an enforced DENY decides; dry-run ALLOWs are
    // not looked at then.
    let s = with_policies(
        "- {name: d, namespace: ns, scope: Namespace, action: Deny, dryRun: false, rules: [[]]}\n\
         - {name: dd, namespace: ns, scope: Namespace, action: Deny, dryRun: true, rules: [[]]}\n\
         - {name: da, namespace: ns, scope: Namespace, action: Allow, dryRun: true, rules: [[]]}\n",
    );
    let e = eval(&s, "other", &c);
    assert_eq!(e.decision, denied_by("ns/d"));
    assert_eq!(e.dry_run, vec![("ns/dd".to_owned(), denied_by("ns/dd"))]);

    // Only dry-run ALLOWs, none matches: would refuse; each is reported, decision allow.
    let s = with_policies(
        "- {name: a1, namespace: ns, scope: Namespace, action: Allow, dryRun: true, rules: []}\n\
         - {name: a2, namespace: ns, scope: Namespace, action: Allow, dryRun: true, rules: [[[{destinationPorts: [81]}]]]}\n",
    );
    let e = eval(&s, "other", &c);
    assert!(e.is_allowed());
    let keys: Vec<_> = e.dry_run.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["ns/a1", "ns/a2"]);
    assert!(e.dry_run.iter().all(|(_, d)| d
        == &Decision::Deny {
            policy: String::new(),
            reason: DenyReason::NotAllowed
        }));

    // One dry-run ALLOW matches: only it is reported.
    let s = with_policies(
        "- {name: a1, namespace: ns, scope: Namespace, action: Allow, dryRun: true, rules: []}\n\
         - {name: a2, namespace: ns, scope: Namespace, action: Allow, dryRun: true, rules: [[[{destinationPorts: [80]}]]]}\n",
    );
    let e = eval(&s, "other", &c);
    assert_eq!(e.dry_run, vec![("ns/a2".to_owned(), Decision::Allow)]);

    // An enforced ALLOW exists and refuses; a matching dry-run ALLOW is reported as allow.
    let s = with_policies(
        "- {name: a, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: []}\n\
         - {name: da, namespace: ns, scope: Namespace, action: Allow, dryRun: true, rules: [[]]}\n",
    );
    let e = eval(&s, "other", &c);
    assert_eq!(
        e.decision.to_string(),
        "allow policies exist, but none allowed"
    );
    assert_eq!(e.dry_run, vec![("ns/da".to_owned(), Decision::Allow)]);
}

#[test]
fn display_texts() {
    assert_eq!(Decision::Allow.to_string(), "allowed");
    assert_eq!(denied_by("ns/p").to_string(), "explicitly denied by: ns/p");
    assert_eq!(DenyReason::DeniedBy.to_string(), "explicitly denied");
    assert_eq!(
        DenyReason::NotAllowed.to_string(),
        "allow policies exist, but none allowed"
    );
}

#[test]
fn key_helpers_compare_joined_strings() {
    let p = |ns: &str, name: &str| Policy {
        name: name.into(),
        namespace: ns.into(),
        ..allow_policy(vec![])
    };
    assert!(has_key(&p("a", "b"), "a/b"));
    assert!(has_key(&p("a", "b/c"), "a/b/c"));
    assert!(!has_key(&p("a", "b"), "a/bc"));
    assert!(!has_key(&p("a", "b"), "ab"));
    assert!(has_key(&p("", "b"), "/b"));
    assert!(same_key(&p("a/b", "c"), &p("a", "b/c")));
    assert!(!same_key(&p("a", "bc"), &p("ab", "c")));
}

#[test]
fn index_is_send_sync() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<PolicyIndex>();
}

// --- property tests ----------------------------------------------------------------------

fn pick(options: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::sample::select(options).prop_map(str::to_owned)
}

fn string_match() -> impl Strategy<Value = StringMatch> {
    let s = || pick(&["", "a", "b", "td/ns/a/sa/x", "td/ns/", "/sa/x", "td", "x"]);
    prop_oneof![
        s().prop_map(StringMatch::Exact),
        s().prop_map(StringMatch::Prefix),
        s().prop_map(StringMatch::Suffix),
        Just(StringMatch::Presence),
    ]
}

fn ipnet() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<u32>(), 0u8..=32).prop_map(|(a, l)| IpNet {
            addr: IpAddr::from(a.to_be_bytes()),
            prefix_len: l
        }),
        (any::<u128>(), 0u8..=128).prop_map(|(a, l)| IpNet {
            addr: IpAddr::from(a.to_be_bytes()),
            prefix_len: l
        }),
        pick(&[
            "10.0.0.0/8",
            "10.0.0.1/32",
            "0.0.0.0/0",
            "::/0",
            "fd00::/64"
        ])
        .prop_map(|s| IpNet::parse(&s).unwrap()),
    ]
}

fn policy_match() -> impl Strategy<Value = PolicyMatch> {
    let v = |n| prop::collection::vec(string_match(), 0..n);
    let ips = || prop::collection::vec(ipnet(), 0..2);
    let ports = || prop::collection::vec(prop::sample::select(&[80u16, 8080, 0][..]), 0..2);
    let sa = || {
        prop::collection::vec(
            (pick(&["a", "b"]), pick(&["x", "y"])).prop_map(|(namespace, service_account)| {
                ServiceAccountMatch {
                    namespace,
                    service_account,
                }
            }),
            0..2,
        )
    };
    (
        (v(2), v(2), sa(), sa(), v(3), v(2)),
        (ips(), ips(), ips(), ips(), ports(), ports()),
    )
        .prop_map(
            |((ns, nns, sa, nsa, pr, npr), (si, nsi, di, ndi, dp, ndp))| PolicyMatch {
                namespaces: ns,
                not_namespaces: nns,
                service_accounts: sa,
                not_service_accounts: nsa,
                principals: pr,
                not_principals: npr,
                source_ips: si,
                not_source_ips: nsi,
                destination_ips: di,
                not_destination_ips: ndi,
                destination_ports: dp,
                not_destination_ports: ndp,
            },
        )
}

fn policy() -> impl Strategy<Value = Policy> {
    let clause = prop::collection::vec(policy_match(), 0..3).prop_map(|matches| Clause { matches });
    let rule = prop::collection::vec(clause, 0..3).prop_map(|clauses| Rule { clauses });
    (
        pick(&["p", "q", "r"]),
        pick(&["a", "b", ""]),
        prop::sample::select(
            &[
                PolicyScope::Global,
                PolicyScope::Namespace,
                PolicyScope::WorkloadSelector,
            ][..],
        ),
        prop::sample::select(&[PolicyAction::Allow, PolicyAction::Deny][..]),
        prop::collection::vec(rule, 0..3),
        any::<bool>(),
    )
        .prop_map(|(name, namespace, scope, action, rules, dry_run)| Policy {
            name,
            namespace,
            scope,
            action,
            rules,
            dry_run,
        })
}

fn base_workload() -> Workload {
    let text = "workloads:\n- {namespace: a, workloadIps: [], services: {}}\n";
    match parse(Path::new("t.yaml"), text) {
        Ok(mut l) => l.config.workloads.remove(0),
        Err(e) => panic!("{e}"),
    }
}

fn workload() -> impl Strategy<Value = Workload> {
    (
        pick(&["a", "b", ""]),
        prop::collection::vec(pick(&["a/p", "b/q", "/p", "a/r", "x/y", "b/p"]), 0..4),
    )
        .prop_map(|(namespace, authorization_policies)| Workload {
            namespace,
            authorization_policies,
            ..base_workload()
        })
}

fn identity() -> impl Strategy<Value = Option<Identity>> {
    prop::option::of(
        (pick(&["td", ""]), pick(&["a", "b"]), pick(&["x", "y"]))
            .prop_map(|(td, ns, sa)| Identity::new(&td, &ns, &sa)),
    )
}

fn addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        pick(&[
            "10.0.0.1",
            "10.9.9.9",
            "::ffff:10.0.0.1",
            "fd00::1",
            "1.2.3.4"
        ])
        .prop_map(|s| s.parse().unwrap()),
        any::<u32>().prop_map(|a| IpAddr::from(a.to_be_bytes())),
        any::<u128>().prop_map(|a| IpAddr::from(a.to_be_bytes())),
    ]
}

fn snapshot_of(policies: Vec<Policy>, workload: &Workload) -> Snapshot {
    Snapshot::new(
        LocalConfig {
            workloads: vec![workload.clone()],
            services: Vec::new(),
            policies,
        },
        0,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Never panics; the index agrees with the scan; dry-run policies never change the
    /// decision; reports only name applicable dry-run policies.
    #[test]
    fn evaluate_properties(
        policies in prop::collection::vec(policy(), 0..6),
        w in workload(),
        id in identity(),
        src in addr(),
        dst in addr(),
        port in prop::sample::select(&[80u16, 8080, 1][..]),
    ) {
        let c = Connection { src_identity: id.as_ref(), src_ip: src, dst_ip: dst, dst_port: port };
        let s = snapshot_of(policies.clone(), &w);
        let e = evaluate(&s, &w, &c);
        prop_assert_eq!(&e, &PolicyIndex::new(&s).evaluate(&w, &c));

        let enforced: Vec<Policy> = policies.iter().filter(|p| !p.dry_run).cloned().collect();
        let only_enforced = evaluate(&snapshot_of(enforced, &w), &w, &c);
        // Removing dry-run policies can un-shadow an enforced one with the same key, so
        // compare only when no key is shared between a dry-run and another policy.
        let shadowing = policies.iter().enumerate().any(|(i, p)| {
            policies.iter().enumerate().any(|(j, q)| i != j && p.dry_run && same_key(p, q))
        });
        if !shadowing {
            prop_assert_eq!(&e.decision, &only_enforced.decision);
        }
        prop_assert!(only_enforced.dry_run.is_empty());
        for (key, d) in &e.dry_run {
            prop_assert!(policies.iter().any(|p| p.dry_run && &p.key() == key));
            if let Decision::Deny { policy, reason: DenyReason::DeniedBy } = d {
                prop_assert_eq!(policy, key);
            }
        }
        if let Decision::Deny { policy, reason } = &e.decision {
            match reason {
                DenyReason::DeniedBy => prop_assert!(policies
                    .iter()
                    .any(|p| !p.dry_run && p.action == PolicyAction::Deny && &p.key() == policy)),
                DenyReason::NotAllowed => prop_assert!(policy.is_empty()),
            }
        }
    }
}
