//! accept_handoff: how much does it cost to hand accepted connections to shards over channels,
//! compared with giving every shard its own SO_REUSEPORT listener (what ringtun does)?
//!
//! Two ways to spread new connections over N worker threads, on loopback:
//!
//! - (a) `reuseport`: N listening sockets bound to the same address with SO_REUSEPORT, one per
//!   worker; the kernel picks a socket by hashing the connection's 4-tuple, and each worker
//!   accepts and serves only its own.
//! - (b) `handoff`: one listening socket and one acceptor thread, which accepts and deals the
//!   accepted sockets round-robin to the workers over crossbeam channels (unbounded, as ringtun's
//!   control channels are).
//!
//! Each worker serves a connection the same way: read a 1-byte request, write a 1-byte reply,
//! close. Load-generator threads (not pinned) connect, write 1 byte, read 1 byte and close (with
//! RST, so TIME_WAIT sockets do not pile up across runs), as fast as they can, for a fixed time. Workers are pinned to cores (core_affinity) where the
//! platform allows it; the acceptor thread is not pinned.
//!
//! Everything is plain std blocking sockets and threads (no async runtime): what is compared is
//! the kernel's hand-off against a user-space one, not an event loop. Modes alternate run by run
//! so drift on the machine hits both alike; each cell reports the median of the runs and their
//! spread.
//!
//! ```text
//! cargo run --release -p ringtun-benches --bin accept_handoff -- [--secs 2] [--runs 5]
//!     [--clients 4] [--shards 1,2]
//! ```

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Same backlog as ringtun's listeners (engine/src/net.rs).
const BACKLOG: i32 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// (a) one SO_REUSEPORT listener per worker.
    Reuseport,
    /// (b) one listener, an acceptor thread, fds dealt round-robin over channels.
    Handoff,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Reuseport => "(a) SO_REUSEPORT per worker",
            Mode::Handoff => "(b) acceptor + channels",
        }
    }
}

struct Args {
    secs: f64,
    runs: usize,
    clients: usize,
    shards: Vec<usize>,
}

