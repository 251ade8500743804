//! ringtun with `XDS_ON_DEMAND=true` against the fake istiod (which
//! `xds_fake_istiod_ztunnel.rs` checks against ztunnel in the same mode): both proxies
//! subscribe to no address and to every policy, as ztunnel does; istiod sends each the
//! workloads of its node. The first connection to a service the client was never sent asks
//! istiod for its IP (`/10.96.0.10`), waits for the answer and carries checksummed bytes over
//! HBONE to the workload behind it; an IP istiod does not know is answered as removed and
//! the connection goes on as to an unknown destination (passed through, as ztunnel does),
//! without waiting for `XDS_ON_DEMAND_TIMEOUT`. A reconnect names what was asked for.

mod common;
mod xds_common;

use common::*;
use ringtun_testbed::{echoed_bytes, DEFAULT_MARK};
use serde_json::json;
use xds_common::*;

const MIB: u64 = 1 << 20;
const VIP: &str = "/10.96.0.10";

#[test]
fn an_unknown_destination_is_asked_for_and_carried_once_istiod_answers() {
    let (nodes, dir, _unused) = mesh_files("xod", "", |_| {});
    write_token(dir.path(), TOKEN);
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let resources = mesh_resources_on_nodes();
    let mut istiod = FakeIstiod::start(
        Some(&nodes.server),
        dir.path(),
        IstiodArgs::new(&ca_cert, &ca_key),
        &resources,
    );
    nodes
        .client
        .capture_outbound(15001, DEFAULT_MARK)
        .expect("outbound capture");
    let env = |node| {
        [
            ("XDS_ON_DEMAND", "true"),
            // As ztunnel: on-demand is refused with the DNS proxy on.
            ("ISTIO_META_DNS_CAPTURE", "false"),
            ("NODE_NAME", node),
            // Long, so that an answer is told from the wait running out.
            ("XDS_ON_DEMAND_TIMEOUT", "30s"),
        ]
    };
    let root = dir.join("ca.pem");
    let start = |who, ip, node| {
        XdsRingtun::spawn_custom(
            if who == "client" {
                &nodes.client
            } else {
                &nodes.server
            },
            who,
            ip,
            ISTIOD_URL,
            dir.path(),
            &root,
            true,
            &env(node),
        )
    };
    let server = start("server", "10.77.0.2", "node-server");
    let client = start("client", "10.77.0.1", "node-client");
    client.wait_lines(&["ringtun ready", "workloads=1", "services=0"], 1);
    server.wait_lines(&["ringtun ready", "workloads=1"], 1);

    // Subscribed as ztunnel on demand subscribes: no address, every policy.
    let stream = istiod.streams_of("10.77.0.1", 1).remove(0);
    let addresses = istiod.subscription(&stream, ADDRESS_TYPE);
    assert_eq!(addresses["subscribe"], json!(["*"]), "{addresses}");
    assert_eq!(addresses["unsubscribe"], json!(["*"]), "{addresses}");
    assert_eq!(addresses["initial"], json!({}), "{addresses}");
    let policies = istiod.subscription(&stream, AUTHORIZATION_TYPE);
    assert_eq!(policies["subscribe"], json!([]), "{policies}");
    assert_eq!(policies["unsubscribe"], json!([]), "{policies}");

    // The first connection to the service asks for it and is carried once istiod answers.
    let echo = EchoServer::start(&nodes.server, "0.0.0.0:5201").expect("echo server");
    let t = echo_ok(&nodes.client, "10.96.0.10:80", 4 * MIB);
    echo.records
        .wait_for(EVENT_WAIT, |r| r.sha256 == t.sha_sent)
        .expect("the workload got every byte");
    let demand = istiod.wait_event("the demand", |e| {
        e["event"] == "request" && e["stream"] == stream && e["subscribe"] == json!([VIP])
    });
    assert!(demand.get("node").is_none(), "{demand}");
    let asked = istiod.events().iter().filter(|e| is_demand(e)).count();
    assert_eq!(asked, 1, "one demand for one connection");
    let line = client.wait_access("the transfer", |l| l.is("src.addr", &t.local.to_string()));
    assert!(line.is("dst.identity", SERVER_ID), "{}", line.raw);
    assert!(
        line.is("dst.service", "server.default.svc.cluster.local"),
        "{}",
        line.raw
    );
    assert_eq!(line.num("bytes_recv"), 4 * MIB, "{}", line.raw);
    // Known now: the next connection does not ask again.
    echo_ok(&nodes.client, "10.96.0.10:80", MIB);
    let asked = istiod.events().iter().filter(|e| is_demand(e)).count();
    assert_eq!(asked, 1, "a known address is not asked for again");

    // An IP istiod does not know: answered as removed, passed through at once (where the
    // connect then times out, after 10 s).
    assert_eq!(echoed_bytes(&nodes.client, "10.96.0.99:80"), 0);
    istiod.wait_event("the unknown IP answered as removed", |e| {
        is(e, "push", ADDRESS_TYPE) && e["removed"] == json!(["/10.96.0.99"])
    });
    let unknown = client.wait_access("the unknown destination", |l| {
        l.is("dst.addr", "10.96.0.99:80")
    });
    assert!(
        !client.log().contains("no answer from istiod"),
        "answered, not timed out: {}",
        unknown.raw
    );
    assert!(unknown.is("path", "passthrough"), "{}", unknown.raw);
    let ms: u64 = unknown
        .get("duration")
        .and_then(|d| d.strip_suffix("ms"))
        .and_then(|d| d.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(
        ms < 20_000,
        "not held for XDS_ON_DEMAND_TIMEOUT: {}",
        unknown.raw
    );

    // A new stream keeps the empty subscription and names what was asked for.
    istiod.command("close");
    let again = istiod.streams_of("10.77.0.1", 2).remove(1);
    let resub = istiod.subscription(&again, ADDRESS_TYPE);
    assert_eq!(resub["subscribe"], json!(["*"]), "{resub}");
    let held = resub["initial"].as_object().cloned().unwrap_or_default();
    assert_eq!(held.get(VIP), Some(&json!("")), "{resub}");
    assert!(!held.contains_key("/10.96.0.99"), "forgotten: {resub}");
    for name in [CLIENT_UID, SERVER_UID] {
        assert!(held.contains_key(name), "{name}: {resub}");
    }
    client.wait_lines(&["xDS stream established"], 2);
    echo_ok(&nodes.client, "10.96.0.10:80", MIB);
}

fn is_demand(e: &serde_json::Value) -> bool {
    e["event"] == "request" && e["subscribe"] == json!([VIP])
}
