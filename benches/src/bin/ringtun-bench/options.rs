//! The command line, and the plan it makes: sizes with their quick/full defaults, and which
//! test groups run.

use std::path::PathBuf;

use clap::Parser;

/// The load generators' io_uring setup (`--load-ring`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadRing {
    /// `SINGLE_ISSUER | DEFER_TASKRUN`: completions are produced when the generator waits.
    Defer,
    /// No setup flag: every completion interrupts the generator thread.
    Interrupt,
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "ringtun-bench",
    about = "ringtun vs direct TCP (vs another tunnel) on a two-namespace topology: throughput, latency, connection rate, CPU, memory"
)]
pub struct Opts {
    /// Smoke-test sizes (about 2 minutes): 1 run, 64 MiB transfers, 1,000 idle connections.
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of every measurement (contenders alternate within each) [default: 3, quick 1].
    #[arg(long)]
    pub runs: Option<usize>,
    /// Bytes per bulk transfer, e.g. 512M, 1G [default: 512M, quick 64M].
    #[arg(long, value_parser = parse_size)]
    pub bytes: Option<u64>,
    /// Where results.json, report.html, the plots and the work files (certificates, config,
    /// tunnel logs) go [default: target/ringtun-bench/<date>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// ringtun binary to test [default: build it with `cargo build --release -p ringtun`].
    #[arg(long)]
    pub ringtun: Option<PathBuf>,
    /// `ringtun run --workers` for the main comparison.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Scaling: also measure throughput and connection rate with each of these shard counts
    /// (e.g. 1,2,4).
    #[arg(long, value_delimiter = ',')]
    pub shards: Vec<usize>,
    /// Keep ringtun's own shard pinning. By default ringtun runs with --no-pin here: both
    /// "nodes" share this machine, and pinning would put both tunnels' first shard on CPU 0.
    #[arg(long)]
    pub pin: bool,
    /// Another tunnel to compare, as a command template run in each namespace through
    /// `sh -c 'exec …'`; placeholders: {side} {ns} {config} {dir} {certs} {cert_chain} {key}
    /// {roots} {workload} {workload_info} {sa} {ip} {workers} {trust_domain}.
    #[arg(long)]
    pub other_tunnel: Option<String>,
    /// Environment of the other tunnel, `K=V,K=V` with the same placeholders, e.g.
    /// 'PROXY_MODE=dedicated,PROXY_WORKLOAD_INFO={workload_info},LOCAL_XDS_PATH={config}'.
    #[arg(long, default_value = "")]
    pub other_env: String,
    /// Name of the other tunnel in the report.
    #[arg(long, default_value = "other")]
    pub other_name: String,
    /// Extra environment (`K=V,…`) that makes the other tunnel's client side close idle pooled
    /// connections at once; when given, the unpooled connection-rate test runs for it too.
    #[arg(long)]
    pub other_unpooled_env: Option<String>,
    /// Built-in contenders beside direct and ringtun: `legacy` (the same ringtun binary with
    /// `--io-driver legacy`, epoll), `ztunnel` (Istio's, from --ztunnel), `inpod` and
    /// `ztunnel-shared` (each in in-pod mode), `bare-relay` (no TLS or HTTP/2: what a relay hop
    /// costs at the least, for the latency tests); `none` for none.
    #[arg(long, value_delimiter = ',', default_value = "legacy,ztunnel")]
    pub contenders: Vec<String>,
    /// Another contender that is the same ringtun with extra `ringtun run` arguments, as
    /// `NAME=ARG ARG…` (repeatable), e.g. `coop=--uring-taskrun coop`: A/B of one flag in one run.
    #[arg(long)]
    pub variant: Vec<String>,
    /// The ztunnel binary for the `ztunnel` contender [default: ../shared/ztunnel/ztunnel
    /// beside the workspace].
    #[arg(long)]
    pub ztunnel: Option<PathBuf>,
    /// Idle tunnelled connections to hold open for the memory test [default: 1000,10000;
    /// quick 1000].
    #[arg(long, value_delimiter = ',')]
    pub idle_conns: Option<Vec<usize>>,
    /// The load generators' io_uring setup: `defer` (completion work waits for the generator's
    /// own `io_uring_enter`, as in ringtun's shards) or `interrupt` (the kernel's default, an
    /// interrupt per completion: the generators before round 24). The generators share the
    /// CPUs with the tunnels, so what they waste narrows every ratio.
    #[arg(long, value_enum, default_value_t = LoadRing::Defer)]
    pub load_ring: LoadRing,
    /// A measurement during which the host took more than this many CPUs from the machine
    /// (`machine CPUs stolen`, from /proc/stat) is measured again, at most `--steal-retries`
    /// more times; each repeat is noted in the report.
    #[arg(long, default_value_t = 0.05)]
    pub steal_limit: f64,
    /// How many times one measurement may be repeated for the host's steal (0: never).
    #[arg(long, default_value_t = 2)]
    pub steal_retries: usize,
    /// Request rate (req/s over 16 connections) of the fixed-rate latency test.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Round trips per ping-pong test [default: 20000, quick 3000].
    #[arg(long)]
    pub pingpongs: Option<usize>,
    /// Seconds per request/response test [default: 3, quick 1].
    #[arg(long)]
    pub secs: Option<f64>,
    /// Connections per pooled connection-rate test [default: 10000, quick 2000].
    #[arg(long)]
    pub conns: Option<u64>,
    /// Connections per unpooled connection-rate test [default: 2000, quick 500].
    #[arg(long)]
    pub unpooled_conns: Option<u64>,
    /// Connections in flight in the connection-rate tests.
    #[arg(long, default_value_t = 16)]
    pub conn_concurrency: usize,
    /// Where the CPU went: `perf record` on both tunnel processes during every measurement
    /// that counts CPU, and that CPU per unit split into user (crypto, memory copies, rest) and
    /// kernel (copies, network stack, scheduler, syscalls/io_uring/epoll, rest) rows. Needs
    /// perf; the recordings stay in the work directory.
    #[arg(long)]
    pub profile: bool,
    /// Where the fixed-rate test's added latency goes: after that test, run it once more
    /// while `perf record -a` traces wake-ups and transmits, and split each of the four tunnel
    /// hops into delivery, the wait for a CPU and the tunnel's own work (p50 and p90 µs per
    /// hop; tracing slows that pass, so it has figures of its own). Needs perf.
    #[arg(long)]
    pub hops: bool,
    /// Userspace instructions per unit, counted rather than timed: after the runs, each tunnel
    /// runs once more under `valgrind --tool=callgrind` (ringtun on its epoll driver, as
    /// valgrind cannot run io_uring) and its instructions are counted per request of rr16 at
    /// 200 req/s, per pooled connection opened one at a time, and per second idle. Repeats
    /// within about 1%, where timed CPU figures move by 10%. Needs valgrind. `--only
    /// instructions` runs this pass alone.
    #[arg(long)]
    pub instructions: bool,
    /// Skip the iperf3/sockperf cross-checks even when they are installed.
    #[arg(long)]
    pub no_crosscheck: bool,
    /// Only these groups: bulk, latency, rr, conn, unpooled, memory, scaling, crosscheck,
    /// instructions (off unless named here or asked for with --instructions); or one bulk case:
    /// bulk-up1, bulk-up4, bulk-down1, bulk-down4; or one rr test: rr-closed, rr-rate.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Extra `ringtun run` arguments (after `--`).
    #[arg(last = true)]
    pub ringtun_args: Vec<String>,
}

