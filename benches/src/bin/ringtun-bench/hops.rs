//! `--hops`: where the fixed-rate test's added latency goes, hop by hop.
//!
//! A request through a tunnel pair crosses four tunnel hops: the client side takes it from the
//! application and sends it on HBONE, the server side takes it from HBONE to the application,
//! and the answer goes back the same way. At a fixed rate nearly every hop starts with the
//! tunnel asleep, so each one is: the packet reaching the tunnel (the sender's transmit until
//! the kernel wakes the tunnel's thread), the wait for a CPU (woken until running), and the
//! tunnel's own work (running until it transmits the message on). The first and second are the
//! kernel's and the scheduler's; the third is the tunnel's code plus the system calls it makes.
//!
//! `perf record -a` of three tracepoints (`sched:sched_waking`, `sched:sched_switch`,
//! `net:net_dev_xmit`) during a second, traced pass of the test gives all three: a hop is a
//! tunnel thread's first transmit of a message-sized packet after it was switched in, having
//! been woken while asleep; its sender's transmit is the last message-sized one by another
//! thread before the wake-up. Transmits on `lo` go to the application, any other device is the
//! HBONE leg between the two namespaces. Hops that did not start from a sleep are not counted
//! (the tunnel was already running: no wake-up to split), nor are hops during which the tunnel
//! was preempted before its transmit (their work would include another task's).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};

use ringtun_benches::report::Results;
use ringtun_benches::stats;

use crate::perf::{self, PerfRecord};

/// The tracepoints recorded.
const EVENTS: [&str; 3] = [
    "sched:sched_waking",
    "sched:sched_switch",
    "net:net_dev_xmit",
];
/// `perf script` fields parsed by [`Hops::from_script`].
const FIELDS: &str = "comm,pid,tid,cpu,time,event,trace";
/// A sender's transmit further back than this before the wake-up is not the hop's.
const MAX_DELIVERY_US: f64 = 2_000.0;

/// The four hops of a request and its answer, in the order a message takes them.
pub const HOPS: [&str; 4] = [
    "hop 1 app → client → HBONE",
    "hop 2 HBONE → server → app",
    "hop 3 app → server → HBONE",
    "hop 4 HBONE → client → app",
];
/// The parts of a hop, in the order of [`Hop`]'s fields.
pub const PARTS: [&str; 4] = [
    "to the tunnel",
    "wait for a CPU",
    "tunnel's work",
    "whole hop",
];

/// Checks that perf is there and makes the traces' directory under `work`.
pub fn prepare(work: &Path) -> Result<PathBuf, String> {
    perf::check("--hops")?;
    let dir = work.join("hops");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// One hop, in µs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hop {
    /// From the sender's transmit until the tunnel thread was woken.
    pub delivery: f64,
    /// From the wake-up until the thread ran.
    pub wait: f64,
    /// From running until its transmit of the message.
    pub work: f64,
}

impl Hop {
    /// The parts in the order of [`PARTS`].
    pub fn parts(&self) -> [f64; 4] {
        [
            self.delivery,
            self.wait,
            self.work,
            self.delivery + self.wait + self.work,
        ]
    }
}

/// A system-wide trace of one measurement.
pub struct Trace {
    perf: PerfRecord,
    client: Vec<u32>,
    server: Vec<u32>,
}

impl Trace {
    /// Starts tracing the whole machine into `file`; `client` and `server` are the tunnel
    /// sides' processes.
    pub fn start(file: PathBuf, client: Vec<u32>, server: Vec<u32>) -> Result<Trace, String> {
        let mut args = vec!["-a"];
        for e in EVENTS {
            args.extend(["-e", e]);
        }
        let perf = PerfRecord::start(&args, file).map_err(|e| format!("--hops: {e}"))?;
        Ok(Trace {
            perf,
            client,
            server,
        })
    }

    /// Stops tracing and splits the hops of messages of at least `min_len` bytes.
    pub fn finish(self, min_len: u32) -> Result<Hops, String> {
        let text = self.perf.finish(FIELDS)?;
        let hops = Hops::from_script(&text, &self.client, &self.server, min_len);
        if hops.by_kind.iter().any(Vec::is_empty) {
            return Err(format!(
                "--hops: a hop kind without a single hop ({} counted): not a tunnel pair on the benchmark topology?",
                hops.by_kind.iter().map(Vec::len).sum::<usize>()
            ));
        }
        Ok(hops)
    }
}

/// The hops of one traced measurement, by kind (see [`HOPS`]).
#[derive(Debug, Default)]
pub struct Hops {
    /// Hops of each kind.
    pub by_kind: [Vec<Hop>; 4],
}

