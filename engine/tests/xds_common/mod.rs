//! Helpers of the control-plane tests: the fake istiod (`tests/peers/fake_istiod.py`) run in a
//! namespace, the resources it serves written as its JSON, the pod token file, and the real
//! ztunnel fed by it.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::time::{Duration, Instant};

use ringtun_testbed::Netns;
use serde_json::{json, Value};

/// xDS type of workloads and services.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// xDS type of authorization policies.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
/// The bearer token the fake accepts.
pub const TOKEN: &str = "fake-istiod-test-token";
/// Where the fake istiod listens: in the server namespace, on istiod's port.
pub const ISTIOD_ADDR: &str = "10.77.0.2:15012";
/// The URL clients are given (`XDS_ADDRESS`, `CA_ADDRESS`).
pub const ISTIOD_URL: &str = "https://10.77.0.2:15012";
/// Uid of the client workload.
pub const CLIENT_UID: &str = "cluster1//v1/Pod/default/client";
/// Uid of the server workload.
pub const SERVER_UID: &str = "cluster1//v1/Pod/default/server";
/// How long an expected event may take.
pub const EVENT_WAIT: Duration = Duration::from_secs(20);

/// A workload in the fake's JSON (Istio's `Workload` as protobuf JSON): HBONE, one IP,
/// `services` as `(namespace/hostname, port, target port)`.
pub fn workload(uid: &str, name: &str, sa: &str, ip: &str, services: &[(&str, u16, u16)]) -> Value {
    let mut svcs = serde_json::Map::new();
    for (key, port, target) in services {
        svcs.insert(
            (*key).to_owned(),
            json!({"ports": [{"servicePort": port, "targetPort": target}]}),
        );
    }
    json!({
        "uid": uid,
        "name": name,
        "namespace": "default",
        "serviceAccount": sa,
        "addresses": [ip],
        "tunnelProtocol": "HBONE",
        "trustDomain": "cluster.local",
        "services": svcs,
    })
}

/// A service in the fake's JSON: `default/<hostname>` on `vip`, `port` → `target`.
pub fn service(name: &str, hostname: &str, vip: &str, port: u16, target: u16) -> Value {
    json!({
        "name": name,
        "namespace": "default",
        "hostname": hostname,
        "addresses": [{"network": "", "address": vip}],
        "ports": [{"servicePort": port, "targetPort": target}],
    })
}

/// [`mesh_resources`] with each workload on its own node (`node-client`, `node-server`): istiod
/// sends an on-demand client the workloads of its node unasked.
pub fn mesh_resources_on_nodes() -> Value {
    let mut resources = mesh_resources();
    resources["workloads"][0]["node"] = json!("node-client");
    resources["workloads"][1]["node"] = json!("node-server");
    resources
}

/// The two-workload mesh of the other e2e tests, as xDS resources: client 10.77.0.1, server
/// 10.77.0.2 behind `server.default.svc.cluster.local` on 10.96.0.10 (80 → 5201).
pub fn mesh_resources() -> Value {
    let host = "server.default.svc.cluster.local";
    json!({
        "workloads": [
            workload(CLIENT_UID, "client", "client", "10.77.0.1", &[]),
            workload(SERVER_UID, "server", "server", "10.77.0.2", &[(&format!("default/{host}"), 80, 5201)]),
        ],
        "services": [service("server", host, "10.96.0.10", 80, 5201)],
        "authorizations": [],
    })
}

/// A namespace-scoped DENY policy in the fake's JSON for one destination port.
pub fn deny_port(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "namespace": "default",
        "scope": "NAMESPACE",
        "action": "DENY",
        "rules": [{"clauses": [{"matches": [{"destinationPorts": [port]}]}]}],
    })
}

/// Writes `var/run/secrets/tokens/istio-token` under `dir`: where ztunnel (and ringtun) look for
/// the pod's token, relative to the working directory.
pub fn write_token(dir: &Path, token: &str) {
    let tokens = dir.join("var/run/secrets/tokens");
    std::fs::create_dir_all(&tokens).expect("token directory");
    std::fs::write(tokens.join("istio-token"), token).expect("token file");
}

