//! The benchmark's own processes (tunnel sides, cross-check servers), each in a process group
//! of its own, and the clean-up on SIGINT/SIGTERM/SIGHUP that kills them and deletes the
//! namespaces, since a signal skips destructors.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use ringtun_testbed::{netns, sys, Netns, Process};

/// Process groups of the running [`Proc`]s.
static CHILD_GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
/// Namespaces to delete on a signal (their processes are killed first).
pub static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Blocks SIGINT, SIGTERM and SIGHUP and starts the thread that takes them: it kills the
/// recorded process groups and namespaces' processes, deletes the namespaces and exits 130.
/// Call it before any other thread starts.
pub fn install_signal_cleanup() {
    let set = sys::block_signals(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP]);
    std::thread::spawn(move || {
        let sig = sys::wait_signal(&set);
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
            let _ = netns::teardown(ns);
        }
        std::process::exit(130);
    });
}

/// How long a process gets to stop after SIGTERM before its group is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A process we started in its own process group (killed as a group on drop), recorded for
/// the clean-up on signals while it runs; an in-pod tunnel side also owns its node agent and
/// its node's namespace, which go after it.
pub struct Proc(Process, Option<Node>);

/// What an in-pod tunnel side runs beside it: the node agent that hands it the pod, and the
/// node namespace it runs in.
pub struct Node {
    /// The fake istio-cni node agent (`tests/peers/node_agent.py`).
    pub agent: Process,
    /// The node's namespace.
    pub ns: Netns,
}

impl Proc {
    /// Starts `cmd` with its output in `log`; `name` is how errors call it.
    pub fn spawn(cmd: Command, name: &str, log: &Path) -> Result<Proc, String> {
        let p = Process::spawn_group(cmd, name, log).map_err(|e| e.to_string())?;
        CHILD_GROUPS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(p.pid() as i32);
        Ok(Proc(p, None))
    }

    /// Gives the process its node agent and node namespace, stopped and deleted after it.
    pub fn with_node(mut self, node: Node) -> Proc {
        self.1 = Some(node);
        self
    }

    /// The process itself, e.g. to wait until it is ready.
    pub fn process(&mut self) -> &mut Process {
        &mut self.0
    }

    /// Waits until an in-pod side answers ready on 15021 in its node namespace.
    pub fn wait_ready_in_node(&mut self, timeout: Duration) -> Result<(), String> {
        let Proc(p, Some(node)) = self else {
            return Err("an in-pod side without its node".into());
        };
        p.wait_ready(&node.ns, timeout).map_err(|e| e.to_string())
    }

    /// The process itself (the group leader).
    pub fn pid(&self) -> u32 {
        self.0.pid()
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
        if let Some(node) = &mut self.1 {
            node.agent.stop(Duration::ZERO);
        }
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

/// What a tunnel's processes used so far.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    /// CPU seconds: (client, server).
    pub cpu: (f64, f64),
    /// The kernel's part of the CPU seconds, both sides together.
    pub kernel: f64,
    /// Voluntary context switches (times a thread slept waiting): (client, server).
    pub sleeps: (u64, u64),
}

impl Tunnel {
    /// Both sides' processes with their descendants: (client, server).
    pub fn pids(&self) -> (Vec<u32>, Vec<u32>) {
        (self.client.pids(), self.server.pids())
    }

    /// CPU and sleeps so far, both sides' processes found once (a walk of all of `/proc`).
    pub fn usage(&self) -> Usage {
        let (c, s) = self.pids();
        Usage {
            cpu: (sys::cpu_of(&c), sys::cpu_of(&s)),
            kernel: sys::kernel_of(&c) + sys::kernel_of(&s),
            sleeps: (
                sys::voluntary_switches_of(&c),
                sys::voluntary_switches_of(&s),
            ),
        }
    }

    /// Resident memory in KiB: (client, server).
    pub fn rss_kib(&self) -> (u64, u64) {
        let (c, s) = self.pids();
        (sys::rss_of(&c), sys::rss_of(&s))
    }
}
