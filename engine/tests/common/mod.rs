//! Shared helpers of the end-to-end tests, by concern: [`ringtun`] (the process under test and
//! its access log), [`mesh`] (the usual topologies: two ringtuns, or one and a bare client
//! node), [`net`] (checked echoes and raw sockets), [`http`] (the 15000/15020/15021 endpoints
//! and scrapes), [`python`] (the independent Python HBONE peers), [`ztunnel`] (the real
//! ztunnel as a peer). Namespaces, processes,
//! echo servers, patterns and transfers come from the test bed, `ringtun-testbed`.
//!
//! Every test builds its own [`ringtun_testbed::TwoNodes`], so tests can run in parallel; all
//! of them need root and fail (never skip) without it.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code, unused_imports)]

pub mod http;
pub mod mesh;
pub mod net;
pub mod python;
pub mod ringtun;
pub mod ztunnel;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub use http::*;
pub use mesh::*;
pub use net::*;
pub use python::*;
pub use ringtun::*;
pub use ringtun_testbed::echo::IO_TIMEOUT;
pub use ringtun_testbed::process::{http_request as http_on, strip_ansi};
pub use ringtun_testbed::ringtun::cert_paths;
pub use ringtun_testbed::transfer::{
    paced_on, read_to_end_or_error, transfer, transfer_paced, transfer_with,
};
pub use ringtun_testbed::{
    connect_in, connect_marked_in, sha256_hex, EchoRecord, EchoServer, Pattern, Records, Transfer,
};
use ringtun_testbed::{Netns, TwoNodes};
pub use ztunnel::*;

/// SPIFFE identity of the client workload's certificate.
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
/// SPIFFE identity of the server workload's certificate.
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
/// Hostname of the service in front of the server workload.
pub const SERVICE_HOST: &str = "server.default.svc.cluster.local";
/// Ports the server namespace's inbound capture leaves alone (HBONE, health, metrics).
pub const INBOUND_EXCEPT: [u16; 3] = [15008, 15020, 15021];

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

/// Runs `ringtun gen-certs --dir DIR --trust-domain TD --identity …` (the operator's command,
/// so the tests use what operators use) and fails the test if it does not succeed.
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
  workloadName: client
  workloadIps: {client_ips}
  protocol: HBONE
  node: node-a
  network: ""
  services: {{}}
- uid: cluster1//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadName: server
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

/// Builds a [`TwoNodes`] topology or fails the test with a readable reason (e.g. not root).
pub fn two_nodes(prefix: &str) -> TwoNodes {
    TwoNodes::new(prefix).unwrap_or_else(|e| panic!("building the two-node topology: {e}"))
}

/// Creates a namespace or fails the test with a readable reason (e.g. not root).
pub fn netns(prefix: &str) -> Netns {
    Netns::new(prefix).unwrap_or_else(|e| panic!("creating a network namespace: {e}"))
}
