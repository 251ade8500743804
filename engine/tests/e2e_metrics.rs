//! Prometheus metrics end to end in network namespaces: every byte counted on both ends, while
//! a connection lives and once it closed, with Istio's labels, scraped as Prometheus text and as
//! OpenMetrics and parsed by `prometheus_client`'s reference parsers
//! (`tests/peers/prom_check.py`); and a burst of connections queued behind a stopped shard,
//! counted as the io_uring accept loop takes it (direct accepts) on each driver.
//!
//! Each test builds its own namespaces; they need root and fail without it.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use ringtun_testbed::Netns;

const MIB: u64 = 1 << 20;
const LOG_WAIT: Duration = Duration::from_secs(10);

/// A server that reads everything a client sends, then answers with `reply` pattern bytes and
/// closes: the two directions carry different byte counts, so a swap shows.
fn reply_server(ns: &Netns, addr: &str, reply: u64) -> Arc<AtomicU64> {
    let received = Arc::new(AtomicU64::new(0));
    let seen = received.clone();
    serve(ns, addr, move |mut conn| {
        let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
        let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
        let (got, end) = read_to_end_or_error(&mut conn);
        if end.is_err() {
            return;
        }
        seen.fetch_add(got.len() as u64, Ordering::SeqCst);
        let mut data = vec![0u8; reply as usize];
        Pattern::new().fill(&mut data);
        let _ = conn.write_all(&data);
        let _ = conn.shutdown(Shutdown::Write);
    });
    received
}

/// Uploads `n` bytes to `dst`, half-closes, and returns how many bytes came back.
fn upload_then_download(ns: &Netns, dst: &str, n: u64) -> u64 {
    let mut s = connect_in(ns, dst).unwrap_or_else(|e| panic!("connect {dst}: {e}"));
    let mut r = s.try_clone().expect("clone");
    let reader = std::thread::spawn(move || read_to_end_or_error(&mut r));
    let mut data = vec![0u8; n as usize];
    Pattern::new().fill(&mut data);
    s.write_all(&data)
        .and_then(|_| s.shutdown(Shutdown::Write))
        .unwrap_or_else(|e| panic!("upload to {dst}: {e}"));
    let (back, end) = reader.join().expect("reader");
    end.unwrap_or_else(|e| panic!("download from {dst} after {} bytes: {e}", back.len()));
    back.len() as u64
}

/// Request bytes through the VIP (echoed back).
const N1: u64 = 3 * MIB + 12_345;
/// Request bytes to the pod IP; the server there answers with `M2` other bytes.
const N2: u64 = MIB + 777;
const M2: u64 = 2 * MIB + 4_099;

