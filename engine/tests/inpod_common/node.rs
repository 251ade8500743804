//! A "node" of the in-pod end-to-end tests: `ringtun run` in shared mode (PROXY_MODE=shared)
//! inside a node namespace, taking pods from a fake node agent, with a CA that signs each pod's
//! certificate; and istio-cni's in-pod capture rules for a pod namespace.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ringtun_testbed::{Netns, Process, DEFAULT_MARK};

use crate::common::{gen_certs, ringtun_bin, INBOUND_EXCEPT};

/// The CA that signs pods' certificates (`--ca-cert`, `--ca-key`, also `--roots`) and the
/// process's own certificate (`--cert-chain`, `--key`).
#[derive(Clone, Debug)]
pub struct NodeCa {
    /// CA certificate (PEM).
    pub cert: PathBuf,
    /// CA key (PEM).
    pub key: PathBuf,
    /// The process's own certificate.
    pub chain: PathBuf,
    /// Its key.
    pub chain_key: PathBuf,
}

impl NodeCa {
    /// A fresh CA in `dir` (`ringtun gen-certs`), with a certificate for `istio-system/ztunnel`.
    pub fn generate(dir: &Path) -> NodeCa {
        gen_certs(dir, "cluster.local", &["istio-system/ztunnel"]);
        NodeCa {
            cert: dir.join("ca.pem"),
            key: dir.join("ca.key"),
            chain: dir.join("istio-system.ztunnel.pem"),
            chain_key: dir.join("istio-system.ztunnel.key"),
        }
    }

    /// ztunnel's FAKE_CA (`../shared/ztunnel/test-ca-*.pem`) as the signer, so ringtun's pods
    /// and ztunnel's trust each other; the process certificate comes from a CA in `dir`.
    pub fn ztunnel_test_ca(dir: &Path) -> NodeCa {
        let own = NodeCa::generate(dir);
        let zt = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/ztunnel");
        NodeCa {
            cert: zt.join("test-ca-root-cert.pem"),
            key: zt.join("test-ca-key.pem"),
            ..own
        }
    }
}

/// Starts ringtun in shared (in-pod) mode inside `node`, talking to the agent at `uds`; the log
/// goes to `dir/ringtun-NAME.log`. It is not ready until the agent's snapshot is in.
pub fn spawn_shared(
    node: &Netns,
    name: &str,
    dir: &Path,
    config: &Path,
    uds: &Path,
    ca: &NodeCa,
    env: &[(&str, &str)],
) -> Process {
    spawn_shared_with(node, name, dir, config, uds, ca, env, &[])
}

/// [`spawn_shared`] with more `ringtun run` arguments.
#[allow(clippy::too_many_arguments)]
pub fn spawn_shared_with(
    node: &Netns,
    name: &str,
    dir: &Path,
    config: &Path,
    uds: &Path,
    ca: &NodeCa,
    env: &[(&str, &str)],
    args: &[&str],
) -> Process {
    let mut cmd = node.exec(ringtun_bin());
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .arg("--cert-chain")
        .arg(&ca.chain)
        .arg("--key")
        .arg(&ca.chain_key)
        .arg("--roots")
        .arg(&ca.cert)
        .arg("--ca-cert")
        .arg(&ca.cert)
        .arg("--ca-key")
        .arg(&ca.key)
        .args(["--workers", "2", "--no-pin"])
        .env("PROXY_MODE", "shared")
        .env("INPOD_UDS", uds)
        .env(
            "RINGTUN_LOG",
            std::env::var("RINGTUN_E2E_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(args);
    let log = dir.join(format!("ringtun-{name}.log"));
    Process::spawn(cmd, &format!("ringtun ({name})"), &log)
        .unwrap_or_else(|e| panic!("spawn ringtun ({name}): {e}"))
}

/// Waits until `p` answers ready on 15021 in `node`.
pub fn wait_ready(p: &mut Process, node: &Netns) {
    if let Err(e) = p.wait_ready(node, Duration::from_secs(30)) {
        panic!("{} not ready: {e}", p.name());
    }
}

/// istio-cni's in-pod rules in `pod`: outbound TCP to 15001 except the proxy's marked sockets,
/// inbound TCP to 15006 except HBONE (15008) and the health ports.
pub fn capture_pod(pod: &Netns) {
    pod.capture_outbound(15001, DEFAULT_MARK)
        .expect("outbound capture");
    pod.capture_inbound(15006, &INBOUND_EXCEPT)
        .expect("inbound capture");
}

/// The agent command that adds `ns` as pod `default/<who>` (service account `who`).
pub fn add_pod(uid: &str, ns: &Netns, who: &str) -> String {
    format!("add {uid} {} default {who} {who}", ns.path().display())
}

/// The real ztunnel (`../shared/ztunnel/ztunnel`) in shared mode inside `node`, taking pods
/// from the agent at `uds`, with its FAKE_CA (certificates signed by the test CA).
pub fn spawn_ztunnel_shared(node: &Netns, dir: &Path, config: &Path, uds: &Path) -> Process {
    use crate::common::ztunnel::{ztunnel_bin, ztunnel_local_env};
    let mut cmd = node.exec(ztunnel_bin());
    cmd.env("PROXY_MODE", "shared").env("INPOD_UDS", uds);
    ztunnel_local_env(&mut cmd, config);
    Process::spawn(cmd, "ztunnel (shared)", &dir.join("ztunnel.log"))
        .unwrap_or_else(|e| panic!("spawn ztunnel: {e}"))
}