pub fn parse_size(s: &str) -> Result<u64, String> {
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
pub struct Plan {
    pub runs: usize,
    pub bytes: u64,
    pub pingpongs: usize,
    pub secs: f64,
    pub conns: u64,
    pub unpooled_conns: u64,
    pub idle: Vec<usize>,
}

impl Plan {
    /// The plan for `o`: its sizes, or the quick or full defaults.
    pub fn new(o: &Opts) -> Plan {
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

/// Every name `--only` takes.
pub const GROUPS: &[&str] = &[
    "bulk",
    "bulk-up1",
    "bulk-up4",
    "bulk-down1",
    "bulk-down4",
    "latency",
    "rr",
    "rr-closed",
    "rr-rate",
    "conn",
    "unpooled",
    "memory",
    "scaling",
    "crosscheck",
    "instructions",
];

/// Refuses an `--only` name that selects nothing (a typo would otherwise run an empty
/// benchmark and write an empty report).
pub fn check_only(o: &Opts) -> Result<(), String> {
    match o.only.iter().find(|g| !GROUPS.contains(&g.as_str())) {
        Some(g) => Err(format!(
            "--only {g}: no such group (one of: {})",
            GROUPS.join(", ")
        )),
        None => Ok(()),
    }
}

pub fn wants(o: &Opts, group: &str) -> bool {
    o.only.is_empty() || o.only.iter().any(|g| g == group)
}

/// Whether the callgrind pass runs: asked for, or named by `--only`.
pub fn counts_instructions(o: &Opts) -> bool {
    o.instructions || o.only.iter().any(|g| g == "instructions")
}

/// Whether the timed runs happen: not when `--only instructions` asks for the callgrind pass
/// alone.
pub fn runs_timed(o: &Opts) -> bool {
    o.only.is_empty() || o.only.iter().any(|g| g != "instructions")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn only(list: &str) -> Result<(), String> {
        let o =
            Opts::try_parse_from(["ringtun-bench", "--only", list]).map_err(|e| e.to_string())?;
        check_only(&o)
    }

    #[test]
    fn only_takes_every_group_and_refuses_a_typo_by_name() {
        assert_eq!(only(&GROUPS.join(",")), Ok(()));
        let e = only("rr-rate,bulk-up2").expect_err("bulk-up2 selects nothing");
        assert!(e.starts_with("--only bulk-up2: no such group"), "{e}");
    }

    #[test]
    fn the_two_rr_tests_can_be_chosen_apart() {
        let o = Opts::try_parse_from(["ringtun-bench", "--only", "rr-rate"]).expect("parses");
        assert!(wants(&o, "rr-rate") && !wants(&o, "rr-closed") && !wants(&o, "rr"));
    }
}
