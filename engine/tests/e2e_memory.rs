//! Memory per idle tunnelled connection, as a user sees it: RSS of the client-side and the
//! server-side ringtun together, before and after opening a few thousand connections through
//! the real capture → HBONE → inbound path, and those connections still carrying bytes both
//! ways, intact, once they have sat idle. And memory that stays bounded when a reader stops
//! reading, a plain TCP application or an HTTP/2 client (`tests/peers/h2_abuse.py`), while the
//! source keeps writing.
//!
//! Needs root (network namespaces); fails without it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use ringtun_testbed::Netns;

const MIB: u64 = 1 << 20;

/// Idle connections held open.
const CONNS: usize = 2000;
/// Bound on the RSS growth per idle connection, both ringtun processes together. Measured
/// here: 1.6–2.8 KiB since a quiet HBONE connection lets go of h2's read and write buffers
/// and the connection's task is back in the 512-byte class (round 9; 3.9–4.4 KiB in round 7,
/// after h2's frame queues learned to give back a burst's slots; 13.1–13.7 before an idle
/// connection's task held only its copy loop); the bound leaves about 60% for noise. A read
/// buffer kept by an idle connection (a page or more per direction), opening or handshake
/// state back in the per-connection task, or h2's buffers or queues kept at their burst size
/// again, would break it.
const MAX_KIB_PER_CONN: f64 = 4.5;
/// Bytes each connection carries each way after its idle period.
const PAYLOAD: usize = 3000;

/// Bytes connection `i` sends (the server echoes them back): distinct per connection, so a
/// stream crossed with another one fails the check.
fn payload(i: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; PAYLOAD];
    Pattern::seeded(i as u64).fill(&mut bytes);
    bytes
}

fn rss(m: &Mesh) -> (u64, u64) {
    (m.client.rss_kib(), m.server.rss_kib())
}

