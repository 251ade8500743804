//! The fake istiod (`tests/peers/fake_istiod.py`) checked against the real ztunnel
//! (`../shared/ztunnel/ztunnel`, `FAKE_CA` unset, no local config): ztunnel subscribes to both
//! types with the node id and metadata it always sends, ACKs what the fake pushes, fetches its
//! certificate from the fake's CA with the pod token, and carries checksummed traffic to a
//! workload it learned only over xDS; a removal pushed later is applied, a malformed resource is
//! NACKed (the good ones of the same response applied), and a wrong token is refused; with
//! `XDS_ON_DEMAND=true` it subscribes to no address and asks for each one it meets. So the
//! fake follows istiod as ztunnel reads it, not ringtun's reading of it. Without the binary the
//! tests fail, never skip.

mod common;
mod xds_common;

use common::*;
use ringtun_testbed::{echoed_bytes, Netns};
use serde_json::json;
use xds_common::*;

const MIB: u64 = 1 << 20;

/// What a client in `ns` gets from a connection through the VIP that must not be carried:
/// nothing echoed.
fn not_carried(ns: &Netns) {
    let n = echoed_bytes(ns, "10.96.0.10:80");
    assert_eq!(n, 0, "a connection to a removed workload echoed {n} bytes");
}

#[test]
fn ztunnel_takes_workloads_policies_and_certificates_from_the_fake() {
    let nodes = two_nodes("xzt");
    let dir = TempDir::new("xzt");
    write_token(dir.path(), TOKEN);
    let (ca_cert, ca_key) = ztunnel_test_ca();
    let mut resources = mesh_resources();
    resources["authorizations"] = json!([deny_port("deny-9999", 9999)]);
    let mut istiod = FakeIstiod::start(
        Some(&nodes.server),
        dir.path(),
        IstiodArgs::new(&ca_cert, &ca_key),
        &resources,
    );
    capture_outbound_but_istiod(&nodes.client);
    let server = XdsZtunnel::start(
        &nodes.server,
        "server",
        "10.77.0.2",
        ISTIOD_URL,
        &ca_cert,
        dir.path(),
    );
    let client = XdsZtunnel::start(
        &nodes.client,
        "client",
        "10.77.0.1",
        ISTIOD_URL,
        &ca_cert,
        dir.path(),
    );

    // Both subscribe to both types (wildcard: XDS_ON_DEMAND is off by default) and ACK.
    istiod.wait_events("Address ACKs", 2, |e| is(e, "ack", ADDRESS_TYPE));
    istiod.wait_events("Authorization ACKs", 2, |e| {
        is(e, "ack", AUTHORIZATION_TYPE)
    });
    let events = istiod.events();
    assert!(
        !events.iter().any(|e| e["event"] == "nack"),
        "ztunnel NACKed the fake's resources: {events:?}"
    );
    for (who, ip) in [("client", "10.77.0.1"), ("server", "10.77.0.2")] {
        let first = events
            .iter()
            .find(|e| e["node"] == format!("ztunnel~{ip}~{who}.default~default.svc.cluster.local"))
            .unwrap_or_else(|| panic!("no request with {who}'s node id: {events:?}"));
        assert_eq!(first["type_url"], ADDRESS_TYPE, "{first}");
        assert_eq!(first["subscribe"], json!([]), "wildcard: {first}");
        assert_eq!(first["metadata"]["NAMESPACE"], "default", "{first}");
        assert_eq!(first["metadata"]["NAME"], who, "{first}");
        assert_eq!(first["metadata"]["INSTANCE_IPS"], ip, "{first}");
    }
    let connects: Vec<_> = events.iter().filter(|e| e["event"] == "connect").collect();
    assert!(
        connects.iter().all(|e| e["clusterid"] == "Kubernetes"),
        "the clusterid header: {connects:?}"
    );
    server.wait_line(&["handling RBAC update deny-9999"]);

    // Traffic to a service and workload known only from xDS, with certificates from the fake.
    let echo = EchoServer::start(&nodes.server, "0.0.0.0:5201").expect("echo server");
    let t = echo_ok(&nodes.client, "10.96.0.10:80", MIB);
    echo.records
        .wait_for(EVENT_WAIT, |r| r.sha256 == t.sha_sent)
        .expect("the workload got every byte");
    for id in [CLIENT_ID, SERVER_ID] {
        let csr = istiod.wait_event("a CSR", |e| e["event"] == "csr" && e["identity"] == id);
        assert_eq!(csr["requested_ttl"], 86400, "SECRET_TTL's default: {csr}");
        assert_eq!(csr["impersonated"], false, "dedicated mode: {csr}");
    }
    client.wait_line(&["connection complete", SERVER_ID]);
    // The xDS metrics as ztunnel names them (ringtun's `xds::status` follows these).
    let scrape = Scrape::take(&nodes.client, true);
    assert!(scrape.one("istio_xds_message_total", &[("url", ADDRESS_TYPE)]) >= 1.0);
    assert!(scrape.one("istio_xds_message_bytes_total", &[("url", ADDRESS_TYPE)]) > 100.0);
    scrape.assert_family("istio_xds_message_bytes", "counter");

    // istiod ends the stream: ztunnel reconnects and names what it holds, with the versions.
    istiod.command("close");
    let stream = istiod.streams_of("10.77.0.1", 2).remove(1);
    let again = istiod.subscription(&stream, ADDRESS_TYPE);
    let held = again["initial"].as_object().cloned().unwrap_or_default();
    for name in [
        CLIENT_UID,
        SERVER_UID,
        "default/server.default.svc.cluster.local",
    ] {
        let version = held.get(name).and_then(|v| v.as_str()).unwrap_or_default();
        assert!(!version.is_empty(), "{name} in {again}");
    }
    istiod.wait_event("an ACK on the new stream", |e| {
        is(e, "ack", ADDRESS_TYPE) && e["stream"] == stream
    });
    echo_ok(&nodes.client, "10.96.0.10:80", MIB);

    // How ztunnel counts a stream's end: UNAVAILABLE (above) as an `Error`, CANCELLED (a
    // routine end, as at istiod's connection age) as a `Reconnect` (`e2e_xds` asserts ringtun
    // counts them alike).
    istiod.close_cancelled("10.77.0.1", 3);
    let scrape = Scrape::take(&nodes.client, true);
    assert_eq!(terminations(&scrape, "Error"), 1.0, "the UNAVAILABLE close");
    assert_eq!(
        terminations(&scrape, "Reconnect"),
        1.0,
        "the CANCELLED close"
    );

    // A removal is applied: the server workload is gone, the VIP has no endpoint.
    let mut without_server = mesh_resources();
    without_server["workloads"] =
        json!([workload(CLIENT_UID, "client", "client", "10.77.0.1", &[])]);
    istiod.set_resources(&without_server);
    let push = istiod.wait_event("the removal pushed", |e| {
        e["event"] == "push" && e["removed"] == json!([SERVER_UID]) && e["type_url"] == ADDRESS_TYPE
    });
    let nonce = push["nonce"].clone();
    istiod.wait_event("the removal ACKed", |e| {
        e["event"] == "ack" && e["nonce"] == nonce
    });
    not_carried(&nodes.client);

    // A malformed resource is NACKed with its name; the good one beside it is applied.
    let mut with_bad = mesh_resources();
    with_bad["raw"] = json!([{"type": "address", "name": "bad-address", "value": "//8="}]);
    istiod.set_resources(&with_bad);
    let push = istiod.wait_event("the bad resource pushed", |e| {
        e["event"] == "push"
            && e["resources"]
                .as_array()
                .is_some_and(|r| r.contains(&json!("bad-address")))
    });
    let nonce = push["nonce"].clone();
    let nack = istiod.wait_event("the NACK", |e| e["event"] == "nack" && e["nonce"] == nonce);
    let error = nack["error"].as_str().unwrap_or_default();
    assert!(error.contains("bad-address"), "the NACK names it: {nack}");
    assert!(
        !error.contains(SERVER_UID),
        "only the bad one is rejected: {nack}"
    );
    echo_ok(&nodes.client, "10.96.0.10:80", MIB);
}

