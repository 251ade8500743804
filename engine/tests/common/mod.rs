//! Shared helpers of the end-to-end tests: scratch directories, certificates from
//! `ringtun gen-certs`, ztunnel-format configs, ringtun processes inside network namespaces
//! (with their logs printed when a test fails), echo servers, checksummed transfers and access
//! log parsing.
//!
//! Every test builds its own [`ringtun_topology::TwoNodes`], so tests can run in parallel; all of
//! them need root and fail (never skip) without it.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ringtun_topology::{Netns, TwoNodes, DEFAULT_MARK};
use sha2::{Digest, Sha256};

/// SPIFFE identity of the client workload's certificate.
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
/// SPIFFE identity of the server workload's certificate.
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
/// Hostname of the service in front of the server workload.
pub const SERVICE_HOST: &str = "server.default.svc.cluster.local";
/// Ports the server namespace's inbound capture leaves alone (HBONE, health, metrics).
pub const INBOUND_EXCEPT: [u16; 3] = [15008, 15020, 15021];
/// How long a ringtun gets to log `ringtun ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Socket timeouts of test clients and servers: a hang fails the test instead of stalling it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The ringtun binary under test.
pub fn ringtun_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ringtun"))
}

/// The independent Python HBONE peers.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/peers")
}

/// A scratch directory, removed on drop unless the test failed or `RINGTUN_E2E_KEEP` is set
/// (then kept and its path printed, for the logs, reports and certificates in it).
pub struct TempDir(PathBuf);

static TEMP_COUNTER: AtomicU32 = AtomicU32::new(0);

