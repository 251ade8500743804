//! What a log pipeline and a dashboard see of ringtun, against the real ztunnel
//! (`../shared/ztunnel/ztunnel`) carrying the same connection under the same config: ringtun
//! as the client node with ztunnel as the server node, and the other way round, so each of
//! ringtun's sides is compared with ztunnel's same side. The access line (message, level, field
//! names and order, and what the addresses, workloads, identities, bytes and duration mean) in
//! ztunnel's text layout and in its JSON layout (`LOG_FORMAT=json`), and the labels and values
//! of the Istio TCP metrics; and `/config_dump`'s shape, key by key at every level, against
//! ztunnel's dump of the same local config. Needs root and the binary; fails, never skips,
//! without them.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use ringtun_testbed::{echoed_bytes, Netns, TwoNodes, DEFAULT_MARK};

const LOG_WAIT: Duration = Duration::from_secs(10);
/// Request bytes (client → server) and response bytes: different, so a swap shows.
const UP: u64 = 300_007;
const DOWN: u64 = 200_003;

/// ringtun's own access fields, which may follow ztunnel's.
const EXTRAS: [&str; 9] = [
    "path",
    "pool",
    "tls",
    "ktls.tx",
    "ktls.rx",
    "tls.cipher",
    "shard",
    "end",
    "response_flags",
];

/// The fields whose values must be the same on both proxies for the same connection.
const SAME_VALUE: [&str; 14] = [
    "src.workload",
    "src.namespace",
    "src.identity",
    "src.cluster",
    "dst.addr",
    "dst.hbone_addr",
    "dst.service",
    "dst.workload",
    "dst.namespace",
    "dst.identity",
    "dst.cluster",
    "direction",
    "bytes_sent",
    "bytes_recv",
];

/// The mesh config for ztunnel's test CA, with the workload facts the labels carry (canonical
/// name and revision, cluster, locality) set, and different on each side.
fn config() -> String {
    let facts = |who: &str, rev: &str, region: &str| {
        format!(
            "  workloadName: {who}\n  canonicalName: {who}-app\n  canonicalRevision: {rev}\n  clusterId: Kubernetes\n  locality: {{region: {region}, zone: {region}-z, subzone: {region}-s}}\n"
        )
    };
    ztunnel_config()
        .replace("  workloadName: client\n", &facts("client", "v1", "east"))
        .replace("  workloadName: server\n", &facts("server", "v2", "west"))
}

/// One topology with ringtun on one node and ztunnel on the other. Fields drop in declaration
/// order: processes, then namespaces, then the directory with their logs.
struct Pair {
    ringtun: Ringtun,
    ztunnel: Ztunnel,
    nodes: TwoNodes,
    _dir: TempDir,
    _config: PathBuf,
}

/// Starts the pair (`ringtun_client`: ringtun on the client node), each with its own
/// environment, and carries one connection through the service VIP: `UP` bytes up, then
/// `DOWN` bytes back.
fn carry(
    prefix: &'static str,
    ringtun_client: bool,
    ringtun_env: &[(&str, &str)],
    ztunnel_env: &[(&str, &str)],
) -> Pair {
    let (nodes, dir, path) = ztunnel_topology(prefix, &config());
    let (r_ns, r_who, z_ns, z_who) = if ringtun_client {
        (&nodes.client, "client", &nodes.server, "server")
    } else {
        (&nodes.server, "server", &nodes.client, "client")
    };
    let ztunnel = Ztunnel::start_env(z_ns, z_who, &path, dir.path(), ztunnel_env);
    let workload = format!("default/{r_who}");
    let ringtun = Ringtun::start_env(
        r_ns,
        r_who,
        dir.path(),
        RingtunArgs {
            config: &path,
            certs: dir.path(),
            identity: &workload,
            workload: &workload,
            extra: one_worker(),
            log_filter: None,
        },
        ringtun_env,
    );
    reply_server(&nodes.server, "0.0.0.0:5201");
    assert_eq!(upload_then_download(&nodes.client, "10.96.0.10:80"), DOWN);
    Pair {
        ringtun,
        ztunnel,
        nodes,
        _dir: dir,
        _config: path,
    }
}

