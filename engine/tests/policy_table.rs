//! Table-driven authorization tests: each case is a ztunnel-format `policies:` list
//! (parsed by `ringtun::config::parse` together with a fixed set of workloads), one
//! connection, the expected decision and the expected dry-run reports. Every case runs
//! through both `policy::evaluate` and `PolicyIndex::evaluate`, which must agree.

use ringtun::config::{parse, Snapshot};
use ringtun::policy::{evaluate, Connection, Decision, DenyReason, PolicyIndex};
use ringtun_hbone::Identity;
use std::net::IpAddr;
use std::path::Path;

/// `ns/server` lists the WorkloadSelector policy `ns/selected`; `ns/other` lists nothing;
/// `prod/db` lives in another namespace.
const WORKLOADS: &str = r#"
workloads:
- {uid: "c//v1/Pod/ns/server", name: server, namespace: ns, serviceAccount: server, workloadIps: [10.0.0.2], protocol: HBONE, services: {}, authorizationPolicies: [ns/selected]}
- {uid: "c//v1/Pod/ns/other", name: other, namespace: ns, workloadIps: [10.0.0.3], protocol: HBONE, services: {}}
- {uid: "c//v1/Pod/prod/db", name: db, namespace: prod, workloadIps: [10.0.1.2], protocol: HBONE, services: {}}
"#;

const SLEEP: &str = "spiffe://cluster.local/ns/client/sa/sleep";
const SLEEP_OTHER_TD: &str = "spiffe://other.td/ns/client/sa/sleep";
const ADMIN: &str = "spiffe://cluster.local/ns/ns/sa/admin";

#[derive(Clone, Copy, Debug)]
enum Expect {
    Allow,
    DeniedBy(&'static str),
    NotAllowed,
}

impl Expect {
    fn decision(self) -> Decision {
        match self {
            Expect::Allow => Decision::Allow,
            Expect::DeniedBy(p) => Decision::Deny {
                policy: p.to_owned(),
                reason: DenyReason::DeniedBy,
            },
            Expect::NotAllowed => Decision::Deny {
                policy: String::new(),
                reason: DenyReason::NotAllowed,
            },
        }
    }
}

struct Case {
    name: &'static str,
    /// Items of the `policies:` list (YAML, two-space indented under `policies:`).
    policies: &'static str,
    /// Destination workload: its IP (the workload is looked up by it).
    dst: &'static str,
    port: u16,
    /// Peer identity URI; `None` = plaintext (15006).
    id: Option<&'static str>,
    src: &'static str,
    expect: Expect,
    dry_run: &'static [(&'static str, Expect)],
}

const SERVER: &str = "10.0.0.2";
const OTHER: &str = "10.0.0.3";
const DB: &str = "10.0.1.2";

/// Defaults: to `ns/server` port 80 from 10.0.0.1 with the `sleep` identity, no dry-run.
const fn case(name: &'static str, policies: &'static str, expect: Expect) -> Case {
    Case {
        name,
        policies,
        dst: SERVER,
        port: 80,
        id: Some(SLEEP),
        src: "10.0.0.1",
        expect,
        dry_run: &[],
    }
}

impl Case {
    const fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    const fn id(mut self, id: Option<&'static str>) -> Self {
        self.id = id;
        self
    }
    const fn src(mut self, src: &'static str) -> Self {
        self.src = src;
        self
    }
    const fn dst(mut self, dst: &'static str) -> Self {
        self.dst = dst;
        self
    }
    const fn dry_run(mut self, d: &'static [(&'static str, Expect)]) -> Self {
        self.dry_run = d;
        self
    }
}

use Expect::{Allow, DeniedBy, NotAllowed};

