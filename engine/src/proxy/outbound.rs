//! Outbound: a connection captured on 15001 leaves as an HBONE stream, or as plain TCP.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use h2::client::SendRequest;
use monoio::io::IntoPollIo;
use monoio::net::TcpStream;
use ringtun_hbone::connect::{Baggage, ConnectRequest, TraceParent};
use ringtun_hbone::pool::{AttemptId, ConnId, PoolKey, Pooled};
use ringtun_hbone::{verify, HboneError, Identity, HBONE_PORT};
use rustls::pki_types::ServerName;

use super::access::{AccessLog, Direction};
use super::copy::{self, End};
use super::keepalive;
use super::plaintext;
use crate::config::{Protocol, Snapshot, Workload};
use crate::net;
use crate::shard::Shard;
use crate::stream::handshake::{self, HandshakeError, Handshaken};
use crate::stream::{KeyBudget, TlsPath};

/// A pooled HBONE connection: a handle to send requests on, and whether its driver task still
/// runs (it stops when the peer sends GOAWAY or the connection fails).
pub struct PooledH2 {
    send: SendRequest<Bytes>,
    alive: Rc<Cell<bool>>,
    peer: Rc<Identity>,
    /// How its records are carried, for the access log of every stream on it.
    tls: TlsPath,
    /// Offloaded connections retire (take no new streams) before their TX key wears out.
    budget: Option<Rc<KeyBudget>>,
}

/// What a pooled connection lends one stream: handles that outlive the pool borrow.
struct Lent {
    id: ConnId,
    send: SendRequest<Bytes>,
    alive: Rc<Cell<bool>>,
    peer: Rc<Identity>,
    tls: TlsPath,
}

impl PooledH2 {
    fn lend(&self, id: ConnId) -> Lent {
        Lent {
            id,
            send: self.send.clone(),
            alive: self.alive.clone(),
            peer: self.peer.clone(),
            tls: self.tls,
        }
    }
}

impl Pooled for PooledH2 {
    fn is_usable(&self) -> bool {
        self.alive.get() && !self.budget.as_ref().is_some_and(|b| b.is_retired())
    }
}

/// Where the destination lookup says a connection should go.
pub(crate) enum Route {
    /// Over HBONE to a mesh workload.
    Hbone {
        /// `<workload ip>:<target port>`, the CONNECT authority.
        target: SocketAddr,
        /// Identities the peer may present.
        identities: Vec<Identity>,
        /// Service hostname when a VIP was dialled.
        service: Option<String>,
        /// `ns/name` of the chosen workload.
        workload: String,
    },
    /// Plain TCP to this address (destination protocol TCP, or not in the mesh).
    Direct {
        /// Where to connect.
        target: SocketAddr,
        /// Service hostname when a VIP was dialled.
        service: Option<String>,
    },
    /// A service VIP with no endpoint for that port.
    NoEndpoint {
        /// The service hostname.
        service: String,
    },
}

/// Decides where a captured connection to `dst` goes, as ztunnel would: a service VIP picks an
/// endpoint round-robin (skipping workloads without that port); a workload IP goes to that
/// workload; anything else passes through.
pub(crate) fn route(shard: &Shard, snap: &Snapshot, dst: SocketAddr) -> Route {
    let (workload, port, service): (&Workload, u16, Option<String>) =
        if let Some(svc) = snap.service_by_vip(dst.ip()) {
            let eps = snap.endpoints(svc, dst.port());
            let host = svc.service.hostname.clone();
            if eps.is_empty() {
                return Route::NoEndpoint { service: host };
            }
            let i = shard.next_rr(snap.generation, svc.index, dst.port()) % eps.len();
            match eps.get(i) {
                Some((w, target_port)) => (w, target_port, Some(host)),
                None => return Route::NoEndpoint { service: host },
            }
        } else if let Some(w) = snap.workload_by_ip(dst.ip()) {
            (w, dst.port(), None)
        } else {
            return Route::Direct {
                target: dst,
                service: None,
            };
        };
    // A VIP maps to the workload's address in the same family where it has one.
    let ip = workload
        .workload_ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv4() == dst.is_ipv4())
        .or_else(|| workload.workload_ips.first().copied())
        .unwrap_or(dst.ip());
    let target = SocketAddr::new(ip, port);
    if workload.protocol != Protocol::Hbone {
        return Route::Direct { target, service };
    }
    let mut identities = vec![shard.workload_identity(workload)];
    if let Some(svc) = service.as_ref().and_then(|_| snap.service_by_vip(dst.ip())) {
        identities.extend(
            svc.service
                .subject_alt_names
                .iter()
                .filter_map(|san| Identity::parse(san).ok()),
        );
    }
    Route::Hbone {
        target,
        identities,
        service,
        workload: workload.display_name(),
    }
}

