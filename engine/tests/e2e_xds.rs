//! ringtun with istiod as its only config source, against the fake istiod
//! (`tests/peers/fake_istiod.py`, itself checked against the real ztunnel by
//! `xds_fake_istiod_ztunnel.rs`): started with `XDS_ADDRESS` and a token and no local config,
//! it subscribes as ztunnel does, ACKs, and carries checksummed traffic to a service it learned
//! over xDS; a malformed resource is NACKed by name and the previous state kept; a workload
//! removed over xDS is refused. The CA client fetches a certificate with the token and checks
//! it. Certificates for HBONE here are mounted ones (issued from the same test CA); ringtun
//! with certificates from the CA only is `e2e_xds_ca.rs`.

mod common;
mod xds_common;

use std::time::{Duration, SystemTime};

use ::ringtun::xds::ca::CaClient;
use ::ringtun::xds::{Endpoint, RootCert, Token};
use common::*;
use ringtun_hbone::Identity;
use ringtun_testbed::{echoed_bytes, Netns, DEFAULT_MARK};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::json;
use xds_common::*;

const MIB: u64 = 1 << 20;

fn endpoint(url: &str, root: &std::path::Path, token: &str) -> Endpoint {
    Endpoint {
        url: url.to_owned(),
        root: RootCert::File(root.to_owned()),
        alt_hostname: None,
        token: Token::Static(token.to_owned()),
        cluster_id: "Kubernetes".into(),
        mark: 0,
    }
}

fn secs_until(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::now())
        .unwrap_or_default()
        .as_secs()
}

#[test]
fn ca_client_fetches_a_certificate_with_the_token() {
    let dir = TempDir::new("xca");
    gen_certs(dir.path(), "cluster.local", &["default/client"]);
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let mut args = IstiodArgs::new(&ca_cert, &ca_key);
    args.listen = "127.0.0.1:0";
    args.sans = vec!["127.0.0.1".into()];
    let istiod = FakeIstiod::start(None, dir.path(), args, &json!({}));
    let url = format!("https://{}", istiod.addr());
    let client_id = Identity::new("cluster.local", "default", "client");

    let issued = CaClient::new(
        endpoint(&url, &ca_cert, TOKEN),
        Duration::from_secs(3600),
        false,
    )
    .fetch_blocking(&client_id)
    .expect("a certificate");
    assert_eq!(issued.identity, client_id);
    assert_eq!(
        ringtun_hbone::cert::leaf_identity(&issued.chain[0]).expect("a SPIFFE SAN"),
        client_id,
        "the leaf's URI SAN"
    );
    let root = CertificateDer::from_pem_file(&ca_cert).expect("the CA");
    assert_eq!(issued.roots, vec![root], "the root comes last");
    let life = issued
        .not_after
        .duration_since(issued.not_before)
        .expect("valid");
    assert_eq!(life, Duration::from_secs(3600), "SECRET_TTL is honoured");
    assert!(
        (3540..=3600).contains(&secs_until(issued.not_after)),
        "expires in an hour: {:?}",
        issued.not_after
    );
    let csr = istiod.wait_event("the CSR", |e| e["event"] == "csr");
    assert_eq!(csr["identity"], client_id.to_string(), "{csr}");
    assert_eq!(csr["requested_ttl"], 3600, "{csr}");
    assert_eq!(csr["impersonated"], false, "{csr}");

    // Node mode names the identity in ImpersonatedIdentity.
    let server_id = Identity::new("cluster.local", "default", "server");
    let issued = CaClient::new(
        endpoint(&url, &ca_cert, TOKEN),
        Duration::from_secs(60),
        true,
    )
    .fetch_blocking(&server_id)
    .expect("a certificate");
    assert_eq!(issued.identity, server_id);
    assert!(secs_until(issued.not_after) <= 60);
    istiod.wait_event("the impersonating CSR", |e| {
        e["event"] == "csr" && e["impersonated"] == true && e["identity"] == server_id.to_string()
    });

    // Another name for istiod, accepted as ALT_CA_HOSTNAME is.
    let port = url.rsplit(':').next().unwrap_or_default();
    let mut alt = endpoint(&format!("https://localhost:{port}"), &ca_cert, TOKEN);
    let refused = CaClient::new(alt.clone(), Duration::from_secs(60), false)
        .fetch_blocking(&client_id)
        .expect_err("localhost is not in istiod's certificate");
    assert!(refused.to_string().contains("cannot connect"), "{refused}");
    alt.alt_hostname = Some("127.0.0.1".into());
    CaClient::new(alt, Duration::from_secs(60), false)
        .fetch_blocking(&client_id)
        .expect("the alternative name is accepted");

    // A wrong token and an untrusted istiod are refused, each with a clear reason.
    let err = CaClient::new(
        endpoint(&url, &ca_cert, "wrong"),
        Duration::from_secs(60),
        false,
    )
    .fetch_blocking(&client_id)
    .expect_err("a wrong token");
    assert!(err.to_string().contains("authentication failure"), "{err}");
    let other = TempDir::new("xca-other");
    gen_certs(other.path(), "cluster.local", &["default/client"]);
    let err = CaClient::new(
        endpoint(&url, &other.join("ca.pem"), TOKEN),
        Duration::from_secs(60),
        false,
    )
    .fetch_blocking(&client_id)
    .expect_err("an istiod the root does not vouch for");
    assert!(
        err.to_string().contains("UnknownIssuer")
            || err.to_string().contains("invalid peer certificate"),
        "{err}"
    );
}