impl TempDir {
    /// Creates `/tmp/ringtun-e2e-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "ringtun-e2e-{tag}-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch directory");
        TempDir(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed; keeping {}", self.0.display());
        } else if std::env::var_os("RINGTUN_E2E_KEEP").is_some() {
            eprintln!("RINGTUN_E2E_KEEP set; keeping {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs `ringtun gen-certs --dir DIR --trust-domain TD --identity …` and fails the test if it
/// does not succeed.
pub fn gen_certs(dir: &Path, trust_domain: &str, identities: &[&str]) {
    let mut cmd = Command::new(ringtun_bin());
    cmd.arg("gen-certs")
        .arg("--dir")
        .arg(dir)
        .args(["--trust-domain", trust_domain]);
    for id in identities {
        cmd.args(["--identity", id]);
    }
    let out = cmd.output().expect("run ringtun gen-certs");
    assert!(
        out.status.success(),
        "ringtun gen-certs failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Paths of what `gen-certs` wrote for an identity `ns/sa`: (chain, key).
pub fn cert_paths(dir: &Path, identity: &str) -> (PathBuf, PathBuf) {
    let base = identity.replace('/', ".");
    (
        dir.join(format!("{base}.pem")),
        dir.join(format!("{base}.key")),
    )
}

/// Runs `cmd` (a `ringtun run`) with its stderr in `log` until it exits, or until it logs
/// `ringtun ready` (then kills it); returns whether it got ready, its exit status and what it
/// printed.
pub fn run_until_ready(mut cmd: Command, log: &Path) -> (bool, std::process::ExitStatus, String) {
    let file = std::fs::File::create(log).expect("create log");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn ringtun run");
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        if std::fs::read_to_string(log).is_ok_and(|l| l.contains("ringtun ready")) {
            let _ = child.kill();
            break true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break false;
        }
        assert!(
            Instant::now() < deadline,
            "ringtun neither started nor exited"
        );
        std::thread::sleep(Duration::from_millis(25));
    };
    let status = child.wait().expect("wait for ringtun");
    let text = strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
    (ready, status, text)
}

/// `--workers 1`, the extra arguments most single-ringtun tests start with.
pub fn one_worker() -> Vec<String> {
    vec!["--workers".into(), "1".into()]
}

/// A ztunnel local config with the client (10.77.0.1) and server (10.77.0.2) workloads and the
/// service `default/server.default.svc.cluster.local` (port 80 → 5201) on the given VIPs
/// (`/10.96.0.10` form). With `ipv6` the workloads also carry fd77::1 / fd77::2.
pub fn mesh_config(vips: &[&str], ipv6: bool) -> String {
    let ips = |v4: &str, v6: &str| {
        if ipv6 {
            format!("[\"{v4}\", \"{v6}\"]")
        } else {
            format!("[\"{v4}\"]")
        }
    };
    let vips: String = vips.iter().map(|v| format!("    - {v}\n")).collect();
    format!(
        r#"# written by ringtun's e2e tests
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: {client_ips}
  protocol: HBONE
  node: node-a
  network: ""
  services: {{}}
- uid: cluster1//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: {server_ips}
  protocol: HBONE
  node: node-b
  network: ""
  services:
    "default/{SERVICE_HOST}":
      80: 5201
services:
- name: server
  namespace: default
  hostname: {SERVICE_HOST}
  vips:
{vips}  ports:
    80: 5201
policies: []
"#,
        client_ips = ips("10.77.0.1", "fd77::1"),
        server_ips = ips("10.77.0.2", "fd77::2"),
    )
}

/// Writes a file atomically (temporary file + rename), as a config management tool would, so
/// a watcher never reads a half-written config.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text).expect("write temporary file");
    std::fs::rename(&tmp, path).expect("rename into place");
}

/// A `ringtun run` process inside a namespace; killed on drop, and its log printed if the test
/// is failing.
pub struct Ringtun {
    /// Which side, for messages.
    pub name: String,
    child: Child,
    /// stderr (the log) and stdout of the process.
    pub log_path: PathBuf,
}

/// What a [`Ringtun`] is started with.
pub struct RingtunArgs<'a> {
    /// `--config`.
    pub config: &'a Path,
    /// Directory with `ca.pem` and the workload's certificate.
    pub certs: &'a Path,
    /// Identity whose certificate to use, `ns/sa`.
    pub identity: &'a str,
    /// `--workload ns/name`.
    pub workload: &'a str,
    /// Further arguments (`--io-driver`, `--workers`…).
    pub extra: Vec<String>,
}

impl Ringtun {
    /// Starts `ringtun run` in `ns` and waits for `ringtun ready`.
    pub fn start(ns: &Netns, name: &str, log_dir: &Path, args: RingtunArgs<'_>) -> Ringtun {
        let (chain, key) = cert_paths(args.certs, args.identity);
        let log_path = log_dir.join(format!("ringtun-{name}.log"));
        let log = std::fs::File::create(&log_path).expect("create log file");
        let log2 = log.try_clone().expect("dup log file");
        let child = ns
            .exec(ringtun_bin())
            .arg("run")
            .arg("--config")
            .arg(args.config)
            .arg("--cert-chain")
            .arg(&chain)
            .arg("--key")
            .arg(&key)
            .arg("--roots")
            .arg(args.certs.join("ca.pem"))
            .args(["--workload", args.workload])
            .args(&args.extra)
            // RINGTUN_E2E_LOG=debug (for example) gives more detail when chasing a failure.
            .env(
                "RINGTUN_LOG",
                std::env::var("RINGTUN_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("spawn ringtun run");
        let mut r = Ringtun {
            name: name.to_owned(),
            child,
            log_path,
        };
        r.wait_ready();
        r
    }

    /// Starts ringtun in `ns` as the workload `default/<who>`, with that identity's certificate
    /// from `dir` (the log goes there too), the config at `config`, and `extra` arguments.
    pub fn start_as(
        ns: &Netns,
        who: &str,
        dir: &Path,
        config: &Path,
        extra: Vec<String>,
    ) -> Ringtun {
        let workload = format!("default/{who}");
        Ringtun::start(
            ns,
            who,
            dir,
            RingtunArgs {
                config,
                certs: dir,
                identity: &workload,
                workload: &workload,
                extra,
            },
        )
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.log().contains("ringtun ready") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "ringtun ({}) exited with {status} before it was ready",
                    self.name
                );
            }
            assert!(
                Instant::now() < deadline,
                "ringtun ({}) did not log `ringtun ready` within {READY_TIMEOUT:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log_path).unwrap_or_default())
    }

    /// Access lines logged so far.
    pub fn access(&self) -> Vec<AccessLine> {
        parse_access(&self.log())
    }

    /// Waits until an access line satisfies `pred` and returns it; fails the test (showing the
    /// access lines seen) after `timeout`.
    pub fn wait_access(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&AccessLine) -> bool,
    ) -> AccessLine {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.access();
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return l.clone();
            }
            if Instant::now() > deadline {
                let seen: Vec<&str> = lines.iter().map(|l| l.raw.as_str()).collect();
                panic!(
                    "ringtun ({}): no access line {what} within {timeout:?}; access lines:\n{}",
                    self.name,
                    seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until the log has at least `n` lines containing `needle`.
    pub fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.lines().filter(|l| l.contains(needle)).count() >= n {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "ringtun ({}): fewer than {n} log lines with {needle:?} after {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Whether the process is still running (not exited, not a zombie).
    pub fn is_alive(&self) -> bool {
        // /proc/PID/stat is "pid (comm) STATE …"; comm may contain spaces, so look after ')'.
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().to_owned())
            })
            .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
    }

    /// Waits until `pred` holds for the access lines logged so far; fails the test with them
    /// after `timeout`.
    pub fn wait_access_all(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[AccessLine]) -> bool,
    ) -> Vec<AccessLine> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.access();
            if pred(&lines) {
                return lines;
            }
            if Instant::now() > deadline {
                let seen: Vec<&str> = lines.iter().map(|l| l.raw.as_str()).collect();
                panic!(
                    "ringtun ({}): access lines never showed {what} within {timeout:?}:\n{}",
                    self.name,
                    seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Fails the test if the log shows a panic.
    pub fn assert_no_panic(&self) {
        let log = self.log();
        assert!(
            !log.contains("panicked"),
            "ringtun ({}) panicked:\n{log}",
            self.name
        );
    }
}

impl Drop for Ringtun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "===== ringtun ({}) log {} =====\n{}\n===== end of ringtun ({}) log =====",
                self.name,
                self.log_path.display(),
                self.log(),
                self.name
            );
        }
    }
}

