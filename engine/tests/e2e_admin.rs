//! The admin API end to end in network namespaces: `/config_dump`, `/logging` (live filter
//! changes, POST only), `/quitquitquit` refusing a GET, and the admin port on loopback only while
//! metrics and readiness answer on every address.
//!
//! Each test builds its own namespaces; they need root and fail without it.

mod common;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use ringtun_testbed::DEFAULT_MARK as MARK;

const LOG_WAIT: Duration = Duration::from_secs(10);

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

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
    // As ztunnel: the file's view names the workload's services, the live view has the
    // workload as the service's endpoint.
    let static_server = dump["staticConfig"]["workloads"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["name"] == "server"))
        .unwrap_or_else(|| panic!("no static workload server in {dump:#}"));
    assert!(
        static_server["services"]
            .get(format!("default/{SERVICE_HOST}"))
            .is_some(),
        "{static_server:#}"
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
    assert_eq!(
        svc["endpoints"][w["uid"].as_str().unwrap_or_default()]["port"]["80"],
        5201,
        "{svc:#}"
    );
    assert_eq!(dump["policies"], serde_json::json!([]), "{dump:#}");
    let cert = &dump["certificates"][0];
    assert_eq!(cert["identity"], SERVER_ID, "{dump:#}");
    assert_eq!(cert["state"], "Available", "{dump:#}");
    // RFC 3339 in UTC; a year at least this one's means an expiry not yet past.
    let expiry = cert["certChain"][0]["expirationTime"]
        .as_str()
        .unwrap_or_default();
    let this_year = 1970 + now_unix() / 31_556_952;
    assert!(
        expiry.ends_with('Z')
            && expiry
                .get(..4)
                .and_then(|y| y.parse::<u64>().ok())
                .is_some_and(|y| y >= this_year),
        "certificate expiry in the future: {cert:#}"
    );
    assert_eq!(dump["config"]["numWorkerThreads"], 1, "{dump:#}");
    let own = &dump["ringtun"];
    assert_eq!(own["shards"], 1, "{dump:#}");
    assert_eq!(own["configGeneration"], 1, "{dump:#}");
    assert_eq!(own["draining"], false, "{dump:#}");
    assert!(
        ["io_uring", "legacy"].contains(&own["driver"].as_str().unwrap_or_default()),
        "{dump:#}"
    );
    let (_, body) = http_in(client, ADMIN, "GET", "/config_dump").expect("client config_dump");
    let cdump: serde_json::Value = serde_json::from_str(&body).expect("client config_dump JSON");
    assert_eq!(cdump["certificates"][0]["identity"], CLIENT_ID, "{cdump:#}");

    // ztunnel's pprof endpoints, in text: mimalloc's heap figures, CPU by thread.
    let (st, body) = http_in(server, ADMIN, "GET", "/debug/pprof/heap").expect("heap");
    assert_eq!(st, 200, "{body}");
    assert!(
        body.lines()
            .find_map(|l| l.strip_prefix("current_rss_bytes "))
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|b| b > 0),
        "{body}"
    );
    let (st, body) =
        http_in(server, ADMIN, "GET", "/debug/pprof/profile?seconds=1").expect("profile");
    assert_eq!(st, 200, "{body}");
    assert!(
        body.lines().any(|l| l.starts_with("ringtun-shard-0 ")),
        "every shard by name: {body}"
    );
    let (st, _) = http_in(server, ADMIN, "GET", "/debug/pprof/profile?seconds=0").expect("profile");
    assert_eq!(st, 400, "seconds out of ztunnel's 1 to 300");

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
    assert!(line.contains("\tdebug\t"), "logged at debug: {line}");
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