/// Checks one scrape of the client ringtun (reporter `source`).
fn check_client_metrics(sc: &Scrape) {
    for f in [
        "istio_tcp_connections_opened",
        "istio_tcp_connections_closed",
        "istio_tcp_connections_failed",
        "istio_tcp_sent_bytes",
        "istio_tcp_received_bytes",
        "ringtun_accepted_connections",
        "ringtun_accepted_direct_connections",
        "ringtun_ktls_connections",
        "ringtun_userspace_tls_connections",
    ] {
        sc.assert_family(f, "counter");
    }
    for f in [
        "ringtun_open_connections",
        "ringtun_pool_connections",
        "ringtun_pool_streams",
        "ringtun_config_generation",
        "ringtun_info",
        "ringtun_shards",
        "ringtun_draining",
    ] {
        sc.assert_family(f, "gauge");
    }
    let ok: [(&str, &str); 10] = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
        ("source_principal", CLIENT_ID),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "default"),
        ("destination_principal", SERVER_ID),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let with = |svc: &'static str| {
        let mut l = ok.to_vec();
        l.push(("destination_service", svc));
        l
    };
    let vip = with(SERVICE_HOST);
    let pod = with("unknown");
    let f = |x: u64| x as f64;
    assert_eq!(
        sc.one("istio_tcp_received_bytes_total", &vip),
        f(N1),
        "{}: VIP request bytes",
        sc.what
    );
    assert_eq!(
        sc.one("istio_tcp_sent_bytes_total", &vip),
        f(N1),
        "{}: VIP response bytes",
        sc.what
    );
    assert_eq!(
        sc.one("istio_tcp_connections_opened_total", &vip),
        1.0,
        "{}",
        sc.what
    );
    assert_eq!(
        sc.one("istio_tcp_connections_closed_total", &vip),
        1.0,
        "{}",
        sc.what
    );
    // Never counted in, so not there (as in ztunnel's registry).
    assert_eq!(
        sc.sum("istio_tcp_connections_failed_total", &vip),
        0.0,
        "{}",
        sc.what
    );
    assert_eq!(
        sc.one("istio_tcp_received_bytes_total", &pod),
        f(N2),
        "{}: pod request bytes",
        sc.what
    );
    assert_eq!(
        sc.one("istio_tcp_sent_bytes_total", &pod),
        f(M2),
        "{}: pod response bytes",
        sc.what
    );
    // The refused workload port was opened too (as ztunnel counts it: once its destination
    // was chosen), in the same series, and closed with its flags.
    assert_eq!(
        sc.one("istio_tcp_connections_opened_total", &pod),
        2.0,
        "{}",
        sc.what
    );
    assert_eq!(
        sc.one("istio_tcp_connections_closed_total", &pod),
        1.0,
        "{}",
        sc.what
    );

    let src = [("reporter", "source")];
    // No byte and no connection is counted anywhere else.
    assert_eq!(
        sc.sum("istio_tcp_received_bytes_total", &src),
        f(N1 + N2),
        "{}",
        sc.what
    );
    assert_eq!(
        sc.sum("istio_tcp_sent_bytes_total", &src),
        f(N1 + M2),
        "{}",
        sc.what
    );
    // The VIP port without endpoint is refused before a destination is chosen: as ztunnel,
    // it is logged (`connection failed`) and counted in no Istio metric.
    assert_eq!(
        sc.sum("istio_tcp_connections_opened_total", &src),
        3.0,
        "{}: the two transfers and the refused workload port",
        sc.what
    );
    assert_eq!(
        sc.sum("istio_tcp_connections_closed_total", &src),
        3.0,
        "{}",
        sc.what
    );
    assert_eq!(
        sc.sum("istio_tcp_connections_failed_total", &src),
        1.0,
        "{}: the unreachable workload port",
        sc.what
    );
    assert_eq!(
        sc.sum(
            "istio_tcp_connections_failed_total",
            &[
                ("reporter", "source"),
                ("destination_service", "unknown"),
                ("destination_workload", "server"),
                ("response_flags", "CONNECT")
            ]
        ),
        1.0,
        "{}: the unreachable workload port",
        sc.what
    );
    assert!(
        sc.select(
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")]
        )
        .is_empty(),
        "{}: the client ringtun received no inbound connection",
        sc.what
    );

    let shard0 = [("shard", "0")];
    assert_eq!(sc.one("ringtun_shards", &[]), 1.0, "{}", sc.what);
    assert_eq!(sc.one("ringtun_draining", &[]), 0.0, "{}", sc.what);
    assert_eq!(
        sc.one("ringtun_config_generation", &shard0),
        1.0,
        "{}",
        sc.what
    );
    assert_eq!(
        sc.one("ringtun_accepted_connections_total", &shard0),
        4.0,
        "{}: four captured connections",
        sc.what
    );
    assert_eq!(
        sc.one("ringtun_open_connections", &shard0),
        0.0,
        "{}: all closed",
        sc.what
    );
    assert_eq!(
        sc.one("ringtun_pool_connections", &shard0),
        1.0,
        "{}: one pooled HBONE connection",
        sc.what
    );
    assert_eq!(sc.one("ringtun_pool_streams", &shard0), 0.0, "{}", sc.what);
    assert_eq!(
        sc.one("ringtun_ktls_connections_total", &shard0)
            + sc.one("ringtun_userspace_tls_connections_total", &shard0),
        1.0,
        "{}: one HBONE connection, its TLS in the kernel or in userspace",
        sc.what
    );
    let info = sc.select("ringtun_info", &[]);
    assert_eq!(info.len(), 1, "{}: {info:?}", sc.what);
    assert!(
        ["io_uring", "legacy"].contains(&info[0].labels["driver"].as_str())
            && !info[0].labels["version"].is_empty(),
        "{}: {info:?}",
        sc.what
    );
}

