//! The control thread: loads the config and certificates (`certs.rs`: files, the in-pod
//! signer, or istiod's CA in `ca.rs`), starts the shards, hands them their
//! listeners and config snapshots, serves the operator endpoints, watches the config source (the
//! file, or istiod over xDS: `source.rs`) and the signals, and drains.
//!
//! [`start`] brings the proxy up and returns once every shard listens; [`Running::serve`] then
//! watches until a signal or `/quitquitquit` starts the drain. What the operator endpoints see
//! of all this is `ControlState` (in `state.rs`), handed to `operate` as its [`Admin`].

mod ca;
mod certs;
mod pods;
mod process;
mod runtime;
mod source;
mod state;
mod watch;

pub use process::{block_signals, raise_nofile};

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::config::Snapshot;
use crate::dns::{DnsServer, Who};
use crate::net;
use crate::operate::admin::{self, Admin};
use crate::options::{IoDriver, ListenerKind, RunOptions};
use crate::shard::{inbox, ShardEvent, ShardMsg, ShardTx};
use crate::tls::TlsMaterial;
use crate::EngineError;
use certs::Certificates;
use source::{ConfigSource, Update};
use state::ControlState;

/// A running ringtun: its shard handles, for callers that want to stop it (tests, demo).
pub struct Running {
    senders: Vec<ShardTx>,
    events: Receiver<ShardEvent>,
    threads: Vec<thread::JoinHandle<()>>,
    state: Arc<ControlState>,
    /// Tells the endpoints' threads to stop taking requests.
    endpoints_stop: Arc<AtomicBool>,
    /// In-pod mode: the thread that takes pods from the node agent.
    pods: Option<pods::PodsThread>,
    /// The DNS proxy, unless DNS capture is off.
    dns: Option<Arc<DnsServer>>,
    /// Addresses actually bound, per listener kind (useful with port 0); in in-pod mode none:
    /// every listener is a pod's.
    pub bound: Vec<(ListenerKind, SocketAddr)>,
    /// Where new configs come from.
    source: ConfigSource,
    /// The config the shards run is the source's (not the empty one istiod's first push
    /// replaces): readiness may answer 200.
    synced: bool,
    /// The snapshot in force, which istiod's next changes apply to.
    snapshot: Snapshot,
    /// Where certificates come from: told of each config change, to prefetch.
    certs: Arc<Certificates>,
    tls: Arc<TlsMaterial>,
    driver: IoDriver,
}

