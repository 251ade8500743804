//! kTLS end to end: two ringtuns in two network namespaces, a checksummed echo through the
//! service VIP, and the record layer each side reports in its access log.
//!
//! Where kTLS is missing (the dev host's kernel has no `CONFIG_TLS`) the same tests run the
//! userspace fallback: `--ktls auto` announces it and every connection logs
//! `tls=userspace`. Inside the kTLS VM (`deploy/vm/test-engine-ktls.sh`) they run with
//! `RINGTUN_EXPECT_KTLS=1`: the kTLS sides then get `--ktls on` (so a missing kTLS fails the
//! start instead of falling back), and the tests assert `tls=ktls ktls.tx=true ktls.rx=true`
//! and rising `/proc/net/tls_stat` counters in each namespace.
//!
//! Sizes are for the VM's emulated CPU (about 4 MiB/s of AES-GCM per direction):
//! `RINGTUN_KTLS_E2E_MIB` (default 8) each way for the both-sides test, a quarter of that for
//! the one-sided ones.
//!
//! Like the other netns tests these need root and fail without it.

mod common;

use std::io::{Read as _, Write as _};
use std::time::Duration;

use common::*;
use ringtun_testbed::{Netns, DEFAULT_MARK};

const MIB: u64 = 1 << 20;
const LOG_WAIT: Duration = Duration::from_secs(30);
const VIP: &str = "10.96.0.10:80";

/// Whether the run must prove kTLS (set inside the VM).
fn expect_ktls() -> bool {
    std::env::var("RINGTUN_EXPECT_KTLS").is_ok_and(|v| v == "1")
}

