//! The copy loops: bytes between a client socket and an HBONE stream, or between two sockets.
//!
//! Both directions run concurrently on the connection's shard. A clean EOF one way is passed on
//! (FIN ↔ END_STREAM) while the other way keeps flowing; an error or reset either way stops both
//! and is passed on as a reset (RST_STREAM ↔ TCP RST). Buffers are owned by the loop and reused:
//! a read lands in a `BytesMut`, the filled part is split off and frozen and handed to h2 without
//! copying, and once h2 has written it the allocation is reclaimed by `reserve`.

use std::cell::Cell;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::try_join;
use h2::{Reason, RecvStream, SendStream};
use monoio::buf::IoBufMut;
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;

use crate::net;

/// TLS 1.3 records carry at most 16 KiB of plaintext; an HTTP/2 DATA frame adds a 9-byte head.
const RECORD: usize = 16 * 1024;
const FRAME_HEAD: usize = 9;
/// Smallest read: one DATA frame that fills exactly one TLS record (16 KiB minus the frame
/// head). A 16 KiB read would need a second, 9-byte record for every frame.
pub const MIN_BUF: usize = RECORD - FRAME_HEAD;
/// Largest read: sixteen full records' worth of frame.
pub const MAX_BUF: usize = 16 * RECORD - FRAME_HEAD;

/// How a tunnelled connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Both directions finished with EOF.
    Closed,
    /// One side reset; the other was reset too.
    Reset(String),
    /// An I/O or protocol error; the other side was reset.
    Error(String),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Closed => f.write_str("closed"),
            End::Reset(_) => f.write_str("reset"),
            End::Error(_) => f.write_str("error"),
        }
    }
}

impl End {
    /// The detail behind a reset or error, if any.
    pub fn reason(&self) -> Option<&str> {
        match self {
            End::Closed => None,
            End::Reset(r) | End::Error(r) => Some(r),
        }
    }
}

/// Bytes moved each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the connecting client towards the destination.
    pub up: u64,
    /// From the destination back to the client.
    pub down: u64,
}

impl Transferred {
    /// The same counts seen from the other end, for a copy whose first side is the destination.
    pub fn reversed(self) -> Transferred {
        Transferred {
            up: self.down,
            down: self.up,
        }
    }
}

fn from_io(e: io::Error) -> End {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
            End::Reset(format!("tcp: {e}"))
        }
        _ => End::Error(format!("tcp: {e}")),
    }
}

fn from_h2(e: h2::Error) -> End {
    match e.reason() {
        Some(r) if e.is_reset() || e.is_remote() => {
            End::Reset(format!("hbone stream reset ({r:?})"))
        }
        _ => End::Error(format!("hbone: {e}")),
    }
}

/// Grows the read size when reads fill it, so bulk transfers use big reads and idle or chatty
/// connections keep small ones. Each read asks for exactly `size` bytes, a size chosen so that
/// the DATA frame it becomes fills whole TLS records.
struct ReadBuf {
    buf: BytesMut,
    size: usize,
}

impl ReadBuf {
    fn new() -> Self {
        ReadBuf {
            buf: BytesMut::with_capacity(MIN_BUF),
            size: MIN_BUF,
        }
    }

    /// A buffer for one read of `size` bytes; reuses the previous allocation when h2 has
    /// released every piece of it (`reserve` reclaims it then).
    fn take(&mut self) -> monoio::buf::SliceMut<BytesMut> {
        self.buf.reserve(self.size);
        let buf = std::mem::take(&mut self.buf);
        // Bound the read to `size` even if the allocation is bigger: frame alignment matters
        // more than reading a little more.
        IoBufMut::slice_mut(buf, 0..self.size)
    }

    fn give_back(&mut self, buf: BytesMut, filled: usize) {
        if filled == self.size && self.size < MAX_BUF {
            self.size = (self.size + FRAME_HEAD) * 2 - FRAME_HEAD;
        }
        self.buf = buf;
    }
}

