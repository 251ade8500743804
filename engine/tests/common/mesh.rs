//! The usual topologies: two namespaces with certificates and a config, and either a ringtun
//! on each side ([`Mesh`]) or only on the server side ([`ServerOnly`], where a test's own peer
//! plays the client).

use std::path::PathBuf;
use std::process::Command;

use ringtun_testbed::{EchoServer, Netns, RunFiles, TwoNodes, DEFAULT_MARK};

use super::{
    echo_server, gen_certs, mesh_config, netns, one_worker, ringtun_bin, two_nodes, write_atomic,
    Ringtun, TempDir, INBOUND_EXCEPT,
};

/// Where a single ringtun runs: a namespace of its own, and a scratch directory with
/// certificates for `identities` and the mesh config in `config.yaml`.
pub fn one_node(prefix: &'static str, identities: &[&str]) -> (Netns, TempDir) {
    let ns = netns(prefix);
    let dir = TempDir::new(prefix);
    gen_certs(dir.path(), "cluster.local", identities);
    write_atomic(
        &dir.join("config.yaml"),
        &mesh_config(&["/10.96.0.10"], false),
    );
    (ns, dir)
}

/// `ringtun run` in `ns` with the files of [`one_node`], presenting `identity`'s certificate,
/// with `--workload` when given, logging at info without colours.
pub fn one_node_command(
    ns: &Netns,
    dir: &TempDir,
    identity: &str,
    workload: Option<&str>,
) -> Command {
    let files =
        RunFiles::new(&dir.join("config.yaml"), dir.path(), identity).with_workload(workload);
    let mut cmd = files.command(ns, ringtun_bin());
    cmd.env("RINGTUN_LOG", "info").env("NO_COLOR", "1");
    cmd
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
    /// Sets it up with the mesh certificates only.
    pub fn start(prefix: &'static str) -> ServerOnly {
        ServerOnly::start_with(prefix, |_| {})
    }

    /// Sets it up; `prepare` runs on the fresh directory before the mesh certificates are
    /// issued (e.g. to issue extra ones).
    pub fn start_with(prefix: &'static str, prepare: impl FnOnce(&TempDir)) -> ServerOnly {
        let (nodes, dir, config) =
            mesh_files(prefix, &mesh_config(&["/10.96.0.10"], false), prepare);
        let server = Ringtun::start_as(&nodes.server, "server", dir.path(), &config, one_worker());
        let echo = echo_server(&nodes.server, "0.0.0.0:5201");
        ServerOnly {
            server,
            echo,
            nodes,
            dir,
        }
    }
}
