//! The control thread: loads the config and certificates, starts the shards, hands them their
//! listeners and config snapshots, and watches the config file.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use sha2::{Digest, Sha256};

use crate::config::{self, Snapshot};
use crate::net;
use crate::options::{IoDriver, RunOptions};
use crate::shard::{self, ListenerKind, ShardEvent, ShardMsg};
use crate::tls::TlsMaterial;
use crate::EngineError;

/// A running ringtun: its shard handles, for callers that want to stop it (tests, demo).
pub struct Running {
    senders: Vec<Sender<ShardMsg>>,
    events: Receiver<ShardEvent>,
    threads: Vec<thread::JoinHandle<()>>,
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
    let ktls = crate::transport::startup(opts.ktls)?;
    let tls =
        Arc::new(TlsMaterial::load(&opts.certs, &opts.trust_domain)?.with_kernel_offload(ktls));
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
        "ringtun ready"
    );
    Ok(Running {
        senders,
        events: ev_rx,
        threads,
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
    let fut = shard::run(id, opts, tls, rx, events.clone(), snapshot);
    let built = match driver {
        IoDriver::Legacy => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(fut)),
        _ => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .with_entries(1024)
            .build()
            .map(|mut rt| rt.block_on(fut)),
    };
    if let Err(e) = built {
        let _ = events.send(ShardEvent::ListenFailed {
            shard: id,
            error: format!("runtime ({driver:?}) could not start: {e}"),
        });
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
    pub fn watch_config(&self, opts: &RunOptions) -> ! {
        let path = &opts.config_path;
        let mut last_stamp = stamp(path);
        let mut last_hash = std::fs::read(path).map(|b| Sha256::digest(&b)).ok();
        let mut generation = 1u64;
        loop {
            thread::sleep(opts.config_poll);
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