/// A connection through the VIP that must not be carried: nothing echoed.
fn not_carried(ns: &Netns) {
    let n = echoed_bytes(ns, "10.96.0.10:80");
    assert_eq!(n, 0, "a connection to a removed workload echoed {n} bytes");
}

#[test]
fn ringtun_takes_its_config_from_istiod_only() {
    let (nodes, dir, _unused) = mesh_files("xrt", "", |_| {});
    write_token(dir.path(), TOKEN);
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let mut istiod = FakeIstiod::start(
        Some(&nodes.server),
        dir.path(),
        IstiodArgs::new(&ca_cert, &ca_key),
        &mesh_resources(),
    );
    // No exception for istiod's port: ringtun marks its control-plane connection too.
    nodes
        .client
        .capture_outbound(15001, DEFAULT_MARK)
        .expect("outbound capture");
    // The server's XDS_ADDRESS is a bare host:port: https, as ztunnel takes it.
    let server = XdsRingtun::start(
        &nodes.server,
        "server",
        "10.77.0.2",
        ISTIOD_ADDR,
        dir.path(),
    );
    let client = XdsRingtun::start(&nodes.client, "client", "10.77.0.1", ISTIOD_URL, dir.path());

    // Subscribed as ztunnel subscribes, and ACKed.
    istiod.wait_events("Address ACKs", 2, |e| is(e, "ack", ADDRESS_TYPE));
    istiod.wait_events("Authorization ACKs", 2, |e| {
        is(e, "ack", AUTHORIZATION_TYPE)
    });
    let events = istiod.events();
    for (who, ip) in [("client", "10.77.0.1"), ("server", "10.77.0.2")] {
        let node = format!("ztunnel~{ip}~{who}.default~default.svc.cluster.local");
        let first = events
            .iter()
            .find(|e| e["node"] == node)
            .unwrap_or_else(|| panic!("no request with node {node}: {events:?}"));
        assert_eq!(first["type_url"], ADDRESS_TYPE, "{first}");
        assert_eq!(first["subscribe"], json!([]), "wildcard: {first}");
        assert_eq!(first["initial"], json!({}), "{first}");
        assert_eq!(first["metadata"]["NAME"], who, "{first}");
        assert_eq!(first["metadata"]["NAMESPACE"], "default", "{first}");
        assert_eq!(first["metadata"]["INSTANCE_IPS"], ip, "{first}");
    }
    assert!(
        events
            .iter()
            .filter(|e| e["event"] == "connect")
            .all(|e| e["clusterid"] == "Kubernetes"),
        "{events:?}"
    );
    client.wait_lines(
        &[
            "ringtun ready",
            "xds https://10.77.0.2:15012",
            "workloads=2",
        ],
        1,
    );

    // Traffic to the service known only from istiod.
    let echo = EchoServer::start(&nodes.server, "0.0.0.0:5201").expect("echo server");
    let t = echo_ok(&nodes.client, "10.96.0.10:80", 4 * MIB);
    echo.records
        .wait_for(EVENT_WAIT, |r| r.sha256 == t.sha_sent)
        .expect("the workload got every byte");
    let line = client.wait_access("the transfer", |l| l.is("src.addr", &t.local.to_string()));
    assert!(line.is("dst.identity", SERVER_ID), "{}", line.raw);
    assert_eq!(line.num("bytes_recv"), 4 * MIB, "{}", line.raw);

    // istiod ends the stream: ringtun reconnects, naming what it holds (with the versions it
    // got), so nothing is sent again and nothing changes.
    let first = istiod.streams_of("10.77.0.1", 1).remove(0);
    let held = istiod.subscription(&first, ADDRESS_TYPE);
    assert_eq!(held["initial"], json!({}), "{held}");
    istiod.command("close");
    let client_stream = istiod.streams_of("10.77.0.1", 2).remove(1);
    let again = istiod.subscription(&client_stream, ADDRESS_TYPE);
    let pushed = istiod.wait_event("the first push", |e| {
        e["event"] == "push" && e["stream"] == first && e["type_url"] == ADDRESS_TYPE
    });
    let initial = again["initial"].as_object().cloned().unwrap_or_default();
    assert_eq!(
        initial.keys().collect::<Vec<_>>(),
        pushed["resources"]
            .as_array()
            .map(|r| r.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>())
            .unwrap_or_default(),
        "every resource held is named: {again}"
    );
    assert!(
        initial
            .values()
            .all(|v| v.as_str().is_some_and(|v| !v.is_empty())),
        "with its version: {again}"
    );
    for t in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        istiod.wait_event("an ACK on the new stream", |e| {
            is(e, "ack", t) && e["stream"] == client_stream
        });
    }
    let resent = istiod.wait_event("the answer on the new stream", |e| {
        e["event"] == "push" && e["stream"] == client_stream && e["type_url"] == ADDRESS_TYPE
    });
    assert_eq!(
        resent["resources"],
        json!([]),
        "nothing is sent again: {resent}"
    );
    client.wait_lines(&["xDS stream established"], 2);
    echo_ok(&nodes.client, "10.96.0.10:80", MIB);

    // A malformed resource is NACKed by name; the previous state stays.
    let mut bad = mesh_resources();
    bad["workloads"][1]["addresses"] = json!(["AQIDBAU="]);
    bad["raw"] = json!([{"type": "address", "name": "bad-address", "value": "//8="}]);
    istiod.set_resources(&bad);
    let nack = istiod.wait_event("the client's NACK", |e| {
        e["event"] == "nack" && e["stream"] == client_stream
    });
    let error = nack["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("{SERVER_UID}: addresses: an address of 5 bytes")),
        "{nack}"
    );
    assert!(error.contains("bad-address: decode"), "{nack}");
    client.wait_lines(&["NACK", "bad-address"], 1);
    // The operator sees it: /config_dump names the NACK, /metrics counts it.
    let (status, body) = http_in(&nodes.client, ADMIN, "GET", "/config_dump").expect("dump");
    assert_eq!(status, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body).expect("config_dump JSON");
    let xds = &dump["ringtun"]["xds"];
    assert_eq!(xds["address"], ISTIOD_URL, "{xds:#}");
    assert_eq!(xds["connected"], true, "{xds:#}");
    assert!(xds["reconnects"].as_u64() >= Some(1), "{xds:#}");
    let address = &xds["types"][ADDRESS_TYPE];
    let last_nack = &address["lastNack"];
    assert_eq!(last_nack["nonce"], nack["nonce"], "{xds:#}");
    assert!(
        last_nack["resources"]
            .as_array()
            .is_some_and(|r| r.iter().any(|n| n == "bad-address")),
        "{xds:#}"
    );
    assert!(
        last_nack["error"]
            .as_str()
            .is_some_and(|e| e.contains("bad-address: decode")),
        "{xds:#}"
    );
    assert!(
        address["ackedVersion"].is_string() && address["acks"].as_u64() >= Some(1),
        "{xds:#}"
    );
    for openmetrics in [false, true] {
        let scrape = Scrape::take(&nodes.client, openmetrics);
        assert_eq!(scrape.one("ringtun_xds_connected", &[]), 1.0);
        assert!(scrape.one("ringtun_xds_nacks_total", &[("url", ADDRESS_TYPE)]) >= 1.0);
        assert_eq!(
            scrape.one("ringtun_xds_nacks_total", &[("url", AUTHORIZATION_TYPE)]),
            0.0
        );
        assert!(scrape.one("istio_xds_message_total", &[("url", ADDRESS_TYPE)]) >= 3.0);
        assert!(
            scrape.one("istio_xds_message_bytes_total", &[("url", ADDRESS_TYPE)]) > 100.0,
            "the pushed resources' bytes"
        );
        scrape.assert_family("istio_xds_message_bytes", "counter");
        assert!(scrape.one("ringtun_xds_reconnects_total", &[]) >= 1.0);
    }
    let t = echo_ok(&nodes.client, "10.96.0.10:80", MIB);
    assert_eq!(
        t.sha_sent, t.sha_received,
        "the last good workload still serves"
    );

    // A removal applies: the workload is refused.
    let mut without_server = mesh_resources();
    without_server["workloads"] =
        json!([workload(CLIENT_UID, "client", "client", "10.77.0.1", &[])]);
    istiod.set_resources(&without_server);
    client.wait_lines(&["config updated by the control plane", "workloads=1"], 1);
    not_carried(&nodes.client);
    let refused = client.wait_access("the refusal", |l| {
        l.get("error")
            .is_some_and(|r| r.contains("no healthy upstream"))
    });
    assert!(refused.is("direction", "outbound"), "{}", refused.raw);
    server.wait_lines(&["config updated by the control plane", "workloads=1"], 1);

    // istiod ends the stream routinely (CANCELLED, as at its connection age): a `Reconnect`,
    // not an `Error`, in ztunnel's metric (`xds_fake_istiod_ztunnel` shows ztunnel counting
    // both the same way), and the stream comes back at once.
    istiod.close_cancelled("10.77.0.1", 3);
    for openmetrics in [false, true] {
        let scrape = Scrape::take(&nodes.client, openmetrics);
        assert_eq!(
            terminations(&scrape, "Error"),
            1.0,
            "the UNAVAILABLE close above"
        );
        assert_eq!(
            terminations(&scrape, "Reconnect"),
            1.0,
            "the CANCELLED close"
        );
    }
}

