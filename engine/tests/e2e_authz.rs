//! L4 authorization end to end in network namespaces: DENY and ALLOW policies refuse with 401
//! on 15008 and a reset on 15006 while dry-run policies refuse nothing, the refusals show in the
//! access log and the metrics; and authorization a client cannot talk its way around:
//! `sourceIps` is matched against the connection's own peer address whatever a `forwarded`
//! header claims (an independent Python HBONE client forges one), and a policy update that
//! denies a live connection cuts it on 15008 and 15006 while the connections it still allows
//! keep running, checksummed.
//!
//! Each test builds its own namespaces; they need root and fail without it.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use ringtun_testbed::{Netns, DEFAULT_MARK as MARK};

const MIB: u64 = 1 << 20;
const LOG_WAIT: Duration = Duration::from_secs(10);
/// An address in the mesh's subnet that no node has: what a forging client claims to be.
const FORGED: &str = "10.77.0.99";
/// Identity of a third workload certificate (allowed where `default/client` is denied).
const OTHER_ID: &str = "spiffe://cluster.local/ns/default/sa/other";

/// One policy on the server's namespace, `rules` written as the YAML of one match.
fn policy(name: &str, action: &str, rule: &str) -> String {
    format!(
        "- name: {name}\n  namespace: default\n  scope: Namespace\n  action: {action}\n  dryRun: false\n  rules:\n  - - - {rule}\n"
    )
}

fn config_with(policies: &[String]) -> String {
    let base = mesh_config(&["/10.96.0.10"], false);
    if policies.is_empty() {
        return base;
    }
    base.replace(
        "policies: []\n",
        &format!("policies:\n{}", policies.concat()),
    )
}

/// The Python HBONE client from the client namespace (10.77.0.1) to the server's 15008,
/// echoing 64 KiB through `10.77.0.2:5201`, with extra request headers.
fn py_connect(ns: &Netns, dir: &TempDir, headers: &[String]) -> PeerRun {
    let mut extra = Vec::new();
    for h in headers {
        extra.extend(["--header", h.as_str()]);
    }
    hbone_client(ns, dir, "default.client", "10.77.0.2:5201", 65536, &extra)
}

fn status(run: &PeerRun) -> Option<u64> {
    run.event("response").and_then(|r| r["status"].as_u64())
}