/// Removes ANSI colour sequences, in case a log was written with colours.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// One access-log line, split into its `key=value` fields.
#[derive(Clone, Debug)]
pub struct AccessLine {
    /// The line as logged.
    pub raw: String,
    /// Fields by key (quotes removed).
    pub fields: HashMap<String, String>,
}

impl AccessLine {
    /// A field's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// Whether field `key` equals `value`.
    pub fn is(&self, key: &str, value: &str) -> bool {
        self.get(key) == Some(value)
    }

    /// A numeric field, 0 if absent or not a number.
    pub fn num(&self, key: &str) -> u64 {
        self.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

/// Access lines (target `access`, with a `direction=` field) of a log.
pub fn parse_access(log: &str) -> Vec<AccessLine> {
    log.lines()
        .filter(|l| l.contains("access") && l.contains("direction="))
        .map(|l| AccessLine {
            raw: l.to_owned(),
            fields: parse_fields(&l[l.find("direction=").unwrap_or(0)..]),
        })
        .collect()
}

/// Splits `a=1 b="x y" c=z` into a map.
pub fn parse_fields(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_owned();
        let after = &rest[eq + 1..];
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (q[..end].to_owned(), &q[end + 1..]),
                None => (q.to_owned(), ""),
            }
        } else {
            match after.find(' ') {
                Some(end) => (after[..end].to_owned(), &after[end..]),
                None => (after.to_owned(), ""),
            }
        };
        // A key with spaces means we ran into free text: keep only the last word.
        let key = key.rsplit(' ').next().unwrap_or_default().to_owned();
        out.insert(key, value);
        rest = next.trim_start();
    }
    out
}

/// Builds a [`TwoNodes`] topology or fails the test with a readable reason (e.g. not root).
pub fn two_nodes(prefix: &str) -> TwoNodes {
    TwoNodes::new(prefix).unwrap_or_else(|e| panic!("building the two-node topology: {e}"))
}

/// Creates a namespace or fails the test with a readable reason (e.g. not root).
pub fn netns(prefix: &str) -> Netns {
    Netns::new(prefix).unwrap_or_else(|e| panic!("creating a network namespace: {e}"))
}

/// The usual two-node mesh: namespaces, certificates, config, outbound capture in the client
/// namespace, a ringtun on each side.
// Fields drop in declaration order: processes first, then the namespaces, then the directory
// holding their logs.
pub struct Mesh {
    /// ringtun in the client namespace (workload default/client).
    pub client: Ringtun,
    /// ringtun in the server namespace (workload default/server).
    pub server: Ringtun,
    /// The namespaces.
    pub nodes: TwoNodes,
    /// Config file both ringtuns read.
    pub config: PathBuf,
    /// Scratch directory (certificates, config, logs).
    pub dir: TempDir,
}