/// Tunnels a TCP connection over an HBONE stream until both directions end.
pub async fn tcp_h2(
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    idle: Duration,
) -> (Transferred, End) {
    let fd = tcp.as_raw_fd();
    let (mut rd, mut wr) = tcp.into_split();
    let up_bytes = Cell::new(0u64);
    let down_bytes = Cell::new(0u64);
    let active = Cell::new(quanta::Instant::now());

    let up = async {
        let mut bufs = ReadBuf::new();
        loop {
            let (res, slice) = rd.read(bufs.take()).await;
            let mut buf = slice.into_inner();
            match res {
                Ok(0) => {
                    bufs.give_back(buf, 0);
                    send.send_data(Bytes::new(), true).map_err(from_h2)?;
                    return Ok(());
                }
                Ok(n) => {
                    up_bytes.set(up_bytes.get() + n as u64);
                    active.set(quanta::Instant::now());
                    let chunk = buf.split().freeze();
                    bufs.give_back(buf, n);
                    ringtun_hbone::stream::send_all(&mut send, chunk)
                        .await
                        .map_err(from_h2)?;
                }
                Err(e) => {
                    send.send_reset(Reason::CANCEL);
                    return Err(from_io(e));
                }
            }
        }
    };

    let down = async {
        loop {
            match recv.data().await {
                Some(Ok(data)) => {
                    let n = data.len();
                    active.set(quanta::Instant::now());
                    let (res, _) = wr.write_all(data).await;
                    res.map_err(from_io)?;
                    down_bytes.set(down_bytes.get() + n as u64);
                    // Only now may the peer send more: the window tracks what reached the socket.
                    recv.flow_control().release_capacity(n).map_err(from_h2)?;
                }
                None => {
                    wr.shutdown().await.map_err(from_io)?;
                    return Ok::<(), End>(());
                }
                Some(Err(e)) => return Err(from_h2(e)),
            }
        }
    };

    let end = match until_idle(try_join(up, down), &active, idle).await {
        Ok(_) => End::Closed,
        Err(end) => {
            // The loop that did not fail was dropped mid-operation; make sure the h2 side
            // learns of the failure too, then close the socket with RST.
            send.send_reset(Reason::CANCEL);
            abort(rd, wr, fd);
            end
        }
    };
    (
        Transferred {
            up: up_bytes.get(),
            down: down_bytes.get(),
        },
        end,
    )
}

/// Closes a split socket with RST. Reuniting first matters: dropping the write half on its own
/// would send FIN, and the peer would read a clean EOF before the reset.
fn abort(rd: OwnedReadHalf<TcpStream>, wr: OwnedWriteHalf<TcpStream>, fd: RawFd) {
    net::abort_on_close(fd);
    match rd.reunite(wr) {
        Ok(stream) => drop(stream),
        // Halves of one socket always reunite; if not, dropping them still closes the fd.
        Err(e) => drop(e),
    }
}

/// Runs `work` unless neither direction moves a byte for `idle` (zero: no limit); then the
/// connection ends with an error (and its sockets are reset by the caller).
async fn until_idle<T>(
    work: impl std::future::Future<Output = Result<T, End>>,
    active: &Cell<quanta::Instant>,
    idle: Duration,
) -> Result<T, End> {
    let watchdog = async {
        if idle.is_zero() {
            return std::future::pending::<End>().await;
        }
        loop {
            let quiet = quanta::Instant::now().duration_since(active.get());
            if quiet >= idle {
                return End::Error(format!("idle for {idle:?} (--idle-timeout-ms)"));
            }
            monoio::time::sleep(idle - quiet).await;
        }
    };
    let work = std::pin::pin!(work);
    let watchdog = std::pin::pin!(watchdog);
    match futures_util::future::select(work, watchdog).await {
        futures_util::future::Either::Left((r, _)) => r,
        futures_util::future::Either::Right((end, _)) => Err(end),
    }
}

async fn pipe<R: AsyncReadRent, W: AsyncWriteRent>(
    rd: &mut R,
    wr: &mut W,
    count: &Cell<u64>,
    active: &Cell<quanta::Instant>,
) -> Result<(), End> {
    let mut buf = Vec::with_capacity(MIN_BUF);
    loop {
        let (res, b) = rd.read(buf).await;
        buf = b;
        match res {
            Ok(0) => {
                wr.shutdown().await.map_err(from_io)?;
                return Ok(());
            }
            Ok(n) => {
                active.set(quanta::Instant::now());
                let full = n == buf.capacity();
                let (res, b) = wr.write_all(buf).await;
                buf = b;
                res.map_err(from_io)?;
                count.set(count.get() + n as u64);
                buf.clear();
                if full && buf.capacity() < MAX_BUF {
                    buf.reserve(buf.capacity() * 2);
                }
            }
            Err(e) => return Err(from_io(e)),
        }
    }
}

/// Copies between two TCP connections (plaintext paths) until both directions end.
pub async fn tcp_tcp(a: TcpStream, b: TcpStream, idle: Duration) -> (Transferred, End) {
    let (fa, fb) = (a.as_raw_fd(), b.as_raw_fd());
    let (mut ar, mut aw) = a.into_split();
    let (mut br, mut bw) = b.into_split();
    let up = Cell::new(0u64);
    let down = Cell::new(0u64);
    let active = Cell::new(quanta::Instant::now());
    let both = try_join(
        pipe(&mut ar, &mut bw, &up, &active),
        pipe(&mut br, &mut aw, &down, &active),
    );
    let end = match until_idle(both, &active, idle).await {
        Ok(_) => End::Closed,
        Err(end) => {
            abort(ar, aw, fa);
            abort(br, bw, fb);
            end
        }
    };
    (
        Transferred {
            up: up.get(),
            down: down.get(),
        },
        end,
    )
}
