//! The userspace record layer's driver: the socket and the waits around a [`RecordPump`].

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};

use monoio::net::TcpStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pump::{Flush, KeyPump, Read, RecordPump, Records, Transmit, Write};
use super::FlushTick;
use crate::net;

/// An HBONE connection on a userspace record layer, after the handshake: rustls'
/// ([`RustlsIo`]) or ringtun's own over rustls' keys ([`KeysIo`]).
///
/// tokio-rustls would do this job, but it costs a syscall per 4 KiB read (rustls reads into
/// its record buffer in 4 KiB steps) and one `writev` per h2 write (every frame head, every
/// WINDOW_UPDATE, every DATA frame its own syscall, and on a chatty stream its own record).
/// Here reads take up to [`super::pump::READ_CHUNK`] from the socket into the pump's buffer and
/// rustls is fed from it; writes are encrypted into rustls' send buffer and go to the socket
/// when h2 flushes (once per batch of frames, so a request's HEADERS and DATA share one record
/// and one syscall; see [`FlushTick`] for batching across streams) or when
/// [`super::pump::EAGER_WRITE`] bytes are waiting. What to do when is the [`RecordPump`]'s
/// decision; this type only does the I/O it asks for.
///
/// The socket is in monoio's completion mode and is driven by hand: a non-blocking `recv`
/// while bytes keep coming, and after a short read an io_uring poll for readability before
/// the next `recv`; writes are non-blocking `sendmsg`s, with a poll for writability when the
/// socket is full. monoio's poll I/O would instead route readiness through an epoll instance
/// (one `epoll_wait` per wake-up) and learn that the socket is empty from a `recv` that fails
/// with `EAGAIN`: two syscalls more per message.
pub struct UserspaceIo<P> {
    sock: Rc<TcpStream>,
    /// Shared with the send hook this layer gives the [`FlushTick`] (a deferred flush written
    /// without a poll of h2); otherwise only this type touches it.
    pump: Rc<RefCell<P>>,
    /// The last `recv` returned less than it asked for: the socket is (most likely) empty,
    /// so the next read waits for readability instead of trying a `recv` first.
    drained: bool,
    /// A wait for readability (after a short read) or writability (after `EAGAIN`).
    read_wait: Option<Readiness>,
    write_wait: Option<Readiness>,
    /// Shared with the task driving h2 (see [`FlushTick`]).
    tick: Rc<FlushTick>,
}

/// An io_uring poll on the socket (`TcpStream::readable`/`writable`), owning its own handle
/// to the stream so that it can live next to it.
type Readiness = Pin<Box<dyn Future<Output = io::Result<()>>>>;

/// rustls' record layer.
pub type RustlsIo = UserspaceIo<RecordPump>;
/// ringtun's record layer over the keys rustls derived.
pub type KeysIo = UserspaceIo<KeyPump>;

impl<P: Records> fmt::Debug for UserspaceIo<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("UserspaceIo");
        d.field("fd", &self.sock.as_raw_fd());
        if let Ok(pump) = self.pump.try_borrow() {
            d.field("buffered_in", &pump.buffered_input())
                .field("unflushed", &pump.unflushed())
                .field("eof", &pump.is_eof());
        }
        d.finish_non_exhaustive()
    }
}

impl<P: Records + 'static> UserspaceIo<P> {
    pub(super) fn new(sock: TcpStream, pump: P, tick: Rc<FlushTick>) -> Self {
        let sock = Rc::new(sock);
        let pump = Rc::new(RefCell::new(pump));
        tick.set_send(send_hook(Rc::downgrade(&sock), Rc::downgrade(&pump)));
        UserspaceIo {
            sock,
            pump,
            // The handshake may have left the socket empty or not: try a recv first.
            drained: false,
            read_wait: None,
            write_wait: None,
            tick,
        }
    }

    /// Writes a deferred flush once the driving task is in a later poll than the one that
    /// deferred it. Pending (socket full) is not an error: the task is woken when it drains,
    /// and the bytes stay due.
    fn write_due(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.pump.borrow().flush_due(self.tick.current()) {
            return Ok(());
        }
        match self.poll_transmit(cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Ok(()),
        }
    }

    /// Writes what the pump holds for the socket until it holds nothing (Ready) or the socket
    /// is full (Pending, woken when it drains).
    fn poll_transmit(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Some(w) = self.write_wait.as_mut() {
                ready!(w.as_mut().poll(cx))?;
                self.write_wait = None;
            }
            let sent = transmit_all(&mut *self.pump.borrow_mut(), self.sock.as_raw_fd());
            match sent {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let sock = self.sock.clone();
                    self.write_wait = Some(Box::pin(async move { sock.writable(false).await }));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Reads from the socket into the pump: Ready once bytes (or the end of stream) arrived.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.drained {
                if self.read_wait.is_none() {
                    // Idle: give the buffer back rather than pin it for the connection's life.
                    self.pump.borrow_mut().release_idle_input();
                    let sock = self.sock.clone();
                    self.read_wait = Some(Box::pin(async move { sock.readable(false).await }));
                }
                if let Some(w) = self.read_wait.as_mut() {
                    ready!(w.as_mut().poll(cx))?;
                }
                self.read_wait = None;
                self.drained = false;
            }
            let mut pump = self.pump.borrow_mut();
            let spare = pump.input_buffer();
            let want = spare.len();
            let n = match net::recv_nonblocking(self.sock.as_raw_fd(), spare) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.drained = true;
                    continue;
                }
                Err(e) => return Poll::Ready(Err(e)),
            };
            if n == 0 {
                pump.input_ended();
            } else {
                // SAFETY: the kernel initialised the first `n` bytes of the input buffer.
                unsafe { pump.input_received(n) };
            }
            self.drained = n < want;
            return Poll::Ready(Ok(()));
        }
    }
}

