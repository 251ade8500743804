//! A shard's thread: it takes the control thread's messages and runs an accept loop per
//! listener, which hands each connection to its proxy path as a task of its own.
//!
//! This sits above both the shard (state) and the paths (what a connection does), so that the
//! paths depend on the shard and not the reverse.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crossbeam_channel::Sender;
use monoio::io::AsyncReadRent;
use monoio::net::TcpListener;

use super::{inbound, outbound, plaintext};
use crate::config::Snapshot;
use crate::options::ListenerKind;
use crate::options::RunOptions;
use crate::shard::pod::{Pod, PodShard};
use crate::shard::{Shard, ShardEvent, ShardMsg, ShardRx, Tally};
use crate::tls::TlsMaterial;

/// Runs one shard until the control thread goes away; `uring`: whether its runtime is io_uring.
pub async fn run(
    id: usize,
    uring: bool,
    opts: Arc<RunOptions>,
    tls: Arc<TlsMaterial>,
    rx: ShardRx,
    events: Sender<ShardEvent>,
    initial: Snapshot,
) {
    // Declared first, dropped last: what the shard logged on its way out is written too.
    let _batching = crate::operate::log_buffer::batching();
    monoio::spawn(crate::operate::log_buffer::flusher());
    let shard = Rc::new(Shard::new(id, opts, tls, initial));
    monoio::spawn(shard.clone().sweep_pool());
    let ShardRx { queue, wake } = rx;
    // from_std registers the fd with this thread's driver, so it must run in the runtime.
    let mut wake = match monoio::net::UnixStream::from_std(wake) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(shard = id, error = %e, "no control wake-up; polling the channel every 50 ms");
            None
        }
    };
    let mut buf = vec![0u8; 64];
    loop {
        if !queue.drain(|msg| handle(&shard, uring, msg, &events)) {
            return;
        }
        // Each send wrote a byte after queueing its message: one read covers every message
        // queued before it, and the queue is drained after it.
        let Some(w) = wake.as_mut() else {
            monoio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (res, b) = w.read(buf).await;
        buf = b;
        match res {
            // EOF: every sender is gone; what they queued first is still handled.
            Ok(0) => {
                queue.drain(|msg| handle(&shard, uring, msg, &events));
                return;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(shard = id, error = %e, "control wake-up failed; polling the channel every 50 ms");
                wake = None;
            }
        }
    }
}

fn handle(shard: &Rc<Shard>, uring: bool, msg: ShardMsg, events: &Sender<ShardEvent>) {
    // A control thread that stopped listening has nobody left to tell.
    match msg {
        ShardMsg::Config(snap) => {
            let _ = events.send(shard.apply_config(*snap));
        }
        ShardMsg::Scrape(reply) => {
            let _ = reply.send(shard.report());
        }
        ShardMsg::Drain => shard.start_drain(),
        ShardMsg::Listen { kind, socket } => {
            let _ = events.send(listen(shard, uring, kind, socket));
        }
        ShardMsg::AddPod {
            pod,
            listeners,
            reply,
        } => {
            let _ = reply.send(add_pod(shard, uring, pod, listeners));
        }
        ShardMsg::DelPod { uid, deadline } => shard.remove_pod(&uid, deadline),
        ShardMsg::Certificate { identity, tls } => shard.renew_certificate(&identity, tls),
        ShardMsg::OnDemand(demander) => shard.on_demand().enable(demander),
        ShardMsg::Answered(ips) => shard.on_demand().answered(&ips),
    }
}

/// Starts serving a pod on its listeners (bound in its namespace by the control thread).
fn add_pod(
    shard: &Rc<Shard>,
    uring: bool,
    pod: Arc<Pod>,
    listeners: Vec<(ListenerKind, std::net::TcpListener)>,
) -> Result<(), String> {
    let uid = pod.uid.clone();
    let served = shard
        .add_pod(pod, shard.opts.drain_timeout)
        .ok_or_else(|| format!("shard {} is draining", shard.id))?;
    for (kind, socket) in listeners {
        // from_std registers the fd with this thread's driver, so it must run in the runtime.
        let listener = match TcpListener::from_std(socket) {
            Ok(l) => l,
            Err(e) => {
                shard.remove_pod(&uid, std::time::Duration::ZERO);
                return Err(format!("shard {}: pod {kind} listener: {e}", shard.id));
            }
        };
        served.add_listener(listener.as_raw_fd());
        monoio::spawn(accept_loop(
            shard.clone(),
            uring,
            kind,
            listener,
            Some(served.clone()),
        ));
    }
    Ok(())
}