fn cases() -> Vec<Case> {
    vec![
        case("no policies: allow", "", Allow),
        case(
            "ALLOW exact principal matches",
            r#"
- name: allow-sleep
  namespace: ns
  scope: Namespace
  action: Allow
  dryRun: false
  rules:
  - - - principals: [!Exact "cluster.local/ns/client/sa/sleep"]
"#,
            Allow,
        ),
        case(
            "ALLOW exact principal does not match: not allowed",
            r#"
- {name: allow-admin, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{principals: [!Exact "cluster.local/ns/ns/sa/admin"]}]]]}
"#,
            NotAllowed,
        ),
        case(
            "ALLOW with the spiffe:// scheme never matches (ztunnel strips it from the peer)",
            r#"
- {name: a, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{principals: [!Exact "spiffe://cluster.local/ns/client/sa/sleep"]}]]]}
"#,
            NotAllowed,
        ),
        case(
            "DENY matching wins over a matching ALLOW",
            r#"
- {name: allow-all, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[]]}
- {name: deny-sleep, namespace: ns, scope: Namespace, action: Deny, dryRun: false, rules: [[[{principals: [!Suffix "/sa/sleep"]}]]]}
"#,
            DeniedBy("ns/deny-sleep"),
        ),
        case(
            "DENY not matching and no ALLOW: allow",
            r#"
- {name: deny-admin, namespace: ns, scope: Namespace, action: Deny, dryRun: false, rules: [[[{principals: [!Exact "cluster.local/ns/ns/sa/admin"]}]]]}
"#,
            Allow,
        ),
        case(
            "namespaces: source namespace matches",
            r#"
- {name: from-client, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{namespaces: [!Exact client]}]]]}
"#,
            Allow,
        ),
        case(
            "namespaces: other source namespace is not allowed",
            r#"
- {name: from-client, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{namespaces: [!Exact client]}]]]}
"#,
            NotAllowed,
        )
        .id(Some(ADMIN)),
        case(
            "notNamespaces: excluded namespace is not allowed",
            r#"
- {name: not-client, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{notNamespaces: [!Exact client]}]]]}
"#,
            NotAllowed,
        ),
        case(
            "notNamespaces: plaintext peer (namespace \"\") passes",
            r#"
- {name: not-client, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{notNamespaces: [!Exact client]}]]]}
"#,
            Allow,
        )
        .id(None),
        case(
            "principals: prefix",
            r#"
- {name: a, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{principals: [!Prefix "cluster.local/ns/client/"]}]]]}
"#,
            Allow,
        ),
        case(
            "principals: prefix does not match another trust domain",
            r#"
- {name: a, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{principals: [!Prefix "cluster.local/ns/client/"]}]]]}
"#,
            NotAllowed,
        )
        .id(Some(SLEEP_OTHER_TD)),
        case(
            "principals: suffix matches any trust domain",
            r#"
- {name: a, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{principals: [!Suffix "/ns/client/sa/sleep"]}]]]}
"#,
            Allow,
        )
        .id(Some(SLEEP_OTHER_TD)),
        case(
            "principals: presence with an identity",
            r#"
- {name: mtls-only, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{principals: [!Presence []]}]]]}
"#,
            Allow,
        ),
        case(
            "plaintext vs principal rule: presence refuses plaintext",
            r#"
- {name: mtls-only, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{principals: [!Presence []]}]]]}
"#,
            NotAllowed,
        )
        .id(None),
        case(
            "plaintext vs exact principal rule",
            r#"
- {name: allow-sleep, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{principals: [!Exact "cluster.local/ns/client/sa/sleep"]}]]]}
"#,
            NotAllowed,
        )
        .id(None),
        case(
            "DENY notPrincipals presence denies plaintext",
            r#"
- {name: deny-plaintext, namespace: ns, scope: Namespace, action: Deny, dryRun: false, rules: [[[{notPrincipals: [!Presence []]}]]]}
"#,
            DeniedBy("ns/deny-plaintext"),
        )
        .id(None),
        case(
            "DENY notPrincipals presence lets mTLS through",
            r#"
- {name: deny-plaintext, namespace: ns, scope: Namespace, action: Deny, dryRun: false, rules: [[[{notPrincipals: [!Presence []]}]]]}
"#,
            Allow,
        ),
        case(
            "serviceAccounts: namespace+SA match, trust domain ignored",
            r#"
- {name: a, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{serviceAccounts: [{namespace: client, serviceAccount: sleep}]}]]]}
"#,
            Allow,
        )
        .id(Some(SLEEP_OTHER_TD)),
        case(
            "sourceIps: CIDR contains the source",
            r#"
- {name: lan, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{sourceIps: ["10.0.0.0/24"]}]]]}
"#,
            Allow,
        ),
        case(
            "sourceIps: outside the CIDR is not allowed",
            r#"
- {name: lan, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{sourceIps: ["10.0.0.0/24"]}]]]}
"#,
            NotAllowed,
        )
        .src("192.168.1.1"),
        case(
            "notSourceIps: DENY everything outside 10/8",
            r#"
- {name: outside, namespace: ns, scope: Namespace, action: Deny, dryRun: false, rules: [[[{notSourceIps: ["10.0.0.0/8"]}]]]}
"#,
            DeniedBy("ns/outside"),
        )
        .src("192.168.1.1"),
        case(
            "notSourceIps: inside 10/8 is not denied",
            r#"
- {name: outside, namespace: ns, scope: Namespace, action: Deny, dryRun: false, rules: [[[{notSourceIps: ["10.0.0.0/8"]}]]]}
"#,
            Allow,
        ),
        case(
            "destinationIps: only the server's IP is allowed",
            r#"
- {name: to-server, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{destinationIps: ["10.0.0.2/32"]}]]]}
"#,
            Allow,
        ),
        case(
            "destinationIps: another workload of the namespace is not allowed",
            r#"
- {name: to-server, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{destinationIps: ["10.0.0.2/32"]}]]]}
"#,
            NotAllowed,
        )
        .dst(OTHER),
        case(
            "destinationPorts: DENY 9999 denies 9999",
            r#"
- {name: deny-9999, namespace: ns, scope: Namespace, action: Deny, dryRun: false, rules: [[[{destinationPorts: [9999]}]]]}
"#,
            DeniedBy("ns/deny-9999"),
        )
        .port(9999),
        case(
            "destinationPorts: DENY 9999 lets 80 through",
            r#"
- {name: deny-9999, namespace: ns, scope: Namespace, action: Deny, dryRun: false, rules: [[[{destinationPorts: [9999]}]]]}
"#,
            Allow,
        ),
        case(
            "notDestinationPorts: ztunnel's examples/localhost.yaml policy (no dryRun key)",
            r#"
  - action: Allow
    rules:
    - - - notDestinationPorts:
          - 9999
    name: deny-9999
    namespace: ns
    scope: Namespace
"#,
            NotAllowed,
        )
        .port(9999),
        case(
            "notDestinationPorts: other ports allowed",
            r#"
- {name: deny-9999, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{notDestinationPorts: [9999]}]]]}
"#,
            Allow,
        )
        .port(8080),
        case(
            "multiple clauses AND: namespace matches but port does not",
            r#"
- {name: a, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{namespaces: [!Exact client]}], [{destinationPorts: [80]}]]]}
"#,
            NotAllowed,
        )
        .port(8080),
        case(
            "multiple clauses AND: both match",
            r#"
- {name: a, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{namespaces: [!Exact client]}], [{destinationPorts: [80]}]]]}
"#,
            Allow,
        ),
        case(
            "multiple matches OR: second alternative matches",
            r#"
- {name: a, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{namespaces: [!Exact nope]}, {destinationPorts: [80]}]]]}
"#,
            Allow,
        ),
        case(
            "fields inside one match AND: namespace ok, port not",
            r#"
- {name: a, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{namespaces: [!Exact client], destinationPorts: [443]}]]]}
"#,
            NotAllowed,
        ),
        case(
            "multiple rules OR: second rule matches",
            r#"
- name: a
  namespace: ns
  scope: Namespace
  action: Allow
  dryRun: false
  rules:
  - [[{namespaces: [!Exact nope]}]]
  - [[{destinationPorts: [8080]}]]
"#,
            Allow,
        )
        .port(8080),
        case(
            "scope Global: a DENY written in istio-system applies in every namespace",
            r#"
- {name: deny-9999, namespace: istio-system, scope: Global, action: Deny, dryRun: false, rules: [[[{destinationPorts: [9999]}]]]}
"#,
            DeniedBy("istio-system/deny-9999"),
        )
        .dst(DB)
        .port(9999),
        case(
            "scope Namespace: a policy of another namespace does not apply",
            r#"
- {name: deny-all, namespace: ns, scope: Namespace, action: Deny, dryRun: false, rules: [[]]}
- {name: allow-nothing, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: []}
"#,
            Allow,
        )
        .dst(DB),
        case(
            "scope WorkloadSelector: applies to the workload listing it",
            r#"
- {name: selected, namespace: ns, scope: WorkloadSelector, action: Deny, dryRun: false, rules: [[]]}
"#,
            DeniedBy("ns/selected"),
        ),
        case(
            "scope WorkloadSelector: not to another workload of the namespace",
            r#"
- {name: selected, namespace: ns, scope: WorkloadSelector, action: Deny, dryRun: false, rules: [[]]}
"#,
            Allow,
        )
        .dst(OTHER),
        case(
            "scope WorkloadSelector: an unlisted one applies to nobody",
            r#"
- {name: unlisted, namespace: ns, scope: WorkloadSelector, action: Allow, dryRun: false, rules: []}
"#,
            Allow,
        ),
        case(
            "dryRun DENY: does not deny, is reported",
            r#"
- {name: would-deny, namespace: ns, scope: Namespace, action: Deny, dryRun: true, rules: [[[{principals: [!Suffix "/sa/sleep"]}]]]}
"#,
            Allow,
        )
        .dry_run(&[("ns/would-deny", DeniedBy("ns/would-deny"))]),
        case(
            "dryRun DENY not matching: nothing reported",
            r#"
- {name: would-deny, namespace: ns, scope: Namespace, action: Deny, dryRun: true, rules: [[[{principals: [!Suffix "/sa/admin"]}]]]}
"#,
            Allow,
        ),
        case(
            "dryRun ALLOW: does not restrict, reports that enforcing it would refuse",
            r#"
- {name: only-admin, namespace: ns, scope: Namespace, action: Allow, dryRun: true, rules: [[[{principals: [!Suffix "/sa/admin"]}]]]}
"#,
            Allow,
        )
        .dry_run(&[("ns/only-admin", NotAllowed)]),
        case(
            "dryRun ALLOW matching: reported as allow",
            r#"
- {name: only-sleep, namespace: ns, scope: Namespace, action: Allow, dryRun: true, rules: [[[{principals: [!Suffix "/sa/sleep"]}]]]}
"#,
            Allow,
        )
        .dry_run(&[("ns/only-sleep", Allow)]),
        case(
            "dryRun DENY reported next to an enforced DENY",
            r#"
- {name: enforced, namespace: ns, scope: Namespace, action: Deny, dryRun: false, rules: [[]]}
- {name: shadow, namespace: ns, scope: Namespace, action: Deny, dryRun: true, rules: [[]]}
"#,
            DeniedBy("ns/enforced"),
        )
        .dry_run(&[("ns/shadow", DeniedBy("ns/shadow"))]),
        case(
            "empty rules ALLOW (Istio `spec: {}`): allow nothing",
            r#"
- {name: allow-nothing, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: []}
"#,
            NotAllowed,
        ),
        case(
            "empty rules DENY: matches nothing, no effect",
            r#"
- {name: deny-nothing, namespace: ns, scope: Namespace, action: Deny, dryRun: false, rules: []}
"#,
            Allow,
        ),
        case(
            "rule without clauses: ALLOW everything, plaintext included",
            r#"
- {name: allow-all, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[]]}
"#,
            Allow,
        )
        .id(None),
        case(
            "a match with no fields matches nothing",
            r#"
- {name: empty-match, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{}]]]}
"#,
            NotAllowed,
        ),
        case(
            "one matching ALLOW among several suffices",
            r#"
- {name: admin, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{principals: [!Suffix "/sa/admin"]}]]]}
- {name: global-sleep, namespace: istio-system, scope: Global, action: Allow, dryRun: false, rules: [[[{principals: [!Suffix "/sa/sleep"]}]]]}
"#,
            Allow,
        ),
    ]
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn snapshot(policies: &str) -> Snapshot {
    let text = if policies.is_empty() {
        WORKLOADS.to_owned()
    } else {
        format!("{WORKLOADS}policies:\n{policies}")
    };
    match parse(Path::new("policy_table.yaml"), &text) {
        Ok(l) => Snapshot::new(l.config, 1),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn policy_table() {
    let cases = cases();
    assert!(cases.len() >= 25, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let s = snapshot(c.policies);
        let w = s
            .workload_by_ip(ip(c.dst))
            .unwrap_or_else(|| panic!("{}: no workload at {}", c.name, c.dst));
        let id =
            c.id.map(|u| Identity::parse(u).unwrap_or_else(|e| panic!("{u}: {e}")));
        let conn = Connection {
            src_identity: id.as_ref(),
            src_ip: ip(c.src),
            dst_ip: ip(c.dst),
            dst_port: c.port,
        };
        let got = evaluate(&s, w, &conn);
        let indexed = PolicyIndex::new(&s).evaluate(w, &conn);
        assert_eq!(got, indexed, "{}: scan and index disagree", c.name);
        let want_dry: Vec<(String, Decision)> = c
            .dry_run
            .iter()
            .map(|(k, e)| ((*k).to_owned(), e.decision()))
            .collect();
        if got.decision != c.expect.decision() || got.dry_run != want_dry {
            failures.push(format!(
                "{}: got {:?} dry_run {:?}, want {:?} dry_run {:?}",
                c.name, got.decision, got.dry_run, c.expect, want_dry
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn decision_texts_for_the_access_log() {
    let s = snapshot(
        "- {name: deny-9999, namespace: ns, scope: Namespace, action: Deny, dryRun: false, rules: [[[{destinationPorts: [9999]}]]]}\n\
         - {name: a, namespace: ns, scope: Namespace, action: Allow, dryRun: false, rules: [[[{destinationPorts: [80]}]]]}\n",
    );
    let idx = PolicyIndex::new(&s);
    let w = s.workload_by_ip(ip(SERVER)).expect("server");
    let at = |port| Connection {
        src_identity: None,
        src_ip: ip("10.0.0.1"),
        dst_ip: ip(SERVER),
        dst_port: port,
    };
    assert_eq!(
        idx.evaluate(w, &at(9999)).decision.to_string(),
        "explicitly denied by: ns/deny-9999"
    );
    assert_eq!(
        idx.evaluate(w, &at(81)).decision.to_string(),
        "allow policies exist, but none allowed"
    );
    assert!(idx.evaluate(w, &at(80)).is_allowed());
}