/// Reads the request to its end, then answers `DOWN` bytes and closes.
fn reply_server(ns: &Netns, addr: &str) {
    serve(ns, addr, |mut conn| {
        let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
        let (got, end) = read_to_end_or_error(&mut conn);
        if end.is_err() || got.len() as u64 != UP {
            return;
        }
        let _ = conn.write_all(&vec![7u8; DOWN as usize]);
        let _ = conn.shutdown(Shutdown::Write);
    });
}

/// Sends `UP` bytes to `dst`, half-closes, and returns how many bytes came back.
fn upload_then_download(ns: &Netns, dst: &str) -> u64 {
    let mut s = connect_in(ns, dst).unwrap_or_else(|e| panic!("connect {dst}: {e}"));
    s.write_all(&vec![1u8; UP as usize])
        .and_then(|_| s.shutdown(Shutdown::Write))
        .unwrap_or_else(|e| panic!("upload to {dst}: {e}"));
    let (back, end) = read_to_end_or_error(&mut s);
    end.unwrap_or_else(|e| panic!("download from {dst}: {e}"));
    back.len() as u64
}

/// An access line's level, message and fields in their order, from either layout.
#[derive(Debug)]
struct Line {
    raw: String,
    level: String,
    message: String,
    fields: Vec<(String, String)>,
}

impl Line {
    fn keys(&self) -> Vec<&str> {
        self.fields.iter().map(|(k, _)| k.as_str()).collect()
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Parses `time<TAB>level<TAB>access<TAB>message<TAB>k=v …` or a JSON object with
    /// `scope: access`; `None` for anything else.
    fn parse(raw: &str) -> Option<Line> {
        if raw.starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(raw).ok()?;
            if v["scope"] != "access" {
                return None;
            }
            let obj = v.as_object()?;
            let text = |v: &serde_json::Value| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            // serde_json's map is ordered by key; the order is checked in the text layout.
            let fields = obj
                .iter()
                .filter(|(k, _)| !["level", "time", "scope", "message"].contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), text(v)))
                .collect();
            return Some(Line {
                raw: raw.to_owned(),
                level: text(&obj["level"]),
                message: text(&obj["message"]),
                fields,
            });
        }
        let cols: Vec<&str> = raw.splitn(5, '\t').collect();
        if cols.len() != 5 || cols[2] != "access" {
            return None;
        }
        Some(Line {
            raw: raw.to_owned(),
            level: cols[1].to_owned(),
            message: cols[3].to_owned(),
            fields: ordered_fields(cols[4]),
        })
    }
}

/// `a=1 b="x \"y\"" c=z` in order, quotes and escapes removed.
fn ordered_fields(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.trim().chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
            chars.next_if_eq(&' ');
        } else {
            value = chars.by_ref().take_while(|&c| c != ' ').collect();
        }
        out.push((key.trim().to_owned(), value));
    }
    out
}

/// Waits until `log()` holds a `connection complete` access line in `direction`; returns it.
fn wait_complete(who: &str, log: impl Fn() -> String, direction: &str) -> Line {
    wait_line(who, log, "connection complete", direction)
}

/// Waits until `log()` holds an access line with `message` in `direction`; returns it.
fn wait_line(who: &str, log: impl Fn() -> String, message: &str, direction: &str) -> Line {
    wait_for(who, log, message, direction, |_| true)
}

