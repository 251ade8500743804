//! The independent Python HBONE peers of `tests/peers/`: `hbone_client.py` and `h2_abuse.py`
//! (run to completion, one JSON line per event) and `hbone_server.py` (a process with a JSON
//! report file).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ringtun_testbed::ringtun::cert_paths;
use ringtun_testbed::{Netns, Process};

use super::{peers_dir, ServerOnly, TempDir};

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
    /// Runs `cmd` (a peer script) to completion and parses its stdout lines as JSON.
    fn of(mut cmd: Command, script: &str) -> PeerRun {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("run python3 {script}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        PeerRun {
            code: out.status.code(),
            lines: stdout
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("{script} line {l:?}: {e}"))
                })
                .collect(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

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
    let mut cmd = ns.exec("python3");
    cmd.arg(peers_dir().join("hbone_client.py")).args(args);
    PeerRun::of(cmd, "hbone_client.py")
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

/// [`hbone_client`] with no extra arguments.
pub fn py_client(ns: &Netns, dir: &TempDir, cert: &str, authority: &str, bytes: u64) -> PeerRun {
    hbone_client(ns, dir, cert, authority, bytes, &[])
}

/// Asserts a python client run got a 200 and an exact echo of `bytes`.
pub fn assert_echoed(run: &PeerRun, bytes: u64) {
    assert_eq!(run.code, Some(0), "{run}");
    let result = run.event("result").expect("result line");
    assert_eq!(result["bytes_received"], bytes, "{run}");
    assert_eq!(result["sha256_sent"], result["sha256_received"], "{run}");
}

/// Runs `tests/peers/h2_abuse.py --mode MODE ARGS…` in `ns` against 10.77.0.2:15008 with the
/// client certificate.
pub fn h2_abuse(ns: &Netns, dir: &TempDir, mode: &str, args: &[&str]) -> PeerRun {
    let mut cmd = ns.exec("python3");
    cmd.arg(peers_dir().join("h2_abuse.py"))
        .args(["--mode", mode, "--connect", "10.77.0.2:15008"])
        .arg("--cert")
        .arg(dir.join("default.client.pem"))
        .arg("--key")
        .arg(dir.join("default.client.key"))
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .args(args);
    PeerRun::of(cmd, "h2_abuse.py")
}

/// The `result` line of an abuse run (which must have finished).
pub fn abuse_result(run: &PeerRun) -> serde_json::Value {
    assert_eq!(run.code, Some(0), "h2_abuse.py failed: {run}");
    run.event("result")
        .unwrap_or_else(|| panic!("no result line: {run}"))
        .clone()
}

/// Whether the server hung up on the abuser: GOAWAY, or the connection ended.
pub fn disconnected(result: &serde_json::Value) -> bool {
    !result["goaway"].is_null() || !result["closed"].is_null()
}

impl ServerOnly {
    /// Runs an abuse mode while a normal client echoes `bytes` on its own connection; returns
    /// both runs. The normal client starts `head_start` after the abuser.
    pub fn abuse_while_serving(
        &self,
        mode: &str,
        args: &[&str],
        head_start: Duration,
        bytes: u64,
    ) -> (PeerRun, PeerRun) {
        std::thread::scope(|s| {
            let abuser = s.spawn(|| h2_abuse(&self.nodes.client, &self.dir, mode, args));
            std::thread::sleep(head_start);
            let normal = py_client(
                &self.nodes.client,
                &self.dir,
                "default.client",
                "10.77.0.2:5201",
                bytes,
            );
            (abuser.join().expect("abuser thread"), normal)
        })
    }
}

/// `tests/peers/hbone_server.py` running in a namespace; killed on drop (its log and report
/// printed if the test is failing).
pub struct PythonServer {
    proc: Process,
    /// Its JSON report file.
    pub report: PathBuf,
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
        let mut cmd = ns.exec("python3");
        cmd.arg(peers_dir().join("hbone_server.py"))
            .args(["--listen", listen])
            .arg("--cert")
            .arg(&chain)
            .arg("--key")
            .arg(&key)
            .arg("--ca")
            .arg(certs.join("ca.pem"))
            .arg("--report")
            .arg(&report)
            .args(extra);
        let mut proc = Process::spawn(cmd, "hbone_server.py", &certs.join("python-server.log"))
            .expect("spawn python3 hbone_server.py");
        // It writes its report once it listens.
        proc.wait_until("listening", Duration::from_secs(15), |_| report.exists())
            .unwrap_or_else(|e| panic!("{e}"));
        PythonServer { proc, report }
    }

    /// The current report.
    pub fn report(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(&self.report).expect("read python server report");
        serde_json::from_str(&text).expect("python server report is JSON")
    }

    /// Waits until some stream of the report satisfies `pred`; returns it with its connection.
    fn wait_for_stream(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> (serde_json::Value, serde_json::Value) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let r = self.report();
            for c in r["connections"].as_array().into_iter().flatten() {
                for s in c["streams"].as_array().into_iter().flatten() {
                    if pred(s) {
                        return (c.clone(), s.clone());
                    }
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "python server saw no {what}; report: {r:#}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until the report has a finished stream whose received bytes hash to `sha`, and
    /// returns (connection, stream).
    pub fn wait_stream(
        &self,
        sha: &str,
        timeout: Duration,
    ) -> (serde_json::Value, serde_json::Value) {
        self.wait_for_stream(
            &format!("finished stream with sha256 {sha}"),
            timeout,
            |s| s["sha256_received"] == sha,
        )
    }

    /// Waits for the first stream that ended (any way) and returns it with its connection.
    pub fn wait_stream_end(&self, timeout: Duration) -> (serde_json::Value, serde_json::Value) {
        self.wait_for_stream("stream end", timeout, |s| s["end"] != "open")
    }

    /// Sends `signal` to the server process (e.g. `SIGSTOP` to make it a peer that stops
    /// answering while the kernel keeps its TCP connections up).
    pub fn signal(&self, signal: libc::c_int) {
        self.proc
            .signal(signal)
            .unwrap_or_else(|e| panic!("hbone_server.py: {e}"));
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "===== hbone_server.py report =====\n{}",
                std::fs::read_to_string(&self.report).unwrap_or_default()
            );
        }
    }
}
