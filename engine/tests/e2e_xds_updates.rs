//! istiod's updates reaching a running ringtun, against the fake istiod
//! (`tests/peers/fake_istiod.py`), checksummed: a workload added while a transfer runs becomes
//! reachable and the running transfer is untouched; a policy pushed over xDS refuses new
//! connections and cuts a live one it now denies while another continues; istiod stopped and
//! restarted while a transfer runs: nothing dropped, and what changed meanwhile (a workload and
//! the policy removed) is in force once ringtun has resubscribed.
//!
//! Each transfer here stops after its first MiB until the test has done what it checks (so the
//! connection surely spans the update, however slow the machine), then sends the rest.

mod common;
mod xds_common;

use std::io::ErrorKind;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use ringtun_testbed::{echoed_bytes, Netns, DEFAULT_MARK};
use serde_json::{json, Value};
use xds_common::*;

const MIB: u64 = 1 << 20;
/// Uid of the workload added while traffic runs: a second pod of the server (the server's
/// ringtun serves it: same name and service account), on another address of its node.
const ADDED_UID: &str = "cluster1//v1/Pod/default/server-b";
const ADDED_IP: &str = "10.77.0.3";
/// The service only the added workload serves.
const SECOND_HOST: &str = "second.default.svc.cluster.local";
const SECOND_VIP: &str = "10.96.0.11:80";
/// How long a transfer waits, stopped, for the test to let it go on (under the sockets' 30 s
/// timeouts).
const HOLD: Duration = Duration::from_secs(25);

/// The usual mesh (client, server behind 10.96.0.10:80 → 5201), with a second service on
/// 10.96.0.11 that no workload serves yet.
fn base() -> Value {
    let mut r = mesh_resources();
    r["services"]
        .as_array_mut()
        .expect("services")
        .push(service("second", SECOND_HOST, "10.96.0.11", 80, 5201));
    r
}

fn with_added_workload(mut r: Value) -> Value {
    let key = format!("default/{SECOND_HOST}");
    r["workloads"]
        .as_array_mut()
        .expect("workloads")
        .push(workload(
            ADDED_UID,
            "server",
            "server",
            ADDED_IP,
            &[(&key, 80, 5201)],
        ));
    r
}

/// A paced echo of `n` bytes from `client` to `dst` that, after its first MiB, tells
/// `under_way` and waits for `resume` (at most [`HOLD`]) before sending the rest.
fn held_transfer(
    client: &Netns,
    dst: &str,
    n: u64,
    under_way: mpsc::Sender<()>,
    resume: mpsc::Receiver<()>,
) -> std::io::Result<Transfer> {
    let pause = Duration::from_millis(5);
    transfer_paced(client, dst, n, 64 * 1024, pause, MIB, move |_| {
        let _ = under_way.send(());
        let _ = resume.recv_timeout(HOLD);
    })
}

/// Waits for `n` transfers to be under way.
fn await_under_way(rx: &mpsc::Receiver<()>, n: usize) {
    for _ in 0..n {
        rx.recv_timeout(HOLD).expect("the transfer got going");
    }
}

