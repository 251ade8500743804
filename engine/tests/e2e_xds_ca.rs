//! Certificates from istiod's CA, end to end, with the fake istiod (`tests/peers/fake_istiod.py`,
//! checked against the real ztunnel by `xds_fake_istiod_ztunnel.rs`): ringtun started with only
//! the control plane's address, its root and a token (no certificate file) carries checksummed
//! traffic over mutual TLS with CA-issued certificates on both sides; certificates issued for
//! 20 s are renewed at half their life while a long paced transfer runs (it completes intact,
//! a connection made after the renewal is served with the new certificate, the fake sees a
//! second CreateCertificate per identity); failed renewals are retried with backoff while the
//! valid certificate keeps serving; a trust bundle grown by a root reaches both proxies;
//! `/config_dump` and `/metrics` show the certificates and the fetches. The mixed mesh: ringtun and the real ztunnel, both with certificates from the
//! same fake istiod, each direction. And in-pod mode: each pod's certificate asked for on its
//! behalf (`ImpersonatedIdentity`), the node proxy's own without.

mod common;
mod inpod_common;
mod xds_common;

use std::time::Duration;

use common::*;
use inpod_common::node::{add_pod, capture_pod};
use inpod_common::{wait_ports, NodeAgent};
use ringtun_testbed::transfer::transfer_paced;
use ringtun_testbed::{Netns, Process, DEFAULT_MARK};
use serde_json::{json, Value};
use xds_common::*;

const MIB: u64 = 1 << 20;
/// Lifetime the fake gives every certificate: renewed 10 s after issue.
const TTL: u64 = 20;

/// The serial number (lower-case hex) of the certificate `addr` presents to a TLS client in
/// `ns`, as `openssl s_client` sees it (ringtun asks for a client certificate after sending its
/// own, so the handshake need not complete).
fn presented_serial(ns: &Netns, addr: &str) -> String {
    let out = ns
        .exec("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} -alpn h2 </dev/null 2>/dev/null | openssl x509 -noout -serial"
        ))
        .output()
        .expect("run openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    let serial = text
        .trim()
        .trim_start_matches("serial=")
        .to_ascii_lowercase();
    assert!(!serial.is_empty(), "no certificate from {addr}: {text}");
    serial.trim_start_matches('0').to_owned()
}

