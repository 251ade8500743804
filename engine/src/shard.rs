//! A shard: one pinned thread, one monoio runtime, and everything its connections need.
//!
//! A shard owns its listeners, its HBONE pool, its read buffers and its counters. Nothing in it
//! is shared with other shards at run time: the TLS configurations and options are read-only
//! `Arc`s cloned once at start, and config snapshots arrive as owned values from the control
//! thread. So the per-connection and per-byte paths take no locks and touch no shared atomics.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::fd::{AsRawFd, RawFd};
use std::task::{Context, Poll, Waker};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use monoio::net::TcpListener;
use ringtun_hbone::pool::Pool;
use ringtun_hbone::Identity;

use crate::config::{Snapshot, Workload};
use crate::metrics::{ShardGauges, ShardMetrics, ShardReport};
use crate::options::RunOptions;
use crate::policy::PolicyIndex;
use crate::proxy;
use crate::proxy::live::{self, Grant};
use crate::proxy::outbound::PooledH2;
use crate::stream::StreamCtx;
use crate::tls::TlsMaterial;

/// What a listener on a shard is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// 15001: outbound capture (original destination after REDIRECT).
    Outbound,
    /// 15008: HBONE over mutual TLS.
    Inbound,
    /// 15006: plaintext inbound capture.
    InboundPlaintext,
}

impl std::fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ListenerKind::Outbound => "outbound",
            ListenerKind::Inbound => "inbound-hbone",
            ListenerKind::InboundPlaintext => "inbound-plaintext",
        })
    }
}

/// Messages from the control thread to a shard.
pub enum ShardMsg {
    /// Start accepting on this socket. In-pod mode will send sockets opened inside pods'
    /// network namespaces the same way: a listener is a socket plus what it is for.
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

/// Per-shard counters: plain cells, read by the shard itself (the metrics issue will have the
/// control thread ask each shard for a copy rather than share them).
#[derive(Default, Debug)]
pub struct Counters {
    /// Connections accepted on any listener.
    pub accepted: Cell<u64>,
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

/// Round-robin cursors per (service index, port), valid for one config generation.
type RrCursors = HashMap<(usize, u16), usize>;

/// The state one shard's connections share.
pub struct Shard {
    /// Shard number, 0-based.
    pub id: usize,
    /// Run options (read-only).
    pub opts: Arc<RunOptions>,
    /// TLS material (read-only).
    pub tls: Arc<TlsMaterial>,
    /// Our identity (`tls.identity`), shared by every access-log record on this shard.
    pub identity: Rc<Identity>,
    /// TLS acceptor for 15008.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// TLS connector for outbound HBONE.
    pub connector: tokio_rustls::TlsConnector,
    snapshot: RefCell<Rc<Snapshot>>,
    rr: RefCell<(u64, RrCursors)>,
    /// HBONE connection pool.
    pub pool: RefCell<Pool<PooledH2>>,
    /// Counters.
    pub counters: Counters,
    /// What HBONE byte streams on this shard need (and count: by record layer).
    pub stream: Rc<StreamCtx>,
    /// Istio TCP metrics.
    pub metrics: ShardMetrics,
    policy: RefCell<Rc<PolicyIndex>>,
    /// Fired once when draining starts.
    pub drain: DrainSignal,
    listener_fds: RefCell<Vec<RawFd>>,
}

/// A one-shot signal that tasks on this shard can wait on (no atomics: one thread).
///
/// Every inbound HBONE connection waits on it for its whole life, so each one registers
/// through a [`DrainWaiter`] that forgets its waker when the connection ends. (A plain list of
/// wakers would grow by one per connection ever accepted, keep each finished task's memory
/// alive through its waker, and be scanned on every poll of every connection.)
#[derive(Default)]
pub struct DrainSignal {
    fired: Cell<bool>,
    next_key: Cell<u64>,
    wakers: RefCell<HashMap<u64, Waker>>,
}

impl DrainSignal {
    /// Whether draining has started.
    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }

    /// A handle one task polls to learn that draining started.
    pub fn waiter(&self) -> DrainWaiter<'_> {
        let key = self.next_key.get();
        self.next_key.set(key + 1);
        DrainWaiter { signal: self, key }
    }

    /// Tasks waiting right now.
    pub fn waiting(&self) -> usize {
        self.wakers.borrow().len()
    }

    fn fire(&self) {
        self.fired.set(true);
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for (_, w) in wakers {
            w.wake();
        }
    }
}

/// One task's registration with a [`DrainSignal`]; dropping it unregisters the task.
pub struct DrainWaiter<'a> {
    signal: &'a DrainSignal,
    key: u64,
}

