//! ringtun-bench: ringtun against direct TCP (and optionally another tunnel) on the
//! two-namespace topology, in one command.
//!
//! Builds two network namespaces joined by a veth pair (client 10.77.0.1, server 10.77.0.2)
//! with nftables outbound capture in the client one (REDIRECT to 15001, packets with mark 0x539
//! skipped), starts a tunnel in each namespace, and drives the project's own monoio load
//! generators through it: bulk throughput (1 and 4 streams, both directions, fixed byte
//! count), ping-pong latency (1 B and 1 KiB, one connection), request/response on 16 kept-alive
//! connections (closed loop and at a fixed rate), connection rate (pooled HBONE, and with a TLS
//! handshake per connection), CPU of the tunnel processes per GiB and per 1,000 connections,
//! and RSS with idle tunnelled connections open. "direct" is the same load generators with the
//! client socket marked (so the capture skips it) dialling the server directly. Contenders
//! alternate measurement by measurement, runs repeat, and the output is a table (medians,
//! spread, ratios to direct), `results.json` and `report.html` with SVG plots.
//!
//! ```text
//! cargo run --release -p ringtun-benches --bin ringtun-bench -- --quick
//! cargo run --release -p ringtun-benches --bin ringtun-bench -- --runs 3 --shards 1,2 \
//!     [--other-tunnel 'CMD {config} …' --other-env 'K=V,…'] [--out DIR] [-- RINGTUN ARGS]
//! ```
//! Needs root. See benches/README.md for every option and the placeholders of the other
//! tunnel's command template.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use ringtun_benches::load::{self, Dir, ServerStats, Target};
use ringtun_benches::procs;
use ringtun_benches::report::{self, MemoryPoint, Results, DIRECT};
use ringtun_benches::stats;
use ringtun_topology::{Netns, TwoNodes, DEFAULT_MARK};

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;
/// Load-generator server port (the service's target port).
const SERVER_PORT: u16 = 5201;
/// Service VIP and port in front of the server workload.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_PORT: u16 = 80;
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// iperf3 and sockperf servers: tunnelled through the VIP on these ports…
const IPERF_PORT: u16 = 5202;
const SOCKPERF_PORT: u16 = 11111;
/// …and reached directly on these, which the capture leaves alone.
const IPERF_DIRECT_PORT: u16 = 5203;
const SOCKPERF_DIRECT_PORT: u16 = 11112;
/// Source addresses rotated through by the unpooled connection-rate test (added to the client
/// namespace's loopback): a tunnel pools per source address, so each connection needs a new
/// HBONE connection when no address repeats within the pool's idle sweep.
const UNPOOLED_SOURCES: u32 = 1024;
/// Size of the request/response messages on the 16 kept-alive connections.
const RR_SIZE: usize = 1024;
/// Request and reply sizes of the connection-rate tests.
const CONN_REQ: usize = 64;
const CONN_REPLY: usize = 64;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "ringtun-bench",
    about = "ringtun vs direct TCP (vs another tunnel) on a two-namespace topology: throughput, latency, connection rate, CPU, memory"
)]
struct Opts {
    /// Smoke-test sizes (about 2 minutes): 1 run, 64 MiB transfers, 1,000 idle connections.
    #[arg(long)]
    quick: bool,
    /// Repetitions of every measurement (contenders alternate within each) [default: 3, quick 1].
    #[arg(long)]
    runs: Option<usize>,
    /// Bytes per bulk transfer, e.g. 512M, 1G [default: 512M, quick 64M].
    #[arg(long, value_parser = parse_size)]
    bytes: Option<u64>,
    /// Where results.json, report.html, the plots and the work files (certificates, config,
    /// tunnel logs) go [default: target/ringtun-bench/<date>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// ringtun binary to test [default: build it with `cargo build --release -p ringtun`].
    #[arg(long)]
    ringtun: Option<PathBuf>,
    /// `ringtun run --workers` for the main comparison.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Scaling: also measure throughput and connection rate with each of these shard counts
    /// (e.g. 1,2,4).
    #[arg(long, value_delimiter = ',')]
    shards: Vec<usize>,
    /// Keep ringtun's own shard pinning. By default ringtun runs with --no-pin here: both
    /// "nodes" share this machine, and pinning would put both tunnels' first shard on CPU 0.
    #[arg(long)]
    pin: bool,
    /// Another tunnel to compare, as a command template run in each namespace through
    /// `sh -c 'exec …'`; placeholders: {side} {ns} {config} {dir} {certs} {cert_chain} {key}
    /// {roots} {workload} {workload_info} {sa} {ip} {workers} {trust_domain}.
    #[arg(long)]
    other_tunnel: Option<String>,
    /// Environment of the other tunnel, `K=V,K=V` with the same placeholders, e.g.
    /// 'PROXY_MODE=dedicated,PROXY_WORKLOAD_INFO={workload_info},LOCAL_XDS_PATH={config}'.
    #[arg(long, default_value = "")]
    other_env: String,
    /// Name of the other tunnel in the report.
    #[arg(long, default_value = "other")]
    other_name: String,
    /// Extra environment (`K=V,…`) that makes the other tunnel's client side close idle pooled
    /// connections at once; when given, the unpooled connection-rate test runs for it too.
    #[arg(long)]
    other_unpooled_env: Option<String>,
    /// Built-in contenders beside direct and ringtun: `legacy` (the same ringtun binary with
    /// `--io-driver legacy`, epoll) and `ztunnel` (Istio's, from --ztunnel); `none` for neither.
    #[arg(long, value_delimiter = ',', default_value = "legacy,ztunnel")]
    contenders: Vec<String>,
    /// Another contender that is the same ringtun with extra `ringtun run` arguments, as
    /// `NAME=ARG ARG…` (repeatable), e.g. `coop=--uring-taskrun coop`: A/B of one flag in one run.
    #[arg(long)]
    variant: Vec<String>,
    /// The ztunnel binary for the `ztunnel` contender [default: ../shared/ztunnel/ztunnel
    /// beside the workspace].
    #[arg(long)]
    ztunnel: Option<PathBuf>,
    /// Idle tunnelled connections to hold open for the memory test [default: 1000,10000;
    /// quick 1000].
    #[arg(long, value_delimiter = ',')]
    idle_conns: Option<Vec<usize>>,
    /// Request rate (req/s over 16 connections) of the fixed-rate latency test.
    #[arg(long, default_value_t = 2000.0)]
    rate: f64,
    /// Round trips per ping-pong test [default: 20000, quick 3000].
    #[arg(long)]
    pingpongs: Option<usize>,
    /// Seconds per request/response test [default: 3, quick 1].
    #[arg(long)]
    secs: Option<f64>,
    /// Connections per pooled connection-rate test [default: 10000, quick 2000].
    #[arg(long)]
    conns: Option<u64>,
    /// Connections per unpooled connection-rate test [default: 2000, quick 500].
    #[arg(long)]
    unpooled_conns: Option<u64>,
    /// Connections in flight in the connection-rate tests.
    #[arg(long, default_value_t = 16)]
    conn_concurrency: usize,
    /// Skip the iperf3/sockperf cross-checks even when they are installed.
    #[arg(long)]
    no_crosscheck: bool,
    /// Only these groups: bulk, latency, rr, conn, unpooled, memory, scaling, crosscheck.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Extra `ringtun run` arguments (after `--`).
    #[arg(last = true)]
    ringtun_args: Vec<String>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_lowercase();
            let m = match unit.trim_end_matches("ib").trim_end_matches('b') {
                "" => 1,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                _ => return Err(format!("unknown size unit in {s:?}")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .map(|n| n * mult)
        .map_err(|e| format!("{s:?}: {e}"))
}

/// Options with the quick/full defaults filled in.
struct Plan {
    runs: usize,
    bytes: u64,
    pingpongs: usize,
    secs: f64,
    conns: u64,
    unpooled_conns: u64,
    idle: Vec<usize>,
}

impl Plan {
    fn new(o: &Opts) -> Plan {
        let q = o.quick;
        Plan {
            runs: o.runs.unwrap_or(if q { 1 } else { 3 }).max(1),
            bytes: o.bytes.unwrap_or(if q { 64 << 20 } else { 512 << 20 }),
            pingpongs: o.pingpongs.unwrap_or(if q { 3000 } else { 20000 }),
            secs: o.secs.unwrap_or(if q { 1.0 } else { 3.0 }),
            conns: o.conns.unwrap_or(if q { 2000 } else { 10000 }),
            unpooled_conns: o.unpooled_conns.unwrap_or(if q { 500 } else { 2000 }),
            idle: o.idle_conns.clone().unwrap_or_else(|| {
                if q {
                    vec![1000]
                } else {
                    vec![1000, 10000]
                }
            }),
        }
    }
}

fn wants(o: &Opts, group: &str) -> bool {
    o.only.is_empty() || o.only.iter().any(|g| g == group)
}

// ---------------------------------------------------------------------------------------------
// Progress

struct Progress {
    tty: bool,
    start: Instant,
    label: Mutex<String>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
            label: Mutex::new(String::new()),
        }
    }

