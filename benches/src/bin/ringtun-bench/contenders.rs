//! The contenders: direct TCP, the ringtun under test (and variants of it), Istio's ztunnel and
//! any other tunnel given as a command template; how each side of a tunnel starts, and how a
//! measurement runs through a contender.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringtun_benches::load::{self, Dir, ServerStats, Target};
use ringtun_benches::report::DIRECT;
use ringtun_testbed::{sys, Netns, RunFiles, TwoNodes, DEFAULT_MARK};

use crate::netstat;
use crate::options::Opts;
use crate::procs::{Node, Proc, Tunnel, NAMESPACES};
use crate::profile::{Profile, Recording};
use crate::progress::Progress;
use crate::setup::{setup_topology, sibling_binary};
use crate::{SERVER_IP, SERVER_PORT, VIP, VIP_PORT};

/// How to start a contender's tunnel.
#[derive(Clone)]
pub enum Kind {
    /// No tunnel: the load generators dial the server directly, marked past the capture.
    Direct,
    /// The ringtun under test, with these extra `ringtun run` arguments.
    Ringtun { extra: Vec<String> },
    /// Any other tunnel: a command template and its environment (placeholders filled in), and
    /// the extra environment that defeats its client-side pool (no unpooled test without it).
    Other {
        template: String,
        env: String,
        unpooled_env: Option<String>,
        /// Whether the memory test applies: not to a relay with a thread per direction, for
        /// which 10,000 idle connections would be 40,000 threads (past a default `pid_max`).
        idle_memory: bool,
    },
    /// In-pod (shared) mode: one proxy per node, in a node namespace of its own, handed the
    /// pod's namespace (the topology's client or server side) by a node agent over ZDS, as
    /// istio-cni does; ringtun, or with `ztunnel` Istio's ztunnel in shared mode.
    InPod { ztunnel: Option<PathBuf> },
}

impl Kind {
    /// Whether this is a ringtun (dedicated or in-pod), whose access log says how many HBONE
    /// connections it opened.
    pub fn is_ringtun(&self) -> bool {
        matches!(self, Kind::Ringtun { .. } | Kind::InPod { ztunnel: None })
    }
}

/// Istio's ztunnel in dedicated mode (one workload per process, local config, its test CA):
/// what a node runs today, with one worker thread per `--workers`. `PACKET_MARK` lets the
/// capture skip its upstream sockets as it skips ringtun's, `ENABLE_ORIG_SRC=false` keeps its
/// inbound side from spoofing the client's address (no TPROXY routes here), and the access log
/// stays on (`info`) as ringtun's does.
pub const ZTUNNEL_ENV: &str = "PROXY_MODE=dedicated,PROXY_WORKLOAD_INFO={workload_info},LOCAL_XDS_PATH={config},FAKE_CA=true,XDS_ADDRESS=,CA_ADDRESS=,PACKET_MARK=1337,ENABLE_ORIG_SRC=false,ZTUNNEL_WORKER_THREADS={workers},RUST_LOG=info";
/// ztunnel's client side releasing pooled connections as soon as they are unused.
pub const ZTUNNEL_UNPOOLED_ENV: &str = "POOL_UNUSED_RELEASE_TIMEOUT=1ms";
/// ztunnel in shared mode: [`ZTUNNEL_ENV`] with the pod handed over by the node agent instead
/// of named by PROXY_WORKLOAD_INFO.
pub const ZTUNNEL_SHARED_ENV: &str = "PROXY_MODE=shared,LOCAL_XDS_PATH={config},FAKE_CA=true,XDS_ADDRESS=,CA_ADDRESS=,PACKET_MARK=1337,ENABLE_ORIG_SRC=false,ZTUNNEL_WORKER_THREADS={workers},RUST_LOG=info";

/// Where the shared ztunnel build lives, relative to the workspace.
pub fn default_ztunnel() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/ztunnel/ztunnel")
}

/// One column of the results: a name, how its tunnel starts, where its load goes.
pub struct Contender {
    /// Its name in the report.
    pub name: String,
    /// How its tunnel starts.
    pub kind: Kind,
    /// Index into the topologies.
    pub topo: usize,
    /// Where the load generators connect.
    pub target: Target,
    /// A command its tunnel's processes run under (the callgrind pass's `valgrind …`); empty
    /// for none.
    pub wrap: Vec<String>,
}