/// Takes a listening socket into this shard's runtime and starts accepting on it.
fn listen(
    shard: &Rc<Shard>,
    uring: bool,
    kind: ListenerKind,
    socket: std::net::TcpListener,
) -> ShardEvent {
    // from_std registers the fd with this thread's driver, so it must run in the runtime.
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            return ShardEvent::ListenFailed {
                shard: shard.id,
                error: format!("{kind} listener: {e}"),
            }
        }
    };
    let addr = listener.local_addr();
    shard.add_listener(listener.as_raw_fd());
    monoio::spawn(accept_loop(shard.clone(), uring, kind, listener, None));
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

/// Accepts on one listener until it is shut; `pod`: the pod it was bound in (in-pod mode).
async fn accept_loop(
    shard: Rc<Shard>,
    uring: bool,
    kind: ListenerKind,
    listener: TcpListener,
    pod: Option<Rc<PodShard>>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => admit(&shard, kind, stream, peer, &pod),
            Err(_) if shard.drain_for(pod.as_deref()).is_fired() => return,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, keep serving live ones.
                tracing::warn!(shard = shard.id, %kind, error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        if uring {
            let taken = accept_waiting(&listener, |stream, peer| {
                admit(&shard, kind, stream, peer, &pod)
            });
            let direct = &shard.counters().accepted_direct;
            direct.set(direct.get() + taken as u64);
        }
    }
}

/// Most connections accepted in one go after an io_uring accept, before the loop goes back to
/// the ring: the other tasks of the tick are not kept waiting behind a long backlog.
const DIRECT_ACCEPTS: usize = 64;

/// Takes the connections already waiting behind one that an io_uring accept returned, with
/// direct non-blocking accepts, so that they start in this tick as a readiness loop would start
/// them; returns how many it took.
///
/// One ring accept completes one connection per tick, so a burst of connections was spread over
/// as many ticks, and the HBONE connection they share got a flush (a TLS record, a `sendmsg`, a
/// packet) for each of them instead of one for the burst. The epoll driver needs none of this:
/// monoio's accept there is itself a readiness loop of `accept4` calls.
fn accept_waiting(
    listener: &TcpListener,
    mut take: impl FnMut(monoio::net::TcpStream, SocketAddr),
) -> usize {
    // SAFETY: `listener` owns the fd and outlives this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(listener.as_raw_fd()) };
    let mut taken = 0;
    for _ in 0..DIRECT_ACCEPTS {
        let (std_stream, peer) = match crate::net::accept_nonblocking(fd) {
            Ok(Some(accepted)) => accepted,
            Ok(None) => break,
            // A connection that ended while queued (ECONNABORTED; EPROTO on some stacks) is
            // gone: the rest of the burst is still there.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EPROTO)) => {
                continue
            }
            // A lasting error (EMFILE, ENFILE, a listener shut by a drain): the ring's next
            // accept meets it and the loop reports it or ends.
            Err(_) => break,
        };
        taken += 1;
        match monoio::net::TcpStream::from_std(std_stream) {
            Ok(stream) => take(stream, peer),
            Err(e) => {
                tracing::warn!(%peer, error = %e, "accepted connection not taken into the shard")
            }
        }
    }
    taken
}

/// Counts an accepted connection in and starts its path, or refuses it when the shard is full.
fn admit(
    shard: &Rc<Shard>,
    kind: ListenerKind,
    stream: monoio::net::TcpStream,
    peer: SocketAddr,
    pod: &Option<Rc<PodShard>>,
) {
    Tally::bump(&shard.counters().accepted);
    if shard.is_full() {
        // Refusing at once beats queueing: the client retries elsewhere or fails
        // fast, and the connections already here keep their share of the shard.
        Tally::bump(&shard.counters().overloaded);
        crate::net::abort_on_close(stream.as_raw_fd());
        tracing::warn!(shard = shard.id, %kind, %peer, limit = shard.opts.max_connections_per_shard, "connection refused: shard at its connection limit");
        return;
    }
    dispatch(shard, kind, stream, peer, pod.clone());
}

