//! ringtun against independent HBONE peers (`tests/peers/`, Python `ssl` + `h2`), which share no
//! code with it: the Python client against ringtun's inbound (200 and echo, refused
//! certificates, 400, 503), and ringtun's outbound against the Python server (what the CONNECT
//! request carries: authority, forwarded, baggage, traceparent, client identity).
//!
//! Each test builds its own namespaces; they need root and fail without it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use ringtun_testbed::DEFAULT_MARK;

const MIB: u64 = 1 << 20;
const LOG_WAIT: Duration = Duration::from_secs(10);

/// The server side alone (see [`ServerOnly`]), where the Python client plays the client.
type Inbound = ServerOnly;

impl Inbound {
    fn with_other_domain(prefix: &'static str) -> Inbound {
        ServerOnly::start_with(prefix, |dir| {
            // An identity in another trust domain signed by the same CA. gen-certs names files
            // by namespace and service account only, so it is issued first and moved aside.
            gen_certs(dir.path(), "other.example", &["default/client"]);
            for ext in ["pem", "key"] {
                std::fs::rename(
                    dir.join(&format!("default.client.{ext}")),
                    dir.join(&format!("otherdomain.client.{ext}")),
                )
                .expect("move the other-domain certificate aside");
            }
        })
    }

    /// Runs the Python client in the client namespace against 10.77.0.2:15008 with the
    /// certificate `cert_dir/NAME.pem` (+ `.key`), verifying the server with our CA.
    fn client(&self, cert_dir: &Path, name: &str, args: &[&str]) -> PeerRun {
        let cert = cert_dir.join(format!("{name}.pem"));
        let key = cert_dir.join(format!("{name}.key"));
        let ca = self.dir.join("ca.pem");
        let mut all: Vec<String> = vec![
            "--connect".into(),
            "10.77.0.2:15008".into(),
            "--cert".into(),
            cert.to_string_lossy().into_owned(),
            "--key".into(),
            key.to_string_lossy().into_owned(),
            "--ca".into(),
            ca.to_string_lossy().into_owned(),
            "--timeout".into(),
            "20".into(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        python_client(&self.nodes.client, &refs)
    }
}

#[test]
fn python_client_good_certificate_gets_200_and_exact_echo() {
    let t = Inbound::with_other_domain("pyg");
    let run = t.client(
        t.dir.path(),
        "default.client",
        &["--authority", "10.77.0.2:5201", "--bytes", "8388608"],
    );
    assert_eq!(run.code, Some(0), "{run}");
    let tls = run.event("tls").expect("tls line");
    assert_eq!(tls["version"], "TLSv1.3", "{run}");
    assert_eq!(tls["alpn"], "h2", "{run}");
    assert_eq!(
        tls["server_identities"],
        serde_json::json!([SERVER_ID]),
        "{run}"
    );
    let response = run.event("response").expect("response");
    assert_eq!(response["status"], 200);
    // As a real ztunnel answers for the same config entry (e2e_ztunnel_wire checks it): the
    // destination's namespace and workload name, under ztunnel's key for an entry without a
    // workload type.
    assert!(
        response["headers"]
            .as_array()
            .is_some_and(|h| h.contains(&serde_json::json!([
                "baggage",
                "k8s.namespace.name=default,k8s..name=server"
            ]))),
        "{run}"
    );
    let result = run.event("result").expect("result line");
    assert_eq!(result["bytes_received"], 8 * MIB, "{run}");
    assert_eq!(result["sha256_sent"], result["sha256_received"], "{run}");
    let sha = result["sha256_sent"].as_str().expect("sha").to_owned();
    let seen = t
        .echo
        .records
        .wait_for(LOG_WAIT, |r| r.sha256 == sha)
        .expect("the echo server saw the bytes");
    assert_eq!(seen.bytes, 8 * MIB);
    let line = t.server.wait_access("inbound from python", LOG_WAIT, |l| {
        l.is("direction", "inbound")
    });
    assert!(line.is("src.identity", CLIENT_ID), "{}", line.raw);
    assert!(line.is("dst.identity", SERVER_ID), "{}", line.raw);
    assert!(line.is("dst.hbone_addr", "10.77.0.2:5201"), "{}", line.raw);
    assert_eq!(line.num("bytes_recv"), 8 * MIB, "{}", line.raw);
    assert!(line.is("end", "closed"), "{}", line.raw);
    t.server.assert_no_panic();
}

#[test]
fn python_client_certificate_from_another_ca_is_refused() {
    let t = Inbound::with_other_domain("pyc");
    let other = TempDir::new("pyc-other-ca");
    gen_certs(other.path(), "cluster.local", &["default/client"]);
    let run = t.client(
        other.path(),
        "default.client",
        &["--authority", "10.77.0.2:5201"],
    );
    assert_eq!(run.code, Some(3), "expected a refused handshake: {run}");
    assert!(run.event("response").is_none(), "{run}");
    assert!(
        t.echo.records.all().is_empty(),
        "nothing may reach the workload"
    );
    t.server.assert_no_panic();
}

#[test]
fn python_client_identity_in_another_trust_domain_is_refused() {
    let t = Inbound::with_other_domain("pyt");
    let run = t.client(
        t.dir.path(),
        "otherdomain.client",
        &["--authority", "10.77.0.2:5201"],
    );
    assert_eq!(run.code, Some(3), "expected a refused handshake: {run}");
    assert!(run.event("response").is_none(), "{run}");
    assert!(
        t.echo.records.all().is_empty(),
        "nothing may reach the workload"
    );
    t.server.assert_no_panic();
}

#[test]
fn python_client_get_or_bad_authority_gets_400() {
    let t = Inbound::with_other_domain("pyb");
    let run = t.client(
        t.dir.path(),
        "default.client",
        &["--method", "GET", "--authority", "10.77.0.2:5201"],
    );
    assert_eq!(run.code, Some(4), "{run}");
    assert_eq!(
        run.event("response").expect("response")["status"],
        400,
        "{run}"
    );
    let run = t.client(
        t.dir.path(),
        "default.client",
        &["--authority", "server.default.svc.cluster.local"],
    );
    assert_eq!(run.code, Some(4), "{run}");
    assert_eq!(
        run.event("response").expect("response")["status"],
        400,
        "{run}"
    );
    t.server.assert_no_panic();
}

#[test]
fn python_client_refusals_carry_ztunnels_status_codes() {
    let t = Inbound::with_other_domain("pyu");
    // Another address than the one the connection reached (the client workload's, an unknown
    // one): 400, ztunnel's IPMismatch. One of ringtun's own ports: 503, ztunnel's SelfCall.
    for (authority, status) in [
        ("10.77.0.1:5201", 400),
        ("10.99.0.1:80", 400),
        ("10.77.0.2:15008", 503),
        ("10.77.0.2:15001", 503),
    ] {
        let run = t.client(t.dir.path(), "default.client", &["--authority", authority]);
        assert_eq!(run.code, Some(4), "{authority}: {run}");
        assert_eq!(
            run.event("response").expect("response")["status"],
            status,
            "{authority}: {run}"
        );
    }
    t.server.assert_no_panic();
}

/// The value of request header `name` in a python server report stream.
fn header<'a>(stream: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    stream["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0] == name)
        .and_then(|h| h[1].as_str())
}

fn assert_traceparent(tp: &str) {
    let parts: Vec<&str> = tp.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    assert!(
        parts.len() == 4
            && parts[0] == "00"
            && hex(parts[1], 32)
            && hex(parts[2], 16)
            && parts[3] == "01",
        "traceparent {tp:?} is not 00-<32 hex>-<16 hex>-01"
    );
    assert!(
        parts[1].bytes().any(|b| b != b'0') && parts[2].bytes().any(|b| b != b'0'),
        "traceparent {tp:?} has an all-zero id (invalid per W3C)"
    );
}

#[test]
fn ringtun_outbound_to_python_server_sends_a_proper_connect() {
    let (nodes, dir, config) = mesh_files("pys", &mesh_config(&["/10.96.0.10"], false), |_| {});
    nodes
        .client
        .capture_outbound(15001, DEFAULT_MARK)
        .expect("outbound capture");
    let py = PythonServer::start(&nodes.server, dir.path(), "default/server", "*:15008");
    let client = Ringtun::start_as(&nodes.client, "client", dir.path(), &config, one_worker());

    let via_vip = echo_ok(&nodes.client, "10.96.0.10:80", 4 * MIB);
    let via_pod = echo_ok(&nodes.client, "10.77.0.2:5201", MIB);
    for (t, via_service) in [(&via_vip, true), (&via_pod, false)] {
        let (conn, stream) = py.wait_stream(&t.sha_sent, LOG_WAIT);
        let ctx = format!("connection {conn:#}");
        assert_eq!(
            conn["peer_identities"],
            serde_json::json!([CLIENT_ID]),
            "{ctx}"
        );
        assert_eq!(conn["tls_version"], "TLSv1.3", "{ctx}");
        assert_eq!(conn["alpn"], "h2", "{ctx}");
        assert!(
            conn["peer_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("10.77.0.1:")),
            "{ctx}"
        );
        assert_eq!(stream["method"], "CONNECT", "{ctx}");
        assert_eq!(stream["authority"], "10.77.0.2:5201", "{ctx}");
        assert_eq!(stream["end"], "end_stream", "{ctx}");
        assert_eq!(stream["bytes_received"], t.sent, "{ctx}");
        assert_eq!(stream["sha256_sent"].as_str(), Some(t.sha_sent.as_str()));

        let fwd = header(&stream, "forwarded").unwrap_or_else(|| panic!("no forwarded: {ctx}"));
        let want_for = format!("for=\"{}\"", t.local);
        assert!(
            fwd.starts_with(&want_for),
            "forwarded {fwd:?}, want {want_for}…"
        );
        let want_host = format!(";host={SERVICE_HOST}");
        if via_service {
            assert!(
                fwd.contains(&want_host),
                "forwarded {fwd:?} lacks {want_host}"
            );
        } else {
            assert!(
                !fwd.contains("host="),
                "forwarded {fwd:?}: no service was dialled"
            );
        }
        let baggage = header(&stream, "baggage").unwrap_or_else(|| panic!("no baggage: {ctx}"));
        assert!(
            baggage
                .split(',')
                .any(|kv| kv.trim() == "k8s.namespace.name=default"),
            "baggage {baggage:?}"
        );
        let tp = header(&stream, "traceparent").unwrap_or_else(|| panic!("no traceparent: {ctx}"));
        assert_traceparent(tp);
    }
    // The second CONNECT rode the same (pooled) TLS connection.
    let report = py.report();
    let streams: usize = report["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["streams"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(streams, 2, "{report:#}");
    assert_eq!(
        report["connections"].as_array().map(Vec::len),
        Some(1),
        "both CONNECTs should share one pooled connection: {report:#}"
    );
    assert!(report["tls_errors"].as_array().is_some_and(Vec::is_empty));
    client.assert_no_panic();
}

/// The client ringtun in front of a Python HBONE server that ends every echoed stream with
/// RST_STREAM(`code`) instead of END_STREAM; returns what an app sending `n` bytes saw.
fn echo_through_resetting_server(prefix: &'static str, code: u32, n: u64) -> Transfer {
    let (nodes, dir, config) = mesh_files(prefix, &mesh_config(&["/10.96.0.10"], false), |_| {});
    nodes
        .client
        .capture_outbound(15001, DEFAULT_MARK)
        .expect("outbound capture");
    let code_arg = code.to_string();
    let py = PythonServer::start_with(
        &nodes.server,
        dir.path(),
        "default/server",
        "*:15008",
        &["--end-with-reset", &code_arg],
    );
    let client = Ringtun::start_as(&nodes.client, "client", dir.path(), &config, one_worker());
    let t = match transfer(&nodes.client, "10.77.0.2:5201", n) {
        Ok(t) => t,
        Err(e) => Transfer {
            local: "0.0.0.0:0".parse().expect("addr"),
            sent: n,
            received: 0,
            sha_sent: String::new(),
            sha_received: format!("error: {e} ({:?})", e.kind()),
            took: Duration::ZERO,
        },
    };
    let (_, stream) = py.wait_stream_end(LOG_WAIT);
    assert_eq!(stream["end"], format!("sent_reset:{code}"), "{stream:#}");
    client.assert_no_panic();
    t
}

#[test]
fn a_peer_ending_with_any_reset_code_is_an_end_of_stream() {
    // RST_STREAM CANCEL (8) and NO_ERROR (0) after the echo: the app reads every byte and a
    // clean end of file, as ztunnel passes them on.
    for (prefix, code) in [("prc", 8), ("prn", 0)] {
        let t = echo_through_resetting_server(prefix, code, MIB);
        assert_eq!(t.received, MIB, "code {code}: {}", t.sha_received);
        assert_eq!(t.sha_sent, t.sha_received, "code {code}: echo intact");
    }
    // Any other code too, as ztunnel passes it on (tests/e2e_ztunnel_rst.rs compares the two).
    let t = echo_through_resetting_server("pri", 2, MIB);
    assert_eq!(t.received, MIB, "INTERNAL_ERROR: {}", t.sha_received);
    assert_eq!(t.sha_sent, t.sha_received, "INTERNAL_ERROR: echo intact");
}
