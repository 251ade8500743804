//! A `perf record` running beside a measurement (`--profile`, `--hops`): started before the
//! load, stopped after it, its file read back with `perf script`.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ringtun_testbed::sys;

/// How long perf gets to write its file once asked to stop.
const STOP_WAIT: Duration = Duration::from_secs(30);
/// How long perf gets to open its events.
const START_WAIT: Duration = Duration::from_secs(5);

/// Checks that perf is there (`flag` names the option that needs it).
pub fn check(flag: &str) -> Result<(), String> {
    let ok = Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{flag} needs perf (linux-perf on Debian) on the PATH"
        ))
    }
}

/// A running `perf record -o FILE ARGS…`.
pub struct PerfRecord {
    child: Child,
    file: PathBuf,
}

impl PerfRecord {
    /// Starts `perf record` with `args` into `file`; returns once perf has opened its events.
    pub fn start(args: &[&str], file: PathBuf) -> Result<PerfRecord, String> {
        let mut cmd = Command::new("perf");
        cmd.args(["record", "-q"])
            .args(args)
            .arg("-o")
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // It is stopped with SIGINT, which the bench's threads block.
        sys::unblock_signals_in(&mut cmd);
        let child = cmd.spawn().map_err(|e| format!("`perf record`: {e}"))?;
        // Dropped (and killed) on every error below.
        let mut rec = PerfRecord { child, file };
        // perf writes its file's header once its events are open.
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Ok(Some(status)) = rec.child.try_wait() {
                return Err(format!("perf record exited at once ({status})"));
            }
            if std::fs::metadata(&rec.file).is_ok_and(|m| m.len() > 0) {
                // The header comes just before the events are enabled.
                std::thread::sleep(Duration::from_millis(50));
                return Ok(rec);
            }
            if Instant::now() > deadline {
                return Err(format!("perf record did not start within {START_WAIT:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops recording and returns `perf script -F FIELDS` of what it wrote.
    pub fn finish(mut self, fields: &str) -> Result<String, String> {
        // SAFETY: kill(2) on the perf process this recording started and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.wait(STOP_WAIT)?;
        // perf writes its file on SIGINT and then may end by the signal itself.
        let stopped = status.signal() == Some(libc::SIGINT) || status.code() == Some(130);
        if !status.success() && !stopped {
            return Err(format!("perf record ended with {status}"));
        }
        script(&self.file, fields)
    }

    /// Waits for perf to end, killing it after `limit`.
    fn wait(&mut self, limit: Duration) -> Result<std::process::ExitStatus, String> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!("perf record did not stop within {limit:?}"));
                }
                Err(e) => return Err(format!("perf record: {e}")),
            }
        }
    }
}

impl Drop for PerfRecord {
    /// A recording abandoned on an error path does not stay attached.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `perf script -F FIELDS -i FILE`, as text.
fn script(file: &Path, fields: &str) -> Result<String, String> {
    let out = Command::new("perf")
        .args(["script", "-F", fields, "-i"])
        .arg(file)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("perf script: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "perf script on {} ended with {}",
            file.display(),
            out.status
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
