//! The memory test group: RSS per idle tunnelled connection, with the idle connections held by
//! a child process of this binary (`ringtun-bench __idle-conns`).

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ringtun_benches::load::{self, Target};
use ringtun_benches::report::{MemoryPoint, Results};
use ringtun_testbed::{sys, Netns};

use crate::contenders::{Contender, Env};
use crate::procs::Tunnel;

/// Hidden command line of the idle-connection child: `ringtun-bench __idle-conns ADDR MARK N`.
pub const IDLE_CHILD: &str = "__idle-conns";

/// Idle connections held by a child process in the client namespace (closed when dropped).
///
/// A separate process because a process may have only RLIMIT_NOFILE descriptors (its hard
/// limit, which an unprivileged container cannot raise): with 10,000 idle connections the
/// client ends and the load server's ends would need 20,000 in the harness alone.
pub struct IdleChild(Child);

impl IdleChild {
    /// Starts the child and waits until it holds all `n` connections (or failed).
    pub fn open(ns: &Netns, t: &Target, n: usize) -> Result<IdleChild, String> {
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
pub fn idle_child_main(args: &[String]) -> i32 {
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
    sys::raise_nofile(1 << 18);
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
pub fn client_log_count(c: &Contender, tunnel: &Tunnel, needle: &str) -> usize {
    if c.kind.is_ringtun() {
        tunnel.client.log_text().matches(needle).count()
    } else {
        0
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
pub fn memory_test(
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
        let tunnelled_before = client_log_count(c, tunnel, "dst.hbone_addr=");
        let new_before = client_log_count(c, tunnel, "pool=\"new\"");
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
        // Let the tunnels finish closing (and log) before the next step. A connection's line
        // is written once both directions ended, after the server side saw it close, so on a
        // busy machine thousands of lines may still be on their way: wait for them.
        std::thread::sleep(Duration::from_secs(1));
        if c.kind.is_ringtun() {
            let logged = || client_log_count(c, tunnel, "dst.hbone_addr=") - tunnelled_before;
            let deadline = Instant::now() + Duration::from_secs(30);
            while logged() < n && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
            let tunnelled = logged();
            let new = client_log_count(c, tunnel, "pool=\"new\"") - new_before;
            if tunnelled < n {
                return Err(format!(
                    "{}: only {tunnelled} of {n} idle connections were logged as tunnelled (with a dst.hbone_addr)",
                    c.name
                ));
            }
            res.push(run, &c.name, &test, "HBONE conns", new as f64, false);
        }
    }
    Ok(())
}
