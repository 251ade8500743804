//! A shard: one pinned thread, one monoio runtime, and everything its connections share.
//!
//! A shard is its [`ShardContext`], what it was given at start and never changes (options,
//! identity, the [`Scope`] it serves), and its runtime state: the TLS settings new handshakes
//! use (replaced when the certificate is renewed, [`tls`]), the config generation new
//! connections use, the random source of endpoint choices, the HBONE [`pool`], its [`Tally`]
//! of metrics and counters, the [`drain`] signal and the registry of [`live`] connections.
//! Nothing in it is shared with other shards at run time: the read-only parts are `Arc`s
//! cloned once at start, and config snapshots (with their policy tables) arrive from the
//! control thread. So the per-connection and per-byte paths take no locks and touch no shared
//! atomics.
//!
//! The thread's loop that feeds a shard (control messages, accept loops) is
//! `proxy::serve`, above both: the proxy paths depend on the shard, not the reverse.

pub mod demand;
pub mod drain;
pub mod inbox;
pub mod live;
pub mod pod;
pub mod pool;
pub mod tls;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Deref;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use http::HeaderValue;
use ringtun_hbone::connect::baggage_header;
use ringtun_hbone::Identity;

use crate::config::{ByWorkload, Snapshot, Workload};
use crate::decide::{self, Balancer, Grant, Route, Scope};
use crate::metrics::{Series, ShardCounters, ShardGauges, ShardMetrics, ShardReport};
use crate::options::{ListenerKind, RunOptions};
use crate::stream::StreamCtx;
use crate::tls::TlsMaterial;
use drain::DrainSignal;
use pod::{Pod, PodShard};
use pool::HbonePool;
use tls::{ShardTls, TlsSlot};

/// The control side's handle on a shard: sending wakes it ([`inbox`]).
pub type ShardTx = inbox::Tx<ShardMsg>;

/// A shard's end of its control channel.
pub type ShardRx = inbox::Rx<ShardMsg>;

/// Messages from the control thread to a shard.
pub enum ShardMsg {
    /// Start accepting on this socket.
    Listen {
        /// What the listener is for.
        kind: ListenerKind,
        /// A bound, listening, non-blocking socket (this shard's SO_REUSEPORT copy).
        socket: std::net::TcpListener,
    },
    /// A new config generation: new connections use it, live ones keep their routing and are
    /// re-authorized against its policies (those now denied are cut).
    Config(Box<Snapshot>),
    /// Send a copy of this shard's metrics (the scrape runs on the control side).
    Scrape(Sender<ShardReport>),
    /// Stop accepting, ask HBONE peers to go away (GOAWAY), let live connections finish.
    Drain,
    /// In-pod mode: start serving a pod on these sockets, bound inside its network namespace
    /// (this shard's SO_REUSEPORT copies). The outcome goes to `reply`.
    AddPod {
        /// The pod.
        pod: Arc<Pod>,
        /// Its listeners.
        listeners: Vec<(ListenerKind, std::net::TcpListener)>,
        /// Where to say whether the shard accepts on them.
        reply: Sender<Result<(), String>>,
    },
    /// In-pod mode: stop serving a pod; its connections have `deadline` to finish, then are cut.
    DelPod {
        /// Pod uid.
        uid: String,
        /// How long its connections may finish.
        deadline: Duration,
    },
    /// A renewed certificate (or new roots) for `identity`: new handshakes of the shard's own
    /// identity or of pods with it use `tls`; established and pooled connections keep theirs.
    Certificate {
        /// Whose certificate.
        identity: Identity,
        /// The TLS settings made of it.
        tls: Arc<TlsMaterial>,
    },
    /// On-demand addresses are on (`XDS_ON_DEMAND`): ask for unknown destinations here.
    OnDemand(crate::xds::Demander),
    /// istiod answered these on-demand addresses (the config that answers them came before).
    Answered(Arc<[std::net::IpAddr]>),
}

/// Messages from shards back to the control thread.
#[derive(Debug)]
pub enum ShardEvent {
    /// A listener is accepting.
    Listening {
        /// Which shard.
        shard: usize,
        /// What for.
        kind: ListenerKind,
        /// Where.
        addr: SocketAddr,
    },
    /// A config generation is now what new connections use on this shard.
    ConfigApplied {
        /// Which shard.
        shard: usize,
        /// The generation.
        generation: u64,
    },
    /// A listener could not be taken into the runtime.
    ListenFailed {
        /// Which shard.
        shard: usize,
        /// What went wrong.
        error: String,
    },
}

