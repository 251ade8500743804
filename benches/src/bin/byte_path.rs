//! byte_path: what the demo topology's byte path costs, in syscalls, bytes per syscall, CPU and
//! throughput.
//!
//! Builds the demo topology (two network namespaces joined by a veth pair, nftables outbound
//! capture in the client one; see `deploy/demo.sh`), starts two `ringtun run --workers 1`
//! processes, an echo server in the server namespace, and then sends `--bytes` through the
//! service VIP 10.96.0.10:80 (outbound capture 15001 → HBONE 15008 → echo :5201 and back),
//! `--runs` times over fresh connections, checking every echoed byte.
//!
//! Without `--strace` it reports throughput and the CPU time (utime+stime from
//! `/proc/<pid>/stat`) each ringtun process spent per GiB carried. With `--strace` each ringtun
//! runs under `strace -f -yy` and the report is the count and size of every socket syscall, per
//! side (client ringtun / server ringtun), per socket (plaintext or HBONE, i.e. port 15008) and
//! per MiB; CPU and throughput are then meaningless (strace stops the process at every call)
//! and not reported. With `--perf`, `perf stat` counts the same syscalls with tracepoints
//! during the measured runs only, which barely slows the processes, as a check that strace's
//! slow-down did not change how bytes batch into calls.
//!
//! ```text
//! cargo build --release -p ringtun -p ringtun-benches
//! target/release/byte_path --driver legacy [--bytes 67108864] [--runs 5] [--strace]
//!     [--perf] [--keep DIR] [--ringtun PATH] [-- EXTRA RINGTUN ARGS]
//! ```
//! Needs root (namespaces, nftables), and `strace` for `--strace`. Namespaces and processes
//! are removed on exit.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ringtun_testbed::{
    certs, ringtun, sys, EchoServer, Netns, Process, RunFiles, TwoNodes, DEMO_CONFIG,
};

const MIB: f64 = 1024.0 * 1024.0;
/// The pattern the client sends over and over; a length that is not a power of two so that
/// chunk boundaries wander through it.
const PATTERN_LEN: usize = 1024 * 1024 + 7;
/// Syscalls recorded under --strace (the socket data calls plus the two ways to wait).
const TRACED: &str =
    "trace=read,write,recvfrom,sendto,readv,writev,sendmsg,recvmsg,epoll_wait,epoll_pwait,io_uring_enter";

struct Opts {
    bytes: usize,
    runs: usize,
    driver: String,
    strace: bool,
    perf: bool,
    keep: Option<PathBuf>,
    ringtun: PathBuf,
    extra: Vec<String>,
}

fn usage() -> ! {
    eprintln!("usage: byte_path [--driver legacy|io-uring|auto] [--bytes N] [--runs N] [--strace] [--perf] [--keep DIR] [--ringtun PATH] [-- RINGTUN ARGS]");
    std::process::exit(2)
}

fn parse_opts() -> Opts {
    let default_ringtun = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("ringtun")))
        .unwrap_or_else(|| PathBuf::from("target/release/ringtun"));
    let mut o = Opts {
        bytes: 64 * 1024 * 1024,
        runs: 5,
        driver: "legacy".into(),
        strace: false,
        perf: false,
        keep: None,
        ringtun: default_ringtun,
        extra: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--bytes" => o.bytes = val().parse().unwrap_or_else(|_| usage()),
            "--runs" => o.runs = val().parse().unwrap_or_else(|_| usage()),
            "--driver" => o.driver = val(),
            "--keep" => o.keep = Some(PathBuf::from(val())),
            "--ringtun" => o.ringtun = PathBuf::from(val()),
            "--strace" => o.strace = true,
            "--perf" => o.perf = true,
            "--" => {
                o.extra = it.collect();
                break;
            }
            _ => usage(),
        }
    }
    // perf attaches to the ringtun pid, which under --strace is strace's child, not ours.
    if o.bytes == 0 || o.runs == 0 || (o.perf && o.strace) {
        usage();
    }
    o
}

