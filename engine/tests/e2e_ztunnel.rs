//! Interop with the real ztunnel (`../shared/ztunnel/ztunnel`, Istio's release build with its
//! test CA), end to end in network namespaces: ringtun → ztunnel and ztunnel → ringtun carry
//! checksummed bytes both ways through the service VIP, and each names the other's SPIFFE
//! identity. ringtun's certificates are issued from ztunnel's test CA (its `FAKE_CA` signs its
//! own). Without the binary the tests fail, never skip.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use ringtun_testbed::{echoed_bytes, Netns, Process, TwoNodes, DEFAULT_MARK};

const MIB: u64 = 1 << 20;
const LOG_WAIT: Duration = Duration::from_secs(10);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

fn shared_ztunnel() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/ztunnel");
    assert!(
        dir.join("ztunnel").exists(),
        "the interop tests need the real ztunnel at {} (see its README)",
        dir.display()
    );
    dir
}

/// The mesh config with `trustDomain: cluster.local` on each workload: ztunnel's test-CA
/// certificates name the workload's trust domain (empty when absent).
fn config() -> String {
    mesh_config(&["/10.96.0.10"], false).replace(
        "  network: \"\"\n",
        "  network: \"\"\n  trustDomain: cluster.local\n",
    )
}

/// Copies ztunnel's test CA in as the directory's CA, so `gen_certs` issues from it.
fn use_test_ca(dir: &TempDir) {
    let z = shared_ztunnel();
    std::fs::copy(z.join("test-ca-root-cert.pem"), dir.join("ca.pem")).expect("copy CA");
    std::fs::copy(z.join("test-ca-key.pem"), dir.join("ca.key")).expect("copy CA key");
}

/// A ztunnel in dedicated mode for `default/<who>`; killed on drop, its log printed if the
/// test fails.
struct Ztunnel {
    proc: Process,
}

impl Ztunnel {
    /// Starts it and waits until it answers ready on 15021, as ringtun is waited for.
    fn start(ns: &Netns, who: &str, config: &Path, dir: &Path) -> Ztunnel {
        let mut cmd = ns.exec(shared_ztunnel().join("ztunnel"));
        cmd.env("PROXY_MODE", "dedicated")
            .env("PROXY_WORKLOAD_INFO", format!("default/{who}/{who}"))
            .env("LOCAL_XDS_PATH", config)
            .env("FAKE_CA", "true")
            .env("XDS_ADDRESS", "")
            .env("CA_ADDRESS", "")
            .env("PACKET_MARK", "1337")
            .env("ENABLE_ORIG_SRC", "false")
            .env("ZTUNNEL_WORKER_THREADS", "1")
            .env("RUST_LOG", "info");
        let log = dir.join(format!("ztunnel-{who}.log"));
        let mut proc =
            Process::spawn(cmd, &format!("ztunnel ({who})"), &log).expect("spawn ztunnel");
        proc.wait_ready(ns, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}"));
        Ztunnel { proc }
    }

    /// Waits for an access line of ztunnel's that contains every one of `want`.
    fn wait_access(&self, want: &[&str]) -> String {
        let needles: Vec<&str> = std::iter::once("access")
            .chain(want.iter().copied())
            .collect();
        self.proc
            .wait_log_line(&needles, LOG_WAIT)
            .unwrap_or_else(|e| panic!("no ztunnel access line with {want:?}: {e}"))
    }
}

/// The namespaces, certificates from ztunnel's test CA, `config`, and the client namespace's
/// outbound capture (ztunnel's PACKET_MARK 1337 is ringtun's 0x539: one rule skips both).
fn topology(prefix: &'static str, config: &str) -> (TwoNodes, TempDir, PathBuf) {
    let (nodes, dir, path) = mesh_files(prefix, config, use_test_ca);
    nodes
        .client
        .capture_outbound(15001, DEFAULT_MARK)
        .expect("outbound capture");
    (nodes, dir, path)
}

fn ringtun(ns: &Netns, who: &str, dir: &TempDir, config: &Path) -> Ringtun {
    Ringtun::start_as(ns, who, dir.path(), config, one_worker())
}

