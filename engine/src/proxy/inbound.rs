//! Inbound HBONE on 15008: mutual TLS, then one CONNECT stream per tunnelled connection.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Response, StatusCode};
use monoio::io::IntoPollIo;
use monoio::net::TcpStream;
use ringtun_hbone::{verify, Identity};

use super::access::Direction;
use super::copy;
use super::keepalive;
use super::lifecycle::{refuse_stream, Record};
use crate::decide::{self, Arrival, Refusal};
use crate::metrics::Party;
use crate::net;
use crate::shard::pod::PodShard;
use crate::shard::{live, Shard, Tally};
use crate::stream::handshake::{self, HandshakeError, Handshaken};
use crate::stream::TlsPath;

/// Handles one connection accepted on the HBONE listener: handshake, then serve its streams.
/// `pod`: the pod whose listener accepted it (in-pod mode): its identity is presented, its
/// workload admitted.
pub async fn handle(
    shard: &Rc<Shard>,
    tcp: TcpStream,
    peer: SocketAddr,
    pod: Option<Rc<PodShard>>,
) {
    let peer = net::canonical(peer);
    // The address the client dialled: in dedicated mode the workload's own IP, which a CONNECT
    // must name (ztunnel's `validate_destination`).
    let local = tcp.local_addr().map(net::canonical).ok();
    let _ = tcp.set_nodelay(true);
    let io = match tcp.into_poll_io() {
        Ok(io) => io,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "inbound: cannot switch socket to poll mode");
            return;
        }
    };
    // Matched and taken apart in place: a result or struct kept in a variable (even one
    // moved out of) would stay in the task's state for the connection's life. The handshake
    // is boxed for the same reason: its TLS and h2 state (about 11 KiB) would otherwise stay
    // in the connection's task after it finished.
    let Handshaken {
        h2: mut conn,
        peer: client_id,
        tick,
        path: tls,
        budget,
    } = match Box::pin(handshake::server(
        &shard.stream,
        &shard.tls_for(pod.as_deref()).acceptor,
        io,
        // The verifier already required a SPIFFE identity in our trust domain.
        |certs| verify::peer_identity(certs, &shard.opts.trust_domain),
        shard.opts.h2.server_builder(),
    ))
    .await
    {
        Ok(s) => s,
        Err(e) => {
            if !matches!(e, HandshakeError::H2(_)) {
                count_failed(shard);
            }
            match e {
                HandshakeError::Tls(e) => {
                    tracing::warn!(%peer, error = %e, "inbound: TLS handshake refused")
                }
                HandshakeError::TlsTimeout(timeout) => {
                    tracing::warn!(%peer, ?timeout, "inbound: TLS handshake timed out")
                }
                HandshakeError::Identity(e) => {
                    tracing::warn!(%peer, error = %e, "inbound: no client identity")
                }
                HandshakeError::Establish(e) => {
                    tracing::warn!(%peer, error = %e, "inbound: connection lost")
                }
                HandshakeError::EstablishTimeout(timeout) => {
                    tracing::warn!(%peer, ?timeout, "inbound: switching to kTLS timed out")
                }
                HandshakeError::H2(e) => {
                    tracing::warn!(%peer, error = %e, "inbound: HTTP/2 handshake failed")
                }
            }
            return;
        }
    };
    let client_id = Rc::new(client_id);
    let mut retired = false;
    let drain = shard.drain_for(pod.as_deref()).waiter();
    let watch = keepalive::Watch::spawn(conn.ping_pong(), shard.opts.keepalive);
    loop {
        // An offloaded connection whose TX key nears its usage limit gets a GOAWAY: the client
        // opens new streams elsewhere, the ones here finish (see stream::KeyBudget). A drain
        // does the same for every connection.
        let next = poll_fn(|cx| {
            if let Poll::Ready(why) = watch.poll_dead(cx) {
                return Poll::Ready(Err(why));
            }
            if !retired
                && (drain.poll_fired(cx).is_ready()
                    || budget
                        .as_ref()
                        .is_some_and(|b| b.poll_retired(cx).is_ready()))
            {
                return Poll::Ready(Ok(None));
            }
            tick.poll(cx, |cx| conn.poll_accept(cx))
                .map(|n| Ok(Some(n)))
        })
        .await;
        let next = match next {
            Err(why) => {
                // Dropping the connection closes the socket: its streams end with an error.
                tracing::warn!(%peer, %why, "inbound: HBONE peer unresponsive; connection closed");
                return;
            }
            Ok(None) => {
                retired = true;
                tracing::debug!(%peer, draining = shard.drain_for(pod.as_deref()).is_fired(), "inbound: GOAWAY");
                conn.graceful_shutdown();
                // Nothing woke the task for the GOAWAY: have h2's next poll run.
                tick.touched();
                continue;
            }
            Ok(Some(None)) => break,
            Ok(Some(Some(next))) => next,
        };
        match next {
            Ok((req, respond)) => {
                let opening = accept_stream(
                    shard.clone(),
                    pod.clone(),
                    req,
                    respond,
                    (peer, local),
                    client_id.clone(),
                    tls,
                );
                monoio::spawn(stream(Box::pin(opening)));
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "inbound: HTTP/2 connection error");
                return;
            }
        }
    }
    // Streams still running need the connection driven until they finish (or the peer dies).
    let _ = poll_fn(|cx| {
        if let Poll::Ready(why) = watch.poll_dead(cx) {
            tracing::warn!(%peer, %why, "inbound: HBONE peer unresponsive; connection closed");
            return Poll::Ready(Ok(()));
        }
        tick.poll(cx, |cx| conn.poll_closed(cx))
    })
    .await;
}