/// [`wait_line`] for a line that also satisfies `pred`.
fn wait_for(
    who: &str,
    log: impl Fn() -> String,
    message: &str,
    direction: &str,
    pred: impl Fn(&Line) -> bool,
) -> Line {
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        let text = log();
        if let Some(l) = text
            .lines()
            .filter_map(Line::parse)
            .find(|l| l.message == message && l.get("direction") == Some(direction) && pred(l))
        {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "{who}: no {direction} `{message}` line:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// ringtun's line against ztunnel's for the same side of the same kind of connection, which
/// both logged at `level`.
fn compare(what: &str, ours: &Line, theirs: &Line, ordered: bool, level: &str) {
    let ctx = format!("{what}\n ringtun: {ours:?}\n ztunnel: {theirs:?}");
    assert_eq!(ours.level, level, "{ctx}");
    assert_eq!(
        (&ours.level, &ours.message),
        (&theirs.level, &theirs.message),
        "{ctx}"
    );
    let (mine, zt) = (ours.keys(), theirs.keys());
    let (head, tail): (Vec<&str>, Vec<&str>) = mine.iter().partition(|k| !EXTRAS.contains(k));
    if ordered {
        assert_eq!(mine[..zt.len().min(mine.len())], zt[..], "{ctx}");
    } else {
        let mut a = head.clone();
        let mut b = zt.clone();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b, "{ctx}");
    }
    assert_eq!(
        head.len(),
        zt.len(),
        "ztunnel's fields, and no other but ringtun's extras: {ctx}"
    );
    assert!(!tail.is_empty(), "{ctx}");
    for key in SAME_VALUE {
        assert_eq!(ours.get(key), theirs.get(key), "{key}: {ctx}");
        if ordered {
            let quoted = |l: &Line| l.raw.contains(&format!(" {key}=\""));
            assert_eq!(quoted(ours), quoted(theirs), "{key} quoted alike: {ctx}");
        }
    }
    let ip = |l: &Line| {
        l.get("src.addr")
            .and_then(|a| a.rsplit_once(':'))
            .map(|(ip, _)| ip.to_owned())
    };
    assert_eq!(ip(ours), ip(theirs), "src.addr: {ctx}");
    for l in [ours, theirs]
        .into_iter()
        .filter(|_| ours.message == "connection complete")
    {
        let d = l.get("duration").unwrap_or_default();
        assert!(
            d.strip_suffix("ms")
                .is_some_and(|n| n.parse::<u64>().is_ok()),
            "duration in whole milliseconds: {ctx}"
        );
    }
}

/// The samples of `family` in a scrape of `ns`, each its labels and value.
fn samples(ns: &Netns, family: &str) -> Vec<(Vec<(String, String)>, f64)> {
    let (status, body) = http_in(ns, "127.0.0.1:15020", "GET", "/metrics")
        .unwrap_or_else(|e| panic!("scrape in {}: {e}", ns.name()));
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?;
            if let Some(value) = rest.strip_prefix(' ') {
                return Some((Vec::new(), value.trim().parse().ok()?));
            }
            let (labels, value) = rest.strip_prefix('{')?.rsplit_once("} ")?;
            let labels = ordered_fields(&labels.replace("\",", "\" "));
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// The one series of `family` reported by `reporter` in a scrape of `ns`.
fn one_series(ns: &Netns, family: &str, reporter: &str) -> (Vec<(String, String)>, f64) {
    let mut all: Vec<_> = samples(ns, family)
        .into_iter()
        .filter(|(l, _)| l.iter().any(|(k, v)| k == "reporter" && v == reporter))
        .collect();
    assert_eq!(
        all.len(),
        1,
        "{family} {reporter} in {}: {all:?}",
        ns.name()
    );
    all.remove(0)
}

/// The series ringtun and ztunnel report for the same side of the same connection: the same
/// labels with the same values (ztunnel's order), the same counts and bytes.
fn compare_metrics(reporter: &str, ours: &Netns, theirs: &Netns) {
    for (family, want) in [
        ("istio_tcp_connections_opened_total", 1.0),
        ("istio_tcp_connections_closed_total", 1.0),
        ("istio_tcp_received_bytes_total", UP as f64),
        ("istio_tcp_sent_bytes_total", DOWN as f64),
    ] {
        let (mine, v) = one_series(ours, family, reporter);
        let (zt, zv) = one_series(theirs, family, reporter);
        assert_eq!(mine, zt, "{family} {reporter}: labels and values");
        assert_eq!((v, zv), (want, want), "{family} {reporter}");
    }
    for family in [
        "istio_build",
        "istio_tcp_sockets_open",
        "process_open_fds",
        "process_max_fds",
    ] {
        assert!(
            !samples(ours, family).is_empty(),
            "{family} in ringtun's scrape"
        );
        assert!(
            !samples(theirs, family).is_empty(),
            "{family} in ztunnel's scrape"
        );
    }
}

#[test]
fn access_lines_and_metrics_read_as_ztunnels() {
    let json = [("LOG_FORMAT", "json")];
    // ringtun → ztunnel: ringtun logs JSON, ztunnel text.
    let a = carry("zfa", true, &json, &[]);
    // ztunnel → ringtun: ztunnel logs JSON, ringtun text.
    let b = carry("zfb", false, &[], &json);

    let r_out = wait_complete("ringtun (client)", || a.ringtun.log(), "outbound");
    let z_out = wait_complete("ztunnel (client)", || b.ztunnel.log(), "outbound");
    compare("outbound, JSON", &r_out, &z_out, false, "info");
    assert_eq!(r_out.get("bytes_sent"), Some(UP.to_string().as_str()));
    assert_eq!(r_out.get("bytes_recv"), Some(DOWN.to_string().as_str()));
    assert_eq!(r_out.get("dst.addr"), Some("10.77.0.2:15008"));
    assert_eq!(r_out.get("dst.hbone_addr"), Some("10.77.0.2:5201"));

    let r_in = wait_complete("ringtun (server)", || b.ringtun.log(), "inbound");
    let z_in = wait_complete("ztunnel (server)", || a.ztunnel.log(), "inbound");
    compare("inbound, text", &r_in, &z_in, true, "info");
    assert_eq!(r_in.get("bytes_sent"), Some(DOWN.to_string().as_str()));
    assert_eq!(r_in.get("bytes_recv"), Some(UP.to_string().as_str()));

    compare_metrics("source", &a.nodes.client, &b.nodes.client);
    compare_metrics("destination", &b.nodes.server, &a.nodes.server);
    a.ringtun.assert_no_panic();
    b.ringtun.assert_no_panic();
}

/// The keys of a JSON object (empty for anything else).
fn keys(v: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    k.sort_unstable();
    k
}

/// The element of the array `v` whose `key` is `value`.
fn find<'a>(
    v: &'a serde_json::Value,
    key: &str,
    value: &serde_json::Value,
) -> &'a serde_json::Value {
    v.as_array()
        .and_then(|a| a.iter().find(|e| &e[key] == value))
        .unwrap_or_else(|| panic!("no element with {key}={value} in {v:#}"))
}