/// Options of [`Mesh::start`].
pub struct MeshOptions {
    /// Namespace name prefix (≤ 4 chars).
    pub prefix: &'static str,
    /// Config text.
    pub config: String,
    /// Extra arguments for both ringtuns.
    pub extra: Vec<String>,
    /// Install the plaintext inbound capture (15006) in the server namespace from the start.
    pub capture_inbound: bool,
}

impl MeshOptions {
    /// Default config (VIP 10.96.0.10, IPv4 only), one worker, auto driver.
    pub fn new(prefix: &'static str) -> Self {
        MeshOptions {
            prefix,
            config: mesh_config(&["/10.96.0.10"], false),
            extra: vec!["--workers".into(), "1".into()],
            capture_inbound: false,
        }
    }
}

/// The start of every two-node mesh: the namespaces, a scratch directory with certificates for
/// default/client and default/server, and `config.yaml` in it holding `config`. `prepare` runs
/// on the fresh directory before the certificates are issued (e.g. to issue extra ones).
pub fn mesh_files(
    prefix: &'static str,
    config: &str,
    prepare: impl FnOnce(&TempDir),
) -> (TwoNodes, TempDir, PathBuf) {
    let nodes = two_nodes(prefix);
    let dir = TempDir::new(prefix);
    prepare(&dir);
    gen_certs(
        dir.path(),
        "cluster.local",
        &["default/client", "default/server"],
    );
    let path = dir.join("config.yaml");
    write_atomic(&path, config);
    (nodes, dir, path)
}

impl Mesh {
    /// Builds the topology and starts both ringtuns.
    pub fn start(opts: MeshOptions) -> Mesh {
        let (nodes, dir, config) = mesh_files(opts.prefix, &opts.config, |_| {});
        nodes
            .client
            .capture_outbound(15001, DEFAULT_MARK)
            .expect("outbound capture");
        if opts.capture_inbound {
            nodes
                .server
                .capture_inbound(15006, &INBOUND_EXCEPT)
                .expect("inbound capture");
        }
        let server = Ringtun::start_as(
            &nodes.server,
            "server",
            dir.path(),
            &config,
            opts.extra.clone(),
        );
        let client = Ringtun::start_as(&nodes.client, "client", dir.path(), &config, opts.extra);
        Mesh {
            dir,
            config,
            client,
            server,
            nodes,
        }
    }

    /// Prints the nftables rulesets when the test is failing (drop order: before the fields).
    fn dump_on_failure(&self) {
        for ns in [&self.nodes.client, &self.nodes.server] {
            eprintln!(
                "===== nft ruleset of {} =====\n{}",
                ns.name(),
                ns.nft_ruleset().unwrap_or_else(|e| e.to_string())
            );
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_on_failure();
        }
    }
}

/// What an echo server saw on one connection.
#[derive(Clone, Debug)]
pub struct EchoRecord {
    /// The client address as the server saw it.
    pub peer: SocketAddr,
    /// The address the client reached.
    pub local: SocketAddr,
    /// Bytes received (and echoed).
    pub bytes: u64,
    /// SHA-256 of the bytes received, hex.
    pub sha256: String,
    /// The error that ended the connection, if it did not end with EOF.
    pub error: Option<ErrorKind>,
}

/// Records shared between an echo server's threads and the test.
#[derive(Default)]
pub struct Records {
    list: Mutex<Vec<EchoRecord>>,
    changed: Condvar,
}

impl Records {
    fn push(&self, r: EchoRecord) {
        self.list.lock().expect("records lock").push(r);
        self.changed.notify_all();
    }

    /// All records so far.
    pub fn all(&self) -> Vec<EchoRecord> {
        self.list.lock().expect("records lock").clone()
    }

    /// Waits until there are at least `n` records; returns how many there are.
    pub fn wait_count(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut list = self.list.lock().expect("records lock");
        while list.len() < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            list = self
                .changed
                .wait_timeout(list, left)
                .expect("records lock")
                .0;
        }
        list.len()
    }

    /// Waits until some record satisfies `pred` (which must not touch these records: the lock
    /// is held while it runs).
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&EchoRecord) -> bool,
    ) -> Option<EchoRecord> {
        let deadline = Instant::now() + timeout;
        let mut list = self.list.lock().expect("records lock");
        loop {
            if let Some(r) = list.iter().find(|r| pred(r)) {
                return Some(r.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            list = self
                .changed
                .wait_timeout(list, left)
                .expect("records lock")
                .0;
        }
    }
}

/// A TCP echo server running in a namespace: it echoes every byte, half-closes after the
/// client's EOF and records what it saw. Its threads live until the test process exits.
pub struct EchoServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// Per-connection records, added when a connection ends.
    pub records: Arc<Records>,
}