/// Checks one scrape of the server ringtun (reporter `destination`).
fn check_server_metrics(sc: &Scrape) {
    sc.assert_family("istio_tcp_received_bytes", "counter");
    sc.assert_family("istio_tcp_sent_bytes", "counter");
    let ok: [(&str, &str); 10] = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
        ("source_principal", CLIENT_ID),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "default"),
        ("destination_principal", SERVER_ID),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let f = |x: u64| x as f64;
    assert_eq!(
        sc.sum("istio_tcp_received_bytes_total", &ok),
        f(N1 + N2),
        "{}: request bytes; every received-bytes sample: {:#?}",
        sc.what,
        sc.select("istio_tcp_received_bytes_total", &[])
    );
    assert_eq!(
        sc.sum("istio_tcp_sent_bytes_total", &ok),
        f(N1 + M2),
        "{}: response bytes",
        sc.what
    );
    // The stream to the unreachable port was opened too, and closed with its flags.
    assert_eq!(
        sc.sum("istio_tcp_connections_opened_total", &ok),
        3.0,
        "{}",
        sc.what
    );
    assert_eq!(
        sc.sum("istio_tcp_connections_closed_total", &ok),
        2.0,
        "{}",
        sc.what
    );
    let dst = [("reporter", "destination")];
    assert_eq!(
        sc.sum("istio_tcp_received_bytes_total", &dst),
        f(N1 + N2),
        "{}",
        sc.what
    );
    assert_eq!(
        sc.sum("istio_tcp_connections_opened_total", &dst),
        3.0,
        "{}",
        sc.what
    );
    // The CONNECT to a port nobody listens on (503).
    assert_eq!(
        sc.sum("istio_tcp_connections_failed_total", &dst),
        1.0,
        "{}: the unreachable destination",
        sc.what
    );
    assert!(
        sc.select(
            "istio_tcp_connections_opened_total",
            &[("reporter", "source")]
        )
        .is_empty(),
        "{}: the server ringtun made no outbound connection",
        sc.what
    );
    assert_eq!(
        sc.one("ringtun_accepted_connections_total", &[("shard", "0")]),
        1.0,
        "{}: one HBONE connection from the client ringtun",
        sc.what
    );
}

#[test]
fn metrics_count_every_byte_and_parse_as_prometheus_and_openmetrics() {
    let m = Mesh::start(MeshOptions::new("opm"));
    wait_endpoints(&m.client);
    wait_endpoints(&m.server);
    let echo = echo_server(&m.nodes.server, "0.0.0.0:5201");
    let replied = reply_server(&m.nodes.server, "10.77.0.2:5202", M2);
    let client = &m.nodes.client;

    let vip = echo_ok(client, "10.96.0.10:80", N1);
    echo.records
        .wait_for(LOG_WAIT, |r| r.sha256 == vip.sha_sent)
        .expect("the echo server saw the VIP transfer");
    let back = upload_then_download(client, "10.77.0.2:5202", N2);
    assert_eq!(back, M2, "pod IP download");
    assert_eq!(replied.load(Ordering::SeqCst), N2, "pod IP upload");
    // Refused: a service port without endpoint (client side), and a workload port nobody
    // listens on (the server ringtun answers 503).
    let how = expect_no_answer(client, "10.96.0.10:81");
    eprintln!("VIP port without endpoint: {how}");
    let how = expect_no_answer(client, "10.77.0.2:5999");
    eprintln!("unreachable workload port: {how}");

    // Access lines are written after the metrics are updated: once all are there, the
    // counters are final.
    m.client
        .wait_access_all("for the 4 connections", LOG_WAIT, |ls| {
            ls.iter().filter(|l| l.is("direction", "outbound")).count() >= 4
        });
    m.server
        .wait_access_all("for the 3 streams", LOG_WAIT, |ls| {
            ls.iter().filter(|l| l.is("direction", "inbound")).count() >= 3
        });

    for openmetrics in [false, true] {
        let sc = Scrape::take(client, openmetrics);
        let want_ctype = if openmetrics {
            "application/openmetrics-text"
        } else {
            "text/plain; version=0.0.4"
        };
        assert!(
            sc.content_type.starts_with(want_ctype),
            "{}: Content-Type {:?}",
            sc.what,
            sc.content_type
        );
        check_client_metrics(&sc);
        let sc = Scrape::take(&m.nodes.server, openmetrics);
        check_server_metrics(&sc);
    }
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}

