//! Helpers of the in-pod (ZDS) tests: the fake node agent `tests/peers/node_agent.py` driven
//! line by line, and small waits on a namespace's listeners.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod node;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ringtun_testbed::Netns;

/// How long one agent command may take (its own ack timeout is 10 s).
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The fake istio-cni node agent, listening on a SOCK_SEQPACKET socket; killed on drop, its
/// transcript printed if the test fails.
pub struct NodeAgent {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    transcript: Vec<String>,
    stderr: PathBuf,
    /// The socket it listens on (what `INPOD_UDS` names).
    pub socket: PathBuf,
}

impl NodeAgent {
    /// Starts the agent on `socket` (logs in `dir`) and waits until it listens.
    pub fn start(socket: &Path, dir: &Path) -> NodeAgent {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/peers/node_agent.py");
        let stderr = dir.join("node-agent.err");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("create agent log"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn python3 {}: {e}", script.display()));
        let stdin = child.stdin.take().expect("agent stdin");
        let stdout = child.stdout.take().expect("agent stdout");
        let (tx, lines) = mpsc::channel();
        // A reader thread, so that a silent agent times out instead of hanging the test.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut agent = NodeAgent {
            child,
            stdin,
            lines,
            transcript: Vec::new(),
            stderr,
            socket: socket.to_owned(),
        };
        let first = agent.event();
        assert_eq!(first["event"], "listening", "agent did not start: {first}");
        agent
    }

    /// Sends one command line without waiting for its result.
    pub fn send(&mut self, line: &str) {
        self.transcript.push(format!("> {line}"));
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("writing {line:?} to the agent: {e}"));
    }

    /// The next JSON line the agent prints.
    pub fn event(&mut self) -> serde_json::Value {
        let line = self
            .lines
            .recv_timeout(EVENT_TIMEOUT)
            .unwrap_or_else(|e| panic!("no answer from the agent ({e})"));
        self.transcript.push(format!("< {line}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("agent printed {line:?}: {e}"))
    }

    /// Runs one command and returns its result.
    pub fn cmd(&mut self, line: &str) -> serde_json::Value {
        self.send(line);
        self.event()
    }

    /// Runs a command that must be answered with an ack; returns the ack's error ("" is ok).
    pub fn ack(&mut self, line: &str) -> String {
        let e = self.cmd(line);
        Self::ack_error(&e, line)
    }

    /// The error of an `ack` event, failing the test on any other event.
    pub fn ack_error(e: &serde_json::Value, what: &str) -> String {
        assert_eq!(e["event"], "ack", "{what}: expected an ack, got {e}");
        e["error"].as_str().unwrap_or_default().to_owned()
    }

    /// Replays the agent's pods and the snapshot (what istio-cni does on a new connection);
    /// every one must be acked with success.
    pub fn replay(&mut self) {
        self.send("replay");
        loop {
            let e = self.event();
            match e["event"].as_str() {
                Some("replayed") => return,
                Some("ack") => assert_eq!(Self::ack_error(&e, "replay"), "", "replay: {e}"),
                _ => panic!("replay: {e}"),
            }
        }
    }

    /// Stops this agent and starts a fresh one on the same socket, remembering no pod (what a
    /// restarted istio-cni agent knows before it rebuilds its cache). The old one is gone
    /// first: on its way out it removes the socket file, which would be the new one's.
    pub fn restart(&mut self) {
        let socket = self.socket.clone();
        let dir = self
            .stderr
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(std::env::temp_dir);
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
        *self = NodeAgent::start(&socket, &dir);
    }

    /// Waits for the proxy to connect and say hello; returns the version it announced.
    pub fn accept(&mut self) -> u64 {
        let e = self.cmd("accept 20");
        assert_eq!(e["event"], "hello", "proxy did not connect: {e}");
        e["version"].as_u64().unwrap_or_default()
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("===== node agent transcript =====");
            for l in &self.transcript {
                eprintln!("{l}");
            }
            let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            eprintln!("===== node agent stderr =====\n{err}");
        }
    }
}

/// The inode of a named namespace's nsfs file (`/run/netns/NAME`).
pub fn netns_ino(ns: &Netns) -> u64 {
    std::fs::metadata(ns.path())
        .unwrap_or_else(|e| panic!("stat {}: {e}", ns.path().display()))
        .ino()
}

/// TCP ports listening inside `ns` (`ss -ltnH`).
pub fn listening_ports(ns: &Netns) -> Vec<u16> {
    let out = ns.run("ss", ["-ltnH"]).unwrap_or_default();
    let mut ports: Vec<u16> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|local| local.rsplit(':').next()?.parse().ok())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Waits until `cond` holds on the ports listening in `ns`; fails with `what` and the ports.
pub fn wait_ports(ns: &Netns, what: &str, cond: impl Fn(&[u16]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ports = listening_ports(ns);
        if cond(&ports) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: ports listening in {}: {ports:?}",
            ns.name()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `workload_manager_*` as scraped from `node`'s proxy (ringtun's or ztunnel's): active,
/// pending, started, stopped; the families' types are checked to be ztunnel's.
pub fn workload_manager(node: &Netns) -> [f64; 4] {
    let s = crate::common::Scrape::take(node, false);
    for (family, kind) in [
        ("workload_manager_active_proxy_count", "gauge"),
        ("workload_manager_pending_proxy_count", "gauge"),
        ("workload_manager_proxies_started", "counter"),
        ("workload_manager_proxies_stopped", "counter"),
    ] {
        assert_eq!(
            s.types.get(family).map(String::as_str),
            Some(kind),
            "{}: {family}",
            s.what
        );
    }
    [
        s.one("workload_manager_active_proxy_count", &[]),
        s.one("workload_manager_pending_proxy_count", &[]),
        s.one("workload_manager_proxies_started_total", &[]),
        s.one("workload_manager_proxies_stopped_total", &[]),
    ]
}
