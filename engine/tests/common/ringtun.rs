//! The process under test: `ringtun run` inside a namespace, started through the test bed and
//! awaited through readiness on 15021; its log, access lines, signals and memory.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use ringtun_testbed::process::READY_ADDR;
use ringtun_testbed::{Error, Netns, Process, RunFiles};

use super::ringtun_bin;

/// How long a ringtun gets to answer ready (generous: the kTLS VM emulates its CPU).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`run_until_ready`] waits for a ringtun to get ready or exit.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// `--workers 1`, the extra arguments most single-ringtun tests start with.
pub fn one_worker() -> Vec<String> {
    vec!["--workers".into(), "1".into()]
}

/// Runs `cmd` (a `ringtun run` inside `ns`) with its output in `log` until it exits, or until
/// it answers ready on 15021 (then kills it); returns whether it got ready, its exit status and
/// what it printed.
pub fn run_until_ready(ns: &Netns, cmd: Command, log: &Path) -> (bool, ExitStatus, String) {
    let mut p = Process::spawn(cmd, "ringtun", log).expect("spawn ringtun run");
    let ready = match p.wait_ready(ns, RUN_TIMEOUT) {
        Ok(()) => true,
        Err(Error::Exited { .. }) => false,
        Err(e) => panic!("ringtun neither got ready nor exited: {e}"),
    };
    p.stop(Duration::ZERO);
    let status = p.exited().expect("stopped ringtun was reaped");
    (ready, status, p.log())
}

/// A `ringtun run` process inside a namespace; killed on drop, and its log printed if the test
/// is failing.
pub struct Ringtun {
    /// Which side, for messages.
    pub name: String,
    proc: Process,
}

/// What a [`Ringtun`] is started with.
pub struct RingtunArgs<'a> {
    /// `--config`.
    pub config: &'a Path,
    /// Directory with `ca.pem` and the workload's certificate.
    pub certs: &'a Path,
    /// Identity whose certificate to use, `ns/sa`.
    pub identity: &'a str,
    /// `--workload ns/name`.
    pub workload: &'a str,
    /// Further arguments (`--io-driver`, `--workers`…).
    pub extra: Vec<String>,
    /// `RINGTUN_LOG`; by default `RINGTUN_E2E_LOG`, or `info`.
    pub log_filter: Option<&'a str>,
}

impl Ringtun {
    /// Starts `ringtun run` in `ns` and waits until it answers ready on 15021.
    pub fn start(ns: &Netns, name: &str, log_dir: &Path, args: RingtunArgs<'_>) -> Ringtun {
        Ringtun::start_env(ns, name, log_dir, args, &[])
    }

    /// [`Ringtun::start`] with `env` set for the process (e.g. `LOG_FORMAT`).
    pub fn start_env(
        ns: &Netns,
        name: &str,
        log_dir: &Path,
        args: RingtunArgs<'_>,
        env: &[(&str, &str)],
    ) -> Ringtun {
        let files = RunFiles::new(args.config, args.certs, args.identity)
            .with_workload(Some(args.workload));
        let mut cmd = files.command(ns, ringtun_bin());
        // RINGTUN_E2E_LOG=debug (for example) gives more detail when chasing a failure.
        let filter = args
            .log_filter
            .map(str::to_owned)
            .unwrap_or_else(|| std::env::var("RINGTUN_E2E_LOG").unwrap_or_else(|_| "info".into()));
        cmd.args(&args.extra)
            .env("RINGTUN_LOG", filter)
            .env("NO_COLOR", "1")
            .envs(env.iter().copied());
        let log = log_dir.join(format!("ringtun-{name}.log"));
        let mut proc = Process::spawn(cmd, &format!("ringtun ({name})"), &log)
            .unwrap_or_else(|e| panic!("spawn ringtun run ({name}): {e}"));
        if let Err(e) = proc.wait_ready(ns, READY_TIMEOUT) {
            panic!("ringtun ({name}) did not get ready on {READY_ADDR}: {e}");
        }
        Ringtun {
            name: name.to_owned(),
            proc,
        }
    }

    /// Starts ringtun in `ns` as the workload `default/<who>`, with that identity's certificate
    /// from `dir` (the log goes there too), the config at `config`, and `extra` arguments.
    pub fn start_as(
        ns: &Netns,
        who: &str,
        dir: &Path,
        config: &Path,
        extra: Vec<String>,
    ) -> Ringtun {
        let workload = format!("default/{who}");
        Ringtun::start(
            ns,
            who,
            dir,
            RingtunArgs {
                config,
                certs: dir,
                identity: &workload,
                workload: &workload,
                extra,
                log_filter: None,
            },
        )
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Access lines logged so far.
    pub fn access(&self) -> Vec<AccessLine> {
        parse_access(&self.log())
    }

    /// Waits until an access line satisfies `pred` and returns it; fails the test (showing the
    /// access lines seen) after `timeout`.
    pub fn wait_access(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&AccessLine) -> bool,
    ) -> AccessLine {
        let lines = self.poll_access(
            timeout,
            |ls| ls.iter().any(&pred),
            || format!("no access line {what} within {timeout:?}; access lines:"),
        );
        lines
            .into_iter()
            .find(|l| pred(l))
            .expect("the line just found")
    }

