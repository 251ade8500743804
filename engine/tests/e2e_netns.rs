//! End-to-end tests of the ringtun binary in real network namespaces: outbound capture →
//! HBONE (mTLS + HTTP/2 CONNECT) → inbound, passthrough, plaintext inbound capture, IPv6,
//! half-close and reset propagation, many connections, config errors and hot reload.
//!
//! Each test builds its own client and server namespaces (see `common::Mesh`), so tests run in
//! parallel; they need root and fail without it. On failure the ringtun logs and nftables
//! rulesets are printed.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use ringtun_testbed::{Netns, DEFAULT_MARK as MARK};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
const LOG_WAIT: Duration = Duration::from_secs(10);

/// The outbound access line of the client connection whose local port is `port`.
fn outbound_line(m: &Mesh, t: &Transfer, what: &str) -> AccessLine {
    let suffix = format!(":{}", t.local.port());
    let line = m.client.wait_access(what, LOG_WAIT, |l| {
        l.is("direction", "outbound") && l.get("src.addr").is_some_and(|a| a.ends_with(&suffix))
    });
    assert_eq!(
        line.get("src.addr"),
        Some(t.local.to_string().as_str()),
        "src.addr should be the client's address as it connected: {}",
        line.raw
    );
    line
}

/// Asserts the fields every successful HBONE connection carrying an exact echo of `n` bytes
/// must log, on the client (outbound) side.
fn assert_outbound(line: &AccessLine, n: u64) {
    assert!(line.is("direction", "outbound"), "{}", line.raw);
    assert!(line.is("src.identity", CLIENT_ID), "{}", line.raw);
    assert!(line.is("dst.identity", SERVER_ID), "{}", line.raw);
    assert_eq!(line.num("bytes_sent"), n, "{}", line.raw);
    assert_eq!(line.num("bytes_recv"), n, "{}", line.raw);
    assert!(line.is("end", "closed"), "{}", line.raw);
    // Two ringtuns with the default preference agree on the cheaper suite.
    assert!(line.is("tls.cipher", "aes-128-gcm"), "{}", line.raw);
}

/// Waits for the `nth` (1-based) inbound access line with the client identity and `n` bytes
/// each way on the server side, and checks it.
fn wait_inbound(m: &Mesh, n: u64, nth: usize, what: &str) -> AccessLine {
    let is_ours = |l: &AccessLine| {
        l.is("direction", "inbound")
            && l.is("src.identity", CLIENT_ID)
            && l.num("bytes_sent") == n
            && l.num("bytes_recv") == n
    };
    let lines = m.server.wait_access_all(what, LOG_WAIT, |ls| {
        ls.iter().filter(|l| is_ours(l)).count() >= nth
    });
    let line = lines
        .into_iter()
        .filter(|l| is_ours(l))
        .nth(nth - 1)
        .expect("counted above");
    assert!(line.is("dst.identity", SERVER_ID), "{}", line.raw);
    assert!(line.is("end", "closed"), "{}", line.raw);
    line
}

