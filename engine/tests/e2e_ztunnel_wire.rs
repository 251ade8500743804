//! What an HBONE peer sees of ringtun's inbound, against the real ztunnel
//! (`../shared/ztunnel/ztunnel`) serving the same workload under the same config: the same
//! CONNECTs (to another address, to a service hostname, to the proxy's own ports, denied by
//! policy, to a port nothing listens on, malformed) get the same status from each, and a
//! carried one the same `baggage`. The client is the independent Python peer with a mesh
//! certificate from ztunnel's test CA. Needs root and the binary; fails, never skips, without
//! them.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use ringtun_testbed::Netns;

/// The server workload's port 5202 is denied to everyone; 5201 is open.
fn config() -> String {
    ztunnel_config().replace(
        "policies: []\n",
        "policies:\n- name: deny-5202\n  namespace: default\n  scope: Namespace\n  action: Deny\n  dryRun: false\n  rules:\n  - - - destinationPorts: [5202]\n",
    )
}

/// One CONNECT (or another method) a peer may send to the server node's 15008.
struct Case {
    what: &'static str,
    method: &'static str,
    authority: String,
}

fn cases() -> Vec<Case> {
    let connect = |what, authority: &str| Case {
        what,
        method: "CONNECT",
        authority: authority.to_owned(),
    };
    let mut v = vec![
        connect("carried", "10.77.0.2:5201"),
        connect("another mesh workload", "10.77.0.1:5201"),
        connect("an address of no workload", "10.77.0.9:5201"),
        connect("service hostname", &format!("{SERVICE_HOST}:80")),
        connect(
            "service hostname, unknown port",
            &format!("{SERVICE_HOST}:81"),
        ),
        connect("unknown hostname", "nosuch.default.svc.cluster.local:80"),
        connect("denied by policy", "10.77.0.2:5202"),
        connect("nothing listening", "10.77.0.2:5999"),
        connect("no port", "10.77.0.2"),
        connect("port zero", "10.77.0.2:0"),
        connect("not an address", "not an address"),
        Case {
            what: "GET",
            method: "GET",
            authority: "10.77.0.2:5201".into(),
        },
    ];
    for port in [15008, 15006, 15001, 15021, 15000, 15020] {
        v.push(Case {
            what: "own port",
            method: "CONNECT",
            authority: format!("10.77.0.2:{port}"),
        });
    }
    v
}

/// What the peer saw: the status (0 when none came) and the response's `baggage`.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u64,
    baggage: Option<String>,
}

fn probe(ns: &Netns, dir: &TempDir, case: &Case) -> Seen {
    let mut extra = vec!["--method", case.method, "--no-echo"];
    if case.method != "CONNECT" {
        extra.extend(["--path", "/"]);
    }
    let run = hbone_client(ns, dir, "default.client", &case.authority, 16, &extra);
    let Some(resp) = run.event("response") else {
        eprintln!("{} {}: no response: {run}", case.method, case.authority);
        return Seen {
            status: 0,
            baggage: None,
        };
    };
    let baggage = resp["headers"].as_array().and_then(|h| {
        h.iter()
            .find(|kv| kv[0] == "baggage")
            .and_then(|kv| kv[1].as_str().map(str::to_owned))
    });
    Seen {
        status: resp["status"].as_u64().unwrap_or(0),
        baggage,
    }
}

fn probe_all(ns: &Netns, dir: &TempDir) -> Vec<Seen> {
    cases().iter().map(|c| probe(ns, dir, c)).collect()
}

/// How many probes got an answer, and so an access line.
fn answered(seen: &[Seen]) -> usize {
    seen.iter().filter(|s| s.status != 0).count()
}