/// One side's ringtun (under strace with `--strace`).
struct Proxy {
    who: &'static str,
    proc: Process,
    trace: Option<PathBuf>,
}

impl Proxy {
    /// Stops the process with SIGTERM (strace then detaches and flushes its output file), or
    /// SIGKILL after 5 s; idempotent.
    fn stop(&mut self) {
        self.proc.stop(Duration::from_secs(5));
    }
}

fn start_proxy(ns: &Netns, dir: &Path, who: &'static str, o: &Opts) -> Proxy {
    let trace = o.strace.then(|| dir.join(format!("{who}.strace")));
    let files = RunFiles::new(&dir.join("config.yaml"), dir, &format!("default/{who}"));
    let mut cmd = match &trace {
        Some(t) => {
            let mut c = ns.exec("strace");
            c.args(["-f", "-yy", "-s0", "-e", TRACED, "-o"])
                .arg(t)
                .arg(&o.ringtun)
                .args(files.args());
            c
        }
        None => files.command(ns, &o.ringtun),
    };
    cmd.args(["--workers", "1"])
        .args(["--io-driver", &o.driver])
        .args(&o.extra);
    let log = dir.join(format!("ringtun-{who}.log"));
    let proc = ringtun::start(ns, cmd, &format!("ringtun ({who})"), &log)
        .unwrap_or_else(|e| panic!("ringtun ({who}) did not start: {e}"));
    Proxy { who, proc, trace }
}

fn pattern() -> Vec<u8> {
    ringtun_testbed::pattern(PATTERN_LEN)
}

/// Sends `n` bytes of the pattern to the VIP and checks the echo; returns the elapsed time.
fn transfer(client_ns: &Netns, pat: &'static [u8], n: usize) -> Duration {
    let start = Instant::now();
    let s = client_ns
        .enter(|| TcpStream::connect("10.96.0.10:80"))
        .expect("enter client namespace")
        .expect("connect to the service VIP through the capture");
    let mut w = s.try_clone().expect("clone client socket");
    let writer = std::thread::spawn(move || {
        let mut left = n;
        let mut off = 0;
        while left > 0 {
            let k = left.min(pat.len() - off).min(256 * 1024);
            w.write_all(&pat[off..off + k]).expect("send to tunnel");
            off = (off + k) % pat.len();
            left -= k;
        }
        w.shutdown(Shutdown::Write).expect("shutdown write");
    });
    let mut r = s;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    loop {
        let k = r.read(&mut buf).expect("read echo");
        if k == 0 {
            break;
        }
        let mut checked = 0;
        while checked < k {
            let off = (got + checked) % pat.len();
            let m = (k - checked).min(pat.len() - off);
            assert!(
                buf[checked..checked + m] == pat[off..off + m],
                "echoed bytes differ from what was sent at offset {}",
                got + checked
            );
            checked += m;
        }
        got += k;
    }
    writer.join().expect("writer thread");
    assert_eq!(got, n, "echo returned {got} bytes, sent {n}");
    start.elapsed()
}

/// utime+stime of a process (all its threads), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    sys::cpu_seconds(pid).expect("read /proc/PID/stat")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One parsed strace line: syscall, the fd's description, result.
struct Call {
    name: String,
    fd: String,
    /// Bytes asked for (3rd argument of read/recvfrom), or iovec count for readv/writev.
    arg3: Option<u64>,
    ret: Result<u64, String>,
}

fn parse_ret(s: &str) -> Result<u64, String> {
    let s = s.trim();
    match s.parse::<i64>() {
        Ok(v) if v >= 0 => Ok(v as u64),
        _ => Err(s
            .split_whitespace()
            .nth(1)
            .unwrap_or("?")
            .trim_start_matches('-')
            .to_owned()),
    }
}