#[test]
fn ztunnel_is_refused_with_a_wrong_token() {
    let ns = netns("xzw");
    ns.ip(["link", "set", "lo", "up"]).expect("loopback up");
    let dir = TempDir::new("xzw");
    write_token(dir.path(), "not-the-token");
    let (ca_cert, ca_key) = ztunnel_test_ca();
    let mut args = IstiodArgs::new(&ca_cert, &ca_key);
    args.listen = "127.0.0.1:15012";
    args.sans = vec!["127.0.0.1".into()];
    let istiod = FakeIstiod::start(Some(&ns), dir.path(), args, &mesh_resources());
    let zt = XdsZtunnel::start(
        &ns,
        "client",
        "10.77.0.1",
        "https://127.0.0.1:15012",
        &ca_cert,
        dir.path(),
    );
    let refused = istiod.wait_event("the refusal", |e| e["event"] == "auth-failed");
    assert_eq!(refused["rpc"], "ads", "{refused}");
    assert_eq!(refused["reason"], "unknown token", "{refused}");
    zt.wait_line(&["authentication failure"]);
    assert!(
        !istiod.events().iter().any(|e| e["event"] == "push"),
        "nothing is pushed to an unauthenticated client"
    );
}

/// ztunnel with `XDS_ON_DEMAND=true` (and DNS capture off: it refuses the two together)
/// subscribes to no address (`*` subscribed and unsubscribed in one request) and to every
/// policy; istiod sends the workloads of its node unasked. A destination it does not know is
/// asked for by `network/IP`; the fake answers with the service and the workloads behind it
/// (under their own names, the IP as an alias, as istiod), ztunnel ACKs and carries the traffic
/// (the connection that asked stays parked: ztunnel waits for a resource of the very name it
/// asked for, with no timeout). An IP nobody knows is answered as removed (istiod's "not
/// found"). A reconnect keeps the empty subscription and names what is held, the names asked
/// for included (`initial_resource_versions`).
#[test]
fn ztunnel_on_demand_asks_for_what_it_meets_and_carries_it() {
    let nodes = two_nodes("xzo");
    let dir = TempDir::new("xzo");
    write_token(dir.path(), TOKEN);
    let (ca_cert, ca_key) = ztunnel_test_ca();
    let resources = mesh_resources_on_nodes();
    let mut istiod = FakeIstiod::start(
        Some(&nodes.server),
        dir.path(),
        IstiodArgs::new(&ca_cert, &ca_key),
        &resources,
    );
    capture_outbound_but_istiod(&nodes.client);
    let on_demand = |node| {
        [
            ("XDS_ON_DEMAND", "true"),
            ("ISTIO_META_DNS_CAPTURE", "false"),
            ("NODE_NAME", node),
        ]
    };
    let _server = XdsZtunnel::start_with(
        &nodes.server,
        "server",
        "10.77.0.2",
        ISTIOD_URL,
        &ca_cert,
        dir.path(),
        &on_demand("node-server"),
    );
    let client = XdsZtunnel::start_with(
        &nodes.client,
        "client",
        "10.77.0.1",
        ISTIOD_URL,
        &ca_cert,
        dir.path(),
        &on_demand("node-client"),
    );
    let stream = istiod.streams_of("10.77.0.1", 1).remove(0);
    let addresses = istiod.subscription(&stream, ADDRESS_TYPE);
    assert_eq!(addresses["subscribe"], json!(["*"]), "{addresses}");
    assert_eq!(addresses["unsubscribe"], json!(["*"]), "{addresses}");
    let policies = istiod.subscription(&stream, AUTHORIZATION_TYPE);
    assert_eq!(
        policies["subscribe"],
        json!([]),
        "policies stay wildcard: {policies}"
    );
    let first = istiod.wait_event("the first Address push", |e| {
        is(e, "push", ADDRESS_TYPE) && e["stream"] == stream
    });
    assert_eq!(
        first["resources"],
        json!([CLIENT_UID]),
        "its node's only: {first}"
    );

    // The first connection to the VIP makes ztunnel ask for it. It waits for a resource of the
    // name it asked for, which istiod's answer (named by the service, the IP an alias) is not,
    // so that one stays parked; what the answer brought carries the next ones.
    let parked = ringtun_testbed::echo::connect_in(&nodes.client, "10.96.0.10:80");
    let demand = istiod.wait_event("the demand", |e| {
        e["event"] == "request" && e["stream"] == stream && e["subscribe"] == json!(["/10.96.0.10"])
    });
    assert!(demand.get("node").is_none(), "{demand}");
    let push = istiod.wait_event("the answer", |e| {
        is(e, "push", ADDRESS_TYPE)
            && e["stream"] == stream
            && e["resources"]
                .as_array()
                .is_some_and(|r| r.contains(&json!("default/server.default.svc.cluster.local")))
    });
    assert_eq!(
        push["resources"],
        json!([SERVER_UID, "default/server.default.svc.cluster.local"]),
        "the service and the workload behind it: {push}"
    );
    let nonce = push["nonce"].clone();
    istiod.wait_event("the answer ACKed", |e| {
        e["event"] == "ack" && e["nonce"] == nonce
    });
    let echo = EchoServer::start(&nodes.server, "0.0.0.0:5201").expect("echo server");
    // The next one reaches the server's ztunnel, which asks for the client's IP in turn.
    let parked_there = ringtun_testbed::echo::connect_in(&nodes.client, "10.96.0.10:80");
    let server_stream = istiod.streams_of("10.77.0.2", 1).remove(0);
    let push = istiod.wait_event("the source's answer", |e| {
        is(e, "push", ADDRESS_TYPE)
            && e["stream"] == server_stream
            && e["resources"] == json!([CLIENT_UID])
    });
    let nonce = push["nonce"].clone();
    istiod.wait_event("the source's answer ACKed", |e| {
        e["event"] == "ack" && e["nonce"] == nonce
    });
    let t = echo_ok(&nodes.client, "10.96.0.10:80", MIB);
    echo.records
        .wait_for(EVENT_WAIT, |r| r.sha256 == t.sha_sent)
        .expect("the workload got every byte");
    client.wait_line(&["connection complete", SERVER_ID]);
    let mut parked = parked.expect("the first connection was accepted");
    parked
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .expect("timeout");
    let mut buf = [0u8; 8];
    let still = std::io::Read::read(&mut parked, &mut buf).map_err(|e| e.kind());
    assert!(
        matches!(
            still,
            Err(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
        ),
        "ztunnel's first connection still waits for a resource named /10.96.0.10: {still:?}"
    );
    drop((parked, parked_there));

    // An IP nobody knows: answered as removed, and ztunnel passes the connection through.
    let n = echoed_bytes(&nodes.client, "10.96.0.99:80");
    assert_eq!(n, 0);
    let gone = istiod.wait_event("the unknown IP answered", |e| {
        is(e, "push", ADDRESS_TYPE) && e["removed"] == json!(["/10.96.0.99"])
    });
    let nonce = gone["nonce"].clone();
    istiod.wait_event("the removal ACKed", |e| {
        e["event"] == "ack" && e["nonce"] == nonce
    });

    // A new stream keeps the subscription empty and names what is held, the names asked for
    // among them.
    istiod.command("close");
    let again = istiod.streams_of("10.77.0.1", 2).remove(1);
    let resub = istiod.subscription(&again, ADDRESS_TYPE);
    assert_eq!(resub["subscribe"], json!(["*"]), "{resub}");
    assert_eq!(resub["unsubscribe"], json!(["*"]), "{resub}");
    let held = resub["initial"].as_object().cloned().unwrap_or_default();
    for name in [CLIENT_UID, SERVER_UID, "/10.96.0.10"] {
        assert!(held.contains_key(name), "{name} in {resub}");
    }
    echo_ok(&nodes.client, "10.96.0.10:80", MIB);
}