/// The whole main path on one I/O driver and one userspace TLS record layer (`records`:
/// ringtun's own over rustls' keys, or rustls'): 64 MiB through the VIP and the pod IP,
/// identities in the access logs, pool reuse, passthrough, plaintext inbound capture.
fn main_scenario(driver: &str, records: &str, prefix: &'static str) {
    let mut opts = MeshOptions::new(prefix);
    opts.extra.extend([
        "--io-driver".into(),
        driver.into(),
        "--tls-records".into(),
        records.into(),
    ]);
    let m = Mesh::start(opts);
    let want_driver = if driver == "legacy" {
        "driver=Legacy"
    } else {
        "driver=IoUring"
    };
    for r in [&m.client, &m.server] {
        let log = r.log();
        let ready = log
            .lines()
            .find(|l| l.contains("ringtun ready"))
            .unwrap_or_default();
        assert!(
            ready.contains(want_driver),
            "{} runs another driver: {ready}",
            r.name
        );
        let announced = format!("(--tls-records {records})");
        assert!(
            log.lines()
                .any(|l| l.contains("HBONE connections use") && l.contains(&announced)),
            "{} does not announce its record layer {announced}:\n{log}",
            r.name
        );
    }
    let echo = echo_server(&m.nodes.server, "0.0.0.0:5201");
    let client = &m.nodes.client;

    // 64 MiB through the service VIP, then 64 MiB to the pod IP.
    let via_vip = echo_ok(client, "10.96.0.10:80", 64 * MIB);
    let via_pod = echo_ok(client, "10.77.0.2:5201", 64 * MIB);
    eprintln!(
        "64 MiB echo via VIP took {:?}, via pod IP {:?}",
        via_vip.took, via_pod.took
    );
    for t in [&via_vip, &via_pod] {
        let seen = echo
            .records
            .wait_for(LOG_WAIT, |r| r.sha256 == t.sha_sent)
            .unwrap_or_else(|| {
                panic!(
                    "the echo server never saw the bytes of {t:?}; it saw {:?}",
                    echo.records.all()
                )
            });
        assert_eq!(seen.bytes, 64 * MIB);
        assert_eq!(seen.error, None, "echo server connection failed");
    }

    let vip_line = outbound_line(&m, &via_vip, "for the VIP transfer");
    assert_outbound(&vip_line, 64 * MIB);
    assert!(vip_line.is("dst.service", SERVICE_HOST), "{}", vip_line.raw);
    // As ztunnel: dst.addr is the HBONE peer, dst.hbone_addr the endpoint the VIP resolved to.
    assert!(
        vip_line.is("dst.addr", "10.77.0.2:15008"),
        "{}",
        vip_line.raw
    );
    assert!(
        vip_line.is("dst.hbone_addr", "10.77.0.2:5201"),
        "{}",
        vip_line.raw
    );
    assert!(vip_line.is("dst.workload", "server"), "{}", vip_line.raw);
    assert!(vip_line.is("dst.namespace", "default"), "{}", vip_line.raw);
    let pod_line = outbound_line(&m, &via_pod, "for the pod IP transfer");
    assert_outbound(&pod_line, 64 * MIB);
    assert!(
        pod_line.is("dst.hbone_addr", "10.77.0.2:5201"),
        "{}",
        pod_line.raw
    );
    // The second connection to the same workload rides the pooled HTTP/2 connection.
    assert!(vip_line.is("pool", "new"), "{}", vip_line.raw);
    assert!(pod_line.is("pool", "reused"), "{}", pod_line.raw);
    wait_inbound(
        &m,
        64 * MIB,
        2,
        "with both identities for both 64 MiB transfers",
    );

    // A destination outside the config passes through as plain TCP.
    m.nodes
        .server
        .add_address(m.nodes.ifname(), "10.77.0.9/24")
        .expect("add 10.77.0.9");
    let outside = echo_server(&m.nodes.server, "10.77.0.9:7000");
    let pt = echo_ok(client, "10.77.0.9:7000", MIB);
    let seen = outside
        .records
        .wait_for(LOG_WAIT, |r| r.sha256 == pt.sha_sent)
        .expect("the outside server saw the passthrough bytes");
    assert_eq!(
        seen.peer.ip().to_string(),
        "10.77.0.1",
        "passthrough comes from the client node"
    );
    let pt_line = outbound_line(&m, &pt, "for the passthrough connection");
    assert!(pt_line.is("path", "passthrough"), "{}", pt_line.raw);
    assert!(pt_line.is("dst.addr", "10.77.0.9:7000"), "{}", pt_line.raw);
    assert_eq!(pt_line.num("bytes_sent"), MIB, "{}", pt_line.raw);

    // With the plaintext inbound capture in the server namespace, the passthrough connection
    // arrives through 15006. 10.77.0.9 is no workload served there, so ringtun may refuse to
    // forward it (ztunnel does: UnknownDestination); only the arrival is asserted.
    m.nodes
        .server
        .capture_inbound(15006, &INBOUND_EXCEPT)
        .expect("inbound capture");
    let _ = transfer(client, "10.77.0.9:7000", 64 * 1024);
    let line = m.server.wait_access("path=plaintext", LOG_WAIT, |l| {
        l.is("path", "plaintext") && l.is("dst.addr", "10.77.0.9:7000")
    });
    assert!(
        line.get("src.addr")
            .is_some_and(|a| a.starts_with("10.77.0.1:")),
        "{}",
        line.raw
    );

    // A client outside the mesh (its socket carries the mark, so the client node's capture
    // leaves it alone) reaching the served workload in plaintext goes through 15006 too, and
    // is forwarded.
    let inside = echo_server(&m.nodes.server, "10.77.0.2:7000");
    let s = connect_marked_in(client, "10.77.0.2:7000".parse().expect("addr"), MARK)
        .expect("plaintext connect to 10.77.0.2:7000");
    let local = s.local_addr().expect("local addr").to_string();
    echo_on(s, MIB as usize).unwrap_or_else(|e| panic!("plaintext inbound echo: {e}"));
    inside
        .records
        .wait_for(LOG_WAIT, |r| r.bytes == MIB)
        .expect("the workload saw the plaintext bytes");
    let line = m
        .server
        .wait_access("inbound-plaintext to the workload", LOG_WAIT, |l| {
            l.is("path", "plaintext") && l.is("src.addr", &local)
        });
    assert!(line.is("dst.addr", "10.77.0.2:7000"), "{}", line.raw);
    assert!(line.is("end", "closed"), "{}", line.raw);
    assert_eq!(line.num("bytes_sent"), MIB, "{}", line.raw);
    assert_eq!(line.num("bytes_recv"), MIB, "{}", line.raw);

    // HBONE is not disturbed by the capture (15008 is exempt).
    echo_ok(client, "10.96.0.10:80", MIB);
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}

