//! What the kernel says about a process: CPU time, sleeps and resident memory from `/proc`, and which
//! ports it listens on (from its network namespace's view); the open-files limit that many
//! connections need; and signals taken by a thread that waits for them, so that Ctrl-C tears
//! down namespaces instead of killing the process wherever the kernel delivers it.

use std::collections::HashMap;

/// Clock ticks per second (`_SC_CLK_TCK`), the unit of `utime`/`stime`.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// Fields of `/proc/PID/stat` after the command name, which may contain spaces: index 0 is
/// the state (field 3 of the man page).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime+stime of a process (all its threads), in seconds; `None` once it is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let f = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the state.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some((ticks(11) + ticks(12)) as f64 / clk_tck())
}

/// stime of a process (all its threads): the part of its CPU time spent in the kernel, in
/// seconds; `None` once it is gone.
pub fn kernel_seconds(pid: u32) -> Option<f64> {
    let f = stat_fields(pid)?;
    Some(f.get(12)?.parse::<u64>().ok()? as f64 / clk_tck())
}

/// Whether every thread of `pid` is stopped (state `T`, e.g. after SIGSTOP, which stops the
/// threads asynchronously); `false` once it is gone.
pub fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        // A thread's stat is also at /proc/<tid>/stat.
        let tid = t.file_name().to_str().and_then(|n| n.parse().ok());
        tid.and_then(stat_fields)
            .is_some_and(|f| f.first().is_some_and(|state| state == "T"))
    })
}

/// `pid` and all its descendants (children of children…), from the parent pids in
/// `/proc/*/stat`. A tunnel started through a shell or a wrapper is measured whole.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) = stat_fields(p).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}

/// CPU seconds of several processes together (gone ones count 0).
pub fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| cpu_seconds(p)).sum()
}

/// Kernel CPU seconds (stime) of several processes together.
pub fn kernel_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| kernel_seconds(p)).sum()
}

/// Voluntary context switches of all of a process's threads together: how often they went to
/// sleep waiting for something (I/O, a timer, a lock), each sleep a wake-up later; `None` once
/// it is gone. Threads that already exited are not counted.
pub fn voluntary_switches(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let per_thread = tasks.flatten().filter_map(|t| {
        let status = std::fs::read_to_string(t.path().join("status")).ok()?;
        let v = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?;
        v.trim().parse::<u64>().ok()
    });
    Some(per_thread.sum())
}

/// Voluntary context switches of several processes together (gone ones count 0).
pub fn voluntary_switches_of(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| voluntary_switches(p)).sum()
}

/// The whole machine's CPU seconds since boot, from `/proc/stat`'s `cpu` line: (busy, stolen).
/// Busy is user, nice, system, irq and softirq time of every CPU; stolen is the time the
/// hypervisor ran something else while this VM wanted to run.
pub fn machine_cpu() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal …
    let at = |i: usize| v.get(i).copied().unwrap_or(0) as f64 / clk_tck();
    Some((at(0) + at(1) + at(2) + at(5) + at(6), at(7)))
}

/// Resident set size (`VmRSS`) of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// RSS of several processes together, in KiB.
pub fn rss_of(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| rss_kib(p)).sum()
}

/// Whether a socket of `pid`'s network namespace listens on TCP `port` (any address), read from
/// `/proc/PID/net/tcp` and `tcp6` (state `0A`).
pub fn listens(pid: u32, port: u16) -> bool {
    let want = format!("{port:04X}");
    ["tcp", "tcp6"].iter().any(|f| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .map(|t| {
                t.lines().skip(1).any(|l| {
                    let mut cols = l.split_whitespace();
                    let local = cols.nth(1).unwrap_or("");
                    let state = cols.nth(1).unwrap_or("");
                    state == "0A" && local.rsplit(':').next() == Some(want.as_str())
                })
            })
            .unwrap_or(false)
    })
}

/// Raises RLIMIT_NOFILE's soft limit to `want` (and the hard limit too, which root may do up to
/// `fs.nr_open`; otherwise the soft limit stops at the hard one); returns the soft limit in
/// force afterwards. Children inherit it. `u64::MAX` asks for as much as is allowed.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid, initialised struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < want {
            let new = libc::rlimit {
                rlim_cur: want,
                rlim_max: lim.rlim_max.max(want),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &new) != 0 {
                let capped = libc::rlimit {
                    rlim_cur: lim.rlim_max.min(want),
                    rlim_max: lim.rlim_max,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &capped);
            }
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// Blocks `signals` in the calling thread and every thread it starts afterwards, so that they
/// queue for [`wait_signal`]; call it before any other thread starts. Returns the set.
pub fn block_signals(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: plain signal-mask calls on a local, initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Has `cmd`'s process start with no signal blocked. A child inherits its parent's signal mask
/// across `exec`: without this, a program started from a thread that blocked SIGINT/SIGTERM
/// (see [`block_signals`]) could never be asked to stop, only killed.
pub fn unblock_signals_in(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls
    // sigemptyset/sigprocmask, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Waits for one of the signals of `set` (from [`block_signals`]); returns it.
pub fn wait_signal(set: &libc::sigset_t) -> libc::c_int {
    let mut sig = 0;
    // SAFETY: sigwait on an initialised set.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_of_a_thread_are_counted_and_a_gone_process_has_none() {
        let me = std::process::id();
        let before = voluntary_switches(me).expect("own /proc entry");
        // Each sleep gives up the CPU: a voluntary switch in this thread.
        for _ in 0..5 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let after = voluntary_switches(me).expect("own /proc entry");
        assert!(after >= before + 5, "{before} -> {after}");
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        child.wait().expect("reap true");
        assert_eq!(voluntary_switches(pid), None);
        assert_eq!(voluntary_switches_of(&[pid]), 0);
    }

    #[test]
    fn a_stopped_process_is_seen_stopped_and_a_running_one_not() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        assert!(
            !all_threads_stopped(pid),
            "running (sleeping) is not stopped"
        );
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !all_threads_stopped(pid) {
            assert!(std::time::Instant::now() < deadline, "never seen stopped");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(!all_threads_stopped(pid), "gone is not stopped");
    }
}