/// Rewrites the config and waits until the server ringtun has handed it to its shard.
fn reload(so: &ServerOnly, path: &std::path::Path, text: &str, nth: usize) {
    write_atomic(path, text);
    so.server.wait_log_count("config reloaded", nth, LOG_WAIT);
    // The shard applies it on its next look at the control channel (every 50 ms).
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn a_forged_forwarded_header_changes_no_source_ip_decision() {
    let so = ServerOnly::start_with("afh", |_| {});
    let path = so.dir.join("config.yaml");
    let client = &so.nodes.client;
    let forged = vec![format!("forwarded: for=\"{FORGED}:4444\"")];

    // ALLOW only the forged address: claiming it must not let the client in.
    reload(
        &so,
        &path,
        &config_with(&[policy(
            "allow-forged",
            "Allow",
            &format!("sourceIps: [\"{FORGED}/32\"]"),
        )]),
        1,
    );
    let run = py_connect(client, &so.dir, &forged);
    assert_eq!(status(&run), Some(401), "ALLOW on a claimed address: {run}");
    let line = so
        .server
        .wait_access("for the forged ALLOW", LOG_WAIT, |l| {
            l.is("direction", "inbound") && l.is("response_flags", "DENY")
        });
    assert!(
        line.get("src.addr")
            .is_some_and(|a| a.starts_with("10.77.0.1:")),
        "the log names the real peer, not the claim: {}",
        line.raw
    );

    // DENY the real address: claiming another must not get the client out of it.
    reload(
        &so,
        &path,
        &config_with(&[policy("deny-real", "Deny", "sourceIps: [\"10.77.0.1/32\"]")]),
        2,
    );
    let run = py_connect(client, &so.dir, &forged);
    assert_eq!(status(&run), Some(401), "DENY dodged by a claim: {run}");
    let line = so.server.wait_access("for the dodged DENY", LOG_WAIT, |l| {
        l.is("direction", "inbound")
            && l.get("error")
                .is_some_and(|r| r.contains("default/deny-real"))
    });
    assert!(line.is("response_flags", "DENY"), "{}", line.raw);

    // DENY the forged address: the real client is not caught by what it claims either.
    reload(
        &so,
        &path,
        &config_with(&[policy(
            "deny-forged",
            "Deny",
            &format!("sourceIps: [\"{FORGED}/32\"]"),
        )]),
        3,
    );
    let run = py_connect(client, &so.dir, &forged);
    assert_eq!(run.code, Some(0), "allowed from its real address: {run}");
    let result = run.event("result").expect("result line");
    assert_eq!(result["sha256_sent"], result["sha256_received"], "{run}");
    so.server.assert_no_panic();
}

/// What the live transfers of [`a_policy_update_cuts_live_connections_it_denies`] ended with.
type Outcome = std::io::Result<Transfer>;

#[test]
fn a_policy_update_cuts_live_connections_it_denies() {
    let mut opts = MeshOptions::new("apu");
    opts.capture_inbound = true;
    let m = Mesh::start(opts);
    let _denied = echo_server(&m.nodes.server, "0.0.0.0:5201");
    let kept = echo_server(&m.nodes.server, "0.0.0.0:5202");
    let client = &m.nodes.client;
    // Each transfer: 8 MiB in 64 steps of 128 KiB, 100 ms apart (about 6.4 s).
    let (n, chunk, pause) = (8 * MIB, 128 * 1024, Duration::from_millis(100));
    let (tx, rx) = mpsc::channel::<()>();
    let (hbone_denied, hbone_kept, plain_denied) = std::thread::scope(|s| {
        let paced = |dst: &'static str, tx: mpsc::Sender<()>| {
            move || -> Outcome {
                transfer_paced(client, dst, n, chunk, pause, MIB, move |_| {
                    let _ = tx.send(());
                })
            }
        };
        // Through the client ringtun (captured) over HBONE to the pod IP, two ports.
        let a = s.spawn(paced("10.77.0.2:5201", tx.clone()));
        let b = s.spawn(paced("10.77.0.2:5202", tx.clone()));
        // Plaintext from outside the mesh (marked: the client's capture skips it) into the
        // server's 15006 capture.
        let tx_c = tx.clone();
        let c = s.spawn(move || -> Outcome {
            let start = Instant::now();
            let sock = connect_marked_in(client, "10.77.0.2:5201".parse().expect("addr"), MARK)?;
            paced_on(sock, start, n, chunk, pause, MIB, move |_| {
                let _ = tx_c.send(());
            })
        });
        for _ in 0..3 {
            rx.recv_timeout(Duration::from_secs(20))
                .expect("every live transfer got going");
        }
        // Now DENY port 5201 on the server workload.
        write_atomic(
            &m.config,
            &config_with(&[policy("deny-5201", "Deny", "destinationPorts: [5201]")]),
        );
        (
            a.join().expect("thread"),
            b.join().expect("thread"),
            c.join().expect("thread"),
        )
    });

    // The kept one finished intact, after the update.
    let t = hbone_kept.unwrap_or_else(|e| panic!("the allowed transfer broke: {e}"));
    assert_eq!(t.received, n, "allowed transfer bytes");
    assert_eq!(t.sha_sent, t.sha_received, "allowed transfer intact");
    kept.records
        .wait_for(LOG_WAIT, |r| r.sha256 == t.sha_sent)
        .expect("the workload got the whole allowed transfer");

    // The denied ones were cut: an error, or an echo short of what was sent.
    for (what, outcome) in [("HBONE", &hbone_denied), ("plaintext", &plain_denied)] {
        match outcome {
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof
                ),
                "{what}: cut with {e}"
            ),
            Ok(t) => assert!(
                t.received < n,
                "{what}: the denied transfer ran to the end ({} bytes)",
                t.received
            ),
        }
    }
    // The destination is the CONNECT authority over HBONE, the address itself in plaintext.
    for (path, key) in [("hbone", "dst.hbone_addr"), ("plaintext", "dst.addr")] {
        let line = m
            .server
            .wait_access("for the cut connection", LOG_WAIT, |l| {
                l.is("direction", "inbound") && l.is("path", path) && l.is(key, "10.77.0.2:5201")
            });
        assert!(line.is("end", "error"), "{}", line.raw);
        assert!(line.is("response_flags", "DENY"), "{}", line.raw);
        assert_eq!(
            line.get("error"),
            Some("connection closed due to policy change"),
            "ztunnel's words: {}",
            line.raw
        );
        assert!(
            line.num("bytes_recv") < n,
            "cut before the end: {}",
            line.raw
        );
    }
    let log = m.server.log();
    assert!(
        log.contains("no longer allowed after a policy update")
            && log.contains("default/deny-5201"),
        "the cut is logged with the policy"
    );
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}

/// DENY the client's identity, ALLOW any mTLS identity (so plaintext is not allowed), and a
/// dry-run DENY of everything, which must not refuse anything.
const POLICIES: &str = r#"policies:
- name: deny-client
  namespace: default
  scope: Namespace
  action: Deny
  dryRun: false
  rules:
  - - - principals: [!Exact "cluster.local/ns/default/sa/client"]
- name: mtls-only
  namespace: default
  scope: Namespace
  action: Allow
  dryRun: false
  rules:
  - - - principals: [!Presence []]
- name: deny-all-dry
  namespace: default
  scope: Namespace
  action: Deny
  dryRun: true
  rules:
  - []
"#;

