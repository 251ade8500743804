//! The throughput, latency, request/response and connection-rate test groups: each measures
//! one contender and pushes its figures into the results.

use std::net::IpAddr;
use std::time::Duration;

use ringtun_benches::load::{self, Dir, Target};
use ringtun_benches::report::{self, Results};
use ringtun_benches::stats;

use crate::contenders::{measured, start_side, start_tunnel, warm_up, Contender, Env, Kind, Spent};
use crate::crosscheck::crosscheck;
use crate::hops;
use crate::memory::memory_test;
use crate::netstat;
use crate::options::{wants, Opts, Plan};
use crate::procs::Tunnel;
use crate::profile::CATEGORIES;
use crate::{CONN_REPLY, CONN_REQ, GIB, MIB, RR_SIZE};

/// One measurement of one contender, with its tunnel (none for direct).
type Measure<'a> = dyn FnMut(&mut Results, &Contender, Option<&Tunnel>) -> Result<(), String> + 'a;

/// What every run of the test groups needs.
pub struct Bench<'a> {
    /// The command line.
    pub o: &'a Opts,
    /// Sizes and repetitions.
    pub plan: &'a Plan,
    /// Topologies, servers, files.
    pub env: &'a Env,
    /// Who is measured.
    pub contenders: &'a [Contender],
    /// Whether the iperf3/sockperf cross-checks run.
    pub crosscheck: bool,
}