/// Per-shard counters: plain cells on the shard's thread, copied into its report on a scrape.
#[derive(Default, Debug)]
pub struct Counters {
    /// Connections accepted on any listener.
    pub accepted: Cell<u64>,
    /// Of those, the ones taken with a direct `accept4` behind an io_uring accept.
    pub accepted_direct: Cell<u64>,
    /// Connections currently open.
    pub open: Cell<u64>,
    /// HBONE streams opened over a new pooled connection.
    pub pool_new: Cell<u64>,
    /// HBONE streams that reused a pooled connection.
    pub pool_reused: Cell<u64>,
    /// Connections refused or failed before tunnelling.
    pub failed: Cell<u64>,
    /// Connections refused because the shard was at `--max-connections-per-shard`.
    pub overloaded: Cell<u64>,
}

/// What a shard counts: Istio's TCP series and its own counters. Every connection's access
/// record holds it (`Rc`) and writes to it once, when the connection ends.
#[derive(Default)]
pub struct Tally {
    /// Istio TCP metrics.
    pub metrics: ShardMetrics,
    /// ringtun's own counters.
    pub counters: Counters,
}

impl Tally {
    /// Adds one to `counter` (one of [`Tally::counters`]).
    pub fn bump(counter: &Cell<u64>) {
        counter.set(counter.get() + 1);
    }
}

/// What a shard is given at start and never changes. [`Shard`] derefs to it.
pub struct ShardContext {
    /// Shard number, 0-based.
    pub id: usize,
    /// Run options.
    pub opts: Arc<RunOptions>,
    /// Our identity (the certificate's), shared by every access-log record on this shard.
    pub identity: Rc<Identity>,
    /// Which workloads this ringtun serves, and its own ports.
    pub scope: Scope,
    /// What HBONE byte streams on this shard need (and count: by record layer).
    pub stream: Rc<StreamCtx>,
}

impl ShardContext {
    fn new(id: usize, opts: Arc<RunOptions>, tls: &TlsMaterial) -> Self {
        let own_ports = opts
            .outbound
            .iter()
            .chain(&opts.inbound)
            .chain(&opts.inbound_plaintext)
            .map(SocketAddr::port)
            .filter(|&p| p != 0)
            .collect();
        let scope = Scope {
            workload: opts.workload.clone(),
            service_account: None,
            node: opts.node.clone(),
            identity: tls.identity.clone(),
            trust_domain: opts.trust_domain.clone(),
            own_ports,
        };
        ShardContext {
            id,
            identity: Rc::new(tls.identity.clone()),
            scope,
            stream: Rc::new(StreamCtx::new(
                id,
                tls.ktls.clone(),
                opts.tls_records,
                crate::stream::RecordLimits {
                    tx: opts.ktls_tx_record_limit,
                    rx: opts.ktls_rx_record_limit,
                },
                opts.handshake_timeout,
            )),
            opts,
        }
    }

    /// Applies the per-socket options every connection ringtun opens gets (TCP keepalive;
    /// accepted ones inherit them from the listener); a failure is logged, the connection kept.
    pub fn tune_socket(&self, fd: RawFd) {
        if let Err(e) = crate::net::set_keepalive(fd, self.opts.tcp_keepalive) {
            tracing::debug!(shard = self.id, error = %e, "could not set TCP keepalive");
        }
    }
}

/// One shard's context and runtime state; its connections hold it through an `Rc`.
pub struct Shard {
    ctx: ShardContext,
    /// What new handshakes of the shard's own identity use.
    tls: TlsSlot,
    snapshot: RefCell<Rc<Snapshot>>,
    balancer: RefCell<Balancer>,
    pool: Rc<HbonePool>,
    tally: Rc<Tally>,
    drain: DrainSignal,
    listener_fds: RefCell<Vec<RawFd>>,
    /// In-pod mode: the pods this shard serves, by uid.
    pods: RefCell<HashMap<String, Rc<PodShard>>>,
    /// On-demand destinations (`XDS_ON_DEMAND`): off unless the control thread turns it on.
    on_demand: demand::OnDemand,
    /// The `baggage` a CONNECT from each source workload carries.
    request_baggage: ByWorkload<Option<HeaderValue>>,
    /// The `baggage` the answer to a CONNECT to each destination workload carries.
    response_baggage: ByWorkload<Option<HeaderValue>>,
}