#[test]
fn main_path_io_uring() {
    main_scenario("io-uring", "own", "eiu");
}

#[test]
fn main_path_legacy() {
    main_scenario("legacy", "own", "elg");
}

/// rustls' record layer throughout, the other userspace choice.
#[test]
fn main_path_rustls_records() {
    main_scenario("io-uring", "rustls", "erl");
}

#[test]
fn tls_cipher_preference_is_the_servers() {
    // The client prefers AES-128 (the default), the server AES-256: the server's choice wins.
    let (nodes, dir, config) = mesh_files("ecp", &mesh_config(&["/10.96.0.10"], false), |_| {});
    nodes
        .client
        .capture_outbound(15001, MARK)
        .expect("outbound capture");
    let mut aes256 = one_worker();
    aes256.extend(["--tls-cipher".to_string(), "aes256".to_string()]);
    let server = Ringtun::start_as(&nodes.server, "server", dir.path(), &config, aes256);
    let client = Ringtun::start_as(&nodes.client, "client", dir.path(), &config, one_worker());
    let _echo = echo_server(&nodes.server, "0.0.0.0:5201");
    echo_ok(&nodes.client, "10.96.0.10:80", MIB);
    for (who, r) in [("client", &client), ("server", &server)] {
        let line = r.wait_access("for the echo", LOG_WAIT, |l| l.get("tls.cipher").is_some());
        assert!(
            line.is("tls.cipher", "aes-256-gcm"),
            "{who}: the server's preference decides: {}",
            line.raw
        );
    }
    client.assert_no_panic();
    server.assert_no_panic();
}

#[test]
fn ipv6_capture_and_hbone() {
    let mut opts = MeshOptions::new("e6");
    opts.config = mesh_config(&["/10.96.0.10", "/fd96::10"], true);
    let m = Mesh::start(opts);
    // Dual-stack listener: IPv6 and IPv4-mapped clients.
    let echo = echo_server(&m.nodes.server, "[::]:5201");
    let t = echo_ok(&m.nodes.client, "[fd77::2]:5201", 4 * MIB);
    echo.records
        .wait_for(LOG_WAIT, |r| r.sha256 == t.sha_sent)
        .expect("echo server saw the IPv6 transfer");
    assert_eq!(t.local.ip().to_string(), "fd77::1");
    let line = outbound_line(&m, &t, "for the IPv6 pod transfer");
    assert_outbound(&line, 4 * MIB);
    assert!(line.is("dst.hbone_addr", "[fd77::2]:5201"), "{}", line.raw);
    wait_inbound(&m, 4 * MIB, 1, "for the IPv6 transfer");

    // An IPv6 service VIP.
    let t = echo_ok(&m.nodes.client, "[fd96::10]:80", MIB);
    let line = outbound_line(&m, &t, "for the IPv6 VIP transfer");
    assert_outbound(&line, MIB);
    assert!(line.is("dst.service", SERVICE_HOST), "{}", line.raw);
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}