/// The client namespace's outbound capture, leaving istiod's port alone: a proxy's connection
/// to its control plane is never its own traffic (ztunnel does not mark it).
pub fn capture_outbound_but_istiod(ns: &Netns) {
    ns.capture_outbound(15001, ringtun_testbed::DEFAULT_MARK)
        .expect("outbound capture");
    ns.nft("insert rule inet ringtun output tcp dport 15012 return\n")
        .expect("leave istiod's port uncaptured");
}

/// The fake istiod, in a namespace; killed on drop, its events printed if the test failed.
pub struct FakeIstiod {
    child: Child,
    stdin: ChildStdin,
    events_path: PathBuf,
    /// The resources file it watches.
    pub resources: PathBuf,
}

/// How a [`FakeIstiod`] is started.
pub struct IstiodArgs<'a> {
    /// Listen address (inside the namespace).
    pub listen: &'a str,
    /// The test CA: certificate and key.
    pub ca: (&'a Path, &'a Path),
    /// Names of its serving certificate (DNS names or IPs).
    pub sans: Vec<String>,
    /// Accepted tokens (empty: anyone).
    pub tokens: Vec<String>,
    /// Cap on certificate lifetimes, seconds (0: none).
    pub max_ttl: u64,
}

impl<'a> IstiodArgs<'a> {
    /// On [`ISTIOD_ADDR`] with a certificate for 10.77.0.2 and istiod's service name, [`TOKEN`].
    pub fn new(ca_cert: &'a Path, ca_key: &'a Path) -> Self {
        IstiodArgs {
            listen: "0.0.0.0:15012",
            ca: (ca_cert, ca_key),
            sans: vec!["10.77.0.2".into(), "istiod.istio-system.svc".into()],
            tokens: vec![TOKEN.into()],
            max_ttl: 0,
        }
    }
}

