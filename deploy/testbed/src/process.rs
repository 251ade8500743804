//! Processes the test bed starts (ringtun, ztunnel, the Python peers, iperf3…): their output
//! goes to a log file, they are waited for until ready, and they are stopped on drop (their log
//! printed if a test is failing).
//!
//! Readiness is asked, not read from a log: ringtun (like ztunnel) is ready when
//! `GET /healthz/ready` on its 15021 answers 200, which is what a kubelet asks too. A process
//! that exits while it is waited for fails at once, with the end of its log.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::netns::Netns;

/// Where ringtun and ztunnel answer readiness inside their network namespace (they bind 15021
/// on every address).
pub const READY_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15021));
/// The readiness path of ringtun and ztunnel.
pub const READY_PATH: &str = "/healthz/ready";
/// Lines of its log an error shows of a process that did not start.
const TAIL_LINES: usize = 40;
/// Pause between two looks at a starting process.
const POLL: Duration = Duration::from_millis(25);

/// A child process with its stdout and stderr in one log file; killed on drop.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    /// The child leads its own process group: signals go to the whole group (a wrapper such as
    /// `sh -c` or `strace` and what it started).
    group: bool,
    /// Set once the child is reaped, so that it is never signalled or waited for again.
    status: Option<ExitStatus>,
}

impl Process {
    /// Starts `cmd` with stdin closed and stdout and stderr appended to a new file `log`;
    /// `name` is how messages call it (e.g. "ringtun (client)").
    pub fn spawn(cmd: Command, name: &str, log: &Path) -> Result<Process> {
        Self::spawn_with(cmd, name, log, false)
    }

    /// [`Process::spawn`] in a process group of its own, signalled as a group: for commands
    /// that start further processes. A group does not see the terminal's Ctrl-C, so its
    /// starter must stop it (drop does).
    pub fn spawn_group(cmd: Command, name: &str, log: &Path) -> Result<Process> {
        Self::spawn_with(cmd, name, log, true)
    }

    fn spawn_with(mut cmd: Command, name: &str, log: &Path, group: bool) -> Result<Process> {
        let file =
            std::fs::File::create(log).map_err(Error::io(format!("creating {}", log.display())))?;
        let out = file
            .try_clone()
            .map_err(Error::io(format!("duplicating {}", log.display())))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(file);
        if group {
            cmd.process_group(0);
        }
        crate::sys::unblock_signals_in(&mut cmd);
        let child = cmd.spawn().map_err(Error::io(format!("starting {name}")))?;
        Ok(Process {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            group,
            status: None,
        })
    }