/// The objects of the array `theirs` and their match in `ours` (by `key`) have the same keys.
fn same_keys_each(what: &str, ours: &serde_json::Value, theirs: &serde_json::Value, key: &str) {
    let all = theirs
        .as_array()
        .unwrap_or_else(|| panic!("{what}: {theirs:#}"));
    assert!(!all.is_empty(), "{what}: ztunnel shows none");
    assert_eq!(
        ours.as_array().map(Vec::len),
        Some(all.len()),
        "{what}: as many as ztunnel's"
    );
    for t in all {
        let o = find(ours, key, &t[key]);
        assert_eq!(
            keys(o),
            keys(t),
            "{what} {}: ringtun {o:#} ztunnel {t:#}",
            t[key]
        );
    }
}

#[test]
fn config_dump_has_ztunnels_shape() {
    // A policy too, so its shape shows; dry run, so it decides nothing.
    let config = config().replace(
        "policies: []\n",
        r#"policies:
- name: audit
  namespace: default
  scope: Namespace
  action: Allow
  dryRun: true
  rules:
  - - - principals: [!Exact "cluster.local/ns/default/sa/client"]
        notDestinationPorts: [9999]
"#,
    );
    let (nodes, dir, path) = ztunnel_topology("zfc", &config);
    let _ztunnel = Ztunnel::start(&nodes.server, "server", &path, dir.path());
    let ringtun = Ringtun::start_as(&nodes.client, "client", dir.path(), &path, one_worker());
    let get = |ns: &Netns| -> serde_json::Value {
        let (st, body) = http_in(ns, ADMIN, "GET", "/config_dump")
            .unwrap_or_else(|e| panic!("config_dump in {}: {e}", ns.name()));
        assert_eq!(st, 200, "{body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
    };
    // ztunnel asks for its certificate when a connection first needs it: carry one.
    let _echo = echo_server(&nodes.server, "0.0.0.0:5201");
    echo_ok(&nodes.client, "10.96.0.10:80", 1024);
    let deadline = Instant::now() + LOG_WAIT;
    let theirs = loop {
        let d = get(&nodes.server);
        if d["certificates"].as_array().is_some_and(|c| !c.is_empty()) {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "ztunnel shows no certificate: {d:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let ours = get(&nodes.client);

    // Every section of ztunnel's, and ringtun's own facts apart under one key.
    let mut want = keys(&theirs);
    want.push("ringtun".into());
    want.sort_unstable();
    assert_eq!(keys(&ours), want, "sections");
    for section in ["config", "version", "staticConfig", "stagedServices"] {
        assert_eq!(keys(&ours[section]), keys(&theirs[section]), "{section}");
    }
    // Settings both run with at their defaults read the same, value and form.
    for key in [
        "dnsProxy",
        "dnsProxyAddr",
        "ipv6Enabled",
        "numWorkerThreads",
    ] {
        assert_eq!(ours["config"][key], theirs["config"][key], "config.{key}");
    }
    let uid = "uid";
    same_keys_each("workload", &ours["workloads"], &theirs["workloads"], uid);
    same_keys_each(
        "static workload",
        &ours["staticConfig"]["workloads"],
        &theirs["staticConfig"]["workloads"],
        uid,
    );
    for (what, o, t) in [
        ("service", &ours["services"], &theirs["services"]),
        (
            "static service",
            &ours["staticConfig"]["services"],
            &theirs["staticConfig"]["services"],
        ),
    ] {
        same_keys_each(what, o, t, "hostname");
        for ts in t.as_array().into_iter().flatten() {
            let os = find(o, "hostname", &ts["hostname"]);
            assert_eq!(
                keys(&os["endpoints"]),
                keys(&ts["endpoints"]),
                "{what} endpoints"
            );
            for uid in keys(&ts["endpoints"]) {
                assert_eq!(
                    keys(&os["endpoints"][&uid]),
                    keys(&ts["endpoints"][&uid]),
                    "{what} endpoint {uid}"
                );
            }
        }
    }
    for (what, o, t) in [
        ("policy", &ours["policies"], &theirs["policies"]),
        (
            "static policy",
            &ours["staticConfig"]["policies"],
            &theirs["staticConfig"]["policies"],
        ),
    ] {
        same_keys_each(what, o, t, "name");
        let (o, t) = (&o[0]["rules"][0][0][0], &t[0]["rules"][0][0][0]);
        assert_eq!(
            keys(o),
            keys(t),
            "{what} match: ringtun {o:#} ztunnel {t:#}"
        );
        assert_eq!(o, t, "{what} match");
    }
    // The certificate: ztunnel's keys (ringtun's own apart, under `ringtun`), and of each
    // chain and root entry exactly ztunnel's.
    let (oc, tc) = (&ours["certificates"][0], &theirs["certificates"][0]);
    let ours_keys: Vec<String> = keys(oc).into_iter().filter(|k| k != "ringtun").collect();
    assert_eq!(ours_keys, keys(tc), "certificate: {oc:#} {tc:#}");
    assert_eq!(oc["state"], tc["state"]);
    for list in ["certChain", "rootCerts"] {
        assert_eq!(keys(&oc[list][0]), keys(&tc[list][0]), "{list} entry keys");
    }
    // The same test CA root on both: the same serial (ztunnel's decimal) and the same `pem`
    // (base64 of the PEM text), so a tool decoding ztunnel's decodes ringtun's.
    assert_eq!(oc["rootCerts"][0], tc["rootCerts"][0], "the shared root");
    let serial = tc["rootCerts"][0]["serialNumber"]
        .as_str()
        .unwrap_or_default();
    assert!(
        !serial.is_empty() && serial.bytes().all(|b| b.is_ascii_digit()),
        "decimal: {serial}"
    );
    // ringtun's own leaf, as its file holds it.
    let leaf = std::fs::read_to_string(dir.join("default.client.pem")).expect("leaf PEM");
    let first = leaf
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap_or_default();
    let unwrapped = |s: &str| s.split_whitespace().collect::<String>();
    assert_eq!(
        oc["certChain"][0]["pem"]
            .as_str()
            .map(|p| unwrapped(&decode_base64(p))),
        Some(unwrapped(first)),
        "the leaf's pem is its PEM text, base64"
    );
    ringtun.assert_no_panic();
}

/// Standard base64 (with padding) to text; the test's own decoder, no crate.
fn decode_base64(s: &str) -> String {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let mut out = Vec::new();
    for chunk in s.trim_end_matches('=').as_bytes().chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &c)| n | u32::from(value(c)) << (18 - 6 * i));
        out.extend(n.to_be_bytes()[1..chunk.len()].iter());
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The series of `family` ringtun and ztunnel report for the same side are the same, each
/// counting `want`.
fn same_series(family: &str, reporter: &str, ours: &Netns, theirs: &Netns, want: f64) {
    let (mine, v) = one_series(ours, family, reporter);
    let (zt, zv) = one_series(theirs, family, reporter);
    assert_eq!(mine, zt, "{family} {reporter}: labels and values");
    assert_eq!((v, zv), (want, want), "{family} {reporter}");
}

#[test]
fn refusals_read_as_ztunnels() {
    let config = config().replace(
        "policies: []\n",
        r#"policies:
- name: deny-client
  namespace: default
  scope: Namespace
  action: Deny
  dryRun: false
  rules:
  - - - principals: [!Exact "cluster.local/ns/default/sa/client"]
"#,
    );
    // ringtun → ztunnel, then ztunnel → ringtun: the server side denies the client, and the
    // client dials a service port no endpoint serves.
    let pair = |prefix, ringtun_client| {
        let (nodes, dir, path) = ztunnel_topology(prefix, &config);
        let (r_ns, r_who, z_ns, z_who) = if ringtun_client {
            (&nodes.client, "client", &nodes.server, "server")
        } else {
            (&nodes.server, "server", &nodes.client, "client")
        };
        let ztunnel = Ztunnel::start(z_ns, z_who, &path, dir.path());
        let ringtun = Ringtun::start_as(r_ns, r_who, dir.path(), &path, one_worker());
        let _echo = echo_server(&nodes.server, "0.0.0.0:5201");
        for dst in ["10.96.0.10:80", "10.96.0.10:81"] {
            let n = echoed_bytes(&nodes.client, dst);
            assert_eq!(n, 0, "{dst} must not be carried");
        }
        Pair {
            ringtun,
            ztunnel,
            nodes,
            _dir: dir,
            _config: path,
        }
    };
    let a = pair("zra", true);
    let b = pair("zrb", false);

    // The denial: an error on both sides, with the error named.
    let r_out = wait_complete("ringtun (client)", || a.ringtun.log(), "outbound");
    let z_out = wait_complete("ztunnel (client)", || b.ztunnel.log(), "outbound");
    compare(
        "outbound, refused by the server",
        &r_out,
        &z_out,
        true,
        "error",
    );
    let r_in = wait_complete("ringtun (server)", || b.ringtun.log(), "inbound");
    let z_in = wait_complete("ztunnel (server)", || a.ztunnel.log(), "inbound");
    compare("inbound, denied", &r_in, &z_in, true, "error");
    assert_eq!(r_in.get("response_flags"), Some("DENY"));
    // The error in ztunnel's words, naming the policy, on both sides.
    for (what, ours, theirs) in [("outbound", &r_out, &z_out), ("inbound", &r_in, &z_in)] {
        assert_eq!(ours.get("error"), theirs.get("error"), "{what}, denied");
    }
    assert_eq!(
        z_in.get("error"),
        Some(
            "connection closed due to policy rejection: explicitly denied by: default/deny-client"
        )
    );
    // No endpoint: refused before a destination was chosen, a warning with four fields.
    let failed = "connection failed";
    let r_early = wait_line("ringtun (client)", || a.ringtun.log(), failed, "outbound");
    let z_early = wait_line("ztunnel (client)", || b.ztunnel.log(), failed, "outbound");
    compare("outbound, no endpoint", &r_early, &z_early, true, "warn");
    assert_eq!(r_early.get("dst.addr"), Some("10.96.0.10:81"));

    // The metrics: the denied connection opened, then closed and failed with its flags (the
    // client sees the refusal as CONNECT, the server as DENY); the early refusal nowhere.
    for (reporter, ours, theirs) in [
        ("source", &a.nodes.client, &b.nodes.client),
        ("destination", &b.nodes.server, &a.nodes.server),
    ] {
        for family in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
            "istio_tcp_connections_failed_total",
        ] {
            same_series(family, reporter, ours, theirs, 1.0);
        }
    }
    a.ringtun.assert_no_panic();
    b.ringtun.assert_no_panic();
}

#[test]
fn unreachable_upstream_reads_as_ztunnels() {
    // Each side in turn dials the server workload's pod IP at a port nothing listens on: the
    // server node's proxy answers 503 and both log the failure.
    let pair = |prefix, ringtun_client| {
        let (nodes, dir, path) = ztunnel_topology(prefix, &config());
        let (r_ns, r_who, z_ns, z_who) = if ringtun_client {
            (&nodes.client, "client", &nodes.server, "server")
        } else {
            (&nodes.server, "server", &nodes.client, "client")
        };
        let ztunnel = Ztunnel::start(z_ns, z_who, &path, dir.path());
        let ringtun = Ringtun::start_as(r_ns, r_who, dir.path(), &path, one_worker());
        let n = echoed_bytes(&nodes.client, "10.77.0.2:5999");
        assert_eq!(n, 0, "nothing listens on 5999");
        Pair {
            ringtun,
            ztunnel,
            nodes,
            _dir: dir,
            _config: path,
        }
    };
    let a = pair("zua", true);
    let b = pair("zub", false);
    let r_out = wait_complete("ringtun (client)", || a.ringtun.log(), "outbound");
    let z_out = wait_complete("ztunnel (client)", || b.ztunnel.log(), "outbound");
    compare("outbound, upstream refused", &r_out, &z_out, true, "error");
    let r_in = wait_complete("ringtun (server)", || b.ringtun.log(), "inbound");
    let z_in = wait_complete("ztunnel (server)", || a.ztunnel.log(), "inbound");
    compare("inbound, upstream refused", &r_in, &z_in, true, "error");
    for (what, ours, theirs) in [("outbound", &r_out, &z_out), ("inbound", &r_in, &z_in)] {
        assert_eq!(
            ours.get("error"),
            theirs.get("error"),
            "{what}, unreachable"
        );
    }
    assert_eq!(
        z_in.get("error"),
        Some("connection failed: Connection refused (os error 111)")
    );
    a.ringtun.assert_no_panic();
    b.ringtun.assert_no_panic();
}

#[test]
fn plaintext_paths_read_as_ztunnels() {
    const N: u64 = 65_536;
    let pair = |prefix, ringtun_client| {
        let (nodes, dir, path) = ztunnel_topology(prefix, &config());
        let (r_ns, r_who, z_ns, z_who) = if ringtun_client {
            (&nodes.client, "client", &nodes.server, "server")
        } else {
            (&nodes.server, "server", &nodes.client, "client")
        };
        let ztunnel = Ztunnel::start(z_ns, z_who, &path, dir.path());
        let ringtun = Ringtun::start_as(r_ns, r_who, dir.path(), &path, one_worker());
        // Outside the mesh: passed through by the client node's proxy.
        nodes
            .server
            .add_address(nodes.ifname(), "10.77.0.9/24")
            .expect("add 10.77.0.9");
        let _outside = echo_server(&nodes.server, "10.77.0.9:7000");
        echo_ok(&nodes.client, "10.77.0.9:7000", N);
        // A client outside the mesh (its socket carries the mark, so its node's capture lets
        // it be) to the server workload in plaintext: the server node's 15006.
        nodes
            .server
            .capture_inbound(15006, &INBOUND_EXCEPT)
            .expect("inbound capture");
        let _inside = echo_server(&nodes.server, "10.77.0.2:7000");
        let s = connect_marked_in(
            &nodes.client,
            "10.77.0.2:7000".parse().expect("addr"),
            DEFAULT_MARK,
        )
        .expect("plaintext connect to 10.77.0.2:7000");
        echo_on(s, N as usize).unwrap_or_else(|e| panic!("plaintext inbound echo: {e}"));
        Pair {
            ringtun,
            ztunnel,
            nodes,
            _dir: dir,
            _config: path,
        }
    };
    let a = pair("zpa", true);
    let b = pair("zpb", false);
    let complete = "connection complete";
    let to = |addr: &'static str| move |l: &Line| l.get("dst.addr") == Some(addr);

    let r_pt = wait_for(
        "ringtun",
        || a.ringtun.log(),
        complete,
        "outbound",
        to("10.77.0.9:7000"),
    );
    let z_pt = wait_for(
        "ztunnel",
        || b.ztunnel.log(),
        complete,
        "outbound",
        to("10.77.0.9:7000"),
    );
    compare("outbound passthrough", &r_pt, &z_pt, true, "info");
    assert_eq!(r_pt.get("path"), Some("passthrough"));
    assert_eq!(r_pt.get("bytes_sent"), Some(N.to_string().as_str()));

    let r_pl = wait_for(
        "ringtun",
        || b.ringtun.log(),
        complete,
        "inbound",
        to("10.77.0.2:7000"),
    );
    let z_pl = wait_for(
        "ztunnel",
        || a.ztunnel.log(),
        complete,
        "inbound",
        to("10.77.0.2:7000"),
    );
    compare("inbound plaintext", &r_pl, &z_pl, true, "info");
    assert_eq!(r_pl.get("path"), Some("plaintext"));

    // And their series: passthrough on the client node, plaintext inbound on the server's.
    for (reporter, ours, theirs) in [
        ("source", &a.nodes.client, &b.nodes.client),
        ("destination", &b.nodes.server, &a.nodes.server),
    ] {
        for (family, want) in [
            ("istio_tcp_connections_opened_total", 1.0),
            ("istio_tcp_connections_closed_total", 1.0),
            ("istio_tcp_received_bytes_total", N as f64),
            ("istio_tcp_sent_bytes_total", N as f64),
        ] {
            same_series(family, reporter, ours, theirs, want);
        }
    }
    a.ringtun.assert_no_panic();
    b.ringtun.assert_no_panic();
}
