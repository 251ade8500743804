//! The benchmark's own processes (tunnel sides, cross-check servers), each in a process group
//! of its own, and the clean-up on SIGINT/SIGTERM/SIGHUP that kills them and deletes the
//! namespaces, since a signal skips destructors.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use ringtun_testbed::{sys, Process};

/// Process groups of the running [`Proc`]s.
static CHILD_GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
/// Namespaces to delete on a signal (their processes are killed first).
pub static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Blocks SIGINT, SIGTERM and SIGHUP and starts the thread that takes them: it kills the
/// recorded process groups and namespaces' processes, deletes the namespaces and exits 130.
/// Call it before any other thread starts.
pub fn install_signal_cleanup() {
    // SAFETY: plain signal-mask calls on a local set, before any other thread exists, so every
    // later thread inherits the mask and only the waiter below receives SIGINT/SIGTERM.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: sigwait on the set built above.
        unsafe { libc::sigwait(&set, &mut sig) };
        eprintln!("\nringtun-bench: signal {sig}, cleaning up");
        for g in CHILD_GROUPS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // SAFETY: kill(2) on the process group of a child we started.
            unsafe { libc::kill(-*g, libc::SIGKILL) };
        }
        for ns in NAMESPACES.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(p) = pid.parse::<i32>() {
                        if p as u32 != std::process::id() {
                            // SAFETY: kill(2) on a process inside a namespace we created.
                            unsafe { libc::kill(p, libc::SIGKILL) };
                        }
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        std::process::exit(130);
    });
}

/// How long a process gets to stop after SIGTERM before its group is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A process we started in its own process group (killed as a group on drop), recorded for
/// the clean-up on signals while it runs.
pub struct Proc(Process);

impl Proc {
    /// Starts `cmd` with its output in `log`; `name` is how errors call it.
    pub fn spawn(cmd: Command, name: &str, log: &Path) -> Result<Proc, String> {
        let p = Process::spawn_group(cmd, name, log).map_err(|e| e.to_string())?;
        CHILD_GROUPS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p.pid() as i32);
        Ok(Proc(p))
    }

    /// The process itself, e.g. to wait until it is ready.
    pub fn process(&mut self) -> &mut Process {
        &mut self.0
    }

    /// The process and its descendants.
    pub fn pids(&self) -> Vec<u32> {
        sys::tree(self.0.pid())
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        self.0.log()
    }

    /// Stops the group (SIGTERM, then SIGKILL after [`STOP_GRACE`]) and forgets it.
    pub fn stop(&mut self) {
        self.0.stop(STOP_GRACE);
        let g = self.0.pid() as i32;
        CHILD_GROUPS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&x| x != g);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The two halves of a running tunnel.
pub struct Tunnel {
    /// The client node's side.
    pub client: Proc,
    /// The server node's side.
    pub server: Proc,
}

impl Tunnel {
    /// Both sides' processes with their descendants: (client, server).
    pub fn pids(&self) -> (Vec<u32>, Vec<u32>) {
        (self.client.pids(), self.server.pids())
    }

    /// CPU seconds so far: (client, server).
    pub fn cpu(&self) -> (f64, f64) {
        let (c, s) = self.pids();
        (sys::cpu_of(&c), sys::cpu_of(&s))
    }

    /// Resident memory in KiB: (client, server).
    pub fn rss_kib(&self) -> (u64, u64) {
        let (c, s) = self.pids();
        (sys::rss_of(&c), sys::rss_of(&s))
    }
}
