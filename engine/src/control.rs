//! The control thread: loads the config and certificates, starts the shards, hands them their
//! listeners and config snapshots, and watches the config file.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use sha2::{Digest, Sha256};

use crate::admin::{self, Admin as _};
use crate::config::{self, Snapshot};
use crate::metrics::{ProcessInfo, ShardReport};
use crate::net;
use crate::options::{IoDriver, RunOptions, UringTaskrun};
use crate::shard::{self, ListenerKind, ShardEvent, ShardMsg};
use crate::tls::TlsMaterial;
use crate::EngineError;

/// A running ringtun: its shard handles, for callers that want to stop it (tests, demo).
pub struct Running {
    senders: Vec<Sender<ShardMsg>>,
    events: Receiver<ShardEvent>,
    threads: Vec<thread::JoinHandle<()>>,
    state: Arc<ControlState>,
    /// Addresses actually bound, per listener kind (useful with port 0).
    pub bound: Vec<(ListenerKind, SocketAddr)>,
}

fn announce_driver(choice: IoDriver) -> Result<IoDriver, EngineError> {
    let uring = monoio::utils::detect_uring();
    match (choice, uring) {
        (IoDriver::IoUring, false) => Err(EngineError::NoIoUring),
        (IoDriver::Auto, false) => {
            tracing::warn!("io_uring is not available here (kernel, seccomp or io_uring_disabled sysctl); running on the legacy epoll driver");
            Ok(IoDriver::Legacy)
        }
        (IoDriver::Auto, true) => Ok(IoDriver::IoUring),
        (c, _) => Ok(c),
    }
}

fn load_snapshot(path: &Path, generation: u64) -> Result<Snapshot, config::ConfigError> {
    let loaded = config::load(path)?;
    for w in &loaded.warnings {
        tracing::warn!(config = %path.display(), "{w}");
    }
    Ok(Snapshot::new(loaded.config, generation))
}

/// Starts the shards and listeners; returns once every listener accepts.
pub fn start(opts: RunOptions) -> Result<Running, EngineError> {
    let opts = Arc::new(opts);
    let snapshot = load_snapshot(&opts.config_path, 1)?;
    // Probed once here; every shard shares the result (logged by `startup`).
    let ktls = crate::stream::startup(opts.ktls)?;
    let tls = Arc::new(
        TlsMaterial::load(&opts.certs, &opts.trust_domain, opts.tls_cipher.into())?
            .with_kernel_offload(ktls),
    );
    net::check_mark(opts.mark).map_err(|e| EngineError::Mark {
        mark: opts.mark,
        source: e,
    })?;
    let driver = announce_driver(opts.io_driver)?;
    let workers = opts.workers.max(1);
    let cores = if opts.pin {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let (ev_tx, ev_rx) = crossbeam_channel::unbounded();
    let mut senders = Vec::with_capacity(workers);
    let mut threads = Vec::with_capacity(workers);
    for id in 0..workers {
        let (tx, rx) = crossbeam_channel::unbounded();
        let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
        let (opts, tls, ev_tx, snap) = (opts.clone(), tls.clone(), ev_tx.clone(), snapshot.clone());
        let handle = thread::Builder::new()
            .name(format!("ringtun-shard-{id}"))
            .spawn(move || shard_thread(id, core, driver, opts, tls, rx, ev_tx, snap))
            .map_err(EngineError::Thread)?;
        senders.push(tx);
        threads.push(handle);
    }
    drop(ev_tx);

    let mut expected = 0usize;
    let mut bound = Vec::new();
    let kinds = [
        (ListenerKind::Outbound, &opts.outbound),
        (ListenerKind::Inbound, &opts.inbound),
        (ListenerKind::InboundPlaintext, &opts.inbound_plaintext),
    ];
    for (kind, addrs) in kinds {
        for &addr in addrs.iter() {
            // One SO_REUSEPORT socket per shard: the kernel spreads connections by flow hash,
            // and each shard accepts only its own (see ARCHITECTURE.md).
            let mut port_addr = addr;
            for tx in &senders {
                let socket = net::reuseport_listener(port_addr)
                    .map_err(|source| EngineError::Listen { kind, addr, source })?;
                // Accepted connections inherit the listener's keepalive settings: set once here
                // instead of three syscalls per connection.
                if let Err(e) = net::set_keepalive(socket.as_raw_fd(), opts.tcp_keepalive) {
                    tracing::warn!(%addr, error = %e, "could not set TCP keepalive on the listener");
                }
                if port_addr.port() == 0 {
                    // Port 0: every shard must share the port the first one got.
                    port_addr = socket.local_addr().map_err(|source| EngineError::Listen {
                        kind,
                        addr,
                        source,
                    })?;
                }
                tx.send(ShardMsg::Listen { kind, socket })
                    .map_err(|_| EngineError::ShardDied)?;
                expected += 1;
            }
            bound.push((kind, port_addr));
        }
    }
    for _ in 0..expected {
        match ev_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(ShardEvent::Listening { .. } | ShardEvent::ConfigApplied { .. }) => {}
            Ok(ShardEvent::ListenFailed { shard, error }) => {
                return Err(EngineError::ShardListen { shard, error })
            }
            Err(_) => return Err(EngineError::ShardDied),
        }
    }
    tracing::info!(
        workers,
        driver = ?driver,
        identity = %tls.identity,
        tls = if tls.ktls.is_some() { "ktls" } else { "userspace" },
        config = %opts.config_path.display(),
        workloads = snapshot.config().workloads.len(),
        services = snapshot.config().services.len(),
        listeners = ?bound,
        mark = %format_args!("{:#x}", opts.mark),
        pool_max_streams = opts.pool.max_streams,
        pool_unused_release = ?opts.pool.idle_timeout,
        drain_deadline = ?opts.drain_timeout,
        "ringtun ready"
    );
    let state = Arc::new(ControlState {
        senders: senders.clone(),
        ready: AtomicBool::new(true),
        draining: AtomicBool::new(false),
        quit: AtomicBool::new(false),
        current: Mutex::new(snapshot),
        tls: tls.clone(),
        driver,
        workers,
    });
    Ok(Running {
        senders,
        events: ev_rx,
        threads,
        state,
        bound,
    })
}