    /// Waits until `pred` holds for the access lines logged so far; fails the test with them
    /// after `timeout`.
    pub fn wait_access_all(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[AccessLine]) -> bool,
    ) -> Vec<AccessLine> {
        self.poll_access(timeout, pred, || {
            format!("access lines never showed {what} within {timeout:?}:")
        })
    }

    /// Polls the access lines until `done` holds for them; fails the test with `failure` and the
    /// lines seen after `timeout`.
    fn poll_access(
        &self,
        timeout: Duration,
        done: impl Fn(&[AccessLine]) -> bool,
        failure: impl Fn() -> String,
    ) -> Vec<AccessLine> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.access();
            if done(&lines) {
                return lines;
            }
            if Instant::now() > deadline {
                let seen: Vec<&str> = lines.iter().map(|l| l.raw.as_str()).collect();
                panic!(
                    "ringtun ({}): {}\n{}",
                    self.name,
                    failure(),
                    seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until the log has at least `n` lines containing `needle`.
    pub fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.lines().filter(|l| l.contains(needle)).count() >= n {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "ringtun ({}): fewer than {n} log lines with {needle:?} after {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until the log has a line containing every one of `needles`; returns it.
    pub fn wait_line(&self, needles: &[&str], timeout: Duration) -> String {
        self.proc
            .wait_log_line(needles, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Fails the test if the log shows a panic.
    pub fn assert_no_panic(&self) {
        let log = self.log();
        assert!(
            !log.contains("panicked"),
            "ringtun ({}) panicked:\n{log}",
            self.name
        );
    }

    /// Whether the process is still running (not exited, not a zombie).
    pub fn is_alive(&self) -> bool {
        self.proc.is_alive()
    }

    /// The process id (ringtun's own: `ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        self.proc
            .signal(signal)
            .unwrap_or_else(|e| panic!("ringtun ({}): {e}", self.name));
    }

    /// Waits up to `timeout` for the process to exit; its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.wait_exit(timeout)
    }

    /// Resident set size in KiB (`VmRSS` of /proc/PID/status); fails the test if unreadable.
    pub fn rss_kib(&self) -> u64 {
        ringtun_testbed::sys::rss_kib(self.pid())
            .unwrap_or_else(|| panic!("ringtun ({}): no VmRSS in /proc status", self.name))
    }
}

/// One access-log line, split into its `key=value` fields.
#[derive(Clone, Debug)]
pub struct AccessLine {
    /// The line as logged.
    pub raw: String,
    /// Fields by key (quotes removed).
    pub fields: HashMap<String, String>,
}

impl AccessLine {
    /// A field's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// Whether field `key` equals `value`.
    pub fn is(&self, key: &str, value: &str) -> bool {
        self.get(key) == Some(value)
    }

    /// A numeric field, 0 if absent or not a number.
    pub fn num(&self, key: &str) -> u64 {
        self.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

/// Access lines (target `access`, with a `direction=` field) of a log, the debug-level
/// `connection opened` left out; their fields start at `src.addr=` (ztunnel's first).
pub fn parse_access(log: &str) -> Vec<AccessLine> {
    // A last line still being written could lack its `end=`: it waits for the next read.
    ringtun_testbed::process::complete_lines(log)
        .lines()
        .filter(|l| {
            l.contains("access") && l.contains("direction=") && !l.contains("connection opened")
        })
        .map(|l| AccessLine {
            raw: l.to_owned(),
            fields: parse_fields(&l[l.find("src.addr=").unwrap_or(0)..]),
        })
        .collect()
}

/// Splits `a=1 b="x y" c=z` into a map.
pub fn parse_fields(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_owned();
        let after = &rest[eq + 1..];
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (q[..end].to_owned(), &q[end + 1..]),
                None => (q.to_owned(), ""),
            }
        } else {
            match after.find(' ') {
                Some(end) => (after[..end].to_owned(), &after[end..]),
                None => (after.to_owned(), ""),
            }
        };
        // A key with spaces means we ran into free text: keep only the last word.
        let key = key.rsplit(' ').next().unwrap_or_default().to_owned();
        out.insert(key, value);
        rest = next.trim_start();
    }
    out
}