#[test]
fn policies_refuse_with_401_and_reset_and_dry_run_refuses_nothing() {
    let mut opts = MeshOptions::new("opp");
    opts.config = mesh_config(&["/10.96.0.10"], false).replace("policies: []\n", POLICIES);
    assert!(opts.config.contains("deny-all-dry"), "policies spliced in");
    opts.capture_inbound = true;
    let m = Mesh::start(opts);
    let echo = echo_server(&m.nodes.server, "0.0.0.0:5201");
    let client = &m.nodes.client;

    // Through the client ringtun (captured, identity default/client): refused.
    let how = expect_no_answer(client, "10.96.0.10:80");
    eprintln!("client ringtun, denied identity: {how}");
    let line = m
        .server
        .wait_access("with the denied CONNECT", LOG_WAIT, |l| {
            l.is("direction", "inbound") && l.is("end", "error")
        });
    assert!(line.is("response_flags", "DENY"), "{}", line.raw);
    assert!(line.is("src.identity", CLIENT_ID), "{}", line.raw);
    assert!(line.is("src.workload", "client"), "{}", line.raw);
    assert!(line.is("src.namespace", "default"), "{}", line.raw);
    let reason = line.get("error").unwrap_or_default();
    assert_eq!(
        reason,
        "connection closed due to policy rejection: explicitly denied by: default/deny-client",
        "ztunnel's words, naming the policy: {}",
        line.raw
    );
    let out = m
        .client
        .wait_access("with the refused connection", LOG_WAIT, |l| {
            l.is("direction", "outbound") && l.is("end", "error")
        });
    assert!(
        out.get("error").is_some_and(|r| r.contains("401")),
        "the client ringtun says it was refused with 401: {}",
        out.raw
    );

    // Now the Python client from the client node (capture removed so it reaches 15008).
    client
        .nft("delete table inet ringtun")
        .expect("remove the outbound capture");
    gen_certs(m.dir.path(), "cluster.local", &["default/other"]);
    let run = py_client(client, &m.dir, "default.client", "10.77.0.2:5201", MIB);
    assert_eq!(run.code, Some(4), "denied identity: {run}");
    assert_eq!(
        run.event("response").expect("response")["status"],
        401,
        "{run}"
    );
    let run = py_client(client, &m.dir, "default.other", "10.77.0.2:5201", MIB);
    assert_echoed(&run, MIB);
    let line = m.server.wait_access("from default/other", LOG_WAIT, |l| {
        l.is("direction", "inbound") && l.is("src.identity", OTHER_ID)
    });
    assert!(line.is("end", "closed"), "{}", line.raw);
    assert_eq!(line.num("bytes_recv"), MIB, "{}", line.raw);
    let log = m
        .server
        .wait_log_count("authorization dry run", 1, LOG_WAIT);
    assert!(
        log.lines()
            .any(|l| l.contains("authorization dry run") && l.contains("default/deny-all-dry")),
        "the dry-run DENY is reported"
    );
    assert_eq!(
        echo.records.wait_count(1, LOG_WAIT),
        1,
        "only the allowed identity reached the workload: {:?}",
        echo.records.all()
    );

    // Plaintext (captured on 15006): no principal, so mtls-only does not allow it: the socket
    // is dropped, as ztunnel drops it. Whether the client then reads end of file or a reset
    // depends on whether its bytes arrived before the close (the kernel resets a socket
    // closed with unread data), so either is a refusal; no byte may come back.
    let reset = |e: &std::io::Error| e.kind() == ErrorKind::ConnectionReset;
    match connect_in(client, "10.77.0.2:5201") {
        Err(e) if reset(&e) => {}
        Err(e) => panic!("plaintext connect: {e}"),
        Ok(mut s) => {
            let wrote = s.write_all(b"plaintext hello");
            let mut buf = [0u8; 64];
            let read = s.read(&mut buf);
            match (&wrote, &read) {
                (Err(e), _) | (Ok(()), Err(e)) if reset(e) => {}
                (Ok(()), Ok(0)) => {}
                _ => panic!(
                    "plaintext without a principal: expected a refusal, got write {wrote:?}, read {read:?}"
                ),
            }
        }
    }
    let line = m
        .server
        .wait_access("plaintext denied", LOG_WAIT, |l| l.is("path", "plaintext"));
    assert!(line.is("response_flags", "DENY"), "{}", line.raw);
    assert!(line.is("end", "error"), "{}", line.raw);
    assert_eq!(
        echo.records.all().len(),
        1,
        "the plaintext connection reached nothing"
    );

    // The refusals are in the metrics, with their security policy.
    let sc = Scrape::take(&m.nodes.server, false);
    let denied = |policy| {
        sc.sum(
            "istio_tcp_connections_failed_total",
            &[
                ("reporter", "destination"),
                ("response_flags", "DENY"),
                ("connection_security_policy", policy),
            ],
        )
    };
    assert_eq!(denied("mutual_tls"), 2.0, "client ringtun + python client");
    assert_eq!(denied("unknown"), 1.0, "plaintext");
    m.server.assert_no_panic();
}