/// The serials the fake issued for `identity`, oldest first.
fn issued_serials(istiod: &FakeIstiod, identity: &str) -> Vec<String> {
    istiod
        .events()
        .into_iter()
        .filter(|e| e["event"] == "csr" && e["identity"] == identity)
        .map(|e| e["serial"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// A dumped certificate's leaf serial (ztunnel's decimal `serialNumber`) in the fake's
/// lower-case hex.
fn dumped_serial(cert: &Value) -> String {
    let decimal = cert["certChain"][0]["serialNumber"]
        .as_str()
        .unwrap_or_default();
    // Big-endian bytes, times ten plus each digit: serials are wider than any integer type.
    let mut be: Vec<u8> = Vec::new();
    for d in decimal.bytes() {
        let mut carry = u16::from(d - b'0');
        for b in be.iter_mut().rev() {
            let v = u16::from(*b) * 10 + carry;
            *b = v as u8;
            carry = v >> 8;
        }
        if carry > 0 {
            be.insert(0, carry as u8);
        }
    }
    let hex: String = be.iter().map(|b| format!("{b:02x}")).collect();
    hex.trim_start_matches('0').to_owned()
}

/// `/config_dump`'s certificate entry of `identity`, in `ns`.
fn dumped_certificate(ns: &Netns, identity: &str) -> Value {
    let (status, body) = http_in(ns, ADMIN, "GET", "/config_dump").expect("config_dump");
    assert_eq!(status, 200, "{body}");
    let dump: Value = serde_json::from_str(&body).expect("config_dump JSON");
    dump["certificates"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["identity"] == identity).cloned())
        .unwrap_or_else(|| panic!("no certificate for {identity}: {dump:#}"))
}

#[test]
fn ringtun_takes_its_certificates_from_istiods_ca_and_renews_them() {
    let (nodes, dir, _unused) = mesh_files("xca", "", |_| {});
    write_token(dir.path(), TOKEN);
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let mut args = IstiodArgs::new(&ca_cert, &ca_key);
    args.max_ttl = TTL;
    let mut istiod = FakeIstiod::start(Some(&nodes.server), dir.path(), args, &mesh_resources());
    nodes
        .client
        .capture_outbound(15001, DEFAULT_MARK)
        .expect("outbound capture");
    // The server names its CA, as a bare host:port (taken as https, as ztunnel does); the
    // client's is XDS_ADDRESS's istiod, ztunnel's default. One
    // stream per client connection, so a connection made after the renewal is a new handshake.
    let server = XdsRingtun::start_from_ca(
        &nodes.server,
        "server",
        "10.77.0.2",
        ISTIOD_URL,
        dir.path(),
        &[("CA_ADDRESS", ISTIOD_ADDR)],
    );
    let client = XdsRingtun::start_from_ca(
        &nodes.client,
        "client",
        "10.77.0.1",
        ISTIOD_URL,
        dir.path(),
        &[("POOL_MAX_STREAMS_PER_CONNECTION", "1")],
    );

    // Each asked for its own identity, with its own token, SECRET_TTL's default.
    for (who, id) in [(&client, CLIENT_ID), (&server, SERVER_ID)] {
        let csr = istiod.wait_event("a CSR", |e| e["event"] == "csr" && e["identity"] == id);
        assert_eq!(csr["impersonated"], false, "dedicated mode: {csr}");
        assert_eq!(csr["requested_ttl"], 86400, "{csr}");
        assert_eq!(csr["ttl"], TTL, "{csr}");
        who.wait_lines(&["certificate issued by the control plane's CA", id], 1);
    }
    let first_server = issued_serials(&istiod, SERVER_ID)[0].clone();
    assert_eq!(
        presented_serial(&nodes.server, "10.77.0.2:15008"),
        first_server
    );

    // Mutual TLS with the CA's certificates on both sides.
    let echo = EchoServer::start(&nodes.server, "0.0.0.0:5201").expect("echo server");
    let t = echo_ok(&nodes.client, "10.96.0.10:80", MIB);
    echo.records
        .wait_for(EVENT_WAIT, |r| r.sha256 == t.sha_sent)
        .expect("the workload got every byte");
    let line = client.wait_access("the transfer", |l| l.is("src.addr", &t.local.to_string()));
    assert!(line.is("dst.identity", SERVER_ID), "{}", line.raw);
    let line = server.wait_access("its inbound side", |l| l.is("direction", "inbound"));
    assert!(line.is("src.identity", CLIENT_ID), "{}", line.raw);
    let cert = dumped_certificate(&nodes.client, CLIENT_ID);
    assert_eq!(cert["state"], "Available", "{cert}");
    assert_eq!(
        dumped_serial(&cert),
        issued_serials(&istiod, CLIENT_ID)[0],
        "{cert}"
    );
    assert_eq!(
        cert["rootCerts"].as_array().map(Vec::len),
        Some(1),
        "{cert}"
    );

    // The first renewals fail twice (whoever asks first): retried with backoff, while a long
    // paced transfer runs across them and the renewal. The renewed certificates come with a
    // second root in the trust bundle (a root rotation under way).
    istiod.command("ca-fail 2");
    let next_root = TempDir::new("xca-next");
    gen_certs(next_root.path(), "cluster.local", &["default/unused"]);
    istiod.command(&format!(
        "ca-bundle-add {}",
        next_root.join("ca.pem").display()
    ));
    istiod.wait_event("the bundle grown", |e| {
        e["event"] == "bundle" && e["roots"] == 2
    });
    let exact = std::thread::scope(|s| {
        let runner = s.spawn(|| {
            transfer_paced(
                &nodes.client,
                "10.96.0.10:80",
                8 * MIB,
                32 * 1024,
                Duration::from_millis(70),
                MIB,
                |_| {},
            )
            .map(|t| t.is_exact())
        });
        istiod.wait_events("the injected failures", 2, |e| e["event"] == "csr-error");
        // Traffic keeps working on the certificates held.
        echo_ok(&nodes.client, "10.96.0.10:80", MIB);
        for (who, id) in [(&client, CLIENT_ID), (&server, SERVER_ID)] {
            istiod.wait_events("a second CSR", 2, |e| {
                e["event"] == "csr" && e["identity"] == id
            });
            who.wait_lines(&["certificate renewed", id], 1);
        }
        // A connection made now is a new handshake with the new certificates.
        let t = echo_ok(&nodes.client, "10.96.0.10:80", MIB);
        assert_eq!(t.sha_sent, t.sha_received);
        let presented = presented_serial(&nodes.server, "10.77.0.2:15008");
        let serials = issued_serials(&istiod, SERVER_ID);
        assert!(
            presented != first_server && serials[1..].contains(&presented),
            "the server presents {presented}; issued {serials:?}"
        );
        runner.join().expect("transfer thread")
    });
    assert!(
        exact.expect("the paced transfer"),
        "the transfer across the renewal came back intact"
    );
    for who in [&client, &server] {
        who.wait_lines(&["the CA's trust bundle changed", "roots=2"], 1);
    }
    let failed = format!("{}{}", client.log(), server.log());
    assert!(
        failed.contains("certificate renewal failed; the valid certificate stays in use"),
        "a failed renewal is said"
    );

    // What the operator sees: the renewed certificate, the fetches and the failures.
    let cert = dumped_certificate(&nodes.client, CLIENT_ID);
    assert_eq!(cert["state"], "Available", "{cert}");
    assert_eq!(
        cert["rootCerts"].as_array().map(Vec::len),
        Some(2),
        "peers are checked against the new bundle: {cert}"
    );
    assert!(
        issued_serials(&istiod, CLIENT_ID)[1..].contains(&dumped_serial(&cert)),
        "{cert}"
    );
    let mut failures = 0.0;
    for ns in [&nodes.client, &nodes.server] {
        let scrape = Scrape::take(ns, false);
        scrape.assert_family("ringtun_certificate_fetches", "counter");
        assert!(scrape.one("ringtun_certificate_fetches_total", &[]) >= 2.0);
        failures += scrape.one("ringtun_certificate_fetch_failures_total", &[]);
        assert_eq!(scrape.select("istio_cert_expiry_seconds", &[]).len(), 1);
    }
    assert_eq!(failures, 2.0, "the two injected failures are counted");
}

#[test]
fn ringtun_and_ztunnel_mesh_with_certificates_from_the_same_istiod() {
    let nodes = two_nodes("xcz");
    let dir = TempDir::new("xcz");
    write_token(dir.path(), TOKEN);
    let (ca_cert, ca_key) = ztunnel_test_ca();
    std::fs::copy(&ca_cert, dir.join("ca.pem")).expect("copy the CA");
    let istiod = FakeIstiod::start(
        Some(&nodes.server),
        dir.path(),
        IstiodArgs::new(&ca_cert, &ca_key),
        &mesh_resources(),
    );
    capture_outbound_but_istiod(&nodes.client);
    let echo = EchoServer::start(&nodes.server, "0.0.0.0:5201").expect("echo server");

    // ringtun → ztunnel.
    {
        let server = XdsZtunnel::start(
            &nodes.server,
            "server",
            "10.77.0.2",
            ISTIOD_URL,
            &ca_cert,
            dir.path(),
        );
        let client = XdsRingtun::start_from_ca(
            &nodes.client,
            "client",
            "10.77.0.1",
            ISTIOD_URL,
            dir.path(),
            &[],
        );
        let t = echo_ok(&nodes.client, "10.96.0.10:80", 2 * MIB);
        echo.records
            .wait_for(EVENT_WAIT, |r| r.sha256 == t.sha_sent)
            .expect("the workload got every byte");
        let line = client.wait_access("through ztunnel", |l| {
            l.is("src.addr", &t.local.to_string())
        });
        assert!(line.is("dst.identity", SERVER_ID), "{}", line.raw);
        server.wait_line(&["connection complete", CLIENT_ID]);
    }
    // ztunnel → ringtun.
    {
        let server = XdsRingtun::start_from_ca(
            &nodes.server,
            "server",
            "10.77.0.2",
            ISTIOD_URL,
            dir.path(),
            &[],
        );
        let client = XdsZtunnel::start(
            &nodes.client,
            "client",
            "10.77.0.1",
            ISTIOD_URL,
            &ca_cert,
            dir.path(),
        );
        let t = echo_ok(&nodes.client, "10.96.0.10:80", 2 * MIB);
        echo.records
            .wait_for(EVENT_WAIT, |r| r.sha256 == t.sha_sent)
            .expect("the workload got every byte");
        let line = server.wait_access("from ztunnel", |l| l.is("direction", "inbound"));
        assert!(line.is("src.identity", CLIENT_ID), "{}", line.raw);
        client.wait_line(&["connection complete", SERVER_ID]);
    }
    for id in [CLIENT_ID, SERVER_ID] {
        let n = istiod
            .events()
            .iter()
            .filter(|e| e["event"] == "csr" && e["identity"] == id)
            .count();
        assert!(n >= 2, "ringtun and ztunnel each asked the CA for {id}");
    }
}

#[test]
fn in_pod_mode_asks_the_ca_on_each_pods_behalf() {
    let dir = TempDir::new("xcp");
    gen_certs(dir.path(), "cluster.local", &["default/unused"]);
    write_token(dir.path(), TOKEN);
    let pods = two_nodes("xcp");
    let node = netns("xcn");
    node.ip(["link", "set", "lo", "up"]).expect("loopback up");
    capture_pod(&pods.client);
    capture_pod(&pods.server);
    let echo = EchoServer::start(&pods.server, "10.77.0.2:5201").expect("echo server");
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let mut args = IstiodArgs::new(&ca_cert, &ca_key);
    args.listen = "127.0.0.1:15012";
    args.sans = vec!["127.0.0.1".into()];
    // The server's workload is on this node (NODE_NAME): its certificate is fetched as soon as
    // istiod pushes it, before its pod arrives (ztunnel's prefetch); the client's is not.
    let mut resources = mesh_resources();
    resources["workloads"][1]["node"] = json!("node-a");
    let mut istiod = FakeIstiod::start(Some(&node), dir.path(), args, &resources);
    // The CA fails the first two requests: ringtun retries with backoff, not ready meanwhile.
    istiod.command("ca-fail 2");

    let mut agent = NodeAgent::start(&dir.join("zds.sock"), dir.path());
    let mut cmd = node.exec(ringtun_bin());
    cmd.current_dir(dir.path())
        .arg("run")
        .args(["--workers", "1", "--no-pin"])
        .env("PROXY_MODE", "shared")
        .env("INPOD_UDS", &agent.socket)
        .env("XDS_ADDRESS", "https://127.0.0.1:15012")
        .env("XDS_ROOT_CA", &ca_cert)
        .env("CA_ROOT_CA", &ca_cert)
        .env("POD_NAME", "ztunnel-node")
        .env("POD_NAMESPACE", "istio-system")
        .env("NODE_NAME", "node-a")
        .env_remove("LOCAL_XDS_PATH")
        .env_remove("SERVICE_ACCOUNT")
        .env("RINGTUN_LOG", "info")
        .env("NO_COLOR", "1");
    let mut ringtun = Process::spawn(cmd, "ringtun (in-pod, CA)", &dir.join("ringtun.log"))
        .expect("spawn ringtun");
    let own = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
    let deadline = std::time::Instant::now() + EVENT_WAIT;
    loop {
        let dumped = http_in(&node, ADMIN, "GET", "/config_dump")
            .ok()
            .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            .and_then(|d| d["certificates"].as_array().cloned())
            .and_then(|c| c.into_iter().find(|c| c["identity"] == own));
        if let Some(c) = dumped.filter(|c| c["state"] == "Unavailable") {
            assert!(
                c["ringtun"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("injected")),
                "{c}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failed certificate in /config_dump:\n{}",
            ringtun.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(readiness(&node), 503, "not ready without a certificate");
    istiod.wait_events("the injected failures", 2, |e| e["event"] == "csr-error");
    let prefetched = istiod.wait_event("the server's certificate, before its pod", |e| {
        e["event"] == "csr" && e["identity"] == SERVER_ID
    });
    assert_eq!(prefetched["impersonated"], true, "{prefetched}");
    assert!(
        !istiod
            .events()
            .iter()
            .any(|e| e["event"] == "csr" && e["identity"] == CLIENT_ID),
        "the client's workload is not on this node: fetched on first use only"
    );
    assert_eq!(agent.accept(), 1, "ringtun announces ZDS V1");
    for (uid, pod, who) in [
        ("pod-client", &pods.client, "client"),
        ("pod-server", &pods.server, "server"),
    ] {
        assert_eq!(agent.ack(&add_pod(uid, pod, who)), "", "add {uid}");
    }
    assert_eq!(agent.ack("snapshot"), "");
    ringtun
        .wait_ready(&node, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    for pod in [&pods.client, &pods.server] {
        wait_ports(pod, "the pod's listeners", |p| {
            p.contains(&15008) && p.contains(&15001)
        });
    }

    // The node proxy's own certificate with its own token; each pod's on its behalf.
    let csr = istiod.wait_event("the node's CSR", |e| {
        e["event"] == "csr" && e["identity"] == own
    });
    assert_eq!(csr["impersonated"], false, "{csr}");
    for id in [CLIENT_ID, SERVER_ID] {
        let csr = istiod.wait_event("a pod's CSR", |e| {
            e["event"] == "csr" && e["identity"] == id
        });
        assert_eq!(csr["impersonated"], true, "{csr}");
    }
    echo_eventually(&pods.client, "10.96.0.10:80", 1 << 16, EVENT_WAIT);
    let t = echo_ok(&pods.client, "10.96.0.10:80", MIB);
    echo.records
        .wait_for(EVENT_WAIT, |r| r.sha256 == t.sha_sent)
        .expect("the workload got every byte");
    let log = ringtun.log();
    let line = parse_access(&log)
        .into_iter()
        .find(|l| l.is("direction", "inbound") && l.is("src.identity", CLIENT_ID))
        .unwrap_or_else(|| panic!("no inbound line from the client pod:\n{log}"));
    assert!(line.is("dst.identity", SERVER_ID), "{}", line.raw);
    let cert = dumped_certificate(&node, SERVER_ID);
    assert_eq!(cert["state"], "Available", "{cert}");

    // The client pod leaves: its certificate is forgotten, the node's own kept.
    assert_eq!(agent.ack("del pod-client"), "");
    let (_, body) = http_in(&node, ADMIN, "GET", "/config_dump").expect("config_dump");
    let dump: Value = serde_json::from_str(&body).expect("config_dump JSON");
    let ids: Vec<&str> = dump["certificates"]
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["identity"].as_str()).collect())
        .unwrap_or_default();
    assert!(!ids.contains(&CLIENT_ID), "{ids:?}");
    assert!(ids.contains(&own) && ids.contains(&SERVER_ID), "{ids:?}");
}
