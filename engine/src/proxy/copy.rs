//! The copy loops: bytes between a client socket and an HBONE stream, or between two sockets.
//!
//! Both directions run concurrently on the connection's shard. A clean EOF one way is passed on
//! (FIN ↔ END_STREAM) while the other way keeps flowing. A TCP side that resets is an end too,
//! passed on as FIN or END_STREAM, as ztunnel's copy does (its `ignore_io_errors`): through
//! ztunnel an application never sees its peer's reset, only an end of file, and peers of a
//! drop-in see what ztunnel's see. Any other error either way stops both and is passed on as a
//! reset: a TCP error becomes RST_STREAM `CONNECT_ERROR` (RFC 9113 section 8.5). An RST_STREAM
//! from the peer, whatever its code, is an end passed on as FIN, as ztunnel passes it on.
//!
//! A read lands in a `BytesMut`, the filled part is split off and frozen and handed on without
//! copying; while data keeps coming the loop keeps the buffer and `reserve` reclaims it once h2
//! has written the bytes, and an idle connection holds no buffer at all (see `Reader`).

use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use futures_util::future::try_join;
use h2::{Reason, RecvStream, SendStream};
use monoio::buf::IoBufMut;
use monoio::io::{
    AsyncWriteRent, AsyncWriteRentExt, CancelableAsyncReadRent, Canceller, OwnedReadHalf,
    OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;

use crate::net;
use crate::shard::live::{self, Cut};

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
    /// A TCP side reset (or was gone) and the other was told end of file: an end, not a
    /// failure, as ztunnel counts it (logged without an error, at info).
    PeerReset,
    /// An HBONE stream or a TCP connection was aborted; the other side was reset.
    Reset(String),
    /// An I/O or protocol error; the other side was reset.
    Error(String),
    /// Authorization policy no longer allows it (a policy update); both sides were reset.
    Revoked(String),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Closed => f.write_str("closed"),
            End::Reset(_) | End::PeerReset => f.write_str("reset"),
            End::Error(_) | End::Revoked(_) => f.write_str("error"),
        }
    }
}

impl End {
    /// The detail behind a reset or error, if any.
    pub fn reason(&self) -> Option<&str> {
        match self {
            End::Closed | End::PeerReset => None,
            End::Reset(r) | End::Error(r) | End::Revoked(r) => Some(r),
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

/// The TCP peer went away without a clean close (reset, or already gone): ztunnel's
/// `ignore_io_errors` kinds, which end a direction as end of file does.
fn went_away(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
    )
}

/// Half-closes the TCP side; a peer already gone has nothing left to tell.
async fn shut(wr: &mut OwnedWriteHalf<TcpStream>) -> Result<(), End> {
    match wr.shutdown().await {
        Err(e) if !went_away(&e) => Err(from_io(e)),
        _ => Ok(()),
    }
}

/// Ends the stream (END_STREAM) after the TCP side's end; `reset`: how that side ended, if
/// not cleanly.
fn end_stream(send: &mut SendStream<Bytes>, reset: Option<End>) -> Result<Option<End>, End> {
    match send.send_data(Bytes::new(), true) {
        Err(e) if !peer_ended(&e) => Err(from_h2(e)),
        _ => Ok(reset),
    }
}

/// The peer ended the stream with RST_STREAM, whatever its code, or went away with `NO_ERROR`
/// or `CANCEL`: an end of stream, passed on as FIN after every byte that came before it, as
/// ztunnel does (observed on its binary for `INTERNAL_ERROR` and `CONNECT_ERROR` in both roles:
/// `tests/e2e_ztunnel_rst.rs`). A reset we sent ourselves does not count.
fn peer_ended(e: &h2::Error) -> bool {
    let ours = e.is_reset() && !e.is_remote();
    !ours && (e.is_reset() || matches!(e.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)))
}

fn from_h2(e: h2::Error) -> End {
    match e.reason() {
        Some(r) if e.is_reset() || e.is_remote() => {
            End::Reset(format!("hbone stream reset ({r:?})"))
        }
        _ => End::Error(format!("hbone: {e}")),
    }
}

/// Reads the TCP side of a tunnel without pinning a buffer while the connection is idle.
///
/// An io_uring read needs its buffer submitted for as long as it waits, so a connection that
/// sat in `read` would hold a buffer for its whole idle life. On io_uring with provided
/// buffers (`--uring-recv-buffers`), a reader first uses a multishot receive, which holds a
/// shard buffer only while bytes are copied out (see [`Reader::next_multi`]); a connection that
/// fills one, or finds none, goes on in the two modes below until its next quiet spell, and
/// the epoll driver (or a ring without buffers) uses them throughout:
///
/// - *active*: io_uring reads into a kept buffer, one submitted read per read, except right
///   after a read that filled its buffer: the socket most likely holds more, and a direct
///   non-blocking `recv` takes it first; a read pending while the connection has been quiet
///   for [`live::QUIET`] (the shard's sweeper says so) is cancelled, which frees the buffer;
/// - *idle*: no buffer; it waits for readability (an io_uring poll, or epoll readiness on the
///   legacy driver), then allocates and reads without blocking, and is active again.
///
/// A reader starts idle, but its first wait for readability is raced with the quiet watch, so
/// that a connection whose TCP side never speaks still goes quiet: that is when the copy tells
/// the HBONE connection it may let go of its own buffers (`SendStream::went_quiet`, a patch of
/// the vendored h2). Starting active instead would hold a read buffer for the first second of
/// every such connection (160 MiB in a burst of 10,000), and the allocator keeps some of it.
///
/// Each read asks for exactly `size` bytes, a size chosen so that the DATA frame it becomes
/// fills whole TLS records; it grows when reads fill it, so bulk transfers use big reads and
/// chatty connections keep small ones. A buffer let go here returns to the shard thread's
/// allocator cache (mimalloc keeps per-thread free lists), which is what a per-shard free list
/// would do, without holding memory for connections that may never read again.
struct Reader {
    /// The next read's size (at most [`MAX_BUF`]); 32 bits so that the flags below share its
    /// word: this struct is in every connection's task.
    size: u32,
    /// Kept between reads unless the connection went idle.
    buf: Option<BytesMut>,
    /// Cancels the pending read when the connection goes quiet.
    canceller: Option<Canceller>,
    /// Has not waited for bytes yet (see above).
    fresh: bool,
    /// The last read filled what it asked for: more is most likely waiting in the socket.
    waiting: bool,
    /// Multishot receives may be used (io_uring with `--uring-recv-buffers`; off after a
    /// receive filled a whole provided buffer, until the connection goes quiet).
    multishot: bool,
    /// The armed multishot receive, if any; while it is there every read comes from it.
    multi: Option<monoio::net::RecvMulti>,
    /// The quiet spell the multishot wait is in has been told (`Ok(None)` once per spell).
    told_quiet: bool,
}

impl Reader {
    /// The next read's size.
    fn size(&self) -> usize {
        self.size as usize
    }