impl EchoServer {
    /// Binds `addr` inside `ns` and starts serving.
    pub fn start(ns: &Netns, addr: &str) -> EchoServer {
        let listener = bind_in(ns, addr);
        let addr = listener.local_addr().expect("local addr");
        let records = Arc::new(Records::default());
        let recs = records.clone();
        std::thread::Builder::new()
            .name(format!("echo {addr}"))
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let recs = recs.clone();
                    std::thread::spawn(move || echo_one(conn, &recs));
                }
            })
            .expect("spawn echo server");
        EchoServer { addr, records }
    }
}

/// Binds a listener inside `ns` (the socket stays in the namespace afterwards).
pub fn bind_in(ns: &Netns, addr: &str) -> TcpListener {
    ns.enter(|| TcpListener::bind(addr))
        .expect("enter namespace")
        .unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", ns.name()))
}

fn echo_one(mut conn: TcpStream, recs: &Records) {
    let peer = conn.peer_addr().unwrap_or_else(|_| unspecified());
    let local = conn.local_addr().unwrap_or_else(|_| unspecified());
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let error = loop {
        match conn.read(&mut buf) {
            Ok(0) => break None,
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
                if let Err(e) = conn.write_all(&buf[..k]) {
                    break Some(e.kind());
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => break Some(e.kind()),
        }
    };
    if error.is_none() {
        let _ = conn.shutdown(Shutdown::Write);
    }
    recs.push(EchoRecord {
        peer,
        local,
        bytes: n,
        sha256: hex::encode(h.finalize()),
        error,
    });
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// Connects to `dst` from inside `ns`, with a timeout.
pub fn connect_in(ns: &Netns, dst: &str) -> std::io::Result<TcpStream> {
    let dst = dst.to_owned();
    ns.enter(move || {
        let addr = dst
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("no address in {dst}")))?;
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(s)
    })
    .expect("enter namespace")
}

/// Connects to `dst` from inside `ns` with SO_MARK `mark` set before connecting: with the
/// ringtun mark this bypasses the namespace's outbound capture, like a client outside the mesh.
pub fn connect_marked_in(ns: &Netns, dst: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    ns.enter(move || {
        let (family, storage, len) = sockaddr(dst);
        // SAFETY: plain socket calls on a descriptor we own; it is wrapped into a TcpStream
        // (which closes it) right after a successful connect, and closed by hand otherwise.
        unsafe {
            let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&mark as *const u32).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            ) == 0
                && libc::connect(fd, (&storage as *const libc::sockaddr_storage).cast(), len) == 0;
            if !ok {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(e);
            }
            let s = <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Ok(s)
        }
    })
    .expect("enter namespace")
}

fn sockaddr(a: SocketAddr) -> (libc::c_int, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data for which all-zero is a valid value, and it is
    // large and aligned enough for both sockaddr_in and sockaddr_in6.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: see above.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            let len = std::mem::size_of::<libc::sockaddr_in>();
            (libc::AF_INET, storage, len as libc::socklen_t)
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: see above.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            let len = std::mem::size_of::<libc::sockaddr_in6>();
            (libc::AF_INET6, storage, len as libc::socklen_t)
        }
    }
}

