//! Operating ringtun, end to end in network namespaces: Prometheus metrics checked to the byte
//! and parsed by `prometheus_client`'s reference parsers (`tests/peers/prom_check.py`), L4
//! authorization on 15008 (401) and 15006 (reset) with dry-run policies, readiness and graceful
//! drain (SIGTERM, `/quitquitquit`, the drain deadline), the admin API (`/config_dump`,
//! `/logging`, loopback only), and HTTP/2 abuse from a client with a valid certificate
//! (`tests/peers/h2_abuse.py`: rapid reset, CONTINUATION flood, oversized headers, a reader that
//! stops reading) while other clients keep being served.
//!
//! Each test builds its own namespaces; they need root and fail without it.

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use ringtun_topology::{Netns, DEFAULT_MARK as MARK};

const MIB: u64 = 1 << 20;
const LOG_WAIT: Duration = Duration::from_secs(10);
const METRICS: &str = "http://127.0.0.1:15020/metrics";
const READY: &str = "127.0.0.1:15021";
const ADMIN: &str = "127.0.0.1:15000";
/// Identity of a third workload certificate (allowed where `default/client` is denied).
const OTHER_ID: &str = "spiffe://cluster.local/ns/default/sa/other";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Waits until ringtun says its metrics, readiness and admin endpoints are up (they start just
/// after `ringtun ready`).
fn wait_endpoints(r: &Ringtun) {
    r.wait_log_count("admin endpoints up", 1, LOG_WAIT);
}

/// One HTTP/1.1 exchange on an open connection; returns (status, body).
fn http_on(
    mut s: TcpStream,
    method: &str,
    path: &str,
    accept: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: ringtun\r\n{accept}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP head in {raw:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// An HTTP request to `addr` from inside `ns`.
fn http_in(ns: &Netns, addr: &str, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_on(connect_in(ns, addr)?, method, path, None)
}

/// `GET /healthz/ready` on the namespace's readiness port: its status.
fn readiness(ns: &Netns) -> u16 {
    http_in(ns, READY, "GET", "/healthz/ready")
        .unwrap_or_else(|e| panic!("readiness request in {}: {e}", ns.name()))
        .0
}

/// Connects to `dst` from inside `ns`, sends a few bytes and expects the connection to be
/// refused or torn down without a byte of answer (an echo server behind it would answer).
/// Returns how it ended, for messages.
fn expect_no_answer(ns: &Netns, dst: &str) -> String {
    match connect_in(ns, dst) {
        Err(e) => format!("connect: {e}"),
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("read timeout");
            let _ = s.write_all(b"anybody there?");
            let mut buf = [0u8; 1024];
            match s.read(&mut buf) {
                Ok(0) => "eof".into(),
                Ok(n) => panic!("{dst}: expected a refusal, got {n} bytes back"),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("{dst}: neither answered nor refused within 10 s")
                }
                Err(e) => format!("read: {e}"),
            }
        }
    }
}

/// One metric sample as `prom_check.py` reports it.
#[derive(Clone, Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// A parsed scrape: family name → type, and every sample.
struct Scrape {
    what: String,
    content_type: String,
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Scrape {
    /// Scrapes `/metrics` inside `ns` and parses it with `prometheus_client` (the OpenMetrics
    /// parser with `openmetrics`).
    fn take(ns: &Netns, openmetrics: bool) -> Scrape {
        let mut cmd = ns.exec("python3");
        cmd.arg(peers_dir().join("prom_check.py")).arg(METRICS);
        if openmetrics {
            cmd.arg("--openmetrics");
        }
        let out = cmd.output().expect("run python3 prom_check.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "prom_check.py (openmetrics={openmetrics}) in {} failed ({}): {stdout}\n{}",
            ns.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&stdout).expect("prom_check.py JSON");
        let mut types = HashMap::new();
        let mut samples = Vec::new();
        for f in v["families"].as_array().expect("families") {
            let name = f["name"].as_str().expect("family name").to_owned();
            types.insert(name, f["type"].as_str().unwrap_or_default().to_owned());
            for s in f["samples"].as_array().expect("samples") {
                samples.push(Sample {
                    name: s["name"].as_str().expect("sample name").to_owned(),
                    labels: s["labels"]
                        .as_object()
                        .expect("labels")
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect(),
                    value: s["value"].as_f64().expect("sample value"),
                });
            }
        }
        Scrape {
            what: format!(
                "{} scrape in {}",
                if openmetrics {
                    "OpenMetrics"
                } else {
                    "Prometheus"
                },
                ns.name()
            ),
            content_type: v["content_type"].as_str().unwrap_or_default().to_owned(),
            types,
            samples,
        }
    }

    /// Samples named `name` whose labels include every `(key, value)` of `want`.
    fn select(&self, name: &str, want: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && want
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// Sum of the samples [`Scrape::select`] picks.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.select(name, want).iter().map(|s| s.value).sum()
    }

    /// The value of the only sample named `name` with labels `want`; fails unless exactly one.
    fn one(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let found = self.select(name, want);
        assert_eq!(
            found.len(),
            1,
            "{}: expected exactly one {name} sample with {want:?}, found {found:#?}\nall {name} samples: {:#?}",
            self.what,
            self.select(name, &[])
        );
        found[0].value
    }

    fn assert_family(&self, family: &str, kind: &str) {
        assert_eq!(
            self.types.get(family).map(String::as_str),
            Some(kind),
            "{}: family {family} of type {kind} missing; families: {:?}",
            self.what,
            self.types
        );
    }
}

/// A server that reads everything a client sends, then answers with `reply` pattern bytes and
/// closes: the two directions carry different byte counts, so a swap shows.
fn reply_server(ns: &Netns, addr: &str, reply: u64) -> Arc<AtomicU64> {
    let listener = bind_in(ns, addr);
    let received = Arc::new(AtomicU64::new(0));
    let seen = received.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let seen = seen.clone();
            std::thread::spawn(move || {
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
        }
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

/// A server that writes pattern bytes as fast as each client takes them, forever; the counter
/// says how many bytes its writes have handed to the kernel.
fn source_server(ns: &Netns, addr: &str) -> Arc<AtomicU64> {
    let listener = bind_in(ns, addr);
    let written = Arc::new(AtomicU64::new(0));
    let count = written.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let count = count.clone();
            std::thread::spawn(move || {
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
        }
    });
    written
}

/// [`hbone_client`] with no extra arguments.
fn py_client(ns: &Netns, dir: &TempDir, cert: &str, authority: &str, bytes: u64) -> PeerRun {
    hbone_client(ns, dir, cert, authority, bytes, &[])
}

/// Asserts a python client run got a 200 and an exact echo of `bytes`.
fn assert_echoed(run: &PeerRun, bytes: u64) {
    assert_eq!(run.code, Some(0), "{run}");
    let result = run.event("result").expect("result line");
    assert_eq!(result["bytes_received"], bytes, "{run}");
    assert_eq!(result["sha256_sent"], result["sha256_received"], "{run}");
}

/// Runs `tests/peers/h2_abuse.py --mode MODE ARGS…` in `ns` against 10.77.0.2:15008 with the
/// client certificate.
fn h2_abuse(ns: &Netns, dir: &TempDir, mode: &str, args: &[&str]) -> PeerRun {
    let out = ns
        .exec("python3")
        .arg(peers_dir().join("h2_abuse.py"))
        .args(["--mode", mode, "--connect", "10.77.0.2:15008"])
        .arg("--cert")
        .arg(dir.join("default.client.pem"))
        .arg("--key")
        .arg(dir.join("default.client.key"))
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .args(args)
        .output()
        .expect("run python3 h2_abuse.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    PeerRun {
        code: out.status.code(),
        lines: stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("h2_abuse line {l:?}: {e}")))
            .collect(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The `result` line of an abuse run (which must have finished).
fn abuse_result(run: &PeerRun) -> serde_json::Value {
    assert_eq!(run.code, Some(0), "h2_abuse.py failed: {run}");
    run.event("result")
        .unwrap_or_else(|| panic!("no result line: {run}"))
        .clone()
}

/// Whether the server hung up on the abuser: GOAWAY, or the connection ended.
fn disconnected(result: &serde_json::Value) -> bool {
    !result["goaway"].is_null() || !result["closed"].is_null()
}

impl ServerOnly {
    fn start(prefix: &'static str) -> ServerOnly {
        ServerOnly::start_with(prefix, |_| {})
    }

    /// Runs an abuse mode while a normal client echoes `bytes` on its own connection; returns
    /// both runs. The normal client starts `head_start` after the abuser.
    fn abuse_while_serving(
        &self,
        mode: &str,
        args: &[&str],
        head_start: Duration,
        bytes: u64,
    ) -> (PeerRun, PeerRun) {
        std::thread::scope(|s| {
            let abuser = s.spawn(|| h2_abuse(&self.nodes.client, &self.dir, mode, args));
            std::thread::sleep(head_start);
            let normal = py_client(
                &self.nodes.client,
                &self.dir,
                "default.client",
                "10.77.0.2:5201",
                bytes,
            );
            (abuser.join().expect("abuser thread"), normal)
        })
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

// ---------------------------------------------------------------------------------------------
// 1. Metrics
// ---------------------------------------------------------------------------------------------

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
    assert_eq!(
        sc.one("istio_tcp_connections_failed_total", &vip),
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
    assert_eq!(
        sc.one("istio_tcp_connections_opened_total", &pod),
        1.0,
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
    assert_eq!(
        sc.sum("istio_tcp_connections_opened_total", &src),
        2.0,
        "{}: refused connections are not opened",
        sc.what
    );
    assert_eq!(
        sc.sum("istio_tcp_connections_closed_total", &src),
        2.0,
        "{}",
        sc.what
    );
    // The VIP port without endpoint and the unreachable workload port.
    assert_eq!(
        sc.sum("istio_tcp_connections_failed_total", &src),
        2.0,
        "{}: refused connections",
        sc.what
    );
    assert_eq!(
        sc.sum(
            "istio_tcp_connections_failed_total",
            &[
                ("reporter", "source"),
                ("destination_service", SERVICE_HOST),
                ("response_flags", "CONNECT")
            ]
        ),
        1.0,
        "{}: the VIP port without endpoint",
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
    assert_eq!(
        sc.sum("istio_tcp_connections_opened_total", &ok),
        2.0,
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
        2.0,
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
    let echo = EchoServer::start(&m.nodes.server, "0.0.0.0:5201");
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

// ---------------------------------------------------------------------------------------------
// 2. Authorization
// ---------------------------------------------------------------------------------------------

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
    let echo = EchoServer::start(&m.nodes.server, "0.0.0.0:5201");
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
    assert!(line.is("src.workload", "default/client"), "{}", line.raw);
    let reason = line.get("reason").unwrap_or_default();
    assert!(
        reason.starts_with("401") && reason.contains("default/deny-client"),
        "the reason names the status and the policy: {}",
        line.raw
    );
    let out = m
        .client
        .wait_access("with the refused connection", LOG_WAIT, |l| {
            l.is("direction", "outbound") && l.is("end", "error")
        });
    assert!(
        out.get("reason").is_some_and(|r| r.contains("401")),
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
    assert_eq!(line.num("bytes_received"), MIB, "{}", line.raw);
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

    // Plaintext (captured on 15006): no principal, so mtls-only does not allow it: reset.
    // The refusal is fast enough that the RST may arrive before connect returns (the connect
    // then fails with ECONNRESET) or before our write (the write gets ECONNRESET, the read end
    // of file). Whichever call sees it, the connection must have been reset, not closed.
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
                _ => panic!(
                    "plaintext without a principal: expected a reset, got write {wrote:?}, read {read:?}"
                ),
            }
        }
    }
    let line = m.server.wait_access("plaintext denied", LOG_WAIT, |l| {
        l.is("direction", "inbound-plaintext")
    });
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

// ---------------------------------------------------------------------------------------------
// 3. Readiness and drain
// ---------------------------------------------------------------------------------------------

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
    let echo = EchoServer::start(&m.nodes.server, "0.0.0.0:5201");
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
    let _echo = EchoServer::start(&m.nodes.server, "0.0.0.0:5201");
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

// ---------------------------------------------------------------------------------------------
// 4. Admin API
// ---------------------------------------------------------------------------------------------

#[test]
fn admin_config_dump_logging_and_loopback_only() {
    let m = Mesh::start(MeshOptions::new("opa"));
    wait_endpoints(&m.server);
    wait_endpoints(&m.client);
    let (client, server) = (&m.nodes.client, &m.nodes.server);

    let (st, body) = http_in(server, ADMIN, "GET", "/config_dump").expect("config_dump");
    assert_eq!(st, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("config_dump is not JSON ({e}): {body}"));
    let workloads = dump["workloads"].as_array().expect("workloads");
    let by_name = |n: &str| {
        workloads
            .iter()
            .find(|w| w["name"] == n)
            .unwrap_or_else(|| panic!("no workload {n} in {dump:#}"))
    };
    let w = by_name("server");
    assert_eq!(w["namespace"], "default", "{w:#}");
    assert_eq!(w["serviceAccount"], "server", "{w:#}");
    assert_eq!(w["workloadIps"], serde_json::json!(["10.77.0.2"]), "{w:#}");
    assert!(
        w["services"]
            .get(format!("default/{SERVICE_HOST}"))
            .is_some(),
        "{w:#}"
    );
    assert_eq!(
        by_name("client")["workloadIps"],
        serde_json::json!(["10.77.0.1"])
    );
    let services = dump["services"].as_array().expect("services");
    assert_eq!(services.len(), 1, "{dump:#}");
    let svc = &services[0];
    assert_eq!(svc["hostname"], SERVICE_HOST, "{svc:#}");
    assert!(
        svc["vips"].as_array().is_some_and(|v| v
            .iter()
            .any(|v| v.as_str().is_some_and(|v| v.ends_with("10.96.0.10")))),
        "{svc:#}"
    );
    assert_eq!(svc["ports"]["80"], 5201, "{svc:#}");
    assert_eq!(dump["policies"], serde_json::json!([]), "{dump:#}");
    let cert = &dump["certificates"][0];
    assert_eq!(cert["identity"], SERVER_ID, "{dump:#}");
    assert!(
        cert["notAfterUnix"]
            .as_u64()
            .is_some_and(|t| t > now_unix()),
        "certificate expiry in the future: {cert:#}"
    );
    assert_eq!(dump["shards"], 1, "{dump:#}");
    assert_eq!(dump["configGeneration"], 1, "{dump:#}");
    assert_eq!(dump["draining"], false, "{dump:#}");
    assert!(
        ["io_uring", "legacy"].contains(&dump["driver"].as_str().unwrap_or_default()),
        "{dump:#}"
    );
    let (_, body) = http_in(client, ADMIN, "GET", "/config_dump").expect("client config_dump");
    let cdump: serde_json::Value = serde_json::from_str(&body).expect("client config_dump JSON");
    assert_eq!(cdump["certificates"][0]["identity"], CLIENT_ID, "{cdump:#}");

    // /logging switches the filter live: a CONNECT to a closed port logs a DEBUG line only
    // while the level is debug.
    let (st, body) = http_in(server, ADMIN, "POST", "/logging").expect("logging");
    assert_eq!(st, 200, "POST /logging lists the filter: {body}");
    assert!(body.contains("current log filter: info"), "{body}");
    let (st, body) = http_in(server, ADMIN, "GET", "/logging").expect("logging");
    assert_eq!(
        st, 405,
        "every /logging request is a POST, as ztunnel's: {body}"
    );
    let (st, body) = http_in(server, ADMIN, "GET", "/logging?level=debug").expect("logging");
    assert_eq!(st, 405, "changes take a POST: {body}");
    let (st, body) = http_in(server, ADMIN, "GET", "/quitquitquit").expect("quitquitquit");
    assert_eq!(st, 405, "GET /quitquitquit must not drain: {body}");
    let (st, _) = http_in(server, READY, "GET", "/healthz/ready").expect("readiness");
    assert_eq!(st, 200, "still serving after GET /quitquitquit");
    let (st, body) = http_in(server, ADMIN, "POST", "/logging?level=debug").expect("logging");
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("debug"), "{body}");
    expect_no_answer(client, "10.77.0.2:5999");
    let log = m
        .server
        .wait_log_count("inbound: destination unreachable", 1, LOG_WAIT);
    let line = log
        .lines()
        .find(|l| l.contains("inbound: destination unreachable"))
        .expect("counted");
    assert!(line.contains("DEBUG"), "logged at debug: {line}");
    let (_, body) = http_in(server, ADMIN, "POST", "/logging").expect("logging");
    assert!(body.contains("current log filter: debug"), "{body}");
    // Back to the start-up filter.
    let (st, body) = http_in(server, ADMIN, "POST", "/logging?reset").expect("logging");
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("info"), "{body}");
    expect_no_answer(client, "10.77.0.2:5999");
    m.server
        .wait_access_all("for both refused CONNECTs", LOG_WAIT, |ls| {
            ls.iter()
                .filter(|l| l.is("direction", "inbound") && l.is("end", "error"))
                .count()
                >= 2
        });
    let n = m
        .server
        .log()
        .lines()
        .filter(|l| l.contains("inbound: destination unreachable"))
        .count();
    assert_eq!(n, 1, "back at info, the debug line is no longer written");

    // The admin API listens on loopback only; metrics and readiness on every address.
    let veth_admin: SocketAddr = "10.77.0.2:15000".parse().expect("addr");
    match connect_in(server, "10.77.0.2:15000") {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!("admin API reachable on the node address (from the node): {other:?}"),
    }
    match connect_marked_in(client, veth_admin, MARK) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!("admin API reachable from another node: {other:?}"),
    }
    let s = connect_marked_in(client, "10.77.0.2:15020".parse().expect("addr"), MARK)
        .expect("metrics port from another node");
    let (st, body) = http_on(s, "GET", "/metrics", None).expect("metrics");
    assert_eq!(st, 200);
    assert!(
        body.contains("istio_tcp_connections_opened_total"),
        "{body}"
    );
    // ... but the metrics port serves none of the admin API.
    for (method, path) in [("POST", "/quitquitquit"), ("GET", "/config_dump")] {
        let s = connect_marked_in(client, "10.77.0.2:15020".parse().expect("addr"), MARK)
            .expect("metrics port");
        let (st, _) = http_on(s, method, path, None).expect("request");
        assert_eq!(st, 404, "{method} {path} on the metrics port");
    }
    let s = connect_marked_in(client, "10.77.0.2:15021".parse().expect("addr"), MARK)
        .expect("readiness port from another node");
    let (st, _) = http_on(s, "GET", "/healthz/ready", None).expect("readiness");
    assert_eq!(st, 200, "still ready: nothing started a drain");
    m.server.assert_no_panic();
}

// ---------------------------------------------------------------------------------------------
// 5. HTTP/2 abuse
// ---------------------------------------------------------------------------------------------

#[test]
fn rapid_reset_flood_is_cut_off_while_others_are_served() {
    let t = ServerOnly::start("oar");
    let (flood, normal) = t.abuse_while_serving(
        "rapid-reset",
        &["--authority", "10.77.0.2:5201", "--count", "20000"],
        Duration::from_millis(200),
        4 * MIB,
    );
    let r = abuse_result(&flood);
    eprintln!("rapid reset: {r}");
    assert!(
        disconnected(&r),
        "the server kept serving a client that reset {} streams: {r}",
        r["streams_sent"]
    );
    assert_echoed(&normal, 4 * MIB);
    assert!(t.server.is_alive(), "ringtun died");
    t.server.assert_no_panic();
    // Still serving afterwards.
    let run = py_client(
        &t.nodes.client,
        &t.dir,
        "default.client",
        "10.77.0.2:5201",
        MIB,
    );
    assert_echoed(&run, MIB);
}

#[test]
fn continuation_flood_is_cut_off_while_others_are_served() {
    let t = ServerOnly::start("oac");
    // Many empty CONTINUATION frames, then large ones.
    for (frame_size, count) in [("0", "2000000"), ("4096", "20000")] {
        let (flood, normal) = t.abuse_while_serving(
            "continuation",
            &[
                "--authority",
                "10.77.0.2:5201",
                "--frame-size",
                frame_size,
                "--count",
                count,
            ],
            Duration::from_millis(200),
            4 * MIB,
        );
        let r = abuse_result(&flood);
        eprintln!("CONTINUATION flood of {frame_size}-byte frames: {r}");
        assert!(
            disconnected(&r),
            "the server took {} CONTINUATION frames of {frame_size} bytes without hanging up: {r}",
            r["continuation_frames_sent"]
        );
        assert!(
            r["continuation_frames_sent"].as_u64() < count.parse().ok(),
            "the server read the whole flood before hanging up: {r}"
        );
        assert_echoed(&normal, 4 * MIB);
        assert!(t.server.is_alive(), "ringtun died");
    }
    assert_eq!(
        t.echo.records.all().len(),
        2,
        "the flooded requests never reached the workload"
    );
    t.server.assert_no_panic();
}

#[test]
fn oversized_headers_are_refused_and_the_server_stays_up() {
    let t = ServerOnly::start("obh");
    // Control: a header block well under the 16 KiB limit is served.
    let run = h2_abuse(
        &t.nodes.client,
        &t.dir,
        "big-headers",
        &["--authority", "10.77.0.2:5201", "--header-bytes", "4000"],
    );
    let r = abuse_result(&run);
    assert_eq!(r["statuses"]["1"], 200, "a 4 KB header block is fine: {r}");
    t.echo.records.wait_count(1, LOG_WAIT);

    let run = h2_abuse(
        &t.nodes.client,
        &t.dir,
        "big-headers",
        &["--authority", "10.77.0.2:5201", "--header-bytes", "40000"],
    );
    let r = abuse_result(&run);
    eprintln!("oversized headers: {r}");
    assert_ne!(
        r["statuses"]["1"], 200,
        "a 40 KB header block was accepted: {r}"
    );
    assert!(
        !r["statuses"]["1"].is_null() || !r["rst"]["1"].is_null() || disconnected(&r),
        "the oversized request got no answer at all: {r}"
    );
    assert_eq!(
        t.echo.records.all().len(),
        1,
        "the oversized request never reached the workload"
    );
    assert!(t.server.is_alive(), "ringtun died");
    let run = py_client(
        &t.nodes.client,
        &t.dir,
        "default.client",
        "10.77.0.2:5201",
        MIB,
    );
    assert_echoed(&run, MIB);
    t.server.assert_no_panic();
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

#[test]
fn byte_counters_grow_while_a_connection_lives() {
    let m = Mesh::start(MeshOptions::new("obl"));
    let _echo = EchoServer::start(&m.nodes.server, "0.0.0.0:5201");
    let client = &m.nodes.client;
    let total = 4 * MIB;
    let (tx, rx) = mpsc::channel();
    let t = std::thread::scope(|s| {
        // 4 MiB in 32 steps of 128 KiB, 100 ms apart: about 3 s.
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