    fn new() -> Self {
        Reader {
            size: MIN_BUF as u32,
            buf: None,
            canceller: None,
            fresh: true,
            waiting: false,
            multishot: true,
            multi: None,
            told_quiet: false,
        }
    }

    /// The next bytes from `rd`, empty at EOF; `None` when the connection went quiet during a
    /// read (the reader is idle now: call again to wait for bytes).
    ///
    /// Not an `async fn`: one keeps a second copy of its arguments beside the ones it was
    /// called with, and this future sits in every idle connection's task.
    #[allow(clippy::manual_async_fn)]
    fn next<'a>(
        &'a mut self,
        rd: &'a mut OwnedReadHalf<TcpStream>,
        fd: RawFd,
        conn: &'a live::Conn,
    ) -> impl Future<Output = io::Result<Option<Bytes>>> + 'a {
        async move {
            loop {
                // A read that filled its buffer most likely left more behind: a direct `recv`
                // takes it without an io_uring submission and its completion. (On the epoll
                // driver it is the syscall the read would make anyway when bytes are there;
                // when none are, the read's own `recv` finds the socket empty once more.)
                if std::mem::take(&mut self.waiting) {
                    if let Some(mut buf) = self.buf.take() {
                        match recv(fd, &mut buf, self.size()) {
                            Ok(n) => return Ok(Some(self.filled(buf, n))),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.buf = Some(buf),
                            Err(e) => return Err(e),
                        }
                    }
                }
                if self.multi.is_some() || (self.multishot && self.buf.is_none()) {
                    match self.next_multi(rd, conn).await {
                        Some(res) => return res,
                        None => continue,
                    }
                }
                // Tested, not taken here: an `Option` taken in the condition would stay in the
                // future across the read.
                if self.buf.is_some() {
                    // Boxed: the pending read and its quiet watch take about 700 bytes, needed
                    // only while a read is in flight, and an idle connection's task would
                    // otherwise keep room for them for its whole life (one small allocation per
                    // read instead).
                    return match Box::pin(self.read_into(rd, conn)).await {
                        Some(res) => res.map(Some),
                        None => Ok(None),
                    };
                }
                if std::mem::take(&mut self.fresh) {
                    // Boxed, like the read: needed once, until the first bytes or the first
                    // quiet spell.
                    if !Box::pin(first_wait(rd, conn)).await? {
                        return Ok(None);
                    }
                } else {
                    readable(rd).await?;
                }
                let mut buf = BytesMut::with_capacity(self.size());
                match recv(fd, &mut buf, self.size()) {
                    Ok(n) => return Ok(Some(self.filled(buf, n))),
                    // Readiness can be stale (legacy driver) or the bytes already gone: wait
                    // again.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// The next bytes from the socket's multishot receive (armed here if it is not yet), with
    /// the same answers as [`next`](Self::next); `None` when the receive is not (or no
    /// longer) there and the caller reads the single-shot way.
    ///
    /// The receive holds no buffer while it waits: the kernel takes one of the shard's
    /// provided buffers only when bytes arrive, and the bytes are copied out at once, so an
    /// idle connection holds nothing and a chatty one needs neither a submission nor a new
    /// poll of its socket per read. A receive that fills a whole provided buffer means bulk:
    /// the receive is cancelled, what it took is passed on in order, and the connection reads
    /// into its own growing buffer (as on the epoll driver) until it goes quiet.
    #[allow(clippy::manual_async_fn)]
    fn next_multi<'a>(
        &'a mut self,
        rd: &'a OwnedReadHalf<TcpStream>,
        conn: &'a live::Conn,
    ) -> impl Future<Output = Option<io::Result<Option<Bytes>>>> + 'a {
        async move {
            if self.multi.is_none() {
                // SAFETY: as in `readable`: arming touches only the shared fd.
                let stream = unsafe { &*rd.0.get() };
                match stream.recv_multishot() {
                    Ok(m) => self.multi = Some(m),
                    // Off, or the epoll driver: single-shot reads for this connection.
                    Err(_) => {
                        self.multishot = false;
                        return None;
                    }
                }
            }
            let multi = self.multi.as_mut()?;
            // Held (so that the sweeper tells a quiet spell) until the spell has been told.
            let told = self.told_quiet;
            let holding = (!told).then(|| conn.hold());
            let mut quiet = std::pin::pin!(conn.quiet());
            let got = std::future::poll_fn(|cx| {
                if let Poll::Ready(item) = multi.poll_next(cx) {
                    return Poll::Ready(Some(item));
                }
                if !told && quiet.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await;
            drop(holding);
            match got {
                None => {
                    self.told_quiet = true;
                    Some(Ok(None))
                }
                Some(Some(Ok(buf))) => {
                    self.told_quiet = false;
                    if buf.is_eof() {
                        return Some(Ok(Some(Bytes::new())));
                    }
                    let chunk = Bytes::copy_from_slice(&buf);
                    if buf.len() >= buf.capacity() {
                        multi.cancel();
                        self.multishot = false;
                    }
                    Some(Ok(Some(chunk)))
                }
                // The receive ends next: cancelled (bulk, above), the shard's buffers ran dry,
                // or a kernel without multishot receives (before 6.0) refused it; the bytes it
                // could not take are still in the socket.
                Some(Some(Err(e))) => match e.raw_os_error() {
                    Some(libc::ECANCELED) => None,
                    Some(libc::ENOBUFS) => {
                        self.multishot = false;
                        None
                    }
                    // No kernel change will make the next one work: off for the shard.
                    Some(libc::EINVAL) => {
                        monoio::set_recv_buffers(0, 0);
                        self.multishot = false;
                        None
                    }
                    _ => Some(Err(e)),
                },
                Some(None) => {
                    self.multi = None;
                    if !self.multishot {
                        // Single-shot reads from here, a direct `recv` first: a receive that
                        // filled its buffer (or found none) left bytes behind.
                        self.buf = Some(BytesMut::with_capacity(self.size()));
                        self.waiting = true;
                    }
                    None
                }
            }
        }
    }

    /// One io_uring read into the kept buffer; `None` when the connection went quiet first and
    /// the read was cancelled (the buffer is gone, wait for readability instead).
    async fn read_into(
        &mut self,
        rd: &mut OwnedReadHalf<TcpStream>,
        conn: &live::Conn,
    ) -> Option<io::Result<Bytes>> {
        let mut buf = self.buf.take()?;
        // Reuses the allocation when h2 has released every piece of it.
        buf.reserve(self.size());
        // Bound the read to `size` even if the allocation is bigger: frame alignment matters
        // more than reading a little more.
        let slice = IoBufMut::slice_mut(buf, 0..self.size());
        // Kept across reads while the connection is busy: one per read would cost an
        // allocation each.
        let canceller = self.canceller.take().unwrap_or_default();
        let _holding = conn.hold();
        let read = std::pin::pin!(rd.cancelable_read(slice, canceller.handle()));
        let quiet = std::pin::pin!(conn.quiet());
        let (res, slice) = match futures_util::future::select(read, quiet).await {
            futures_util::future::Either::Left((r, _)) => {
                self.canceller = Some(canceller);
                r
            }
            futures_util::future::Either::Right(((), read)) => {
                // A read that completed meanwhile still returns its bytes.
                let _ = canceller.cancel();
                read.await
            }
        };
        let buf = slice.into_inner();
        match res {
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {
                drop(buf);
                self.canceller = None;
                // Quiet again: the next bytes may come through a multishot receive.
                self.multishot = true;
                None
            }
            res => Some(res.map(|n| self.filled(buf, n))),
        }
    }

    /// Splits off the `n` bytes read into `buf` (without copying) and keeps the rest of the
    /// buffer for the next read.
    fn filled(&mut self, mut buf: BytesMut, n: usize) -> Bytes {
        let chunk = buf.split().freeze();
        let size = self.size();
        self.waiting = n == size;
        if n == size && size < MAX_BUF {
            self.size = ((size + FRAME_HEAD) * 2 - FRAME_HEAD) as u32;
        }
        if n > 0 {
            self.buf = Some(buf);
        }
        chunk
    }
}

/// Waits until the socket has bytes, EOF or an error to read, without a buffer.
///
/// monoio's readiness future itself, not wrapped in an `async fn` of ours: a wrapper would add
/// its own state and a copy of `rd` to every idle connection's task.
fn readable(rd: &OwnedReadHalf<TcpStream>) -> impl Future<Output = io::Result<()>> + '_ {
    // SAFETY: monoio's own split halves reach the stream the same way (both halves hand out
    // `&mut` to it through this cell); `readable` only submits a poll on the shared fd and
    // touches no state the write half uses.
    let stream = unsafe { &*rd.0.get() };
    stream.readable(false)
}

/// Waits for the socket's first bytes; `false` if the connection went quiet first.
async fn first_wait(rd: &OwnedReadHalf<TcpStream>, conn: &live::Conn) -> io::Result<bool> {
    // A hold, though no buffer is held: it is what has the sweeper tell this wait.
    let _holding = conn.hold();
    let ready = std::pin::pin!(readable(rd));
    let quiet = std::pin::pin!(conn.quiet());
    match futures_util::future::select(ready, quiet).await {
        futures_util::future::Either::Left((res, _)) => res.map(|()| true),
        futures_util::future::Either::Right(_) => Ok(false),
    }
}

/// One non-blocking `recv` of at most `len` bytes into the spare capacity of `buf`.
fn recv(fd: RawFd, buf: &mut BytesMut, len: usize) -> io::Result<usize> {
    buf.reserve(len);
    let spare = buf.spare_capacity_mut();
    let len = len.min(spare.len());
    let n = net::recv_nonblocking(fd, &mut spare[..len])?;
    // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Tunnels a TCP connection over an HBONE stream until both directions end or the shard cuts
/// `conn` (idle limit, policy update); returns how it ended (`conn` counted the bytes).
///
/// Not an `async fn`: one keeps its arguments and the locals they move into as separate
/// fields for its whole life, and this future lives as long as the connection.
pub fn tcp_h2(
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    conn: live::Conn,
) -> impl Future<Output = End> {
    let fd = tcp.as_raw_fd();
    let (mut rd, mut wr) = tcp.into_split();
    async move {
        let up = async {
            let mut reader = Reader::new();
            loop {
                // Bound before the send, not matched around it: a match would keep the read's
                // result alive (and in the task) across the send's wait.
                let chunk = match reader.next(&mut rd, fd, &conn).await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => {
                        // Once per quiet spell, not per read: it wakes the HBONE connection.
                        send.went_quiet();
                        continue;
                    }
                    Err(e) if went_away(&e) => return end_stream(&mut send, Some(End::PeerReset)),
                    Err(e) => {
                        send.send_reset(Reason::CONNECT_ERROR);
                        return Err(from_io(e));
                    }
                };
                if chunk.is_empty() {
                    return end_stream(&mut send, None);
                }
                conn.moved(0, chunk.len() as u64);
                conn.touch();
                match ringtun_hbone::stream::send_all(&mut send, chunk).await {
                    Ok(()) => {}
                    // The peer wants no more: stop reading the client, nothing failed.
                    Err(e) if peer_ended(&e) => return Ok(None),
                    Err(e) => return Err(from_h2(e)),
                }
            }
        };

        let down = async {
            loop {
                // Only the bytes leave the match: a match around the write would keep the whole
                // `Option<Result<..>>` (40 bytes) in the task across the write's wait.
                let data = match recv.data().await {
                    Some(Ok(data)) => data,
                    Some(Err(e)) if !peer_ended(&e) => return Err(from_h2(e)),
                    // END_STREAM, or RST_STREAM `NO_ERROR`/`CANCEL`: the peer's end.
                    _ => break,
                };
                let n = data.len();
                conn.touch();
                // Boxed like the read: the write's state exists only while bytes are in
                // flight.
                let (res, _) = Box::pin(wr.write_all(data)).await;
                match res {
                    Ok(_) => {}
                    // The reader of this side reads its end next.
                    Err(e) if went_away(&e) => return Ok(Some(End::PeerReset)),
                    Err(e) => return Err(from_io(e)),
                }
                conn.moved(1, n as u64);
                // Only now may the peer send more: the window tracks what reached the socket.
                recv.flow_control().release_capacity(n).map_err(from_h2)?;
            }
            shut(&mut wr).await?;
            Ok::<_, End>(None)
        };

        let result = {
            let both = std::pin::pin!(try_join(up, down));
            until_cut(both, &conn).await
        };
        match result {
            Ok((up, down)) => {
                close(rd, wr);
                up.or(down).unwrap_or(End::Closed)
            }
            Err(end) => {
                // The loop that did not fail was dropped mid-operation; make sure the h2 side
                // learns of the failure too, then close the socket with RST.
                send.send_reset(Reason::CONNECT_ERROR);
                abort(rd, wr, fd);
                end
            }
        }
    }
}

/// Closes a split socket once its copy ended. Reunited first: monoio's write half shuts the
/// socket down again when dropped, one more syscall per connection after the copy's own
/// `shutdown` (or after the peer went away); the stream's drop only closes it.
fn close(rd: OwnedReadHalf<TcpStream>, wr: OwnedWriteHalf<TcpStream>) {
    match rd.reunite(wr) {
        Ok(stream) => drop(stream),
        // Halves of one socket always reunite; if not, dropping them still closes the fd.
        Err(e) => drop(e),
    }
}

/// Closes a split socket with RST. Reuniting first matters: dropping the write half on its own
/// would send FIN, and the peer would read a clean EOF before the reset.
fn abort(rd: OwnedReadHalf<TcpStream>, wr: OwnedWriteHalf<TcpStream>, fd: RawFd) {
    net::abort_on_close(fd);
    close(rd, wr);
}

/// Runs `work` until the shard cuts the connection: neither direction moved a byte for its
/// idle limit, or a policy update denies it; then it ends with an error (and its sockets are
/// reset by the caller).
///
/// A poll loop over the two rather than a `select` of two futures: it keeps only two
/// references (16 bytes instead of 48), and it lives in every connection's task.
fn until_cut<'a, T>(
    mut work: Pin<&'a mut impl Future<Output = Result<T, End>>>,
    conn: &'a live::Conn,
) -> impl Future<Output = Result<T, End>> + 'a {
    let mut cut = conn.cut();
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(r) = work.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        Pin::new(&mut cut).poll(cx).map(|cut| {
            Err(match cut {
                Cut::Idle(idle) => End::Error(format!("idle for {idle:?} (--idle-timeout-ms)")),
                // ztunnel's words (its `AuthorizationPolicyLateRejection`).
                Cut::Revoked => End::Revoked("connection closed due to policy change".into()),
            })
        })
    })
}

