//! End-to-end tests of the DNS proxy (ztunnel's, on 15053) in network namespaces, asserted
//! with an independent client (`tests/peers/dns_query.py`, dnspython) and answered upstream by
//! an independent server (`tests/peers/dns_upstream.py`): mesh names in every short form, a
//! headless service, forwarded names relayed as the upstream wrote them (its TTL, its id, its
//! NXDOMAIN, its truncation and the TCP retry), garbage refused with the next query still
//! answered, and the metrics; in dedicated mode, in node mode (the client found by its
//! address) and in in-pod mode (the listener and the upstream query inside the pod).

mod common;
mod inpod_common;

use std::path::Path;
use std::time::Duration;

use common::*;
use inpod_common::node::*;
use inpod_common::*;
use ringtun_testbed::{Netns, Process, RunFiles};
use serde_json::Value;

/// The mesh of `mesh_config` plus a headless service `db` (the server pod its endpoint), a
/// service of another namespace, and canonical names for the metrics' labels.
fn dns_config() -> String {
    let base = mesh_config(&["/10.96.0.10"], false);
    let base = base.replace(
        "  workloadName: client\n",
        "  workloadName: client\n  canonicalName: client-app\n  canonicalRevision: v1\n",
    );
    let base = base.replace("  node: node-b\n", "  node: node-b\n  hostname: server-0\n");
    let base = base.replace(
        "      80: 5201\nservices:",
        "      80: 5201\n    \"default/db.default.svc.cluster.local\":\n      5432: 5432\nservices:",
    );
    base.replace(
        "policies: []",
        r#"- name: db
  namespace: default
  hostname: db.default.svc.cluster.local
  vips: []
  ports:
    5432: 5432
- name: other
  namespace: prod
  hostname: other.prod.svc.cluster.local
  vips:
    - /10.96.0.20
  ports:
    80: 80
policies: []"#,
    )
}