/// The `error`, `dst.hbone_addr` and `dst.service` fields of the first `n` inbound access
/// lines of a log, sorted (a carried connection's line comes at its end, after the next
/// probe's may).
fn errors(who: &str, log: impl Fn() -> String, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<_> = parse_access(&log())
            .into_iter()
            .filter(|l| l.is("direction", "inbound"))
            .collect();
        if lines.len() >= n {
            let mut v: Vec<String> = lines
                .iter()
                .take(n)
                .map(|l| {
                    ["error", "dst.hbone_addr", "dst.service"]
                        .map(|k| format!("{k}={}", l.get(k).unwrap_or_default()))
                        .join(" ")
                })
                .collect();
            v.sort();
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{who}: {} of {n} access lines:\n{}",
            lines.len(),
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_echoes(ns: &Netns) -> Vec<ringtun_testbed::EchoServer> {
    ["0.0.0.0:5201", "0.0.0.0:5202"]
        .iter()
        .map(|a| echo_server(ns, a))
        .collect()
}

/// The server workload with every fact its baggage can carry.
fn rich_config() -> String {
    config().replace(
        "  workloadName: server\n",
        "  workloadName: server\n  workloadType: deployment\n  canonicalName: server-app\n  canonicalRevision: v2\n  clusterId: Kubernetes\n",
    )
}

fn ringtun(ns: &Netns, dir: &Path, config: &Path) -> Ringtun {
    Ringtun::start_as(ns, "server", dir, config, one_worker())
}

#[test]
fn refusals_and_baggage_are_ztunnels() {
    // No capture in the client namespace: the peer speaks HBONE itself.
    let (nodes, dir, path) = mesh_files("zws", &config(), use_test_ca);
    let _echoes = start_echoes(&nodes.server);
    let (theirs, their_errors) = {
        let z = Ztunnel::start(&nodes.server, "server", &path, dir.path());
        let seen = probe_all(&nodes.client, &dir);
        let errors = errors("ztunnel", || z.log(), answered(&seen));
        (seen, errors)
    };
    let (ours, our_errors) = {
        let r = ringtun(&nodes.server, dir.path(), &path);
        let seen = probe_all(&nodes.client, &dir);
        let errors = errors("ringtun", || r.log(), answered(&seen));
        r.assert_no_panic();
        (seen, errors)
    };
    let mut diffs = Vec::new();
    for ((case, z), r) in cases().iter().zip(&theirs).zip(&ours) {
        eprintln!(
            "{:<32} {:<40} ztunnel {:?} ringtun {:?}",
            case.what, case.authority, z, r
        );
        if z != r {
            diffs.push(format!(
                "{} ({} {}): ztunnel {z:?}, ringtun {r:?}",
                case.what, case.method, case.authority
            ));
        }
    }
    assert!(theirs[0].status == 200, "ztunnel carried the plain case");
    assert!(diffs.is_empty(), "differences:\n{}", diffs.join("\n"));
    // What an operator reads: the access lines' `error` (ztunnel's words for each refusal) and
    // what was asked for (a hostname CONNECT names the host and its service).
    eprintln!("ztunnel's access lines: {their_errors:#?}");
    assert_eq!(our_errors, their_errors, "the access lines' fields");
}

/// The 200's `baggage` with every workload fact set: the same keys, values and order. (A
/// topology of its own: ztunnel binds 15008 without `SO_REUSEADDR`, so it cannot follow a
/// ringtun whose connections linger in TIME_WAIT.)
#[test]
fn full_baggage_is_ztunnels() {
    let (nodes, dir, path) = mesh_files("zwb", &rich_config(), use_test_ca);
    let _echoes = start_echoes(&nodes.server);
    let carried = &cases()[0];
    let theirs = {
        let _z = Ztunnel::start(&nodes.server, "server", &path, dir.path());
        probe(&nodes.client, &dir, carried)
    };
    let ours = {
        let _r = ringtun(&nodes.server, dir.path(), &path);
        probe(&nodes.client, &dir, carried)
    };
    eprintln!("full baggage: ztunnel {theirs:?} ringtun {ours:?}");
    assert_eq!(ours, theirs, "the 200's baggage with every fact set");
}

/// The config without the client's workload: its CONNECTs come from a source ringtun and
/// ztunnel know nothing of.
fn config_without_client() -> String {
    let text = config();
    let start = text
        .find("- uid: cluster1//v1/Pod/default/client")
        .expect("client entry");
    let end = text
        .find("- uid: cluster1//v1/Pod/default/server")
        .expect("server entry");
    format!("{}{}", &text[..start], &text[end..])
}

/// What the server side reports of one CONNECT from an unknown source carrying `BAGGAGE`:
/// the labels of its `istio_tcp_connections_opened_total` series and its access line's
/// source fields.
struct Labelled {
    labels: Vec<(String, String)>,
    src: Vec<(String, Option<String>)>,
}

const BAGGAGE: &str = "baggage: k8s.cluster.name=c-far,k8s.namespace.name=far-ns,k8s.deployment.name=far-wl,service.name=far-svc,service.version=v9";

fn labelled(ns: &Netns, client: &Netns, dir: &TempDir, log: impl Fn() -> String) -> Labelled {
    let run = hbone_client(
        client,
        dir,
        "default.client",
        "10.77.0.2:5201",
        16,
        &["--header", BAGGAGE],
    );
    assert_eq!(run.code, Some(0), "{run}");
    let line = wait_access_line(&log, |l| l.is("direction", "inbound"));
    let scrape = Scrape::take(ns, false);
    let series = scrape.select(
        "istio_tcp_connections_opened_total",
        &[("reporter", "destination")],
    );
    assert_eq!(series.len(), 1, "{series:?}");
    let mut labels: Vec<_> = series[0].labels.clone().into_iter().collect();
    labels.sort();
    let src = ["src.workload", "src.namespace", "src.identity"]
        .iter()
        .map(|k| (k.to_string(), line.get(k).map(str::to_owned)))
        .collect();
    Labelled { labels, src }
}

fn wait_access_line(log: &impl Fn() -> String, pred: impl Fn(&AccessLine) -> bool) -> AccessLine {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = parse_access(&log()).into_iter().find(&pred) {
            return l;
        }
        assert!(Instant::now() < deadline, "no such access line:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn unknown_source_is_labelled_from_its_baggage() {
    let (nodes, dir, path) = mesh_files("zwu", &config_without_client(), use_test_ca);
    let _echoes = start_echoes(&nodes.server);
    let theirs = {
        let z = Ztunnel::start(&nodes.server, "server", &path, dir.path());
        labelled(&nodes.server, &nodes.client, &dir, || z.log())
    };
    let ours = {
        let r = ringtun(&nodes.server, dir.path(), &path);
        let seen = labelled(&nodes.server, &nodes.client, &dir, || r.log());
        r.assert_no_panic();
        seen
    };
    let label = |l: &Labelled, k: &str| {
        l.labels
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    // What ztunnel makes of the baggage, so the comparison below is not of two blanks.
    assert_eq!(label(&theirs, "source_workload").as_deref(), Some("far-wl"));
    assert_eq!(
        label(&theirs, "source_workload_namespace").as_deref(),
        Some("far-ns")
    );
    assert_eq!(ours.labels, theirs.labels, "the series' labels");
    assert_eq!(ours.src, theirs.src, "the access line's source fields");
}

/// `connection opened` is ztunnel's debug line written when its record starts: before
/// policy and the upstream connect, so a denied CONNECT and one whose upstream refuses were
/// opened too; a CONNECT refused before (another address) was not.
#[test]
fn connection_opened_is_written_where_ztunnels_is() {
    let (nodes, dir, path) = mesh_files("zwo", &config(), use_test_ca);
    let _echoes = start_echoes(&nodes.server);
    let probes = |log: &dyn Fn() -> String| -> Vec<(String, String)> {
        let mut seen = Vec::new();
        for authority in [
            "10.77.0.2:5201",
            "10.77.0.2:5202",
            "10.77.0.2:5999",
            "10.77.0.1:5201",
        ] {
            let case = Case {
                what: "opened",
                method: "CONNECT",
                authority: authority.into(),
            };
            let status = probe(&nodes.client, &dir, &case).status;
            let wanted = format!("dst.hbone_addr={authority}");
            // The complete line comes last: once it is there, so is any opened line.
            if authority != "10.77.0.1:5201" {
                wait_access_line(&log, |l| l.raw.contains(&wanted));
            }
            let opened: Vec<String> = log()
                .lines()
                .filter(|l| l.contains("connection opened") && l.contains(&wanted))
                .map(|l| l.split('\t').nth(1).unwrap_or_default().to_owned())
                .collect();
            seen.push((format!("{authority} answered {status}"), opened.join(",")));
        }
        seen
    };
    let theirs = {
        let z = Ztunnel::start_env(
            &nodes.server,
            "server",
            &path,
            dir.path(),
            &[("RUST_LOG", "info,access=debug")],
        );
        probes(&|| z.log())
    };
    let ours = {
        let r = Ringtun::start_env(
            &nodes.server,
            "server",
            dir.path(),
            RingtunArgs {
                config: &path,
                certs: dir.path(),
                identity: "default/server",
                workload: "default/server",
                extra: one_worker(),
                log_filter: None,
            },
            &[("RINGTUN_LOG", "info,access=debug")],
        );
        probes(&|| r.log())
    };
    eprintln!("ztunnel {theirs:?}\nringtun {ours:?}");
    assert_eq!(
        theirs[1].1, "debug",
        "ztunnel opens a denied connection's record"
    );
    assert_eq!(ours, theirs);
}

// --- resets and keepalive through a mixed pair ---------------------------------------------

/// A proxy of the two-node mesh.
enum Proxy {
    Z(Ztunnel),
    R(Ringtun),
}

impl Proxy {
    fn log(&self) -> String {
        match self {
            Proxy::Z(z) => z.log(),
            Proxy::R(r) => r.log(),
        }
    }
}

/// Which proxy runs on each node.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Ztunnel,
    Ringtun,
}

/// The two-node mesh with `client` and `server` proxies. Fields drop in declaration order:
/// processes, then namespaces, then the directory with their logs.
struct Duo {
    client: Proxy,
    server: Proxy,
    nodes: ringtun_testbed::TwoNodes,
    _dir: TempDir,
}

fn duo(prefix: &'static str, client: Kind, server: Kind, ringtun_extra: &[&str]) -> Duo {
    let (nodes, dir, path) = ztunnel_topology(prefix, &config());
    let start = |ns: &Netns, who: &str, kind: Kind| match kind {
        Kind::Ztunnel => Proxy::Z(Ztunnel::start(ns, who, &path, dir.path())),
        Kind::Ringtun => {
            let mut extra = one_worker();
            extra.extend(ringtun_extra.iter().map(|s| s.to_string()));
            Proxy::R(Ringtun::start_as(ns, who, dir.path(), &path, extra))
        }
    };
    let server = start(&nodes.server, "server", server);
    let client = start(&nodes.client, "client", client);
    Duo {
        client,
        server,
        nodes,
        _dir: dir,
    }
}

/// How a read loop ended: `eof` (FIN) or `reset` (RST), or another error.
fn ending(end: std::io::Result<()>) -> String {
    use std::io::ErrorKind;
    match end {
        Ok(()) => "eof".into(),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
            ) =>
        {
            "reset".into()
        }
        Err(e) => format!("error {:?}", e.kind()),
    }
}

/// What the client application sees when the server application resets mid-stream (after
/// 64 KiB of answer), and what the server application sees when the client resets.
fn resets(d: &Duo) -> (String, String) {
    use ringtun_testbed::transfer::read_to_end_or_error;
    use std::io::{Read, Write};
    let listener = bind_in(&d.nodes.server, "0.0.0.0:5201");
    let timeout = Some(Duration::from_secs(15));
    // The server resets.
    let server = std::thread::scope(|s| {
        let server = s.spawn(|| {
            let (mut c, _) = listener.accept().expect("accept");
            c.set_read_timeout(timeout).expect("timeout");
            let mut ping = [0u8; 4];
            c.read_exact(&mut ping).expect("server: ping");
            c.write_all(&vec![7u8; 64 * 1024]).expect("server: answer");
            std::thread::sleep(Duration::from_millis(200));
            set_linger_zero(&c);
        });
        let mut c = ringtun_testbed::connect_in(&d.nodes.client, "10.96.0.10:80").expect("connect");
        c.set_read_timeout(timeout).expect("timeout");
        c.write_all(b"ping").expect("client: ping");
        let (_, end) = read_to_end_or_error(&mut c);
        server.join().expect("server thread");
        ending(end)
    });
    // The client resets.
    let client = std::thread::scope(|s| {
        let (got, wait) = std::sync::mpsc::channel();
        let server = s.spawn(move || {
            let (mut c, _) = listener.accept().expect("accept");
            c.set_read_timeout(timeout).expect("timeout");
            let mut ping = [0u8; 4];
            c.read_exact(&mut ping).expect("server: ping");
            let _ = got.send(());
            let (_, end) = read_to_end_or_error(&mut c);
            ending(end)
        });
        let c = ringtun_testbed::connect_in(&d.nodes.client, "10.96.0.10:80").expect("connect");
        (&c).write_all(b"ping").expect("client: ping");
        wait.recv_timeout(Duration::from_secs(15))
            .expect("the server got the ping");
        set_linger_zero(&c);
        drop(c);
        server.join().expect("server thread")
    });
    (server, client)
}

/// A reset on either side reaches the other application through ringtun and ztunnel in
/// either role, and through two ringtuns, as it does through two ztunnels.
#[test]
fn resets_cross_a_mixed_pair_as_between_two_ztunnels() {
    let reference = resets(&duo("zrzz", Kind::Ztunnel, Kind::Ztunnel, &[]));
    for (prefix, client, server) in [
        ("zrrz", Kind::Ringtun, Kind::Ztunnel),
        ("zrzr", Kind::Ztunnel, Kind::Ringtun),
        ("zrrr", Kind::Ringtun, Kind::Ringtun),
    ] {
        let d = duo(prefix, client, server, &[]);
        let seen = resets(&d);
        eprintln!("{client:?} → {server:?}: {seen:?}; ztunnel → ztunnel: {reference:?}");
        assert_eq!(
            seen, reference,
            "{client:?} → {server:?}: (client sees server's RST, server sees client's RST)"
        );
        for p in [&d.client, &d.server] {
            if let Proxy::R(r) = p {
                r.assert_no_panic();
            }
        }
    }
}

/// The source ports of the inbound HBONE connections a server proxy logged (`src.addr` of an
/// inbound access line is the HBONE connection's peer address).
fn inbound_peers(log: &str) -> Vec<String> {
    parse_access(log)
        .into_iter()
        .filter(|l| l.is("direction", "inbound"))
        .filter_map(|l| l.get("src.addr").map(str::to_owned))
        .collect()
}

/// Two echoes `idle` apart through the VIP; returns the server proxy's inbound peers.
fn two_streams_apart(d: &Duo, idle: Duration) -> Vec<String> {
    let _echo = echo_server(&d.nodes.server, "0.0.0.0:5201");
    echo_ok(&d.nodes.client, "10.96.0.10:80", 64 * 1024);
    std::thread::sleep(idle);
    echo_ok(&d.nodes.client, "10.96.0.10:80", 64 * 1024);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let peers = inbound_peers(&d.server.log());
        if peers.len() >= 2 {
            return peers;
        }
        assert!(Instant::now() < deadline, "{}", d.server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// ringtun's HTTP/2 PINGs to ztunnel's inbound are answered: with a keepalive far shorter
/// than the idle time (a dead peer found within 1.5 s), the pooled connection survives and
/// carries the next stream.
#[test]
fn ztunnel_answers_ringtuns_keepalive() {
    let fast = [
        "--hbone-keepalive-interval-ms",
        "300",
        "--hbone-keepalive-timeout-ms",
        "1500",
    ];
    let d = duo("zprz", Kind::Ringtun, Kind::Ztunnel, &fast);
    let peers = two_streams_apart(&d, Duration::from_secs(5));
    assert_eq!(peers[0], peers[1], "one pooled connection: {peers:?}");
    if let Proxy::R(r) = &d.client {
        // The second stream's line is written when it closes, a moment after the echo ends.
        r.wait_access(
            "the second stream reusing the connection",
            Duration::from_secs(10),
            |l| l.is("pool", "reused"),
        );
    }
    let log = d.client.log();
    assert!(!log.contains("unresponsive"), "{log}");
}

/// ztunnel's HTTP/2 PINGs to ringtun's inbound are answered: ztunnel pings a pooled
/// connection every 10 s and drops it 20 s after an unanswered one, so a connection idle for
/// 32 s that still carries the next stream was kept alive by ringtun's answers.
#[test]
fn ringtun_answers_ztunnels_keepalive() {
    let d = duo("zpzr", Kind::Ztunnel, Kind::Ringtun, &[]);
    let peers = two_streams_apart(&d, Duration::from_secs(32));
    assert_eq!(peers[0], peers[1], "one pooled connection: {peers:?}");
    let zlog = d.client.log();
    assert!(
        !zlog.to_lowercase().contains("ping timeout"),
        "ztunnel took ringtun for dead: {zlog}"
    );
}
