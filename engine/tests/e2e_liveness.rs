//! Liveness, end to end in network namespaces: an HBONE peer that stops answering is found by
//! HTTP/2 PING keepalive and its connection closed, on the client side (a Python HBONE server
//! stopped with SIGSTOP, the kernel still acknowledging its TCP) and on the server side (a
//! client ringtun stopped the same way); a CONNECT that gets no answer fails in bounded time;
//! and every socket ringtun holds carries TCP keepalive.
//!
//! Each test builds its own namespaces; they need root and fail without it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ringtun_testbed::{Netns, DEFAULT_MARK};

const MIB: u64 = 1 << 20;
const LOG_WAIT: Duration = Duration::from_secs(10);

/// Fast keepalive so a dead peer is found in about two seconds; the timeout leaves room for a
/// busy test machine, where a live peer must never be taken for dead.
fn fast_keepalive() -> Vec<String> {
    [
        "--hbone-keepalive-interval-ms",
        "400",
        "--hbone-keepalive-timeout-ms",
        "1500",
        "--connect-timeout-ms",
        "1500",
        "--handshake-timeout-ms",
        "1500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn a_stopped_hbone_server_is_dropped_and_the_next_stream_opens_a_new_connection() {
    let (nodes, dir, config) = mesh_files("lks", &mesh_config(&["/10.96.0.10"], false), |_| {});
    nodes
        .client
        .capture_outbound(15001, DEFAULT_MARK)
        .expect("outbound capture");
    let py = PythonServer::start(&nodes.server, dir.path(), "default/server", "*:15008");
    let mut extra = one_worker();
    extra.extend(fast_keepalive());
    let client = Ringtun::start_as(&nodes.client, "client", dir.path(), &config, extra);
    echo_ok(&nodes.client, "10.77.0.2:5201", MIB);
    // Answered PINGs keep the pooled connection: after several intervals it is still reused.
    std::thread::sleep(Duration::from_millis(1500));
    echo_ok(&nodes.client, "10.77.0.2:5201", MIB);
    let lines = client.wait_access_all("both echoes", LOG_WAIT, |ls| ls.len() >= 2);
    assert!(
        lines[1].is("pool", "reused"),
        "a peer that answers its PINGs keeps its connection: {}",
        lines[1].raw
    );

    // Stopped: its kernel still ACKs, but nothing answers a PING or a CONNECT.
    py.signal(libc::SIGSTOP);
    let t0 = Instant::now();
    client.wait_log_count("HBONE peer unresponsive", 1, LOG_WAIT);
    let found = t0.elapsed();
    assert!(
        found < Duration::from_secs(6),
        "found after {found:?} with a 400 ms interval and a 1.5 s timeout"
    );
    // A stream asked for now gets a refusal in bounded time, not a hang.
    let t1 = Instant::now();
    let r = transfer(&nodes.client, "10.77.0.2:5201", 1024);
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|t| t.received == 0),
        "{r:?}"
    );
    assert!(t1.elapsed() < Duration::from_secs(8), "{:?}", t1.elapsed());

    // Back: the next stream opens a new connection and its bytes arrive intact.
    py.signal(libc::SIGCONT);
    let t = echo_ok(&nodes.client, "10.77.0.2:5201", MIB);
    let line = client.wait_access("for the echo after SIGCONT", LOG_WAIT, |l| {
        l.is("src.addr", &t.local.to_string())
    });
    assert!(line.is("pool", "new"), "{}", line.raw);
    client.assert_no_panic();
}

#[test]
fn a_stopped_client_ringtun_is_dropped_by_the_server() {
    let mut opts = MeshOptions::new("lkc");
    opts.extra.extend(fast_keepalive());
    let m = Mesh::start(opts);
    let _echo = echo_server(&m.nodes.server, "0.0.0.0:5201");
    echo_ok(&m.nodes.client, "10.96.0.10:80", MIB);
    m.client.signal(libc::SIGSTOP);
    let t0 = Instant::now();
    m.server
        .wait_log_count("inbound: HBONE peer unresponsive", 1, LOG_WAIT);
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    m.client.signal(libc::SIGCONT);
    m.server.assert_no_panic();
}

/// `ss` lines of the established TCP sockets that `pid` holds in `ns`.
fn sockets_of(ns: &Netns, pid: u32) -> Vec<String> {
    let out = ns
        .run("ss", ["-tnoHp", "state", "established"])
        .expect("ss");
    let me = format!("pid={pid},");
    out.lines()
        .filter(|l| l.contains(&me))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_socket_ringtun_holds_has_tcp_keepalive() {
    let m = Mesh::start(MeshOptions::new("lkt"));
    let _echo = echo_server(&m.nodes.server, "0.0.0.0:5201");
    // One tunnelled connection held open: the app side, the HBONE connection and the
    // upstream side.
    let mut s = connect_in(&m.nodes.client, "10.96.0.10:80").expect("connect");
    std::io::Write::write_all(&mut s, b"hello").expect("write");
    let mut buf = [0u8; 5];
    std::io::Read::read_exact(&mut s, &mut buf).expect("echo");
    // `ss` shows the timer armed now: a socket with bytes in flight shows its retransmit timer
    // instead, so look until the connection is quiet.
    for (ns, r) in [(&m.nodes.client, &m.client), (&m.nodes.server, &m.server)] {
        let deadline = Instant::now() + LOG_WAIT;
        loop {
            let socks = sockets_of(ns, r.pid());
            if socks.len() >= 2 && socks.iter().all(|l| l.contains("timer:(keepalive")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: expected its app-side and HBONE sockets, all with TCP keepalive: {socks:#?}",
                ns.name()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    m.client.assert_no_panic();
}