/// `dns_query.py ARGS…` in `ns`: its one JSON line.
fn dig(ns: &Netns, args: &[&str]) -> Value {
    let mut cmd = ns.exec("python3");
    cmd.arg(peers_dir().join("dns_query.py")).args(args);
    let out = cmd.output().expect("run python3 dns_query.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "dns_query.py {args:?}: {e}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Asks `server:port` for `name` (type `t`, UDP unless `tcp`).
fn ask(ns: &Netns, server: &str, port: &str, name: &str, t: &str, tcp: bool) -> Value {
    let mut args = vec![
        "--server", server, "--port", port, "--name", name, "--type", t,
    ];
    if tcp {
        args.push("--tcp");
    }
    dig(ns, &args)
}

/// The `(name, type, ttl, value)` of every answer record.
fn records(v: &Value) -> Vec<(String, String, u64, String)> {
    v["answers"]
        .as_array()
        .unwrap_or_else(|| panic!("no answers array: {v}"))
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap_or_default().to_owned(),
                a["type"].as_str().unwrap_or_default().to_owned(),
                a["ttl"].as_u64().unwrap_or_default(),
                a["value"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn rec(name: &str, t: &str, ttl: u64, value: &str) -> (String, String, u64, String) {
    (name.into(), t.into(), ttl, value.into())
}

/// The upstream test server on `listen` in `ns`, awaited until it listens.
fn upstream(ns: &Netns, dir: &Path, listen: &str) -> Process {
    let ready = dir.join(format!("upstream-{}.ready", ns.name()));
    let mut cmd = ns.exec("python3");
    cmd.arg(peers_dir().join("dns_upstream.py"))
        .args(["--listen", listen, "--ready"])
        .arg(&ready);
    let log = dir.join(format!("dns-upstream-{}.log", ns.name()));
    let mut p = Process::spawn(cmd, "dns_upstream.py", &log).expect("spawn dns_upstream.py");
    p.wait_until("listening", Duration::from_secs(15), |_| ready.exists())
        .unwrap_or_else(|e| panic!("{e}"));
    p
}

/// The mesh's answers and the forwarded ones, as a client at `server:port` sees them.
fn check_answers(ns: &Netns, server: &str, port: &str, upstream_log: &Process) {
    let vip = "10.96.0.10";
    // The service by its FQDN and every short form the client's namespace allows, over UDP
    // and TCP: ringtun's TTL (30 s), authoritative, the name as asked.
    for name in [
        "server.default.svc.cluster.local",
        "server",
        "server.default",
        "server.default.svc",
    ] {
        for tcp in [false, true] {
            let v = ask(ns, server, port, name, "A", tcp);
            assert_eq!(v["rcode"], "NOERROR", "{name} tcp={tcp}: {v}");
            assert_eq!(v["aa"], true, "{name}: {v}");
            assert_eq!(v["id"], v["query_id"], "{name}: {v}");
            assert_eq!(
                records(&v),
                [rec(&format!("{name}."), "A", 30, vip)],
                "{name} tcp={tcp}"
            );
        }
    }
    // A search domain appended by the client's resolver: a CNAME to the short form.
    let v = ask(
        ns,
        server,
        port,
        "server.default.default.svc.cluster.local",
        "A",
        false,
    );
    assert_eq!(
        records(&v),
        [
            rec(
                "server.default.default.svc.cluster.local.",
                "CNAME",
                30,
                "server.default."
            ),
            rec("server.default.", "A", 30, vip)
        ],
        "{v}"
    );
    // Another namespace's service: by name.namespace, not by its bare name (forwarded, and the
    // upstream refuses names outside .test).
    let v = ask(ns, server, port, "other.prod", "A", false);
    assert_eq!(records(&v), [rec("other.prod.", "A", 30, "10.96.0.20")]);
    let v = ask(ns, server, port, "other", "A", false);
    assert_eq!(v["rcode"], "REFUSED", "forwarded as it came: {v}");
    // No IPv6 VIP: the name exists, so NOERROR with nothing.
    let v = ask(ns, server, port, "server", "AAAA", false);
    assert_eq!(
        (v["rcode"].as_str(), v["aa"].as_bool()),
        (Some("NOERROR"), Some(true))
    );
    assert!(records(&v).is_empty(), "{v}");
    // The headless service: its endpoint's address.
    let v = ask(ns, server, port, "db.default.svc.cluster.local", "A", false);
    assert_eq!(
        records(&v),
        [rec("db.default.svc.cluster.local.", "A", 30, "10.77.0.2")]
    );
    let v = ask(ns, server, port, "server-0.db", "A", false);
    assert_eq!(
        records(&v),
        [rec("server-0.db.", "A", 30, "10.77.0.2")],
        "the headless pod by <hostname>.<subdomain>: {v}"
    );

    // Forwarded: the upstream's answer as it wrote it (its TTL, its AA), the client's id.
    let v = ask(ns, server, port, "www.example.test", "A", false);
    assert_eq!(v["id"], v["query_id"], "{v}");
    assert_eq!(
        records(&v),
        [rec("www.example.test.", "A", 1234, "192.0.2.7")]
    );
    assert_eq!(v["aa"], true, "the upstream's flags are relayed: {v}");
    let v = ask(ns, server, port, "missing.test", "A", true);
    assert_eq!(v["rcode"], "NXDOMAIN", "{v}");
    // Truncated over UDP: retried upstream over TCP; 60 records do not fit the client's 512
    // bytes, so it gets TC and asks again over TCP, which gets all of them.
    let v = ask(ns, server, port, "big.test", "A", false);
    assert_eq!(v["tc"], true, "{v}");
    let v = ask(ns, server, port, "big.test", "A", true);
    assert_eq!(records(&v).len(), 60, "{v}");
    let v = dig(
        ns,
        &[
            "--server", server, "--port", port, "--name", "big.test", "--edns", "4096",
        ],
    );
    assert_eq!(
        (v["tc"].as_bool(), records(&v).len()),
        (Some(false), 60),
        "{v}"
    );
    let log = upstream_log.log();
    assert!(
        log.contains("\"proto\": \"tcp\", ") && log.contains("\"name\": \"big.test.\""),
        "ringtun retried big.test over TCP upstream: {log}"
    );

    // Garbage: a header and junk gets FORMERR with its id; bytes too short for a header get
    // nothing; either way the next query is answered.
    let v = dig(
        ns,
        &[
            "--server",
            server,
            "--port",
            port,
            "--raw",
            "beef01000001000000000000ff00ff",
        ],
    );
    assert_eq!(
        (v["id"].as_u64(), v["rcode"].as_str()),
        (Some(0xbeef), Some("FORMERR")),
        "{v}"
    );
    let v = dig(ns, &["--server", server, "--port", port, "--raw", "0102"]);
    assert!(v["error"].is_string(), "no answer to 2 bytes: {v}");
    let v = ask(ns, server, port, "server", "A", false);
    assert_eq!(records(&v), [rec("server.", "A", 30, vip)], "after garbage");
}

/// Dedicated mode: ringtun serves default/client in the client namespace, DNS on
/// localhost:15053 (ztunnel's default address), the upstream on the server node.
#[test]
fn dedicated_mode_answers_the_mesh_and_forwards_the_rest() {
    let nodes = two_nodes("dnsd");
    let dir = TempDir::new("e2e-dns-dedicated");
    gen_certs(dir.path(), "cluster.local", &["default/client"]);
    let config = dir.join("config.yaml");
    write_atomic(&config, &dns_config());
    let up = upstream(&nodes.server, dir.path(), "10.77.0.2:5353");
    let mut extra = one_worker();
    extra.extend(["--dns-upstream".into(), "10.77.0.2:5353".into()]);
    let client = Ringtun::start_as(&nodes.client, "client", dir.path(), &config, extra);

    check_answers(&nodes.client, "127.0.0.1", "15053", &up);
    check_answers(&nodes.client, "::1", "15053", &up);

    let s = Scrape::take(&nodes.client, false);
    let me = |proto: &'static str, t: &'static str| {
        [
            ("request_query_type", t),
            ("request_protocol", proto),
            ("source_canonical_service", "client-app"),
            ("source_canonical_revision", "v1"),
        ]
    };
    // Twice `check_answers`: 13 A queries over UDP, 6 over TCP, one AAAA; 4 of the UDP ones
    // forwarded, 2 of those failed as ztunnel counts failures (REFUSED, and big.test whose
    // relayed answer is truncated), and 2 over TCP (NXDOMAIN failed).
    for (name, proto, t, want) in [
        ("istio_dns_requests_total", "udp", "a", 26.0),
        ("istio_dns_requests_total", "tcp", "a", 12.0),
        ("istio_dns_requests_total", "udp", "aaaa", 2.0),
        ("istio_dns_upstream_requests_total", "udp", "a", 8.0),
        ("istio_dns_upstream_requests_total", "tcp", "a", 4.0),
        ("istio_dns_upstream_failures_total", "udp", "a", 4.0),
        ("istio_dns_upstream_failures_total", "tcp", "a", 2.0),
        (
            "istio_dns_upstream_request_duration_seconds_count",
            "udp",
            "a",
            8.0,
        ),
    ] {
        assert_eq!(s.one(name, &me(proto, t)), want, "{name} {proto} {t}");
    }
    s.assert_family("istio_dns_upstream_request_duration_seconds", "histogram");

    // A config reload: a new service resolves without a restart, a removed one no longer does.
    let reloaded = dns_config().replace(
        "- name: other\n  namespace: prod",
        "- name: late\n  namespace: default\n  hostname: late.default.svc.cluster.local\n  vips:\n    - /10.96.0.30\n  ports:\n    80: 80\n- name: other\n  namespace: prod",
    );
    let reloaded = reloaded.replace("    - /10.96.0.20\n", "    - /10.96.0.21\n");
    write_atomic(&config, &reloaded);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let v = ask(&nodes.client, "127.0.0.1", "15053", "late", "A", false);
        if records(&v) == [rec("late.", "A", 30, "10.96.0.30")] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new service never resolved: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = ask(
        &nodes.client,
        "127.0.0.1",
        "15053",
        "other.prod",
        "A",
        false,
    );
    assert_eq!(records(&v), [rec("other.prod.", "A", 30, "10.96.0.21")]);
    drop(client);
}

/// Node mode: one ringtun serves the node's workloads with DNS on every address; the client
/// is whoever the query comes from, so short names expand in its namespace; an address no
/// workload has gets SERVFAIL, as ztunnel answers an unknown client.
/// A node-mode ringtun in `ns` whose DNS proxy listens on 10.77.0.2:15053 and forwards to
/// `upstream`, ready.
fn node_ringtun(ns: &Netns, dir: &TempDir, config: &Path, upstream: &str) -> Process {
    let mut cmd = RunFiles::new(config, dir.path(), "default/server")
        .with_workload(None)
        .command(ns, ringtun_bin());
    cmd.args([
        "--node",
        "node-b",
        "--workers",
        "1",
        "--dns-upstream",
        upstream,
    ])
    .env("ISTIO_META_DNS_PROXY_ADDR", "10.77.0.2:15053")
    .env("RINGTUN_LOG", "info")
    .env("NO_COLOR", "1");
    let mut p = Process::spawn(cmd, "ringtun (node)", &dir.join("ringtun-node.log"))
        .expect("spawn ringtun");
    p.wait_ready(ns, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    p
}

#[test]
fn node_mode_finds_the_client_by_its_address() {
    let nodes = two_nodes("dnsn");
    let dir = TempDir::new("e2e-dns-node");
    gen_certs(dir.path(), "cluster.local", &["default/server"]);
    let config = dir.join("config.yaml");
    write_atomic(&config, &dns_config());
    let up = upstream(&nodes.server, dir.path(), "10.77.0.2:5353");
    let p = node_ringtun(&nodes.server, &dir, &config, "10.77.0.2:5353");

    check_answers(&nodes.client, "10.77.0.2", "15053", &up);
    // From the server's own address: that workload is in namespace default too.
    let v = ask(&nodes.server, "10.77.0.2", "15053", "server", "A", false);
    assert_eq!(records(&v), [rec("server.", "A", 30, "10.96.0.10")]);
    // An address no workload has: SERVFAIL, counted with an unknown source.
    nodes
        .server
        .ip(["addr", "add", "10.77.0.99/32", "dev", "lo"])
        .expect("add an address");
    let v = dig(
        &nodes.server,
        &[
            "--server",
            "10.77.0.2",
            "--port",
            "15053",
            "--name",
            "server",
            "--source",
            "10.77.0.99",
        ],
    );
    assert_eq!(v["rcode"], "SERVFAIL", "{v}");
    let s = Scrape::take(&nodes.server, false);
    assert!(
        s.sum(
            "istio_dns_requests_total",
            &[("source_canonical_service", "unknown")]
        ) >= 1.0,
        "{}",
        s.what
    );
    drop(p);
}

/// In-pod mode: the pod's DNS listener is inside the pod (127.0.0.1:15053 and ::1 there, not
/// on the node), answers as the pod's workload, forwards from inside the pod (the upstream
/// listens on the pod's own loopback, which the node cannot reach), and goes with the pod.
#[test]
fn in_pod_mode_serves_dns_inside_each_pod() {
    let dir = TempDir::new("e2e-dns-inpod");
    let node = netns("dnsi");
    let pod = netns("dnsp");
    let config = dir.join("config.yaml");
    write_atomic(&config, &dns_config());
    let ca = NodeCa::generate(&dir.join("ca"));
    let up = upstream(&pod, dir.path(), "127.0.0.1:5353");
    let mut agent = NodeAgent::start(&dir.join("zds.sock"), dir.path());
    let mut ringtun = spawn_shared_with(
        &node,
        "inpod",
        dir.path(),
        &config,
        &agent.socket,
        &ca,
        &[],
        &["--dns-upstream", "127.0.0.1:5353"],
    );
    assert_eq!(agent.accept(), 1);
    assert_eq!(agent.ack(&add_pod("uid-dns", &pod, "client")), "");
    assert_eq!(agent.ack("snapshot"), "");
    wait_ready(&mut ringtun, &node);
    wait_ports(&pod, "the pod's DNS listener", |p| p.contains(&15053));
    assert!(
        !listening_ports(&node).contains(&15053),
        "DNS belongs in the pod, not on the node"
    );

    check_answers(&pod, "127.0.0.1", "15053", &up);
    let s = Scrape::take(&node, false);
    assert!(
        s.sum(
            "istio_dns_requests_total",
            &[("source_canonical_service", "client-app")]
        ) == 20.0,
        "{}",
        s.what
    );

    assert_eq!(agent.ack("del uid-dns"), "");
    wait_ports(&pod, "the pod's DNS listener gone", |p| !p.contains(&15053));
    let v = ask(&pod, "127.0.0.1", "15053", "server", "A", false);
    assert!(v["error"].is_string(), "no DNS after del: {v}");
}

/// `/etc/netns/NAME/resolv.conf`, which `ip netns exec NAME` mounts over `/etc/resolv.conf`
/// for what it runs (ztunnel reads its upstreams there); removed on drop.
struct NetnsResolvConf(std::path::PathBuf);

impl NetnsResolvConf {
    fn write(ns: &Netns, text: &str) -> NetnsResolvConf {
        let dir = Path::new("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).expect("create /etc/netns/NAME");
        std::fs::write(dir.join("resolv.conf"), text).expect("write resolv.conf");
        NetnsResolvConf(dir)
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What two answers must share: the rcode and the records; for a forwarded name the values
/// only (ztunnel's resolver caches, so its TTLs count down, and writes its own flags).
fn comparable(v: &Value, forwarded: bool) -> (String, Vec<(String, String, u64, String)>) {
    let mut recs = records(v);
    if forwarded {
        for r in &mut recs {
            r.2 = 0;
        }
    }
    recs.sort();
    (v["rcode"].as_str().unwrap_or("none").to_owned(), recs)
}

/// The same queries from the same client to the real ztunnel (dedicated mode for
/// default/client, DNS capture on) and to ringtun (node mode, the client found by its
/// address): the same answers, and the same metric families and labels.
#[test]
fn answers_match_ztunnels() {
    let nodes = two_nodes("dnsz");
    let dir = TempDir::new("e2e-dns-ztunnel");
    use_test_ca(&dir);
    gen_certs(dir.path(), "cluster.local", &["default/server"]);
    let config = dir.join("config.yaml");
    let text = dns_config().replace(
        "  network: \"\"\n",
        "  network: \"\"\n  trustDomain: cluster.local\n",
    );
    write_atomic(&config, &text);
    let up = upstream(&nodes.server, dir.path(), "10.77.0.2:53");
    let _resolv = NetnsResolvConf::write(
        &nodes.client,
        "nameserver 10.77.0.2\nsearch default.svc.cluster.local svc.cluster.local cluster.local\n",
    );
    let z = Ztunnel::start_env(
        &nodes.client,
        "client",
        &config,
        dir.path(),
        &[("ISTIO_META_DNS_CAPTURE", "true")],
    );
    let p = node_ringtun(&nodes.server, &dir, &config, "10.77.0.2:53");

    let queries: &[(&str, &str, bool)] = &[
        ("server.default.svc.cluster.local", "A", false),
        ("server", "A", false),
        ("server.default", "A", false),
        ("server.default.svc", "A", false),
        ("server", "AAAA", false),
        ("server.default.default.svc.cluster.local", "A", false),
        ("other.prod", "A", false),
        ("db.default.svc.cluster.local", "A", false),
        // Not `server-0.db`: this ztunnel (62d8265) predates ztunnel's names for a headless
        // service's pods, which ringtun answers as later ztunnels do; a name that is no pod's
        // is forwarded by both.
        ("server.db", "A", true),
        ("other", "A", true),
        ("www.example.test", "A", true),
        ("missing.test", "A", true),
    ];
    let mut differ = Vec::new();
    for &(name, t, forwarded) in queries {
        for tcp in [false, true] {
            let zt = ask(&nodes.client, "127.0.0.1", "15053", name, t, tcp);
            let rt = ask(&nodes.client, "10.77.0.2", "15053", name, t, tcp);
            assert!(
                zt["error"].is_null(),
                "ztunnel did not answer {name}: {zt}\n{}",
                z.log()
            );
            let (a, b) = (comparable(&zt, forwarded), comparable(&rt, forwarded));
            if a != b {
                differ.push(format!(
                    "{name} {t} tcp={tcp}:\n  ztunnel {zt}\n  ringtun {rt}"
                ));
            }
            if !forwarded {
                assert_eq!(zt["aa"], rt["aa"], "{name}: {zt} / {rt}");
            }
        }
    }
    // What is not a plain query: garbage after a header (FORMERR), a response (no answer),
    // another opcode (NOTIMP), two questions (SERVFAIL): the same from both.
    for raw in [
        "beef01000001000000000000ff00ff",
        "111181000001000000000000016104746573740000010001",
        "111211000001000000000000016104746573740000010001",
        "1113010000020000000000000161047465737400000100010162047465737400000100 01",
    ] {
        let raw = raw.replace(' ', "");
        let zt = dig(
            &nodes.client,
            &["--server", "127.0.0.1", "--port", "15053", "--raw", &raw],
        );
        let rt = dig(
            &nodes.client,
            &["--server", "10.77.0.2", "--port", "15053", "--raw", &raw],
        );
        let pick = |v: &Value| {
            (
                v["id"].clone(),
                v["rcode"].clone(),
                v["ra"].clone(),
                v["questions"].clone(),
                v["error"].is_string(),
            )
        };
        if pick(&zt) != pick(&rt) {
            differ.push(format!("raw {raw}:\n  ztunnel {zt}\n  ringtun {rt}"));
        }
    }
    assert!(differ.is_empty(), "answers differ:\n{}", differ.join("\n"));
    assert!(up.log().contains("www.example.test"), "{}", up.log());

    // The same families, with the same label names (values: ztunnel's client is its own
    // workload, ringtun's the same one found by address).
    let zs = Scrape::take(&nodes.client, false);
    let rs = Scrape::take(&nodes.server, false);
    for family in [
        "istio_dns_requests_total",
        "istio_dns_upstream_requests_total",
        "istio_dns_upstream_failures_total",
        "istio_dns_upstream_request_duration_seconds_count",
    ] {
        let keys = |s: &Scrape| {
            let mut k: Vec<Vec<String>> = s
                .select(family, &[])
                .iter()
                .map(|x| {
                    let mut l: Vec<String> = x.labels.keys().cloned().collect();
                    l.sort();
                    l
                })
                .collect();
            k.sort();
            k.dedup();
            k
        };
        assert!(!keys(&zs).is_empty(), "ztunnel has {family}");
        assert_eq!(keys(&zs), keys(&rs), "{family}");
        for proto in ["udp", "tcp"] {
            let want = [("request_protocol", proto), ("request_query_type", "a")];
            assert_eq!(
                zs.sum(family, &want),
                rs.sum(family, &want),
                "{family} {proto}"
            );
        }
    }
    drop(p);
    drop(z);
}