/// Retries a checked echo of `n` bytes to `dst` (each attempt given 2 s) until one succeeds or
/// `within` has passed; returns the successful connection's local address.
pub fn echo_eventually(ns: &Netns, dst: &str, n: usize, within: Duration) -> SocketAddr {
    let deadline = Instant::now() + within;
    loop {
        let attempt = connect_in(ns, dst)
            .map_err(|e| format!("connect: {e}"))
            .and_then(|s| {
                let local = s.local_addr().map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(2)))
                    .map_err(|e| e.to_string())?;
                echo_on(s, n).map(|()| local)
            });
        match attempt {
            Ok(local) => return local,
            Err(e) if Instant::now() > deadline => {
                panic!("no successful echo through {dst} within {within:?}; last: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Sends `n` pattern bytes on an established stream, half-closes and checks the exact echo.
pub fn echo_on(mut s: TcpStream, n: usize) -> Result<(), String> {
    let mut r = s.try_clone().map_err(|e| format!("clone: {e}"))?;
    let reader = std::thread::spawn(move || read_to_end_or_error(&mut r));
    let mut data = vec![0u8; n];
    Pattern::new().fill(&mut data);
    let wrote = s.write_all(&data).and_then(|_| s.shutdown(Shutdown::Write));
    let (back, end) = reader.join().map_err(|_| "reader panicked".to_string())?;
    wrote.map_err(|e| format!("write: {e}"))?;
    end.map_err(|e| format!("read after {} bytes: {e}", back.len()))?;
    if sha256_hex(&back) != sha256_hex(&data) {
        return Err(format!("echo differs ({} of {n} bytes back)", back.len()));
    }
    Ok(())
}

/// A fast deterministic byte stream (xorshift64*), seeded randomly per transfer: random enough
/// that a misplaced or duplicated chunk changes the checksum, cheap enough for 64 MiB.
pub struct Pattern(u64);

impl Pattern {
    /// A new stream with a random seed.
    pub fn new() -> Self {
        Pattern(rand::random::<u64>() | 1)
    }

    /// The stream for `seed`: the same bytes every time, different bytes for different seeds.
    pub fn seeded(seed: u64) -> Self {
        Pattern(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// Fills `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

impl Default for Pattern {
    fn default() -> Self {
        Self::new()
    }
}

/// Outcome of [`transfer`].
#[derive(Debug, Clone)]
pub struct Transfer {
    /// The client socket's local address (what `forwarded: for=` should carry).
    pub local: SocketAddr,
    /// Bytes sent.
    pub sent: u64,
    /// Bytes received back.
    pub received: u64,
    /// SHA-256 of what was sent, hex.
    pub sha_sent: String,
    /// SHA-256 of what came back, hex.
    pub sha_received: String,
    /// How long it took.
    pub took: Duration,
}

/// Sends `n` pattern bytes to `dst` from inside `ns`, half-closes and reads everything back
/// (concurrently, so neither side's buffers can deadlock the transfer).
pub fn transfer(ns: &Netns, dst: &str, n: u64) -> std::io::Result<Transfer> {
    transfer_with(ns, dst, n, |_| {})
}

/// Like [`transfer`], calling `at_half` once half of the bytes are written (hot-reload tests
/// use it to change things while the connection is open).
pub fn transfer_with(
    ns: &Netns,
    dst: &str,
    n: u64,
    at_half: impl FnOnce(u64),
) -> std::io::Result<Transfer> {
    transfer_paced(ns, dst, n, 256 * 1024, Duration::ZERO, n - n / 2, at_half)
}

/// Echoes `n` bytes through `dst` in writes of `chunk` bytes with `pause` after each, calling
/// `at_bytes(written)` once `at` bytes are written; reads the echo concurrently.
pub fn transfer_paced(
    ns: &Netns,
    dst: &str,
    n: u64,
    chunk: usize,
    pause: Duration,
    at: u64,
    at_bytes: impl FnOnce(u64),
) -> std::io::Result<Transfer> {
    let start = Instant::now();
    let s = connect_in(ns, dst)?;
    paced_on(s, start, n, chunk, pause, at, at_bytes)
}

/// [`transfer_paced`] on a socket the caller connected (e.g. a marked one that the outbound
/// capture leaves alone); `start` is when the connection began.
pub fn paced_on(
    mut s: TcpStream,
    start: Instant,
    n: u64,
    chunk: usize,
    pause: Duration,
    at: u64,
    at_bytes: impl FnOnce(u64),
) -> std::io::Result<Transfer> {
    let local = s.local_addr()?;
    let mut r = s.try_clone()?;
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, String)> {
        let mut h = Sha256::new();
        let mut got = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return Ok((got, hex::encode(h.finalize()))),
                Ok(k) => {
                    h.update(&buf[..k]);
                    got += k as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    });
    let mut pat = Pattern::new();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; chunk];
    let mut sent = 0u64;
    let mut at_bytes = Some(at_bytes);
    let write_result = (|| -> std::io::Result<()> {
        while sent < n {
            let k = (n - sent).min(chunk as u64) as usize;
            pat.fill(&mut buf[..k]);
            s.write_all(&buf[..k])?;
            h.update(&buf[..k]);
            sent += k as u64;
            if sent >= at {
                if let Some(f) = at_bytes.take() {
                    f(sent);
                }
            }
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
        s.shutdown(Shutdown::Write)
    })();
    let read_result = reader
        .join()
        .map_err(|_| std::io::Error::other("reader thread panicked"))?;
    write_result?;
    let (received, sha_received) = read_result?;
    Ok(Transfer {
        local,
        sent: n,
        received,
        sha_sent: hex::encode(h.finalize()),
        sha_received,
        took: start.elapsed(),
    })
}

/// Like [`transfer`] but fails the test with context, and checks the echo is exact.
pub fn echo_ok(ns: &Netns, dst: &str, n: u64) -> Transfer {
    let t = transfer(ns, dst, n).unwrap_or_else(|e| panic!("transfer of {n} bytes to {dst}: {e}"));
    assert_eq!(t.received, n, "echo from {dst} lost bytes");
    assert_eq!(t.sha_sent, t.sha_received, "echo from {dst} differs");
    t
}

/// Sets SO_LINGER {on, 0} so that closing the socket sends RST instead of FIN.
pub fn set_linger_zero(s: &TcpStream) {
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a valid socket with a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&lg as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

/// Reads until EOF or error; returns the bytes read and how it ended.
pub fn read_to_end_or_error(s: &mut TcpStream) -> (Vec<u8>, std::io::Result<()>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, Ok(())),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (out, Err(e)),
        }
    }
}

/// SHA-256 hex of a byte slice.
pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Output of a Python peer run: exit code and its JSON lines.
pub struct PeerRun {
    /// Exit code (None if killed by a signal).
    pub code: Option<i32>,
    /// Each stdout line parsed as JSON.
    pub lines: Vec<serde_json::Value>,
    /// stderr, for messages.
    pub stderr: String,
}

impl PeerRun {
    /// The first line with `"event": event`.
    pub fn event(&self, event: &str) -> Option<&serde_json::Value> {
        self.lines.iter().find(|l| l["event"] == event)
    }
}

impl std::fmt::Display for PeerRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}", self.code)?;
        for l in &self.lines {
            write!(f, "\n  {l}")?;
        }
        if !self.stderr.is_empty() {
            write!(f, "\n  stderr: {}", self.stderr.trim())?;
        }
        Ok(())
    }
}

