//! A shard: one pinned thread, one monoio runtime, and everything its connections need.
//!
//! A shard owns its listeners, its HBONE pool, its read buffers and its counters. Nothing in it
//! is shared with other shards at run time: the TLS configurations and options are read-only
//! `Arc`s cloned once at start, and config snapshots arrive as owned values from the control
//! thread. So the per-connection and per-byte paths take no locks and touch no shared atomics.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use monoio::net::TcpListener;
use ringtun_hbone::pool::Pool;
use ringtun_hbone::Identity;

use crate::config::{Snapshot, Workload};
use crate::options::RunOptions;
use crate::proxy;
use crate::proxy::outbound::PooledH2;
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
    /// A new config generation; applies to new connections, live ones keep theirs.
    Config(Box<Snapshot>),
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
    /// HBONE connections (both directions) whose sending side the kernel encrypts (kTLS TX).
    pub ktls_tx: Cell<u64>,
    /// HBONE connections whose receiving side the kernel decrypts (kTLS RX).
    pub ktls_rx: Cell<u64>,
    /// HBONE connections carried by userspace rustls (no kTLS, or offload not possible).
    pub tls_userspace: Cell<u64>,
    /// HBONE connections lost while switching to kTLS (after rustls gave up its secrets).
    pub ktls_failed: Cell<u64>,
    /// Offloaded connections retired because their TX key neared its usage limit.
    pub ktls_key_retired: Cell<u64>,
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
}

impl Shard {
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

/// Runs one shard until the control thread goes away.
pub async fn run(
    id: usize,
    opts: Arc<RunOptions>,
    tls: Arc<TlsMaterial>,
    rx: Receiver<ShardMsg>,
    events: Sender<ShardEvent>,
    initial: Snapshot,
) {
    let shard = Rc::new(Shard {
        id,
        acceptor: tokio_rustls::TlsAcceptor::from(tls.server.clone()),
        connector: tokio_rustls::TlsConnector::from(tls.client.clone()),
        snapshot: RefCell::new(Rc::new(initial)),
        rr: RefCell::new((0, HashMap::new())),
        pool: RefCell::new(Pool::new(opts.pool)),
        counters: Counters::default(),
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
            tracing::debug!(
                shard = shard.id,
                generation = snap.generation,
                "config applied"
            );
            *shard.snapshot.borrow_mut() = Rc::new(*snap);
        }
        ShardMsg::Listen { kind, socket } => {
            // from_std registers the fd with this thread's driver, so it must run in the runtime.
            let event = match TcpListener::from_std(socket) {
                Ok(l) => {
                    let addr = l.local_addr();
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
                let shard = shard.clone();
                monoio::spawn(async move {
                    shard.counters.open.set(shard.counters.open.get() + 1);
                    match kind {
                        ListenerKind::Outbound => {
                            proxy::outbound::handle(&shard, stream, peer).await
                        }
                        ListenerKind::Inbound => proxy::inbound::handle(&shard, stream, peer).await,
                        ListenerKind::InboundPlaintext => {
                            proxy::plaintext::inbound(&shard, stream, peer).await
                        }
                    }
                    shard.counters.open.set(shard.counters.open.get() - 1);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving live ones.
                tracing::warn!(shard = shard.id, %kind, error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
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