#[test]
fn half_close_both_ways() {
    let m = Mesh::start(MeshOptions::new("ehc"));
    let listener = bind_in(&m.nodes.server, "0.0.0.0:5201");

    // 1. The client half-closes; the server reads EOF, then replies (4 MiB after a digest of
    //    what it got); the client receives the whole reply and a clean EOF.
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let (got, end) = read_to_end_or_error(&mut s);
        end.expect("server: clean EOF from the client's half-close");
        let mut reply = sha256_hex(&got).into_bytes();
        let mut body = vec![0u8; (4 * MIB) as usize];
        Pattern::new().fill(&mut body);
        reply.extend_from_slice(&body);
        s.write_all(&reply).expect("server: reply after EOF");
        s.shutdown(Shutdown::Write).expect("server: shutdown");
        let reply_sha = sha256_hex(&reply);

        // 2. The other way round: the server sends and half-closes first, then reads.
        let (mut s, _) = listener.accept().expect("accept 2");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let mut first = vec![0u8; MIB as usize];
        Pattern::new().fill(&mut first);
        s.write_all(&first).expect("server: first send");
        s.shutdown(Shutdown::Write).expect("server: half-close");
        let (got2, end2) = read_to_end_or_error(&mut s);
        end2.expect("server: clean EOF after the client's data");
        (
            got.len(),
            reply_sha,
            sha256_hex(&first),
            sha256_hex(&got2),
            got2.len(),
        )
    });

    let mut c = connect_in(&m.nodes.client, "10.96.0.10:80").expect("connect 1");
    let mut data = vec![0u8; MIB as usize];
    Pattern::new().fill(&mut data);
    c.write_all(&data).expect("client: send");
    c.shutdown(Shutdown::Write).expect("client: half-close");
    let (reply, end) = read_to_end_or_error(&mut c);
    end.expect("client: clean EOF after the reply");
    assert_eq!(reply.len() as u64, 64 + 4 * MIB, "reply length");
    assert_eq!(
        &reply[..64],
        sha256_hex(&data).as_bytes(),
        "server's digest of what it got"
    );

    let mut c2 = connect_in(&m.nodes.client, "10.96.0.10:80").expect("connect 2");
    let (first, end) = read_to_end_or_error(&mut c2);
    end.expect("client: clean EOF from the server's half-close");
    // The write side is still open after reading EOF.
    let mut more = vec![0u8; 2 * MIB as usize];
    Pattern::new().fill(&mut more);
    c2.write_all(&more)
        .expect("client: send after the server's half-close");
    c2.shutdown(Shutdown::Write).expect("client: shutdown");
    let (got_len, reply_sha, first_sha, got2_sha, got2_len) = server.join().expect("server thread");
    assert_eq!(got_len as u64, MIB);
    assert_eq!(reply_sha, sha256_hex(&reply));
    assert_eq!(first_sha, sha256_hex(&first));
    assert_eq!(got2_len as u64, 2 * MIB);
    assert_eq!(got2_sha, sha256_hex(&more));
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}

/// Whether an I/O error means "the peer reset the connection".
fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

/// A server's reset reaches the client as an end of file, not a reset: ztunnel's copy reads a
/// reset as an end (its `ignore_io_errors`), so that is what a drop-in's users see (the issue
/// asks for ztunnel's behaviour; two ztunnels, and either mixed pair, do the same).
#[test]
fn reset_from_server_reaches_client_as_end_of_file() {
    let m = Mesh::start(MeshOptions::new("ers"));
    let listener = bind_in(&m.nodes.server, "0.0.0.0:5201");
    let server = std::thread::spawn(move || {
        // Read the ping, then close with RST.
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let mut ping = [0u8; 4];
        s.read_exact(&mut ping).expect("server: ping");
        set_linger_zero(&s);
        drop(s);
    });
    let mut c = connect_in(&m.nodes.client, "10.96.0.10:80").expect("connect");
    let local = c.local_addr().expect("local addr").to_string();
    c.write_all(b"ping").expect("client: ping");
    let (_, end) = read_to_end_or_error(&mut c);
    server.join().expect("server thread");
    if let Err(e) = end {
        panic!(
            "client: expected end of file after the server's RST, as through ztunnel, got {e} ({:?})",
            e.kind()
        );
    }
    // As through ztunnel, the other direction stays open until the client closes it too.
    drop(c);
    // The proxy that saw the reset says so (ringtun's own `end` field); the other saw a clean
    // end.
    let line = m
        .server
        .wait_access("for the server-reset connection", LOG_WAIT, |l| {
            l.is("direction", "inbound")
        });
    assert!(line.is("end", "reset"), "{}", line.raw);
    // ztunnel logs such a connection as complete, without an error.
    assert!(line.get("error").is_none(), "{}", line.raw);
    let line = m
        .client
        .wait_access("for the server-reset connection", LOG_WAIT, |l| {
            l.is("src.addr", &local)
        });
    assert!(line.is("end", "closed"), "{}", line.raw);
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}

