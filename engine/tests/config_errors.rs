//! Integration tests for `ringtun::config`: the shared ztunnel example, error messages
//! (file, exact line, field path), unknown-field warnings, and no-panic properties.

use proptest::prelude::*;
use ringtun::config::{self, ConfigError, Protocol, Snapshot};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

const CONFIG_PATH: &str = "/etc/ringtun/config.yaml";

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/ztunnel-local-config-example.yaml")
}

fn example_text() -> String {
    match std::fs::read_to_string(example_path()) {
        Ok(t) => t,
        Err(e) => panic!("reading the example: {e}"),
    }
}

fn ip(s: &str) -> IpAddr {
    match s.parse() {
        Ok(ip) => ip,
        Err(e) => panic!("{s}: {e}"),
    }
}

#[test]
fn shared_example_loads_cleanly_and_lookups_work() {
    let loaded = match config::load(&example_path()) {
        Ok(l) => l,
        Err(e) => panic!("the ztunnel example must load: {e}"),
    };
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let cfg = &loaded.config;
    assert_eq!(cfg.workloads.len(), 2);
    assert_eq!(cfg.services.len(), 1);
    assert!(cfg.policies.is_empty());
    assert_eq!(cfg.workloads[0].protocol, Protocol::Hbone);
    assert_eq!(cfg.workloads[0].trust_domain, None);
    assert_eq!(cfg.services[0].vips[0].network, "");

    let snap = Snapshot::new(loaded.config, 1);
    assert_eq!(snap.generation, 1);

    let svc = match snap.service_by_vip(ip("10.96.0.10")) {
        Some(s) => s,
        None => panic!("VIP 10.96.0.10 must resolve"),
    };
    assert_eq!(svc.service.name, "server");
    assert_eq!(svc.service.namespace, "default");
    assert_eq!(svc.index, 0);

    let eps: Vec<(String, u16)> = snap
        .endpoints(svc, 80)
        .iter()
        .map(|(w, port)| (w.name.clone(), port))
        .collect();
    assert_eq!(eps, vec![("server".to_string(), 5201)]);
    assert!(snap.endpoints(svc, 81).is_empty());

    let client = snap.workload_by_ip(ip("10.77.0.1"));
    assert_eq!(client.map(|w| w.name.as_str()), Some("client"));
    assert_eq!(
        snap.workload_by_ip(ip("10.77.0.2"))
            .map(|w| w.service_account.as_str()),
        Some("server")
    );
    assert!(snap.workload_by_ip(ip("10.96.0.10")).is_none());
    assert!(snap.service_by_vip(ip("10.77.0.1")).is_none());
    assert_eq!(
        snap.workload_by_name("default", "server")
            .map(|w| w.uid.as_str()),
        Some("cluster1//v1/Pod/default/server")
    );
}

