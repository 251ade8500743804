//! Service load balancing end to end, as ztunnel's `load_balance` does it: a service with an
//! endpoint in the client's zone and one in another zone. `Failover` over the zone sends every
//! connection to the same-zone endpoint while it exists and to the other once the config no
//! longer has it (live reload); `Strict` without a same-zone endpoint refuses the connection
//! (a close) with ztunnel's `no healthy upstream` error and no Istio metric. The real ztunnel,
//! as the client with the same config, picks the same endpoints and refuses the same
//! connection. A fourth service has no workload listing it: its one endpoint is written in its
//! own `endpoints`, and both proxies carry checksummed bytes to it.
//!
//! The two endpoints are two workloads named `default/server` (the server ringtun serves both):
//! `near` on 10.77.0.2 (zone z1, the client's) with target port 5201, `far` on 10.77.0.3
//! (zone z2) with 5202, so the echo server that answers tells which one was chosen.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ringtun_testbed::{EchoServer, Netns, TwoNodes};

const LOG_WAIT: Duration = Duration::from_secs(10);
/// `Failover` over region and zone; endpoints `near` and `far`.
const FAILOVER_VIP: &str = "10.96.0.10:80";
/// `Strict` over the zone; endpoint `far` only.
const STRICT_VIP: &str = "10.96.0.11:80";
/// `Failover` over the zone; endpoint `far` only.
const FALLBACK_VIP: &str = "10.96.0.12:80";
/// No load-balancer settings and no workload listing it: its one endpoint, `far`, is written
/// in its own `endpoints`.
const WRITTEN_VIP: &str = "10.96.0.13:80";
const NEAR: &str = "10.77.0.2:5201";
const FAR: &str = "10.77.0.3:5202";

/// The config both proxies read; `with_near`: whether the same-zone endpoint is in it.
fn config(with_near: bool) -> String {
    let workload = |uid: &str, name: &str, ip: &str, zone: &str, node: &str, services: &str| {
        format!(
            "- uid: cluster1//v1/Pod/default/{uid}\n  name: {name}\n  namespace: default\n  \
             serviceAccount: {name}\n  workloadName: {name}\n  trustDomain: cluster.local\n  \
             workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: {node}\n  network: \"\"\n  \
             locality: {{region: r1, zone: {zone}, subzone: \"\"}}\n  services: {services}\n"
        )
    };
    let host = |name: &str| format!("{name}.default.svc.cluster.local");
    let svc_key = |name: &str| format!("\"default/{}\"", host(name));
    let mut text = String::from("# written by e2e_balance\nworkloads:\n");
    text += &workload("client", "client", "10.77.0.1", "z1", "node-a", "{}");
    if with_near {
        let near = format!("{{{}: {{80: 5201}}}}", svc_key("failover"));
        text += &workload("server-near", "server", "10.77.0.2", "z1", "node-b", &near);
    }
    let far = format!(
        "{{{}: {{80: 5202}}, {}: {{80: 5202}}, {}: {{80: 5202}}}}",
        svc_key("failover"),
        svc_key("strict"),
        svc_key("fallback")
    );
    text += &workload("server-far", "server", "10.77.0.3", "z2", "node-c", &far);
    text += "services:\n";
    for (name, vip, prefs, mode) in [
        ("failover", FAILOVER_VIP, "[Region, Zone]", "Failover"),
        ("strict", STRICT_VIP, "[Zone]", "Strict"),
        ("fallback", FALLBACK_VIP, "[Zone]", "Failover"),
    ] {
        let vip = vip.trim_end_matches(":80");
        text += &format!(
            "- name: {name}\n  namespace: default\n  hostname: {}\n  vips: [/{vip}]\n  \
             ports: {{80: 5201}}\n  loadBalancer: {{routingPreferences: {prefs}, mode: {mode}, \
             healthPolicy: OnlyHealthy}}\n",
            host(name)
        );
    }
    // The endpoint's key and workloadUid are far's uid, as istiod writes them; its port map
    // sends 80 to 5202 where the service's own target is 5201.
    let far_uid = "cluster1//v1/Pod/default/server-far";
    text += &format!(
        "- name: written\n  namespace: default\n  hostname: {}\n  vips: [/{}]\n  \
         ports: {{80: 5201}}\n  endpoints:\n    \"{far_uid}\": {{workloadUid: \"{far_uid}\", \
         port: {{80: 5202}}, status: Healthy}}\n",
        host("written"),
        WRITTEN_VIP.trim_end_matches(":80")
    );
    text + "policies: []\n"
}