/// Splits the arguments of a syscall line: the first (the fd, which `-yy` decorates as
/// `7<TCP:[a:1->b:2]>`) whole, the rest at top-level commas.
fn split_args(s: &str) -> Vec<String> {
    let (fd, rest) = match s.find("]>") {
        Some(i) if s.starts_with(|c: char| c.is_ascii_digit()) => {
            let (fd, rest) = s.split_at(i + 2);
            (fd.to_owned(), rest.trim_start_matches(',').to_owned())
        }
        _ => match s.split_once(',') {
            Some((fd, rest)) => (fd.to_owned(), rest.to_owned()),
            None => (s.to_owned(), String::new()),
        },
    };
    let (mut out, mut cur, mut depth) = (vec![fd.trim().to_owned()], String::new(), 0i32);
    for c in rest.chars() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth -= 1,
            _ => {}
        }
        if c == ',' && depth == 0 {
            out.push(cur.trim().to_owned());
            cur.clear();
        } else {
            cur.push(c);
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_owned());
    }
    out
}

fn parse_strace(path: &Path) -> Vec<Call> {
    let text = std::fs::read_to_string(path).expect("read strace output");
    let mut pending: BTreeMap<String, String> = BTreeMap::new();
    let mut calls = Vec::new();
    for line in text.lines() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        let full = if let Some(head) = rest.strip_suffix("<unfinished ...>") {
            pending.insert(pid.to_owned(), head.to_owned());
            continue;
        } else if rest.starts_with("<...") {
            let Some(head) = pending.remove(pid) else {
                continue;
            };
            let Some((_, tail)) = rest.split_once("resumed>") else {
                continue;
            };
            format!("{head}{tail}")
        } else {
            rest.to_owned()
        };
        let Some((name, args_ret)) = full.split_once('(') else {
            continue;
        };
        let Some((args, ret)) = args_ret.rsplit_once(") = ") else {
            continue;
        };
        let args = split_args(args);
        let arg3 = match name {
            "read" | "recvfrom" | "readv" | "writev" => args.get(2).and_then(|a| a.parse().ok()),
            _ => None,
        };
        calls.push(Call {
            name: name.to_owned(),
            fd: args.first().cloned().unwrap_or_default(),
            arg3,
            ret: parse_ret(ret),
        });
    }
    calls
}

fn socket_class(fd: &str) -> Option<&'static str> {
    if !fd.contains("TCP") {
        return None;
    }
    Some(if fd.contains(":15008") {
        "hbone"
    } else {
        "plain"
    })
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Per (socket class, syscall): sizes of successful calls, EAGAIN count, sizes asked for.
type Group = (Vec<u64>, u64, Vec<u64>);