#[test]
fn byte_counters_grow_while_a_connection_lives() {
    let m = Mesh::start(MeshOptions::new("obl"));
    let _echo = echo_server(&m.nodes.server, "0.0.0.0:5201");
    let client = &m.nodes.client;
    let total = 4 * MIB;
    let (tx, rx) = mpsc::channel();
    let (resume_tx, resume_rx) = mpsc::channel::<()>();
    let t = std::thread::scope(|s| {
        // 4 MiB in 32 steps of 128 KiB, 100 ms apart, held at the halfway mark until both ends
        // were scraped: a slow scrape on a busy machine must not find the connection closed.
        let live = s.spawn(move || {
            transfer_paced(
                client,
                "10.96.0.10:80",
                total,
                128 * 1024,
                Duration::from_millis(100),
                2 * MIB,
                move |_| {
                    let _ = tx.send(());
                    let _ = resume_rx.recv_timeout(Duration::from_secs(60));
                },
            )
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the transfer got halfway");
        // Halfway, still open: both ends already count the bytes that went through.
        for (ns, reporter) in [(&m.nodes.client, "source"), (&m.nodes.server, "destination")] {
            let deadline = Instant::now() + LOG_WAIT;
            loop {
                let sc = Scrape::take(ns, false);
                let want = [("reporter", reporter)];
                let received = sc.sum("istio_tcp_received_bytes_total", &want);
                let sent = sc.sum("istio_tcp_sent_bytes_total", &want);
                let closed = sc.sum("istio_tcp_connections_closed_total", &want);
                assert_eq!(closed, 0.0, "{reporter}: the connection is still open");
                assert_eq!(
                    sc.one("istio_tcp_sockets_open", &want),
                    1.0,
                    "{reporter}: one open connection"
                );
                assert_eq!(sc.one("istio_build", &[("component", "ztunnel")]), 1.0);
                if received >= MIB as f64 && sent >= MIB as f64 {
                    assert!(received < total as f64, "{reporter}: {received}");
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{reporter}: byte counters did not grow while the connection lived ({received} received, {sent} sent)"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = resume_tx.send(());
        live.join().expect("transfer thread")
    })
    .expect("transfer");
    assert_eq!(t.sha_sent, t.sha_received, "transfer intact");
    // Closed: every byte counted once, on both ends.
    for (ns, reporter) in [
        (&m.nodes.client, "source"),
        (&m.nodes.server, "destination"),
    ] {
        let deadline = Instant::now() + LOG_WAIT;
        loop {
            let sc = Scrape::take(ns, false);
            let want = [("reporter", reporter)];
            if sc.sum("istio_tcp_connections_closed_total", &want) == 1.0 {
                assert_eq!(sc.one("istio_tcp_sockets_open", &want), 0.0, "{reporter}");
                assert_eq!(
                    sc.sum("istio_tcp_received_bytes_total", &want),
                    total as f64
                );
                assert_eq!(sc.sum("istio_tcp_sent_bytes_total", &want), total as f64);
                break;
            }
            assert!(Instant::now() < deadline, "{reporter}: never closed");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}

/// Connections waiting in `ns`'s accept queue on `port` (the listener's `Recv-Q` in `ss`).
fn accept_queue(ns: &Netns, port: u16) -> u64 {
    let out = ns
        .run("ss", ["-Hltn", &format!("sport = :{port}")])
        .expect("ss");
    out.lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// A burst that queued while the client ringtun was stopped: every connection carries its own
/// bytes back intact, and on io_uring the ones behind the first ring accept are taken in the
/// same tick with direct accepts (`ringtun_accepted_direct_connections_total`), which the
/// epoll driver never counts (its accept is already a loop of `accept4` calls).
fn burst_scenario(driver: &str, prefix: &'static str) {
    const BURST: usize = 5;
    const EACH: usize = 16 * 1024;
    let mut opts = MeshOptions::new(prefix);
    opts.extra.extend(["--io-driver".into(), driver.into()]);
    let m = Mesh::start(opts);
    wait_endpoints(&m.client);
    let _echo = echo_server(&m.nodes.server, "0.0.0.0:5201");
    let client = &m.nodes.client;
    // A first connection opens the pooled HBONE connection, so the burst needs no handshake.
    echo_ok(client, "10.96.0.10:80", 1024);

    m.client.signal(libc::SIGSTOP);
    // The signal is delivered asynchronously: a connection that arrived before every thread
    // stopped would be accepted at once.
    let deadline = Instant::now() + LOG_WAIT;
    while !ringtun_testbed::sys::all_threads_stopped(m.client.pid()) {
        assert!(Instant::now() < deadline, "the client ringtun did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut conns = Vec::new();
    let mut sent = Vec::new();
    for i in 0..BURST {
        let mut s = connect_in(client, "10.96.0.10:80").expect("connect while stopped");
        let mut data = vec![0u8; EACH];
        Pattern::seeded(i as u64 + 1).fill(&mut data);
        s.write_all(&data).expect("write while stopped");
        conns.push(s);
        sent.push(data);
    }
    // The kernel finishes each handshake a moment after the client's connect returns.
    let deadline = Instant::now() + LOG_WAIT;
    while accept_queue(client, 15001) < BURST as u64 {
        assert!(Instant::now() < deadline, "the burst never queued");
        std::thread::sleep(Duration::from_millis(10));
    }
    m.client.signal(libc::SIGCONT);

    for (i, (mut s, data)) in conns.into_iter().zip(&sent).enumerate() {
        let mut back = vec![0u8; EACH];
        std::io::Read::read_exact(&mut s, &mut back)
            .unwrap_or_else(|e| panic!("connection {i} of the burst: {e}"));
        assert!(back == *data, "connection {i}: other bytes came back");
    }
    m.client
        .wait_access_all("for the burst", LOG_WAIT, |ls| ls.len() > BURST);
    let sc = Scrape::take(client, false);
    let shard0 = [("shard", "0")];
    assert_eq!(
        sc.one("ringtun_accepted_connections_total", &shard0),
        (BURST + 1) as f64,
        "{}",
        sc.what
    );
    // The ring's accept completes in the shard's task work when it runs again: one connection,
    // and the rest of the burst is in the queue by then.
    let want_direct = if driver == "legacy" { 0 } else { BURST - 1 };
    assert_eq!(
        sc.one("ringtun_accepted_direct_connections_total", &shard0),
        want_direct as f64,
        "{} on {driver}",
        sc.what
    );
    m.client.assert_no_panic();
}

#[test]
fn a_burst_of_connections_starts_in_one_tick_on_io_uring() {
    burst_scenario("io-uring", "oau");
}

#[test]
fn a_burst_of_connections_on_the_epoll_driver_needs_no_direct_accepts() {
    burst_scenario("legacy", "oal");
}