/// A client's reset reaches the server as an end of file, as through ztunnel (see above).
#[test]
fn reset_from_client_reaches_server_as_end_of_file() {
    let m = Mesh::start(MeshOptions::new("erc"));
    let listener = bind_in(&m.nodes.server, "0.0.0.0:5201");
    let (got_ping, wait_ping) = mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        // Read the ping, tell the client, then read until the reset.
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let mut ping = [0u8; 4];
        s.read_exact(&mut ping).expect("server: ping");
        let _ = got_ping.send(());
        read_to_end_or_error(&mut s)
    });
    let c = connect_in(&m.nodes.client, "10.96.0.10:80").expect("connect");
    (&c).write_all(b"ping").expect("client: ping");
    wait_ping
        .recv_timeout(IO_TIMEOUT)
        .expect("the server got the ping");
    set_linger_zero(&c);
    drop(c);
    let (_, end) = server.join().expect("server thread");
    if let Err(e) = end {
        panic!(
            "server: expected end of file after the client's RST, as through ztunnel, got {e} ({:?})",
            e.kind()
        );
    }
    let line = m
        .client
        .wait_access("for the client-reset connection", LOG_WAIT, |l| {
            l.is("direction", "outbound")
        });
    assert!(line.is("end", "reset"), "{}", line.raw);
    // ztunnel logs such a connection as complete, without an error.
    assert!(line.get("error").is_none(), "{}", line.raw);
    let line = m
        .server
        .wait_access("for the client-reset connection", LOG_WAIT, |l| {
            l.is("direction", "inbound")
        });
    assert!(line.is("end", "closed"), "{}", line.raw);
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}