impl Bench<'_> {
    /// One run: every wanted test group through every contender, contenders alternating
    /// measurement by measurement (in an order rotated by `run`, reversed on odd runs), then the
    /// scaling groups.
    pub fn run(&self, res: &mut Results, run: usize) -> Result<(), String> {
        let Bench {
            o,
            plan,
            env,
            contenders,
            crosscheck: with_crosscheck,
        } = *self;
        // `--only bulk` runs all four; `--only bulk-down1` (a profile of one direction) one.
        let bulk_all: Vec<_> = [(Dir::Up, 1), (Dir::Up, 4), (Dir::Down, 1), (Dir::Down, 4)]
            .into_iter()
            .filter(|&(d, s)| {
                let dir = if matches!(d, Dir::Up) { "up" } else { "down" };
                wants(o, "bulk") || wants(o, &format!("bulk-{dir}{s}"))
            })
            .collect();
        // Rotate the order so no contender always goes first, and reverse it on odd runs so
        // none always follows the same one (the contender after `direct` shares its topology
        // and load server right after the fastest transfer of the round).
        let mut order: Vec<usize> = (0..contenders.len())
            .map(|i| (i + run) % contenders.len())
            .collect();
        if run % 2 == 1 {
            order.reverse();
        }
        env.progress.stage(format!("run {}/{}", run + 1, plan.runs));
        env.progress.step("starting tunnels");
        let mut tunnels: Vec<Option<Tunnel>> = Vec::new();
        for c in contenders {
            tunnels.push(start_tunnel(env, c, o.workers, &[], None, "")?);
        }
        if wants(o, "memory") {
            for &i in &order {
                let skip = matches!(
                    contenders[i].kind,
                    Kind::Other {
                        idle_memory: false,
                        ..
                    }
                );
                if let (Some(t), false) = (&tunnels[i], skip) {
                    memory_test(env, res, run, &contenders[i], t, &plan.idle)?;
                }
            }
        }
        // Every group measures each contender in turn, with its tunnel (none for direct).
        let each = |res: &mut Results, f: &mut Measure| {
            order.iter().try_for_each(|&i| {
                let (c, t) = (&contenders[i], tunnels[i].as_ref());
                repeat_if_stolen(o, env, res, run, c, |res| f(res, c, t))
            })
        };
        for &which in &bulk_all {
            each(res, &mut |res, c, t| {
                bulk_tests(env, res, run, c, t, plan.bytes, "", &[which])
            })?;
        }
        if wants(o, "latency") {
            each(res, &mut |res, c, t| {
                latency_tests(env, res, run, c, t, plan.pingpongs)
            })?;
        }
        let rr_closed_on = wants(o, "rr") || wants(o, "rr-closed");
        let rr_fixed_on = wants(o, "rr") || wants(o, "rr-rate");
        if rr_closed_on || rr_fixed_on {
            let d = Duration::from_secs_f64(plan.secs);
            each(res, &mut |res, c, t| {
                if rr_closed_on {
                    rr_closed(env, res, run, c, t, d)?;
                }
                if rr_fixed_on {
                    rr_fixed(env, res, run, c, t, d, o.rate)?;
                }
                Ok(())
            })?;
        }
        if wants(o, "conn") {
            each(res, &mut |res, c, t| {
                let name = "conn rate pooled";
                let n = plan.conns;
                conn_test(env, res, run, c, t, name, n, o.conn_concurrency, &[], true)
            })?;
        }
        if with_crosscheck {
            for &i in &order {
                crosscheck(env, res, run, &contenders[i], plan.bytes);
            }
        }
        // Unpooled: restart the client sides with pooling defeated.
        if wants(o, "unpooled") {
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
                    Kind::InPod { ztunnel: None } => {
                        (vec!["--pool-idle-timeout-ms".into(), "1".into()], None)
                    }
                    Kind::InPod { ztunnel: Some(_) } => {
                        (Vec::new(), Some(crate::contenders::ZTUNNEL_UNPOOLED_ENV))
                    }
                };
                if let Some(t) = tunnels[i].as_mut() {
                    env.progress
                        .step(&format!("{}: restarting the client side unpooled", c.name));
                    t.client.stop();
                    t.client =
                        start_side(env, c, "client", o.workers, &extra, extra_env, "-unpooled")?;
                    warm_up(env, c)?;
                }
                let t = tunnels[i].as_ref();
                repeat_if_stolen(o, env, res, run, c, |res| {
                    conn_test(
                        env,
                        res,
                        run,
                        c,
                        t,
                        "conn rate unpooled",
                        plan.unpooled_conns,
                        o.conn_concurrency,
                        &env.sources,
                        c.kind.is_ringtun(),
                    )
                })?;
            }
        }
        drop(tunnels);
        if wants(o, "scaling") && !o.shards.is_empty() {
            for &k in &o.shards {
                let prefix = format!("shards={k} ");
                env.progress.stage(format!(
                    "run {}/{} scaling {k} shard(s)",
                    run + 1,
                    plan.runs
                ));
                let mut tunnels: Vec<Option<Tunnel>> = Vec::new();
                for c in contenders {
                    let scales = match &c.kind {
                        Kind::Other { template, env, .. } => {
                            template.contains("{workers}") || env.contains("{workers}")
                        }
                        _ => true,
                    };
                    tunnels.push(if scales {
                        start_tunnel(env, c, k, &[], None, "-scaling")?
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
                        env,
                        res,
                        run,
                        c,
                        tunnels[i].as_ref(),
                        plan.bytes,
                        &prefix,
                        &[(Dir::Up, 4), (Dir::Down, 4)],
                    )?;
                    conn_test(
                        env,
                        res,
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
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)] // one measurement's whole context, passed once
pub fn bulk_tests(
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
        let (took, cpu) = measured(env, c, tunnel, true, move |t| {
            load::bulk(t, dir, streams, bytes)
        })?;
        let mibs = bytes as f64 / MIB / took.as_secs_f64();
        res.push(run, &c.name, &test, "MiB/s", mibs, true);
        if let Some(spent) = cpu {
            let per = PerUnit {
                unit: "s/GiB",
                scale: GIB / bytes as f64,
                sides: true,
                count_unit: "per GiB",
                count_scale: GIB / bytes as f64,
            };
            push_cpu(res, run, c, &test, &per, &spent);
        }
    }
    Ok(())
}

pub fn latency_tests(
    env: &Env,
    res: &mut Results,
    run: usize,
    c: &Contender,
    tunnel: Option<&Tunnel>,
    n: usize,
) -> Result<(), String> {
    for (size, name) in [(1usize, "ping-pong 1 B"), (1024, "ping-pong 1 KiB")] {
        env.progress.step(&format!("{}: {name}", c.name));
        let (rtts, _) = measured(env, c, tunnel, false, move |t| {
            load::ping_pong(t, size, (n / 10).max(100), n)
        })?;
        res.push_rtts(run, &c.name, name, &rtts);
    }
    Ok(())
}

/// rr16 in a closed loop: req/s, RTT and the CPU per request (profiled with `--profile`).
fn rr_closed(
    env: &Env,
    res: &mut Results,
    run: usize,
    c: &Contender,
    tunnel: Option<&Tunnel>,
    d: Duration,
) -> Result<(), String> {
    let name = "rr16 closed loop 1 KiB";
    env.progress.step(&format!("{}: {name}", c.name));
    let (r, cpu) = measured(env, c, tunnel, true, move |t| {
        load::request_response(t, 16, RR_SIZE, d, None)
    })?;
    let rps = r.completed as f64 / r.elapsed.as_secs_f64();
    res.push(run, &c.name, name, "req/s", rps, true);
    push_p50_p99(res, run, c, name, "RTT", &r.rtts);
    if let Some(spent) = cpu {
        push_cpu(
            res,
            run,
            c,
            name,
            &PerUnit::per_request(r.completed, false),
            &spent,
        );
    }
    Ok(())
}

/// rr16 at a fixed rate: RTT, the latency added over direct, and the CPU per request.
fn rr_fixed(
    env: &Env,
    res: &mut Results,
    run: usize,
    c: &Contender,
    tunnel: Option<&Tunnel>,
    d: Duration,
    rate: f64,
) -> Result<(), String> {
    let name = format!("rr16 at {rate:.0} req/s 1 KiB");
    env.progress.step(&format!("{}: {name}", c.name));
    // The same load for the measured pass and, with --hops, the traced one.
    let at_rate = move |t: &Target| load::request_response(t, 16, RR_SIZE, d, Some(rate));
    let (r, cpu) = measured(env, c, tunnel, false, at_rate)?;
    res.push_rtts(run, &c.name, &name, &r.rtts);
    if let Some(spent) = cpu {
        // Not profiled (sampling would add to the latency), but the CPU and the sleeps per
        // request say how much of the added latency is work and how much is waking up.
        push_cpu(
            res,
            run,
            c,
            &name,
            &PerUnit::per_request(r.completed, true),
            &spent,
        );
    }
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
    if let (Some(dir), Some(tunnel)) = (&env.hops, tunnel) {
        // A pass of its own: tracing every wake-up and transmit slows what it measures.
        env.progress
            .step(&format!("{}: {name}, traced (--hops)", c.name));
        let (client, server) = tunnel.pids();
        let file = dir.join(format!("run{run}-{}.perf.data", c.name));
        let trace = hops::Trace::start(file, client, server)?;
        measured(env, c, None, false, at_rate)?;
        let hops = trace.finish(RR_SIZE as u32)?;
        hops.push(res, run, &c.name, &format!("{name}, traced hops"));
    }
    Ok(())
}

pub fn pool_new_count(t: Option<&Tunnel>) -> usize {
    t.map(|t| t.client.log_text().matches("pool=\"new\"").count())
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
pub fn conn_test(
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
    let (r, cpu) = measured(env, c, tunnel, true, move |t| {
        load::connection_rate(t, n, concurrency, CONN_REQ, CONN_REPLY, &sources)
    })?;
    r.any_completed(&c.name, name)?;
    res.push(
        run,
        &c.name,
        name,
        "conn/s",
        r.completed as f64 / r.elapsed.as_secs_f64(),
        true,
    );
    push_p50_p99(res, run, c, name, "conn time", &r.times);
    res.push(run, &c.name, name, "failed", r.failed as f64, false);
    if let Some(spent) = cpu {
        let per = PerUnit {
            unit: "s/1000 conns",
            scale: 1000.0 / r.completed as f64,
            sides: true,
            count_unit: "per 1000 conns",
            count_scale: 1000.0 / r.completed as f64,
        };
        push_cpu(res, run, c, name, &per, &spent);
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

/// Runs one measurement, and runs it again (up to `--steal-retries` more times) while the
/// host took more than `--steal-limit` CPUs from the machine during it: on a shared VM a
/// neighbour's burst is a slow phase of the host, not of the contender measured in it, and
/// one such run in three moves a median. Each repeat leaves a note in the report; a
/// measurement that never got under the limit keeps its last figures.
fn repeat_if_stolen(
    o: &Opts,
    env: &Env,
    res: &mut Results,
    run: usize,
    c: &Contender,
    mut f: impl FnMut(&mut Results) -> Result<(), String>,
) -> Result<(), String> {
    let mut attempt = 0;
    loop {
        let mark = res.mark();
        f(res)?;
        // Measurements without a CPU reading (direct, the latency tests) are never repeated.
        let stolen = match res.stolen_since(&mark) {
            Some(st) if st > o.steal_limit && attempt < o.steal_retries => st,
            _ => return Ok(()),
        };
        attempt += 1;
        let tests = res.stolen_tests_since(&mark, o.steal_limit);
        res.roll_back(&mark);
        let what = format!(
            "{} measured again ({attempt} of at most {}): the host took {stolen:.2} CPUs during {} (limit {})",
            c.name,
            o.steal_retries,
            tests.join(", "),
            o.steal_limit
        );
        env.progress.step(&what);
        res.notes.push(format!("run {}: {what}", run + 1));
    }
}

/// How a measurement's CPU seconds become a figure per unit of work.
struct PerUnit {
    /// The unit in the metric's name, e.g. `s/GiB`.
    unit: &'static str,
    /// Seconds times this is the figure.
    scale: f64,
    /// Also the client and server sides on their own.
    sides: bool,
    /// The unit counts are given in, e.g. `per GiB`.
    count_unit: &'static str,
    /// A count times this is the figure.
    count_scale: f64,
}

impl PerUnit {
    /// CPU in µs and counts per request, over `completed` requests.
    fn per_request(completed: u64, sides: bool) -> Self {
        let n = completed.max(1) as f64;
        PerUnit {
            unit: "µs/req",
            scale: 1e6 / n,
            sides,
            count_unit: "per req",
            count_scale: 1.0 / n,
        }
    }
}

/// Pushes a measurement's CPU per unit: the pair's kernel part, the pair, the sides if asked,
/// and with `--profile` the pair's CPU in each category of the profile.
fn push_cpu(
    res: &mut Results,
    run: usize,
    c: &Contender,
    test: &str,
    per: &PerUnit,
    spent: &Spent,
) {
    let u = per.unit;
    let pair = (spent.client + spent.server) * per.scale;
    let mut push = |metric: String, v: f64| res.push(run, &c.name, test, &metric, v, false);
    push(format!("CPU {u} (pair, kernel)"), spent.kernel * per.scale);
    push(format!("CPU {u} (pair)"), pair);
    if per.sides {
        push(format!("CPU {u} (client)"), spent.client * per.scale);
        push(format!("CPU {u} (server)"), spent.server * per.scale);
    }
    for (side, n) in ["client", "server"].iter().zip(spent.sleeps) {
        push(
            format!("sleeps {} ({side})", per.count_unit),
            n as f64 * per.count_scale,
        );
    }
    if let Some((busy, stolen)) = spent.machine {
        push("machine CPUs busy".into(), busy);
        push(report::STOLEN.into(), stolen);
    }
    for (side, values) in ["client", "server"].iter().zip(&spent.net) {
        for ((_, name), v) in netstat::COUNTERS.iter().zip(values) {
            push(
                format!("TCP {name} {} ({side} ns)", per.count_unit),
                *v as f64 * per.count_scale,
            );
        }
    }
    if let Some(p) = &spent.profile {
        let (c, s) = (p.client.fractions(), p.server.fractions());
        for (i, name) in CATEGORIES.iter().enumerate() {
            let (client, server) = (spent.client * c[i], spent.server * s[i]);
            push(
                format!("CPU {u} (pair) {name}"),
                (client + server) * per.scale,
            );
            if per.sides {
                push(format!("CPU {u} (client) {name}"), client * per.scale);
                push(format!("CPU {u} (server) {name}"), server * per.scale);
            }
        }
    }
}

/// Pushes the median and the 99th percentile of `samples` (µs) as `WHAT p50 µs` and
/// `WHAT p99 µs`.
fn push_p50_p99(
    res: &mut Results,
    run: usize,
    c: &Contender,
    test: &str,
    what: &str,
    samples: &[f64],
) {
    let s = stats::sorted(samples);
    for (p, q) in [("p50", 0.5), ("p99", 0.99)] {
        let metric = format!("{what} {p} µs");
        res.push(run, &c.name, test, &metric, stats::quantile(&s, q), false);
    }
}