/// Handles one connection accepted on the outbound capture listener.
///
/// In two allocations. Everything up to an open HBONE stream (routing, the pool, the CONNECT,
/// a possible handshake, or the whole passthrough path) runs boxed and is freed when it
/// returns; the task itself then holds only the copy. A task is as big as the largest state
/// its future can be in and an idle connection keeps its task for life, so what it holds
/// while idle is the memory per idle connection.
pub fn handle(
    shard: Rc<Shard>,
    client: TcpStream,
    peer: SocketAddr,
) -> impl Future<Output = ()> + 'static {
    let opening = Box::pin(open(shard.clone(), client, peer));
    async move {
        let Some(Opened {
            client,
            stream: (send, recv),
            done,
        }) = opening.await
        else {
            return;
        };
        let conn = shard.track(None, done.log.series.clone().map(|s| (s, false)));
        let (bytes, end, unreported) = copy::tcp_h2(client, send, recv, conn).await;
        let Done { mut log, slot } = *done;
        drop(slot);
        log.unreported = unreported;
        log.bytes = bytes;
        log.end = end;
        log.finish(&shard.metrics);
    }
}

/// A captured connection with its HBONE stream open, ready to copy.
struct Opened {
    client: TcpStream,
    stream: Stream,
    /// Needed only when the copy ends; boxed so the task does not carry it inline.
    done: Box<Done>,
}

/// What a tunnelled connection's end needs: its access-log record and its pool slot.
struct Done {
    log: AccessLog,
    slot: Slot,
}

/// Routes the connection and opens its stream; `None` when the connection was handled here
/// (refused, failed, or passed through), its log written.
async fn open(shard: Rc<Shard>, client: TcpStream, peer: SocketAddr) -> Option<Opened> {
    let shard = &shard;
    let src = net::canonical(peer);
    let mut log = AccessLog::new(Direction::Outbound, src, shard.id);
    let _ = client.set_nodelay(true);
    let local = client.local_addr().map(net::canonical);
    let dst = match local.and_then(|l| net::original_dst(client.as_raw_fd(), l).map(|d| (l, d))) {
        Ok((local, dst)) if dst != local => net::canonical(dst),
        Ok(_) | Err(_) => {
            // Not redirected: connecting to ourselves would loop. Refuse it plainly.
            log.end = End::Error("connection was not redirected (no original destination); outbound listener only serves captured traffic".into());
            fail(shard, client, log);
            return None;
        }
    };
    log.dst_addr = Some(dst);
    let snap = shard.snapshot();
    let src_w = shard.source_workload(&snap, src.ip());
    log.src_workload = src_w.map(|w| w.display_name());
    match route(shard, &snap, dst) {
        Route::NoEndpoint { service } => {
            log.dst_service = Some(service);
            log.end = End::Error(format!("no endpoint serves port {}", dst.port()));
            fail(shard, client, log);
            None
        }
        Route::Direct { target, service } => {
            log.direction = Direction::Passthrough;
            log.dst_service = service;
            drop(snap);
            plaintext::forward(shard, client, target, log, None).await;
            None
        }
        Route::Hbone {
            target,
            identities,
            service,
            workload,
        } => {
            log.dst_service = service.clone();
            log.dst_workload = Some(workload);
            log.src_identity = Some(shard.identity.clone());
            let baggage = baggage(shard, src_w);
            drop(snap);
            let req = ConnectRequest {
                target,
                source: src,
                service_host: service,
                baggage,
                traceparent: TraceParent::random(&mut rand::thread_rng()),
            };
            let hbone = SocketAddr::new(req.target.ip(), HBONE_PORT);
            log.dst_hbone = Some(hbone);
            let key = Rc::new(PoolKey::new(
                shard.tls.identity.clone(),
                identities.clone(),
                hbone,
                req.source.ip(),
            ));
            match open_stream(shard, &key, &req, &identities).await {
                Ok((stream, slot, peer_id, reused, tls)) => {
                    log.pool_reused = Some(reused);
                    log.tls = Some(tls);
                    log.dst_identity = Some(peer_id);
                    log.established(&shard.metrics);
                    Some(Opened {
                        client,
                        stream,
                        done: Box::new(Done { log, slot }),
                    })
                }
                Err(e) => {
                    log.end = End::Error(e.to_string());
                    fail(shard, client, log);
                    None
                }
            }
        }
    }
}