/// Replaces 1-based line `line` of the example with `with` (which may span lines).
fn example_with_line(line: usize, with: &str) -> String {
    let text = example_text();
    let mut lines: Vec<&str> = text.lines().collect();
    assert!(line >= 1 && line <= lines.len(), "line {line} out of range");
    lines[line - 1] = with;
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// The example with a policy appended (replacing `policies: []` on line 34); the policy's
/// lines start at line 35.
fn example_with_policy(policy_lines: &[&str]) -> String {
    let mut with = String::from("policies:");
    for l in policy_lines {
        with.push('\n');
        with.push_str(l);
    }
    example_with_line(34, &with)
}

struct BadCase {
    name: &'static str,
    text: String,
    line: usize,
    field: &'static str,
    what: &'static str,
}

fn bad_cases() -> Vec<BadCase> {
    let policy = |extra: &[&'static str]| {
        let mut lines = vec![
            "- name: p",
            "  namespace: default",
            "  scope: Namespace",
            "  action: Allow",
            "  dryRun: false",
            "  rules:",
        ];
        lines.extend_from_slice(extra);
        lines
    };
    vec![
        BadCase {
            name: "protocol misspelled",
            text: example_with_line(11, "  protocol: HBON"),
            line: 11,
            field: "workloads[0].protocol",
            what: "unknown variant `HBON`, expected `HBONE` or `TCP`",
        },
        BadCase {
            name: "workload IP out of range",
            text: example_with_line(19, "  workloadIps: [\"10.77.0.2\", \"10.77.0.300\"]"),
            line: 19,
            field: "workloads[1].workloadIps[1]",
            what: "10.77.0.300",
        },
        BadCase {
            name: "workloadIps not a list",
            text: example_with_line(10, "  workloadIps: 10.77.0.1"),
            line: 10,
            field: "workloads[0].workloadIps",
            what: "expected a sequence",
        },
        BadCase {
            name: "missing namespace",
            text: example_with_line(8, "  # namespace removed"),
            line: 6,
            field: "workloads[0]",
            what: "missing field `namespace`",
        },
        BadCase {
            name: "networkMode misspelled",
            text: example_with_line(12, "  node: node-a\n  networkMode: Bridge"),
            line: 13,
            field: "workloads[0].networkMode",
            what: "unknown variant `Bridge`",
        },
        BadCase {
            name: "service key without namespace",
            text: example_with_line(24, "    \"server.default.svc.cluster.local\":"),
            line: 24,
            field: "workloads[1].services",
            what: "namespace/hostname",
        },
        BadCase {
            name: "workload target port negative",
            text: example_with_line(25, "      80: -1"),
            line: 25,
            field: "workloads[1].services.default/server.default.svc.cluster.local.80",
            what: "-1",
        },
        BadCase {
            name: "capacity not a number",
            text: example_with_line(22, "  network: \"\"\n  capacity: lots"),
            line: 23,
            field: "workloads[1].capacity",
            what: "invalid type",
        },
        BadCase {
            name: "waypoint destination without slash",
            text: example_with_line(
                22,
                "  network: \"\"\n  waypoint:\n    destination: waypoint\n    hboneMtlsPort: 15008",
            ),
            line: 24,
            field: "workloads[1].waypoint.destination",
            what: "`network/IP` or `namespace/hostname`",
        },
        BadCase {
            name: "VIP without network prefix",
            text: example_with_line(31, "    - 10.96.0.10"),
            line: 31,
            field: "services[0].vips[0]",
            what: "network/IP",
        },
        BadCase {
            name: "VIP not an IP",
            text: example_with_line(31, "    - /10.96.0.999"),
            line: 31,
            field: "services[0].vips[0]",
            what: "10.96.0.999",
        },
        BadCase {
            name: "service port above 65535",
            text: example_with_line(33, "    80: 70000"),
            line: 33,
            field: "services[0].ports.80",
            what: "70000",
        },
        BadCase {
            name: "service without hostname",
            text: example_with_line(29, "  # hostname removed"),
            line: 27,
            field: "services[0]",
            what: "missing field `hostname`",
        },
        BadCase {
            name: "ipFamilies misspelled",
            text: example_with_line(33, "    80: 5201\n  ipFamilies: IPV4"),
            line: 34,
            field: "services[0].ipFamilies",
            what: "unknown variant `IPV4`",
        },
        BadCase {
            name: "policy scope misspelled",
            text: example_with_policy(&[
                "- name: p",
                "  namespace: default",
                "  scope: Cluster",
                "  action: Allow",
                "  rules: []",
            ]),
            line: 37,
            field: "policies[0].scope",
            what: "unknown variant `Cluster`, expected one of `Global`, `Namespace`, `WorkloadSelector`",
        },
        BadCase {
            name: "policy action misspelled",
            text: example_with_policy(&[
                "- name: p",
                "  namespace: default",
                "  scope: Global",
                "  action: ALLOW",
                "  rules: []",
            ]),
            line: 38,
            field: "policies[0].action",
            what: "unknown variant `ALLOW`, expected `Allow` or `Deny`",
        },
        BadCase {
            name: "policy source CIDR without prefix",
            text: example_with_policy(&policy(&["  - - - sourceIps: [\"10.0.0.1\"]"])),
            line: 41,
            field: "policies[0].rules[0][0][0].sourceIps[0]",
            what: "CIDR",
        },
        BadCase {
            name: "policy destination port out of range",
            text: example_with_policy(&policy(&[
                "  - - - destinationPorts:",
                "          - 80",
                "          - 99999",
            ])),
            line: 43,
            field: "policies[0].rules[0][0][0].destinationPorts[1]",
            what: "99999",
        },
        BadCase {
            name: "principal written as a map instead of a YAML tag",
            text: example_with_policy(&policy(&[
                "  - - - principals:",
                "          - Exact: cluster.local/ns/default/sa/client",
            ])),
            line: 42,
            field: "policies[0].rules[0][0][0].principals[0]",
            what: "YAML tag",
        },
        BadCase {
            name: "top-level workloads is a map",
            text: "# comment\nworkloads:\n  client: {}\n".to_string(),
            line: 3,
            field: "workloads",
            what: "invalid type: map, expected a sequence",
        },
    ]
}

#[test]
fn bad_inputs_name_file_line_and_field() {
    let cases = bad_cases();
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for case in &cases {
        let err = match config::parse(Path::new(CONFIG_PATH), &case.text) {
            Ok(_) => {
                failures.push(format!("{}: parsed without error", case.name));
                continue;
            }
            Err(e) => e,
        };
        let msg = err.to_string();
        let prefix = format!("{CONFIG_PATH}:{}:", case.line);
        let field = format!(": {}: ", case.field);
        if !msg.starts_with(&prefix) {
            failures.push(format!(
                "{}: want prefix {prefix:?}, got {msg:?}",
                case.name
            ));
        }
        if !msg.contains(&field) {
            failures.push(format!("{}: want field {field:?}, got {msg:?}", case.name));
        }
        if !msg.contains(case.what) {
            failures.push(format!("{}: want {:?} in {msg:?}", case.name, case.what));
        }
        if msg.contains(" at line ") {
            failures.push(format!("{}: position repeated in {msg:?}", case.name));
        }
        if err.field() != Some(case.field) {
            failures.push(format!("{}: field() = {:?}", case.name, err.field()));
        }
        if err.location().map(|(line, _)| line) != Some(case.line) {
            failures.push(format!("{}: location() = {:?}", case.name, err.location()));
        }
        if err.path() != Path::new(CONFIG_PATH) {
            failures.push(format!("{}: path() = {:?}", case.name, err.path()));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn protocol_error_reads_exactly_like_the_spec() {
    let text = example_with_line(11, "  protocol: HBON");
    let err = match config::parse(Path::new(CONFIG_PATH), &text) {
        Ok(_) => panic!("HBON must be refused"),
        Err(e) => e,
    };
    assert_eq!(
        err.to_string(),
        "/etc/ringtun/config.yaml:11:13: workloads[0].protocol: unknown variant `HBON`, expected `HBONE` or `TCP`"
    );
}

#[test]
fn syntax_errors_name_file_and_line() {
    let text = example_with_line(12, "  node: [node-a");
    let err = match config::parse(Path::new(CONFIG_PATH), &text) {
        Ok(_) => panic!("unterminated flow sequence must be refused"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("{CONFIG_PATH}:")), "{msg}");
    assert!(
        matches!(err, ConfigError::Invalid { line, .. } if line >= 12),
        "{msg}"
    );
}

#[test]
fn missing_file_names_file_and_os_error() {
    let path = Path::new("/nonexistent-ringtun-dir/config.yaml");
    let err = match config::load(path) {
        Ok(_) => panic!("a missing file must not load"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::Read { .. }), "{msg}");
    assert!(
        msg.starts_with("/nonexistent-ringtun-dir/config.yaml: "),
        "{msg}"
    );
    let os = std::io::Error::from(std::io::ErrorKind::NotFound).to_string();
    assert!(
        msg.contains("No such file or directory") || msg.contains(&os),
        "{msg}"
    );
}

#[test]
fn empty_file_is_an_empty_config() {
    for text in ["", "# just a comment\n"] {
        let loaded = match config::parse(Path::new(CONFIG_PATH), text) {
            Ok(l) => l,
            Err(e) => panic!("{text:?}: {e}"),
        };
        assert!(loaded.config.workloads.is_empty());
        assert!(loaded.config.services.is_empty());
        assert!(loaded.config.policies.is_empty());
        assert!(loaded.warnings.is_empty());
    }
}

#[test]
fn unknown_fields_are_warnings_not_errors() {
    let text = example_with_line(
        12,
        "  node: node-a\n  fooBar: 1\n  extra:\n    nested: true",
    );
    let text = text.replace("policies: []", "policies: []\nsomethingNew: {}");
    let text = text.replace("  hostname: server", "  color: blue\n  hostname: server");
    let loaded = match config::parse(Path::new(CONFIG_PATH), &text) {
        Ok(l) => l,
        Err(e) => panic!("unknown fields must not fail the parse: {e}"),
    };
    let all = loaded.warnings.join("\n");
    for field in [
        "workloads[0].fooBar",
        "workloads[0].extra",
        "services[0].color",
        "somethingNew",
    ] {
        assert!(
            loaded
                .warnings
                .iter()
                .any(|w| w.contains(&format!("`{field}`"))),
            "no warning for {field}:\n{all}"
        );
    }
    assert_eq!(loaded.warnings.len(), 4, "{all}");
    // The known fields still parsed.
    assert_eq!(loaded.config.workloads[0].node, "node-a");
    assert_eq!(
        loaded.config.services[0].hostname,
        "server.default.svc.cluster.local"
    );
}

#[test]
fn workload_without_services_key_is_accepted_with_a_warning() {
    let text = example_with_line(14, "  # services removed");
    let loaded = match config::parse(Path::new(CONFIG_PATH), &text) {
        Ok(l) => l,
        Err(e) => panic!("{e}"),
    };
    assert!(loaded.config.workloads[0].services.is_empty());
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    let w = &loaded.warnings[0];
    assert!(w.contains("workloads[0] (default/client)"), "{w}");
    assert!(w.contains("`services`"), "{w}");
}

#[test]
fn cross_check_warnings_name_the_entities() {
    // Client takes the server's IP; the server names a service that does not exist.
    let text = example_with_line(10, "  workloadIps: [\"10.77.0.2\"]");
    let text = text.replace(
        "\"default/server.default.svc.cluster.local\":\n      80: 5201",
        "\"default/server.default.svc.cluster.local\":\n      80: 5201\n    \"default/ghost\":\n      80: 80",
    );
    let loaded = match config::parse(Path::new(CONFIG_PATH), &text) {
        Ok(l) => l,
        Err(e) => panic!("{e}"),
    };
    let all = loaded.warnings.join("\n");
    assert!(
        loaded.warnings.iter().any(|w| w.contains("IP 10.77.0.2")
            && w.contains("workloads[0] (default/client)")
            && w.contains("workloads[1] (default/server)")),
        "{all}"
    );
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("workloads[1] (default/server)") && w.contains("`default/ghost`")),
        "{all}"
    );
    assert_eq!(loaded.warnings.len(), 2, "{all}");
}

/// Parses and, when that succeeds, exercises every lookup; asserts errors name the file.
fn parse_and_exercise(text: &str) -> Result<(), TestCaseError> {
    match config::parse(Path::new(CONFIG_PATH), text) {
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(msg.starts_with(CONFIG_PATH), "{}", msg);
        }
        Ok(loaded) => {
            let snap = Snapshot::new(loaded.config, 3);
            let copy = snap.clone();
            for s in copy.services() {
                for vip in &s.vips {
                    if let Some(svc) = snap.service_by_vip(vip.address) {
                        for &port in s.ports.keys() {
                            for (w, _) in snap.endpoints(svc, port) {
                                prop_assert!(w.services.contains_key(&svc.service.key()));
                            }
                        }
                    }
                }
            }
            for w in copy.workloads() {
                for &ip in &w.workload_ips {
                    let _ = snap.workload_by_ip(ip);
                }
                let _ = snap.workload_by_name(&w.namespace, &w.name);
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete {
        at: prop::sample::Index,
        len: usize,
    },
    Insert {
        at: prop::sample::Index,
        text: String,
    },
    Replace {
        at: prop::sample::Index,
        ch: char,
    },
    DuplicateLine {
        at: prop::sample::Index,
    },
    SwapLines {
        a: prop::sample::Index,
        b: prop::sample::Index,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let yamlish = "[ -~\n\t]{0,12}|[:\\-\\[\\]{}!&*|>'\"#%@`,?]{1,3}";
    prop_oneof![
        (any::<prop::sample::Index>(), 1usize..30)
            .prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<prop::sample::Index>(), yamlish)
            .prop_map(|(at, text)| Mutation::Insert { at, text }),
        (any::<prop::sample::Index>(), any::<char>())
            .prop_map(|(at, ch)| Mutation::Replace { at, ch }),
        any::<prop::sample::Index>().prop_map(|at| Mutation::DuplicateLine { at }),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(a, b)| Mutation::SwapLines { a, b }),
    ]
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    match m {
        Mutation::Delete { at, len } => {
            if !chars.is_empty() {
                let start = at.index(chars.len());
                let end = (start + len).min(chars.len());
                chars.drain(start..end);
            }
        }
        Mutation::Insert { at, text } => {
            let pos = at.index(chars.len() + 1);
            chars.splice(pos..pos, text.chars());
        }
        Mutation::Replace { at, ch } => {
            if !chars.is_empty() {
                let i = at.index(chars.len());
                chars[i] = *ch;
            }
        }
        Mutation::DuplicateLine { at } | Mutation::SwapLines { a: at, .. } => {
            let mut lines: Vec<String> = chars
                .iter()
                .collect::<String>()
                .lines()
                .map(str::to_owned)
                .collect();
            if !lines.is_empty() {
                let i = at.index(lines.len());
                match m {
                    Mutation::SwapLines { b, .. } => {
                        let j = b.index(lines.len());
                        lines.swap(i, j);
                    }
                    _ => {
                        let dup = lines[i].clone();
                        lines.insert(i, dup);
                    }
                }
            }
            return lines.join("\n");
        }
    }
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics_on_arbitrary_strings(text in any::<String>()) {
        parse_and_exercise(&text)?;
    }

    #[test]
    fn parse_never_panics_on_yamlish_strings(
        text in "([a-zA-Z0-9 :\\-\\[\\]{}\"'/!&*#|>,.~\n]){0,300}"
    ) {
        parse_and_exercise(&text)?;
    }

    #[test]
    fn parse_never_panics_on_mutated_example(
        mutations in prop::collection::vec(mutation(), 1..8)
    ) {
        let mut text = example_text();
        for m in &mutations {
            text = apply(&text, m);
        }
        parse_and_exercise(&text)?;
    }
}