/// Starts the path for a connection accepted on a `kind` listener.
fn dispatch(
    shard: &Rc<Shard>,
    kind: ListenerKind,
    stream: monoio::net::TcpStream,
    peer: SocketAddr,
    pod: Option<Rc<PodShard>>,
) {
    // One spawn per kind, not one future matching on it: a task is as big as the largest
    // future it may run, and every idle connection keeps its task.
    match kind {
        ListenerKind::Outbound => {
            spawn_counted(shard, outbound::handle(shard.clone(), stream, peer, pod))
        }
        ListenerKind::Inbound => {
            let s = shard.clone();
            spawn_counted(shard, async move {
                inbound::handle(&s, stream, peer, pod).await
            })
        }
        ListenerKind::InboundPlaintext => {
            let s = shard.clone();
            spawn_counted(shard, async move {
                plaintext::inbound(&s, stream, peer, pod).await
            })
        }
    }
}

/// Runs one connection's handler as its own task, counted in `open` while it runs.
fn spawn_counted<F: Future<Output = ()> + 'static>(shard: &Rc<Shard>, fut: F) {
    let open = &shard.counters().open;
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
        let open = &self.shard.counters().open;
        open.set(open.get().saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections waiting in a listening socket's accept queue (`tcpi_unacked` of a listener).
    fn accept_queue(fd: std::os::fd::RawFd) -> u32 {
        // SAFETY: `tcp_info` is plain data; getsockopt writes at most `len` bytes into it.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        info.tcpi_unacked
    }

    /// Connections waiting behind the one a ring accept returned all start in the same tick,
    /// each with its own peer address, and an empty backlog ends the batch at once.
    #[test]
    fn a_burst_of_connections_is_taken_in_one_go() {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .build()
            .expect("io_uring runtime")
            .block_on(async {
                let socket = crate::net::reuseport_listener("127.0.0.1:0".parse().expect("addr"))
                    .expect("listen");
                let listener = TcpListener::from_std(socket).expect("listener");
                let addr = listener.local_addr().expect("addr");
                let clients: Vec<_> = (0..5)
                    .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
                    .collect();
                // A client's connect returns before the server side has processed the last ACK
                // (softirq work may lag on a busy machine): wait until all five are queued.
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while accept_queue(listener.as_raw_fd()) < 5 {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "connections not queued"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                let mut peers: Vec<SocketAddr> = Vec::new();
                let (first, peer) = listener.accept().await.expect("accept");
                peers.push(peer);
                let mut streams = vec![first];
                let taken = accept_waiting(&listener, |stream, peer| {
                    streams.push(stream);
                    peers.push(peer);
                });
                assert_eq!(taken, 4, "the rest of the burst, without the ring");
                let locals: Vec<SocketAddr> = clients
                    .iter()
                    .map(|c| c.local_addr().expect("local addr"))
                    .collect();
                let mut wanted = locals.clone();
                wanted.sort();
                peers.sort();
                assert_eq!(peers, wanted, "each connection with its own peer");
                assert_eq!(
                    accept_waiting(&listener, |_, _| panic!("nothing is waiting")),
                    0,
                    "an empty backlog ends the batch"
                );
                // The directly accepted sockets carry bytes like a ring-accepted one.
                use monoio::io::AsyncReadRent;
                use std::io::Write;
                for (i, mut c) in clients.into_iter().enumerate() {
                    c.write_all(&[i as u8; 3]).expect("write");
                }
                for s in &mut streams {
                    let peer = s.peer_addr().expect("peer");
                    let i = locals.iter().position(|&p| p == peer).expect("known peer");
                    let (n, buf) = s.read(vec![0u8; 3]).await;
                    assert_eq!(n.expect("read"), 3);
                    assert_eq!(buf, vec![i as u8; 3]);
                }
            });
    }
}