fn count_failed(shard: &Shard) {
    Tally::bump(&shard.counters().failed);
}

/// Serves one CONNECT stream, in two allocations like the outbound side (see
/// `outbound::handle`): `opening` (the request's checks, the policy and the upstream connect,
/// [`accept_stream`]) is boxed and freed once the stream is accepted; the task keeps only the
/// copy and the stream's record.
async fn stream(opening: Pin<Box<impl Future<Output = Option<Accepted>>>>) {
    let Some(Accepted {
        upstream,
        send,
        body,
        conn,
        record,
    }) = opening.await
    else {
        return;
    };
    let end = copy::tcp_h2(upstream, send, body, conn).await;
    record.finish(end);
}

/// A stream accepted: the upstream socket, both halves of the HBONE stream, its registration
/// with the shard's live connections and its access record.
struct Accepted {
    upstream: TcpStream,
    send: SendStream<Bytes>,
    body: RecvStream,
    conn: live::Conn,
    record: Record,
}

/// Checks and connects one CONNECT stream and answers it; `None` when it was refused (the
/// refusal sent and recorded).
async fn accept_stream(
    shard: Rc<Shard>,
    pod: Option<Rc<PodShard>>,
    req: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
    (peer, local): (SocketAddr, Option<SocketAddr>),
    client_id: Rc<Identity>,
    tls: TlsPath,
) -> Option<Accepted> {
    let shard = &shard;
    let mut record = Record::new(shard, Direction::Inbound, peer);
    record.log().pod = pod.clone();
    let pod = pod.as_deref();
    let log = record.log();
    log.tls = Some(tls);
    log.hbone = local;
    log.src_identity = Some(client_id.clone());
    log.dst_identity = Some(shard.identity_for(pod).clone());
    let (parts, body) = req.into_parts();
    let authority = decide::connect_target(&parts.method, &parts.uri);
    let snap = shard.snapshot();
    let dst = match authority {
        Ok(decide::Authority::Addr(dst)) => Ok(dst),
        // A hostname names a service port of the workload this connection reached.
        Ok(decide::Authority::Host(host, port)) => match local {
            Some(reached) => {
                decide::resolve_hostname(shard.scope_for(pod), &snap, reached.ip(), &host, port)
                    .map(|(dst, svc)| {
                        record.service(Some(svc));
                        record.log().hbone_service_port = Some(port);
                        dst
                    })
            }
            None => Err(Refusal::NoHostname { host }),
        },
        Err(refusal) => Err(refusal),
    };
    let dst = match dst {
        Ok(dst) => dst,
        Err(refusal) => {
            drop(snap);
            refuse_stream(record, respond, refusal);
            return None;
        }
    };
    record.log().dst_addr = Some(dst);
    let arrival = Arrival {
        src_ip: peer.ip(),
        src_identity: Some(&client_id),
        dst,
        reached: local,
    };
    let admission = decide::admit_hbone(shard.scope_for(pod), &snap, &arrival);
    if admission.src_workload.is_none() {
        // A source the config does not know is labelled from what its request says it is.
        let baggage = parts.headers.get_all(ringtun_hbone::connect::BAGGAGE);
        let party = Party::from_baggage(baggage.iter().filter_map(|v| v.to_str().ok()));
        record.log().src_workload = Some(Arc::new(party));
    }
    record.admitted(&admission, &arrival);
    let baggage = admission
        .dst_workload
        .and_then(|w| shard.response_baggage(w));
    let grant = match admission.outcome {
        Ok(grant) => grant,
        Err(refusal) => {
            refuse_stream(record, respond, refusal);
            return None;
        }
    };
    drop(snap);
    let opts = &shard.opts;
    let netns = pod.map(PodShard::netns);
    let connecting = net::connect_marked_in(netns, dst, opts.mark, opts.connect_timeout);
    let upstream = match connecting.await {
        Ok(s) => {
            shard.tune_socket(s.as_raw_fd());
            s
        }
        Err(e) => {
            tracing::debug!(%dst, error = %e, "inbound: destination unreachable");
            let error = e.to_string();
            refuse_stream(record, respond, Refusal::DestinationUnreachable { error });
            return None;
        }
    };
    let mut respond = respond;
    let mut ok = Response::builder().status(StatusCode::OK);
    if let Some(b) = baggage {
        ok = ok.header(ringtun_hbone::connect::BAGGAGE_NAME, b);
    }
    let send = match respond.send_response(ok.body(()).unwrap_or_default(), false) {
        Ok(s) => s,
        Err(e) => {
            refuse_stream(record, respond, Refusal::Lost(e.to_string()));
            return None;
        }
    };
    // The copy's TCP side is the destination here: its bytes are the response direction.
    let conn = record.carry(shard, pod, Some(grant), true);
    Some(Accepted {
        upstream,
        send,
        body,
        conn,
        record,
    })
}