    fn stage(&self, label: String) {
        *self.label.lock().unwrap_or_else(|e| e.into_inner()) = label;
    }

    fn step(&self, what: &str) {
        let label = self.label.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let t = self.start.elapsed().as_secs();
        let line = format!("[{:>2}:{:02}] {label} {what}", t / 60, t % 60);
        if self.tty {
            let mut e = std::io::stderr();
            let _ = write!(e, "\r\x1b[2K{line}");
            let _ = e.flush();
        } else {
            eprintln!("{line}");
        }
    }

    fn done(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cleanup on signals: child process groups and namespaces are recorded here.

static CHILD_GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn install_signal_cleanup() {
    // SAFETY: plain signal-mask calls on a local set, before any other thread exists, so every
    // later thread inherits the mask and only the waiter below receives SIGINT/SIGTERM.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: sigwait on the set built above.
        unsafe { libc::sigwait(&set, &mut sig) };
        eprintln!("\nringtun-bench: signal {sig}, cleaning up");
        for g in CHILD_GROUPS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // SAFETY: kill(2) on the process group of a child we started.
            unsafe { libc::kill(-*g, libc::SIGKILL) };
        }
        for ns in NAMESPACES.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(p) = pid.parse::<i32>() {
                        if p as u32 != std::process::id() {
                            // SAFETY: kill(2) on a process inside a namespace we created.
                            unsafe { libc::kill(p, libc::SIGKILL) };
                        }
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        std::process::exit(130);
    });
}

// ---------------------------------------------------------------------------------------------
// Tunnel processes

