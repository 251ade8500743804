//! The real ztunnel (`../shared/ztunnel/ztunnel`, Istio's release build with its test CA) as a
//! peer of ringtun in the two-node topology: started in dedicated mode in a namespace, awaited
//! through readiness like ringtun, its log read like ringtun's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ringtun_testbed::{Netns, Process, TwoNodes, DEFAULT_MARK};

use super::{mesh_config, mesh_files, TempDir};

/// How long a ztunnel log line may take to show up.
const LOG_WAIT: Duration = Duration::from_secs(10);

/// Where the shared ztunnel lives; fails the test (never skips) without it.
pub fn shared_ztunnel() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/ztunnel");
    assert!(
        dir.join("ztunnel").exists(),
        "the interop tests need the real ztunnel at {} (see its README)",
        dir.display()
    );
    dir
}

/// The real ztunnel binary in [`shared_ztunnel`].
pub fn ztunnel_bin() -> PathBuf {
    shared_ztunnel().join("ztunnel")
}

/// ztunnel's environment for a local config file and its own test CA (`FAKE_CA`), without
/// istiod, marked and on one worker thread as ringtun runs in these tests.
pub fn ztunnel_local_env<'c>(
    cmd: &'c mut std::process::Command,
    config: &Path,
) -> &'c mut std::process::Command {
    cmd.env("LOCAL_XDS_PATH", config)
        .env("FAKE_CA", "true")
        .env("XDS_ADDRESS", "")
        .env("CA_ADDRESS", "")
        .env("PACKET_MARK", "1337")
        .env("ENABLE_ORIG_SRC", "false")
        .env("ZTUNNEL_WORKER_THREADS", "1")
        .env("RUST_LOG", "info")
}

/// The mesh config with `trustDomain: cluster.local` on each workload: ztunnel's test-CA
/// certificates name the workload's trust domain (empty when absent).
pub fn ztunnel_config() -> String {
    mesh_config(&["/10.96.0.10"], false).replace(
        "  network: \"\"\n",
        "  network: \"\"\n  trustDomain: cluster.local\n",
    )
}

/// Copies ztunnel's test CA in as the directory's CA, so `gen_certs` issues from it.
pub fn use_test_ca(dir: &TempDir) {
    let z = shared_ztunnel();
    std::fs::copy(z.join("test-ca-root-cert.pem"), dir.join("ca.pem")).expect("copy CA");
    std::fs::copy(z.join("test-ca-key.pem"), dir.join("ca.key")).expect("copy CA key");
}

/// The namespaces, certificates from ztunnel's test CA, `config`, and the client namespace's
/// outbound capture (ztunnel's PACKET_MARK 1337 is ringtun's 0x539: one rule skips both).
pub fn ztunnel_topology(prefix: &'static str, config: &str) -> (TwoNodes, TempDir, PathBuf) {
    let (nodes, dir, path) = mesh_files(prefix, config, use_test_ca);
    nodes
        .client
        .capture_outbound(15001, DEFAULT_MARK)
        .expect("outbound capture");
    (nodes, dir, path)
}

/// A ztunnel in dedicated mode for `default/<who>`; killed on drop, its log printed if the
/// test fails.
pub struct Ztunnel {
    proc: Process,
}

impl Ztunnel {
    /// Starts it and waits until it answers ready on 15021, as ringtun is waited for.
    pub fn start(ns: &Netns, who: &str, config: &Path, dir: &Path) -> Ztunnel {
        Ztunnel::start_env(ns, who, config, dir, &[])
    }

    /// [`Ztunnel::start`] with more environment (e.g. `LOG_FORMAT=json`).
    pub fn start_env(
        ns: &Netns,
        who: &str,
        config: &Path,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Ztunnel {
        let mut cmd = ns.exec(ztunnel_bin());
        cmd.env("PROXY_MODE", "dedicated")
            .env("PROXY_WORKLOAD_INFO", format!("default/{who}/{who}"));
        ztunnel_local_env(&mut cmd, config).envs(env.iter().copied());
        let log = dir.join(format!("ztunnel-{who}.log"));
        let mut proc =
            Process::spawn(cmd, &format!("ztunnel ({who})"), &log).expect("spawn ztunnel");
        proc.wait_ready(ns, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}"));
        Ztunnel { proc }
    }

    /// Waits for an access line of ztunnel's that contains every one of `want`.
    pub fn wait_access(&self, want: &[&str]) -> String {
        let needles: Vec<&str> = std::iter::once("access")
            .chain(want.iter().copied())
            .collect();
        self.proc
            .wait_log_line(&needles, LOG_WAIT)
            .unwrap_or_else(|e| panic!("no ztunnel access line with {want:?}: {e}"))
    }

    /// Its whole log so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }
}