#[test]
fn a_wrong_token_or_an_untrusted_istiod_is_refused_with_a_clear_line() {
    let ns = netns("xrw");
    ns.ip(["link", "set", "lo", "up"]).expect("loopback up");
    let dir = TempDir::new("xrw");
    gen_certs(dir.path(), "cluster.local", &["default/client"]);
    let other = TempDir::new("xrw-other");
    gen_certs(other.path(), "cluster.local", &["default/client"]);
    write_token(dir.path(), "not-the-token");
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let mut args = IstiodArgs::new(&ca_cert, &ca_key);
    args.listen = "127.0.0.1:15012";
    args.sans = vec!["127.0.0.1".into()];
    let istiod = FakeIstiod::start(Some(&ns), dir.path(), args, &mesh_resources());
    let url = "https://127.0.0.1:15012";
    {
        let r = XdsRingtun::spawn(&ns, "client", "10.77.0.1", url, dir.path());
        let line = r.wait_lines(&["xDS stream failed", "authentication failure"], 1);
        assert!(line.contains("Unauthenticated"), "{line}");
        r.wait_lines(&["not ready until the control plane"], 1);
        assert!(!r.log().contains("ringtun ready"), "ready without a config");
        istiod.wait_event("the refusal", |e| e["event"] == "auth-failed");
    }
    // The right token, but istiod's certificate does not chain to XDS_ROOT_CA.
    write_token(dir.path(), TOKEN);
    let r = XdsRingtun::spawn_with_root(
        &ns,
        "client",
        "10.77.0.1",
        url,
        dir.path(),
        &other.join("ca.pem"),
    );
    let line = r.wait_lines(&["xDS stream failed", "cannot connect"], 1);
    assert!(
        line.contains("UnknownIssuer") || line.contains("invalid peer certificate"),
        "{line}"
    );
    assert!(!r.log().contains("ringtun ready"), "ready without a config");
}

/// An address ringtun cannot use stops it at start with a line naming the variable and the
/// form it takes, before anything is bound.
#[test]
fn an_unusable_control_plane_address_is_refused_at_start_by_name() {
    for (var, value) in [
        ("XDS_ADDRESS", "istiod bad:15012"),
        ("XDS_ADDRESS", "http://istiod.istio-system.svc:15012"),
        ("CA_ADDRESS", "istiod.istio-system.svc:port"),
    ] {
        let mut cmd = std::process::Command::new(ringtun_bin());
        cmd.arg("run")
            .args(["--workload", "default/client/client"])
            .env_remove("LOCAL_XDS_PATH")
            .env("XDS_ADDRESS", "https://istiod.istio-system.svc:15012")
            .env(var, value)
            .env("NO_COLOR", "1");
        let out = cmd.output().expect("run ringtun");
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success(),
            "{var}={value} must not start: {text}"
        );
        assert!(
            text.contains(var) && text.contains("expected https://host:port"),
            "{var}={value}: the message names the variable and the form: {text}"
        );
    }
}