fn report_strace(proxies: &[Proxy], mib_each_way: f64) {
    println!("\nsocket syscalls per side (data sockets only; per MiB = per MiB of payload in that call's direction,");
    println!("{mib_each_way:.0} MiB each way in all; size = bytes moved per successful call):");
    println!(
        "{:<7} {:<6} {:<9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "side",
        "socket",
        "syscall",
        "ok",
        "EAGAIN",
        "ok/MiB",
        "p10",
        "median",
        "p90",
        "max",
        "asked"
    );
    for p in proxies {
        let Some(t) = &p.trace else { continue };
        let calls = parse_strace(t);
        let mut groups: BTreeMap<(&str, String), Group> = BTreeMap::new();
        let mut waits: BTreeMap<String, u64> = BTreeMap::new();
        for c in &calls {
            if matches!(
                c.name.as_str(),
                "epoll_wait" | "epoll_pwait" | "io_uring_enter"
            ) {
                *waits.entry(c.name.clone()).or_default() += 1;
                continue;
            }
            let Some(class) = socket_class(&c.fd) else {
                continue;
            };
            let g = groups.entry((class, c.name.clone())).or_default();
            match &c.ret {
                Ok(n) if *n > 0 => {
                    g.0.push(*n);
                    if let Some(a) = c.arg3 {
                        g.2.push(a);
                    }
                }
                Ok(_) => {}
                Err(e) if e == "EAGAIN" => g.1 += 1,
                Err(_) => {}
            }
        }
        for ((class, name), (mut sizes, eagain, mut asked)) in groups {
            sizes.sort_unstable();
            asked.sort_unstable();
            let asked = if asked.is_empty() {
                "-".to_owned()
            } else if name.ends_with('v') {
                format!("{} iov", percentile(&asked, 0.5))
            } else {
                percentile(&asked, 0.5).to_string()
            };
            println!(
                "{:<7} {:<6} {:<9} {:>8} {:>8} {:>8.1} {:>8} {:>8} {:>8} {:>8} {:>9}",
                p.who,
                class,
                name,
                sizes.len(),
                eagain,
                sizes.len() as f64 / mib_each_way,
                percentile(&sizes, 0.1),
                percentile(&sizes, 0.5),
                percentile(&sizes, 0.9),
                sizes.last().copied().unwrap_or(0),
                asked
            );
        }
        for (name, n) in waits {
            println!(
                "{:<7} {:<6} {:<9} {:>8} {:>8} {:>8.1}   (all of the process's waits, whole run incl. start-up)",
                p.who,
                "-",
                name,
                n,
                "",
                n as f64 / mib_each_way
            );
        }
    }
}

/// Syscalls counted under --perf.
const PERF_SYSCALLS: [&str; 11] = [
    "read",
    "write",
    "recvfrom",
    "sendto",
    "readv",
    "writev",
    "sendmsg",
    "recvmsg",
    "epoll_wait",
    "epoll_pwait",
    "io_uring_enter",
];