/// A process we started in its own process group (killed as a group on drop).
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: &Path) -> std::io::Result<Proc> {
        let file = std::fs::File::create(log)?;
        cmd.stdout(file.try_clone()?)
            .stderr(file)
            .stdin(Stdio::null());
        cmd.process_group(0);
        let child = cmd.spawn()?;
        CHILD_GROUPS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id() as i32);
        Ok(Proc {
            child,
            log: log.to_owned(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process and its descendants.
    fn pids(&self) -> Vec<u32> {
        procs::tree(self.pid())
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        let g = self.child.id() as i32;
        if self.alive() {
            // SAFETY: kill(2) on the process group of our own child (it leads the group).
            unsafe { libc::kill(-g, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && self.alive() {
                std::thread::sleep(Duration::from_millis(10));
            }
            // SAFETY: as above; whatever is left of the group goes.
            unsafe { libc::kill(-g, libc::SIGKILL) };
            let _ = self.child.wait();
        }
        CHILD_GROUPS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&x| x != g);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The two halves of a running tunnel.
struct Tunnel {
    client: Proc,
    server: Proc,
}

impl Tunnel {
    fn pids(&self) -> (Vec<u32>, Vec<u32>) {
        (self.client.pids(), self.server.pids())
    }

    fn cpu(&self) -> (f64, f64) {
        let (c, s) = self.pids();
        (procs::cpu_of(&c), procs::cpu_of(&s))
    }

    fn rss_kib(&self) -> (u64, u64) {
        let (c, s) = self.pids();
        (procs::rss_of(&c), procs::rss_of(&s))
    }
}

/// How to start a contender's tunnel.
#[derive(Clone)]
enum Kind {
    Direct,
    /// The ringtun under test, with these extra `ringtun run` arguments.
    Ringtun {
        extra: Vec<String>,
    },
    /// Any other tunnel: a command template and its environment (placeholders filled in), and
    /// the extra environment that defeats its client-side pool (no unpooled test without it).
    Other {
        template: String,
        env: String,
        unpooled_env: Option<String>,
    },
}

/// Istio's ztunnel in dedicated mode (one workload per process, local config, its test CA):
/// what a node runs today, with one worker thread per `--workers`. `PACKET_MARK` lets the
/// capture skip its upstream sockets as it skips ringtun's, `ENABLE_ORIG_SRC=false` keeps its
/// inbound side from spoofing the client's address (no TPROXY routes here), and the access log
/// stays on (`info`) as ringtun's does.
const ZTUNNEL_ENV: &str = "PROXY_MODE=dedicated,PROXY_WORKLOAD_INFO={workload_info},LOCAL_XDS_PATH={config},FAKE_CA=true,XDS_ADDRESS=,CA_ADDRESS=,PACKET_MARK=1337,ENABLE_ORIG_SRC=false,ZTUNNEL_WORKER_THREADS={workers},RUST_LOG=info";
/// ztunnel's client side releasing pooled connections as soon as they are unused.
const ZTUNNEL_UNPOOLED_ENV: &str = "POOL_UNUSED_RELEASE_TIMEOUT=1ms";

/// Where the shared ztunnel build lives, relative to the workspace.
fn default_ztunnel() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/ztunnel/ztunnel")
}

struct Contender {
    name: String,
    kind: Kind,
    /// Index into the topologies.
    topo: usize,
    target: Target,
}

/// Everything shared by the measurements.
struct Env {
    ringtun: PathBuf,
    dir: PathBuf,
    certs: PathBuf,
    config: PathBuf,
    pin: bool,
    extra: Vec<String>,
    topos: Vec<TwoNodes>,
    servers: Vec<Arc<ServerStats>>,
    sources: Vec<IpAddr>,
    progress: Progress,
}

fn ringtun_cmd(env: &Env, ns: &Netns, who: &str, workers: usize, extra: &[String]) -> Command {
    let mut cmd = ns.exec(&env.ringtun);
    cmd.arg("run")
        .arg("--config")
        .arg(&env.config)
        .arg("--cert-chain")
        .arg(env.certs.join(format!("default.{who}.pem")))
        .arg("--key")
        .arg(env.certs.join(format!("default.{who}.key")))
        .arg("--roots")
        .arg(env.certs.join("ca.pem"))
        .args(["--workload", &format!("default/{who}")])
        .args(["--workers", &workers.to_string()]);
    if !env.pin {
        cmd.arg("--no-pin");
    }
    cmd.args(&env.extra).args(extra);
    cmd
}

fn placeholders(env: &Env, ns: &Netns, who: &str, workers: usize) -> Vec<(&'static str, String)> {
    let ip = if who == "client" {
        "10.77.0.1"
    } else {
        "10.77.0.2"
    };
    vec![
        ("{side}", who.to_owned()),
        ("{ns}", ns.name().to_owned()),
        ("{config}", env.config.display().to_string()),
        ("{dir}", env.dir.display().to_string()),
        ("{certs}", env.certs.display().to_string()),
        (
            "{cert_chain}",
            env.certs
                .join(format!("default.{who}.pem"))
                .display()
                .to_string(),
        ),
        (
            "{key}",
            env.certs
                .join(format!("default.{who}.key"))
                .display()
                .to_string(),
        ),
        ("{roots}", env.certs.join("ca.pem").display().to_string()),
        ("{workload}", format!("default/{who}")),
        ("{workload_info}", format!("default/{who}/{who}")),
        ("{sa}", who.to_owned()),
        ("{ip}", ip.to_owned()),
        ("{workers}", workers.to_string()),
        ("{trust_domain}", "cluster.local".to_owned()),
    ]
}

fn fill(template: &str, ph: &[(&str, String)]) -> String {
    ph.iter()
        .fold(template.to_owned(), |s, (k, v)| s.replace(k, v))
}

fn parse_env(spec: &str, ph: &[(&str, String)]) -> Vec<(String, String)> {
    spec.split(',')
        .filter(|kv| !kv.trim().is_empty())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), fill(v, ph)))
        .collect()
}

/// Starts one side of a tunnel and waits until it listens (15001 client, 15008 server).
fn start_side(
    env: &Env,
    c: &Contender,
    who: &str,
    workers: usize,
    extra: &[String],
    extra_env: Option<&str>,
    tag: &str,
) -> Result<Proc, String> {
    let topo = &env.topos[c.topo];
    let ns = if who == "client" {
        &topo.client
    } else {
        &topo.server
    };
    let log = env.dir.join(format!("{}-{who}{tag}.log", c.name));
    let cmd = match &c.kind {
        Kind::Direct => return Err("direct has no tunnel".into()),
        Kind::Ringtun { extra: own } => {
            let mut cmd = ringtun_cmd(env, ns, who, workers, extra);
            cmd.args(own);
            cmd
        }
        Kind::Other {
            template,
            env: spec,
            ..
        } => {
            let ph = placeholders(env, ns, who, workers);
            let mut cmd = ns.exec("sh");
            cmd.arg("-c").arg(format!("exec {}", fill(template, &ph)));
            for (k, v) in parse_env(spec, &ph) {
                cmd.env(k, v);
            }
            if let Some(extra_env) = extra_env {
                for (k, v) in parse_env(extra_env, &ph) {
                    cmd.env(k, v);
                }
            }
            cmd
        }
    };
    let mut p = Proc::spawn(cmd, &log).map_err(|e| format!("starting {} {who}: {e}", c.name))?;
    let port = if who == "client" { 15001 } else { 15008 };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = match c.kind {
            Kind::Ringtun { .. } => p.log_text().contains("ringtun ready"),
            _ => p.pids().iter().any(|&pid| procs::listens(pid, port)),
        };
        if ready {
            return Ok(p);
        }
        if !p.alive() || Instant::now() > deadline {
            return Err(format!(
                "{} ({who}) did not start listening on {port}; its log {}:\n{}",
                c.name,
                log.display(),
                tail(&p.log_text(), 40)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn start_tunnel(
    env: &Env,
    c: &Contender,
    workers: usize,
    client_extra: &[String],
    client_env: Option<&str>,
    tag: &str,
) -> Result<Option<Tunnel>, String> {
    if matches!(c.kind, Kind::Direct) {
        return Ok(None);
    }
    let server = start_side(env, c, "server", workers, &[], None, tag)?;
    let client = start_side(env, c, "client", workers, client_extra, client_env, tag)?;
    let t = Tunnel { client, server };
    warm_up(env, c)?;
    Ok(Some(t))
}

/// A little traffic through a fresh tunnel so the first handshake (and one-time costs such as
/// entropy seeding) fall outside the measurements; retried while the tunnel settles.
fn warm_up(env: &Env, c: &Contender) -> Result<(), String> {
    let ns = &env.topos[c.topo].client;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = c.target.clone();
        let r = ns
            .enter(move || -> std::io::Result<()> {
                load::bulk(&t, Dir::Up, 1, 1 << 20)?;
                load::ping_pong(&t, 1, 0, 50)?;
                Ok(())
            })
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match r {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("warm-up through {} failed: {e}", c.name))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Runs `f` in the contender's client namespace, measuring the tunnel's CPU (client, server
/// seconds) around it.
fn measured<T: Send>(
    env: &Env,
    c: &Contender,
    tunnel: Option<&Tunnel>,
    f: impl FnOnce(&Target) -> std::io::Result<T> + Send,
) -> Result<(T, Option<(f64, f64)>), String> {
    let before = tunnel.map(Tunnel::cpu);
    let t = c.target.clone();
    let r = env.topos[c.topo]
        .client
        .enter(move || f(&t))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{}: {e}", c.name))?;
    let after = tunnel.map(Tunnel::cpu);
    let cpu = match (before, after) {
        (Some(b), Some(a)) => Some((a.0 - b.0, a.1 - b.1)),
        _ => None,
    };
    Ok((r, cpu))
}

// ---------------------------------------------------------------------------------------------
// Measurements

#[allow(clippy::too_many_arguments)] // one measurement's whole context, passed once
fn bulk_tests(
    env: &Env,
    res: &mut Results,
    run: usize,
    c: &Contender,
    tunnel: Option<&Tunnel>,
    bytes: u64,
    prefix: &str,
    which: &[(Dir, usize)],
) -> Result<(), String> {
    for &(dir, streams) in which {
        let test = format!(
            "{prefix}bulk {} {streams} stream{}",
            if dir == Dir::Up { "up" } else { "down" },
            if streams == 1 { "" } else { "s" }
        );
        env.progress.step(&format!("{}: {test}", c.name));
        let (took, cpu) = measured(env, c, tunnel, move |t| load::bulk(t, dir, streams, bytes))?;
        let mibs = bytes as f64 / MIB / took.as_secs_f64();
        res.push(run, &c.name, &test, "MiB/s", mibs, true);
        if let Some((cc, sc)) = cpu {
            let gib = bytes as f64 / GIB;
            res.push(
                run,
                &c.name,
                &test,
                "CPU s/GiB (pair)",
                (cc + sc) / gib,
                false,
            );
            res.push(run, &c.name, &test, "CPU s/GiB (client)", cc / gib, false);
            res.push(run, &c.name, &test, "CPU s/GiB (server)", sc / gib, false);
        }
    }
    Ok(())
}

fn latency_tests(
    env: &Env,
    res: &mut Results,
    run: usize,
    c: &Contender,
    tunnel: Option<&Tunnel>,
    n: usize,
) -> Result<(), String> {
    for (size, name) in [(1usize, "ping-pong 1 B"), (1024, "ping-pong 1 KiB")] {
        env.progress.step(&format!("{}: {name}", c.name));
        let (rtts, _) = measured(env, c, tunnel, move |t| {
            load::ping_pong(t, size, (n / 10).max(100), n)
        })?;
        res.push_rtts(run, &c.name, name, &rtts);
    }
    Ok(())
}

fn rr_tests(
    env: &Env,
    res: &mut Results,
    run: usize,
    c: &Contender,
    tunnel: Option<&Tunnel>,
    secs: f64,
    rate: f64,
) -> Result<(), String> {
    let d = Duration::from_secs_f64(secs);
    let name = "rr16 closed loop 1 KiB";
    env.progress.step(&format!("{}: {name}", c.name));
    let (r, cpu) = measured(env, c, tunnel, move |t| {
        load::request_response(t, 16, RR_SIZE, d, None)
    })?;
    let rps = r.completed as f64 / r.elapsed.as_secs_f64();
    res.push(run, &c.name, name, "req/s", rps, true);
    let s = stats::sorted(&r.rtts);
    res.push(
        run,
        &c.name,
        name,
        "RTT p50 µs",
        stats::quantile(&s, 0.5),
        false,
    );
    res.push(
        run,
        &c.name,
        name,
        "RTT p99 µs",
        stats::quantile(&s, 0.99),
        false,
    );
    if let Some((cc, sc)) = cpu {
        let per = (cc + sc) / r.completed.max(1) as f64 * 1e6;
        res.push(run, &c.name, name, "CPU µs/req (pair)", per, false);
    }

    let name = format!("rr16 at {rate:.0} req/s 1 KiB");
    env.progress.step(&format!("{}: {name}", c.name));
    let (r, _) = measured(env, c, tunnel, move |t| {
        load::request_response(t, 16, RR_SIZE, d, Some(rate))
    })?;
    res.push_rtts(run, &c.name, &name, &r.rtts);
    res.push(
        run,
        &c.name,
        &name,
        "achieved req/s",
        r.completed as f64 / r.elapsed.as_secs_f64(),
        true,
    );
    res.push(
        run,
        &c.name,
        &name,
        "late sends %",
        r.late as f64 * 100.0 / r.completed.max(1) as f64,
        false,
    );
    Ok(())
}

fn pool_new_count(t: Option<&Tunnel>) -> usize {
    t.map(|t| t.client.log_text().matches("pool=new").count())
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
fn conn_test(
    env: &Env,
    res: &mut Results,
    run: usize,
    c: &Contender,
    tunnel: Option<&Tunnel>,
    name: &str,
    n: u64,
    concurrency: usize,
    sources: &[IpAddr],
    count_handshakes: bool,
) -> Result<(), String> {
    env.progress.step(&format!("{}: {name}", c.name));
    let new_before = pool_new_count(tunnel);
    let sources = sources.to_vec();
    let (r, cpu) = measured(env, c, tunnel, move |t| {
        load::connection_rate(t, n, concurrency, CONN_REQ, CONN_REPLY, &sources)
    })?;
    if r.completed == 0 {
        return Err(format!(
            "{}: {name}: no connection completed ({})",
            c.name,
            r.first_error.unwrap_or_default()
        ));
    }
    res.push(
        run,
        &c.name,
        name,
        "conn/s",
        r.completed as f64 / r.elapsed.as_secs_f64(),
        true,
    );
    let s = stats::sorted(&r.times);
    res.push(
        run,
        &c.name,
        name,
        "conn time p50 µs",
        stats::quantile(&s, 0.5),
        false,
    );
    res.push(
        run,
        &c.name,
        name,
        "conn time p99 µs",
        stats::quantile(&s, 0.99),
        false,
    );
    res.push(run, &c.name, name, "failed", r.failed as f64, false);
    if let Some((cc, sc)) = cpu {
        let k = r.completed as f64 / 1000.0;
        res.push(
            run,
            &c.name,
            name,
            "CPU s/1000 conns (pair)",
            (cc + sc) / k,
            false,
        );
        res.push(
            run,
            &c.name,
            name,
            "CPU s/1000 conns (client)",
            cc / k,
            false,
        );
        res.push(
            run,
            &c.name,
            name,
            "CPU s/1000 conns (server)",
            sc / k,
            false,
        );
    }
    if count_handshakes && tunnel.is_some() {
        // Access-log lines are written when connections end; give the last ones a moment.
        std::thread::sleep(Duration::from_millis(300));
        let new = pool_new_count(tunnel).saturating_sub(new_before);
        res.push(
            run,
            &c.name,
            name,
            "new HBONE conns per conn",
            new as f64 / r.completed as f64,
            false,
        );
    }
    Ok(())
}

/// Hidden command line of the idle-connection child: `ringtun-bench __idle-conns ADDR MARK N`.
const IDLE_CHILD: &str = "__idle-conns";

/// Idle connections held by a child process in the client namespace (closed when dropped).
///
/// A separate process because a process may have only RLIMIT_NOFILE descriptors (its hard
/// limit, which an unprivileged container cannot raise): with 10,000 idle connections the
/// client ends and the load server's ends would need 20,000 in the harness alone.
struct IdleChild(Child);

impl IdleChild {
    /// Starts the child and waits until it holds all `n` connections (or failed).
    fn open(ns: &Netns, t: &Target, n: usize) -> Result<IdleChild, String> {
        let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
        let mut child = ns
            .exec(exe)
            .args([
                IDLE_CHILD.to_owned(),
                t.addr.to_string(),
                t.mark.to_string(),
                n.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting the idle-connection child: {e}"))?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            use std::io::BufRead;
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        let held = IdleChild(child);
        match line.trim() {
            "ready" => Ok(held),
            "" => Err("the idle-connection child died".into()),
            other => Err(other.to_owned()),
        }
    }
}

impl Drop for IdleChild {
    fn drop(&mut self) {
        // Closing its stdin tells the child to close the connections and exit.
        drop(self.0.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The idle-connection child: opens the connections (it already runs in the client
/// namespace), says `ready` (or the error) on stdout, holds them until stdin closes.
fn idle_child_main(args: &[String]) -> i32 {
    let parsed = match args {
        [addr, mark, n] => addr
            .parse::<SocketAddr>()
            .ok()
            .zip(mark.parse::<u32>().ok())
            .zip(n.parse::<usize>().ok()),
        _ => None,
    };
    let Some(((addr, mark), n)) = parsed else {
        println!("error: usage: ringtun-bench {IDLE_CHILD} ADDR MARK N");
        return 2;
    };
    procs::raise_nofile(1 << 18);
    let t = Target { addr, mark };
    let spawn = |f: Box<dyn FnOnce() + Send>| std::thread::Builder::new().spawn(f);
    match load::open_idle(spawn, &t, n, 32) {
        Ok(held) => {
            println!("ready");
            let _ = std::io::stdout().flush();
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            drop(held);
            0
        }
        Err(e) => {
            println!("error: opening {n} idle connections: {e}");
            1
        }
    }
}

/// Access-log lines of the client side that match `needle` (ringtun only; others log
/// differently).
fn client_log_count(c: &Contender, tunnel: &Tunnel, needle: &str) -> usize {
    match c.kind {
        Kind::Ringtun { .. } => tunnel.client.log_text().matches(needle).count(),
        _ => 0,
    }
}

/// RSS per idle tunnelled connection: (RSS with `n` idle connections open, 2 s after the last
/// one reached the server − RSS of the same fresh, warmed-up tunnel before any was opened) /
/// `n`, per side and both together.
///
/// The baseline is taken once, before the first count: after a step closes its connections the
/// allocator keeps some of their memory, so a baseline taken between steps would hide part of
/// the next step's cost. Counts run smallest first so that what a bigger step leaves behind
/// never inflates a smaller one. For ringtun the client's access log afterwards proves that
/// every connection was tunnelled over HBONE and how many HBONE connections they shared.
fn memory_test(
    env: &Env,
    res: &mut Results,
    run: usize,
    c: &Contender,
    tunnel: &Tunnel,
    counts: &[usize],
) -> Result<(), String> {
    let held = &env.servers[c.topo];
    let topo = &env.topos[c.topo];
    std::thread::sleep(Duration::from_millis(500));
    let (bc, bs) = tunnel.rss_kib();
    for (side, v) in [("client", bc), ("server", bs)] {
        res.memory.push(MemoryPoint {
            run,
            contender: c.name.clone(),
            side: side.into(),
            conns: 0,
            rss_kib: v,
        });
        res.push(
            run,
            &c.name,
            "memory idle",
            &format!("RSS MiB ({side})"),
            v as f64 / 1024.0,
            false,
        );
    }
    let mut counts = counts.to_vec();
    counts.sort_unstable();
    for n in counts {
        env.progress
            .step(&format!("{}: memory with {n} idle connections", c.name));
        let tunnelled_before = client_log_count(c, tunnel, "direction=outbound");
        let new_before = client_log_count(c, tunnel, "pool=new");
        let idle = IdleChild::open(&topo.client, &c.target, n)
            .map_err(|e| format!("{}: {n} idle connections: {e}", c.name))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while held.held.load(Ordering::Relaxed) < n {
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: only {} of {n} idle connections reached the server",
                    c.name,
                    held.held.load(Ordering::Relaxed)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Idle means quiet for a while: ringtun lets a connection's read buffer go after a
        // second without traffic (a tunnel may keep buffers of recently active connections).
        std::thread::sleep(Duration::from_secs(2));
        let (rc, rs) = tunnel.rss_kib();
        let test = format!("memory {n} idle conns");
        for (side, v, before) in [("client", rc, bc), ("server", rs, bs)] {
            res.memory.push(MemoryPoint {
                run,
                contender: c.name.clone(),
                side: side.into(),
                conns: n,
                rss_kib: v,
            });
            res.push(
                run,
                &c.name,
                &test,
                &format!("RSS MiB ({side})"),
                v as f64 / 1024.0,
                false,
            );
            res.push(
                run,
                &c.name,
                &test,
                &format!("KiB/conn ({side})"),
                (v as f64 - before as f64) / n as f64,
                false,
            );
        }
        res.push(
            run,
            &c.name,
            &test,
            "KiB/conn (both)",
            (rc as f64 + rs as f64 - bc as f64 - bs as f64) / n as f64,
            false,
        );
        drop(idle);
        let deadline = Instant::now() + Duration::from_secs(60);
        while held.held.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Let the tunnels finish closing (and log) before the next step.
        std::thread::sleep(Duration::from_secs(1));
        if matches!(c.kind, Kind::Ringtun { .. }) {
            let tunnelled = client_log_count(c, tunnel, "direction=outbound") - tunnelled_before;
            let new = client_log_count(c, tunnel, "pool=new") - new_before;
            if tunnelled < n {
                return Err(format!(
                    "{}: only {tunnelled} of {n} idle connections were logged as tunnelled (direction=outbound)",
                    c.name
                ));
            }
            res.push(run, &c.name, &test, "HBONE conns", new as f64, false);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Cross-checks with iperf3 and sockperf

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn crosscheck(env: &Env, res: &mut Results, run: usize, c: &Contender, bytes: u64) {
    let ns = &env.topos[c.topo].client;
    let (ip, iperf_port, sp_port) = if matches!(c.kind, Kind::Direct) {
        (
            SERVER_IP.to_string(),
            IPERF_DIRECT_PORT,
            SOCKPERF_DIRECT_PORT,
        )
    } else {
        (VIP.to_string(), IPERF_PORT, SOCKPERF_PORT)
    };
    let mut push = |test: &str, metric: &str, v: f64, hib: bool| {
        if v.is_finite() {
            res.crosscheck.push(report::Sample {
                run,
                contender: c.name.clone(),
                test: test.to_owned(),
                metric: metric.to_owned(),
                value: v,
                higher_is_better: hib,
            });
        }
    };
    if have("iperf3") {
        for (args, test) in [
            (vec![], "iperf3 up 1 stream"),
            (vec!["-R"], "iperf3 down 1 stream"),
            (vec!["-P", "4"], "iperf3 up 4 streams"),
        ] {
            env.progress.step(&format!("{}: {test}", c.name));
            let out = ns
                .exec("timeout")
                .args(["120", "iperf3", "-c", &ip, "-p", &iperf_port.to_string()])
                .args(["-n", &bytes.to_string(), "-J"])
                .args(args)
                .output();
            let bps = out.ok().and_then(|o| {
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
                v["end"]["sum_received"]["bits_per_second"].as_f64()
            });
            match bps {
                Some(b) => push(test, "MiB/s", b / 8.0 / MIB, true),
                None => env
                    .progress
                    .step(&format!("iperf3 through {} gave no result", c.name)),
            }
        }
    }
    if have("sockperf") {
        let test = "sockperf ping-pong 64 B";
        env.progress.step(&format!("{}: {test}", c.name));
        let out = ns
            .exec("timeout")
            .args(["60", "sockperf", "ping-pong", "--tcp", "-i", &ip, "-p"])
            .arg(sp_port.to_string())
            .args(["-m", "64", "-t", "2"])
            .output();
        if let Ok(o) = out {
            let text = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            // sockperf prints one-way latency (RTT/2) percentiles: "---> percentile 50.000 =  12.345"
            for (p, name) in [("50.000", "p50"), ("99.000", "p99"), ("99.900", "p99.9")] {
                let v = text
                    .lines()
                    .find(|l| l.contains(&format!("percentile {p}")))
                    .and_then(|l| l.rsplit('=').next())
                    .and_then(|v| v.trim().parse::<f64>().ok());
                if let Some(v) = v {
                    push(test, &format!("one-way {name} µs"), v, false);
                }
            }
        }
    }
}

fn start_crosscheck_servers(env: &Env, keep: &mut Vec<Proc>) {
    for (i, topo) in env.topos.iter().enumerate() {
        if have("iperf3") {
            for port in [IPERF_PORT, IPERF_DIRECT_PORT] {
                let mut cmd = topo.server.exec("iperf3");
                cmd.args(["-s", "-p", &port.to_string()]);
                if let Ok(p) = Proc::spawn(cmd, &env.dir.join(format!("iperf3-{i}-{port}.log"))) {
                    keep.push(p);
                }
            }
        }
        if have("sockperf") {
            for port in [SOCKPERF_PORT, SOCKPERF_DIRECT_PORT] {
                let mut cmd = topo.server.exec("sockperf");
                cmd.args(["server", "--tcp", "-i", "0.0.0.0", "-p", &port.to_string()]);
                if let Ok(p) = Proc::spawn(cmd, &env.dir.join(format!("sockperf-{i}-{port}.log"))) {
                    keep.push(p);
                }
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
}

// ---------------------------------------------------------------------------------------------
// Set-up

/// The demo config with the cross-check tools' ports added to the service.
fn config_text() -> String {
    let extra = format!(
        "      80: 5201\n      {IPERF_PORT}: {IPERF_PORT}\n      {SOCKPERF_PORT}: {SOCKPERF_PORT}\n"
    );
    let text = ringtun::demo::DEMO_CONFIG
        .replace("      80: 5201\n", &extra)
        .replace(
            "    80: 5201\npolicies",
            &format!("    80: 5201\n    {IPERF_PORT}: {IPERF_PORT}\n    {SOCKPERF_PORT}: {SOCKPERF_PORT}\npolicies"),
        );
    format!("# written by ringtun-bench (engine/demo/config.yaml plus the iperf3/sockperf ports)\n{text}")
}

fn build_ringtun() -> Result<PathBuf, String> {
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
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe
        .parent()
        .map(|d| d.join("ringtun"))
        .ok_or("no directory for the current executable")?;
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found after the build; pass --ringtun PATH",
            bin.display()
        ))
    }
}

fn setup_topology(prefix: &str, with_sources: bool, dir: &Path) -> Result<TwoNodes, String> {
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

fn source_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 78, (i / 250) as u8, (i % 250) as u8 + 1)
}

fn start_server(t: &TwoNodes) -> Result<Arc<ServerStats>, String> {
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

fn machine_meta(o: &Opts, ringtun: &Path) -> report::Meta {
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

/// Derived figures: how much a tunnel adds to the one-way latency (half the round trip) over
/// direct in the same run.
fn added_latency(res: &mut Results, runs: usize) {
    let tests: Vec<String> = res.latency.iter().map(|l| l.test.clone()).collect();
    let mut add = Vec::new();
    for run in 0..runs {
        for test in tests.iter().collect::<std::collections::BTreeSet<_>>() {
            for p in ["p50", "p99"] {
                let metric = format!("RTT {p} µs");
                let get = |c: &str| {
                    res.samples
                        .iter()
                        .find(|s| {
                            s.run == run
                                && s.contender == c
                                && &s.test == test
                                && s.metric == metric
                        })
                        .map(|s| s.value)
                };
                let Some(d) = get(DIRECT) else { continue };
                for c in res.contenders.iter().filter(|c| *c != DIRECT) {
                    if let Some(v) = get(c) {
                        add.push((
                            run,
                            c.clone(),
                            test.clone(),
                            format!("added one-way {p} µs"),
                            (v - d) / 2.0,
                        ));
                    }
                }
            }
        }
    }
    for (run, c, test, metric, v) in add {
        res.push(run, &c, &test, &metric, v, false);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(IDLE_CHILD) {
        std::process::exit(idle_child_main(&args[2..]));
    }
    let o = Opts::parse();
    install_signal_cleanup();
    if let Err(e) = run(o) {
        eprintln!("\nringtun-bench: {e}");
        std::process::exit(1);
    }
}

fn run(o: Opts) -> Result<(), String> {
    ringtun_topology::require_root().map_err(|e| e.to_string())?;
    let plan = Plan::new(&o);
    let nofile = procs::raise_nofile(1 << 18);
    let max_idle = plan.idle.iter().copied().max().unwrap_or(0);
    // The load server holds one end of every idle connection (the client ends live in a child
    // process, each ringtun holds its own); every process gets this limit.
    if (nofile as usize) < max_idle + 1000 {
        return Err(format!(
            "RLIMIT_NOFILE is {nofile}; {max_idle} idle connections need about {}",
            max_idle + 1000
        ));
    }
    let ringtun = match &o.ringtun {
        Some(p) => p.clone(),
        None => build_ringtun()?,
    };
    let meta = machine_meta(&o, &ringtun);
    let out = o.out.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/ringtun-bench")
            .join(meta.date.replace(':', ""))
    });
    let dir = out.join("work");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let certs = dir.join("certs");
    let status = Command::new(&ringtun)
        .args(["gen-certs", "--dir"])
        .arg(&certs)
        .args([
            "--identity",
            "default/client",
            "--identity",
            "default/server",
        ])
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("{}: {e}", ringtun.display()))?;
    if !status.success() {
        return Err(format!("ringtun gen-certs failed ({status})"));
    }
    let config = dir.join("config.yaml");
    std::fs::write(&config, config_text()).map_err(|e| e.to_string())?;

    let mut topos = vec![setup_topology("rtb", true, &dir)?];
    let mut contenders = vec![
        Contender {
            name: DIRECT.into(),
            kind: Kind::Direct,
            topo: 0,
            target: Target {
                addr: SocketAddr::from((SERVER_IP, SERVER_PORT)),
                mark: DEFAULT_MARK,
            },
        },
        Contender {
            name: "ringtun".into(),
            kind: Kind::Ringtun { extra: Vec::new() },
            topo: 0,
            target: Target {
                addr: SocketAddr::from((VIP, VIP_PORT)),
                mark: 0,
            },
        },
    ];
    // Every tunnel gets its own pair of namespaces: all of them run at once, on the same ports.
    let mut add = |name: String, kind: Kind, prefix: &str| -> Result<(), String> {
        topos.push(setup_topology(prefix, true, &dir)?);
        contenders.push(Contender {
            name,
            kind,
            topo: topos.len() - 1,
            target: Target {
                addr: SocketAddr::from((VIP, VIP_PORT)),
                mark: 0,
            },
        });
        Ok(())
    };
    for name in &o.contenders {
        match name.as_str() {
            "none" => {}
            "legacy" => add(
                "ringtun-legacy".into(),
                Kind::Ringtun {
                    extra: vec!["--io-driver".into(), "legacy".into()],
                },
                "rtbl",
            )?,
            "ztunnel" => {
                let path = o.ztunnel.clone().unwrap_or_else(default_ztunnel);
                if !path.exists() {
                    return Err(format!(
                        "the ztunnel contender needs its binary: {} is missing (pass --ztunnel PATH, or --contenders legacy to leave it out)",
                        path.display()
                    ));
                }
                let path = path
                    .canonicalize()
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                add(
                    "ztunnel".into(),
                    Kind::Other {
                        template: path.display().to_string(),
                        env: ZTUNNEL_ENV.into(),
                        unpooled_env: Some(ZTUNNEL_UNPOOLED_ENV.into()),
                    },
                    "rtbz",
                )?;
            }
            other => {
                return Err(format!(
                    "--contenders: unknown contender {other:?} (legacy, ztunnel, none)"
                ))
            }
        }
    }
    for (i, v) in o.variant.iter().enumerate() {
        let (name, args) = v
            .split_once('=')
            .ok_or_else(|| format!("--variant {v:?}: expected NAME=ARGS"))?;
        add(
            name.trim().to_owned(),
            Kind::Ringtun {
                extra: args.split_whitespace().map(str::to_owned).collect(),
            },
            &format!("rtv{i}"),
        )?;
    }
    if let Some(template) = &o.other_tunnel {
        add(
            o.other_name.clone(),
            Kind::Other {
                template: template.clone(),
                env: o.other_env.clone(),
                unpooled_env: o.other_unpooled_env.clone(),
            },
            "rtbo",
        )?;
    }
    let servers = topos
        .iter()
        .map(start_server)
        .collect::<Result<Vec<_>, _>>()?;
    let env = Env {
        ringtun: ringtun.clone(),
        dir: dir.clone(),
        certs,
        config,
        pin: o.pin,
        extra: o.ringtun_args.clone(),
        topos,
        servers,
        sources: (0..UNPOOLED_SOURCES)
            .map(|i| IpAddr::V4(source_ip(i)))
            .collect(),
        progress: Progress::new(),
    };
    let mut helpers = Vec::new();
    let crosscheck_on =
        !o.no_crosscheck && wants(&o, "crosscheck") && (have("iperf3") || have("sockperf"));
    if crosscheck_on {
        start_crosscheck_servers(&env, &mut helpers);
    }

    let mut res = Results {
        meta,
        contenders: contenders.iter().map(|c| c.name.clone()).collect(),
        ..Default::default()
    };
    res.notes.push(format!(
        "ringtun runs with --workers {}{}{}; each figure is the median of {} run(s), contenders alternating measurement by measurement.",
        o.workers,
        if o.pin { "" } else { " --no-pin" },
        if o.ringtun_args.is_empty() { String::new() } else { format!(" {}", o.ringtun_args.join(" ")) },
        plan.runs
    ));
    res.notes.push(format!(
        "Unpooled connection rate: ringtun has no switch to turn pooling off, so its client side runs with --pool-idle-timeout-ms 1 and every connection comes from one of {UNPOOLED_SOURCES} rotating source addresses (HBONE pools per source address); 'new HBONE conns per conn' (from the access log) shows whether each connection really did a TLS handshake."
    ));
    let header = format!(
        "ringtun-bench: {} run(s); bulk {} MiB; ping-pong {} round trips; rr {} s at {} req/s; {} pooled / {} unpooled connections; idle {:?}",
        plan.runs,
        plan.bytes >> 20,
        plan.pingpongs,
        plan.secs,
        o.rate,
        plan.conns,
        plan.unpooled_conns,
        plan.idle
    );
    eprintln!("{header}");
    eprintln!("ringtun-bench: work files in {}", dir.display());

    let bulk_all = [(Dir::Up, 1), (Dir::Up, 4), (Dir::Down, 1), (Dir::Down, 4)];
    for run in 0..plan.runs {
        // Rotate the order so no contender always goes first.
        let order: Vec<usize> = (0..contenders.len())
            .map(|i| (i + run) % contenders.len())
            .collect();
        env.progress.stage(format!("run {}/{}", run + 1, plan.runs));
        env.progress.step("starting tunnels");
        let mut tunnels: Vec<Option<Tunnel>> = Vec::new();
        for c in &contenders {
            tunnels.push(start_tunnel(&env, c, o.workers, &[], None, "")?);
        }
        if wants(&o, "memory") {
            for &i in &order {
                if let Some(t) = &tunnels[i] {
                    memory_test(&env, &mut res, run, &contenders[i], t, &plan.idle)?;
                }
            }
        }
        if wants(&o, "bulk") {
            for which in bulk_all {
                for &i in &order {
                    bulk_tests(
                        &env,
                        &mut res,
                        run,
                        &contenders[i],
                        tunnels[i].as_ref(),
                        plan.bytes,
                        "",
                        &[which],
                    )?;
                }
            }
        }
        if wants(&o, "latency") {
            for &i in &order {
                latency_tests(
                    &env,
                    &mut res,
                    run,
                    &contenders[i],
                    tunnels[i].as_ref(),
                    plan.pingpongs,
                )?;
            }
        }
        if wants(&o, "rr") {
            for &i in &order {
                rr_tests(
                    &env,
                    &mut res,
                    run,
                    &contenders[i],
                    tunnels[i].as_ref(),
                    plan.secs,
                    o.rate,
                )?;
            }
        }
        if wants(&o, "conn") {
            for &i in &order {
                conn_test(
                    &env,
                    &mut res,
                    run,
                    &contenders[i],
                    tunnels[i].as_ref(),
                    "conn rate pooled",
                    plan.conns,
                    o.conn_concurrency,
                    &[],
                    true,
                )?;
            }
        }
        if crosscheck_on {
            for &i in &order {
                crosscheck(&env, &mut res, run, &contenders[i], plan.bytes);
            }
        }
        // Unpooled: restart the client sides with pooling defeated.
        if wants(&o, "unpooled") {
            for &i in &order {
                let c = &contenders[i];
                let (extra, extra_env): (Vec<String>, Option<&str>) = match &c.kind {
                    Kind::Direct => (Vec::new(), None),
                    Kind::Ringtun { .. } => {
                        (vec!["--pool-idle-timeout-ms".into(), "1".into()], None)
                    }
                    Kind::Other { unpooled_env, .. } => match unpooled_env {
                        Some(e) => (Vec::new(), Some(e.as_str())),
                        None => continue,
                    },
                };
                if let Some(t) = tunnels[i].as_mut() {
                    env.progress
                        .step(&format!("{}: restarting the client side unpooled", c.name));
                    t.client.stop();
                    t.client =
                        start_side(&env, c, "client", o.workers, &extra, extra_env, "-unpooled")?;
                    warm_up(&env, c)?;
                }
                conn_test(
                    &env,
                    &mut res,
                    run,
                    c,
                    tunnels[i].as_ref(),
                    "conn rate unpooled",
                    plan.unpooled_conns,
                    o.conn_concurrency,
                    &env.sources,
                    matches!(c.kind, Kind::Ringtun { .. }),
                )?;
            }
        }
        drop(tunnels);

        if wants(&o, "scaling") && !o.shards.is_empty() {
            for &k in &o.shards {
                let prefix = format!("shards={k} ");
                env.progress.stage(format!(
                    "run {}/{} scaling {k} shard(s)",
                    run + 1,
                    plan.runs
                ));
                let mut tunnels: Vec<Option<Tunnel>> = Vec::new();
                for c in &contenders {
                    let scales = match &c.kind {
                        Kind::Other { template, env, .. } => {
                            template.contains("{workers}") || env.contains("{workers}")
                        }
                        _ => true,
                    };
                    tunnels.push(if scales {
                        start_tunnel(&env, c, k, &[], None, "-scaling")?
                    } else {
                        None
                    });
                }
                for &i in &order {
                    let c = &contenders[i];
                    if tunnels[i].is_none() && !matches!(c.kind, Kind::Direct) {
                        continue;
                    }
                    bulk_tests(
                        &env,
                        &mut res,
                        run,
                        c,
                        tunnels[i].as_ref(),
                        plan.bytes,
                        &prefix,
                        &[(Dir::Up, 4), (Dir::Down, 4)],
                    )?;
                    conn_test(
                        &env,
                        &mut res,
                        run,
                        c,
                        tunnels[i].as_ref(),
                        &format!("{prefix}conn rate pooled"),
                        plan.conns,
                        o.conn_concurrency,
                        &[],
                        false,
                    )?;
                }
            }
        }
    }
    env.progress.done();
    added_latency(&mut res, plan.runs);
    drop(helpers);

    let t = report::table(&res, &res.samples);
    println!("\n{header}");
    println!(
        "{} · kernel {} · {} CPUs · {}\nmedian (min–max) over runs; ratios are of medians\n",
        res.meta.cpu, res.meta.kernel, res.meta.cores, res.meta.date
    );
    print!("{}", report::render_text(&t));
    if !res.crosscheck.is_empty() {
        println!("\ncross-checks (iperf3, sockperf):");
        print!(
            "{}",
            report::render_text(&report::table(&res, &res.crosscheck))
        );
    }
    for n in &res.notes {
        println!("note: {n}");
    }
    std::fs::write(out.join("table.md"), report::render_markdown(&t)).map_err(|e| e.to_string())?;
    let written = report::write_all(&out, &res).map_err(|e| e.to_string())?;
    println!(
        "\nwrote {} and {} other files in {}",
        out.join("report.html").display(),
        written.len(),
        out.display()
    );
    Ok(())
}
