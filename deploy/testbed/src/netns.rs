//! Named network namespaces: created with `ip netns add`, entered by threads with `setns(2)`,
//! given nftables capture rules the way Istio ambient's CNI would, and deleted on drop (processes
//! still running inside are killed first), including while a test panics. Namespaces leaked by a
//! killed process are swept by the next one that creates a namespace.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The longest name Linux accepts for a network interface (`IFNAMSIZ - 1`); namespace names are
/// kept within it too so that a name can double as an interface name.
pub const MAX_NAME_LEN: usize = 15;

/// Directory where `ip netns` keeps the bind mounts that pin named namespaces.
const NETNS_RUN_DIR: &str = "/run/netns";

/// Directory of owner records (`NAME` → "pid starttime") of the namespaces this crate created,
/// so that namespaces leaked by a killed process (SIGKILL skips destructors, e.g. a test runner
/// timing out) are removed by the next process that creates one. The name is from before the
/// crate was called `ringtun-testbed`: records left by older builds are still swept.
const OWNERS_DIR: &str = "/run/ringtun-topology";

/// The default firewall mark ringtun puts on sockets it originates (ztunnel uses the same).
pub const DEFAULT_MARK: u32 = 0x539;

/// Fails with [`Error::NotRoot`] unless the effective uid is 0.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        Ok(())
    } else {
        Err(Error::NotRoot { euid })
    }
}

