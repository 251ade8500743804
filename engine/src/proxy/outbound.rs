//! Outbound: a connection captured on 15001 leaves as an HBONE stream, or as plain TCP.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use monoio::io::IntoPollIo;
use monoio::net::TcpStream;
use ringtun_hbone::connect::{ConnectRequest, TraceParent};
use ringtun_hbone::pool::PoolKey;
use ringtun_hbone::{verify, HboneError, Identity, HBONE_PORT};
use rustls::pki_types::ServerName;

use super::access::Direction;
use super::copy;
use super::keepalive;
use super::lifecycle::{refuse_tcp, Record};
use super::plaintext;
use crate::config::Snapshot;
use crate::decide::{Refusal, Route};
use crate::net;
use crate::shard::demand::Outcome;
use crate::shard::live;
use crate::shard::pod::PodShard;
use crate::shard::pool::{Lent, PooledH2, Slot};
use crate::shard::{Shard, Tally};
use crate::stream::handshake::{self, HandshakeError, Handshaken};
use crate::stream::TlsPath;

/// Handles one connection accepted on the outbound capture listener.
///
/// In two allocations. Everything up to an open HBONE stream (routing, the pool, the CONNECT,
/// a possible handshake, or the whole passthrough path) runs boxed and is freed when it
/// returns; the task itself then holds only the copy and the connection's record. A task is as
/// big as the largest state its future can be in and an idle connection keeps its task for
/// life, so what it holds while idle is the memory per idle connection.
/// `pod`: the pod whose listener accepted it (in-pod mode).
pub fn handle(
    shard: Rc<Shard>,
    client: TcpStream,
    peer: SocketAddr,
    pod: Option<Rc<PodShard>>,
) -> impl Future<Output = ()> + 'static {
    let opening = Box::pin(open(shard, client, peer, pod));
    async move {
        let Some(Opened {
            client,
            send,
            recv,
            conn,
            record,
        }) = opening.await
        else {
            return;
        };
        let end = copy::tcp_h2(client, send, recv, conn).await;
        record.finish(end);
    }
}

/// Whether `snap` knows `dst`'s address (a workload's or a service's): if not, on demand,
/// istiod is asked for it.
fn knows(snap: &Snapshot, dst: SocketAddr) -> bool {
    snap.workload_by_ip(dst.ip()).is_some() || snap.service_by_vip(dst.ip()).is_some()
}

/// A captured connection with its HBONE stream open, ready to copy.
struct Opened {
    client: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Its registration with the shard's live connections.
    conn: live::Conn,
    /// Its access record, holding its pool slot until it ends.
    record: Record<Option<Slot>>,
}

/// Routes the connection and opens its stream; `None` when the connection was handled here
/// (refused, failed, or passed through).
async fn open(
    shard: Rc<Shard>,
    client: TcpStream,
    peer: SocketAddr,
    pod: Option<Rc<PodShard>>,
) -> Option<Opened> {
    let shard = &shard;
    let pod_rc = pod.as_ref();
    let pod = pod.as_deref();
    let src = net::canonical(peer);
    let mut record = Record::new(shard, Direction::Outbound, src);
    record.log().pod = pod_rc.cloned();
    let _ = client.set_nodelay(true);
    let dst = match super::original_destination(&client) {
        Ok(dst) => dst,
        Err(refusal) => {
            refuse_tcp(record, client, refusal);
            return None;
        }
    };
    record.log().dst_addr = Some(dst);
    let mut snap = shard.snapshot();
    if shard.on_demand().is_on() && !knows(&snap, dst) {
        // XDS_ON_DEMAND: istiod is asked for the address; the connection waits for the answer.
        let (outcome, wait) = shard.on_demand().ask(dst.ip()).await;
        snap = shard.snapshot();
        match outcome {
            Outcome::TimedOut => {
                tracing::warn!(%dst, ?wait, "no answer from istiod for the on-demand destination; routed as unknown")
            }
            _ => {
                tracing::debug!(%dst, ?outcome, known = knows(&snap, dst), "on-demand destination")
            }
        }
    }
    let src_w = shard.scope_for(pod).source_workload(&snap, src.ip());
    record.source(src_w);
    record.service(snap.service_by_vip(dst.ip()).map(|s| s.service));
    match shard.route_for(pod, &snap, src_w, dst) {
        Route::NoEndpoint { .. } => {
            refuse_tcp(record, client, Refusal::NoEndpoint { dst });
            None
        }
        Route::Direct { target, service } => {
            if service.is_none() {
                // A `Passthrough` service's VIP: ztunnel names no service for it.
                record.service(None);
            }
            record.destination(snap.workload_by_ip(target.ip()));
            record.log().direction = Direction::Passthrough;
            record.opening();
            drop(snap);
            plaintext::forward(shard, pod, client, target, record, None).await;
            None
        }
        Route::Hbone {
            target,
            identities,
            service,
        } => {
            record.destination(snap.workload_by_ip(target.ip()));
            let log = record.log();
            // The identity the destination must prove, named even if the stream then fails
            // (ztunnel's `destination_principal` is the workload's).
            log.dst_identity = identities.first().cloned().map(Rc::new);
            log.src_identity = Some(shard.identity_for(pod).clone());
            let baggage = shard.request_baggage(src_w);
            drop(snap);
            let req = ConnectRequest {
                target,
                source: src,
                service_host: service,
                baggage,
                traceparent: TraceParent::random(&mut rand::thread_rng()),
            };
            // The HBONE connection goes to the target's IP at HBONE_PORT (the access line's
            // `dst.addr`, which it derives from the target).
            let hbone = SocketAddr::new(req.target.ip(), HBONE_PORT);
            record.log().hbone = Some(req.target);
            record.opening();
            // The source identity (and address) are in the key: a pod's connections are
            // never lent to another pod, as ztunnel's pool keys them.
            let key = Rc::new(PoolKey::new(
                Identity::clone(shard.identity_for(pod)),
                identities.clone(),
                hbone,
                req.source.ip(),
            ));
            match open_stream(shard, pod_rc, &key, &req, &identities).await {
                Ok(stream) => {
                    let log = record.log();
                    log.pool_reused = Some(stream.reused);
                    log.tls = Some(stream.tls);
                    log.dst_identity = Some(stream.peer);
                    *record.held() = Some(stream.slot);
                    let conn = record.carry(shard, pod, None, false);
                    Some(Opened {
                        client,
                        send: stream.send,
                        recv: stream.recv,
                        conn,
                        record,
                    })
                }
                Err(e) => {
                    let refusal = match e {
                        // ztunnel's words for the peer's answer, which log pipelines match.
                        OpenError::Refused(HboneError::Refused { status, .. }) => {
                            Refusal::PeerStatus(
                                http::StatusCode::from_u16(status)
                                    .unwrap_or(http::StatusCode::BAD_GATEWAY),
                            )
                        }
                        e => Refusal::Tunnel(e.to_string()),
                    };
                    refuse_tcp(record, client, refusal);
                    None
                }
            }
        }
    }
}

