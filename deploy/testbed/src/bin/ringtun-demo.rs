//! `ringtun-demo`: a working tunnel on this machine with nothing else installed (what
//! `deploy/demo.sh` runs).
//!
//! Two network namespaces stand for two nodes, joined by a veth pair. Each runs a ringtun
//! (`ringtun run`, the binary beside this one unless `--ringtun` says otherwise) with
//! certificates from a fresh demo CA and the demo config (the ztunnel local config in
//! `deploy/testbed/demo/config.yaml`). nftables in the client namespace sends outbound TCP to
//! 15001, as istio-cni would. An echo server listens in the server namespace; a client in the
//! client namespace sends data to the service VIP and checks that what comes back is what it
//! sent.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use ringtun_testbed::{
    certs, ringtun, sys, transfer, EchoServer, Error, Netns, Process, Result, RunFiles, TwoNodes,
    DEFAULT_MARK, DEMO_CONFIG,
};

/// Options of `ringtun-demo`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "ringtun-demo",
    about = "Two namespaces, two ringtuns, a checked transfer through the tunnel"
)]
struct DemoArgs {
    /// Run one checked transfer and exit instead of keeping the tunnel up.
    #[arg(long)]
    once: bool,
    /// Bytes the demo client sends (and expects echoed).
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    bytes: u64,
    /// Where to put certificates, config and logs (default: a new directory under /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The ringtun binary [default: `ringtun` beside this executable].
    #[arg(long)]
    ringtun: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(DemoArgs::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringtun-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ringtun` in the directory of this executable (cargo builds both there).
fn default_ringtun() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(Error::io("finding this executable"))?;
    let bin = exe.with_file_name("ringtun");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(Error::Invalid(format!(
            "{} not found; build it (cargo build -p ringtun) or pass --ringtun PATH",
            bin.display()
        )))
    }
}

/// Starts `ringtun run` for the workload `default/<who>` in `ns` and waits until it is ready.
fn start_ringtun(ns: &Netns, bin: &Path, dir: &Path, who: &str) -> Result<Process> {
    let files = RunFiles::new(&dir.join("config.yaml"), dir, &format!("default/{who}"));
    let mut cmd = files.command(ns, bin);
    cmd.args(["--workers", "1"]);
    let log = dir.join(format!("ringtun-{who}.log"));
    ringtun::start(ns, cmd, &format!("ringtun ({who})"), &log)
}

fn run(args: DemoArgs) -> Result<()> {
    ringtun_testbed::require_root()?;
    // Before any thread starts, so that all of them inherit the mask and Ctrl-C reaches the
    // wait below, which tears the namespaces down.
    let signals = (!args.once).then(|| sys::block_signals(&[libc::SIGINT, libc::SIGTERM]));
    let bin = match args.ringtun {
        Some(p) => p,
        None => default_ringtun()?,
    };
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("ringtun-demo-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    let config = dir.join("config.yaml");
    std::fs::write(&config, DEMO_CONFIG)
        .map_err(Error::io(format!("writing {}", config.display())))?;
    certs::write_workload_certs(&dir, "cluster.local", &["default/client", "default/server"])?;
    let nodes = TwoNodes::new("rtd")?;
    nodes.client.capture_outbound(15001, DEFAULT_MARK)?;
    let server = start_ringtun(&nodes.server, &bin, &dir, "server")?;
    let client = start_ringtun(&nodes.client, &bin, &dir, "client")?;
    let echo = EchoServer::start(&nodes.server, "0.0.0.0:5201")?;
    println!(
        "ringtun demo: namespaces {} (client, 10.77.0.1) and {} (server, 10.77.0.2)",
        nodes.client.name(),
        nodes.server.name()
    );
    println!(
        "  echo server on {} in the server namespace; service VIP 10.96.0.10:80 -> 5201",
        echo.addr
    );
    let t = transfer(&nodes.client, "10.96.0.10:80", args.bytes)
        .map_err(Error::io("sending through the tunnel"))?;
    let mib = args.bytes as f64 / (1024.0 * 1024.0);
    println!(
        "  sent {mib:.1} MiB through outbound capture -> HBONE (mTLS, HTTP/2 CONNECT) -> inbound -> echo and back in {:.2} s",
        t.took.as_secs_f64()
    );
    println!(
        "  sha256 sent     {}\n  sha256 received {}  {}",
        t.sha_sent,
        t.sha_received,
        if t.is_exact() { "MATCH" } else { "MISMATCH" }
    );
    for (who, p) in [("client", &client), ("server", &server)] {
        for line in p.log().lines().filter(|l| l.contains("access")) {
            println!("  [{who}] {}", line.trim());
        }
    }
    if !t.is_exact() {
        return Err(Error::Check(format!(
            "echoed bytes differ from what was sent ({} of {} bytes back)",
            t.received, t.sent
        )));
    }
    let Some(signals) = signals else {
        return Ok(());
    };
    println!(
        "\nThe tunnel is up. Try it from the client namespace, e.g.\n  ip netns exec {} python3 -c \"import socket; s=socket.create_connection(('10.96.0.10', 80)); s.sendall(b'hello'); print(s.recv(5))\"\nLogs: {}\nPress Ctrl-C to stop and remove the namespaces.",
        nodes.client.name(),
        dir.display()
    );
    sys::wait_signal(&signals);
    println!("ringtun demo: stopping");
    drop(client);
    drop(server);
    drop(nodes);
    Ok(())
}