fn baggage(shard: &Shard, w: Option<&Workload>) -> Baggage {
    let Some(w) = w else {
        return Baggage::default();
    };
    let kind = if w.workload_type.is_empty() {
        "deployment"
    } else {
        &w.workload_type
    };
    let name = [&w.workload_name, &w.name]
        .into_iter()
        .find(|s| !s.is_empty())
        .cloned()
        .unwrap_or_default();
    Baggage {
        cluster: if w.cluster_id.is_empty() {
            shard.opts.cluster_id.clone()
        } else {
            w.cluster_id.clone()
        },
        namespace: w.namespace.clone(),
        workload_type: kind.to_owned(),
        service: if w.canonical_name.is_empty() {
            name.clone()
        } else {
            w.canonical_name.clone()
        },
        version: if w.canonical_revision.is_empty() {
            "latest".to_owned()
        } else {
            w.canonical_revision.clone()
        },
        workload_name: name,
    }
}

fn fail(shard: &Shard, client: TcpStream, mut log: AccessLog) {
    shard.counters.failed.set(shard.counters.failed.get() + 1);
    net::abort_on_close(client.as_raw_fd());
    drop(client);
    if matches!(log.end, End::Closed) {
        log.end = End::Error("refused".into());
    }
    log.response_flags.get_or_insert("CONNECT");
    log.finish(&shard.metrics);
}

/// Returns the pool slot when the stream ends, however it ends.
struct Slot {
    shard: Rc<Shard>,
    key: Rc<PoolKey>,
    id: ConnId,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shard
            .pool
            .borrow_mut()
            .release(&self.key, self.id, Instant::now());
    }
}

type Stream = (h2::SendStream<Bytes>, h2::RecvStream);