impl<P: Records + Unpin + 'static> AsyncRead for UserspaceIo<P> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.write_due(cx)?;
        loop {
            let read = this.pump.borrow_mut().read(buf);
            match read {
                Ok(Read::Data(_) | Read::Eof) => return Poll::Ready(Ok(())),
                Ok(Read::NeedInput) => ready!(this.poll_fill(cx))?,
                Err(e) => {
                    if e.alert {
                        // A last try to tell the peer what was wrong with its records.
                        let _ = this.poll_transmit(cx);
                    }
                    return Poll::Ready(Err(e.error));
                }
            }
        }
    }
}

impl<P: Records + Unpin + 'static> AsyncWrite for UserspaceIo<P> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let written = this.pump.borrow_mut().write(bufs)?;
            match written {
                Write::Accepted { n, transmit_now } => {
                    // Pending only means the socket is full; the bytes are accepted either way
                    // and the flush that follows waits for room.
                    if transmit_now {
                        if let Poll::Ready(Err(e)) = this.poll_transmit(cx) {
                            return Poll::Ready(Err(e));
                        }
                    }
                    return Poll::Ready(Ok(n));
                }
                Write::Full => ready!(this.poll_transmit(cx))?,
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flush = this.pump.borrow_mut().flush(this.tick.armed());
        match flush {
            Flush::Later { repoll } => {
                if repoll {
                    this.tick.repoll();
                }
                super::flush::hurry_if_full(this.pump.borrow().unflushed());
                Poll::Ready(Ok(()))
            }
            Flush::Now => this.poll_transmit(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.pump.borrow_mut().close();
        ready!(this.poll_transmit(cx))?;
        // SAFETY: plain syscall on a descriptor this connection owns.
        if unsafe { libc::shutdown(this.sock.as_raw_fd(), libc::SHUT_WR) } < 0 {
            let e = io::Error::last_os_error();
            // Shutting down a connection the peer already dropped is not a failure.
            if e.kind() != io::ErrorKind::NotConnected {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// `std::io::Write` over the socket for rustls' `write_tls`: non-blocking `sendmsg`, so a full
/// socket is `WouldBlock` (and the caller waits for writability).
struct SocketWriter {
    fd: std::os::fd::RawFd,
}

impl io::Write for SocketWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // IoSlice is ABI-compatible with iovec on unix.
        let iovlen = bufs.len().min(1024);
        // SAFETY: an all-zero msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iovlen as _;
        loop {
            // SAFETY: `msg` points at `iovlen` valid iovecs borrowed for this call.
            let n =
                unsafe { libc::sendmsg(self.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the [`FlushTick`] calls to write a deferred flush without a poll of h2: everything the
/// pump holds for the socket, `true` once it is all out. `false` (h2's poll then deals with it)
/// when the socket is full or failed, or the connection is gone.
fn send_hook<P: Records + 'static>(
    sock: std::rc::Weak<TcpStream>,
    pump: std::rc::Weak<RefCell<P>>,
) -> Box<dyn FnMut() -> bool> {
    Box::new(move || {
        let (Some(sock), Some(pump)) = (sock.upgrade(), pump.upgrade()) else {
            return false;
        };
        let Ok(mut pump) = pump.try_borrow_mut() else {
            return false;
        };
        transmit_all(&mut *pump, sock.as_raw_fd()).is_ok()
    })
}

/// Writes what `pump` holds for the socket `fd` until it holds nothing; a full socket is
/// `WouldBlock`, with what did not fit still in the pump.
fn transmit_all<P: Records>(pump: &mut P, fd: std::os::fd::RawFd) -> io::Result<()> {
    let mut out = SocketWriter { fd };
    loop {
        if let Transmit::Done = pump.transmit(&mut out)? {
            return Ok(());
        }
    }
}