#[test]
fn ringtun_client_to_ztunnel_server() {
    let (nodes, dir, path) = topology("zrz", &config());
    let server = Ztunnel::start(&nodes.server, "server", &path, dir.path());
    let client = ringtun(&nodes.client, "client", &dir, &path);
    let _echo = echo_server(&nodes.server, "0.0.0.0:5201");
    let t = echo_ok(&nodes.client, "10.96.0.10:80", 4 * MIB);
    assert_eq!(t.sha_sent, t.sha_received);
    let line = client.wait_access("through ztunnel", LOG_WAIT, |l| {
        l.is("src.addr", &t.local.to_string())
    });
    assert!(line.is("end", "closed"), "{}", line.raw);
    assert!(line.is("dst.identity", SERVER_ID), "{}", line.raw);
    assert_eq!(line.num("bytes_received"), 4 * MIB, "{}", line.raw);
    let zl = server.wait_access(&["connection complete", CLIENT_ID]);
    assert!(zl.contains("direction=\"inbound\""), "{zl}");
    client.assert_no_panic();
}

#[test]
fn ztunnel_client_to_ringtun_server() {
    let (nodes, dir, path) = topology("zzr", &config());
    let server = ringtun(&nodes.server, "server", &dir, &path);
    let client = Ztunnel::start(&nodes.client, "client", &path, dir.path());
    let echo = echo_server(&nodes.server, "0.0.0.0:5201");
    let t = echo_ok(&nodes.client, "10.96.0.10:80", 4 * MIB);
    echo.records
        .wait_for(LOG_WAIT, |r| r.sha256 == t.sha_sent)
        .expect("the workload got every byte");
    let line = server.wait_access("from ztunnel", LOG_WAIT, |l| l.is("direction", "inbound"));
    assert!(line.is("end", "closed"), "{}", line.raw);
    assert!(line.is("src.identity", CLIENT_ID), "{}", line.raw);
    assert_eq!(line.num("bytes_received"), 4 * MIB, "{}", line.raw);
    let zl = client.wait_access(&["connection complete", SERVER_ID]);
    assert!(zl.contains("direction=\"outbound\""), "{zl}");
    server.assert_no_panic();
}

/// DENY the client identity on the server workload.
fn config_denying_client() -> String {
    config().replace(
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
    )
}

/// What a client in `ns` sees of a refused connection through the VIP: the connect, a write
/// and a read; it must not get an echo.
fn refused_through_vip(ns: &Netns) {
    let n = echoed_bytes(ns, "10.96.0.10:80");
    assert_eq!(n, 0, "a denied connection echoed {n} bytes");
}

#[test]
fn each_side_reads_the_others_policy_refusal() {
    // ztunnel denies, ringtun's client side reports the 401 it got.
    {
        let (nodes, dir, path) = topology("zdz", &config_denying_client());
        let _server = Ztunnel::start(&nodes.server, "server", &path, dir.path());
        let client = ringtun(&nodes.client, "client", &dir, &path);
        let _echo = echo_server(&nodes.server, "0.0.0.0:5201");
        refused_through_vip(&nodes.client);
        let line = client.wait_access("refused by ztunnel", LOG_WAIT, |l| {
            l.is("direction", "outbound") && l.is("end", "error")
        });
        assert!(
            line.get("reason").is_some_and(|r| r.contains("401")),
            "{}",
            line.raw
        );
    }
    // ringtun denies, ztunnel's client side reports the 401 it got.
    {
        let (nodes, dir, path) = topology("zdr", &config_denying_client());
        let server = ringtun(&nodes.server, "server", &dir, &path);
        let client = Ztunnel::start(&nodes.client, "client", &path, dir.path());
        let _echo = echo_server(&nodes.server, "0.0.0.0:5201");
        refused_through_vip(&nodes.client);
        let line = server.wait_access("the denial", LOG_WAIT, |l| l.is("direction", "inbound"));
        assert!(line.is("response_flags", "DENY"), "{}", line.raw);
        let zl = client.wait_access(&["error=\"http status: 401"]);
        assert!(zl.contains("direction=\"outbound\""), "{zl}");
    }
}