impl Deref for Shard {
    type Target = ShardContext;

    fn deref(&self) -> &ShardContext {
        &self.ctx
    }
}

impl Shard {
    /// A shard with nothing open yet, using `initial` for its first connections.
    pub fn new(id: usize, opts: Arc<RunOptions>, tls: Arc<TlsMaterial>, initial: Snapshot) -> Self {
        warm_up_rng(&tls);
        Shard {
            pool: Rc::new(HbonePool::new(opts.pool)),
            ctx: ShardContext::new(id, opts, &tls),
            tls: TlsSlot::new(tls),
            snapshot: RefCell::new(Rc::new(initial)),
            balancer: RefCell::new(Balancer::default()),
            tally: Rc::default(),
            drain: DrainSignal::default(),
            listener_fds: RefCell::new(Vec::new()),
            pods: RefCell::new(HashMap::new()),
            on_demand: demand::OnDemand::default(),
            request_baggage: ByWorkload::default(),
            response_baggage: ByWorkload::default(),
        }
    }

    /// The config generation new connections use.
    pub fn snapshot(&self) -> Rc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// On-demand destinations (`XDS_ON_DEMAND`).
    pub fn on_demand(&self) -> &demand::OnDemand {
        &self.on_demand
    }

    /// Where a captured connection from `src` (its workload, where known) to `dst` goes under
    /// `snap` (see [`decide::route`]); draws from this shard's balancer.
    pub fn route(&self, snap: &Snapshot, src: Option<&Workload>, dst: SocketAddr) -> Route {
        self.route_for(None, snap, src, dst)
    }

    /// [`Shard::route`] for a connection of `pod` (in-pod mode), or of the proxy's own scope.
    pub fn route_for(
        &self,
        pod: Option<&PodShard>,
        snap: &Snapshot,
        src: Option<&Workload>,
        dst: SocketAddr,
    ) -> Route {
        let scope = self.scope_for(pod);
        decide::route(scope, snap, &mut self.balancer.borrow_mut(), src, dst)
    }

    /// Which workloads a connection of `pod` speaks for: the pod's, or the proxy's scope.
    pub fn scope_for<'a>(&'a self, pod: Option<&'a PodShard>) -> &'a Scope {
        pod.map_or(&self.scope, |p| &p.scope)
    }

    /// The `baggage` header of a CONNECT from `w` (none for an unknown source), made once per
    /// workload entry: every stream of a workload carries the same one.
    pub fn request_baggage(&self, w: Option<&Workload>) -> Option<HeaderValue> {
        let w = w?;
        self.request_baggage.get(w, |w| {
            decide::request_baggage(Some(w), &self.opts.cluster_id).header()
        })
    }

    /// The `baggage` header answering a CONNECT to `w`, made once per workload entry.
    pub fn response_baggage(&self, w: &Workload) -> Option<HeaderValue> {
        self.response_baggage
            .get(w, |w| baggage_header(decide::response_baggage(w)))
    }

    /// The identity a connection of `pod` presents.
    pub fn identity_for<'a>(&'a self, pod: Option<&'a PodShard>) -> &'a Rc<Identity> {
        pod.map_or(&self.identity, |p| &p.identity)
    }

    /// The TLS settings a handshake of `pod` (or of the proxy) starting now uses: its
    /// acceptor for 15008, its connector for outbound HBONE. Taken once per handshake.
    pub fn tls_for(&self, pod: Option<&PodShard>) -> Rc<ShardTls> {
        pod.map_or(&self.tls, |p| &p.tls).current()
    }

