//! The load generators of `ringtun-bench`: one monoio server and monoio clients that speak a
//! tiny protocol, so the same programs drive every contender (direct TCP, ringtun, another
//! tunnel).
//!
//! Every connection starts with a 16-byte header from the client: a command byte, 7 reserved
//! bytes and a little-endian `u64` argument. The server (one monoio runtime on one thread in
//! the server namespace, listening on the service's target port) then does:
//!
//! | command | argument | server |
//! |---|---|---|
//! | `U` upload | byte count `n` | reads `n` bytes, answers 1 byte, waits for EOF |
//! | `D` download | byte count `n` | writes `n` bytes, shuts down its write side, waits for EOF |
//! | `P` ping-pong | message size `m` | reads `m` bytes and writes them back, until EOF |
//! | `R` request/reply | `req | reply << 32` | reads `req` bytes, writes `reply` bytes, closes |
//! | `H` hold | – | counts the connection as held until EOF (idle connections) |
//!
//! Clients create their sockets on the calling thread, so running them inside
//! [`ringtun_testbed::Netns::enter`] puts them in the client namespace. A [`Target`] says where
//! to dial and whether to mark the socket (SO_MARK makes the capture rules skip it: that is the
//! "direct" baseline).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncReadRentExt, AsyncWriteRentExt};
use monoio::net::TcpStream;
use socket2::{Domain, Protocol, Socket, Type};

mod client;
mod server;

pub use client::*;
pub use server::serve;

/// Length of the header every connection starts with.
pub const HDR: usize = 16;
/// Size of the buffers bulk transfers read and write with.
pub(super) const CHUNK: usize = 256 * 1024;
/// How long a client waits for any single connect before giving up.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters the server keeps (shared with the harness thread).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections currently held open by `H` clients.
    pub held: AtomicUsize,
    /// Connections accepted since start.
    pub accepted: AtomicU64,
    /// Connections that ended with an error other than a reset or EOF.
    pub errors: AtomicU64,
}

/// Where a client dials.
#[derive(Clone, Debug)]
pub struct Target {
    /// Destination address (the service VIP for tunnels, the server itself for direct).
    pub addr: SocketAddr,
    /// SO_MARK for the socket (0: none). The capture rules skip marked sockets.
    pub mark: u32,
}

/// Whether the generators' rings defer completion work to their own waits
/// (`SINGLE_ISSUER | DEFER_TASKRUN`, as ringtun's shards do) rather than taking an interrupt
/// per completion. Set once from `ringtun-bench --load-ring` before any generator starts.
static DEFER_TASKRUN: AtomicBool = AtomicBool::new(true);

/// Chooses the generators' ring setup (`--load-ring`): `true` defers completion work to the
/// generator's own waits, `false` takes the kernel's default (an interrupt per completion).
pub fn set_defer_taskrun(defer: bool) {
    DEFER_TASKRUN.store(defer, Ordering::Relaxed);
}

/// Runs `fut` on a fresh single-thread monoio runtime (io_uring when the kernel allows it, else
/// epoll) with timers enabled.
///
/// The generators share the machine's CPUs with the tunnels they measure: a completion that
/// interrupts a generator thread takes CPU a tunnel could have used, and compresses every
/// ratio between tunnels toward 1. So the ring defers that work to the generator's own waits
/// where the kernel has the flags (6.1), and is built without them where it refuses.
pub fn block_on<F: Future>(fut: F) -> io::Result<F::Output> {
    let uring = |defer: bool| {
        let mut b = io_uring::IoUring::builder();
        if defer {
            b.setup_single_issuer().setup_defer_taskrun();
        }
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .with_entries(4096)
            .uring_builder(b)
            .build()
    };
    let defer = DEFER_TASKRUN.load(Ordering::Relaxed);
    let built = match uring(defer) {
        Err(e) if defer && e.raw_os_error() == Some(libc::EINVAL) => uring(false),
        built => built,
    };
    match built {
        Ok(mut rt) => Ok(rt.block_on(fut)),
        Err(_) => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .map(|mut rt| rt.block_on(fut)),
    }
}

pub(super) fn header(cmd: u8, arg: u64) -> Vec<u8> {
    let mut h = vec![0u8; HDR];
    h[0] = cmd;
    h[8..16].copy_from_slice(&arg.to_le_bytes());
    h
}

pub(super) fn pattern(n: usize) -> Box<[u8]> {
    ringtun_testbed::pattern(n).into_boxed_slice()
}

/// Connects a non-blocking TCP socket to `dst`, optionally marked and bound to `src`, and
/// hands it to the current monoio runtime.
pub async fn connect(dst: SocketAddr, mark: u32, src: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    if mark != 0 {
        socket.set_mark(mark)?;
    }
    if let Some(ip) = src {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    socket.set_nodelay(true)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let probe = socket.try_clone()?;
    let stream = TcpStream::from_std(socket.into())?;
    match monoio::time::timeout(CONNECT_TIMEOUT, stream.writable(false)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} timed out"),
            ))
        }
    }
    if let Some(e) = probe.take_error()? {
        return Err(e);
    }
    Ok(stream)
}

pub(super) async fn dial(t: &Target) -> io::Result<TcpStream> {
    connect(t.addr, t.mark, None).await
}

pub(super) async fn write_all<B: IoBuf + 'static>(s: &mut TcpStream, buf: B) -> io::Result<B> {
    let (r, buf) = s.write_all(buf).await;
    r.map(|_| buf)
}

pub(super) async fn read_exact<B: IoBufMut + 'static>(s: &mut TcpStream, buf: B) -> io::Result<B> {
    let (r, buf) = s.read_exact(buf).await;
    r.map(|_| buf)
}

/// Reads until EOF (or an error), discarding; returns the byte count.
pub(super) async fn drain(s: &mut TcpStream, mut buf: Vec<u8>) -> u64 {
    let mut n = 0u64;
    loop {
        buf.clear();
        let (r, b) = s.read(buf).await;
        buf = b;
        match r {
            Ok(0) | Err(_) => return n,
            Ok(k) => n += k as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A server and a client built with one ring setup echo `rounds` messages of `size`
    /// bytes, each checked against what was sent.
    fn echo_with(defer: bool, size: usize, rounds: usize) -> io::Result<usize> {
        set_defer_taskrun(defer);
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = probe.local_addr()?;
        drop(probe);
        let stats = Arc::new(ServerStats::default());
        // The server runs until the test process exits, as it does in ringtun-bench.
        std::thread::spawn(move || server::serve(addr, stats));
        let t = Target { addr, mark: 0 };
        block_on(async move {
            // The server binds on its own thread: refused until it listens, for 2 s at most.
            let mut tries = 0;
            let mut s = loop {
                match dial(&t).await {
                    Ok(s) => break s,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && tries < 400 => {
                        tries += 1;
                        monoio::time::sleep(Duration::from_millis(5)).await
                    }
                    Err(e) => return Err(e),
                }
            };
            write_all(&mut s, header(b'P', size as u64)).await?;
            let mut matched = 0;
            for round in 0..rounds {
                let sent: Vec<u8> = (0..size).map(|i| (i * 7 + round) as u8).collect();
                write_all(&mut s, sent.clone()).await?;
                let back = read_exact(&mut s, vec![0u8; size]).await?;
                matched += usize::from(back == sent);
            }
            Ok(matched)
        })?
    }

    #[test]
    fn both_ring_setups_of_the_generators_echo_every_byte() {
        for defer in [true, false] {
            let matched = echo_with(defer, 3000, 200).expect("echo runs");
            assert_eq!(matched, 200, "defer {defer}: every echoed message matches");
        }
    }
}