async fn pipe(
    rd: &mut OwnedReadHalf<TcpStream>,
    fd: RawFd,
    wr: &mut OwnedWriteHalf<TcpStream>,
    conn: &live::Conn,
    direction: usize,
) -> Result<Option<End>, End> {
    let mut reader = Reader::new();
    loop {
        let chunk = match reader.next(rd, fd, conn).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => continue,
            Err(e) if went_away(&e) => {
                shut(wr).await?;
                return Ok(Some(End::PeerReset));
            }
            Err(e) => return Err(from_io(e)),
        };
        if chunk.is_empty() {
            shut(wr).await?;
            return Ok(None);
        }
        conn.touch();
        let n = chunk.len();
        let (res, _) = wr.write_all(chunk).await;
        match res {
            Ok(_) => {}
            // The other pipe reads this side's end next.
            Err(e) if went_away(&e) => return Ok(Some(End::PeerReset)),
            Err(e) => return Err(from_io(e)),
        }
        conn.moved(direction, n as u64);
    }
}

/// Copies between two TCP connections (plaintext paths) until both directions end or the shard
/// cuts `conn`; returns how it ended (`conn` counted the bytes).
pub async fn tcp_tcp(a: TcpStream, b: TcpStream, conn: live::Conn) -> End {
    let (fa, fb) = (a.as_raw_fd(), b.as_raw_fd());
    let (mut ar, mut aw) = a.into_split();
    let (mut br, mut bw) = b.into_split();
    let result = {
        let both = std::pin::pin!(try_join(
            pipe(&mut ar, fa, &mut bw, &conn, 0),
            pipe(&mut br, fb, &mut aw, &conn, 1),
        ));
        until_cut(both, &conn).await
    };
    match result {
        Ok((a, b)) => {
            close(ar, aw);
            close(br, bw);
            a.or(b).unwrap_or(End::Closed)
        }
        Err(end) => {
            abort(ar, aw, fa);
            abort(br, bw, fb);
            end
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures_util::FutureExt;

    #[test]
    fn resets_and_errors_are_told_apart() {
        let reset = from_io(io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(matches!(reset, End::Reset(_)), "{reset:?}");
        assert_eq!(reset.to_string(), "reset");
        let error = from_io(io::Error::from(io::ErrorKind::TimedOut));
        assert!(matches!(error, End::Error(_)), "{error:?}");
        assert_eq!(error.to_string(), "error");
        assert_eq!(End::Closed.reason(), None);
        // A reset passed on as end of file is no failure, as ztunnel logs it: no error.
        assert_eq!(End::PeerReset.to_string(), "reset");
        assert_eq!(End::PeerReset.reason(), None);
        assert_eq!(End::Revoked("why".into()).to_string(), "error");
        assert_eq!(End::Revoked("why".into()).reason(), Some("why"));
    }

    /// A client socket (std, blocking) and the tunnel's end of it, split.
    async fn socket_pair() -> (
        std::net::TcpStream,
        OwnedReadHalf<TcpStream>,
        OwnedWriteHalf<TcpStream>,
        RawFd,
    ) {
        let listener = monoio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = std::net::TcpStream::connect(addr).expect("connect");
        let (tunnel, _) = listener.accept().await.expect("accept");
        let fd = tunnel.as_raw_fd();
        let (rd, wr) = tunnel.into_split();
        (client, rd, wr, fd)
    }

    /// Reads `r` until the end of file, touching `conn` so that no quiet spell interrupts.
    async fn read_to_end(
        r: &mut Reader,
        rd: &mut OwnedReadHalf<TcpStream>,
        fd: RawFd,
        conn: &live::Conn,
    ) -> Vec<u8> {
        let mut got = Vec::new();
        loop {
            conn.touch();
            match r.next(rd, fd, conn).await.expect("read") {
                Some(b) if b.is_empty() => return got,
                Some(b) => got.extend_from_slice(&b),
                None => {}
            }
        }
    }

    /// An io_uring runtime on a thread of its own whose shard lends `count` provided buffers of
    /// `size` bytes (the setting is the thread's), running `f`.
    fn with_recv_buffers<F: Future<Output = ()> + 'static>(
        count: u16,
        size: u32,
        f: impl FnOnce() -> F + Send + 'static,
    ) {
        std::thread::spawn(move || {
            monoio::set_recv_buffers(count, size);
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .enable_timer()
                .build()
                .expect("io_uring runtime")
                .block_on(async move {
                    monoio::time::timeout(std::time::Duration::from_secs(20), f())
                        .await
                        .expect("done within 20 s")
                })
        })
        .join()
        .expect("test thread");
    }

    /// Writes `msg` into `client` and checks that `r`'s next read returns exactly it.
    async fn passes(
        msg: &[u8],
        client: &mut std::net::TcpStream,
        r: &mut Reader,
        rd: &mut OwnedReadHalf<TcpStream>,
        fd: RawFd,
        conn: &live::Conn,
    ) {
        use std::io::Write;
        client.write_all(msg).expect("write");
        let got = r.next(rd, fd, conn).await.expect("read");
        assert_eq!(got.as_deref(), Some(msg));
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// A multishot receive passes a small message on and stays armed; a flood that fills a
    /// whole provided buffer switches the connection to single reads, and every byte arrives
    /// in order across the switch (what the receive took before its cancel comes first).
    #[test]
    fn multishot_reads_keep_every_byte_in_order_across_the_switch_to_bulk() {
        with_recv_buffers(4, 1024, || async {
            use std::io::Write;
            let conn = live::Conn::new(std::time::Duration::ZERO, None);
            let (mut client, mut rd, _wr, fd) = socket_pair().await;
            let mut r = Reader::new();
            passes(b"hello", &mut client, &mut r, &mut rd, fd, &conn).await;
            assert!(r.multi.is_some(), "a small read leaves the receive armed");
            assert!(r.buf.is_none(), "and holds no buffer of its own");
            let sent = pattern(1 << 20);
            let flood = sent.clone();
            let writer = std::thread::spawn(move || {
                for chunk in flood.chunks(4096) {
                    client.write_all(chunk).expect("write");
                }
                client
                    .shutdown(std::net::Shutdown::Write)
                    .expect("shutdown");
            });
            let got = read_to_end(&mut r, &mut rd, fd, &conn).await;
            writer.join().expect("writer");
            assert!(
                got == sent,
                "{} bytes of {} arrived intact",
                got.len(),
                sent.len()
            );
            assert!(
                !r.multishot,
                "a receive that filled a buffer switched to single reads"
            );
            assert!(r.multi.is_none());
        });
    }

    /// A connection whose reader does not take what arrives (its task waits for HTTP/2 flow
    /// control) holds at most a couple of the shard's buffers: its receive stops, the rest
    /// waits in the socket, another connection still receives through the ring, and every byte
    /// comes out in order once the reader catches up.
    #[test]
    fn a_reader_that_falls_behind_does_not_take_the_shards_buffers() {
        with_recv_buffers(4, 1024, || async {
            use std::io::Write;
            let conn = live::Conn::new(std::time::Duration::ZERO, None);
            let (mut a, mut rd_a, _wa, fd_a) = socket_pair().await;
            let (mut b, mut rd_b, _wb, fd_b) = socket_pair().await;
            let (mut ra, mut rb) = (Reader::new(), Reader::new());
            passes(b"a", &mut a, &mut ra, &mut rd_a, fd_a, &conn).await;
            // Ten messages arrive one by one while `ra` is not polled; the shard keeps
            // taking completions meanwhile (this task sleeps in the ring).
            let sent = pattern(1000);
            let messages = sent.clone();
            let writer = std::thread::spawn(move || {
                for m in messages.chunks(100) {
                    a.write_all(m).expect("write");
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                a.shutdown(std::net::Shutdown::Write).expect("shutdown");
            });
            monoio::time::sleep(std::time::Duration::from_millis(200)).await;
            writer.join().expect("writer");
            passes(b"b", &mut b, &mut rb, &mut rd_b, fd_b, &conn).await;
            assert!(
                rb.multishot && rb.multi.is_some(),
                "the other connection found a buffer in the ring"
            );
            let got_a = read_to_end(&mut ra, &mut rd_a, fd_a, &conn).await;
            assert!(
                got_a == sent,
                "{} bytes of {} in order",
                got_a.len(),
                sent.len()
            );
        });
    }

    /// A connection waiting in a multishot receive still has its quiet spell told, once (that
    /// is when its HBONE connection lets go of its buffers), and reads on after it.
    #[test]
    fn a_multishot_wait_tells_a_quiet_spell_once_and_reads_on() {
        with_recv_buffers(4, 1024, || async {
            use std::io::Write;
            let conn = live::Conn::new(std::time::Duration::ZERO, None);
            let (mut client, mut rd, _wr, fd) = socket_pair().await;
            let mut r = Reader::new();
            passes(b"x", &mut client, &mut r, &mut rd, fd, &conn).await;
            conn.touch();
            // Nothing comes for longer than `live::QUIET`.
            let quiet = r.next(&mut rd, fd, &conn).await.expect("read");
            assert_eq!(quiet, None, "the quiet spell is told");
            assert!(r.multi.is_some(), "the receive stays armed");
            let later = std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(100));
                client.write_all(b"later").expect("write");
                client
            });
            // Told once: the next call waits for the bytes, not for the spell again.
            let next = r.next(&mut rd, fd, &conn).await.expect("read");
            assert_eq!(next.as_deref(), Some(&b"later"[..]));
            drop(later.join().expect("writer"));
        });
    }

    /// When the shard's provided buffers run dry a multishot receive ends with `ENOBUFS`; the
    /// connection reads the bytes the single-shot way instead, and none is lost.
    #[test]
    fn a_multishot_receive_that_finds_no_buffer_falls_back_without_losing_bytes() {
        with_recv_buffers(1, 1024, || async {
            use std::io::Write;
            let conn = live::Conn::new(std::time::Duration::ZERO, None);
            let (mut a, mut rd_a, _wa, fd_a) = socket_pair().await;
            let (mut b, mut rd_b, _wb, fd_b) = socket_pair().await;
            let (mut ra, mut rb) = (Reader::new(), Reader::new());
            passes(b"a", &mut a, &mut ra, &mut rd_a, fd_a, &conn).await;
            passes(b"b", &mut b, &mut rb, &mut rd_b, fd_b, &conn).await;
            assert!(
                ra.multi.is_some() && rb.multi.is_some(),
                "both receives armed"
            );
            // Both arrive before the shard looks: the first takes the only buffer and keeps
            // it until its reader copies it out; the second finds none.
            a.write_all(&pattern(300)).expect("write");
            b.write_all(&pattern(500)).expect("write");
            std::thread::sleep(std::time::Duration::from_millis(50));
            let got_a = ra
                .next(&mut rd_a, fd_a, &conn)
                .await
                .expect("read")
                .expect("bytes");
            let got_b = rb
                .next(&mut rd_b, fd_b, &conn)
                .await
                .expect("read")
                .expect("bytes");
            assert_eq!(&got_a[..], &pattern(300)[..]);
            assert_eq!(&got_b[..], &pattern(500)[..]);
            assert!(
                ra.multishot && ra.multi.is_some(),
                "the first receive stays armed"
            );
            assert!(
                !rb.multishot && rb.multi.is_none(),
                "the second fell back to single reads"
            );
            // The fallen-back connection still reads everything after.
            b.write_all(&pattern(2000)).expect("write");
            b.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let rest = read_to_end(&mut rb, &mut rd_b, fd_b, &conn).await;
            assert_eq!(rest, pattern(2000));
        });
    }

    /// After a read that filled its buffer the next one is a direct `recv`: it must see the
    /// end of file, and an empty socket must go back to waiting, on both drivers.
    #[test]
    fn a_read_after_a_full_one_sees_the_end_or_waits_for_more() {
        async fn check() {
            use std::io::Write;
            let conn = live::Conn::new(std::time::Duration::ZERO, None);
            // The write half lives as long as the read half (a dropped one shuts the socket).
            let (mut client, mut rd, _wr, fd) = socket_pair().await;
            let mut r = Reader::new();
            client.write_all(&[1; MIN_BUF]).expect("write");
            let first = r.next(&mut rd, fd, &conn).await.expect("read");
            assert_eq!(first.map(|b| b.len()), Some(MIN_BUF));
            assert!(r.waiting, "a full read expects more");
            // No quiet spell cuts the waits below short, however slow this machine is.
            conn.touch();
            // Nothing is there yet: the direct recv finds the socket empty, and the read
            // waits for bytes that come later.
            let later = std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                client.write_all(b"later").expect("write");
                client
            });
            let second = r.next(&mut rd, fd, &conn).await.expect("read");
            assert_eq!(second.as_deref(), Some(&b"later"[..]));
            conn.touch();
            let mut client = later.join().expect("writer");
            // A read that fills its (grown) buffer, then the end right behind it.
            let size = r.size();
            client.write_all(&vec![2; size]).expect("write");
            client
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
            drop(client);
            let full = r.next(&mut rd, fd, &conn).await.expect("read");
            let full = full.expect("bytes, not quiet");
            assert_eq!(full.len(), size, "all of it was there");
            assert!(full.iter().all(|&b| b == 2));
            assert!(r.waiting);
            // The end right behind a full read is seen at once: a direct `recv`. (On io_uring
            // a read through the ring is never ready at its first poll: it is submitted only
            // when the task yields.)
            let end = r.next(&mut rd, fd, &conn).now_or_never();
            let end = end.expect("ready at once").expect("read");
            assert_eq!(end.as_deref(), Some(&b""[..]), "end of file");
            assert!(r.buf.is_none(), "at end of file the buffer is let go");
        }
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .expect("io_uring runtime")
            .block_on(check());
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("epoll runtime")
            .block_on(check());
    }

    #[test]
    fn reads_grow_in_whole_records_while_they_fill_and_keep_their_buffer() {
        let mut r = Reader::new();
        let mut sizes = vec![r.size()];
        while r.size() < MAX_BUF {
            let size = r.size();
            let _ = r.filled(BytesMut::with_capacity(size), size);
            sizes.push(r.size());
        }
        // Every read is whole TLS records once its 9-byte DATA frame head is added.
        assert!(
            sizes
                .iter()
                .all(|s| (s + FRAME_HEAD).is_multiple_of(RECORD)),
            "{sizes:?}"
        );
        assert_eq!(sizes.first(), Some(&MIN_BUF));
        assert_eq!(sizes.last(), Some(&MAX_BUF));
        assert!(
            r.buf.is_some(),
            "a read that returned bytes keeps the buffer"
        );
        let _ = r.filled(BytesMut::with_capacity(MAX_BUF), MAX_BUF);
        assert_eq!(r.size(), MAX_BUF, "never past the largest read");
        // The next read takes the kept buffer; at end of file it is let go.
        let kept = r.buf.take().expect("kept");
        let _ = r.filled(kept, 0);
        assert!(r.buf.is_none(), "at end of file the buffer is let go");
    }

    #[test]
    fn a_new_reader_holds_no_buffer_and_races_its_first_wait_with_quiet() {
        // So that a connection whose TCP side never speaks still goes quiet (and tells its
        // HBONE connection), without a read buffer for its first second.
        let r = Reader::new();
        assert!(r.buf.is_none());
        assert!(r.fresh);
        assert_eq!(r.size(), MIN_BUF);
    }

    #[test]
    fn a_partial_read_does_not_grow_the_next_one() {
        let mut r = Reader::new();
        let mut buf = BytesMut::with_capacity(MIN_BUF);
        buf.extend_from_slice(b"hello");
        let chunk = r.filled(buf, 5);
        assert_eq!(&chunk[..], b"hello");
        assert_eq!(r.size(), MIN_BUF);
    }
}