#[allow(clippy::too_many_arguments)]
fn shard_thread(
    id: usize,
    core: Option<core_affinity::CoreId>,
    driver: IoDriver,
    opts: Arc<RunOptions>,
    tls: Arc<TlsMaterial>,
    rx: Receiver<ShardMsg>,
    events: Sender<ShardEvent>,
    snapshot: Snapshot,
) {
    if let Some(core) = core {
        if !core_affinity::set_for_current(core) {
            tracing::warn!(
                shard = id,
                core = core.id,
                "could not pin shard to its core"
            );
        }
    }
    let taskrun = opts.uring_taskrun;
    let fut = shard::run(id, opts, tls, rx, events.clone(), snapshot);
    let built = match driver {
        IoDriver::Legacy => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(fut)),
        _ => uring_runtime(id, taskrun).map(|mut rt| rt.block_on(fut)),
    };
    if let Err(e) = built {
        let _ = events.send(ShardEvent::ListenFailed {
            shard: id,
            error: format!("runtime ({driver:?}) could not start: {e}"),
        });
    }
}

/// An io_uring runtime with the setup flags asked for, or the next variant down where the
/// kernel refuses them (EINVAL: flags it does not know).
fn uring_runtime(
    shard: usize,
    want: UringTaskrun,
) -> std::io::Result<monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>> {
    let mut taskrun = want;
    loop {
        let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .with_entries(1024)
            .uring_builder(taskrun.builder())
            .build();
        match (built, taskrun.fallback()) {
            (Err(e), Some(next)) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(shard, refused = ?taskrun, trying = ?next, "io_uring setup flags not supported by this kernel");
                taskrun = next;
            }
            (built, _) => {
                if built.is_ok() && taskrun != want && shard == 0 {
                    tracing::warn!(wanted = ?want, using = ?taskrun, "io_uring task work: the kernel lacks the flags asked for (--uring-taskrun)");
                }
                return built;
            }
        }
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts afterwards, so
/// the control thread can take them with `sigtimedwait` instead of dying.
pub fn block_signals() {
    // SAFETY: plain signal-mask calls on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits up to `timeout` for SIGTERM or SIGINT; returns the signal's name if one came.
fn wait_signal(timeout: Duration) -> Option<&'static str> {
    // SAFETY: sigtimedwait on a local set with a valid timespec; info may stay unread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        match libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) {
            libc::SIGTERM => Some("SIGTERM"),
            libc::SIGINT => Some("SIGINT"),
            _ => None,
        }
    }
}