/// Renders a command line for error messages.
fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion (optionally feeding `stdin`) and fails with its stderr unless it
/// exits successfully.
fn run_checked(cmd: &mut Command, stdin: Option<&str>) -> Result<Output> {
    let command = describe(cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().map_err(|e| Error::Command {
        command: command.clone(),
        status: format!("could not start: {e}"),
        stderr: String::new(),
    })?;
    if let Some(input) = stdin {
        // Take the handle so it is closed (EOF for the child) before waiting.
        if let Some(mut pipe) = child.stdin.take() {
            pipe.write_all(input.as_bytes()).map_err(|e| Error::Io {
                context: format!("writing stdin of `{command}`"),
                source: e,
            })?;
        }
    }
    let out = child.wait_with_output().map_err(|e| Error::Io {
        context: format!("waiting for `{command}`"),
        source: e,
    })?;
    if out.status.success() {
        Ok(out)
    } else {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if let Some(input) = stdin {
            // nft reports line numbers of its script, so show the script too.
            let _ = write!(stderr, "\n--- input ---\n{input}");
        }
        Err(Error::Command {
            command,
            status: out.status.to_string(),
            stderr,
        })
    }
}

/// Runs a program with arguments, failing with its stderr; returns stdout.
pub(crate) fn run_args<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = run_checked(Command::new(program).args(args), None)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Lists the named network namespaces (`ip netns list`), names only.
pub fn list_netns() -> Result<Vec<String>> {
    let out = run_args("ip", ["netns", "list"])?;
    // Lines look like `name` or `name (id: 3)`.
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Digits used for compact, interface-name-safe name parts.
const BASE36: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

fn base36(mut n: u64) -> String {
    let mut digits = Vec::new();
    loop {
        digits.push(BASE36[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    String::from_utf8_lossy(&digits).into_owned()
}

/// A few random bits without pulling in an RNG crate: std's `RandomState` is seeded from the OS
/// per instance, and mixing in the time keeps successive calls apart.
pub(crate) fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    h.write_u128(nanos);
    h.finish()
}

/// Per-process counter so that names created by one process never collide with each other.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Builds `prefix + pid + counter + 2 random chars`, shortening the prefix if the whole would
/// exceed [`MAX_NAME_LEN`]. The pid keeps parallel test processes apart, the random part keeps a
/// recycled pid from colliding with a namespace leaked by a killed run.
fn unique_name(prefix: &str) -> Result<String> {
    if !prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Error::Invalid(format!(
            "namespace prefix {prefix:?} may only contain ASCII letters, digits, '-' and '_'"
        )));
    }
    let pid = base36(u64::from(std::process::id()));
    let ctr = base36(u64::from(COUNTER.fetch_add(1, Ordering::Relaxed)));
    let rnd = base36(random_u64() % (36 * 36));
    let rnd = format!("{rnd:0>2}");
    let tail = format!("{pid}{ctr}{rnd}");
    if tail.len() >= MAX_NAME_LEN {
        return Err(Error::Invalid(format!(
            "cannot build a unique name of at most {MAX_NAME_LEN} chars (suffix {tail})"
        )));
    }
    let keep = prefix.len().min(MAX_NAME_LEN - tail.len());
    Ok(format!("{}{tail}", &prefix[..keep]))
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Cleared by [`Netns::delete`] so that drop does not delete twice.
    armed: bool,
}

impl Netns {
    /// Creates a fresh namespace named `prefix` + a unique suffix (at most 15 chars in all; the
    /// prefix is shortened if needed, so keep it to ~5 chars) with its loopback up.
    pub fn new(prefix: &str) -> Result<Self> {
        require_root()?;
        // Best effort: a failure to clean up someone else's leftovers must not fail this test.
        let _ = sweep_stale();
        let mut last_err = None;
        // A collision is only possible with a namespace leaked by an earlier process that had
        // the same pid; a new random suffix resolves it.
        for _ in 0..8 {
            let name = unique_name(prefix)?;
            if std::path::Path::new(NETNS_RUN_DIR).join(&name).exists() {
                continue;
            }
            match run_args("ip", ["netns", "add", name.as_str()]) {
                Ok(_) => {
                    let ns = Netns { name, armed: true };
                    record_owner(&ns.name)?;
                    // From here on drop cleans up if a later step fails.
                    ns.ip(["link", "set", "lo", "up"])?;
                    return Ok(ns);
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| {
            Error::Invalid(format!("no free namespace name for prefix {prefix:?}"))
        }))
    }

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that pins the namespace (`/run/netns/NAME`), usable with `setns(2)`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_RUN_DIR).join(&self.name)
    }

    /// A [`Command`] for `program` prefilled with `ip netns exec NAME`, to be given arguments and
    /// spawned by the caller. `ip netns exec` execs the program, so the child's pid is the
    /// program's.
    pub fn exec<S: AsRef<OsStr>>(&self, program: S) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.name.as_str()]).arg(program);
        cmd
    }

    /// Runs `program args…` inside the namespace to completion; returns its stdout, or an error
    /// carrying its stderr.
    pub fn run<I, S>(&self, program: &str, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = run_checked(self.exec(program).args(args), None)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ip -n NAME args…` (cheaper than `ip netns exec`); returns stdout.
    pub fn ip<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", self.name.as_str()]).args(args);
        let out = run_checked(&mut cmd, None)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sets sysctls (`key=value`) inside the namespace.
    pub fn sysctl(&self, settings: &[&str]) -> Result<()> {
        let mut args = vec!["-q", "-w"];
        args.extend_from_slice(settings);
        self.run("sysctl", args).map(drop)
    }

    /// Loads an nftables script (`nft -f -`) into the namespace.
    pub fn nft(&self, script: &str) -> Result<()> {
        run_checked(self.exec("nft").args(["-f", "-"]), Some(script)).map(drop)
    }

    /// The namespace's nftables ruleset (`nft list ruleset`), for diagnostics.
    pub fn nft_ruleset(&self) -> Result<String> {
        self.run("nft", ["list", "ruleset"])
    }

    /// Adds an address (`10.77.0.9/24`, `fd77::9/64`) to an interface; IPv6 addresses skip DAD
    /// so they are usable at once.
    pub fn add_address(&self, dev: &str, cidr: &str) -> Result<()> {
        let mut args = vec!["addr", "add", cidr, "dev", dev];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ip(args).map(drop)
    }

    /// Runs `f` on a fresh thread that has joined this namespace (`setns(CLONE_NEWNET)`) and
    /// returns its result; a panic in `f` is propagated. Sockets created by `f` stay in the
    /// namespace for their whole life, whichever thread uses them afterwards.
    pub fn enter<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        // Opened here so that a missing namespace is an error of the caller, not a panic.
        let file = self.open()?;
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                setns_net(&file)?;
                Ok(f())
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Spawns a named thread that joins this namespace and then runs `f` (for servers that
    /// outlive the caller's scope).
    pub fn spawn<F, R>(&self, thread_name: &str, f: F) -> Result<JoinHandle<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = self.open()?;
        let ns = self.name.clone();
        std::thread::Builder::new()
            .name(thread_name.to_owned())
            .spawn(move || {
                if let Err(e) = setns_net(&file) {
                    // The caller cannot get a Result from a detached thread's start; failing
                    // loudly beats running silently in the wrong namespace.
                    panic!("joining network namespace {ns}: {e}");
                }
                f()
            })
            .map_err(|e| Error::Io {
                context: format!("spawning thread {thread_name}"),
                source: e,
            })
    }

    fn open(&self) -> Result<File> {
        File::open(self.path()).map_err(|e| Error::Io {
            context: format!("opening {}", self.path().display()),
            source: e,
        })
    }

    /// Pids of processes whose network namespace is this one (`ip netns pids`).
    pub fn pids(&self) -> Result<Vec<u32>> {
        let out = run_args("ip", ["netns", "pids", self.name.as_str()])?;
        Ok(out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// Redirects TCP connections that processes in this namespace open to other hosts into
    /// `port` on this host (ringtun's outbound capture, 15001), the way istio-cni does: sockets
    /// carrying `mark` (ringtun's own), loopback traffic and 127.0.0.0/8 are left alone. Covers
    /// IPv4 and IPv6 (`inet` table `ringtun`, chain `output`).
    pub fn capture_outbound(&self, port: u16, mark: u32) -> Result<()> {
        self.nft(&outbound_capture_script(port, mark))
    }

    /// Redirects TCP connections arriving from outside into `port` on this host (ringtun's
    /// plaintext inbound capture, 15006), except those for `except_ports` (HBONE 15008, the
    /// health and metrics ports 15020/15021). Loopback traffic is left alone. IPv4 and IPv6
    /// (`inet` table `ringtun`, chain `prerouting`).
    pub fn capture_inbound(&self, port: u16, except_ports: &[u16]) -> Result<()> {
        self.nft(&inbound_capture_script(port, except_ports))
    }

    /// Deletes the namespace now, reporting failures (drop does the same but can only log).
    pub fn delete(mut self) -> Result<()> {
        self.armed = false;
        teardown(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = teardown(&self.name) {
                // Drop cannot fail; stderr is what a test run shows.
                eprintln!("ringtun-testbed: tearing down netns {}: {e}", self.name);
            }
        }
    }
}

/// Kills whatever still runs in the namespace `name`, then deletes it (what dropping a [`Netns`]
/// does; for clean-up paths that cannot run destructors, such as a signal handler's).
pub fn teardown(name: &str) -> Result<()> {
    let me = std::process::id();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = run_args("ip", ["netns", "pids", name])?;
        let pids: Vec<i32> = out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            // Never our own process: a stray setns of the main thread must not kill the runner.
            .filter(|&p: &i32| p > 0 && p as u32 != me)
            .collect();
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            // SAFETY: plain kill(2) on a pid we just listed; ESRCH (already gone) is fine.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    run_args("ip", ["netns", "del", name])?;
    let _ = std::fs::remove_file(std::path::Path::new(OWNERS_DIR).join(name));
    Ok(())
}

/// Start time of a process (clock ticks since boot, field 22 of `/proc/PID/stat`); it tells a
/// live owner from an unrelated process that got the same pid later.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn record_owner(name: &str) -> Result<()> {
    let io = |context: String| move |source| Error::Io { context, source };
    std::fs::create_dir_all(OWNERS_DIR).map_err(io(format!("creating {OWNERS_DIR}")))?;
    let pid = std::process::id();
    let start = process_start_time(pid).unwrap_or_default();
    let path = std::path::Path::new(OWNERS_DIR).join(name);
    std::fs::write(&path, format!("{pid} {start}\n"))
        .map_err(io(format!("writing {}", path.display())))
}

/// Deletes namespaces created by this crate whose owning process is gone (killed before its
/// destructors ran), with anything still running in them; returns their names. Called by
/// [`Netns::new`]; namespaces of live processes are never touched.
pub fn sweep_stale() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(OWNERS_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Io {
                context: format!("reading {OWNERS_DIR}"),
                source: e,
            })
        }
    };
    let mut swept = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let mut parts = text.split_whitespace().map(|p| p.parse::<u64>().ok());
        let (Some(Some(pid)), Some(Some(start))) = (parts.next(), parts.next()) else {
            continue;
        };
        let alive = u32::try_from(pid)
            .ok()
            .and_then(process_start_time)
            .is_some_and(|s| s == start);
        if alive {
            continue;
        }
        if std::path::Path::new(NETNS_RUN_DIR).join(&name).exists() {
            // Another process may be sweeping the same leftover: losing that race is fine.
            if teardown(&name).is_err() {
                continue;
            }
        }
        let _ = std::fs::remove_file(entry.path());
        swept.push(name);
    }
    Ok(swept)
}

fn setns_net(file: &File) -> Result<()> {
    // SAFETY: setns on a valid open fd; it only changes the calling thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Io {
            context: "setns(CLONE_NEWNET)".into(),
            source: std::io::Error::last_os_error(),
        })
    }
}

/// The nftables script behind [`Netns::capture_outbound`] (exposed for docs and the demo).
pub fn outbound_capture_script(port: u16, mark: u32) -> String {
    format!(
        "table inet ringtun {{\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\tmeta mark {mark:#x} return\n\
         \t\toifname \"lo\" return\n\
         \t\tip daddr 127.0.0.0/8 return\n\
         \t\tip6 daddr ::1 return\n\
         \t\tmeta l4proto tcp redirect to :{port}\n\
         \t}}\n\
         }}\n"
    )
}

/// The nftables script behind [`Netns::capture_inbound`].
pub fn inbound_capture_script(port: u16, except_ports: &[u16]) -> String {
    let mut except = String::new();
    if !except_ports.is_empty() {
        let list: Vec<String> = except_ports.iter().map(u16::to_string).collect();
        except = format!("\t\ttcp dport {{ {} }} return\n", list.join(", "));
    }
    format!(
        "table inet ringtun {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority -100; policy accept;\n\
         \t\tiifname \"lo\" return\n\
         {except}\
         \t\tmeta l4proto tcp redirect to :{port}\n\
         \t}}\n\
         }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn names_are_unique_and_short() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let n = unique_name("rtlong-prefix").expect("name");
            assert!(n.len() <= MAX_NAME_LEN, "{n} too long");
            assert!(seen.insert(n));
        }
        assert!(unique_name("bad/prefix").is_err());
    }

    #[test]
    fn scripts_mention_the_essentials() {
        let s = outbound_capture_script(15001, DEFAULT_MARK);
        assert!(s.contains("meta mark 0x539 return"));
        assert!(s.contains("redirect to :15001"));
        let s = inbound_capture_script(15006, &[15008, 15020, 15021]);
        assert!(s.contains("tcp dport { 15008, 15020, 15021 } return"));
        assert!(s.contains("redirect to :15006"));
    }

    #[test]
    fn netns_create_enter_and_teardown() {
        let ns = Netns::new("rtu").expect("create netns");
        let name = ns.name().to_owned();
        assert!(list_netns().expect("list").contains(&name));
        // The loopback is up and a socket bound inside is invisible outside.
        let port = ns
            .enter(|| {
                let l = TcpListener::bind("127.0.0.1:0").expect("bind inside");
                let port = l.local_addr().expect("addr").port();
                let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect inside");
                let (mut s, _) = l.accept().expect("accept");
                c.write_all(b"ping").expect("write");
                let mut buf = [0u8; 4];
                s.read_exact(&mut buf).expect("read");
                assert_eq!(&buf, b"ping");
                port
            })
            .expect("enter");
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        // A process left running inside is killed by teardown.
        let mut child = ns
            .exec("sleep")
            .arg("300")
            .spawn()
            .expect("spawn sleep in netns");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ns.pids().expect("pids").contains(&child.id()) {
            assert!(Instant::now() < deadline, "sleep never showed up in netns");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(ns);
        let status = child.wait().expect("wait sleep");
        assert!(!status.success(), "sleep should have been killed");
        assert!(!list_netns().expect("list").contains(&name));
    }

    #[test]
    fn netns_removed_on_panic() {
        let name = std::sync::Mutex::new(String::new());
        let r = std::panic::catch_unwind(|| {
            let ns = Netns::new("rtp").expect("create netns");
            *name.lock().expect("lock") = ns.name().to_owned();
            panic!("test panic with a live namespace");
        });
        assert!(r.is_err());
        let name = name.into_inner().expect("lock");
        assert!(!name.is_empty());
        assert!(!list_netns().expect("list").contains(&name));
    }

    #[test]
    fn stale_namespaces_are_swept() {
        // Simulate a namespace leaked by a killed process: create one, then rewrite its owner
        // record to a pid that cannot be alive (pid_max is at most 2^22).
        let ns = Netns::new("rts").expect("create netns");
        let name = ns.name().to_owned();
        std::mem::forget(ns);
        let record = std::path::Path::new(OWNERS_DIR).join(&name);
        std::fs::write(&record, "4194305 1\n").expect("fake owner record");
        let swept = sweep_stale().expect("sweep");
        assert!(swept.contains(&name), "{name} not swept: {swept:?}");
        assert!(!list_netns().expect("list").contains(&name));
        assert!(!record.exists());
        // Our own live namespaces are left alone.
        let live = Netns::new("rts").expect("create netns");
        sweep_stale().expect("sweep");
        assert!(list_netns()
            .expect("list")
            .contains(&live.name().to_owned()));
    }
}