/// Everything shared by the measurements.
pub struct Env {
    /// The ringtun binary under test.
    pub ringtun: PathBuf,
    /// Work directory: logs, the config, certificates.
    pub dir: PathBuf,
    /// Certificates in `ringtun gen-certs`'s layout.
    pub certs: PathBuf,
    /// The config every tunnel reads.
    pub config: PathBuf,
    /// Keep ringtun's shard pinning.
    pub pin: bool,
    /// Extra `ringtun run` arguments for every ringtun.
    pub extra: Vec<String>,
    /// One topology per tunnel (direct shares the first).
    pub topos: Vec<TwoNodes>,
    /// The load server of each topology.
    pub servers: Vec<Arc<ServerStats>>,
    /// Source addresses of the unpooled connection-rate test.
    pub sources: Vec<IpAddr>,
    /// Progress on stderr.
    pub progress: Progress,
    /// `--profile`: where the recordings go, and how many were made.
    pub profile: Option<(PathBuf, AtomicUsize)>,
    /// `--hops`: where the fixed-rate test's traces go.
    pub hops: Option<PathBuf>,
}

/// `ringtun run` for one side, with the benchmark's and the caller's extra arguments.
fn ringtun_cmd(
    env: &Env,
    ns: &Netns,
    who: &str,
    workers: usize,
    extra: &[String],
    wrap: &[String],
) -> Command {
    let files = RunFiles::new(&env.config, &env.certs, &format!("default/{who}"));
    let mut cmd = match wrap.split_first() {
        None => files.command(ns, &env.ringtun),
        Some((program, args)) => {
            let mut cmd = ns.exec(program);
            cmd.args(args).arg(&env.ringtun).args(files.args());
            cmd
        }
    };
    cmd.args(["--workers", &workers.to_string()]);
    if !env.pin {
        cmd.arg("--no-pin");
    }
    cmd.args(&env.extra).args(extra);
    cmd
}

/// The values of the other tunnel's template placeholders for one side.
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