impl DrainWaiter<'_> {
    /// Ready once draining has started; otherwise the task is woken when it does.
    pub fn poll_fired(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.fired.get() {
            return Poll::Ready(());
        }
        let mut wakers = self.signal.wakers.borrow_mut();
        match wakers.get_mut(&self.key) {
            Some(w) if w.will_wake(cx.waker()) => {}
            Some(w) => *w = cx.waker().clone(),
            None => {
                wakers.insert(self.key, cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

impl Drop for DrainWaiter<'_> {
    fn drop(&mut self) {
        self.signal.wakers.borrow_mut().remove(&self.key);
    }
}

impl Shard {
    /// Authorization policies of the config generation new connections use.
    pub fn policy(&self) -> Rc<PolicyIndex> {
        self.policy.borrow().clone()
    }

    fn report(&self) -> ShardReport {
        // Live connections' bytes first, so a long transfer shows in the counters it feeds.
        live::flush_bytes(|labels, received, sent| self.metrics.moved(labels, received, sent));
        let pool = self.pool.borrow();
        let c = &self.counters;
        let t = &self.stream.counters;
        ShardReport {
            shard: self.id,
            tcp: self.metrics.export(),
            gauges: ShardGauges {
                open_connections: c.open.get(),
                accepted: c.accepted.get(),
                pool_connections: pool.connections() as u64,
                pool_streams: pool.streams(),
                ktls_connections: t.ktls_tx.get().min(t.ktls_rx.get()),
                userspace_tls_connections: t.userspace.get(),
                ktls_failed: t.ktls_failed.get(),
                ktls_retired: t.ktls_retired.get(),
                config_generation: self.snapshot.borrow().generation,
                refused_overloaded: c.overloaded.get(),
                sockets_open: live::open_by_reporter(),
            },
        }
    }

    fn start_drain(&self) {
        if self.drain.is_fired() {
            return;
        }
        // Shutting the listening sockets down wakes their pending accepts with an error, which
        // ends the accept loops; with every shard's socket shut, the kernel refuses new SYNs.
        for fd in self.listener_fds.borrow_mut().drain(..) {
            // SAFETY: the fd belongs to a listener this shard owns and has not closed.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        // Dropping pooled handles lets idle client connections close; busy ones close when
        // their last stream ends. Inbound connections send GOAWAY when they see the signal.
        *self.pool.borrow_mut() = Pool::new(self.opts.pool);
        self.drain.fire();
    }

    /// Registers a connection about to copy bytes with this shard's live set (its idle limit
    /// and, when policy admitted it, its grant). A grant issued under an older generation than
    /// the current one missed the re-check of the update in between (it was connecting), so it
    /// is checked now.
    /// `series`: the metric labels its bytes count in while it lives, and whether the copy's
    /// TCP side is the destination.
    pub fn track(
        &self,
        grant: Option<Grant>,
        series: Option<(Rc<crate::metrics::TcpLabels>, bool)>,
    ) -> live::Conn {
        let conn = live::Conn::new(self.opts.idle_timeout, grant);
        if let Some((labels, reversed)) = series {
            conn.count_in(labels, reversed);
        }
        if let Some(g) = conn.grant() {
            if g.generation != self.snapshot.borrow().generation {
                if let Some(why) = self.denies(g) {
                    conn.revoke(&why);
                }
            }
        }
        conn
    }

    /// Why the current policies would refuse a live connection admitted on `g`; `None` when
    /// they allow it. A destination no longer in the config is left alone: with no workload
    /// there are no policies to apply (ztunnel keeps the workload it admitted against).
    fn denies(&self, g: &Grant) -> Option<String> {
        let snap = self.snapshot.borrow();
        let w = snap.workload_by_ip(g.dst_ip)?;
        let conn = crate::policy::Connection {
            src_identity: g.src_identity.as_deref(),
            src_ip: g.src_ip,
            dst_ip: g.dst_ip,
            dst_port: g.dst_port,
        };
        match self.policy.borrow().evaluate(w, &conn).decision {
            crate::policy::Decision::Allow => None,
            crate::policy::Decision::Deny { policy, reason } if policy.is_empty() => {
                Some(reason.to_string())
            }
            crate::policy::Decision::Deny { policy, reason } => Some(format!("{reason} {policy}")),
        }
    }

    /// Applies the per-socket options every connection ringtun opens gets (TCP keepalive;
    /// accepted ones inherit them from the listener); a failure is logged, the connection kept.
    pub fn tune_socket(&self, fd: RawFd) {
        if let Err(e) = crate::net::set_keepalive(fd, self.opts.tcp_keepalive) {
            tracing::debug!(shard = self.id, error = %e, "could not set TCP keepalive");
        }
    }

    /// Whether `port` is one of ringtun's own traffic listeners, which a tunnel must never
    /// target.
    pub fn is_own_port(&self, port: u16) -> bool {
        let o = &self.opts;
        o.outbound
            .iter()
            .chain(&o.inbound)
            .chain(&o.inbound_plaintext)
            .any(|a| a.port() == port && port != 0)
    }

    /// The config generation new connections use.
    pub fn snapshot(&self) -> Rc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// The SPIFFE identity of a workload (its own trust domain, or ours).
    pub fn workload_identity(&self, w: &Workload) -> Identity {
        Identity::new(
            w.trust_domain.as_deref().unwrap_or(&self.opts.trust_domain),
            &w.namespace,
            &w.service_account,
        )
    }

    /// Whether inbound traffic for `ip` is ours to deliver: the workload named by --workload,
    /// or those on --node, or else every workload with our certificate's identity.
    pub fn serves(&self, snap: &Snapshot, ip: IpAddr) -> bool {
        let Some(w) = snap.workload_by_ip(ip) else {
            return false;
        };
        if let Some((ns, name)) = &self.opts.workload {
            return &w.namespace == ns && &w.name == name;
        }
        if let Some(node) = &self.opts.node {
            return &w.node == node;
        }
        self.workload_identity(w) == self.tls.identity
    }

    /// The workload this ringtun speaks for when a connection from `src` leaves.
    pub fn source_workload<'a>(&self, snap: &'a Snapshot, src: IpAddr) -> Option<&'a Workload> {
        match &self.opts.workload {
            Some((ns, name)) => snap.workload_by_name(ns, name),
            None => snap.workload_by_ip(src),
        }
    }

    /// Next round-robin position for a service port; cursors restart with each generation.
    pub fn next_rr(&self, generation: u64, service: usize, port: u16) -> usize {
        let mut rr = self.rr.borrow_mut();
        if rr.0 != generation {
            *rr = (generation, HashMap::new());
        }
        let c = rr.1.entry((service, port)).or_insert(0);
        let v = *c;
        *c = c.wrapping_add(1);
        v
    }
}

/// aws-lc seeds its per-thread random generator on first use, which costs tens of
/// milliseconds here; do it before the listeners open so the first handshake on each shard
/// does not pay for it.
fn warm_up_rng(tls: &TlsMaterial) {
    let mut seed = [0u8; 32];
    if let Err(e) = tls.client.crypto_provider().secure_random.fill(&mut seed) {
        tracing::warn!(error = ?e, "random generator not ready at start");
    }
}

/// Runs one shard until the control thread goes away.
pub async fn run(
    id: usize,
    opts: Arc<RunOptions>,
    tls: Arc<TlsMaterial>,
    rx: Receiver<ShardMsg>,
    events: Sender<ShardEvent>,
    initial: Snapshot,
) {
    warm_up_rng(&tls);
    let policy = RefCell::new(Rc::new(PolicyIndex::new(&initial)));
    let shard = Rc::new(Shard {
        id,
        metrics: ShardMetrics::default(),
        policy,
        drain: DrainSignal::default(),
        listener_fds: RefCell::new(Vec::new()),
        acceptor: tokio_rustls::TlsAcceptor::from(tls.server.clone()),
        connector: tokio_rustls::TlsConnector::from(tls.client.clone()),
        snapshot: RefCell::new(Rc::new(initial)),
        rr: RefCell::new((0, HashMap::new())),
        pool: RefCell::new(Pool::new(opts.pool)),
        counters: Counters::default(),
        stream: Rc::new(StreamCtx::new(
            id,
            tls.ktls.clone(),
            opts.ktls_tx_record_limit,
            opts.handshake_timeout,
        )),
        identity: Rc::new(tls.identity.clone()),
        opts,
        tls,
    });
    monoio::spawn(sweep_pool(shard.clone()));
    // Control messages are rare (listeners at start, config on change), so polling the channel
    // a few times a second costs nothing and needs no cross-thread wake-up on the data path.
    loop {
        loop {
            match rx.try_recv() {
                Ok(msg) => handle(&shard, msg, &events),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        monoio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn handle(shard: &Rc<Shard>, msg: ShardMsg, events: &Sender<ShardEvent>) {
    match msg {
        ShardMsg::Config(snap) => {
            let generation = snap.generation;
            tracing::debug!(shard = shard.id, generation, "config applied");
            *shard.policy.borrow_mut() = Rc::new(PolicyIndex::new(&snap));
            *shard.snapshot.borrow_mut() = Rc::new(*snap);
            // Live connections were admitted under the old policies; those the new ones deny
            // are cut now, as ztunnel does, on this shard that owns them.
            let cut = live::recheck(|g| shard.denies(g));
            if cut > 0 {
                tracing::info!(
                    shard = shard.id,
                    generation,
                    cut,
                    "policy update closed live connections"
                );
            }
            let _ = events.send(ShardEvent::ConfigApplied {
                shard: shard.id,
                generation,
            });
        }
        ShardMsg::Scrape(reply) => {
            let _ = reply.send(shard.report());
        }
        ShardMsg::Drain => shard.start_drain(),
        ShardMsg::Listen { kind, socket } => {
            // from_std registers the fd with this thread's driver, so it must run in the runtime.
            let event = match TcpListener::from_std(socket) {
                Ok(l) => {
                    let addr = l.local_addr();
                    shard.listener_fds.borrow_mut().push(l.as_raw_fd());
                    monoio::spawn(accept_loop(shard.clone(), kind, l));
                    match addr {
                        Ok(addr) => ShardEvent::Listening {
                            shard: shard.id,
                            kind,
                            addr,
                        },
                        Err(e) => ShardEvent::ListenFailed {
                            shard: shard.id,
                            error: e.to_string(),
                        },
                    }
                }
                Err(e) => ShardEvent::ListenFailed {
                    shard: shard.id,
                    error: format!("{kind} listener: {e}"),
                },
            };
            let _ = events.send(event);
        }
    }
}

async fn accept_loop(shard: Rc<Shard>, kind: ListenerKind, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                shard
                    .counters
                    .accepted
                    .set(shard.counters.accepted.get() + 1);
                if shard.counters.open.get() >= shard.opts.max_connections_per_shard {
                    // Refusing at once beats queueing: the client retries elsewhere or fails
                    // fast, and the connections already here keep their share of the shard.
                    shard
                        .counters
                        .overloaded
                        .set(shard.counters.overloaded.get() + 1);
                    crate::net::abort_on_close(stream.as_raw_fd());
                    tracing::warn!(shard = shard.id, %kind, %peer, limit = shard.opts.max_connections_per_shard, "connection refused: shard at its connection limit");
                    continue;
                }
                // One spawn per kind, not one future matching on it: a task is as big as the
                // largest future it may run, and every idle connection keeps its task.
                match kind {
                    ListenerKind::Outbound => {
                        spawn_counted(&shard, proxy::outbound::handle(shard.clone(), stream, peer))
                    }
                    ListenerKind::Inbound => {
                        let s = shard.clone();
                        spawn_counted(&shard, async move {
                            proxy::inbound::handle(&s, stream, peer).await
                        })
                    }
                    ListenerKind::InboundPlaintext => {
                        let s = shard.clone();
                        spawn_counted(&shard, async move {
                            proxy::plaintext::inbound(&s, stream, peer).await
                        })
                    }
                }
            }
            Err(_) if shard.drain.is_fired() => return,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving live ones.
                tracing::warn!(shard = shard.id, %kind, error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs one connection's handler as its own task, counted in `open` while it runs.
fn spawn_counted<F: Future<Output = ()> + 'static>(shard: &Rc<Shard>, fut: F) {
    let open = &shard.counters.open;
    open.set(open.get() + 1);
    monoio::spawn(Counted {
        fut,
        shard: shard.clone(),
    });
}

/// A connection's future that counts itself out of `open` when it ends or is dropped.
///
/// Written out rather than as `async move { fut.await; … }`: an async block keeps its captured
/// future and the one it awaits as two fields, which would double every connection's task.
struct Counted<F> {
    fut: F,
    shard: Rc<Shard>,
}

impl<F: Future<Output = ()>> Future for Counted<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: `fut` is structurally pinned: it is never moved out of a pinned `Counted`
        // (Drop below only touches `shard`), and `Counted` is `Unpin` only when `F` is.
        unsafe { self.map_unchecked_mut(|c| &mut c.fut) }.poll(cx)
    }
}

impl<F> Drop for Counted<F> {
    fn drop(&mut self) {
        let open = &self.shard.counters.open;
        open.set(open.get().saturating_sub(1));
    }
}

async fn sweep_pool(shard: Rc<Shard>) {
    let period = (shard.opts.pool.idle_timeout / 2)
        .clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        monoio::time::sleep(period).await;
        let dropped = shard.pool.borrow_mut().evict(Instant::now());
        if dropped > 0 {
            tracing::debug!(shard = shard.id, dropped, "idle HBONE connections closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Count(AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn drain_waiters_unregister_when_dropped_and_wake_when_fired() {
        let signal = DrainSignal::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        // Connections that come and go leave nothing behind.
        for _ in 0..1000 {
            let w = signal.waiter();
            assert!(w.poll_fired(&mut cx).is_pending());
            assert!(
                w.poll_fired(&mut cx).is_pending(),
                "polled again: same entry"
            );
            assert_eq!(signal.waiting(), 1);
        }
        assert_eq!(signal.waiting(), 0);
        let live = signal.waiter();
        assert!(live.poll_fired(&mut cx).is_pending());
        signal.fire();
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            1,
            "the live waiter is woken"
        );
        assert!(live.poll_fired(&mut cx).is_ready());
        assert!(
            signal.waiter().poll_fired(&mut cx).is_ready(),
            "late waiters see it too"
        );
    }
}