fn usage() -> ! {
    eprintln!(
        "usage: accept_handoff [--secs SECONDS] [--runs N] [--clients THREADS] [--shards 1,2]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        secs: 2.0,
        runs: 5,
        clients: 4,
        shards: vec![1, 2],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--secs" => args.secs = value.parse().unwrap_or_else(|_| usage()),
            "--runs" => args.runs = value.parse().unwrap_or_else(|_| usage()),
            "--clients" => args.clients = value.parse().unwrap_or_else(|_| usage()),
            "--shards" => {
                args.shards = value
                    .split(',')
                    .map(|s| s.trim().parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            _ => usage(),
        }
    }
    if args.runs == 0
        || args.clients == 0
        || args.secs <= 0.0
        || args.shards.is_empty()
        || args.shards.contains(&0)
    {
        usage();
    }
    args
}

fn listener(addr: SocketAddr, reuseport: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Wakes a thread blocked in accept(2) on this socket: on Linux, shutdown of a listening socket
/// makes pending and later accepts fail with EINVAL.
fn unblock_accept(l: &TcpListener) {
    // SAFETY: the fd is owned by `l`, which is alive for the duration of the call.
    unsafe {
        libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// The service: 1-byte request, 1-byte reply, close. Returns whether it completed.
fn serve(mut s: TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(1)) && s.write_all(&b).is_ok()
}

fn pin(cores: &[core_affinity::CoreId], i: usize) {
    if let Some(&core) = cores.get(i % cores.len().max(1)) {
        // Pinning is best effort: a failure only makes the figures noisier.
        let _ = core_affinity::set_for_current(core);
    }
}

struct RunResult {
    conns_per_s: f64,
    /// CPU time of the whole process (load generator included) per connection, microseconds.
    cpu_us_per_conn: f64,
    per_worker: Vec<u64>,
    client_errors: u64,
    server_errors: u64,
}

/// Worker side of one run: returns per-worker served counts and the server-side error count,
/// once `stop` has been called.
struct Servers {
    listeners: Vec<Arc<TcpListener>>,
    threads: Vec<thread::JoinHandle<u64>>,
    acceptor: Option<thread::JoinHandle<()>>,
    errors: Arc<AtomicU64>,
    stopping: Arc<AtomicBool>,
}

impl Servers {
    fn start(
        mode: Mode,
        shards: usize,
        cores: &[core_affinity::CoreId],
    ) -> io::Result<(Self, SocketAddr)> {
        let errors = Arc::new(AtomicU64::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let mut listeners = Vec::new();
        let mut threads = Vec::new();
        let mut acceptor = None;
        let first = Arc::new(listener(
            "127.0.0.1:0".parse().expect("literal address"),
            mode == Mode::Reuseport,
        )?);
        let addr = first.local_addr()?;
        listeners.push(first);
        match mode {
            Mode::Reuseport => {
                for _ in 1..shards {
                    listeners.push(Arc::new(listener(addr, true)?));
                }
                for (i, l) in listeners.iter().enumerate() {
                    let (l, errors, stopping) = (l.clone(), errors.clone(), stopping.clone());
                    let cores = cores.to_vec();
                    threads.push(thread::Builder::new().name(format!("worker-{i}")).spawn(
                        move || {
                            pin(&cores, i);
                            let mut served = 0u64;
                            loop {
                                match l.accept() {
                                    Ok((s, _)) => {
                                        if serve(s) {
                                            served += 1;
                                        } else {
                                            errors.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                    Err(_) if stopping.load(Ordering::Relaxed) => break,
                                    Err(_) => {
                                        errors.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                            served
                        },
                    )?);
                }
            }
            Mode::Handoff => {
                let mut senders = Vec::with_capacity(shards);
                for i in 0..shards {
                    let (tx, rx) = crossbeam_channel::unbounded::<TcpStream>();
                    senders.push(tx);
                    let errors = errors.clone();
                    let cores = cores.to_vec();
                    threads.push(thread::Builder::new().name(format!("worker-{i}")).spawn(
                        move || {
                            pin(&cores, i);
                            let mut served = 0u64;
                            for s in rx.iter() {
                                if serve(s) {
                                    served += 1;
                                } else {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            served
                        },
                    )?);
                }
                let (l, errors, stopping) =
                    (listeners[0].clone(), errors.clone(), stopping.clone());
                acceptor = Some(thread::Builder::new().name("acceptor".into()).spawn(
                    move || {
                        let mut next = 0usize;
                        loop {
                            match l.accept() {
                                Ok((s, _)) => {
                                    if senders[next].send(s).is_err() {
                                        errors.fetch_add(1, Ordering::Relaxed);
                                    }
                                    next = (next + 1) % senders.len();
                                }
                                Err(_) if stopping.load(Ordering::Relaxed) => break,
                                Err(_) => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        // Dropping the senders ends the workers' loops.
                    },
                )?);
            }
        }
        Ok((
            Servers {
                listeners,
                threads,
                acceptor,
                errors,
                stopping,
            },
            addr,
        ))
    }

    fn stop(self) -> (Vec<u64>, u64) {
        self.stopping.store(true, Ordering::Relaxed);
        for l in &self.listeners {
            unblock_accept(l);
        }
        if let Some(a) = self.acceptor {
            a.join().expect("acceptor thread panicked");
        }
        let served = self
            .threads
            .into_iter()
            .map(|t| t.join().expect("worker thread panicked"))
            .collect();
        (served, self.errors.load(Ordering::Relaxed))
    }
}

fn run_once(
    mode: Mode,
    shards: usize,
    secs: f64,
    clients: usize,
    cores: &[core_affinity::CoreId],
) -> RunResult {
    let (servers, addr) = Servers::start(mode, shards, cores).expect("start listeners/workers");
    let cpu_before = process_cpu();
    let barrier = Arc::new(Barrier::new(clients + 1));
    let client_errors = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::with_capacity(clients);
    for i in 0..clients {
        let (barrier, client_errors) = (barrier.clone(), client_errors.clone());
        handles.push(
            thread::Builder::new()
                .name(format!("client-{i}"))
                .spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    let deadline = start + Duration::from_secs_f64(secs);
                    let mut done = 0u64;
                    let mut b = [0u8; 1];
                    while Instant::now() < deadline {
                        let ok = TcpStream::connect(addr).and_then(|mut s| {
                            s.write_all(b"x")?;
                            s.read_exact(&mut b)?;
                            // Close with RST so no TIME_WAIT sockets pile up from run to run
                            // (a 10 s trial otherwise leaves ~100k of them, and later runs
                            // slow down); the server side still closes normally.
                            SockRef::from(&s).set_linger(Some(Duration::ZERO))
                        });
                        match ok {
                            Ok(()) => done += 1,
                            Err(_) => {
                                client_errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    (done, start.elapsed())
                })
                .expect("spawn client thread"),
        );
    }
    barrier.wait();
    let mut total = 0u64;
    let mut elapsed = Duration::ZERO;
    for h in handles {
        let (done, took) = h.join().expect("client thread panicked");
        total += done;
        elapsed = elapsed.max(took);
    }
    let (per_worker, server_errors) = servers.stop();
    let cpu = process_cpu() - cpu_before;
    RunResult {
        conns_per_s: total as f64 / elapsed.as_secs_f64(),
        cpu_us_per_conn: cpu.as_secs_f64() * 1e6 / total.max(1) as f64,
        per_worker,
        client_errors: client_errors.load(Ordering::Relaxed),
        server_errors,
    }
}

/// User+system CPU time of this process, all threads (getrusage).
fn process_cpu() -> Duration {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF has no other preconditions.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown kernel".into());
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpus} CPUs ({cpu}), Linux {kernel}")
}

struct Cell {
    rates: Vec<f64>,
    cpu_us: Vec<f64>,
    /// Connections served per worker, summed over the runs.
    per_worker: Vec<u64>,
    errors: u64,
}

impl Cell {
    fn new(shards: usize) -> Self {
        Cell {
            rates: Vec::new(),
            cpu_us: Vec::new(),
            per_worker: vec![0; shards],
            errors: 0,
        }
    }

    fn add(&mut self, r: &RunResult) {
        self.rates.push(r.conns_per_s);
        self.cpu_us.push(r.cpu_us_per_conn);
        for (sum, n) in self.per_worker.iter_mut().zip(&r.per_worker) {
            *sum += n;
        }
        self.errors += r.client_errors + r.server_errors;
    }

    fn shares(&self) -> (f64, f64) {
        let total: u64 = self.per_worker.iter().sum();
        if total == 0 {
            return (0.0, 0.0);
        }
        let shares: Vec<f64> = self
            .per_worker
            .iter()
            .map(|&n| n as f64 / total as f64)
            .collect();
        min_max(&shares)
    }
}

fn main() {
    let args = parse_args();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    println!("accept_handoff: std blocking sockets and threads, loopback 127.0.0.1");
    println!("machine: {}", machine());
    println!(
        "{} runs x {:.1} s per cell, modes alternating; {} load-generator threads (unpinned); workers {}",
        args.runs,
        args.secs,
        args.clients,
        if cores.is_empty() {
            "not pinned (no core ids)".to_owned()
        } else {
            format!("pinned round-robin over {} cores", cores.len())
        }
    );
    println!("service per connection: accept, read 1 byte, write 1 byte, close\n");

    let mut rows = Vec::new();
    for &shards in &args.shards {
        // Warm-up, discarded: first-touch allocations, page faults, TCP caches.
        for mode in [Mode::Reuseport, Mode::Handoff] {
            run_once(mode, shards, 0.3, args.clients, &cores);
        }
        let mut a = Cell::new(shards);
        let mut b = Cell::new(shards);
        for run in 0..args.runs {
            // Alternate which mode goes first so neither always runs on a warmer machine.
            let order = if run % 2 == 0 {
                [Mode::Reuseport, Mode::Handoff]
            } else {
                [Mode::Handoff, Mode::Reuseport]
            };
            for mode in order {
                let r = run_once(mode, shards, args.secs, args.clients, &cores);
                eprintln!(
                    "  shards={shards} run={run} {:<28} {:>9.0} conn/s {:>6.1} us CPU/conn  per-worker {:?}",
                    mode.label(),
                    r.conns_per_s,
                    r.cpu_us_per_conn,
                    r.per_worker
                );
                match mode {
                    Mode::Reuseport => a.add(&r),
                    Mode::Handoff => b.add(&r),
                }
            }
        }
        rows.push((shards, a, b));
    }

    println!(
        "{:>6}  {:<28} {:>12} {:>21} {:>13} {:>15} {:>7}",
        "shards",
        "mode",
        "conn/s (med)",
        "spread (min..max)",
        "CPU us/conn",
        "worker share",
        "errors"
    );
    for (shards, a, b) in &rows {
        for (mode, cell) in [(Mode::Reuseport, a), (Mode::Handoff, b)] {
            let (lo, hi) = min_max(&cell.rates);
            let (smin, smax) = cell.shares();
            let med = median(&cell.rates);
            println!(
                "{:>6}  {:<28} {:>12.0} {:>21} {:>13.1} {:>15} {:>7}",
                shards,
                mode.label(),
                med,
                format!("{lo:.0}..{hi:.0} (±{:.1}%)", (hi - lo) / 2.0 / med * 100.0),
                median(&cell.cpu_us),
                format!("{:.1}%/{:.1}%", smin * 100.0, smax * 100.0),
                cell.errors
            );
        }
        let pair: Vec<f64> = a.rates.iter().zip(&b.rates).map(|(x, y)| y / x).collect();
        let (plo, phi) = min_max(&pair);
        println!(
            "{:>6}  ratio (b)/(a) conn/s: medians {:.3}, per-run pairs median {:.3} ({plo:.3}..{phi:.3}); CPU/conn medians {:.3}",
            shards,
            median(&b.rates) / median(&a.rates),
            median(&pair),
            median(&b.cpu_us) / median(&a.cpu_us),
        );
    }
    println!("\nCPU us/conn: user+system time of the whole process (load generator included) per connection.");
    println!(
        "worker share: smallest/largest fraction of connections one worker served (all runs)."
    );
}