/// Sends `size` pattern bytes on a fresh connection through the VIP and checks the echo.
fn small_echo(client: &Netns, size: usize) -> Result<(), String> {
    let mut s = connect_in(client, "10.96.0.10:80").map_err(|e| format!("connect: {e}"))?;
    let mut data = vec![0u8; size];
    Pattern::new().fill(&mut data);
    s.write_all(&data).map_err(|e| format!("write: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let (back, end) = read_to_end_or_error(&mut s);
    end.map_err(|e| format!("read after {} bytes: {e}", back.len()))?;
    if Sha256::digest(&back) != Sha256::digest(&data) {
        return Err(format!(
            "echo differs ({} of {size} bytes back)",
            back.len()
        ));
    }
    Ok(())
}

#[test]
fn thousand_sequential_connections() {
    let mut opts = MeshOptions::new("esq");
    opts.extra = vec!["--workers".into(), "2".into()];
    let m = Mesh::start(opts);
    let echo = echo_server(&m.nodes.server, "0.0.0.0:5201");
    let start = Instant::now();
    for i in 0..1000 {
        if let Err(e) = small_echo(&m.nodes.client, 1024 + i % 512) {
            panic!("connection {i} of 1000 failed: {e}");
        }
    }
    eprintln!("1000 sequential connections took {:?}", start.elapsed());
    let seen = echo.records.wait_count(1000, LOG_WAIT);
    assert_eq!(seen, 1000, "the echo server saw {seen} connections");
    m.client
        .wait_log_count("direction=\"outbound\"", 1000, LOG_WAIT);
    let bad: Vec<String> = m
        .client
        .access()
        .into_iter()
        .filter(|l| !l.is("end", "closed"))
        .map(|l| l.raw)
        .collect();
    assert!(
        bad.is_empty(),
        "connections that did not close cleanly:\n{}",
        bad.join("\n")
    );
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}

#[test]
fn two_hundred_concurrent_connections() {
    let mut opts = MeshOptions::new("ecc");
    opts.extra = vec!["--workers".into(), "2".into()];
    let m = Mesh::start(opts);
    let _echo = echo_server(&m.nodes.server, "0.0.0.0:5201");
    const N: usize = 200;
    // All connections are open at once (more than the 100 streams one pooled HTTP/2
    // connection carries) before any data flows.
    let barrier = Arc::new(Barrier::new(N));
    let client = &m.nodes.client;
    let results: Vec<Result<(), String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let barrier = barrier.clone();
                sc.spawn(move || {
                    let conn = connect_in(client, "10.96.0.10:80");
                    barrier.wait();
                    let mut s = conn.map_err(|e| format!("#{i} connect: {e}"))?;
                    let mut data = vec![0u8; 16 * 1024 + i];
                    Pattern::new().fill(&mut data);
                    s.write_all(&data).map_err(|e| format!("#{i} write: {e}"))?;
                    s.shutdown(Shutdown::Write)
                        .map_err(|e| format!("#{i} shutdown: {e}"))?;
                    let (back, end) = read_to_end_or_error(&mut s);
                    end.map_err(|e| format!("#{i} read after {} bytes: {e}", back.len()))?;
                    if sha256_hex(&back) != sha256_hex(&data) {
                        return Err(format!("#{i} echo differs"));
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {N} concurrent connections failed: {failed:?}",
        failed.len()
    );
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}

/// The default config with the server's first IP replaced by an invalid one; returns the text
/// and the 1-based line of the error.
fn broken_config() -> (String, usize) {
    let text = mesh_config(&["/10.96.0.10"], false).replace("\"10.77.0.2\"", "\"10.77.0.300\"");
    let line = text
        .lines()
        .position(|l| l.contains("10.77.0.300"))
        .expect("the broken line")
        + 1;
    (text, line)
}

#[test]
fn check_config_points_at_file_line_and_field() {
    let dir = TempDir::new("cfg");
    let good = dir.join("good.yaml");
    write_atomic(&good, &mesh_config(&["/10.96.0.10"], false));
    let out = std::process::Command::new(ringtun_bin())
        .arg("check-config")
        .arg(&good)
        .output()
        .expect("run check-config");
    assert!(
        out.status.success(),
        "good config refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (text, line) = broken_config();
    let bad = dir.join("bad.yaml");
    write_atomic(&bad, &text);
    let out = std::process::Command::new(ringtun_bin())
        .arg("check-config")
        .arg(&bad)
        .output()
        .expect("run check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let at = format!("{}:{line}:", bad.display());
    assert!(stderr.contains(&at), "expected {at:?} in: {stderr}");
    assert!(
        stderr.contains("workloads[1].workloadIps[0]"),
        "expected the field path in: {stderr}"
    );

    // A missing required field, reported with its parent's path.
    let text = mesh_config(&["/10.96.0.10"], false)
        .replace("  ports:\n    80: 5201\npolicies", "policies");
    write_atomic(&bad, &text);
    let out = std::process::Command::new(ringtun_bin())
        .arg("check-config")
        .arg(&bad)
        .output()
        .expect("run check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains(&format!("{}:", bad.display())), "{stderr}");
    assert!(
        stderr.contains("services[0]") && stderr.contains("ports"),
        "{stderr}"
    );
}

#[test]
fn run_refuses_a_bad_config() {
    let ns = netns("ebc");
    let dir = TempDir::new("ebc");
    gen_certs(dir.path(), "cluster.local", &["default/client"]);
    let (text, line) = broken_config();
    let bad = dir.join("bad.yaml");
    write_atomic(&bad, &text);
    let (chain, key) = cert_paths(dir.path(), "default/client");
    let mut child = ns
        .exec(ringtun_bin())
        .arg("run")
        .arg("--config")
        .arg(&bad)
        .arg("--cert-chain")
        .arg(&chain)
        .arg("--key")
        .arg(&key)
        .arg("--roots")
        .arg(dir.join("ca.pem"))
        .args(["--workload", "default/client"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringtun run");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ringtun run kept running with an invalid config");
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let stderr = strip_ansi(&stderr);
    assert!(!status.success(), "exit status {status}; stderr: {stderr}");
    assert!(
        !stderr.contains("ringtun ready"),
        "it must not get ready: {stderr}"
    );
    let at = format!("{}:{line}:", bad.display());
    assert!(stderr.contains(&at), "expected {at:?} in: {stderr}");
    assert!(stderr.contains("workloads[1].workloadIps[0]"), "{stderr}");
}

#[test]
fn hot_reload_keeps_live_connections_and_survives_bad_configs() {
    let m = Mesh::start(MeshOptions::new("ehr"));
    let _echo = echo_server(&m.nodes.server, "0.0.0.0:5201");
    let client = &m.nodes.client;
    let long = transfer_with(client, "10.96.0.10:80", 32 * MIB, |_| {
        // Halfway through the long transfer: add a VIP.
        write_atomic(
            &m.config,
            &mesh_config(&["/10.96.0.10", "/10.96.0.11"], false),
        );
        m.client.wait_log_count("config reloaded", 1, LOG_WAIT);
        // "config reloaded" is logged when the new config is handed to the shards, which apply
        // it a moment later: allow a few attempts.
        let local = echo_eventually(client, "10.96.0.11:80", MIB as usize, LOG_WAIT);
        let line = m.client.wait_access("for the new VIP", LOG_WAIT, |l| {
            l.is("src.addr", &local.to_string())
        });
        assert_outbound(&line, MIB);
        assert!(line.is("dst.service", SERVICE_HOST), "{}", line.raw);

        // An invalid config is reported and the previous one stays in force.
        let (bad, bad_line) = broken_config();
        write_atomic(&m.config, &bad);
        let log = m.client.wait_log_count("config reload failed", 1, LOG_WAIT);
        let failed = log
            .lines()
            .find(|l| l.contains("config reload failed"))
            .unwrap_or_default();
        assert!(
            failed.contains(&format!("{}:{bad_line}:", m.config.display())),
            "the reload error should point at the file and line: {failed}"
        );
        assert!(m.client.is_alive(), "ringtun exited on a bad config");
        echo_ok(client, "10.96.0.11:80", MIB);
        echo_ok(client, "10.96.0.10:80", MIB);
    })
    .expect("long transfer across reloads");
    assert_eq!(long.received, 32 * MIB);
    assert_eq!(
        long.sha_sent, long.sha_received,
        "live transfer corrupted by the reload"
    );
    let line = outbound_line(&m, &long, "for the long transfer");
    assert_outbound(&line, 32 * MIB);
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}

#[test]
fn idle_limit_cuts_only_quiet_connections() {
    let mut opts = MeshOptions::new("eit");
    opts.extra
        .extend(["--idle-timeout-ms".to_string(), "800".to_string()]);
    let m = Mesh::start(opts);
    let _echo = echo_server(&m.nodes.server, "0.0.0.0:5201");
    let client = &m.nodes.client;
    let mut quiet = connect_in(client, "10.96.0.10:80").expect("connect");
    let mut busy = connect_in(client, "10.96.0.10:80").expect("connect");
    let mut buf = [0u8; 64];
    for s in [&mut quiet, &mut busy] {
        s.write_all(b"hello").expect("write");
        s.read_exact(&mut buf[..5]).expect("echo");
    }
    // The busy one moves a byte every 200 ms for 2.4 s; the quiet one moves nothing.
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(200));
        busy.write_all(b"x").expect("busy connection still open");
        busy.read_exact(&mut buf[..1]).expect("busy echo");
    }
    match quiet.read(&mut buf) {
        Ok(0) => {}
        Err(e) if is_reset(&e) => {}
        other => panic!("the quiet connection should have been cut: {other:?}"),
    }
    // Both ringtuns run the same limit; whichever notices first cuts it, the other sees the
    // reset. The first connection cut for idleness is the quiet one (5 bytes each way), not the
    // busy one (17).
    let idle_cut = |l: &AccessLine| l.get("error").is_some_and(|r| r.contains("idle for"));
    let deadline = Instant::now() + LOG_WAIT;
    let line = loop {
        let lines: Vec<AccessLine> = m
            .client
            .access()
            .into_iter()
            .chain(m.server.access())
            .collect();
        if let Some(l) = lines.iter().find(|l| idle_cut(l)) {
            break l.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no connection was cut for idleness"
        );
        std::thread::sleep(Duration::from_millis(25));
    };
    assert!(line.is("end", "error"), "{}", line.raw);
    assert_eq!(line.num("bytes_sent"), 5, "the quiet one: {}", line.raw);
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}