#[test]
fn idle_connections_cost_little_memory_and_still_work() {
    // This process holds both ends of every connection (plus the warm-up ones).
    // As many open files as the hard limit allows.
    let nofile = ringtun_testbed::sys::raise_nofile(u64::MAX);
    assert!(
        nofile as usize >= 2 * CONNS + 256,
        "RLIMIT_NOFILE is {nofile}: {CONNS} idle connections need {} (both ends live in this test)",
        2 * CONNS + 256
    );
    let m = Mesh::start(MeshOptions::new("emem"));
    // Warm-up on its own port: the HBONE connection, first-use allocations, a transfer big
    // enough to grow the read buffers (which idle connections must then not keep).
    let _echo = echo_server(&m.nodes.server, "0.0.0.0:5202");
    echo_ok(&m.nodes.client, "10.77.0.2:5202", 4 << 20);

    // The server side holds every connection it accepts: it reads the 4-byte index the client
    // sends first (so each connection has carried bytes before it idles), then waits for the
    // go to echo.
    let listener = bind_in(&m.nodes.server, "0.0.0.0:5201");
    let (accepted_tx, accepted_rx) = mpsc::channel::<Result<(usize, TcpStream), String>>();
    std::thread::spawn(move || {
        for _ in 0..CONNS {
            let r = listener
                .accept()
                .map_err(|e| format!("accept: {e}"))
                .and_then(|(mut s, _)| {
                    s.set_read_timeout(Some(IO_TIMEOUT))
                        .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
                        .map_err(|e| e.to_string())?;
                    let mut idx = [0u8; 4];
                    s.read_exact(&mut idx)
                        .map_err(|e| format!("reading the index: {e}"))?;
                    Ok((u32::from_le_bytes(idx) as usize, s))
                });
            if accepted_tx.send(r).is_err() {
                return;
            }
        }
    });

    std::thread::sleep(Duration::from_millis(500));
    let (c0, s0) = rss(&m);

    let mut clients = Vec::with_capacity(CONNS);
    for i in 0..CONNS {
        let mut s = connect_in(&m.nodes.client, "10.77.0.2:5201")
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        s.write_all(&(i as u32).to_le_bytes())
            .unwrap_or_else(|e| panic!("connection {i}: sending its index: {e}"));
        clients.push(s);
    }
    let mut servers: Vec<Option<TcpStream>> = (0..CONNS).map(|_| None).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in 0..CONNS {
        let left = deadline.saturating_duration_since(Instant::now());
        let (i, s) = match accepted_rx.recv_timeout(left) {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => panic!("server side of connection {n}: {e}"),
            Err(e) => panic!("only {n} of {CONNS} connections reached the server: {e}"),
        };
        assert!(
            i < CONNS && servers[i].is_none(),
            "bad or repeated index {i}"
        );
        servers[i] = Some(s);
    }

    // Every connection is tunnelled end to end; a reader lets its buffer go once its
    // connection has been quiet for a second (checked every 250 ms), so idle means idle for
    // longer than that.
    std::thread::sleep(Duration::from_millis(2500));
    let (c1, s1) = rss(&m);
    let per_conn = |before: u64, after: u64| (after as f64 - before as f64) / CONNS as f64;
    let (client_kib, server_kib) = (per_conn(c0, c1), per_conn(s0, s1));
    let both = client_kib + server_kib;
    eprintln!(
        "RSS per idle tunnelled connection: client {client_kib:.2} KiB + server {server_kib:.2} KiB = {both:.2} KiB ({CONNS} connections; client {c0} → {c1} KiB, server {s0} → {s1} KiB)"
    );
    assert!(
        both <= MAX_KIB_PER_CONN,
        "idle connections cost {both:.2} KiB each (client {client_kib:.2} + server {server_kib:.2}); the bound is {MAX_KIB_PER_CONN} KiB"
    );

    // Idle connections still work: every one carries its own bytes both ways.
    let writer = std::thread::spawn(move || {
        for (i, s) in clients.iter_mut().enumerate() {
            s.write_all(&payload(i))
                .unwrap_or_else(|e| panic!("connection {i}: client write: {e}"));
        }
        clients
    });
    for (i, s) in servers.iter_mut().enumerate() {
        let s = s.as_mut().expect("every index arrived");
        let mut got = vec![0u8; PAYLOAD];
        s.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("connection {i}: server read after idling: {e}"));
        assert!(
            got == payload(i),
            "connection {i}: bytes changed on the way up"
        );
        s.write_all(&got)
            .unwrap_or_else(|e| panic!("connection {i}: server write: {e}"));
    }
    let mut clients = writer.join().expect("client writer");
    for (i, s) in clients.iter_mut().enumerate() {
        let mut got = vec![0u8; PAYLOAD];
        s.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("connection {i}: client read after idling: {e}"));
        assert!(
            got == payload(i),
            "connection {i}: bytes changed on the way down"
        );
    }
    // They were tunnelled over HBONE (not passed through): one outbound line each once closed.
    drop((clients, servers));
    m.client.wait_access_all(
        &format!("{CONNS} tunnelled connections"),
        Duration::from_secs(60),
        |lines| {
            lines
                .iter()
                .filter(|l| {
                    l.is("direction", "outbound") && l.is("dst.hbone_addr", "10.77.0.2:5201")
                })
                .count()
                >= CONNS
        },
    );
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}

/// A server that writes pattern bytes as fast as each client takes them, forever; the counter
/// says how many bytes its writes have handed to the kernel.
fn source_server(ns: &Netns, addr: &str) -> Arc<AtomicU64> {
    let written = Arc::new(AtomicU64::new(0));
    let count = written.clone();
    serve(ns, addr, move |mut conn| {
        let mut pat = Pattern::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            pat.fill(&mut buf);
            match conn.write(&buf) {
                Ok(0) | Err(_) => return,
                Ok(k) => {
                    count.fetch_add(k as u64, Ordering::SeqCst);
                }
            }
        }
    });
    written
}

