//! Decisions without sockets: routing as ztunnel's outbound tests lay it out (a config, a
//! destination, where it goes), admission and its refusals, and property tests over both.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::rc::Rc;

use http::StatusCode;
use proptest::prelude::*;
use ringtun_hbone::Identity;

use super::*;
use crate::config::{parse, Snapshot};
use crate::policy::Decision;

const SERVER_HOST: &str = "server.default.svc.cluster.local";
const ONE_HOST: &str = "one.default.svc.cluster.local";

const CONFIG: &str = r#"
workloads:
- {uid: "c//Pod/default/client", name: client, namespace: default, serviceAccount: client, node: node-a, protocol: HBONE, workloadIps: [10.0.0.1], services: {}}
- {uid: "c//Pod/default/server", name: server, namespace: default, serviceAccount: server, node: node-b, protocol: HBONE, workloadIps: [10.0.0.2], services: {"default/server.default.svc.cluster.local": {80: 8080}, "default/one.default.svc.cluster.local": {80: 8080, 7000: 7000}}}
- {uid: "c//Pod/default/server2", name: server2, namespace: default, serviceAccount: server, node: node-b, protocol: HBONE, workloadIps: [10.0.0.3, "fd00::3"], services: {"default/server.default.svc.cluster.local": {80: 8081}}}
- {uid: "c//Pod/default/plain", name: plain, namespace: default, serviceAccount: plain, node: node-b, protocol: TCP, workloadIps: [10.0.0.4], services: {"default/plain.default.svc.cluster.local": {80: 9090}}}
- {uid: "c//Pod/other/far", name: far, namespace: other, serviceAccount: sa, trustDomain: other.td, protocol: HBONE, workloadIps: [10.0.0.5], services: {}}
services:
- {name: server, namespace: default, hostname: server.default.svc.cluster.local, vips: [/10.96.0.10, "/fd00::10"], ports: {80: 8080, 443: 8443}, subjectAltNames: ["spiffe://cluster.local/ns/default/sa/alt", "not a spiffe id"]}
- {name: plain, namespace: default, hostname: plain.default.svc.cluster.local, vips: [/10.96.0.11], ports: {80: 9090}}
- {name: empty, namespace: default, hostname: empty.default.svc.cluster.local, vips: [/10.96.0.12], ports: {80: 80}}
- {name: one, namespace: default, hostname: one.default.svc.cluster.local, vips: [/10.96.0.13], ports: {80: 1, 443: 0, 8443: 8443}, subjectAltNames: ["spiffe://cluster.local/ns/default/sa/alt", "not a spiffe id"]}
policies: []
"#;

fn snapshot_of(text: &str, generation: u64) -> Snapshot {
    match parse(Path::new("t.yaml"), text) {
        Ok(l) => Snapshot::new(l.config, generation),
        Err(e) => panic!("{e}"),
    }
}

fn snap() -> Snapshot {
    snapshot_of(CONFIG, 1)
}

fn with_policies(policies: &str, generation: u64) -> Snapshot {
    snapshot_of(
        &CONFIG.replace("policies: []\n", &format!("policies:\n{policies}")),
        generation,
    )
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa)
}

/// The shared-mode scope of the server node's ringtun (certificate default/server).
fn scope() -> Scope {
    Scope {
        workload: None,
        service_account: None,
        node: None,
        identity: id("default", "server"),
        trust_domain: "cluster.local".into(),
        own_ports: vec![15001, 15006, 15008],
    }
}

fn hbone(target: &str, ids: &[Identity], service: Option<&str>) -> Route {
    Route::Hbone {
        target: addr(target),
        identities: ids.to_vec(),
        service: service.map(str::to_owned),
    }
}

// --- routing ----------------------------------------------------------------------------------

