//! Set-up: the config, the ringtun binary, the topologies with their source addresses, the load
//! server, and what the report says about the machine.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringtun_benches::load::{self, ServerStats};
use ringtun_benches::report;
use ringtun_testbed::{TwoNodes, DEFAULT_MARK, DEMO_CONFIG};

use crate::options::Opts;
use crate::procs::NAMESPACES;
use crate::{
    IPERF_DIRECT_PORT, IPERF_PORT, SERVER_PORT, SOCKPERF_DIRECT_PORT, SOCKPERF_PORT,
    UNPOOLED_SOURCES,
};

/// The demo config with the cross-check tools' ports added to the service.
pub fn config_text() -> String {
    let extra = format!(
        "      80: 5201\n      {IPERF_PORT}: {IPERF_PORT}\n      {SOCKPERF_PORT}: {SOCKPERF_PORT}\n"
    );
    let text = DEMO_CONFIG
        .replace("      80: 5201\n", &extra)
        .replace(
            "    80: 5201\npolicies",
            &format!("    80: 5201\n    {IPERF_PORT}: {IPERF_PORT}\n    {SOCKPERF_PORT}: {SOCKPERF_PORT}\npolicies"),
        );
    format!("# written by ringtun-bench (deploy/testbed/demo/config.yaml plus the iperf3/sockperf ports)\n{text}")
}

pub fn build_ringtun() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    eprintln!("ringtun-bench: cargo build --release -p ringtun");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "ringtun"])
        .current_dir(&root)
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !status.success() {
        return Err(format!(
            "cargo build --release -p ringtun failed ({status})"
        ));
    }
    sibling_binary("ringtun", "after the build; pass --ringtun PATH")
}

/// The binary `name` in this executable's directory (cargo puts a workspace's binaries side by
/// side); `missing` ends the error when it is not there (what to do about it).
pub fn sibling_binary(name: &str, missing: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    let bin = exe.with_file_name(name);
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!("{} not found {missing}", bin.display()))
    }
}

pub fn setup_topology(prefix: &str, with_sources: bool, dir: &Path) -> Result<TwoNodes, String> {
    let t = TwoNodes::new(prefix).map_err(|e| e.to_string())?;
    for ns in [&t.client, &t.server] {
        NAMESPACES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ns.name().to_owned());
        // Room for many short connections in a row (same for every contender).
        ns.sysctl(&[
            "net.ipv4.ip_local_port_range=1024 65000",
            "net.ipv4.tcp_tw_reuse=1",
        ])
        .map_err(|e| e.to_string())?;
    }
    t.client
        .capture_outbound(15001, DEFAULT_MARK)
        .map_err(|e| e.to_string())?;
    // The direct cross-check ports skip the capture (the tools cannot set SO_MARK).
    t.client
        .run(
            "nft",
            [
                "insert",
                "rule",
                "inet",
                "ringtun",
                "output",
                "tcp",
                "dport",
                &format!("{{ {IPERF_DIRECT_PORT}, {SOCKPERF_DIRECT_PORT} }}"),
                "return",
            ],
        )
        .map_err(|e| e.to_string())?;
    if with_sources {
        let mut batch = String::new();
        for i in 0..UNPOOLED_SOURCES {
            batch.push_str(&format!("addr add {} dev lo\n", source_ip(i)));
        }
        let file = dir.join(format!("{prefix}-sources.batch"));
        std::fs::write(&file, batch).map_err(|e| e.to_string())?;
        t.client
            .ip([std::ffi::OsStr::new("-batch"), file.as_os_str()])
            .map_err(|e| e.to_string())?;
    }
    Ok(t)
}

pub fn source_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 78, (i / 250) as u8, (i % 250) as u8 + 1)
}

pub fn start_server(t: &TwoNodes) -> Result<Arc<ServerStats>, String> {
    let stats = Arc::new(ServerStats::default());
    let s = stats.clone();
    t.server
        .spawn("load-server", move || {
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, SERVER_PORT));
            if let Err(e) = load::serve(addr, s) {
                eprintln!("ringtun-bench: load server failed: {e}");
            }
        })
        .map_err(|e| e.to_string())?;
    // Wait until it listens.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ok = t
            .server
            .enter(|| std::net::TcpStream::connect(("127.0.0.1", SERVER_PORT)).is_ok())
            .unwrap_or(false);
        if ok {
            return Ok(stats);
        }
        if Instant::now() > deadline {
            return Err("load server did not start".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn machine_meta(o: &Opts, ringtun: &Path) -> report::Meta {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let commit = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut options = BTreeMap::new();
    options.insert("ringtun".into(), ringtun.display().to_string());
    options.insert("workers".into(), o.workers.to_string());
    options.insert("pin".into(), o.pin.to_string());
    options.insert("rate".into(), o.rate.to_string());
    options.insert("contenders".into(), o.contenders.join(","));
    report::Meta {
        date,
        kernel,
        cpu,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        ringtun_commit: commit,
        options,
    }
}