/// Waits until the client has refused `n` connections for want of an endpoint.
fn wait_refusals(client: &XdsRingtun, n: usize) {
    let deadline = std::time::Instant::now() + EVENT_WAIT;
    loop {
        let seen = parse_access(&client.log())
            .iter()
            .filter(|l| {
                l.get("error")
                    .is_some_and(|r| r.contains("no healthy upstream"))
            })
            .count();
        if seen >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{seen} refusals for want of an endpoint, not {n}:\n{}",
            client.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_exact(what: &str, outcome: std::io::Result<Transfer>, n: u64) -> Transfer {
    let t = outcome.unwrap_or_else(|e| panic!("{what}: broke with {e}"));
    assert_eq!(t.received, n, "{what}: bytes echoed");
    assert_eq!(t.sha_sent, t.sha_received, "{what}: echo intact");
    t
}

#[test]
fn updates_from_istiod_reach_running_traffic() {
    let (nodes, dir, _unused) = mesh_files("xup", "", |_| {});
    write_token(dir.path(), TOKEN);
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let istiod = FakeIstiod::start(
        Some(&nodes.server),
        dir.path(),
        IstiodArgs::new(&ca_cert, &ca_key),
        &base(),
    );
    nodes
        .client
        .capture_outbound(15001, DEFAULT_MARK)
        .expect("outbound capture");
    nodes
        .server
        .ip(["addr", "add", &format!("{ADDED_IP}/32"), "dev", "lo"])
        .expect("the added pod's address");
    let echo = echo_server(&nodes.server, "0.0.0.0:5201");
    let kept_echo = echo_server(&nodes.server, "0.0.0.0:5202");
    let server = XdsRingtun::start(&nodes.server, "server", "10.77.0.2", ISTIOD_URL, dir.path());
    let client = XdsRingtun::start(&nodes.client, "client", "10.77.0.1", ISTIOD_URL, dir.path());
    let client_ns = &nodes.client;
    assert_eq!(
        echoed_bytes(client_ns, SECOND_VIP),
        0,
        "no workload serves the second service yet"
    );
    wait_refusals(&client, 1);

    // 1. A workload added while a transfer runs: reachable at once, the transfer untouched.
    let n = 8 * MIB;
    let (under_way, started) = mpsc::channel();
    let (resume, resumed) = mpsc::channel();
    let running = std::thread::scope(|s| {
        let t = s.spawn(|| held_transfer(client_ns, "10.96.0.10:80", n, under_way, resumed));
        await_under_way(&started, 1);
        istiod.set_resources(&with_added_workload(base()));
        client.wait_lines(&["config updated by the control plane", "workloads=3"], 1);
        server.wait_lines(&["config updated by the control plane", "workloads=3"], 1);
        let added = echo_ok(client_ns, SECOND_VIP, MIB);
        let line = client.wait_access("the added workload", |l| {
            l.is("src.addr", &added.local.to_string())
        });
        assert!(line.raw.contains(ADDED_IP), "{}", line.raw);
        let _ = resume.send(());
        t.join().expect("transfer thread")
    });
    let t = assert_exact("the transfer across the update", running, n);
    echo.records
        .wait_for(EVENT_WAIT, |r| r.sha256 == t.sha_sent)
        .expect("the server got every byte");

    // 2. A policy pushed over xDS: the live connection it denies is cut, the other continues,
    // and a new connection it denies is refused.
    let denying = {
        let mut r = with_added_workload(base());
        r["authorizations"] = json!([deny_port("deny-5201", 5201)]);
        r
    };
    let (under_way, started) = mpsc::channel();
    let (resume_denied, resumed_denied) = mpsc::channel();
    let (resume_kept, resumed_kept) = mpsc::channel();
    let (denied, kept) = std::thread::scope(|s| {
        let u = under_way.clone();
        let a = s.spawn(|| held_transfer(client_ns, "10.77.0.2:5201", n, u, resumed_denied));
        let b = s.spawn(|| held_transfer(client_ns, "10.77.0.2:5202", n, under_way, resumed_kept));
        await_under_way(&started, 2);
        istiod.set_resources(&denying);
        server.wait_lines(
            &[
                "config updated by the control plane",
                "workloads=3",
                "policies=1",
            ],
            1,
        );
        server.wait_lines(&["no longer allowed after a policy update"], 1);
        let _ = resume_denied.send(());
        let _ = resume_kept.send(());
        (a.join().expect("thread"), b.join().expect("thread"))
    });
    let t = assert_exact("the transfer the policy allows", kept, n);
    kept_echo
        .records
        .wait_for(EVENT_WAIT, |r| r.sha256 == t.sha_sent)
        .expect("the server got the whole allowed transfer");
    match denied {
        Err(e) => assert!(
            matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof
            ),
            "the denied transfer: cut with {e}"
        ),
        Ok(t) => assert!(t.received < n, "the denied transfer ran to the end"),
    }
    let cut = server.wait_access("the cut connection", |l| {
        l.is("dst.hbone_addr", "10.77.0.2:5201") && l.is("response_flags", "DENY")
    });
    assert!(cut.num("bytes_recv") < n, "cut early: {}", cut.raw);
    assert!(
        server.log().contains("default/deny-5201"),
        "the policy named"
    );
    assert_eq!(
        echoed_bytes(client_ns, "10.77.0.2:5201"),
        0,
        "a new connection the policy denies"
    );
    echo_ok(client_ns, "10.77.0.2:5202", MIB);

    // 3. istiod stopped while a transfer runs; meanwhile the added workload and the policy go
    // away. Once istiod is back, ringtun resubscribes naming what it holds and is told what
    // went: nothing dropped, state as istiod's.
    let resynced = {
        let mut r = base();
        r["authorizations"] = json!([]);
        r
    };
    let (under_way, started) = mpsc::channel();
    let (resume, resumed) = mpsc::channel();
    let running = std::thread::scope(|s| {
        let t = s.spawn(|| held_transfer(client_ns, "10.77.0.2:5202", n, under_way, resumed));
        await_under_way(&started, 1);
        drop(istiod);
        client.wait_lines(&["xDS stream failed"], 1);
        let back = FakeIstiod::start(
            Some(&nodes.server),
            dir.path(),
            IstiodArgs::new(&ca_cert, &ca_key),
            &resynced,
        );
        for r in [&client, &server] {
            r.wait_lines(
                &[
                    "config updated by the control plane",
                    "workloads=2",
                    "policies=0",
                ],
                1,
            );
        }
        let _ = resume.send(());
        (t.join().expect("transfer thread"), back)
    });
    let (running, back) = running;
    let t = assert_exact("the transfer across istiod's restart", running, n);
    kept_echo
        .records
        .wait_for(EVENT_WAIT, |r| r.sha256 == t.sha_sent)
        .expect("the server got every byte");
    // ringtun named what it held; the restarted istiod answered with the removal.
    let stream = back.streams_of("10.77.0.1", 1).remove(0);
    let held = back.subscription(&stream, ADDRESS_TYPE);
    assert!(held["initial"].get(ADDED_UID).is_some(), "{held}");
    let pushed = back.wait_event("the removal", |e| {
        e["event"] == "push" && e["stream"] == stream && e["type_url"] == ADDRESS_TYPE
    });
    assert_eq!(pushed["removed"], json!([ADDED_UID]), "{pushed}");
    assert_eq!(
        pushed["resources"],
        json!([]),
        "nothing else sent: {pushed}"
    );
    // The removed workload is gone, the removed policy no longer refuses.
    assert_eq!(
        echoed_bytes(client_ns, SECOND_VIP),
        0,
        "the removed workload"
    );
    wait_refusals(&client, 2);
    echo_ok(client_ns, "10.96.0.10:80", MIB);
    echo_ok(client_ns, "10.77.0.2:5201", MIB);
}