#[test]
fn routes_like_ztunnel() {
    let s = snap();
    let alt = Identity::parse("spiffe://cluster.local/ns/default/sa/alt").unwrap();
    let server = id("default", "server");
    let cases: Vec<(&str, &str, Route)> = vec![
        (
            "a VIP goes to its endpoint's own target port, which may present the service's SANs",
            "10.96.0.13:80",
            hbone(
                "10.0.0.2:8080",
                &[server.clone(), alt.clone()],
                Some(ONE_HOST),
            ),
        ),
        (
            "a port the endpoint's map lacks takes the service's target port",
            "10.96.0.13:8443",
            hbone(
                "10.0.0.2:8443",
                &[server.clone(), alt.clone()],
                Some(ONE_HOST),
            ),
        ),
        (
            "the service maps the port to 0 and the endpoint not at all: no endpoint",
            "10.96.0.13:443",
            Route::NoEndpoint {
                service: ONE_HOST.into(),
            },
        ),
        (
            "a port the service lacks has no endpoint, even where the workload maps it",
            "10.96.0.13:7000",
            Route::NoEndpoint {
                service: ONE_HOST.into(),
            },
        ),
        (
            "a pod IP goes to that workload, port unchanged, its own identity only",
            "10.0.0.3:5201",
            hbone("10.0.0.3:5201", std::slice::from_ref(&server), None),
        ),
        (
            "a workload in another trust domain is expected to present it",
            "10.0.0.5:80",
            hbone(
                "10.0.0.5:80",
                &[Identity::new("other.td", "other", "sa")],
                None,
            ),
        ),
        (
            "a TCP workload is reached directly",
            "10.0.0.4:80",
            Route::Direct {
                target: addr("10.0.0.4:80"),
                service: None,
            },
        ),
        (
            "a VIP whose endpoints are TCP workloads is reached directly, at the target port",
            "10.96.0.11:80",
            Route::Direct {
                target: addr("10.0.0.4:9090"),
                service: Some("plain.default.svc.cluster.local".into()),
            },
        ),
        (
            "an address outside the mesh passes through unchanged",
            "192.0.2.7:443",
            Route::Direct {
                target: addr("192.0.2.7:443"),
                service: None,
            },
        ),
        (
            "a service without endpoints has none",
            "10.96.0.12:80",
            Route::NoEndpoint {
                service: "empty.default.svc.cluster.local".into(),
            },
        ),
    ];
    for (what, dst, want) in cases {
        let mut bal = Balancer::seeded(1);
        assert_eq!(
            route(&scope(), &s, &mut bal, None, addr(dst)),
            want,
            "{what}"
        );
    }
}