/// Starts `perf stat` counting syscall entries of process `pid` into `out`.
fn start_perf(pid: u32, out: &Path) -> Child {
    let events: Vec<String> = PERF_SYSCALLS
        .iter()
        .map(|s| format!("syscalls:sys_enter_{s}"))
        .collect();
    let child = std::process::Command::new("perf")
        .args([
            "stat",
            "-x",
            ",",
            "-e",
            &events.join(","),
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start perf stat (apt-get install linux-perf)");
    // perf needs a moment to attach before the measured runs start.
    std::thread::sleep(Duration::from_millis(500));
    child
}

fn stop_perf(mut child: Child, out: &Path, who: &str, mib_each_way: f64) {
    // SAFETY: kill(2) on our own child; SIGINT makes perf stat print its counts and exit.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
    let text = std::fs::read_to_string(out).unwrap_or_default();
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 3 {
            continue;
        }
        let Ok(n) = f[0].parse::<u64>() else { continue };
        let name = f[2].trim_start_matches("syscalls:sys_enter_");
        if n > 0 {
            println!(
                "{who:<7} {name:<15} {n:>8} calls {:>8.1} per MiB (perf stat, all fds, measured runs only)",
                n as f64 / mib_each_way
            );
        }
    }
}

fn main() {
    let o = parse_opts();
    ringtun_testbed::require_root().expect("byte_path needs root");
    assert!(
        o.ringtun.exists(),
        "{} not found; build it with cargo build --release -p ringtun (or pass --ringtun)",
        o.ringtun.display()
    );
    let dir = o.keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("ringtun-byte-path-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).expect("create work dir");
    std::fs::write(dir.join("config.yaml"), DEMO_CONFIG).expect("write config");
    certs::write_workload_certs(&dir, "cluster.local", &["default/client", "default/server"])
        .expect("demo certificates");
    let nodes = TwoNodes::new("rtbp").expect("build two-namespace topology");
    nodes
        .client
        .capture_outbound(15001, ringtun_testbed::DEFAULT_MARK)
        .expect("nftables capture");
    let server = start_proxy(&nodes.server, &dir, "server", &o);
    let client = start_proxy(&nodes.client, &dir, "client", &o);
    EchoServer::start_unhashed(&nodes.server, "0.0.0.0:5201").expect("echo server");
    let pat: &'static [u8] = Box::leak(pattern().into_boxed_slice());

    println!(
        "byte_path: {} MiB echoed x {} runs through outbound capture -> HBONE -> inbound -> echo and back",
        o.bytes as f64 / MIB,
        o.runs
    );
    println!(
        "ringtun {} --workers 1 --io-driver {} {}{}",
        o.ringtun.display(),
        o.driver,
        o.extra.join(" "),
        if o.strace { " (under strace -f)" } else { "" }
    );
    let procs = [&client, &server];
    let mut rates = Vec::new();
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); procs.len()];
    // One short transfer first, so the TLS handshake and the pooled HTTP/2 connection are set
    // up outside the measured runs (each run is a new CONNECT stream on that connection).
    transfer(&nodes.client, pat, 1024 * 1024);
    let perfs: Vec<(Child, PathBuf, &str)> = if o.perf {
        procs
            .iter()
            .map(|p| {
                let out = dir.join(format!("{}.perfstat", p.who));
                (start_perf(p.proc.pid(), &out), out, p.who)
            })
            .collect()
    } else {
        Vec::new()
    };
    for run in 0..o.runs {
        let before: Vec<f64> = procs.iter().map(|p| cpu_seconds(p.proc.pid())).collect();
        let took = transfer(&nodes.client, pat, o.bytes);
        let after: Vec<f64> = procs.iter().map(|p| cpu_seconds(p.proc.pid())).collect();
        let rate = o.bytes as f64 / MIB / took.as_secs_f64();
        rates.push(rate);
        let gib_carried = 2.0 * o.bytes as f64 / (1024.0 * MIB);
        let mut line = format!(
            "  run {run}: {:.3} s, {rate:.0} MiB/s each way",
            took.as_secs_f64()
        );
        for (i, p) in procs.iter().enumerate() {
            let per_gib = (after[i] - before[i]) / gib_carried;
            cpu[i].push(per_gib);
            line += &format!(", {} {:.2} s", p.who, after[i] - before[i]);
        }
        eprintln!("{line}");
    }
    if !o.strace {
        let (lo, hi) = rates
            .iter()
            .fold((f64::INFINITY, 0.0f64), |(l, h), &r| (l.min(r), h.max(r)));
        println!(
            "throughput: median {:.0} MiB/s each way (min {lo:.0}, max {hi:.0})",
            median(&mut rates)
        );
        let mut total = 0.0;
        for (i, p) in procs.iter().enumerate() {
            let m = median(&mut cpu[i]);
            total += m;
            println!(
                "cpu {}: median {:.2} s per GiB carried (utime+stime; each echoed byte crosses it twice)",
                p.who, m
            );
        }
        println!("cpu both ringtuns: {total:.2} s per GiB carried");
    }
    if !perfs.is_empty() {
        println!("\nsyscall entries per MiB each way, perf stat:");
    }
    for (child, out, who) in perfs {
        stop_perf(child, &out, who, o.bytes as f64 * o.runs as f64 / MIB);
    }
    let mib_each_way = (o.bytes as f64 * o.runs as f64 + MIB) / MIB;
    let mut proxies = [client, server];
    for p in proxies.iter_mut() {
        p.stop();
    }
    if o.strace {
        report_strace(&proxies, mib_each_way);
    }
    for p in &proxies {
        let text = p.proc.log();
        let access = text.lines().filter(|l| l.contains("access")).count();
        eprintln!(
            "{}: {access} access-log lines in {}{}",
            p.who,
            p.proc.log_path().display(),
            p.trace
                .as_ref()
                .map(|t| format!(", trace {}", t.display()))
                .unwrap_or_default()
        );
    }
    drop(proxies);
    drop(nodes);
    if o.keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