    /// How messages call the process.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id (with `ip netns exec`, the program's own: it execs the program).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything logged so far, colour sequences removed.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log(), lines)
    }

    /// Its exit status if it has exited (reaping it), `None` while it runs.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Whether the process still runs: not exited, not a zombie (read from `/proc`, so it
    /// needs no `&mut`).
    pub fn is_alive(&self) -> bool {
        if self.status.is_some() {
            return false;
        }
        // /proc/PID/stat is "pid (comm) STATE …"; comm may contain spaces, so look after ')'.
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().to_owned())
            })
            .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process, or to its group.
    pub fn signal(&self, signal: libc::c_int) -> Result<()> {
        if self.status.is_some() {
            return Err(Error::Invalid(format!("{} has already exited", self.name)));
        }
        let pid = self.child.id() as libc::pid_t;
        let target = if self.group { -pid } else { pid };
        // SAFETY: kill(2) on a child (or the group it leads) that has not been reaped yet, so
        // the pid cannot have been reused.
        let rc = unsafe { libc::kill(target, signal) };
        if rc == 0 {
            Ok(())
        } else {
            Err(Error::Io {
                context: format!("kill({target}, {signal}) of {}", self.name),
                source: std::io::Error::last_os_error(),
            })
        }
    }

    /// Waits up to `timeout` for the process to exit; its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asks the process to stop (SIGTERM), gives it `grace`, then kills it (SIGKILL, the whole
    /// group for a group) and reaps it. Does nothing once it has exited.
    pub fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        if !grace.is_zero() && self.signal(libc::SIGTERM).is_ok() {
            self.wait_exit(grace);
        }
        if self.group {
            // Even when the leader has exited, what it started may still run.
            // SAFETY: kill(2) on the group our own child leads; it has not been reaped yet.
            unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        }
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// Polls `ready` until it holds; fails at once if the process exits first, or after
    /// `timeout`, with the end of its log. `what` says what was waited for, for the error.
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&Process) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready(self) {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                return Err(Error::Exited {
                    name: self.name.clone(),
                    status: status.to_string(),
                    log_tail: self.log_tail(TAIL_LINES),
                });
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    name: self.name.clone(),
                    what: what.to_owned(),
                    waited: timeout,
                    log_tail: self.log_tail(TAIL_LINES),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the log has a line containing every one of `needles` and returns it; fails
    /// after `timeout`, whether or not the process still runs (a line may come as it exits).
    pub fn wait_log_line(&self, needles: &[&str], timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if let Some(l) = complete_lines(&log)
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return Ok(l.to_owned());
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    name: self.name.clone(),
                    what: format!("logging a line with {needles:?}"),
                    waited: timeout,
                    log_tail: tail(&log, TAIL_LINES),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until `GET /healthz/ready` on 127.0.0.1:15021 inside `ns` answers 200 (see
    /// [`Process::wait_until`] for the failures).
    pub fn wait_ready(&mut self, ns: &Netns, timeout: Duration) -> Result<()> {
        let what = format!("ready ({READY_PATH} on {READY_ADDR} in {})", ns.name());
        self.wait_until(&what, timeout, |_| {
            matches!(ns.enter(|| ready_status(READY_ADDR)), Ok(Ok(200)))
        })
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
        if std::thread::panicking() {
            eprintln!(
                "===== {} log {} =====\n{}\n===== end of {} log =====",
                self.name,
                self.log.display(),
                self.log(),
                self.name
            );
        }
    }
}

/// The status of `GET /healthz/ready` on `addr`, asked from the calling thread's namespace.
pub fn ready_status(addr: SocketAddr) -> std::io::Result<u16> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    http_request(s, "GET", READY_PATH, None).map(|(status, _)| status)
}

/// One HTTP/1.1 request on an open connection (`Connection: close`, an `Accept` header when
/// given); returns the status and the body.
pub fn http_request(
    mut s: TcpStream,
    method: &str,
    path: &str,
    accept: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: ringtun\r\n{accept}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP head in {raw:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// The part of a log read while its process writes it that ends in a newline: the last line
/// may still be half-written, and a match on it could be cut short.
pub fn complete_lines(log: &str) -> &str {
    log.rfind('\n').map_or("", |i| &log[..=i])
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Removes ANSI colour sequences, in case a log was written with colours.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_and_strip_ansi() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(strip_ansi("\u{1b}[2mINFO\u{1b}[0m ready"), "INFO ready");
    }

    #[test]
    fn a_process_that_exits_is_reported_with_its_log() {
        let dir = std::env::temp_dir().join(format!("ringtun-testbed-proc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let log = dir.join("exits.log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo starting; echo broken config >&2; exit 3"]);
        let mut p = Process::spawn(cmd, "exiter", &log).expect("spawn sh");
        let line = p
            .wait_log_line(&["broken", "config"], Duration::from_secs(10))
            .expect("its stderr is in the log");
        assert_eq!(line, "broken config");
        let err = p
            .wait_until("never", Duration::from_secs(10), |_| false)
            .expect_err("it exits");
        let msg = err.to_string();
        assert!(msg.contains("exiter exited"), "{msg}");
        assert!(
            msg.contains("broken config") && msg.contains("starting"),
            "{msg}"
        );
        assert!(!p.is_alive());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_process_that_hangs_times_out_and_is_stopped() {
        let dir = std::env::temp_dir().join(format!("ringtun-testbed-hang-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut p = Process::spawn_group(cmd, "sleeper", &dir.join("hang.log")).expect("spawn");
        let err = p
            .wait_until("awake", Duration::from_millis(200), |_| false)
            .expect_err("never ready");
        assert!(matches!(err, Error::NotReady { .. }), "{err}");
        assert!(p.is_alive());
        p.stop(Duration::from_secs(5));
        assert!(!p.is_alive());
        assert!(p.exited().is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