/// Runs `tests/peers/hbone_client.py ARGS…` inside `ns`.
pub fn python_client(ns: &Netns, args: &[&str]) -> PeerRun {
    let out = ns
        .exec("python3")
        .arg(peers_dir().join("hbone_client.py"))
        .args(args)
        .output()
        .expect("run python3 hbone_client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    PeerRun {
        code: out.status.code(),
        lines: stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("client line {l:?}: {e}")))
            .collect(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `tests/peers/hbone_client.py` in `ns` against 10.77.0.2:15008 with the certificate
/// `DIR/<cert>.pem`, CONNECTing to `authority` and echoing `bytes`, plus `extra` arguments
/// (e.g. `--header`).
pub fn hbone_client(
    ns: &Netns,
    dir: &TempDir,
    cert: &str,
    authority: &str,
    bytes: u64,
    extra: &[&str],
) -> PeerRun {
    let pem = dir.join(&format!("{cert}.pem"));
    let key = dir.join(&format!("{cert}.key"));
    let ca = dir.join("ca.pem");
    let bytes = bytes.to_string();
    let mut args = vec![
        "--connect",
        "10.77.0.2:15008",
        "--cert",
        pem.to_str().expect("utf-8 path"),
        "--key",
        key.to_str().expect("utf-8 path"),
        "--ca",
        ca.to_str().expect("utf-8 path"),
        "--authority",
        authority,
        "--bytes",
        &bytes,
        "--timeout",
        "20",
    ];
    args.extend_from_slice(extra);
    python_client(ns, &args)
}

/// `tests/peers/hbone_server.py` running in a namespace; killed on drop.
pub struct PythonServer {
    child: Child,
    /// Its JSON report file.
    pub report: PathBuf,
    log: PathBuf,
}

impl PythonServer {
    /// Starts the server on `listen` with the certificate of `identity` from `certs`, and waits
    /// until it listens.
    pub fn start(ns: &Netns, certs: &Path, identity: &str, listen: &str) -> PythonServer {
        Self::start_with(ns, certs, identity, listen, &[])
    }

    /// [`PythonServer::start`] with extra `hbone_server.py` arguments.
    pub fn start_with(
        ns: &Netns,
        certs: &Path,
        identity: &str,
        listen: &str,
        extra: &[&str],
    ) -> PythonServer {
        let (chain, key) = cert_paths(certs, identity);
        let report = certs.join("python-server-report.json");
        let log = certs.join("python-server.log");
        let logf = std::fs::File::create(&log).expect("create python server log");
        let child = ns
            .exec("python3")
            .arg(peers_dir().join("hbone_server.py"))
            .args(["--listen", listen])
            .arg("--cert")
            .arg(&chain)
            .arg("--key")
            .arg(&key)
            .arg("--ca")
            .arg(certs.join("ca.pem"))
            .arg("--report")
            .arg(&report)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn python3 hbone_server.py");
        let mut s = PythonServer { child, report, log };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !s.report.exists() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!(
                    "hbone_server.py exited with {st}: {}",
                    std::fs::read_to_string(&s.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "hbone_server.py did not start");
            std::thread::sleep(Duration::from_millis(25));
        }
        s
    }

    /// The current report.
    pub fn report(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(&self.report).expect("read python server report");
        serde_json::from_str(&text).expect("python server report is JSON")
    }

    /// Waits until the report has a finished stream whose received bytes hash to `sha`, and
    /// returns (connection, stream).
    pub fn wait_stream(
        &self,
        sha: &str,
        timeout: Duration,
    ) -> (serde_json::Value, serde_json::Value) {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.report();
            for c in r["connections"].as_array().into_iter().flatten() {
                for s in c["streams"].as_array().into_iter().flatten() {
                    if s["sha256_received"] == sha {
                        return (c.clone(), s.clone());
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "python server saw no finished stream with sha256 {sha}; report: {r:#}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl PythonServer {
    /// Sends `signal` to the server process (e.g. `SIGSTOP` to make it a peer that stops
    /// answering while the kernel keeps its TCP connections up).
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the first stream that ended (any way) and returns it with its connection.
    pub fn wait_stream_end(&self, timeout: Duration) -> (serde_json::Value, serde_json::Value) {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.report();
            for c in r["connections"].as_array().into_iter().flatten() {
                for s in c["streams"].as_array().into_iter().flatten() {
                    if s["end"] != "open" {
                        return (c.clone(), s.clone());
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "python server saw no stream end; report: {r:#}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "===== hbone_server.py stderr =====\n{}\n===== report =====\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default(),
                std::fs::read_to_string(&self.report).unwrap_or_default()
            );
        }
    }
}

/// Process control for the operations tests (signals, exit status, memory).
impl Ringtun {
    /// The process id (ringtun's own: `ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(
            rc,
            0,
            "kill({}, {signal}): {}",
            self.child.id(),
            std::io::Error::last_os_error()
        );
    }

    /// Waits up to `timeout` for the process to exit; its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Resident set size in KiB (`VmRSS` of /proc/PID/status); fails the test if unreadable.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_else(|e| panic!("ringtun ({}): /proc status: {e}", self.name));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("ringtun ({}): no VmRSS in /proc status", self.name))
    }
}

/// A server namespace with ringtun (workload default/server, one worker) and an echo server on
/// 5201, and a client namespace without ringtun, where a test's own peer runs.
pub struct ServerOnly {
    /// The server-side ringtun.
    pub server: Ringtun,
    /// The workload behind it.
    pub echo: EchoServer,
    /// Both namespaces.
    pub nodes: TwoNodes,
    /// Certificates (default/client, default/server) and the config.
    pub dir: TempDir,
}

impl ServerOnly {
    /// Sets it up; `prepare` runs on the fresh directory before the mesh certificates are
    /// issued (e.g. to issue extra ones).
    pub fn start_with(prefix: &'static str, prepare: impl FnOnce(&TempDir)) -> ServerOnly {
        let (nodes, dir, config) =
            mesh_files(prefix, &mesh_config(&["/10.96.0.10"], false), prepare);
        let server = Ringtun::start_as(&nodes.server, "server", dir.path(), &config, one_worker());
        let echo = EchoServer::start(&nodes.server, "0.0.0.0:5201");
        ServerOnly {
            server,
            echo,
            nodes,
            dir,
        }
    }
}