/// What the admin endpoints see of the running proxy; lives on the control side.
struct ControlState {
    senders: Vec<Sender<ShardMsg>>,
    ready: AtomicBool,
    draining: AtomicBool,
    quit: AtomicBool,
    current: Mutex<Snapshot>,
    tls: Arc<TlsMaterial>,
    driver: IoDriver,
    workers: usize,
}

impl admin::Admin for ControlState {
    fn scrape(&self) -> Vec<ShardReport> {
        let (tx, rx) = crossbeam_channel::bounded(self.senders.len());
        let asked = self
            .senders
            .iter()
            .filter(|s| s.send(ShardMsg::Scrape(tx.clone())).is_ok())
            .count();
        let mut out: Vec<ShardReport> = (0..asked)
            .filter_map(|_| rx.recv_timeout(Duration::from_secs(2)).ok())
            .collect();
        out.sort_by_key(|r| r.shard);
        out
    }

    fn info(&self) -> ProcessInfo {
        ProcessInfo {
            driver: match self.driver {
                IoDriver::Legacy => "legacy".into(),
                _ => "io_uring".into(),
            },
            ktls_available: self.tls.ktls.is_some(),
            draining: self.draining.load(Ordering::Relaxed),
        }
    }

    fn ready(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("draining".into());
        }
        if !self.ready.load(Ordering::Relaxed) {
            return Err("starting".into());
        }
        Ok(())
    }

    fn config_dump(&self) -> String {
        let Ok(snap) = self.current.lock() else {
            return "{}".into();
        };
        let c = snap.config();
        let workloads: Vec<_> = c
            .workloads
            .iter()
            .map(|w| {
                serde_json::json!({
                    "uid": w.uid, "name": w.name, "namespace": w.namespace,
                    "serviceAccount": w.service_account,
                    "workloadIps": w.workload_ips.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                    "protocol": format!("{:?}", w.protocol).to_uppercase(),
                    "node": w.node, "network": w.network, "services": w.services,
                    "authorizationPolicies": w.authorization_policies,
                })
            })
            .collect();
        let services: Vec<_> = c
            .services
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name, "namespace": s.namespace, "hostname": s.hostname,
                    "vips": s.vips.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
                    "ports": s.ports, "subjectAltNames": s.subject_alt_names,
                })
            })
            .collect();
        let policies: Vec<_> = c
            .policies
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name, "namespace": p.namespace,
                    "scope": format!("{:?}", p.scope), "action": format!("{:?}", p.action),
                    "rules": p.rules.len(), "dryRun": p.dry_run,
                })
            })
            .collect();
        serde_json::json!({
            "configGeneration": snap.generation,
            "workloads": workloads,
            "services": services,
            "policies": policies,
            "certificates": [{
                "identity": self.tls.identity.to_string(),
                "notAfterUnix": self.tls.not_after,
            }],
            "shards": self.workers,
            "driver": self.info().driver,
            "ktls": self.tls.ktls.as_ref().map(|k| format!("{k:?}")),
            "draining": self.draining.load(Ordering::Relaxed),
        })
        .to_string()
    }

    fn set_log_level(&self, level: &str) -> Result<String, String> {
        crate::cli::set_log_filter(level)
    }

    fn log_level(&self) -> String {
        crate::cli::log_filter()
    }

    fn reset_log_level(&self) -> Result<String, String> {
        crate::cli::reset_log_filter()
    }

    fn quit(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.quit.store(true, Ordering::Relaxed);
    }
}

/// Identifies a version of the config file cheaply (metadata) and exactly (content hash).
#[derive(PartialEq, Eq, Clone)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    // metadata() follows symlinks, so a Kubernetes ConfigMap's "..data" swap is seen too.
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    })
}