impl FakeIstiod {
    /// Writes `resources` to `dir/resources.json`, starts the fake in `ns` (or in the test's
    /// own namespace) and waits until it listens.
    pub fn start(
        ns: Option<&Netns>,
        dir: &Path,
        args: IstiodArgs<'_>,
        resources: &Value,
    ) -> FakeIstiod {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/peers/fake_istiod.py");
        let res_path = dir.join("resources.json");
        write_json(&res_path, resources);
        let events_path = dir.join("istiod-events.jsonl");
        let mut cmd = match ns {
            Some(ns) => ns.exec("python3"),
            None => std::process::Command::new("python3"),
        };
        cmd.arg(&script)
            .args(["--listen", args.listen])
            .arg("--ca-cert")
            .arg(args.ca.0)
            .arg("--ca-key")
            .arg(args.ca.1)
            .arg("--resources")
            .arg(&res_path)
            .args(["--max-ttl", &args.max_ttl.to_string()]);
        for s in &args.sans {
            cmd.args(["--san", s]);
        }
        for t in &args.tokens {
            cmd.args(["--token", t]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&events_path).expect("events file"))
            .stderr(std::fs::File::create(dir.join("istiod.err")).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn python3 {}: {e}", script.display()));
        let stdin = child.stdin.take().expect("istiod stdin");
        let istiod = FakeIstiod {
            child,
            stdin,
            events_path,
            resources: res_path,
        };
        istiod.wait_event("listening", |e| e["event"] == "listening");
        istiod
    }

    /// The address it listens on (the port it got, with port 0).
    pub fn addr(&self) -> String {
        let e = self.wait_event("listening", |e| e["event"] == "listening");
        e["addr"].as_str().unwrap_or_default().to_owned()
    }

    /// The streams a proxy opened, oldest first, by the IP in its node id (`ztunnel~IP~…`);
    /// waits for at least `n`.
    pub fn streams_of(&self, node_ip: &str, n: usize) -> Vec<Value> {
        let prefix = format!("ztunnel~{node_ip}~");
        self.wait_events("the proxy's subscriptions", n, |e| {
            e["node"].as_str().is_some_and(|id| id.starts_with(&prefix))
        })
        .into_iter()
        .map(|e| e["stream"].clone())
        .collect()
    }

    /// The first request a proxy sent on `stream` for `type_url` (its subscription).
    pub fn subscription(&self, stream: &Value, type_url: &str) -> Value {
        self.wait_event("a subscription", |e| {
            e["event"] == "request" && &e["stream"] == stream && e["type_url"] == type_url
        })
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.events_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The first event matching `pred`, waiting up to [`EVENT_WAIT`].
    pub fn wait_event(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_events(what, 1, pred).remove(0)
    }

    /// Waits until `n` events match `pred`; returns them.
    pub fn wait_events(&self, what: &str, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + EVENT_WAIT;
        loop {
            let found: Vec<Value> = self.events().into_iter().filter(|e| pred(e)).collect();
            if found.len() >= n {
                return found;
            }
            if Instant::now() >= deadline {
                panic!(
                    "fake istiod: {n} × {what} not seen within {EVENT_WAIT:?} ({} seen); stderr:\n{}",
                    found.len(),
                    std::fs::read_to_string(self.events_path.with_file_name("istiod.err"))
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Replaces the resources it serves (atomically; the fake pushes the difference).
    pub fn set_resources(&self, resources: &Value) {
        write_json(&self.resources, resources);
    }

    /// Sends one stdin command (`reload`, `close`, `ca-fail N`).
    pub fn command(&mut self, line: &str) {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("writing {line:?} to the fake istiod: {e}"));
    }

    /// Ends the stream with CANCELLED, as istiod does at its connection age (a routine end:
    /// ztunnel's `Reconnect`), and waits for the ACK on the stream the node at `node_ip` opens
    /// again, its `nth` (from 1).
    pub fn close_cancelled(&mut self, node_ip: &str, nth: usize) {
        self.command("close cancelled");
        let again = self.streams_of(node_ip, nth).remove(nth - 1);
        self.wait_event("an ACK on the stream opened again", |e| {
            is(e, "ack", ADDRESS_TYPE) && e["stream"] == again
        });
    }
}

/// `istio_xds_connection_terminations_total` of one `reason` in `scrape`.
pub fn terminations(scrape: &crate::common::Scrape, reason: &str) -> f64 {
    scrape.one(
        "istio_xds_connection_terminations_total",
        &[("reason", reason)],
    )
}

impl Drop for FakeIstiod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "===== fake istiod events =====\n{}",
                std::fs::read_to_string(&self.events_path).unwrap_or_default()
            );
        }
    }
}

/// Writes JSON atomically, so the watcher never reads half a file.
pub fn write_json(path: &Path, v: &Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v).expect("json")).expect("write json");
    std::fs::rename(&tmp, path).expect("rename json");
}

/// Whether `e` is an ACK (`ack`) or NACK (`nack`) of `type_url` on any stream.
pub fn is(e: &Value, event: &str, type_url: &str) -> bool {
    e["event"] == event && e["type_url"] == type_url
}

pub use crate::common::ztunnel::ztunnel_bin;

/// The real ztunnel's test CA directory (`test-ca-root-cert.pem`, `test-ca-key.pem`).
pub fn ztunnel_test_ca() -> (PathBuf, PathBuf) {
    let dir = ztunnel_bin().with_file_name("");
    (
        dir.join("test-ca-root-cert.pem"),
        dir.join("test-ca-key.pem"),
    )
}

/// A ztunnel in dedicated mode for `default/<who>` whose workloads, policies and certificate
/// come from the fake istiod at `url` (`FAKE_CA` unset, no local config); run in `dir` (where
/// the token file is); killed on drop, its log printed if the test failed.
pub struct XdsZtunnel {
    child: Child,
    log: PathBuf,
}