/// Opens a CONNECT stream, on a pooled connection if one has room, else on a new one. A pooled
/// connection that turns out to be closing is marked dead and the stream retried once on a new
/// connection.
async fn open_stream(
    shard: &Rc<Shard>,
    key: &Rc<PoolKey>,
    req: &ConnectRequest,
    identities: &[Identity],
) -> Result<(Stream, Slot, Rc<Identity>, bool, TlsPath), OpenError> {
    let pooled = shard
        .pool
        .borrow_mut()
        .checkout(key)
        .map(|(id, c)| c.lend(id));
    if let Some(lent) = pooled {
        if let Some(done) = on_pooled(shard, key, req, lent, "pooled").await {
            return done;
        }
    }
    // A connection to the same key being opened already has room for this stream: wait for
    // it rather than open one more (a burst of new streams would otherwise open one each).
    let joined = shard.pool.borrow_mut().join(key);
    if let Some(attempt) = joined {
        let mut waiter = Waiter {
            shard,
            key,
            attempt,
            done: false,
        };
        let joined = poll_fn(|cx| {
            let mut pool = shard.pool.borrow_mut();
            pool.poll_joined(key, attempt, cx)
                .map(|r| r.map(|(id, c)| c.lend(id)))
        })
        .await;
        waiter.done = true;
        let lent = joined.map_err(|why| OpenError::Shared { addr: key.dst, why })?;
        if let Some(done) = on_pooled(shard, key, req, lent, "just opened").await {
            return done;
        }
    }
    let attempt = shard.pool.borrow_mut().begin(key);
    let mut opener = Opener {
        shard,
        key,
        attempt,
        done: false,
    };
    // Boxed: the TLS and h2 handshake state is large (about 8 KiB) and only a stream that
    // opens a new connection needs it; unboxed, every stream's opening would allocate it.
    let connected = Box::pin(connect(shard, key.dst, identities)).await;
    opener.done = true;
    let (conn, peer) = match connected {
        Ok(c) => c,
        Err(e) => {
            shard
                .pool
                .borrow_mut()
                .finish(key, attempt, Err(e.to_string()));
            return Err(e);
        }
    };
    let send = conn.send.clone();
    let tls = conn.tls;
    let id = shard
        .pool
        .borrow_mut()
        .finish(key, attempt, Ok(conn))
        .ok_or_else(|| OpenError::Shared {
            addr: key.dst,
            why: "connection attempt vanished from the pool".into(),
        })?;
    let slot = Slot {
        shard: shard.clone(),
        key: key.clone(),
        id,
    };
    let stream = request(send, req, shard.opts.connect_timeout).await?;
    shard
        .counters
        .pool_new
        .set(shard.counters.pool_new.get() + 1);
    Ok((stream, slot, peer, false, tls))
}

/// Opens the stream on a connection taken from the pool (`what`: how it got there, for the
/// log). `None` when that connection turned out unusable: it is marked dead, its slot given
/// back, and the caller opens another.
async fn on_pooled(
    shard: &Rc<Shard>,
    key: &Rc<PoolKey>,
    req: &ConnectRequest,
    lent: Lent,
    what: &str,
) -> Option<Result<(Stream, Slot, Rc<Identity>, bool, TlsPath), OpenError>> {
    let slot = Slot {
        shard: shard.clone(),
        key: key.clone(),
        id: lent.id,
    };
    match request(lent.send, req, shard.opts.connect_timeout).await {
        Ok(stream) => {
            shard
                .counters
                .pool_reused
                .set(shard.counters.pool_reused.get() + 1);
            Some(Ok((stream, slot, lent.peer, true, lent.tls)))
        }
        Err(OpenError::Refused(e)) => Some(Err(OpenError::Refused(e))),
        Err(e) => {
            tracing::debug!(error = %e, "{what} HBONE connection unusable; opening a new one");
            lent.alive.set(false);
            None
        }
    }
}

/// Ends a connection attempt that its opener abandoned (its task dropped mid-handshake), so
/// the streams waiting on it fail instead of waiting forever.
struct Opener<'a> {
    shard: &'a Shard,
    key: &'a PoolKey,
    attempt: AttemptId,
    done: bool,
}

impl Drop for Opener<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shard.pool.borrow_mut().finish(
                self.key,
                self.attempt,
                Err("connection attempt abandoned".into()),
            );
        }
    }
}

/// Gives back the stream promised on a connection being opened when its waiter goes away
/// before the outcome.
struct Waiter<'a> {
    shard: &'a Shard,
    key: &'a PoolKey,
    attempt: AttemptId,
    done: bool,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shard
                .pool
                .borrow_mut()
                .leave(self.key, self.attempt, Instant::now());
        }
    }
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// TCP connect to the peer's 15008 failed.
    #[error("connect to HBONE peer {addr}: {source}")]
    Connect {
        /// The peer.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// The TLS handshake failed or timed out.
    #[error("TLS handshake with {addr}: {why}")]
    Handshake {
        /// The peer.
        addr: SocketAddr,
        /// What failed.
        why: String,
    },
    /// The peer is not who the destination may be, or protocol failure.
    #[error(transparent)]
    Hbone(#[from] HboneError),
    /// The connection another stream was opening for this one failed.
    #[error("HBONE connection to {addr} (opened for several streams): {why}")]
    Shared {
        /// The peer.
        addr: SocketAddr,
        /// Why it failed.
        why: String,
    },
    /// The peer did not answer the CONNECT in time.
    #[error(
        "HBONE peer {addr} did not answer the CONNECT within {after:?} (--connect-timeout-ms)"
    )]
    NoResponse {
        /// The peer.
        addr: SocketAddr,
        /// How long we waited.
        after: std::time::Duration,
    },
    /// The peer answered the CONNECT with an error status.
    #[error("{0}")]
    Refused(HboneError),
}