/// A CONNECT stream open on a pooled connection: its two halves, its place on the connection,
/// and what the access log says about it.
struct OpenStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    slot: Slot,
    /// The identity the peer presented.
    peer: Rc<Identity>,
    /// Whether the connection was already pooled (not opened for this stream).
    reused: bool,
    /// How the connection's records are carried.
    tls: TlsPath,
}

/// Opens a CONNECT stream, on a pooled connection if one has room, else on a new one. A pooled
/// connection that turns out to be closing is marked dead and the stream retried once on a new
/// connection.
async fn open_stream(
    shard: &Rc<Shard>,
    pod: Option<&Rc<PodShard>>,
    key: &Rc<PoolKey>,
    req: &ConnectRequest,
    identities: &[Identity],
) -> Result<OpenStream, OpenError> {
    let pool = shard.pool();
    let pooled = pool.checkout(key);
    if let Some(lent) = pooled {
        if let Some(done) = on_pooled(shard, req, lent, "pooled").await {
            return done;
        }
    }
    // A connection to the same key being opened already has room for this stream: wait for
    // it rather than open one more (a burst of new streams would otherwise open one each).
    let joined = pool.join(key);
    if let Some(waiting) = joined {
        let lent = waiting
            .joined()
            .await
            .map_err(|why| OpenError::Shared { addr: key.dst, why })?;
        if let Some(done) = on_pooled(shard, req, lent, "just opened").await {
            return done;
        }
    }
    let opening = pool.begin(key);
    // Boxed: the TLS and h2 handshake state is large (about 8 KiB) and only a stream that
    // opens a new connection needs it; unboxed, every stream's opening would allocate it.
    let connected = Box::pin(connect(shard, pod, key, identities)).await;
    let (conn, peer) = match connected {
        Ok(c) => c,
        Err(e) => {
            opening.finish(Err(e.to_string()));
            return Err(e);
        }
    };
    let send = conn.sender();
    let tls = conn.tls();
    let id = opening.finish(Ok(conn)).ok_or_else(|| OpenError::Shared {
        addr: key.dst,
        why: "connection attempt vanished from the pool".into(),
    })?;
    let slot = pool.slot(key.clone(), id);
    let (send, recv) = request(send, req, shard.opts.connect_timeout).await?;
    Tally::bump(&shard.counters().pool_new);
    Ok(OpenStream {
        send,
        recv,
        slot,
        peer,
        reused: false,
        tls,
    })
}

/// Opens the stream on a connection taken from the pool (`what`: how it got there, for the
/// log). `None` when that connection turned out unusable: it is marked dead, its slot given
/// back, and the caller opens another.
async fn on_pooled(
    shard: &Rc<Shard>,
    req: &ConnectRequest,
    lent: Lent,
    what: &str,
) -> Option<Result<OpenStream, OpenError>> {
    // The connection's key, not this stream's copy of it: the slot lives as long as the stream.
    let slot = shard.pool().slot(lent.key.clone(), lent.id);
    match request(lent.send, req, shard.opts.connect_timeout).await {
        Ok((send, recv)) => {
            Tally::bump(&shard.counters().pool_reused);
            Some(Ok(OpenStream {
                send,
                recv,
                slot,
                peer: lent.peer,
                reused: true,
                tls: lent.tls,
            }))
        }
        Err(OpenError::Refused(e)) => Some(Err(OpenError::Refused(e))),
        Err(e) => {
            tracing::debug!(error = %e, "{what} HBONE connection unusable; opening a new one");
            lent.alive.set(false);
            None
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
) -> Result<(SendStream<Bytes>, RecvStream), OpenError> {
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
    pod_rc: Option<&Rc<PodShard>>,
    key: &Rc<PoolKey>,
    identities: &[Identity],
) -> Result<(PooledH2, Rc<Identity>), OpenError> {
    let addr = key.dst;
    let opts = &shard.opts;
    let pod = pod_rc.map(|p| &**p);
    let netns = pod.map(PodShard::netns);
    let tcp = net::connect_marked_in(netns, addr, opts.mark, opts.connect_timeout)
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
        &shard.tls_for(pod).connector,
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
    let pooled = PooledH2::new(send, key.clone(), alive, peer.clone(), path, budget)
        .for_pod(pod_rc.cloned());
    Ok((pooled, peer))
}
