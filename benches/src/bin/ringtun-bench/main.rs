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

mod contenders;
mod crosscheck;
mod groups;
mod hops;
mod instructions;
mod memory;
mod netstat;
mod options;
mod perf;
mod procs;
mod profile;
mod progress;
mod setup;
mod summary;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use clap::Parser;
use ringtun_benches::report::Results;
use ringtun_testbed::{certs, sys};

use crate::contenders::Env;
use crate::options::{counts_instructions, runs_timed, wants, Opts, Plan};
use crate::progress::Progress;

/// Bytes in a MiB, as a float for rates.
pub const MIB: f64 = 1024.0 * 1024.0;
/// Bytes in a GiB.
pub const GIB: f64 = 1024.0 * MIB;
/// Load-generator server port (the service's target port).
pub const SERVER_PORT: u16 = 5201;
/// Service VIP and port in front of the server workload.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The service port on the VIP.
pub const VIP_PORT: u16 = 80;
/// The server workload's address.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// iperf3 and sockperf servers: tunnelled through the VIP on these ports…
pub const IPERF_PORT: u16 = 5202;
/// The tunnelled sockperf port.
pub const SOCKPERF_PORT: u16 = 11111;
/// …and reached directly on these, which the capture leaves alone.
pub const IPERF_DIRECT_PORT: u16 = 5203;
/// The direct sockperf port.
pub const SOCKPERF_DIRECT_PORT: u16 = 11112;
/// Source addresses rotated through by the unpooled connection-rate test (added to the client
/// namespace's loopback): a tunnel pools per source address, so each connection needs a new
/// HBONE connection when no address repeats within the pool's idle sweep.
pub const UNPOOLED_SOURCES: u32 = 1024;
/// Size of the request/response messages on the 16 kept-alive connections.
pub const RR_SIZE: usize = 1024;
/// Request size of the connection-rate tests.
pub const CONN_REQ: usize = 64;
/// Reply size of the connection-rate tests.
pub const CONN_REPLY: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(memory::IDLE_CHILD) {
        std::process::exit(memory::idle_child_main(&args[2..]));
    }
    let o = Opts::parse();
    ringtun_benches::load::set_defer_taskrun(o.load_ring == options::LoadRing::Defer);
    procs::install_signal_cleanup();
    if let Err(e) = run(o) {
        eprintln!("\nringtun-bench: {e}");
        std::process::exit(1);
    }
}

/// The whole benchmark: set-up, every run, the report.
fn run(o: Opts) -> Result<(), String> {
    options::check_only(&o)?;
    ringtun_testbed::require_root().map_err(|e| e.to_string())?;
    let plan = Plan::new(&o);
    let nofile = sys::raise_nofile(1 << 18);
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
        None => setup::build_ringtun()?,
    };
    let meta = setup::machine_meta(&o, &ringtun);
    let out = o.out.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/ringtun-bench")
            .join(meta.date.replace(':', ""))
    });
    let dir = out.join("work");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let profiles = o.profile.then(|| profile::prepare(&dir)).transpose()?;
    let traces = o.hops.then(|| hops::prepare(&dir)).transpose()?;
    let counting = counts_instructions(&o)
        .then(|| instructions::prepare(&dir))
        .transpose()?;
    let certs = dir.join("certs");
    certs::write_workload_certs(
        &certs,
        "cluster.local",
        &["default/client", "default/server"],
    )
    .map_err(|e| e.to_string())?;
    let config = dir.join("config.yaml");
    std::fs::write(&config, setup::config_text()).map_err(|e| e.to_string())?;

    let (topos, contenders) = contenders::line_up(&o, &dir)?;
    let servers = topos
        .iter()
        .map(setup::start_server)
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
            .map(|i| IpAddr::V4(setup::source_ip(i)))
            .collect(),
        progress: Progress::new(),
        profile: profiles.map(|d| (d, Default::default())),
        hops: traces,
    };
    let mut helpers = Vec::new();
    let crosscheck_on = !o.no_crosscheck
        && wants(&o, "crosscheck")
        && (crosscheck::have("iperf3") || crosscheck::have("sockperf"));
    if crosscheck_on {
        crosscheck::start_servers(&env, &mut helpers);
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
        "ringtun-bench: {} run(s); bulk {} MiB; ping-pong {} round trips; rr {} s at {} req/s; {} pooled / {} unpooled connections; idle {:?}; load generators' ring: {:?}",
        plan.runs,
        plan.bytes >> 20,
        plan.pingpongs,
        plan.secs,
        o.rate,
        plan.conns,
        plan.unpooled_conns,
        plan.idle,
        o.load_ring
    );
    eprintln!("{header}");
    eprintln!("ringtun-bench: work files in {}", dir.display());

    let bench = groups::Bench {
        o: &o,
        plan: &plan,
        env: &env,
        contenders: &contenders,
        crosscheck: crosscheck_on,
    };
    if runs_timed(&o) {
        for run in 0..plan.runs {
            bench.run(&mut res, run)?;
        }
    }
    if let Some(pass) = &counting {
        pass.count(&env, &plan, &contenders, o.workers, &mut res)?;
    }
    env.progress.done();
    drop(helpers);
    summary::finish(&mut res, plan.runs, &header, &out)
}