/// Sends the CONNECT and waits for its answer, at most `timeout` (`--connect-timeout-ms`: the
/// stream is the tunnel's connect), so a peer that stopped answering fails the stream instead
/// of holding the client forever.
async fn request(
    send: SendRequest<Bytes>,
    req: &ConnectRequest,
    timeout: std::time::Duration,
) -> Result<Stream, OpenError> {
    let mut send = send.ready().await.map_err(HboneError::from)?;
    let (resp, mut stream) = send
        .send_request(req.to_request(), false)
        .map_err(HboneError::from)?;
    let resp = match monoio::time::timeout(timeout, resp).await {
        Ok(r) => r.map_err(HboneError::from)?,
        Err(_) => {
            stream.send_reset(h2::Reason::CANCEL);
            return Err(OpenError::NoResponse {
                addr: SocketAddr::new(req.target.ip(), HBONE_PORT),
                after: timeout,
            });
        }
    };
    if resp.status() != http::StatusCode::OK {
        return Err(OpenError::Refused(HboneError::Refused {
            peer: SocketAddr::new(req.target.ip(), HBONE_PORT),
            authority: req.target,
            status: resp.status().as_u16(),
        }));
    }
    Ok((stream, resp.into_body()))
}

async fn connect(
    shard: &Rc<Shard>,
    addr: SocketAddr,
    identities: &[Identity],
) -> Result<(PooledH2, Rc<Identity>), OpenError> {
    let opts = &shard.opts;
    let tcp = net::connect_marked(addr, opts.mark, opts.connect_timeout)
        .await
        .map_err(|source| OpenError::Connect { addr, source })?;
    shard.tune_socket(tcp.as_raw_fd());
    let io = tcp
        .into_poll_io()
        .map_err(|source| OpenError::Connect { addr, source })?;
    let Handshaken {
        h2: (send, conn),
        peer,
        tick,
        path,
        budget,
    } = handshake::client(
        &shard.stream,
        &shard.connector,
        ServerName::IpAddress(addr.ip().into()),
        io,
        |certs| verify::expect_identity(certs, identities),
        opts.h2.client_builder(),
    )
    .await
    .map_err(|e| match e {
        HandshakeError::Identity(e) => OpenError::Hbone(e),
        HandshakeError::H2(e) => OpenError::Hbone(e.into()),
        e => OpenError::Handshake {
            addr,
            why: e.to_string(),
        },
    })?;
    let peer = Rc::new(peer);
    let alive = Rc::new(Cell::new(true));
    let flag = alive.clone();
    let shard_id = shard.id;
    let ka = opts.keepalive;
    monoio::spawn(async move {
        let mut conn = conn;
        let watch = keepalive::Watch::spawn(conn.ping_pong(), ka);
        let ended = poll_fn(|cx| {
            if let Poll::Ready(why) = watch.poll_dead(cx) {
                return Poll::Ready(Err(why));
            }
            tick.poll(cx, |cx| Pin::new(&mut conn).poll(cx)).map(Ok)
        })
        .await;
        match ended {
            Ok(Err(e)) => {
                tracing::debug!(shard = shard_id, peer = %addr, error = %e, "HBONE connection ended");
            }
            Ok(Ok(())) => {}
            Err(why) => {
                // Dropping the connection closes the socket: its streams end with an error.
                tracing::warn!(shard = shard_id, peer = %addr, %why, "HBONE peer unresponsive; connection closed");
            }
        }
        flag.set(false);
    });
    Ok((
        PooledH2 {
            send,
            alive,
            peer: peer.clone(),
            tls: path,
            budget,
        },
        peer,
    ))
}
