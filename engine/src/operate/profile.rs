//! `/debug/pprof/heap` and `/debug/pprof/profile` on the admin port, where ztunnel has them.
//!
//! ztunnel answers these with pprof protobufs from jemalloc's heap profiler and pprof-rs's
//! signal-driven stack sampler. ringtun allocates with mimalloc, which keeps no per-site heap
//! profile, and links no stack sampler (none is in the project's offline registry, and an
//! in-process sampler needs async-signal-safe unwinding). So both answer in text with what
//! the process can tell cheaply: mimalloc's own figures for the heap, and the CPU each thread
//! (every shard by name) used over the requested window. For stacks, `perf record -g -p PID`.

use std::fmt::Write as _;
use std::os::raw::{c_char, c_void};
use std::time::{Duration, Instant};

// mimalloc's C API (the `mimalloc` crate links the library; see `crate::alloc`).
unsafe extern "C" {
    fn mi_process_info(
        elapsed_msecs: *mut usize,
        user_msecs: *mut usize,
        system_msecs: *mut usize,
        current_rss: *mut usize,
        peak_rss: *mut usize,
        current_commit: *mut usize,
        peak_commit: *mut usize,
        page_faults: *mut usize,
    );
    fn mi_stats_print_out(
        out: Option<unsafe extern "C" fn(msg: *const c_char, arg: *mut c_void)>,
        arg: *mut c_void,
    );
}

/// Appends one piece of mimalloc's statistics output to the `String` behind `arg`.
unsafe extern "C" fn collect(msg: *const c_char, arg: *mut c_void) {
    if msg.is_null() || arg.is_null() {
        return;
    }
    // SAFETY: mimalloc passes a NUL-terminated message, and `arg` is the `&mut String` that
    // `heap` handed it, alive for the whole (synchronous) call.
    let (msg, out) = unsafe { (std::ffi::CStr::from_ptr(msg), &mut *arg.cast::<String>()) };
    out.push_str(&msg.to_string_lossy());
}

/// `/debug/pprof/heap`: mimalloc's process figures (resident and committed memory, now and
/// at peak) and its statistics table.
pub fn heap() -> String {
    let mut v = [0usize; 8];
    let [elapsed, user, system, rss, peak_rss, commit, peak_commit, faults] = &mut v;
    // SAFETY: every pointer is to a live, writable usize.
    unsafe {
        mi_process_info(
            elapsed,
            user,
            system,
            rss,
            peak_rss,
            commit,
            peak_commit,
            faults,
        )
    };
    let mut out =
        String::from("# ringtun heap (mimalloc): no per-site heap profile, see the admin README\n");
    let _ = writeln!(
        out,
        "current_rss_bytes {}\npeak_rss_bytes {}\ncurrent_commit_bytes {}\npeak_commit_bytes {}\npage_faults {}\nuser_ms {}\nsystem_ms {}\nelapsed_ms {}\n",
        v[3], v[4], v[5], v[6], v[7], v[1], v[2], v[0]
    );
    let mut stats = String::new();
    // SAFETY: `collect` only appends to the String `arg` points to, which outlives the call.
    unsafe { mi_stats_print_out(Some(collect), (&mut stats as *mut String).cast()) };
    out.push_str(&stats);
    out
}

/// One thread's CPU time so far, from `/proc/self/task/<tid>/stat`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ThreadCpu {
    tid: u32,
    name: String,
    /// Clock ticks in user and system mode.
    user: u64,
    system: u64,
}

/// The `(user, system)` ticks of a `stat` line (fields 14 and 15, counted after the
/// parenthesised name, which may itself hold spaces and parentheses).
fn parse_stat(line: &str) -> Option<(u64, u64)> {
    let rest = &line[line.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

fn threads() -> Vec<ThreadCpu> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut out: Vec<ThreadCpu> = dir
        .flatten()
        .filter_map(|e| {
            let tid = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (user, system) = parse_stat(&stat)?;
            let name = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            Some(ThreadCpu {
                tid,
                name: name.trim().to_owned(),
                user,
                system,
            })
        })
        .collect();
    out.sort_by_key(|t| t.tid);
    out
}

/// The window `/debug/pprof/profile?seconds=N` asks for: 1 to 300 s, 10 by default, as
/// ztunnel's.
pub fn window(query_seconds: Option<&str>) -> Result<Duration, String> {
    match query_seconds {
        None => Ok(Duration::from_secs(10)),
        Some(s) => match s.parse::<u64>() {
            Ok(n @ 1..=300) => Ok(Duration::from_secs(n)),
            _ => Err(format!("seconds must be 1 to 300, not {s:?}")),
        },
    }
}

/// `/debug/pprof/profile`: the CPU each thread used over `window`, busiest first.
pub fn cpu(window: Duration) -> String {
    let before = threads();
    let start = Instant::now();
    std::thread::sleep(window);
    let after = threads();
    let elapsed = start.elapsed().as_secs_f64();
    // SAFETY: sysconf has no preconditions.
    let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    };
    let ms = |ticks: u64| ticks as f64 * 1000.0 / hz;
    let mut rows: Vec<(f64, f64, &ThreadCpu)> = after
        .iter()
        .map(|t| {
            let was = before.iter().find(|b| b.tid == t.tid);
            let user = t.user - was.map_or(0, |b| b.user.min(t.user));
            let system = t.system - was.map_or(0, |b| b.system.min(t.system));
            (ms(user), ms(system), t)
        })
        .collect();
    rows.sort_by(|a, b| (b.0 + b.1).total_cmp(&(a.0 + a.1)));
    let mut out = format!(
        "# CPU by thread over {elapsed:.1} s (per-thread CPU, not a stack-sampled pprof: \
         for stacks use `perf record -g -p PID`)\n# thread tid user_ms system_ms cpu_percent\n"
    );
    for (user, system, t) in rows {
        let pct = (user + system) / (elapsed * 10.0);
        let _ = writeln!(out, "{} {} {user:.0} {system:.0} {pct:.1}", t.name, t.tid);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_name() {
        let line = "4242 (ringtun (shard) 0) S 1 2 3 4 5 6 7 8 9 10 170 23 0 0 20 0 1 0";
        assert_eq!(parse_stat(line), Some((170, 23)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn window_is_ztunnels() {
        assert_eq!(window(None), Ok(Duration::from_secs(10)));
        assert_eq!(window(Some("1")), Ok(Duration::from_secs(1)));
        assert!(window(Some("0")).is_err());
        assert!(window(Some("301")).is_err());
        assert!(window(Some("x")).is_err());
    }

    #[test]
    fn the_busy_thread_shows() {
        let spin = std::thread::Builder::new()
            .name("spinner".into())
            .spawn(|| {
                let end = Instant::now() + Duration::from_millis(400);
                let mut x = 0u64;
                while Instant::now() < end {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            })
            .expect("spawn");
        let text = cpu(Duration::from_millis(300));
        spin.join().expect("join");
        assert!(text.lines().any(|l| l.starts_with("spinner ")), "{text}");
    }

    #[test]
    fn heap_reports_resident_memory() {
        let text = heap();
        let rss = text
            .lines()
            .find_map(|l| l.strip_prefix("current_rss_bytes "))
            .and_then(|v| v.parse::<u64>().ok());
        assert!(rss.is_some_and(|b| b > 0), "{text}");
    }
}