    /// New handshakes of `identity` (the shard's own, or its pods') use `tls` from now on;
    /// connections already made keep what they were made with (see [`tls`]).
    pub fn renew_certificate(&self, identity: &Identity, tls: Arc<TlsMaterial>) {
        let mut renewed = 0;
        if *self.identity == *identity {
            self.tls.replace(tls.clone());
            renewed += 1;
        }
        for pod in self.pods.borrow().values() {
            if pod.pod.identity == *identity {
                pod.tls.replace(tls.clone());
                renewed += 1;
            }
        }
        tracing::debug!(shard = self.id, %identity, renewed, "certificate renewed");
    }

    /// The drain signal a connection of `pod` watches: the pod's (fired on its removal and on
    /// the shard's drain), or the shard's.
    pub fn drain_for<'a>(&'a self, pod: Option<&'a PodShard>) -> &'a DrainSignal {
        pod.map_or(&self.drain, PodShard::drain)
    }

    /// The HBONE pool.
    pub fn pool(&self) -> &Rc<HbonePool> {
        &self.pool
    }

    /// Metrics and counters.
    pub fn tally(&self) -> &Rc<Tally> {
        &self.tally
    }

    /// The counters (of [`Shard::tally`]).
    pub fn counters(&self) -> &Counters {
        &self.tally.counters
    }

    /// Fired once when draining starts.
    pub fn drain(&self) -> &DrainSignal {
        &self.drain
    }

    /// Whether the shard carries `--max-connections-per-shard` connections already.
    pub fn is_full(&self) -> bool {
        self.counters().open.get() >= self.opts.max_connections_per_shard
    }

    /// Registers a connection about to copy bytes with this shard's live set (its idle limit
    /// and, when policy admitted it, its grant). A grant issued under an older generation than
    /// the current one missed the re-check of the update in between (it was connecting), so it
    /// is checked now.
    /// `series`: the metric labels its bytes count in while it lives, and whether the copy's
    /// TCP side is the destination.
    /// A connection of `pod` is also kept by the pod, to be cut if the pod is removed.
    pub fn track(
        &self,
        pod: Option<&PodShard>,
        grant: Option<Grant>,
        series: Option<(Rc<Series>, bool)>,
    ) -> live::Conn {
        let conn = live::Conn::new(self.opts.idle_timeout, grant);
        if let Some(p) = pod {
            p.track(&conn);
        }
        if let Some((labels, reversed)) = series {
            conn.count_in(labels, reversed);
        }
        if let Some(g) = conn.grant() {
            let snap = self.snapshot.borrow();
            if g.generation != snap.generation {
                if let Some(why) = decide::revoked(&snap, g) {
                    conn.revoke(&why);
                }
            }
        }
        conn
    }

    /// Makes `snap` what new connections use, and cuts the live connections its policies deny
    /// (as ztunnel does, on this shard that owns them).
    pub fn apply_config(&self, snap: Snapshot) -> ShardEvent {
        let generation = snap.generation;
        tracing::debug!(shard = self.id, generation, "config applied");
        let before = self.snapshot.borrow().generation;
        *self.snapshot.borrow_mut() = Rc::new(snap);
        let current = self.snapshot();
        let cut = live::recheck_after(&current, before, |g| decide::revoked(&current, g));
        if cut > 0 {
            tracing::info!(
                shard = self.id,
                generation,
                cut,
                "policy update closed live connections"
            );
        }
        ShardEvent::ConfigApplied {
            shard: self.id,
            generation,
        }
    }

    /// A copy of this shard's metrics and figures, for a scrape.
    pub fn report(&self) -> ShardReport {
        // Live connections' bytes first, so a long transfer shows in the counters it feeds.
        let metrics = &self.tally.metrics;
        live::flush_bytes(|labels, received, sent| metrics.moved(labels, received, sent));
        let c = self.counters();
        let t = &self.stream.counters;
        ShardReport {
            shard: self.id,
            tcp: metrics.export(),
            gauges: ShardGauges {
                open_connections: c.open.get(),
                pool_connections: self.pool.connections() as u64,
                pool_streams: self.pool.streams(),
                config_generation: self.snapshot.borrow().generation,
                sockets_open: live::open_by_reporter(),
            },
            counters: ShardCounters {
                accepted: c.accepted.get(),
                accepted_direct: c.accepted_direct.get(),
                ktls_connections: t.ktls_tx.get().min(t.ktls_rx.get()),
                userspace_tls_connections: t.userspace.get(),
                ktls_failed: t.ktls_failed.get(),
                ktls_retired: t.ktls_retired.get(),
                refused_overloaded: c.overloaded.get(),
                failed: c.failed.get(),
                pool_new: c.pool_new.get(),
                pool_reused: c.pool_reused.get(),
            },
        }
    }

