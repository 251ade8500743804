//! Readiness and graceful drain end to end in network namespaces: SIGTERM and `/quitquitquit`
//! fail readiness at once, refuse new connections and let live ones finish before a clean exit;
//! the drain deadline ends a connection that never finishes.
//!
//! Each test builds its own namespaces; they need root and fail without it.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use ringtun_testbed::DEFAULT_MARK as MARK;

const MIB: u64 = 1 << 20;
const LOG_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy)]
enum Trigger {
    Sigterm,
    QuitQuitQuit,
}

/// `step`: the pause between the transfer's 64 steps of 128 KiB, i.e. how long it lasts.
fn drain_with_live_transfer(prefix: &'static str, trigger: Trigger, step: Duration) {
    // Longer than the transfer, so the process must exit when the transfer ends, not at it.
    let drain = step * 64 + Duration::from_secs(12);
    let mut opts = MeshOptions::new(prefix);
    opts.extra
        .extend(["--drain-timeout-ms".into(), drain.as_millis().to_string()]);
    let mut m = Mesh::start(opts);
    wait_endpoints(&m.server);
    let echo = echo_server(&m.nodes.server, "0.0.0.0:5201");
    let (client_ns, server_ns) = (&m.nodes.client, &m.nodes.server);
    let (st, body) = http_in(server_ns, READY, "GET", "/healthz/ready").expect("readiness");
    assert_eq!((st, body.trim()), (200, "ready"), "readiness while running");
    let server = &mut m.server;

    let (tx, rx) = mpsc::channel();
    let (transfer, drain_started, exit_status, exited_after) = std::thread::scope(|s| {
        // 8 MiB in 64 steps of 128 KiB, most of them after the drain starts.
        let live = s.spawn(move || {
            transfer_paced(
                client_ns,
                "10.77.0.2:5201",
                8 * MIB,
                128 * 1024,
                step,
                MIB,
                move |_| {
                    let _ = tx.send(());
                },
            )
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the live transfer got going");
        let t0 = Instant::now();
        match trigger {
            Trigger::Sigterm => server.signal(libc::SIGTERM),
            Trigger::QuitQuitQuit => {
                let (st, body) =
                    http_in(server_ns, ADMIN, "POST", "/quitquitquit").expect("quitquitquit");
                assert_eq!(st, 200, "/quitquitquit: {body}");
            }
        }
        // Readiness fails at once.
        loop {
            let st = readiness(server_ns);
            if st == 503 {
                break;
            }
            assert_eq!(st, 200);
            assert!(
                t0.elapsed() < Duration::from_secs(1),
                "readiness still 200 a second after the drain started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let (_, metrics) =
            http_in(server_ns, "127.0.0.1:15020", "GET", "/metrics").expect("metrics");
        assert!(
            metrics.contains("\nringtun_draining 1\n"),
            "ringtun_draining while draining"
        );
        // New connections are refused: straight to 15008, and through the client ringtun.
        std::thread::sleep(Duration::from_millis(200));
        match connect_marked_in(client_ns, "10.77.0.2:15008".parse().expect("addr"), MARK) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            other => panic!("a new HBONE connection while draining: {other:?}"),
        }
        let how = expect_no_answer(client_ns, "10.77.0.2:5201");
        eprintln!("new connection while draining: {how}");
        let transfer = live.join().expect("transfer thread");
        let status = server.wait_exit(drain + Duration::from_secs(5));
        (transfer, t0, status, t0.elapsed())
    });
    let t = transfer.unwrap_or_else(|e| panic!("the live transfer broke during the drain: {e}"));
    assert_eq!(t.received, 8 * MIB, "live transfer bytes");
    assert_eq!(t.sha_sent, t.sha_received, "live transfer intact");
    assert!(
        t.took > Duration::from_millis(1000),
        "the transfer was meant to outlast the drain start ({:?})",
        t.took
    );
    echo.records
        .wait_for(LOG_WAIT, |r| r.sha256 == t.sha_sent)
        .expect("the echo server got the whole transfer");
    let status = exit_status
        .unwrap_or_else(|| panic!("ringtun still running {drain:?} + 5 s after the drain started"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after the drain: {status}"
    );
    assert!(
        exited_after < drain,
        "ringtun should exit once its last connection closes, not at the deadline: {exited_after:?} after {:?}",
        drain_started
    );
    let log = m.server.log();
    assert!(
        log.contains("drained: no connections left"),
        "drain end logged"
    );
    m.server.assert_no_panic();
}

#[test]
fn sigterm_drains_live_connections_refuses_new_ones_and_exits_zero() {
    // A 30 s transfer, as an operator's rolling restart would meet one.
    drain_with_live_transfer("opd", Trigger::Sigterm, Duration::from_millis(470));
}

#[test]
fn quitquitquit_drains_like_sigterm() {
    drain_with_live_transfer("opq", Trigger::QuitQuitQuit, Duration::from_millis(25));
}

#[test]
fn drain_deadline_ends_a_connection_that_never_finishes() {
    let mut opts = MeshOptions::new("opt");
    opts.extra
        .extend(["--drain-timeout-ms".into(), "1500".into()]);
    let mut m = Mesh::start(opts);
    wait_endpoints(&m.server);
    let _echo = echo_server(&m.nodes.server, "0.0.0.0:5201");
    // A connection that stays open: one round trip, then nothing.
    let mut held = connect_in(&m.nodes.client, "10.77.0.2:5201").expect("connect");
    held.write_all(b"ping").expect("write");
    let mut buf = [0u8; 4];
    held.read_exact(&mut buf).expect("echo of ping");
    assert_eq!(&buf, b"ping");

    let t0 = Instant::now();
    m.server.signal(libc::SIGTERM);
    let status = m
        .server
        .wait_exit(Duration::from_secs(10))
        .expect("ringtun exits after its drain deadline");
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0), "exit status: {status}");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "exit {took:?} after SIGTERM; the deadline was 1.5 s"
    );
    assert!(
        m.server.log().contains("drain deadline reached"),
        "the deadline is logged"
    );
    // The held connection is torn down with the server.
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut rest = Vec::new();
    match held.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) => assert!(
            !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "the held connection was left hanging"
        ),
    }
    m.server.assert_no_panic();
}
