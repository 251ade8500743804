//! Plaintext paths: inbound capture on 15006, and outbound passthrough for destinations that
//! are not HBONE.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use monoio::net::TcpStream;

use super::access::{AccessLog, Direction};
use super::copy::{self, End};
use super::live::Grant;
use crate::net;
use crate::shard::Shard;

/// Connects to `target` (marked) and copies both ways; logs the connection at the end. `grant`:
/// what authorization admitted it on, re-checked when policies change.
pub async fn forward(
    shard: &Shard,
    client: TcpStream,
    target: SocketAddr,
    mut log: AccessLog,
    grant: Option<Grant>,
) {
    log.dst_addr.get_or_insert(target);
    match net::connect_marked(target, shard.opts.mark, shard.opts.connect_timeout).await {
        Ok(upstream) => {
            shard.tune_socket(upstream.as_raw_fd());
            log.established(&shard.metrics);
            let conn = shard.track(grant, log.series.clone().map(|s| (s, false)));
            let (bytes, end, unreported) = copy::tcp_tcp(client, upstream, conn).await;
            log.unreported = unreported;
            if matches!(end, End::Revoked(_)) {
                log.response_flags = Some("DENY");
            }
            log.bytes = bytes;
            log.end = end;
        }
        Err(e) => {
            shard.counters.failed.set(shard.counters.failed.get() + 1);
            net::abort_on_close(client.as_raw_fd());
            log.end = End::Error(format!("connect {target}: {e}"));
            log.response_flags = Some("CONNECT");
        }
    }
    log.finish(&shard.metrics);
}

/// Handles one connection captured on 15006: plaintext traffic for a local workload.
pub async fn inbound(shard: &Rc<Shard>, client: TcpStream, peer: SocketAddr) {
    let mut log = AccessLog::new(Direction::InboundPlaintext, net::canonical(peer), shard.id);
    let _ = client.set_nodelay(true);
    let local = client.local_addr().map(net::canonical);
    let dst = match local.and_then(|l| net::original_dst(client.as_raw_fd(), l).map(|d| (l, d))) {
        Ok((l, d)) if d != l => net::canonical(d),
        _ => {
            log.end = End::Error("connection was not redirected (no original destination)".into());
            net::abort_on_close(client.as_raw_fd());
            log.finish(&shard.metrics);
            return;
        }
    };
    log.dst_addr = Some(dst);
    let snap = shard.snapshot();
    if !shard.serves(&snap, dst.ip()) {
        log.end = End::Error("destination is not a workload served here".into());
        net::abort_on_close(client.as_raw_fd());
        log.finish(&shard.metrics);
        return;
    }
    let src_ip = log.src_addr.ip();
    log.src_workload = snap.workload_by_ip(src_ip).map(|w| w.display_name());
    let mut grant = None;
    if let Some(w) = snap.workload_by_ip(dst.ip()) {
        log.dst_workload = Some(w.display_name());
        log.dst_identity = Some(Rc::new(shard.workload_identity(w)));
        // Plaintext has no identity: principal rules cannot match it.
        let conn = crate::policy::Connection {
            src_identity: None,
            src_ip,
            dst_ip: dst.ip(),
            dst_port: dst.port(),
        };
        if let Err((_, detail)) = super::inbound::authorize(shard, w, &conn) {
            log.end = End::Error(format!("denied: {detail}"));
            log.response_flags = Some("DENY");
            net::abort_on_close(client.as_raw_fd());
            log.finish(&shard.metrics);
            return;
        }
        grant = Some(Grant {
            src_identity: None,
            src_ip,
            dst_ip: dst.ip(),
            dst_port: dst.port(),
            generation: snap.generation,
        });
    }
    drop(snap);
    forward(shard, client, dst, log, grant).await;
}