    /// Keeps a listening socket's fd, to shut it when draining starts.
    pub fn add_listener(&self, fd: RawFd) {
        self.listener_fds.borrow_mut().push(fd);
    }

    /// Starts draining: the listeners stop accepting, pooled HBONE connections are let go, and
    /// every task waiting on [`Shard::drain`] learns of it.
    pub fn start_drain(&self) {
        if self.drain.is_fired() {
            return;
        }
        // Shutting the listening sockets down wakes their pending accepts with an error, which
        // ends the accept loops; with every shard's socket shut, the kernel refuses new SYNs.
        for fd in self.listener_fds.borrow_mut().drain(..) {
            // SAFETY: the fd belongs to a listener this shard owns and has not closed.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        for pod in self.pods.borrow().values() {
            pod.stop();
        }
        // Idle client connections close; busy ones close when their last stream ends.
        // Inbound connections send GOAWAY when they see the signal.
        self.pool.clear();
        self.drain.fire();
    }

    /// Starts serving `pod` (replacing a pod of the same uid, which is removed with
    /// `deadline`); `None` while the shard drains.
    pub fn add_pod(self: &Rc<Self>, pod: Arc<Pod>, deadline: Duration) -> Option<Rc<PodShard>> {
        if self.drain.is_fired() {
            return None;
        }
        self.remove_pod(&pod.uid, deadline);
        let served = Rc::new(PodShard::new(pod, &self.scope));
        self.pods
            .borrow_mut()
            .insert(served.pod.uid.clone(), served.clone());
        Some(served)
    }

    /// Stops serving pod `uid`: its listeners shut, inbound HBONE peers get GOAWAY, and what
    /// still runs after `deadline` is cut (ztunnel's removal). Other pods are untouched.
    pub fn remove_pod(self: &Rc<Self>, uid: &str, deadline: Duration) {
        let Some(pod) = self.pods.borrow_mut().remove(uid) else {
            return;
        };
        pod.stop();
        // Its pooled HBONE connections take no new streams now; the idle ones go at once.
        self.pool.evict(Instant::now());
        let live = pod.live();
        tracing::debug!(
            shard = self.id,
            uid,
            live,
            "pod removed; its connections drain"
        );
        // Even with none live now: connections still opening then are cut as they start. Once
        // nothing but this task holds the pod (no connection, no accept loop), it lets go
        // early, so the pod's end is seen when its last connection ends.
        let shard = self.id;
        monoio::spawn(async move {
            let until = Instant::now() + deadline;
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                if Rc::strong_count(&pod) == 1 {
                    return;
                }
                monoio::time::sleep(left.min(POD_GONE_POLL)).await;
            }
            let cut = pod.cut();
            if cut > 0 {
                tracing::info!(shard, uid = %pod.pod.uid, cut, ?deadline, "removed pod's connections cut at the deadline");
            }
        });
    }

    /// Pods this shard serves.
    pub fn pod_count(&self) -> usize {
        self.pods.borrow().len()
    }

    /// Closes pooled HBONE connections idle past their limit, for as long as the shard runs.
    pub async fn sweep_pool(self: Rc<Self>) {
        let period = (self.opts.pool.idle_timeout / 2)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            monoio::time::sleep(period).await;
            let dropped = self.pool.evict(Instant::now());
            if dropped > 0 {
                tracing::debug!(shard = self.id, dropped, "idle HBONE connections closed");
            }
        }
    }
}

/// How often a removed pod's shard looks whether its last connection ended.
const POD_GONE_POLL: Duration = Duration::from_millis(100);

/// aws-lc seeds its per-thread random generator on first use, which costs tens of
/// milliseconds here; do it before the listeners open so the first handshake on each shard
/// does not pay for it.
fn warm_up_rng(tls: &TlsMaterial) {
    let mut seed = [0u8; 32];
    if let Err(e) = tls.client.crypto_provider().secure_random.fill(&mut seed) {
        tracing::warn!(error = ?e, "random generator not ready at start");
    }
}