/// The far endpoint's address, and an echo server behind each endpoint (any address: the
/// record's local address tells which was reached).
fn endpoints(nodes: &TwoNodes) -> (EchoServer, EchoServer) {
    nodes
        .server
        .add_address(nodes.ifname(), "10.77.0.3/24")
        .expect("add 10.77.0.3");
    (
        echo_server(&nodes.server, "0.0.0.0:5201"),
        echo_server(&nodes.server, "0.0.0.0:5202"),
    )
}

/// Where a connection to `vip` went: the endpoint address the echo server saw reached, after a
/// checksummed echo of `n` bytes (each call a different `n`, so its record is its own).
fn reached(ns: &Netns, vip: &str, n: u64, echoes: &(EchoServer, EchoServer)) -> String {
    let t = echo_ok(ns, vip, n);
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        let seen = [&echoes.0, &echoes.1].iter().find_map(|e| {
            e.records
                .all()
                .into_iter()
                .find(|r| r.sha256 == t.sha_sent && r.bytes == n)
        });
        if let Some(r) = seen {
            return r.local.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no endpoint recorded the {n} bytes sent to {vip}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `count` connections to `vip`; the endpoints they reached, each once, sorted.
fn spread(
    ns: &Netns,
    vip: &str,
    count: u64,
    base: u64,
    echoes: &(EchoServer, EchoServer),
) -> Vec<String> {
    let mut seen: Vec<String> = (0..count)
        .map(|i| reached(ns, vip, base + i * 7, echoes))
        .collect();
    seen.sort();
    seen.dedup();
    seen
}

#[test]
fn failover_stays_in_the_zone_until_the_endpoint_leaves_and_strict_refuses() {
    let mut opts = MeshOptions::new("lbf");
    opts.config = config(true);
    let m = Mesh::start(opts);
    let echoes = endpoints(&m.nodes);
    let client = &m.nodes.client;

    assert_eq!(spread(client, FAILOVER_VIP, 12, 40_000, &echoes), [NEAR]);
    assert_eq!(spread(client, FALLBACK_VIP, 3, 50_000, &echoes), [FAR]);
    // A service whose only endpoint is written in its own `endpoints` carries checksummed
    // bytes to it, on the port that endpoint's map gives.
    assert_eq!(spread(client, WRITTEN_VIP, 3, 55_000, &echoes), [FAR]);
    let line = m
        .client
        .wait_access("a failover connection", LOG_WAIT, |l| {
            l.is("direction", "outbound")
                && l.is("dst.service", "failover.default.svc.cluster.local")
        });
    assert!(line.is("dst.hbone_addr", NEAR), "{}", line.raw);

    // Strict with no endpoint in the client's zone: refused by closing the socket (the client,
    // which sent nothing, reads end of file, as from ztunnel), logged as ztunnel logs it (an
    // early `connection failed`), and counted in no Istio metric.
    assert_eq!(refusal(client, STRICT_VIP), "eof");
    let refused = m.client.wait_access("the strict refusal", LOG_WAIT, |l| {
        l.get("error")
            .is_some_and(|e| e.contains(&format!("no healthy upstream: {STRICT_VIP}")))
    });
    assert!(refused.is("direction", "outbound"), "{}", refused.raw);
    assert!(m.client.log().contains("connection failed"));
    let scrape = Scrape::take(client, false);
    let strict = [("destination_service", "strict.default.svc.cluster.local")];
    assert_eq!(
        scrape.sum("istio_tcp_connections_opened_total", &strict),
        0.0
    );

    // The same-zone endpoint leaves the config: the next connections fail over to the other.
    write_atomic(&m.config, &config(false));
    m.client.wait_log_count("config reloaded", 1, LOG_WAIT);
    let local = echo_eventually(client, FAILOVER_VIP, 1000, LOG_WAIT);
    let line = m.client.wait_access("after the reload", LOG_WAIT, |l| {
        l.is("src.addr", &local.to_string())
    });
    assert!(line.is("dst.hbone_addr", FAR), "{}", line.raw);
    assert_eq!(spread(client, FAILOVER_VIP, 8, 60_000, &echoes), [FAR]);
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}

/// How a connection to `dst` that is refused ends, read without writing first (a write after
/// a reset would take the error and leave the read an EOF): `reset` or `eof`.
fn refusal(ns: &Netns, dst: &str) -> String {
    let mut s = match connect_in(ns, dst) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return "reset".into(),
        Err(e) => panic!("connect {dst}: {e}"),
    };
    s.set_read_timeout(Some(LOG_WAIT)).expect("read timeout");
    let mut buf = [0u8; 64];
    match std::io::Read::read(&mut s, &mut buf) {
        Ok(0) => "eof".into(),
        Ok(n) => panic!("{dst}: expected a refusal, got {n} bytes"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset".into(),
        Err(e) => panic!("{dst}: neither reset nor closed: {e}"),
    }
}

/// What a client proxy did with the four services: where each reachable one went, and how
/// the strict one ended.
fn outcomes(ns: &Netns, base: u64, echoes: &(EchoServer, EchoServer)) -> Vec<String> {
    vec![
        spread(ns, FAILOVER_VIP, 6, base, echoes).join(" "),
        spread(ns, FALLBACK_VIP, 3, base + 1000, echoes).join(" "),
        spread(ns, WRITTEN_VIP, 3, base + 2000, echoes).join(" "),
        refusal(ns, STRICT_VIP),
    ]
}

#[test]
fn ztunnel_chooses_the_same_endpoints() {
    let (nodes, dir, path) = ztunnel_topology("lbz", &config(true));
    let echoes = endpoints(&nodes);
    let server = Ringtun::start_as(&nodes.server, "server", dir.path(), &path, one_worker());

    let ztunnel = Ztunnel::start(&nodes.client, "client", &path, dir.path());
    let theirs = outcomes(&nodes.client, 70_000, &echoes);
    let z_line = ztunnel.wait_access(&["no healthy upstream", STRICT_VIP]);
    drop(ztunnel);

    let client = Ringtun::start_as(&nodes.client, "client", dir.path(), &path, one_worker());
    let ours = outcomes(&nodes.client, 80_000, &echoes);
    assert_eq!(ours[..3], [NEAR, FAR, FAR], "ringtun's choices");
    assert_eq!(ours[..3], theirs[..3], "ringtun and ztunnel choose alike");
    // Both refuse the strict service without a byte of answer, and end it alike: both drop
    // the socket, so a client that has sent nothing reads end of file.
    assert_eq!(ours[3], "eof", "ringtun's refusal");
    assert_eq!(ours[3], theirs[3], "ringtun's refusal ends as ztunnel's");
    let r_line = client.wait_access("the strict refusal", LOG_WAIT, |l| {
        l.get("error")
            .is_some_and(|e| e.contains("no healthy upstream"))
    });
    let error = r_line.get("error").unwrap_or_default();
    assert!(
        z_line.contains(error),
        "the same error as ztunnel's: {error:?} in {z_line}"
    );
    client.assert_no_panic();
    server.assert_no_panic();
}