#[test]
fn a_vip_draws_among_its_endpoints_in_the_dialled_family() {
    let s = snap();
    let mut bal = Balancer::seeded(7);
    let mut seen = std::collections::BTreeMap::new();
    for dst in ["[fd00::10]:80", "10.96.0.10:80", "10.96.0.10:443"] {
        for _ in 0..200 {
            match route(&scope(), &s, &mut bal, None, addr(dst)) {
                Route::Hbone {
                    target, service, ..
                } => {
                    assert_eq!(service.as_deref(), Some(SERVER_HOST));
                    *seen.entry((dst, target)).or_insert(0) += 1;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    // server has no IPv6 address: its first one is used; server2 answers on its IPv6 one.
    // Port 443 is in neither endpoint's map: the service's target port.
    let targets: Vec<_> = seen.keys().map(|(d, t)| format!("{d} {t}")).collect();
    assert_eq!(
        targets,
        [
            "10.96.0.10:443 10.0.0.2:8443",
            "10.96.0.10:443 10.0.0.3:8443",
            "10.96.0.10:80 10.0.0.2:8080",
            "10.96.0.10:80 10.0.0.3:8081",
            "[fd00::10]:80 10.0.0.2:8080",
            "[fd00::10]:80 [fd00::3]:8081",
        ]
    );
    assert!(seen.values().all(|&n| n > 60), "{seen:?}");
}

// --- the original destination -----------------------------------------------------------------

#[test]
fn only_a_redirected_connection_has_an_original_destination() {
    let local = addr("10.0.0.1:15001");
    assert_eq!(captured(local, local), Err(Refusal::NotRedirected));
    assert_eq!(
        captured(local, addr("10.96.0.10:80")),
        Ok(addr("10.96.0.10:80"))
    );
    assert_eq!(
        captured(local, addr("[::ffff:10.96.0.10]:80")),
        Ok(addr("10.96.0.10:80")),
        "an IPv4-mapped destination is used in IPv4 form"
    );
}

// --- scope --------------------------------------------------------------------------------------

#[test]
fn scope_serves_by_workload_node_or_identity() {
    let s = snap();
    let shared = scope();
    assert!(shared.serves(&s, ip("10.0.0.2")), "same identity");
    assert!(shared.serves(&s, ip("10.0.0.3")), "same identity");
    assert!(!shared.serves(&s, ip("10.0.0.1")), "another identity");
    assert!(!shared.serves(&s, ip("192.0.2.7")), "no workload");
    let node = Scope {
        node: Some("node-b".into()),
        ..scope()
    };
    assert!(node.serves(&s, ip("10.0.0.4")), "on the node, any identity");
    assert!(!node.serves(&s, ip("10.0.0.1")), "another node");
    let dedicated = Scope {
        workload: Some(("default".into(), "server2".into())),
        ..scope()
    };
    assert!(dedicated.is_dedicated());
    assert!(dedicated.serves(&s, ip("fd00::3")));
    assert!(
        !dedicated.serves(&s, ip("10.0.0.2")),
        "same identity, not it"
    );
    assert_eq!(
        dedicated
            .source_workload(&s, ip("192.0.2.7"))
            .map(|w| w.name.as_str()),
        Some("server2"),
        "a dedicated ringtun speaks for its workload whatever the source address"
    );
    assert_eq!(
        shared
            .source_workload(&s, ip("10.0.0.1"))
            .map(|w| w.name.as_str()),
        Some("client")
    );
    assert!(shared.is_own_port(15008));
    assert!(!shared.is_own_port(8080));
    assert!(!Scope {
        own_ports: vec![0],
        ..scope()
    }
    .is_own_port(0));
}

/// In-pod mode: the agent names a pod by namespace, name and service account (its uid is the
/// Kubernetes pod's, not the config's); like ztunnel's `WorkloadInfo::matches`, the workload of
/// that name counts as the pod's only with that service account too.
#[test]
fn a_pods_workload_is_its_namespace_name_and_service_account() {
    let s = snap();
    let pod = |name: &str, sa: &str| Scope {
        workload: Some(("default".into(), name.into())),
        service_account: Some(sa.into()),
        identity: id("default", sa),
        ..scope()
    };
    let server2 = pod("server2", "server");
    assert_eq!(
        server2
            .source_workload(&s, ip("192.0.2.7"))
            .map(|w| w.uid.as_str()),
        Some("c//Pod/default/server2")
    );
    assert!(server2.serves(&s, ip("10.0.0.3")));
    assert!(!server2.serves(&s, ip("10.0.0.2")), "same identity, not it");

    // The config's default/server2 runs as `server`: a pod announced as default/server2 with
    // service account `impostor` is not that workload, neither as a source nor to deliver to.
    let other = pod("server2", "impostor");
    assert_eq!(other.source_workload(&s, ip("10.0.0.3")), None);
    assert!(!other.serves(&s, ip("10.0.0.3")));
    let admitted = admit_plaintext(&other, &s, &arrival("10.0.0.1", None, "10.0.0.3:8081"));
    assert_eq!(
        admitted.outcome.err(),
        Some(Refusal::NotServed {
            dst: ip("10.0.0.3")
        })
    );
}

// --- admission ----------------------------------------------------------------------------------

fn arrival<'a>(src: &str, identity: Option<&'a Rc<Identity>>, dst: &str) -> Arrival<'a> {
    Arrival {
        src_ip: ip(src),
        src_identity: identity,
        dst: addr(dst),
        reached: Some(addr("10.0.0.2:15008")),
    }
}

#[test]
fn hbone_admission_refuses_as_ztunnel_does() {
    let s = snap();
    let client = Rc::new(id("default", "client"));
    let dedicated = Scope {
        workload: Some(("default".into(), "server".into())),
        ..scope()
    };
    let refused = |scope: &Scope, dst: &str| {
        admit_hbone(scope, &s, &arrival("10.0.0.1", Some(&client), dst))
            .outcome
            .err()
    };
    assert_eq!(
        refused(&dedicated, "10.0.0.3:80"),
        Some(Refusal::IpMismatch {
            dst: ip("10.0.0.3"),
            reached: ip("10.0.0.2")
        }),
        "dedicated: only the address the connection reached"
    );
    assert_eq!(
        refused(&scope(), "10.0.0.3:80"),
        None,
        "shared: any workload served here"
    );
    assert_eq!(refused(&scope(), "10.0.0.2:15008"), Some(Refusal::OwnPort));
    assert_eq!(
        refused(&scope(), "10.0.0.1:80"),
        Some(Refusal::NotServed {
            dst: ip("10.0.0.1")
        })
    );
    assert_eq!(
        refused(&scope(), "192.0.2.7:80"),
        Some(Refusal::NotServed {
            dst: ip("192.0.2.7")
        })
    );
}

#[test]
fn admission_names_the_workloads_and_grants_what_it_checked() {
    let s = snap();
    let client = Rc::new(id("default", "client"));
    let a = admit_hbone(
        &scope(),
        &s,
        &arrival("10.0.0.1", Some(&client), "10.0.0.2:5201"),
    );
    assert_eq!(a.src_workload.map(|w| w.name.as_str()), Some("client"));
    assert_eq!(a.dst_workload.map(|w| w.name.as_str()), Some("server"));
    assert!(a.dry_run.is_empty());
    assert_eq!(
        a.outcome,
        Ok(Grant {
            src_identity: Some(client.clone()),
            src_ip: ip("10.0.0.1"),
            dst_ip: ip("10.0.0.2"),
            dst_port: 5201,
            generation: 1,
        })
    );
    let refused = admit_hbone(
        &scope(),
        &s,
        &arrival("10.0.0.1", Some(&client), "10.0.0.1:5201"),
    );
    assert_eq!(
        refused.dst_workload, None,
        "not served: no destination named"
    );
    assert_eq!(
        refused.src_workload.map(|w| w.name.as_str()),
        Some("client")
    );
}

const DENY_CLIENT: &str = "- {name: deny-client, namespace: default, scope: Namespace, action: Deny, dryRun: false, rules: [[[{principals: [!Exact cluster.local/ns/default/sa/client]}]]]}\n";
const ALLOW_MTLS: &str = "- {name: mtls-only, namespace: default, scope: Namespace, action: Allow, dryRun: false, rules: [[[{principals: [!Presence []]}]]]}\n";
const DENY_ALL_DRY: &str = "- {name: deny-all-dry, namespace: default, scope: Namespace, action: Deny, dryRun: true, rules: [[]]}\n";

#[test]
fn policy_refuses_with_401_and_names_the_policy() {
    let s = with_policies(&format!("{DENY_CLIENT}{DENY_ALL_DRY}"), 3);
    let client = Rc::new(id("default", "client"));
    let other = Rc::new(id("default", "other"));
    let a = admit_hbone(
        &scope(),
        &s,
        &arrival("10.0.0.1", Some(&client), "10.0.0.2:5201"),
    );
    let refusal = a.outcome.clone().unwrap_err();
    assert_eq!(refusal.status(), Some(StatusCode::UNAUTHORIZED));
    assert_eq!(refusal.response_flags(), Some("DENY"));
    assert_eq!(
        refusal.to_string(),
        "connection closed due to policy rejection: explicitly denied by: default/deny-client"
    );
    assert_eq!(a.dst_workload.map(|w| w.name.as_str()), Some("server"));
    assert_eq!(
        a.dry_run.first().map(|(p, _)| p.as_str()),
        Some("default/deny-all-dry"),
        "dry-run policies are reported even when an enforced one refuses"
    );
    let b = admit_hbone(
        &scope(),
        &s,
        &arrival("10.0.0.1", Some(&other), "10.0.0.2:5201"),
    );
    assert!(b.outcome.is_ok(), "{:?}", b.outcome);
    assert!(
        matches!(b.dry_run.as_slice(), [(p, Decision::Deny { .. })] if p == "default/deny-all-dry"),
        "{:?}",
        b.dry_run
    );
}

#[test]
fn plaintext_admission_has_no_principal_and_no_self_call_check() {
    let s = with_policies(ALLOW_MTLS, 1);
    let a = admit_plaintext(&scope(), &s, &arrival("10.0.0.1", None, "10.0.0.2:5201"));
    assert_eq!(
        a.outcome.unwrap_err(),
        Refusal::Denied {
            detail: "allow policies exist, but none allowed".into()
        }
    );
    let open = snap();
    let a = admit_plaintext(
        &scope(),
        &open,
        &arrival("10.0.0.1", None, "10.0.0.2:15008"),
    );
    assert!(
        a.outcome.is_ok(),
        "15006 carries captured traffic: its destination port is the workload's"
    );
    let a = admit_plaintext(&scope(), &open, &arrival("10.0.0.1", None, "10.0.0.1:80"));
    assert_eq!(
        a.outcome.unwrap_err(),
        Refusal::NotServed {
            dst: ip("10.0.0.1")
        }
    );
}

#[test]
fn a_policy_update_revokes_the_grants_it_denies() {
    let client = Rc::new(id("default", "client"));
    let before = snap();
    let grant = admit_hbone(
        &scope(),
        &before,
        &arrival("10.0.0.1", Some(&client), "10.0.0.2:5201"),
    )
    .outcome
    .unwrap();
    assert_eq!(revoked(&before, &grant), None);
    let after = with_policies(DENY_CLIENT, 2);
    assert_eq!(
        revoked(&after, &grant).as_deref(),
        Some("explicitly denied by: default/deny-client")
    );
    let plain = Grant {
        src_identity: None,
        ..grant.clone()
    };
    assert_eq!(revoked(&after, &plain), None, "no principal, no match");
    let gone = Grant {
        dst_ip: ip("192.0.2.7"),
        ..grant
    };
    assert_eq!(
        revoked(&after, &gone),
        None,
        "a destination that left the config is left alone"
    );
}

#[test]
fn connect_targets_are_parsed_as_ztunnel_parses_them() {
    let target = |method: &str, uri: &str| {
        let method: http::Method = method.parse().unwrap();
        let uri: http::Uri = uri.parse().unwrap();
        connect_target(&method, &uri)
    };
    let at = |s| Ok(Authority::Addr(addr(s)));
    assert_eq!(target("CONNECT", "10.0.0.2:80"), at("10.0.0.2:80"));
    assert_eq!(target("CONNECT", "[::ffff:10.0.0.2]:80"), at("10.0.0.2:80"));
    assert_eq!(target("CONNECT", "10.0.0.2:0"), at("10.0.0.2:0"));
    assert_eq!(
        target("CONNECT", "server.default.svc.cluster.local:80"),
        Ok(Authority::Host(
            "server.default.svc.cluster.local".into(),
            80
        ))
    );
    for (method, uri, text) in [
        (
            "GET",
            "http://10.0.0.2:80/",
            "expected method CONNECT, got GET",
        ),
        (
            "CONNECT",
            "10.0.0.2",
            "no valid authority pseudo header: 10.0.0.2",
        ),
        (
            "CONNECT",
            "server.default.svc.cluster.local",
            "no valid authority pseudo header: server.default.svc.cluster.local",
        ),
    ] {
        let r = target(method, uri).unwrap_err();
        assert_eq!(r.status(), Some(StatusCode::BAD_REQUEST), "{method} {uri}");
        assert_eq!(r.to_string(), text, "{method} {uri}");
    }
}

#[test]
fn a_hostname_resolves_to_the_reached_workloads_target_port() {
    let s = snap();
    let at = |reached: &str, port| {
        resolve_hostname(&scope(), &s, ip(reached), SERVER_HOST, port).map(|(a, svc)| {
            assert_eq!(svc.hostname, SERVER_HOST);
            a
        })
    };
    // The workload's own endpoint map first, then the service's `ports`.
    assert_eq!(at("10.0.0.3", 80), Ok(addr("10.0.0.3:8081")));
    assert_eq!(at("10.0.0.3", 443), Ok(addr("10.0.0.3:8443")));
    let r = at("10.0.0.3", 1).unwrap_err();
    assert_eq!(r.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(
        r.to_string(),
        format!("requested service {SERVER_HOST}:1 found, but cannot resolve port")
    );
    let r = resolve_hostname(&scope(), &s, ip("10.0.0.3"), "nosuch.example", 80).unwrap_err();
    assert_eq!(r.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(
        r.to_string(),
        "no service or workload for hostname: nosuch.example"
    );
    assert_eq!(
        at("10.0.0.1", 80),
        Err(Refusal::NotServed {
            dst: ip("10.0.0.1")
        }),
        "the client node's workload is not served here"
    );
}

#[test]
fn response_baggage_has_only_what_the_entry_has() {
    let s = snap();
    let w = s.workload_by_name("default", "server").unwrap();
    assert_eq!(response_baggage(w), "k8s.namespace.name=default");
    // A name without a type keeps ztunnel's empty type in the key.
    let named = snapshot_of(
        "workloads:\n- {uid: u, name: p, namespace: ns, workloadName: web, workloadIps: [10.0.0.9], services: {}}\n",
        1,
    );
    let w = named.workload_by_name("ns", "p").unwrap();
    assert_eq!(response_baggage(w), "k8s.namespace.name=ns,k8s..name=web");
}

// --- refusals ------------------------------------------------------------------------------------

#[test]
fn each_refusal_has_its_answer_flags_and_ztunnels_words() {
    let denied = Refusal::Denied {
        detail: "explicitly denied by: default/deny".into(),
    };
    let cases: Vec<(Refusal, Option<u16>, Option<&str>, &str)> = vec![
        (
            Refusal::NotRedirected,
            None,
            Some("CONNECT"),
            "connection was not redirected (no original destination); this listener only serves captured traffic",
        ),
        (
            Refusal::NoEndpoint {
                dst: addr("10.96.0.10:443"),
            },
            None,
            Some("CONNECT"),
            "no healthy upstream: 10.96.0.10:443",
        ),
        (
            Refusal::Unreachable {
                target: addr("10.0.0.9:7000"),
                error: "Connection refused (os error 111)".into(),
            },
            None,
            Some("CONNECT"),
            "connect 10.0.0.9:7000: Connection refused (os error 111)",
        ),
        (
            Refusal::Tunnel("HBONE peer 10.0.0.2:15008 answered 401".into()),
            None,
            Some("CONNECT"),
            "HBONE peer 10.0.0.2:15008 answered 401",
        ),
        (
            Refusal::PeerStatus(StatusCode::UNAUTHORIZED),
            None,
            Some("CONNECT"),
            "http status: 401 Unauthorized",
        ),
        (
            Refusal::NotConnect {
                method: "GET".into(),
            },
            Some(400),
            Some("CONNECT"),
            "expected method CONNECT, got GET",
        ),
        (
            Refusal::BadAuthority {
                authority: "10.0.0.2".into(),
            },
            Some(400),
            Some("CONNECT"),
            "no valid authority pseudo header: 10.0.0.2",
        ),
        (
            Refusal::IpMismatch {
                dst: ip("10.0.0.3"),
                reached: ip("10.0.0.2"),
            },
            Some(400),
            Some("CONNECT"),
            "ip mismatch: 10.0.0.2 != 10.0.0.3",
        ),
        (
            Refusal::OwnPort,
            Some(503),
            Some("CONNECT"),
            "attempted recursive call to ourselves",
        ),
        (
            Refusal::NoHostname {
                host: "nosuch.example".into(),
            },
            Some(503),
            Some("CONNECT"),
            "no service or workload for hostname: nosuch.example",
        ),
        (
            Refusal::NoServicePort {
                host: "s.example".into(),
                port: 81,
            },
            Some(503),
            Some("CONNECT"),
            "requested service s.example:81 found, but cannot resolve port",
        ),
        (
            Refusal::NotServed {
                dst: ip("10.0.0.9"),
            },
            Some(503),
            Some("CONNECT"),
            "unknown destination: 10.0.0.9",
        ),
        (
            denied,
            Some(401),
            Some("DENY"),
            "connection closed due to policy rejection: explicitly denied by: default/deny",
        ),
        (
            Refusal::DestinationUnreachable {
                error: "Connection refused (os error 111)".into(),
            },
            Some(503),
            Some("CONNECT"),
            "connection failed: Connection refused (os error 111)",
        ),
        (
            Refusal::Lost("stream closed".into()),
            None,
            None,
            "hbone: stream closed",
        ),
    ];
    for (refusal, status, flags, text) in cases {
        assert_eq!(refusal.status().map(|s| s.as_u16()), status, "{refusal:?}");
        assert_eq!(refusal.response_flags(), flags, "{refusal:?}");
        assert_eq!(refusal.to_string(), text, "{refusal:?}");
    }
}

// --- properties ------------------------------------------------------------------------------------

fn any_dst() -> impl Strategy<Value = SocketAddr> {
    let ips = prop::sample::select(vec![
        "10.96.0.10",
        "10.96.0.11",
        "10.96.0.12",
        "fd00::10",
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
        "fd00::3",
        "10.0.0.4",
        "10.0.0.5",
        "192.0.2.7",
        "::ffff:10.96.0.10",
    ]);
    let ports = prop_oneof![
        prop::sample::select(vec![80u16, 443, 15008, 0]),
        any::<u16>()
    ];
    (ips, ports).prop_map(|(i, p)| SocketAddr::new(ip(i), p))
}

fn any_scope() -> impl Strategy<Value = Scope> {
    let workload = prop::option::of(prop::sample::select(vec![
        ("default", "server"),
        ("default", "client"),
        ("default", "nobody"),
    ]));
    let node = prop::option::of(prop::sample::select(vec!["node-a", "node-b"]));
    (workload, node).prop_map(|(workload, node)| Scope {
        workload: workload.map(|(ns, n)| (ns.to_owned(), n.to_owned())),
        node: node.map(str::to_owned),
        ..scope()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Never panics; a VIP's route is one of its endpoints for the dialled port, expected to
    /// present the workload's identity first; anything not in the mesh passes through as is.
    #[test]
    fn routes_stay_within_the_config(
        dsts in prop::collection::vec(any_dst(), 1..12),
        seed in any::<u64>(),
        from_client in any::<bool>(),
    ) {
        let s = snap();
        let src = from_client.then(|| s.workload_by_ip(ip("10.0.0.1"))).flatten();
        let mut bal = Balancer::seeded(seed);
        for dst in dsts {
            let r = route(&scope(), &s, &mut bal, src, dst);
            let vip = s.service_by_vip(dst.ip());
            match (&r, vip) {
                (Route::NoEndpoint { service }, Some(svc)) => {
                    prop_assert_eq!(service, &svc.service.hostname);
                    prop_assert!(s.endpoints(svc, dst.port()).is_empty());
                }
                (Route::NoEndpoint { .. }, None) => prop_assert!(false, "{:?}: no VIP", dst),
                (Route::Hbone { target, identities, .. }, Some(svc)) => {
                    let w = s.endpoints(svc, dst.port()).iter().find(|(w, p)| {
                        *p == target.port() && w.workload_ips.contains(&target.ip())
                    });
                    prop_assert!(w.is_some(), "{:?} → {:?}", dst, r);
                    let (w, _) = w.unwrap();
                    prop_assert_eq!(identities.first(), Some(&scope().workload_identity(w)));
                }
                (Route::Hbone { target, .. }, None) => {
                    prop_assert_eq!(*target, dst, "a workload IP keeps its port");
                }
                (Route::Direct { target, service: None }, None) => {
                    prop_assert_eq!(*target, dst);
                }
                (Route::Direct { service, .. }, _) => {
                    prop_assert_eq!(service.as_deref(), vip.map(|v| v.service.hostname.as_str()));
                }
            }
        }
    }

    /// An admitted connection is always for a served workload, and its grant says what was
    /// checked; every refusal answers a stream with a status and records flags.
    #[test]
    fn admission_is_consistent(scope in any_scope(), dst in any_dst(), src in any_dst(), mtls in any::<bool>()) {
        let s = with_policies(DENY_CLIENT, 5);
        let client = Rc::new(id("default", "client"));
        let a = Arrival {
            src_ip: src.ip(),
            src_identity: mtls.then_some(&client),
            dst,
            reached: Some(addr("10.0.0.2:15008")),
        };
        for admission in [admit_hbone(&scope, &s, &a), admit_plaintext(&scope, &s, &a)] {
            match &admission.outcome {
                Ok(g) => {
                    prop_assert!(scope.serves(&s, dst.ip()));
                    prop_assert!(admission.dst_workload.is_some());
                    prop_assert_eq!((g.dst_ip, g.dst_port, g.generation), (dst.ip(), dst.port(), 5));
                    prop_assert_eq!(g.src_identity.is_some(), mtls);
                    prop_assert_eq!(revoked(&s, g), None, "what was just admitted is not revoked");
                }
                Err(r) => {
                    prop_assert!(r.status().is_some(), "{:?}", r);
                    prop_assert_eq!(r.response_flags() == Some("DENY"), matches!(r, Refusal::Denied { .. }));
                }
            }
        }
    }
}