impl Hops {
    /// Records p50 and p90 of each part of each hop kind, and how many hops were split.
    pub fn push(&self, res: &mut Results, run: usize, contender: &str, test: &str) {
        for (kind, hops) in HOPS.iter().zip(&self.by_kind) {
            res.push(
                run,
                contender,
                test,
                &format!("{kind}: hops split"),
                hops.len() as f64,
                true,
            );
            for (i, part) in PARTS.iter().enumerate() {
                let v = stats::sorted(&hops.iter().map(|h| h.parts()[i]).collect::<Vec<_>>());
                for (q, at) in [("p50", 0.5), ("p90", 0.9)] {
                    res.push(
                        run,
                        contender,
                        test,
                        &format!("{kind}: {part} {q} µs"),
                        stats::quantile(&v, at),
                        false,
                    );
                }
            }
        }
    }
}

/// One parsed line of `perf script -F comm,pid,tid,cpu,time,event,trace`.
#[derive(Debug, PartialEq)]
struct Event<'a> {
    pid: u32,
    tid: u32,
    /// µs.
    time: f64,
    name: &'a str,
    trace: &'a str,
}

impl<'a> Event<'a> {
    /// `  COMM PID/TID [CPU] SECS.USECS: EVENT: TRACE`; the command name may hold spaces.
    fn parse(line: &'a str) -> Option<Event<'a>> {
        let open = line.find(" [")?;
        let close = open + line[open..].find("] ")?;
        let (pid, tid) = line[..open]
            .trim_end()
            .rsplit_once(' ')?
            .1
            .split_once('/')?;
        let rest = line[close + 2..].trim_start();
        let (time, rest) = rest.split_once(": ")?;
        let (name, trace) = rest
            .split_once(": ")
            .unwrap_or((rest.trim_end_matches(':'), ""));
        Some(Event {
            pid: pid.parse().ok()?,
            tid: tid.parse().ok()?,
            time: micros(time.trim())?,
            name: name.trim(),
            trace,
        })
    }
}

/// `SECS.FRACTION` as µs, exact for perf's 6 (µs) or 9 (ns) decimals, so that differences of
/// two times carry no rounding.
fn micros(t: &str) -> Option<f64> {
    let (secs, frac) = t.split_once('.').unwrap_or((t, ""));
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: u64 = format!("{frac:0<9}").parse().ok()?;
    let ns = secs
        .parse::<u64>()
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(nanos)?;
    Some((ns / 1_000) as f64 + (ns % 1_000) as f64 / 1_000.0)
}

/// The number after `key` in a tracepoint's text (`key` includes its `=`).
fn field<T: std::str::FromStr>(trace: &str, key: &str) -> Option<T> {
    let at = trace.find(key)? + key.len();
    let rest = &trace[at..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A thread's scheduling state while the trace is read.
#[derive(Default)]
struct Thread {
    /// Switched out not runnable (waiting), and not switched in since.
    asleep: bool,
    /// Woken while asleep, at this time (cleared when it runs).
    woken: Option<f64>,
    /// (woken, switched in) of the run it is in, if that run began with a wake-up.
    running_since: Option<(f64, f64)>,
}

impl Hops {
    /// Splits the hops in `text` (`perf script -F comm,pid,tid,cpu,time,event,trace`, time
    /// order); `client` and `server` are the two sides' processes, `min_len` the size from
    /// which a transmit is a message.
    pub fn from_script(text: &str, client: &[u32], server: &[u32], min_len: u32) -> Hops {
        let mut hops = Hops::default();
        let mut threads: HashMap<u32, Thread> = HashMap::new();
        let mut recent: VecDeque<(f64, u32)> = VecDeque::new();
        for e in text.lines().filter_map(Event::parse) {
            match e.name {
                "sched:sched_switch" => {
                    // The previous task is the event's own; asleep unless still runnable.
                    let state = e.trace.split("prev_state=").nth(1).unwrap_or("R");
                    let prev = threads.entry(e.tid).or_default();
                    prev.asleep = !state.starts_with('R');
                    prev.running_since = None;
                    if let Some(next) = e
                        .trace
                        .split("==>")
                        .nth(1)
                        .and_then(|n| field(n, "next_pid="))
                    {
                        let t = threads.entry(next).or_default();
                        t.running_since = t.woken.take().map(|w| (w, e.time));
                        t.asleep = false;
                    }
                }
                "sched:sched_waking" => {
                    let woken = field::<u32>(e.trace, " pid=").and_then(|p| threads.get_mut(&p));
                    if let Some(t) = woken.filter(|t| t.asleep) {
                        t.woken = Some(e.time);
                    }
                }
                "net:net_dev_xmit" => {
                    if field::<u32>(e.trace, "len=").unwrap_or(0) < min_len {
                        continue;
                    }
                    let is_client = client.contains(&e.pid);
                    if is_client || server.contains(&e.pid) {
                        let t = threads.entry(e.tid).or_default();
                        // Only the first message transmitted after a wake-up is that hop's.
                        if let Some((woken, ran)) = t.running_since.take() {
                            let sender = recent
                                .iter()
                                .rev()
                                .find(|&&(at, tid)| tid != e.tid && at <= woken);
                            if let Some(&(sent, _)) = sender {
                                if woken - sent <= MAX_DELIVERY_US {
                                    let to_app = e.trace.starts_with("dev=lo ");
                                    let kind = match (is_client, to_app) {
                                        (true, false) => 0,
                                        (false, true) => 1,
                                        (false, false) => 2,
                                        (true, true) => 3,
                                    };
                                    hops.by_kind[kind].push(Hop {
                                        delivery: woken - sent,
                                        wait: ran - woken,
                                        work: e.time - ran,
                                    });
                                }
                            }
                        }
                    }
                    recent.push_back((e.time, e.tid));
                    if recent.len() > 64 {
                        recent.pop_front();
                    }
                }
                _ => {}
            }
        }
        hops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A perf script line as perf 6.1 prints it, by thread `pid/tid`, at `us`.
    fn line(pid: u32, tid: u32, us: u64, event: &str, trace: &str) -> String {
        let (s, frac) = (us / 1_000_000, us % 1_000_000);
        format!(
            "{:>16} {pid}/{tid} [001] {s}.{frac:06}: {event}: {trace}\n",
            "comm"
        )
    }

    /// Thread `tid` of `pid` switches to `next`, itself going to sleep unless `state` is R.
    fn switch(pid: u32, tid: u32, us: u64, state: &str, next: u32) -> String {
        let t = format!("prev_comm=x prev_pid={tid} prev_prio=120 prev_state={state} ==> next_comm=y next_pid={next} next_prio=120");
        line(pid, tid, us, "sched:sched_switch", &t)
    }

    fn waking(pid: u32, tid: u32, us: u64, woken: u32) -> String {
        let t = format!("comm=w pid={woken} prio=120 target_cpu=001");
        line(pid, tid, us, "sched:sched_waking", &t)
    }

    fn xmit(pid: u32, tid: u32, us: u64, dev: &str, len: u32) -> String {
        let t = format!("dev={dev} skbaddr=0x1 len={len} rc=0");
        line(pid, tid, us, "net:net_dev_xmit", &t)
    }

    #[test]
    fn parses_a_line_whose_command_name_has_spaces() {
        let l = "    Timer thread 7/9 [000] 5.000123: sched:sched_waking: comm=a pid=3 prio=120";
        let e = Event::parse(l).expect("parses");
        assert_eq!((e.pid, e.tid, e.name), (7, 9, "sched:sched_waking"));
        assert_eq!(e.time, 5_000_123.0);
        assert_eq!(field::<u32>(e.trace, " pid="), Some(3));
        assert_eq!(micros("5.000123456"), Some(5_000_123.456));
        assert_eq!(micros("5.x"), None);
    }

    /// The app (pid 50) sends a request; the client side's thread (pid 10, tid 11) sleeps,
    /// is woken, runs and sends it on HBONE; then the server side's (pid 20, tid 21) takes it
    /// to the app; then the client's thread sends again without having slept (not a hop).
    #[test]
    fn splits_each_hop_into_delivery_wait_and_work() {
        let s = [
            switch(10, 11, 1_000, "S", 0),
            switch(20, 21, 1_010, "S", 0),
            xmit(50, 51, 2_000, "lo", 1090),
            waking(50, 51, 2_006, 11),
            switch(50, 51, 2_040, "S", 11),
            // An ACK is not a message.
            xmit(10, 11, 2_045, "eth0", 66),
            xmit(10, 11, 2_052, "eth0", 1121),
            waking(10, 11, 2_060, 21),
            switch(0, 0, 2_070, "R", 21),
            xmit(20, 21, 2_091, "lo", 1090),
            xmit(10, 11, 2_100, "eth0", 1121),
        ]
        .concat();
        let hops = Hops::from_script(&s, &[10], &[20], 1024);
        let first = Hop {
            delivery: 6.0,
            wait: 34.0,
            work: 12.0,
        };
        assert_eq!(hops.by_kind[0], vec![first]);
        // The client's transmit at 2,052 reached the server side, woken at 2,060.
        let second = Hop {
            delivery: 8.0,
            wait: 10.0,
            work: 21.0,
        };
        assert_eq!(hops.by_kind[1], vec![second]);
        assert!(hops.by_kind[2].is_empty() && hops.by_kind[3].is_empty());
        assert_eq!(first.parts()[3], 52.0);
    }

    #[test]
    fn a_thread_woken_while_running_starts_no_hop() {
        let s = [
            xmit(50, 51, 2_000, "lo", 1090),
            // Preempted (still runnable), so the wake-up below finds it not asleep.
            switch(10, 11, 2_001, "R", 51),
            waking(50, 51, 2_006, 11),
            switch(50, 51, 2_040, "S", 11),
            xmit(10, 11, 2_052, "eth0", 1121),
        ]
        .concat();
        let hops = Hops::from_script(&s, &[10], &[20], 1024);
        assert!(hops.by_kind.iter().all(Vec::is_empty));
    }
}