/// `w` as one word of a `sh -c` line.
fn shell_word(w: &str) -> String {
    if w.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_=./%,:+".contains(&b))
    {
        w.to_owned()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
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

/// How long a tunnel side gets to get ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts one side of a tunnel and waits until it is ready: ringtun answering ready on 15021,
/// another tunnel listening (15001 client, 15008 server).
pub fn start_side(
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
    if let Kind::InPod { ztunnel } = &c.kind {
        return start_inpod_side(env, c, ns, who, workers, extra, extra_env, tag, ztunnel);
    }
    let cmd = match &c.kind {
        Kind::Direct | Kind::InPod { .. } => return Err("no tunnel of its own".into()),
        Kind::Ringtun { extra: own } => {
            let mut cmd = ringtun_cmd(env, ns, who, workers, extra, &c.wrap);
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
            let wrap: String = c
                .wrap
                .iter()
                .map(|w| format!("{} ", shell_word(w)))
                .collect();
            cmd.arg("-c")
                .arg(format!("exec {wrap}{}", fill(template, &ph)));
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
    let name = format!("{} ({who})", c.name);
    let mut p = Proc::spawn(cmd, &name, &log).map_err(|e| format!("starting {name}: {e}"))?;
    let ready = match c.kind {
        // ringtun is ready when its 15021 says so, as a kubelet would ask.
        Kind::Ringtun { .. } => p.process().wait_ready(ns, START_TIMEOUT),
        _ => {
            let port = if who == "client" { 15001 } else { 15008 };
            p.process()
                .wait_until(&format!("listening on {port}"), START_TIMEOUT, |p| {
                    sys::tree(p.pid())
                        .iter()
                        .any(|&pid| sys::listens(pid, port))
                })
        }
    };
    ready.map_err(|e| format!("{e}\n(its log: {})", log.display()))?;
    Ok(p)
}

/// The fake istio-cni node agent, beside the workspace's tests.
fn node_agent_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/peers/node_agent.py")
}

/// Starts one in-pod side: a node namespace, a node agent on a socket of its own that hands
/// over `pod` (the topology's side, with its capture rules) and the snapshot, and the proxy
/// in the node namespace; ready when its 15021 says so (after the snapshot) and the pod's
/// 15001/15008 listen.
#[allow(clippy::too_many_arguments)]
fn start_inpod_side(
    env: &Env,
    c: &Contender,
    pod: &Netns,
    who: &str,
    workers: usize,
    extra: &[String],
    extra_env: Option<&str>,
    tag: &str,
    ztunnel: &Option<PathBuf>,
) -> Result<Proc, String> {
    let node =
        Netns::new(if who == "client" { "rtbnc" } else { "rtbns" }).map_err(|e| e.to_string())?;
    NAMESPACES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(node.name().to_owned());
    let socket = env.dir.join(format!("{}-{who}{tag}-zds.sock", c.name));
    let _ = std::fs::remove_file(&socket);
    let mut agent = std::process::Command::new("python3");
    agent
        .arg(node_agent_script())
        .arg("--socket")
        .arg(&socket)
        .arg("-c")
        .arg(format!(
            "accept 60; add pod-{who} {} default {who} {who}; snapshot; sleep 1000000",
            pod.path().display()
        ));
    let agent_log = env.dir.join(format!("{}-{who}{tag}-agent.log", c.name));
    let agent = ringtun_testbed::Process::spawn(agent, "node agent", &agent_log)
        .map_err(|e| format!("starting the node agent: {e}"))?;
    // The agent listens before the proxy tries its socket (the proxy retries anyway).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err(format!(
                "node agent never listened (its log: {})",
                agent_log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut cmd = match ztunnel {
        None => {
            let files = RunFiles::new(&env.config, &env.certs, &format!("default/{who}"))
                .with_workload(None);
            let mut cmd = files.command(&node, &env.ringtun);
            cmd.args(["--workers", &workers.to_string()]);
            if !env.pin {
                cmd.arg("--no-pin");
            }
            cmd.args(&env.extra).args(extra);
            cmd.env("PROXY_MODE", "shared");
            cmd
        }
        Some(path) => {
            let ph = placeholders(env, pod, who, workers);
            let mut cmd = node.exec(path);
            for spec in std::iter::once(ZTUNNEL_SHARED_ENV).chain(extra_env) {
                for (k, v) in parse_env(spec, &ph) {
                    cmd.env(k, v);
                }
            }
            cmd
        }
    };
    cmd.env("INPOD_UDS", &socket);
    let log = env.dir.join(format!("{}-{who}{tag}.log", c.name));
    let name = format!("{} ({who})", c.name);
    let p = Proc::spawn(cmd, &name, &log).map_err(|e| format!("starting {name}: {e}"))?;
    let mut p = p.with_node(Node { agent, ns: node });
    p.wait_ready_in_node(START_TIMEOUT).map_err(|e| {
        format!(
            "{e}\n(its log: {}; the agent's: {})",
            log.display(),
            agent_log.display()
        )
    })?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let listening = pod.run("ss", ["-ltnH"]).unwrap_or_default();
        if [":15001 ", ":15008 "].iter().all(|p| listening.contains(p)) {
            return Ok(p);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{name}: the pod's listeners never came up ({listening:?})"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts both sides of a contender's tunnel (none for direct) and warms it up.
pub fn start_tunnel(
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
pub fn warm_up(env: &Env, c: &Contender) -> Result<(), String> {
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

/// CPU seconds a tunnel spent during one measurement.
#[derive(Clone, Copy, Debug)]
pub struct Spent {
    /// The client side's processes (user and kernel).
    pub client: f64,
    /// The server side's processes (user and kernel).
    pub server: f64,
    /// The kernel's part (stime) of both sides together: what no userspace change removes.
    pub kernel: f64,
    /// Where it went, per side (`--profile`).
    pub profile: Option<Profile>,
    /// What the TCP counters of the client's and the server's namespace grew by.
    pub net: [netstat::Values; 2],
    /// How often each side's threads slept waiting for work (voluntary context switches):
    /// client, server. Every sleep is a wake-up on the way of whatever woke it.
    pub sleeps: [u64; 2],
    /// The whole machine's busy and stolen CPUs during the measurement (2.0: both CPUs of a
    /// 2-CPU machine all the time), load generators and everything else included.
    pub machine: Option<(f64, f64)>,
}

/// Runs `f` in the contender's client namespace, measuring the tunnel's CPU around it, and
/// with `--profile` recording where it went if `profiled` (a measurement that reports its CPU;
/// the others, latency ones among them, run undisturbed by the sampling).
pub fn measured<T: Send>(
    env: &Env,
    c: &Contender,
    tunnel: Option<&Tunnel>,
    profiled: bool,
    f: impl FnOnce(&Target) -> std::io::Result<T> + Send,
) -> Result<(T, Option<Spent>), String> {
    let recording = match (&env.profile, tunnel) {
        (Some((dir, n)), Some(tunnel)) if profiled => {
            let (client, server) = tunnel.pids();
            let n = n.fetch_add(1, Ordering::Relaxed);
            let file = dir.join(format!("{n:04}-{}.perf.data", c.name));
            Some(Recording::start(file, client, server)?)
        }
        _ => None,
    };
    let topo = &env.topos[c.topo];
    let counters = || -> Result<_, String> {
        Ok([netstat::read(&topo.client)?, netstat::read(&topo.server)?])
    };
    let net_before = tunnel.map(|_| counters()).transpose()?;
    let before = tunnel.map(Tunnel::usage);
    let machine_before = (Instant::now(), sys::machine_cpu());
    let t = c.target.clone();
    let r = topo
        .client
        .enter(move || f(&t))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{}: {e}", c.name))?;
    let after = tunnel.map(Tunnel::usage);
    let machine = match (machine_before, sys::machine_cpu()) {
        ((t0, Some(b)), Some(a)) => {
            let wall = t0.elapsed().as_secs_f64().max(1e-9);
            Some(((a.0 - b.0) / wall, (a.1 - b.1) / wall))
        }
        _ => None,
    };
    let net_after = tunnel.map(|_| counters()).transpose()?;
    let profile = recording.map(Recording::finish).transpose()?;
    let cpu = match (before, after, net_before, net_after) {
        (Some(b), Some(a), Some(nb), Some(na)) => Some(Spent {
            client: a.cpu.0 - b.cpu.0,
            server: a.cpu.1 - b.cpu.1,
            kernel: a.kernel - b.kernel,
            profile,
            net: [
                netstat::delta(&nb[0], &na[0]),
                netstat::delta(&nb[1], &na[1]),
            ],
            sleeps: [
                a.sleeps.0.saturating_sub(b.sleeps.0),
                a.sleeps.1.saturating_sub(b.sleeps.1),
            ],
            machine,
        }),
        _ => None,
    };
    Ok((r, cpu))
}

/// The contenders `o` asks for, direct and ringtun first, and the topologies they run on:
/// direct and ringtun share the first, every other tunnel gets a pair of namespaces of its own
/// (all of them run at once, on the same ports).
pub fn line_up(o: &Opts, dir: &Path) -> Result<(Vec<TwoNodes>, Vec<Contender>), String> {
    let mut topos = vec![setup_topology("rtb", true, dir)?];
    let mut contenders = vec![
        Contender {
            name: DIRECT.into(),
            kind: Kind::Direct,
            topo: 0,
            target: Target {
                addr: SocketAddr::from((SERVER_IP, SERVER_PORT)),
                mark: DEFAULT_MARK,
            },
            wrap: Vec::new(),
        },
        Contender {
            name: "ringtun".into(),
            kind: Kind::Ringtun { extra: Vec::new() },
            topo: 0,
            target: Target {
                addr: SocketAddr::from((VIP, VIP_PORT)),
                mark: 0,
            },
            wrap: Vec::new(),
        },
    ];
    let mut add = |name: String, kind: Kind, prefix: &str| -> Result<(), String> {
        topos.push(setup_topology(prefix, true, dir)?);
        contenders.push(Contender {
            name,
            kind,
            topo: topos.len() - 1,
            target: Target {
                addr: SocketAddr::from((VIP, VIP_PORT)),
                mark: 0,
            },
            wrap: Vec::new(),
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
                        idle_memory: true,
                    },
                    "rtbz",
                )?;
            }
            "inpod" => add(
                "ringtun-inpod".into(),
                Kind::InPod { ztunnel: None },
                "rtbp",
            )?,
            "ztunnel-shared" => {
                let path = o.ztunnel.clone().unwrap_or_else(default_ztunnel);
                let path = path
                    .canonicalize()
                    .map_err(|e| format!("the ztunnel-shared contender needs {}: {e}", path.display()))?;
                add(
                    "ztunnel-shared".into(),
                    Kind::InPod {
                        ztunnel: Some(path),
                    },
                    "rtbzs",
                )?;
            }
            "bare-relay" => {
                // No TLS, no HTTP/2, a blocked thread per direction: what a relay hop costs
                // at the least.
                let path = sibling_binary(
                    "bare_relay",
                    "(the bare-relay contender: cargo build -p ringtun-benches --bin bare_relay)",
                )?;
                add(
                    "bare-relay".into(),
                    Kind::Other {
                        template: format!("{} {{side}}", path.display()),
                        env: String::new(),
                        unpooled_env: None,
                        idle_memory: false,
                    },
                    "rtbr",
                )?;
            }
            other => {
                return Err(format!(
                    "--contenders: unknown contender {other:?} (legacy, ztunnel, inpod, ztunnel-shared, bare-relay, none)"
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
                idle_memory: true,
            },
            "rtbo",
        )?;
    }
    Ok((topos, contenders))
}