/// Samples the RSS (KiB) of `procs` and the source server's byte count every 250 ms for
/// `period`; returns per process the largest growth over `base` and the counts seen.
fn watch(
    procs: &[&Ringtun],
    base: &[u64],
    written: &AtomicU64,
    period: Duration,
) -> (Vec<u64>, Vec<u64>) {
    let mut growth = vec![0u64; procs.len()];
    let mut counts = Vec::new();
    let end = Instant::now() + period;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(250));
        for (i, p) in procs.iter().enumerate() {
            growth[i] = growth[i].max(p.rss_kib().saturating_sub(base[i]));
        }
        counts.push(written.load(Ordering::SeqCst));
    }
    (growth, counts)
}

const RSS_LIMIT_KIB: u64 = 100 * 1024;
const BUFFERED_LIMIT: u64 = 128 * MIB;

#[test]
fn a_client_that_stops_reading_keeps_memory_bounded() {
    let m = Mesh::start(MeshOptions::new("osm"));
    let written = source_server(&m.nodes.server, "10.77.0.2:5300");
    let procs = [&m.client, &m.server];
    let base: Vec<u64> = procs.iter().map(|p| p.rss_kib()).collect();
    let mut app = connect_in(&m.nodes.client, "10.77.0.2:5300").expect("connect");
    // Data flows ...
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < MIB {
        got += app.read(&mut buf).expect("download") as u64;
    }
    // ... then the application stops reading for 5 s.
    let (growth, counts) = watch(&procs, &base, &written, Duration::from_secs(5));
    let total = *counts.last().expect("samples");
    let mid = counts[counts.len() / 2];
    eprintln!(
        "stalled download: source wrote {} MiB (half-time {} MiB), RSS growth client {} KiB, server {} KiB",
        total / MIB,
        mid / MIB,
        growth[0],
        growth[1]
    );
    assert!(
        total < BUFFERED_LIMIT,
        "{total} bytes left the source while the client read {got}: something buffers without bound"
    );
    assert!(
        total - mid < 8 * MIB,
        "the source was still writing freely ({mid} → {total}) although nobody reads"
    );
    for (p, g) in procs.iter().zip(&growth) {
        assert!(g < &RSS_LIMIT_KIB, "ringtun ({}) grew by {g} KiB", p.name);
    }
    // Reading again, the download resumes.
    app.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut more = 0u64;
    while more < total + 16 * MIB - got {
        match app.read(&mut buf) {
            Ok(0) => panic!("EOF after resuming"),
            Ok(k) => more += k as u64,
            Err(e) => panic!("resuming the download after {more} bytes: {e}"),
        }
    }
    for p in procs {
        assert!(p.is_alive());
        p.assert_no_panic();
    }
}

#[test]
fn an_h2_client_that_stops_reading_keeps_memory_bounded() {
    let t = ServerOnly::start("osp");
    let written = source_server(&t.nodes.server, "10.77.0.2:5300");
    let base = [t.server.rss_kib()];
    let (run, (growth, counts)) = std::thread::scope(|s| {
        let staller = s.spawn(|| {
            h2_abuse(
                &t.nodes.client,
                &t.dir,
                "stall",
                &[
                    "--authority",
                    "10.77.0.2:5300",
                    "--hold",
                    "5",
                    "--resume",
                    "2",
                ],
            )
        });
        // Watch while the client does not read (from the 200 to the end of the hold).
        std::thread::sleep(Duration::from_millis(500));
        let w = watch(&[&t.server], &base, &written, Duration::from_secs(4));
        (staller.join().expect("staller"), w)
    });
    let r = abuse_result(&run);
    let total = *counts.last().expect("samples");
    eprintln!(
        "stalled h2 reader: {r}\nsource wrote {} MiB, server RSS growth {} KiB",
        total / MIB,
        growth[0]
    );
    assert_eq!(
        run.event("response").expect("response")["status"],
        200,
        "{run}"
    );
    assert!(
        total < BUFFERED_LIMIT,
        "{total} bytes left the source while the HBONE client did not read"
    );
    assert!(
        growth[0] < RSS_LIMIT_KIB,
        "ringtun grew by {} KiB",
        growth[0]
    );
    assert!(
        r["after_resume"].as_u64().is_some_and(|b| b > MIB),
        "the download resumed once the client read again: {r}"
    );
    assert!(t.server.is_alive());
    t.server.assert_no_panic();
}