/// Starts the shards, the operator endpoints and the listeners; returns once every listener
/// accepts. Readiness answers 503 ("starting") until then, and with xDS until istiod's first
/// config is in force.
pub fn start(opts: RunOptions) -> Result<Running, EngineError> {
    let opts = Arc::new(opts);
    let (source, initial) = ConfigSource::open(&opts)?;
    let synced = initial.is_some();
    let snapshot = Snapshot::new(initial.unwrap_or_default(), 1);
    // Probed once here; every shard shares the result (logged by `startup`).
    let ktls = crate::stream::startup(opts.ktls, opts.tls_records)?;
    let certs = Arc::new(Certificates::open(&opts, ktls.clone())?);
    net::check_mark(opts.mark).map_err(|e| EngineError::Mark {
        mark: opts.mark,
        source: e,
    })?;
    let driver = runtime::announce_driver(opts.io_driver)?;
    let workers = opts.workers.max(1);
    let (senders, receivers): (Vec<ShardTx>, Vec<_>) = (0..workers)
        .map(|_| inbox::channel())
        .collect::<Result<Vec<_>, _>>()
        .map_err(EngineError::Thread)?
        .into_iter()
        .unzip();
    let state = Arc::new(ControlState::new(
        senders.clone(),
        snapshot.clone(),
        certs.clone(),
        ktls,
        driver,
        workers,
    ));
    state.set_options(&opts);
    if let Some(status) = source.xds_status() {
        state.set_xds(status);
    }
    // Up before the certificate and the listeners, so readiness says "starting" rather than
    // refusing connections, and /config_dump shows a certificate still pending.
    let endpoints_stop = Arc::new(AtomicBool::new(false));
    let admin: Arc<dyn Admin> = state.clone();
    let endpoints = admin::serve(admin, &opts.admin_listeners, endpoints_stop.clone())
        .map_err(EngineError::Admin)?;
    tracing::info!(endpoints = ?endpoints, "metrics, readiness and admin endpoints up");
    // From istiod's CA this waits for the first certificate (as ztunnel's readiness does).
    let tls = certs
        .own()
        .inspect_err(|_| endpoints_stop.store(true, Ordering::Relaxed))?;
    let cores = if opts.pin {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let (ev_tx, ev_rx) = crossbeam_channel::unbounded();
    let mut threads = Vec::with_capacity(workers);
    for (id, rx) in receivers.into_iter().enumerate() {
        let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
        let (opts, tls, ev_tx, snap) = (opts.clone(), tls.clone(), ev_tx.clone(), snapshot.clone());
        let handle = thread::Builder::new()
            .name(format!("ringtun-shard-{id}"))
            .spawn(move || runtime::shard_thread(id, core, driver, opts, tls, rx, ev_tx, snap))
            .map_err(|e| {
                endpoints_stop.store(true, Ordering::Relaxed);
                EngineError::Thread(e)
            })?;
        threads.push(handle);
    }
    drop(ev_tx);
    // Before any listener: a shard asks for unknown destinations from its first connection.
    if let Some(demander) = source.demander() {
        for tx in &senders {
            let _ = tx.send(ShardMsg::OnDemand(demander.clone()));
        }
    }
    state.set_shards_running();
    certs.attach(senders.clone());

    let stop_endpoints = |e: EngineError| {
        endpoints_stop.store(true, Ordering::Relaxed);
        e
    };
    // Before the pods: each pod added gets its DNS listeners too.
    let dns = match &opts.dns {
        None => None,
        Some(d) => {
            let mut server =
                DnsServer::start(d, snapshot.clone()).map_err(|e| stop_endpoints(e.into()))?;
            if opts.inpod.is_none() {
                let who = match &opts.workload {
                    Some((ns, name)) => Who::Workload(ns.clone(), name.clone()),
                    None => Who::BySource,
                };
                server
                    .listen_here(who)
                    .map_err(|e| stop_endpoints(e.into()))?;
            }
            let server = Arc::new(server);
            state.set_dns(server.clone());
            Some(server)
        }
    };
    // In-pod mode listens only inside pods; readiness waits for the node agent's snapshot.
    let (bound, pods) = match &opts.inpod {
        None => (
            listen(&opts, &senders, &ev_rx).map_err(stop_endpoints)?,
            None,
        ),
        Some(inpod) => {
            let t = pods::spawn(
                inpod,
                opts.clone(),
                certs.clone(),
                senders.clone(),
                state.clone(),
            )
            .map_err(stop_endpoints)?;
            tracing::info!(uds = %inpod.uds.display(), signer = inpod.signer.is_some(), ca = opts.ca.is_some(), "in-pod mode: pods come from the node agent");
            (Vec::new(), Some(t))
        }
    };
    let running = Running {
        senders,
        events: ev_rx,
        threads,
        state,
        endpoints_stop,
        pods,
        dns,
        bound,
        source,
        synced,
        snapshot: snapshot.clone(),
        certs,
        tls,
        driver,
    };
    if synced {
        running.announce_ready(&opts, &snapshot);
    } else {
        tracing::info!(
            config = %running.source.describe(),
            listeners = ?running.bound,
            "listening; not ready until the control plane's first config is in force"
        );
    }
    Ok(running)
}

/// Opens every listener once per shard, hands each shard its sockets and waits until every
/// shard accepts on them; returns the addresses bound.
fn listen(
    opts: &RunOptions,
    senders: &[ShardTx],
    events: &Receiver<ShardEvent>,
) -> Result<Vec<(ListenerKind, SocketAddr)>, EngineError> {
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
            // and each shard accepts only its own (ARCHITECTURE.md, "The listener hand-off").
            let mut port_addr = addr;
            for tx in senders {
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
        match events.recv_timeout(Duration::from_secs(10)) {
            Ok(ShardEvent::Listening { .. } | ShardEvent::ConfigApplied { .. }) => {}
            Ok(ShardEvent::ListenFailed { shard, error }) => {
                return Err(EngineError::ShardListen { shard, error })
            }
            Err(_) => return Err(EngineError::ShardDied),
        }
    }
    Ok(bound)
}

impl Running {
    /// The source's config is in force: readiness answers 200 from now on (in in-pod mode,
    /// once the node agent's snapshot is in too), and the log says so with what ringtun runs.
    fn announce_ready(&self, opts: &RunOptions, snapshot: &Snapshot) {
        let ready = self.state.set_config_in();
        let tls = &self.tls;
        tracing::info!(
            workers = self.senders.len(),
            driver = ?self.driver,
            identity = %tls.identity,
            tls = if tls.ktls.is_some() { "ktls" } else { "userspace" },
            config = %self.source.describe(),
            workloads = snapshot.workload_count(),
            services = snapshot.service_count(),
            listeners = ?self.bound,
            mark = %format_args!("{:#x}", opts.mark),
            pool_max_streams = opts.pool.max_streams,
            pool_unused_release = ?opts.pool.idle_timeout,
            drain_deadline = ?opts.drain_timeout,
            "{}",
            if ready {
                "ringtun ready"
            } else {
                "ringtun started; ready once the node agent's snapshot is in"
            }
        );
    }

    /// Watches the config source until the process is stopped; a valid change is sent to
    /// every shard, an invalid one is logged and the previous config stays in force.
    ///
    /// SIGTERM, SIGINT or `/quitquitquit` start a drain (see [`Running::drain`]); this returns
    /// when the drain is over. The caller must have blocked those signals with
    /// [`block_signals`] before [`start`], so that they queue for this thread.
    pub fn serve(mut self, opts: &RunOptions) -> Result<(), EngineError> {
        let mut generation = 1u64;
        // /quitquitquit sets a flag from an admin thread; waking every tick (not every config
        // poll) lets the drain reach the shards' listeners within a tick of the request.
        let tick = opts.config_poll.min(Duration::from_millis(50));
        loop {
            if let Some(sig) = process::wait_signal(tick) {
                tracing::info!(signal = sig, "signal received; draining");
                break;
            }
            if self.state.quit_requested() {
                tracing::info!("/quitquitquit received; draining");
                break;
            }
            let Some(next) = self.source.poll() else {
                self.send_answers();
                continue;
            };
            match next {
                Ok(update) => {
                    generation += 1;
                    let built = Instant::now();
                    self.certs.track(&update);
                    let (snap, changes) = match update {
                        Update::Full(config) => (Snapshot::new(config, generation), None),
                        Update::Delta(delta) => {
                            let n = delta.len();
                            (self.snapshot.apply(delta, generation), Some(n))
                        }
                    };
                    tracing::debug!(generation, ?changes, took = ?built.elapsed(), "snapshot built");
                    self.snapshot = snap.clone();
                    if let Some(dns) = &self.dns {
                        dns.set_snapshot(snap.clone());
                    }
                    for tx in &self.senders {
                        let _ = tx.send(ShardMsg::Config(Box::new(snap.clone())));
                    }
                    self.send_answers();
                    // Announce the reload only once every shard uses it, so "reloaded" in the
                    // log means new connections see the new config.
                    self.await_applied(generation);
                    self.state.set_current(snap.clone());
                    if !self.synced {
                        self.synced = true;
                        self.announce_ready(opts, &snap);
                        continue;
                    }
                    tracing::info!(
                        generation,
                        workloads = snap.workload_count(),
                        services = snap.service_count(),
                        policies = snap.policy_count(),
                        ?changes,
                        "{}",
                        self.source.what()
                    );
                }
                Err(e) => {
                    tracing::error!("config reload failed, keeping generation {generation}: {e}");
                    self.send_answers();
                }
            }
        }
        self.drain(opts.drain_timeout);
        if let Some(dns) = &self.dns {
            dns.close();
        }
        self.endpoints_stop.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Tells the shards which on-demand addresses istiod answered, after the config that
    /// answers them (the same channel keeps the order): their parked connections route now.
    fn send_answers(&mut self) {
        let answered = self.source.take_answered();
        if answered.is_empty() {
            return;
        }
        let answered: Arc<[std::net::IpAddr]> = answered.into();
        for tx in &self.senders {
            let _ = tx.send(ShardMsg::Answered(answered.clone()));
        }
    }

    /// Graceful drain: readiness fails at once, listeners stop accepting, HBONE peers get
    /// GOAWAY, and live connections have until `deadline` to finish; whatever is left then is
    /// closed when the process exits.
    pub fn drain(&self, deadline: Duration) {
        self.state.set_draining();
        for tx in &self.senders {
            let _ = tx.send(ShardMsg::Drain);
        }
        let until = Instant::now() + deadline;
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
            if Instant::now() >= until {
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
        let deadline = Instant::now() + Duration::from_secs(5);
        while pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
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
        self.endpoints_stop.store(true, Ordering::Relaxed);
        // It holds senders too: the shards see their channel close only once it is gone.
        if let Some(p) = self.pods {
            p.stop();
        }
        if let Some(dns) = &self.dns {
            dns.close();
        }
        drop(self.senders);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
