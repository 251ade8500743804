//! Plaintext paths: inbound capture on 15006, and outbound passthrough for destinations that
//! are not HBONE.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use monoio::net::TcpStream;

use super::access::Direction;
use super::copy;
use super::lifecycle::{refuse_tcp, Record};
use crate::decide::{self, Arrival, Grant, Refusal};
use crate::net;
use crate::shard::pod::PodShard;
use crate::shard::Shard;

/// Connects to `target` (marked) and copies both ways; the connection's `record` is written
/// when it ends. `grant`: what authorization admitted it on, re-checked when policies change.
/// `pod`: the pod it serves (in-pod mode), whose namespace the upstream socket is made in.
pub(crate) async fn forward<X>(
    shard: &Shard,
    pod: Option<&PodShard>,
    client: TcpStream,
    target: SocketAddr,
    mut record: Record<X>,
    grant: Option<Grant>,
) {
    record.log().dst_addr.get_or_insert(target);
    let netns = pod.map(PodShard::netns);
    let opts = &shard.opts;
    match net::connect_marked_in(netns, target, opts.mark, opts.connect_timeout).await {
        Ok(upstream) => {
            shard.tune_socket(upstream.as_raw_fd());
            let conn = record.carry(shard, pod, grant, false);
            let end = copy::tcp_tcp(client, upstream, conn).await;
            record.finish(end);
        }
        Err(e) => refuse_tcp(
            record,
            client,
            Refusal::Unreachable {
                target,
                error: e.to_string(),
            },
        ),
    }
}

/// Handles one connection captured on 15006: plaintext traffic for a local workload.
/// `pod`: the pod whose listener accepted it (in-pod mode).
pub async fn inbound(
    shard: &Rc<Shard>,
    client: TcpStream,
    peer: SocketAddr,
    pod: Option<Rc<PodShard>>,
) {
    let src = net::canonical(peer);
    let mut record: Record = Record::new(shard, Direction::InboundPlaintext, src);
    record.log().pod = pod.clone();
    let pod = pod.as_deref();
    let _ = client.set_nodelay(true);
    let dst = match super::original_destination(&client) {
        Ok(dst) => dst,
        Err(refusal) => return refuse_tcp(record, client, refusal),
    };
    record.log().dst_addr = Some(dst);
    let snap = shard.snapshot();
    let arrival = Arrival {
        src_ip: src.ip(),
        src_identity: None,
        dst,
        reached: None,
    };
    let scope = shard.scope_for(pod);
    let admission = decide::admit_plaintext(scope, &snap, &arrival);
    record.admitted(&admission, &arrival);
    if let Some(w) = admission.dst_workload {
        record.log().dst_identity = Some(Rc::new(scope.workload_identity(w)));
    }
    let grant = match admission.outcome {
        Ok(grant) => grant,
        Err(refusal) => return refuse_tcp(record, client, refusal),
    };
    drop(snap);
    forward(shard, pod, client, dst, record, Some(grant)).await;
}