fn bulk_mib() -> u64 {
    std::env::var("RINGTUN_KTLS_E2E_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(8)
}

/// `--ktls` for a side that should offload: `on` where kTLS must be proven, else `auto`.
fn want_ktls() -> Vec<String> {
    let mode = if expect_ktls() { "on" } else { "auto" };
    vec!["--ktls".into(), mode.into()]
}

fn no_ktls() -> Vec<String> {
    vec!["--ktls".into(), "off".into()]
}

/// The two-node mesh with per-side arguments (the shared `Mesh::start` gives both the same).
fn mesh(prefix: &'static str, client_extra: Vec<String>, server_extra: Vec<String>) -> Mesh {
    let (nodes, dir, config) = mesh_files(prefix, &mesh_config(&["/10.96.0.10"], false), |_| {});
    nodes
        .client
        .capture_outbound(15001, DEFAULT_MARK)
        .expect("outbound capture");
    let base = ["--workers", "1"].map(String::from);
    let side = |ns: &Netns, who: &str, extra: Vec<String>| {
        let mut args: Vec<String> = base.to_vec();
        args.extend(extra);
        Ringtun::start_as(ns, who, dir.path(), &config, args)
    };
    let server = side(&nodes.server, "server", server_extra);
    let client = side(&nodes.client, "client", client_extra);
    Mesh {
        client,
        server,
        nodes,
        config,
        dir,
    }
}

/// What a ringtun's startup log says about kTLS: true when it will offload. With
/// `RINGTUN_EXPECT_KTLS=1` a side started for kTLS must have it.
fn announced_ktls(r: &Ringtun, started_for_ktls: bool) -> bool {
    // The readiness endpoint can answer a moment before the "ringtun ready" line is written.
    r.wait_line(&["ringtun ready"], Duration::from_secs(10));
    let log = r.log();
    let line = log
        .lines()
        .find(|l| {
            l.contains("kTLS available") || l.contains("kTLS unavailable") || l.contains("kTLS off")
        })
        .unwrap_or_else(|| panic!("ringtun ({}) logged nothing about kTLS:\n{log}", r.name))
        .to_owned();
    let ready = log
        .lines()
        .find(|l| l.contains("ringtun ready"))
        .unwrap_or_default();
    let on = line.contains("kTLS available");
    assert_eq!(
        ready.contains("tls=\"ktls\"") || ready.contains("tls=ktls"),
        on,
        "ready line disagrees with the probe line: {ready} / {line}"
    );
    if !started_for_ktls {
        assert!(!on, "ringtun ({}) offloads with --ktls off: {line}", r.name);
    }
    if started_for_ktls && expect_ktls() {
        assert!(
            on,
            "RINGTUN_EXPECT_KTLS=1 but ringtun ({}) says: {line}",
            r.name
        );
    }
    on
}

/// Asserts the record layer an access line reports.
fn assert_tls(line: &AccessLine, ktls: bool) {
    let (name, flag) = if ktls {
        ("ktls", "true")
    } else {
        ("userspace", "false")
    };
    assert!(
        line.is("tls", name) && line.is("ktls.tx", flag) && line.is("ktls.rx", flag),
        "expected tls={name} ktls.tx={flag} ktls.rx={flag}: {}",
        line.raw
    );
}

/// `/proc/net/tls_stat` of a namespace as name → value (empty without kTLS).
fn tls_stat(ns: &Netns) -> std::collections::HashMap<String, u64> {
    ns.run("cat", ["/proc/net/tls_stat"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// One checksummed echo of `n` bytes each way through the VIP; returns the outbound and
/// inbound access lines of that connection.
fn echo_via_vip(m: &Mesh, n: u64) -> (AccessLine, AccessLine) {
    // The inbound line names the client ringtun's own address (the peer), not the app's, so
    // it is found as the one inbound line this echo added.
    let inbound = |lines: &[AccessLine]| {
        lines
            .iter()
            .filter(|l| l.is("direction", "inbound"))
            .count()
    };
    let before = inbound(&m.server.access());
    let t = echo_ok(&m.nodes.client, VIP, n);
    eprintln!("{} KiB each way through {VIP} took {:?}", n / 1024, t.took);
    let suffix = format!(":{}", t.local.port());
    let out = m.client.wait_access("for the echo", LOG_WAIT, |l| {
        l.is("direction", "outbound") && l.get("src.addr").is_some_and(|a| a.ends_with(&suffix))
    });
    assert!(out.is("end", "closed"), "{}", out.raw);
    assert_eq!(out.num("bytes_sent"), n, "{}", out.raw);
    assert_eq!(out.num("bytes_recv"), n, "{}", out.raw);
    let lines = m
        .server
        .wait_access_all("for the echo", LOG_WAIT, |l| inbound(l) > before);
    let inb = lines
        .into_iter()
        .filter(|l| l.is("direction", "inbound"))
        .nth(before)
        .expect("the echo's inbound line");
    assert!(inb.is("end", "closed"), "{}", inb.raw);
    assert_eq!(inb.num("bytes_sent"), n, "{}", inb.raw);
    (out, inb)
}

#[test]
fn ktls_both_sides() {
    let m = mesh("kb", want_ktls(), want_ktls());
    let client_on = announced_ktls(&m.client, true);
    let server_on = announced_ktls(&m.server, true);
    let before = (tls_stat(&m.nodes.client), tls_stat(&m.nodes.server));
    let _echo = echo_server(&m.nodes.server, "0.0.0.0:5201");

    let n = bulk_mib() * MIB;
    let (out, inb) = echo_via_vip(&m, n);
    assert_tls(&out, client_on);
    assert_tls(&inb, server_on);
    // A second stream rides the pooled connection and reports its record layer too.
    let (out2, inb2) = echo_via_vip(&m, MIB / 4);
    assert!(out2.is("pool", "reused"), "{}", out2.raw);
    assert_tls(&out2, client_on);
    assert_tls(&inb2, server_on);

    let after = (tls_stat(&m.nodes.client), tls_stat(&m.nodes.server));
    for ((b, a), (on, side)) in [(&before.0, &after.0), (&before.1, &after.1)]
        .into_iter()
        .zip([(client_on, "client"), (server_on, "server")])
    {
        let rose = |k: &str| a.get(k).copied().unwrap_or(0) > b.get(k).copied().unwrap_or(0);
        if on {
            assert!(
                rose("TlsTxSw") && rose("TlsRxSw"),
                "{side}: /proc/net/tls_stat did not count an offloaded socket: {b:?} -> {a:?}"
            );
            assert_eq!(
                a.get("TlsDecryptError").copied().unwrap_or(0),
                0,
                "{side}: {a:?}"
            );
        } else {
            assert!(
                !rose("TlsTxSw"),
                "{side} offloaded without saying so: {a:?}"
            );
        }
    }
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}

/// kTLS on one side, userspace rustls (`--ktls off`) on the other: the two record layers
/// interoperate, each side reports its own.
fn one_side(prefix: &'static str, client_ktls: bool) {
    let (c, s) = if client_ktls {
        (want_ktls(), no_ktls())
    } else {
        (no_ktls(), want_ktls())
    };
    let m = mesh(prefix, c, s);
    let client_on = announced_ktls(&m.client, client_ktls);
    let server_on = announced_ktls(&m.server, !client_ktls);
    let _echo = echo_server(&m.nodes.server, "0.0.0.0:5201");
    let n = (bulk_mib() * MIB / 4).max(MIB);
    let (out, inb) = echo_via_vip(&m, n);
    assert_tls(&out, client_on);
    assert_tls(&inb, server_on);
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}

#[test]
fn ktls_client_side_only() {
    one_side("kc", true);
}

#[test]
fn ktls_server_side_only() {
    one_side("ks", false);
}

/// A per-shard counter from the metrics endpoint of the ringtun in `ns`, summed over shards.
fn counter(ns: &Netns, name: &str) -> u64 {
    let mut s = connect_in(ns, "127.0.0.1:15020").expect("metrics port");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: ringtun\r\nConnection: close\r\n\r\n")
        .expect("metrics request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("metrics answer");
    let prefix = format!("{name}_total{{shard=");
    let values: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(!values.is_empty(), "no {name} in /metrics:\n{text}");
    values.iter().sum()
}

/// With a tiny TX record budget, offloaded connections retire (the client's pool stops
/// using them, the server sends GOAWAY) and later streams open new connections; no stream
/// is lost on the way. On userspace rustls the budget does not apply and every stream after
/// the first reuses the connection.
#[test]
fn ktls_key_budget_retires_connections() {
    let budget = ["--ktls-tx-record-limit", "24"].map(String::from);
    let mut c = want_ktls();
    c.extend(budget.clone());
    let mut s = want_ktls();
    s.extend(budget);
    let m = mesh("kr", c, s);
    let on = announced_ktls(&m.client, true) && announced_ktls(&m.server, true);
    let _echo = echo_server(&m.nodes.server, "0.0.0.0:5201");
    let mut new_conns = 0;
    for _ in 0..6 {
        let (out, inb) = echo_via_vip(&m, 256 * 1024);
        assert_tls(&out, on);
        assert_tls(&inb, on);
        if out.is("pool", "new") {
            new_conns += 1;
        }
    }
    if on {
        assert!(
            new_conns >= 2,
            "retired connections should have made later streams open new ones ({new_conns} new)"
        );
        for r in [&m.client, &m.server] {
            assert!(
                r.log().contains("retiring the HBONE connection"),
                "ringtun ({}) never retired a connection:\n{}",
                r.name,
                r.log()
            );
        }
    } else {
        assert_eq!(new_conns, 1, "userspace connections are reused");
    }
    // Each side reports what its log says: retirements, and no connection lost on the way.
    for ns in [&m.nodes.client, &m.nodes.server] {
        let retired = counter(ns, "ringtun_ktls_retired_connections");
        assert_eq!(
            retired > 0,
            on,
            "ringtun_ktls_retired_connections: {retired}"
        );
        assert_eq!(counter(ns, "ringtun_ktls_failed_connections"), 0);
    }
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}

/// With a tiny RX record budget (and the TX one at its default), a long transfer over
/// offloaded connections completes intact while its connection is retired on the receiving
/// side: the client's pool stops using it and the server sends GOAWAY, so the next stream
/// opens a new connection. This is what keeps a peer's KeyUpdate (a rustls peer sends one
/// after 2^24 records, which a kernel before 6.14 cannot follow) from ever reaching a
/// connection that still takes streams. On 6.14 and later, where the KeyUpdate would be
/// followed (`ktls_records.rs` shows it), the connection is retired all the same, and the log
/// line says which of the two the connection would have faced. On userspace rustls the
/// budget does not apply.
#[test]
fn ktls_rx_key_budget_retires_connections() {
    let budget = ["--ktls-rx-record-limit", "16"].map(String::from);
    let mut c = want_ktls();
    c.extend(budget.clone());
    let mut s = want_ktls();
    s.extend(budget);
    let m = mesh("kx", c, s);
    let on = announced_ktls(&m.client, true) && announced_ktls(&m.server, true);
    let _echo = echo_server(&m.nodes.server, "0.0.0.0:5201");
    // 1 MiB each way is at least 64 full records in each direction: both sides pass 16
    // while the stream runs, and the echo must still come back checksummed and whole.
    let (out, inb) = echo_via_vip(&m, MIB);
    assert_tls(&out, on);
    assert_tls(&inb, on);
    assert!(out.is("pool", "new"), "{}", out.raw);
    let (out2, inb2) = echo_via_vip(&m, 64 * 1024);
    assert_tls(&out2, on);
    assert_tls(&inb2, on);
    if on {
        assert!(
            out2.is("pool", "new"),
            "the first connection was retired, so the next stream needs a new one: {}",
            out2.raw
        );
        for r in [&m.client, &m.server] {
            let log = r.log();
            assert!(
                log.contains("records under the peer's key")
                    && log.contains("retiring the HBONE connection"),
                "ringtun ({}) never retired a connection on received records:\n{log}",
                r.name
            );
            assert!(
                !log.contains("TX key used for"),
                "ringtun ({}) retired on the TX budget, which is at its default:\n{log}",
                r.name
            );
            let why = if tls_kernel_offload::probe().rekey {
                "which ringtun would follow"
            } else {
                "which this connection could not follow"
            };
            assert!(
                log.contains(why),
                "ringtun ({}) misnames what a KeyUpdate would do here ({why}):\n{log}",
                r.name
            );
        }
    } else {
        assert!(out2.is("pool", "reused"), "{}", out2.raw);
    }
    for ns in [&m.nodes.client, &m.nodes.server] {
        let retired = counter(ns, "ringtun_ktls_retired_connections");
        assert_eq!(
            retired > 0,
            on,
            "ringtun_ktls_retired_connections: {retired}"
        );
        assert_eq!(counter(ns, "ringtun_ktls_failed_connections"), 0);
    }
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}