impl Running {
    /// Watches the config file until the process is stopped; a valid change is sent to every
    /// shard, an invalid one is logged and the previous config stays in force.
    ///
    /// SIGTERM, SIGINT or `/quitquitquit` start a drain (see [`Running::drain`]); this returns
    /// when the drain is over. The caller must have blocked those signals with
    /// [`block_signals`] before [`start`], so that they queue for this thread.
    pub fn serve(self, opts: &RunOptions) -> Result<(), EngineError> {
        let admin: Arc<dyn admin::Admin> = self.state.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let bound =
            admin::serve(admin, &opts.admin_listeners, stop.clone()).map_err(EngineError::Admin)?;
        tracing::info!(endpoints = ?bound, "metrics, readiness and admin endpoints up");
        let path = &opts.config_path;
        let mut last_stamp = stamp(path);
        let mut last_hash = std::fs::read(path).map(|b| Sha256::digest(&b)).ok();
        let mut generation = 1u64;
        // /quitquitquit sets a flag from an admin thread; waking every tick (not every config
        // poll) lets the drain reach the shards' listeners within a tick of the request.
        let tick = opts.config_poll.min(Duration::from_millis(50));
        let mut next_poll = std::time::Instant::now() + opts.config_poll;
        loop {
            if let Some(sig) = wait_signal(tick) {
                tracing::info!(signal = sig, "signal received; draining");
                break;
            }
            if self.state.quit.load(Ordering::Relaxed) {
                tracing::info!("/quitquitquit received; draining");
                break;
            }
            if std::time::Instant::now() < next_poll {
                continue;
            }
            next_poll = std::time::Instant::now() + opts.config_poll;
            let now = stamp(path);
            if now == last_stamp {
                continue;
            }
            last_stamp = now;
            let Ok(bytes) = std::fs::read(path) else {
                tracing::error!(config = %path.display(), "config file unreadable; keeping the previous config");
                continue;
            };
            let hash = Sha256::digest(&bytes);
            if Some(hash) == last_hash {
                continue;
            }
            last_hash = Some(hash);
            match load_snapshot(path, generation + 1) {
                Ok(snap) => {
                    generation += 1;
                    for tx in &self.senders {
                        let _ = tx.send(ShardMsg::Config(Box::new(snap.clone())));
                    }
                    // Announce the reload only once every shard uses it, so "reloaded" in the
                    // log means new connections see the new config.
                    self.await_applied(generation);
                    if let Ok(mut cur) = self.state.current.lock() {
                        *cur = snap.clone();
                    }
                    tracing::info!(
                        generation,
                        workloads = snap.config().workloads.len(),
                        services = snap.config().services.len(),
                        "config reloaded"
                    );
                }
                Err(e) => {
                    tracing::error!("config reload failed, keeping generation {generation}: {e}");
                }
            }
        }
        self.drain(opts.drain_timeout);
        stop.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Graceful drain: readiness fails at once, listeners stop accepting, HBONE peers get
    /// GOAWAY, and live connections have until `deadline` to finish; whatever is left then is
    /// closed when the process exits.
    pub fn drain(&self, deadline: Duration) {
        self.state.draining.store(true, Ordering::Relaxed);
        for tx in &self.senders {
            let _ = tx.send(ShardMsg::Drain);
        }
        let until = std::time::Instant::now() + deadline;
        loop {
            let open: u64 = self
                .state
                .scrape()
                .iter()
                .map(|r| r.gauges.open_connections)
                .sum();
            if open == 0 {
                tracing::info!("drained: no connections left");
                return;
            }
            if std::time::Instant::now() >= until {
                tracing::warn!(
                    open,
                    ?deadline,
                    "drain deadline reached; closing what is left"
                );
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn await_applied(&self, generation: u64) {
        let mut pending = self.senders.len();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pending > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ShardEvent::ConfigApplied { generation: g, .. }) if g == generation => {
                    pending -= 1
                }
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(generation, pending, "shards slow to apply the new config");
                    return;
                }
            }
        }
    }

    /// Stops the shards (closing their channels) and waits for them.
    pub fn stop(self) {
        drop(self.senders);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
