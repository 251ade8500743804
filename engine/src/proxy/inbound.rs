//! Inbound HBONE on 15008: mutual TLS, then one CONNECT stream per tunnelled connection.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::SendStream;
use http::{Response, StatusCode};
use monoio::io::IntoPollIo;
use monoio::net::TcpStream;
use ringtun_hbone::connect::{parse_connect, Refusal};
use ringtun_hbone::{verify, Identity};

use super::access::{AccessLog, Direction};
use super::copy::{self, End};
use super::keepalive;
use super::live::Grant;
use crate::config::Workload;
use crate::net;
use crate::policy;
use crate::shard::Shard;
use crate::stream::handshake::{self, HandshakeError, Handshaken};
use crate::stream::TlsPath;

/// Handles one connection accepted on the HBONE listener: handshake, then serve its streams.
pub async fn handle(shard: &Rc<Shard>, tcp: TcpStream, peer: SocketAddr) {
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
    // moved out of) would stay in the task's state for the connection's life.
    let Handshaken {
        h2: mut conn,
        peer: client_id,
        tick,
        path: tls,
        budget,
    } = match handshake::server(
        &shard.stream,
        &shard.acceptor,
        io,
        // The verifier already required a SPIFFE identity in our trust domain.
        |certs| verify::peer_identity(certs, &shard.opts.trust_domain),
        shard.opts.h2.server_builder(),
    )
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
    let drain = shard.drain.waiter();
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
                tracing::debug!(%peer, draining = shard.drain.is_fired(), "inbound: GOAWAY");
                conn.graceful_shutdown();
                continue;
            }
            Ok(Some(None)) => break,
            Ok(Some(Some(next))) => next,
        };
        match next {
            Ok((req, respond)) => {
                let opening = accept_stream(
                    shard.clone(),
                    req,
                    respond,
                    (peer, local),
                    client_id.clone(),
                    tls,
                );
                monoio::spawn(stream(shard.clone(), Box::pin(opening)));
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
    shard.counters.failed.set(shard.counters.failed.get() + 1);
}

fn refuse(shard: &Shard, respond: SendResponse<Bytes>, refusal: Refusal, log: AccessLog) {
    refuse_with(shard, respond, refusal, log, None)
}

fn refuse_with(
    shard: &Shard,
    mut respond: SendResponse<Bytes>,
    refusal: Refusal,
    mut log: AccessLog,
    detail: Option<String>,
) {
    count_failed(shard);
    let mut resp = Response::new(());
    *resp.status_mut() = refusal.status;
    // A refused stream ends here; its connection and sibling streams are untouched.
    let _ = respond.send_response(resp, true);
    let detail = detail.map(|d| format!(": {d}")).unwrap_or_default();
    log.end = End::Error(format!(
        "{} {}{detail}",
        refusal.status.as_u16(),
        refusal.reason
    ));
    if log.response_flags.is_none() {
        log.response_flags = Some("CONNECT");
    }
    log.finish(&shard.metrics);
}

/// Serves one CONNECT stream, in two allocations like the outbound side (see
/// `outbound::handle`): `opening` (the request's checks, the policy and the upstream connect,
/// [`accept_stream`]) is boxed and freed once the stream is accepted; the task keeps only the
/// copy. An `async fn` keeps its arguments twice, here 16 bytes.
async fn stream(shard: Rc<Shard>, opening: Pin<Box<impl Future<Output = Option<Accepted>>>>) {
    let Some((upstream, send, body, mut log, grant)) = opening.await else {
        return;
    };
    // The copy's TCP side is the destination here: its bytes are the response direction.
    let conn = shard.track(grant, log.series.clone().map(|s| (s, true)));
    let (bytes, end, unreported) = copy::tcp_h2(upstream, send, body, conn).await;
    log.unreported = unreported;
    if matches!(end, End::Revoked(_)) {
        log.response_flags = Some("DENY");
    }
    // tcp_h2 counts from its TCP side, here the destination; the access log and the metrics
    // count from the client (request = client towards destination) in every direction.
    log.bytes = bytes.reversed();
    log.end = end;
    log.finish(&shard.metrics);
}

/// A stream accepted: the upstream socket, both halves of the HBONE stream, the access-log
/// record (boxed, needed only when the copy ends) and what policy admitted it on.
type Accepted = (
    TcpStream,
    SendStream<Bytes>,
    h2::RecvStream,
    Box<AccessLog>,
    Option<Grant>,
);

/// Checks and connects one CONNECT stream and answers it; `None` when it was refused (the
/// refusal sent and logged).
async fn accept_stream(
    shard: Rc<Shard>,
    req: http::Request<h2::RecvStream>,
    respond: SendResponse<Bytes>,
    (peer, local): (SocketAddr, Option<SocketAddr>),
    client_id: Rc<Identity>,
    tls: TlsPath,
) -> Option<Accepted> {
    let shard = &shard;
    let mut log = AccessLog::new(Direction::Inbound, peer, shard.id);
    log.tls = Some(tls);
    log.src_identity = Some(client_id);
    log.dst_identity = Some(shard.identity.clone());
    let (parts, body) = req.into_parts();
    let target = match parse_connect(&parts.method, &parts.uri, &parts.headers) {
        Ok(t) => t,
        Err(r) => {
            refuse(shard, respond, r, log);
            return None;
        }
    };
    // The source that authorization and the logs see is the connection's own peer, as
    // ztunnel's: `forwarded: for=` is the client's word, and trusting it would let any mesh
    // client claim an address that a `sourceIps` ALLOW lets in or a DENY keeps out. (ztunnel
    // honours it only for a network gateway's hostname CONNECT, which ringtun refuses.)
    let dst = net::canonical(target.target);
    log.dst_addr = Some(dst);
    // Refusals as ztunnel answers them: a dedicated ringtun delivers only to the address the
    // client connected to (400, ztunnel's IPMismatch), and never to its own listeners (503,
    // ztunnel's SelfCall), which would loop a tunnel into itself.
    if shard.opts.workload.is_some() {
        if let Some(local) = local.filter(|l| l.ip() != dst.ip()) {
            let why = format!(
                "{} is not the address this connection reached ({})",
                dst.ip(),
                local.ip()
            );
            refuse_with(
                shard,
                respond,
                Refusal::malformed("destination IP mismatch"),
                log,
                Some(why),
            );
            return None;
        }
    }
    if shard.is_own_port(dst.port()) {
        refuse(
            shard,
            respond,
            Refusal::unavailable("the destination is one of ringtun's own ports"),
            log,
        );
        return None;
    }
    let snap = shard.snapshot();
    let src_ip = net::canonical(log.src_addr).ip();
    log.src_workload = snap.workload_by_ip(src_ip).map(|w| w.display_name());
    if !shard.serves(&snap, dst.ip()) {
        refuse(
            shard,
            respond,
            Refusal::unavailable("destination is not a workload served here"),
            log,
        );
        return None;
    }
    let mut grant = None;
    let mut baggage = None;
    if let Some(w) = snap.workload_by_ip(dst.ip()) {
        log.dst_workload = Some(w.display_name());
        baggage = Some(response_baggage(w));
        let conn = policy::Connection {
            src_identity: log.src_identity.as_deref(),
            src_ip,
            dst_ip: dst.ip(),
            dst_port: dst.port(),
        };
        if let Err((why, detail)) = authorize(shard, w, &conn) {
            log.response_flags = Some("DENY");
            refuse_with(
                shard,
                respond,
                Refusal::unauthorized(why),
                log,
                Some(detail),
            );
            return None;
        }
        grant = Some(Grant {
            src_identity: log.src_identity.clone(),
            src_ip,
            dst_ip: dst.ip(),
            dst_port: dst.port(),
            generation: snap.generation,
        });
    }
    drop(snap);
    let connecting = net::connect_marked(dst, shard.opts.mark, shard.opts.connect_timeout);
    let upstream = match connecting.await {
        Ok(s) => {
            shard.tune_socket(s.as_raw_fd());
            s
        }
        Err(e) => {
            tracing::debug!(%dst, error = %e, "inbound: destination unreachable");
            refuse(
                shard,
                respond,
                Refusal::unavailable("destination unreachable"),
                log,
            );
            return None;
        }
    };
    let mut respond = respond;
    let mut ok = Response::builder().status(StatusCode::OK);
    if let Some(b) = baggage.filter(|b| !b.is_empty()) {
        ok = ok.header(ringtun_hbone::connect::BAGGAGE, b);
    }
    let send = match respond.send_response(ok.body(()).unwrap_or_default(), false) {
        Ok(s) => s,
        Err(e) => {
            log.end = End::Error(format!("hbone: {e}"));
            log.finish(&shard.metrics);
            return None;
        }
    };
    log.established(&shard.metrics);
    Some((upstream, send, body, Box::new(log), grant))
}

/// The `baggage` ztunnel answers a CONNECT with: who the destination is, from the fields its
/// workload entry actually has (no defaults filled in, unlike a request's baggage), so the
/// client side can label its metrics. Checked against a real ztunnel for a workload with a
/// namespace only: `k8s.namespace.name=default`.
fn response_baggage(w: &Workload) -> String {
    ringtun_hbone::connect::Baggage {
        cluster: w.cluster_id.clone(),
        namespace: w.namespace.clone(),
        workload_type: if w.workload_name.is_empty() {
            String::new()
        } else {
            w.workload_type.clone()
        },
        workload_name: w.workload_name.clone(),
        service: w.canonical_name.clone(),
        version: w.canonical_revision.clone(),
    }
    .header_value()
}

/// Applies the authorization policies of `workload` to a new connection; the error is the
/// reason for the access log. Dry-run policies are logged, never enforced.
pub(crate) fn authorize(
    shard: &Shard,
    workload: &Workload,
    conn: &policy::Connection<'_>,
) -> Result<(), (&'static str, String)> {
    let eval = shard.policy().evaluate(workload, conn);
    for (name, would) in &eval.dry_run {
        tracing::info!(policy = %name, decision = %would, src = %conn.src_ip, dst = %conn.dst_ip, "authorization dry run");
    }
    match eval.decision {
        policy::Decision::Allow => Ok(()),
        policy::Decision::Deny { policy, reason } => {
            let short = match reason {
                policy::DenyReason::DeniedBy => "denied by authorization policy",
                policy::DenyReason::NotAllowed => "no authorization policy allows it",
            };
            let detail = if policy.is_empty() {
                reason.to_string()
            } else {
                format!("{reason} {policy}")
            };
            Err((short, detail))
        }
    }
}