impl XdsZtunnel {
    /// Starts it in `ns` with `ip` as its pod IP and `roots` as istiod's root; waits for its
    /// listeners.
    pub fn start(ns: &Netns, who: &str, ip: &str, url: &str, roots: &Path, dir: &Path) -> Self {
        XdsZtunnel::start_with(ns, who, ip, url, roots, dir, &[])
    }

    /// [`XdsZtunnel::start`] with `env` added to its environment (e.g. `XDS_ON_DEMAND`).
    pub fn start_with(
        ns: &Netns,
        who: &str,
        ip: &str,
        url: &str,
        roots: &Path,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let log = dir.join(format!("ztunnel-{who}.log"));
        let child = ns
            .exec(ztunnel_bin())
            .envs(env.iter().copied())
            .current_dir(dir)
            .env("PROXY_MODE", "dedicated")
            .env("PROXY_WORKLOAD_INFO", format!("default/{who}/{who}"))
            .env("XDS_ADDRESS", url)
            .env("CA_ADDRESS", url)
            .env("XDS_ROOT_CA", roots)
            .env("CA_ROOT_CA", roots)
            .env("INSTANCE_IP", ip)
            .env("POD_NAME", who)
            .env("POD_NAMESPACE", "default")
            .env("PACKET_MARK", "1337")
            .env("ENABLE_ORIG_SRC", "false")
            .env("ZTUNNEL_WORKER_THREADS", "1")
            .env("RUST_LOG", "info")
            .env_remove("FAKE_CA")
            .env_remove("LOCAL_XDS_PATH")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("ztunnel log"))
            .stderr(std::fs::File::create(dir.join(format!("ztunnel-{who}.err"))).expect("log"))
            .spawn()
            .expect("spawn ztunnel");
        let z = XdsZtunnel { child, log };
        let deadline = Instant::now() + EVENT_WAIT;
        loop {
            let listening = ns.run("ss", ["-ltnH"]).unwrap_or_default();
            if listening.contains(":15008 ") && listening.contains(":15001 ") {
                return z;
            }
            assert!(
                Instant::now() < deadline,
                "ztunnel ({who}) never listened:\n{}",
                z.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its log so far.
    pub fn text(&self) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        // ANSI colour sequences, should a terminal have been detected.
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    /// Waits until a line of its log contains every one of `want`; returns it.
    pub fn wait_line(&self, want: &[&str]) -> String {
        let deadline = Instant::now() + EVENT_WAIT;
        loop {
            let text = self.text();
            if let Some(l) = text.lines().find(|l| want.iter().all(|w| l.contains(w))) {
                return l.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no ztunnel line with {want:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether it still runs.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for XdsZtunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "===== ztunnel log {} =====\n{}",
                self.log.display(),
                self.text()
            );
        }
    }
}

/// A `ringtun run` in `ns` as the workload `default/<who>` (its mounted certificate from the
/// directory's CA) whose config comes from istiod only (`XDS_ADDRESS`, no --config); run in
/// the directory (where the token file is); killed on drop, its log printed if the test failed.
pub struct XdsRingtun {
    child: Child,
    log: PathBuf,
}

impl XdsRingtun {
    /// Starts it with `ip` as its pod IP and waits until it answers ready on 15021 (which, with
    /// xDS, means istiod's first config is in force).
    pub fn start(ns: &Netns, who: &str, ip: &str, url: &str, dir: &Path) -> XdsRingtun {
        XdsRingtun::spawn(ns, who, ip, url, dir).ready(ns, who)
    }

    /// [`XdsRingtun::start`] without certificate files: its certificates come from istiod's
    /// CA (`CA_ROOT_CA` the directory's CA; `CA_ADDRESS` unless `env` sets it is
    /// XDS_ADDRESS's istiod); `env` is added to its environment.
    pub fn start_from_ca(
        ns: &Netns,
        who: &str,
        ip: &str,
        url: &str,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> XdsRingtun {
        let root = dir.join("ca.pem");
        XdsRingtun::spawn_custom(ns, who, ip, url, dir, &root, false, env).ready(ns, who)
    }

    /// Waits until it answers ready on 15021.
    fn ready(mut self, ns: &Netns, who: &str) -> XdsRingtun {
        let r = &mut self;
        let deadline = Instant::now() + EVENT_WAIT;
        let ready = || {
            matches!(
                ns.enter(|| ringtun_testbed::process::ready_status(
                    ringtun_testbed::process::READY_ADDR
                )),
                Ok(Ok(200))
            )
        };
        while !ready() {
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!("ringtun ({who}) exited with {status}:\n{}", r.log());
            }
            assert!(
                Instant::now() < deadline,
                "ringtun ({who}) not ready within {EVENT_WAIT:?}:\n{}",
                r.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        self
    }

    /// Starts it without waiting for anything.
    pub fn spawn(ns: &Netns, who: &str, ip: &str, url: &str, dir: &Path) -> XdsRingtun {
        XdsRingtun::spawn_with_root(ns, who, ip, url, dir, &dir.join("ca.pem"))
    }

    /// [`XdsRingtun::spawn`] with `root` as istiod's root (`XDS_ROOT_CA`).
    pub fn spawn_with_root(
        ns: &Netns,
        who: &str,
        ip: &str,
        url: &str,
        dir: &Path,
        root: &Path,
    ) -> XdsRingtun {
        XdsRingtun::spawn_custom(ns, who, ip, url, dir, root, true, &[])
    }

    /// Starts it with istiod's root `root`, the mounted certificate files or not (then they
    /// come from the CA, whose root is `root` too), and `env` added.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_custom(
        ns: &Netns,
        who: &str,
        ip: &str,
        url: &str,
        dir: &Path,
        root: &Path,
        files: bool,
        env: &[(&str, &str)],
    ) -> XdsRingtun {
        let log = dir.join(format!("ringtun-{who}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("dup log file");
        let mut cmd = ns.exec(crate::common::ringtun_bin());
        cmd.current_dir(dir).arg("run");
        if files {
            let (chain, key) = crate::common::cert_paths(dir, &format!("default/{who}"));
            cmd.arg("--cert-chain")
                .arg(&chain)
                .arg("--key")
                .arg(&key)
                .arg("--roots")
                .arg(dir.join("ca.pem"));
        } else {
            cmd.env("CA_ROOT_CA", root);
        }
        cmd.envs(env.iter().copied());
        let child = cmd
            .args([
                "--workload",
                &format!("default/{who}/{who}"),
                "--workers",
                "1",
            ])
            .env("XDS_ADDRESS", url)
            .env("XDS_ROOT_CA", root)
            .env("INSTANCE_IP", ip)
            .env("POD_NAME", who)
            .env("POD_NAMESPACE", "default")
            .env_remove("LOCAL_XDS_PATH")
            .env(
                "RINGTUN_LOG",
                std::env::var("RINGTUN_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn ringtun run");
        XdsRingtun { child, log }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        crate::common::strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// Waits until `n` lines of the log contain every one of `want`; returns the last.
    pub fn wait_lines(&self, want: &[&str], n: usize) -> String {
        let deadline = Instant::now() + EVENT_WAIT;
        loop {
            let text = self.log();
            let found: Vec<&str> = text
                .lines()
                .filter(|l| want.iter().all(|w| l.contains(w)))
                .collect();
            if found.len() >= n {
                return found[n - 1].to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no {n} ringtun lines with {want:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits for an access line satisfying `pred`.
    pub fn wait_access(
        &self,
        what: &str,
        pred: impl Fn(&crate::common::AccessLine) -> bool,
    ) -> crate::common::AccessLine {
        let deadline = Instant::now() + EVENT_WAIT;
        loop {
            if let Some(l) = crate::common::parse_access(&self.log())
                .into_iter()
                .find(|l| pred(l))
            {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no access line for {what}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for XdsRingtun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "===== ringtun log {} =====\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}
