//! The byte stream HTTP/2 runs on in an HBONE connection: userspace rustls, or the kernel's
//! TLS record layer (kTLS) once rustls has finished the handshake.
//!
//! Both ends of HBONE (outbound [`crate::proxy::outbound`], inbound
//! [`crate::proxy::inbound`]) do the same three steps:
//!
//! 1. Wrap the socket in a [`HandshakeIo`]. When kTLS will be attempted it is *corked*: every
//!    read stops at a TLS record boundary ([`RecordBoundary`]), so rustls never holds a
//!    fragment of a record the kernel would then miss.
//! 2. Run the tokio-rustls handshake over it and check the peer's identity.
//! 3. [`establish`]: if the kernel can take this connection (probe result, negotiated cipher
//!    suite, the `tls` ULP attaches), finish any record the handshake left half-read, flush
//!    what rustls still has to send, drain the plaintext it already decrypted, hand the
//!    secrets to the kernel and continue on a [`KtlsIo`]; otherwise stay on rustls. Either
//!    way the caller gets one [`HboneIo`], and everything above it (h2, the copy loops) is
//!    the same code.
//!
//! After the switch the socket is read and written through monoio's poll I/O like any other,
//! as plaintext. The kernel reports a record that is not application data by failing the
//! plain read with `EIO`; [`KtlsIo`] then reads it with its record type (`recvmsg` and the
//! `TLS_GET_RECORD_TYPE` control message, via `tls_kernel_offload::recv_data`): session
//! tickets are skipped, close_notify is end of stream, any other alert is a connection error,
//! and a KeyUpdate closes the connection with a log line (Linux before 6.13 cannot install
//! new keys, and rekeying is not implemented here), because every record after it would be
//! undecryptable.
//!
//! Nobody counts records once the kernel encrypts, so [`KeyBudget`] does: see there for the
//! AES-GCM key-usage limit and what happens when a connection approaches it.

use std::cell::Cell;
use std::fmt;
use std::future::{poll_fn, Future};
use std::io::{self, BufRead as _, Write as _};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use monoio::net::tcp::stream_poll::TcpStreamPoll;
use monoio::net::TcpStream;
use tls_kernel_offload::{self as ktls, Capability, Cipher, Handoff, KtlsError, RecordBoundary};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::net;
use crate::options::KtlsMode;
use crate::shard::Shard;
use crate::EngineError;

/// Records an offloaded AES-GCM connection sends with one key before it is retired (no new
/// streams; GOAWAY from the server side): 2^23, about 8.4 million.
///
/// RFC 8446 section 5.5 allows about 2^24.5 full-size records per AES-GCM key; rustls
/// rekeys its own connections before 2^24. ringtun's count is an upper bound (every write
/// is charged as if it started a new record), so the real number is lower still. Retiring
/// at 2^23 leaves [`TX_RECORD_MARGIN`] (another 2^23 records, at least 128 GiB at full
/// records) for the streams already on the connection to finish before the hard stop at
/// 2^24.
pub const DEFAULT_TX_RECORD_LIMIT: u64 = 1 << 23;

/// Records a retired connection may still send before writes fail; see
/// [`DEFAULT_TX_RECORD_LIMIT`].
pub const TX_RECORD_MARGIN: u64 = 1 << 23;

/// How long to wait before retrying close_notify when the socket's send buffer is full, and
/// how often; after that the connection is shut down without it (the peer then sees a TCP
/// FIN without close_notify, which both kTLS and ringtun treat as end of stream).
const CLOSE_NOTIFY_RETRY: Duration = Duration::from_millis(10);
const CLOSE_NOTIFY_TRIES: u32 = 100;

/// Probes the kernel once at startup (unless `--ktls off`), logs what it found, and returns
/// the capability HBONE connections should use, `None` for userspace rustls. With
/// `--ktls on` a kernel without usable kTLS is an error.
pub fn startup(mode: KtlsMode) -> Result<Option<Capability>, EngineError> {
    if mode == KtlsMode::Off {
        tracing::info!("kTLS off (--ktls off): HBONE connections use userspace rustls");
        return Ok(None);
    }
    let cap = ktls::probe();
    if cap.is_available() {
        tracing::info!(
            ktls = %mode,
            "{cap}; HBONE connections hand their TLS record layer to the kernel after the handshake"
        );
        Ok(Some(cap))
    } else if mode == KtlsMode::On {
        Err(EngineError::KtlsUnavailable {
            reason: cap.to_string(),
        })
    } else {
        tracing::info!(
            ktls = %mode,
            "{cap}; HBONE connections use userspace rustls"
        );
        Ok(None)
    }
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

/// Which record layer carries an HBONE connection, per direction: the access log's
/// `tls=… ktls.tx=… ktls.rx=… tls.cipher=…`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsPath {
    /// The kernel encrypts what we send.
    pub ktls_tx: bool,
    /// The kernel decrypts what we receive.
    pub ktls_rx: bool,
    /// The negotiated cipher suite.
    pub cipher: Option<Cipher>,
}

impl TlsPath {
    /// Userspace rustls both ways, with the suite the handshake negotiated.
    pub fn userspace(cipher: Option<Cipher>) -> TlsPath {
        TlsPath {
            ktls_tx: false,
            ktls_rx: false,
            cipher,
        }
    }

    /// `ktls`, `userspace`, or `ktls-tx` / `ktls-rx` for a half-offloaded connection.
    pub fn name(self) -> &'static str {
        match (self.ktls_tx, self.ktls_rx) {
            (true, true) => "ktls",
            (false, false) => "userspace",
            (true, false) => "ktls-tx",
            (false, true) => "ktls-rx",
        }
    }
}

impl fmt::Display for TlsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tls={} ktls.tx={} ktls.rx={} tls.cipher={}",
            self.name(),
            self.ktls_tx,
            self.ktls_rx,
            self.cipher.map_or("-", Cipher::name)
        )
    }
}

/// How many records an offloaded connection has sent with its one TX key, and whether it
/// should stop being used.
///
/// The kernel on Linux before 6.13 cannot rekey (and ringtun does not implement kTLS rekey
/// for later kernels), so an offloaded connection keeps its first key for life. Past
/// `retire_at` records the connection is *retired*: the outbound pool stops handing it out
/// and the inbound side sends GOAWAY, so new streams go to a fresh connection with fresh
/// keys while the streams already on it finish. Past `retire_at +` [`TX_RECORD_MARGIN`]
/// writes fail and the connection closes, before the AES-GCM limit is reached.
/// ChaCha20-Poly1305 has no practical limit (RFC 8446 section 5.5) and is never retired.
///
/// Shared (`Rc`) between the connection's [`KtlsIo`] and whoever decides about new streams.
pub struct KeyBudget {
    records: Cell<u64>,
    retire_at: u64,
    limit: u64,
    waker: Cell<Option<Waker>>,
}

impl fmt::Debug for KeyBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyBudget")
            .field("records", &self.records.get())
            .field("retire_at", &self.retire_at)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl KeyBudget {
    /// A budget for a fresh key of `cipher`, retiring after `retire_at` records.
    pub fn new(cipher: Cipher, retire_at: u64) -> Self {
        let (retire_at, limit) = match cipher {
            Cipher::Aes128Gcm | Cipher::Aes256Gcm => {
                (retire_at, retire_at.saturating_add(TX_RECORD_MARGIN))
            }
            _ => (u64::MAX, u64::MAX),
        };
        KeyBudget {
            records: Cell::new(0),
            retire_at,
            limit,
            waker: Cell::new(None),
        }
    }

    /// Records sent so far (an upper bound).
    pub fn records(&self) -> u64 {
        self.records.get()
    }

    /// Whether the connection should take no new streams.
    pub fn is_retired(&self) -> bool {
        self.records.get() >= self.retire_at
    }

    /// Ready once the connection is retired; registers `cx` to be woken when it happens.
    pub fn poll_retired(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_retired() {
            return Poll::Ready(());
        }
        self.waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }

    fn exhausted(&self) -> bool {
        self.records.get() >= self.limit
    }

    /// Accounts for `records`; true when this charge retired the connection.
    fn charge(&self, records: u64) -> bool {
        let before = self.records.get();
        let now = before.saturating_add(records);
        self.records.set(now);
        if before < self.retire_at && now >= self.retire_at {
            if let Some(w) = self.waker.take() {
                w.wake();
            }
            return true;
        }
        false
    }
}

/// Upper bound of the records one `write`/`writev` of `bytes` makes the kernel send: it
/// splits at 16 KiB and may close a record at the end of every call.
fn records_for(bytes: usize) -> u64 {
    if bytes == 0 {
        0
    } else {
        1 + (bytes / ktls::MAX_RECORD_PLAINTEXT) as u64
    }
}

/// The socket under the TLS handshake.
///
/// Corked (when kTLS may follow), reads never cross a TLS record boundary, so that after the
/// handshake rustls holds no fragment of a record and the kernel can take over exactly at
/// the next record. That costs two reads per record during the handshake; connections that
/// stay on rustls leave the wrapper behind afterwards ([`RustlsIo`] reads the socket itself),
/// and with kTLS off or unavailable the wrapper never corks at all.
#[derive(Debug)]
pub struct HandshakeIo {
    io: TcpStreamPoll,
    cork: Option<RecordBoundary>,
}

impl HandshakeIo {
    /// Wraps a socket at the start of a TLS connection.
    pub fn new(io: TcpStreamPoll, corked: bool) -> Self {
        HandshakeIo {
            io,
            cork: corked.then(RecordBoundary::new),
        }
    }

    /// A wrapper that corks when this shard may offload connections to the kernel.
    pub fn for_shard(shard: &Shard, io: TcpStreamPoll) -> Self {
        Self::new(io, shard.tls.ktls.is_some())
    }
}

impl AsyncRead for HandshakeIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(cork) = this.cork.as_mut() else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        let limit = cork.max_read().min(buf.remaining());
        if limit == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut part = buf.take(limit);
        ready!(Pin::new(&mut this.io).poll_read(cx, &mut part))?;
        let n = part.filled().len();
        cork.advance(part.filled());
        // SAFETY: `part` is a view of `buf`'s unfilled region, and the read just filled (so
        // initialised) its first `n` bytes.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HandshakeIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Where an orderly shutdown of a [`KtlsIo`] is.
enum Closing {
    /// close_notify not sent yet.
    Open,
    /// The send buffer was full; retry when the timer fires.
    Waiting {
        timer: Pin<Box<monoio::time::Sleep>>,
        tries: u32,
    },
    /// close_notify sent (or given up on): only the TCP shutdown is left.
    Done,
}

/// An offloaded HBONE socket: plaintext in and out, the kernel does the records.
pub struct KtlsIo {
    io: TcpStreamPoll,
    /// Application data rustls decrypted before the switch; delivered before the socket's.
    early: Vec<u8>,
    early_pos: usize,
    /// close_notify (or TCP FIN) seen: every further read is end of stream.
    eof: bool,
    budget: Rc<KeyBudget>,
    /// Writes failed for good once the key budget ran out (logged once).
    exhausted_logged: bool,
    closing: Closing,
    shard: Rc<Shard>,
    peer: Option<SocketAddr>,
}

impl fmt::Debug for KtlsIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KtlsIo")
            .field("fd", &self.io.as_raw_fd())
            .field("peer", &self.peer)
            .field("early_left", &(self.early.len() - self.early_pos))
            .field("eof", &self.eof)
            .field("tx_records", &self.budget.records())
            .finish_non_exhaustive()
    }
}

impl KtlsIo {
    fn new(shard: Rc<Shard>, io: TcpStreamPoll, early: Vec<u8>, budget: Rc<KeyBudget>) -> Self {
        let peer = io.peer_addr().ok();
        KtlsIo {
            io,
            early,
            early_pos: 0,
            eof: false,
            budget,
            exhausted_logged: false,
            closing: Closing::Open,
            shard,
            peer,
        }
    }

    /// Logs why the record layer gave up on this connection, and turns it into the error h2
    /// sees.
    fn fail(&self, e: KtlsError) -> io::Error {
        let peer = self.peer.map(|p| p.to_string()).unwrap_or_default();
        match &e {
            KtlsError::KeyUpdate { .. } => tracing::warn!(
                shard = self.shard.id,
                %peer,
                "kTLS: peer sent a TLS KeyUpdate; the kernel cannot switch to the new key (no kTLS rekey on Linux < 6.13, not implemented here), so the HBONE connection is closed rather than fed undecryptable records; the peer will reconnect"
            ),
            _ => tracing::warn!(
                shard = self.shard.id,
                %peer,
                error = %e,
                "kTLS: HBONE connection failed"
            ),
        }
        let kind = match &e {
            KtlsError::PeerAlert { .. } | KtlsError::KeyUpdate { .. } => {
                io::ErrorKind::ConnectionAborted
            }
            _ => io::ErrorKind::InvalidData,
        };
        match e {
            // Plain socket errors (ECONNRESET, ...) keep their errno.
            KtlsError::Io { source, .. } => source,
            e => io::Error::new(kind, e),
        }
    }

    /// A failed plain read: decryption failures get a readable message, the rest passes.
    fn read_error(&self, e: io::Error) -> io::Error {
        match e.raw_os_error() {
            Some(libc::EBADMSG) => self.fail(KtlsError::BadRecord(e)),
            Some(libc::EKEYEXPIRED) => self.fail(KtlsError::KeyUpdate {
                update_requested: false,
            }),
            _ => e,
        }
    }

    fn check_budget(&mut self) -> io::Result<()> {
        if !self.budget.exhausted() {
            return Ok(());
        }
        if !self.exhausted_logged {
            self.exhausted_logged = true;
            tracing::warn!(
                shard = self.shard.id,
                peer = ?self.peer,
                records = self.budget.records(),
                "kTLS: the connection's TX key reached its usage limit; closing it"
            );
        }
        Err(io::Error::other(
            "kTLS TX key usage limit reached (no rekey); connection closed",
        ))
    }

    fn charge(&self, bytes: usize) {
        if self.budget.charge(records_for(bytes)) {
            bump(&self.shard.counters().ktls_key_retired);
            tracing::info!(
                shard = self.shard.id,
                peer = ?self.peer,
                records = self.budget.records(),
                "kTLS: TX key used for {} records; retiring the HBONE connection (no new streams)",
                self.budget.records()
            );
        }
    }
}

impl AsyncRead for KtlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.early_pos < this.early.len() {
            let n = buf.remaining().min(this.early.len() - this.early_pos);
            buf.put_slice(&this.early[this.early_pos..this.early_pos + n]);
            this.early_pos += n;
            if this.early_pos == this.early.len() {
                this.early = Vec::new();
                this.early_pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if this.eof || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            match ready!(Pin::new(&mut this.io).poll_read(cx, buf)) {
                Ok(()) => return Poll::Ready(Ok(())),
                // A record that is not application data heads the queue.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
                Err(e) => return Poll::Ready(Err(this.read_error(e))),
            }
            let fd = this.io.as_raw_fd();
            match ktls::recv_data(fd, buf.initialize_unfilled()) {
                Ok(0) => {
                    tracing::debug!(shard = this.shard.id, peer = ?this.peer, "kTLS: close_notify or FIN from the peer");
                    this.eof = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Only session tickets were there: wait for more through the runtime.
                Err(e) if e.is_would_block() => continue,
                Err(e) => return Poll::Ready(Err(this.fail(e))),
            }
        }
    }
}

impl AsyncWrite for KtlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_budget()?;
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.charge(n);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_budget()?;
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        this.charge(n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    /// close_notify through the kernel, then `shutdown(SHUT_WR)`.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let fd = this.io.as_raw_fd();
        loop {
            let attempt = match &mut this.closing {
                Closing::Done => return Pin::new(&mut this.io).poll_shutdown(cx),
                Closing::Open => 1,
                Closing::Waiting { timer, tries } => {
                    ready!(timer.as_mut().poll(cx));
                    *tries + 1
                }
            };
            this.closing = match ktls::send_close_notify(fd) {
                Ok(()) => {
                    this.charge(1);
                    Closing::Done
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && attempt < CLOSE_NOTIFY_TRIES => {
                    Closing::Waiting {
                        timer: Box::pin(monoio::time::sleep(CLOSE_NOTIFY_RETRY)),
                        tries: attempt,
                    }
                }
                Err(e) => {
                    tracing::debug!(shard = this.shard.id, peer = ?this.peer, error = %e, "kTLS: close_notify not sent");
                    Closing::Done
                }
            };
        }
    }
}

/// Bytes asked of the socket per read on the userspace path: 64 KiB is four full TLS records,
/// so a bulk transfer makes one read syscall per four records instead of rustls' own 4 KiB
/// reads (four syscalls per record).
const RUSTLS_READ_CHUNK: usize = 64 * 1024;

/// Encrypted bytes rustls may hold for the socket before a write must wait for a flush; also
/// the most one `writev` sends (rustls hands out at most 64 records per call).
const RUSTLS_SEND_LIMIT: usize = 512 * 1024;

/// Encrypted bytes buffered since the last flush past which a write goes to the socket at
/// once, without waiting for h2's flush: big enough to batch a 256 KiB DATA frame into one
/// `writev`, small enough that bulk data starts moving before the send limit stalls h2.
const RUSTLS_EAGER_WRITE: usize = 256 * 1024;

/// Lets an HBONE connection's writes wait for the end of a shard tick, so that frames from
/// every stream that became ready in the same tick leave in one record batch and one `writev`.
///
/// h2 flushes its I/O after every DATA frame it sends without copying (payloads over 256
/// bytes) and at the end of every poll; with sixteen streams each sending a small request, that
/// was one `writev` per request although all sixteen were ready at once. The task that drives
/// the h2 connection polls it through [`FlushTick::poll`], which numbers its polls; a flush
/// during a poll only marks the bytes due and has the task polled once more after the other
/// ready tasks of this tick, and the next poll writes them (at its first read or flush).
/// Until a driver polls through it (the h2 handshake), flushes write at once.
#[derive(Debug, Default)]
pub struct FlushTick {
    /// A driver polls through [`FlushTick::poll`]: flushes may be deferred.
    armed: Cell<bool>,
    /// Which poll of the driving task this is.
    poll: Cell<u32>,
    /// A flush was deferred during this poll: poll the task once more.
    repoll: Cell<bool>,
}

impl FlushTick {
    /// Polls the h2 connection (`f`) as one tick of the driving task.
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.armed.set(true);
        self.poll.set(self.poll.get().wrapping_add(1));
        let r = f(cx);
        if self.repoll.replace(false) {
            // To the back of the shard's run queue: the streams woken in this tick buffer
            // their frames first.
            cx.waker().wake_by_ref();
        }
        r
    }
}

/// An HBONE connection on userspace rustls, after the handshake.
///
/// tokio-rustls would do this job, but it costs a syscall per 4 KiB read (rustls reads into
/// its record buffer in 4 KiB steps) and one `writev` per h2 write (every frame head, every
/// WINDOW_UPDATE, every DATA frame its own syscall, and on a chatty stream its own record).
/// Here reads take up to [`RUSTLS_READ_CHUNK`] from the socket into a buffer of ours and
/// rustls is fed from it; writes are encrypted into rustls' send buffer and go to the socket
/// when h2 flushes (once per batch of frames, so a request's HEADERS and DATA share one record
/// and one syscall; see [`FlushTick`] for batching across streams) or when
/// [`RUSTLS_EAGER_WRITE`] bytes are waiting.
///
/// The socket is in monoio's completion mode and is driven by hand: a non-blocking `recv`
/// while bytes keep coming, and after a short read an io_uring poll for readability before
/// the next `recv`; writes are non-blocking `sendmsg`s, with a poll for writability when the
/// socket is full. monoio's poll I/O would instead route readiness through an epoll instance
/// (one `epoll_wait` per wake-up) and learn that the socket is empty from a `recv` that fails
/// with `EAGAIN`: two syscalls more per message.
pub struct RustlsIo {
    sock: Rc<TcpStream>,
    conn: rustls::Connection,
    /// Ciphertext read from the socket; `rbuf[rpos..]` is not yet handed to rustls. Released
    /// when empty and the socket has nothing more, so idle connections hold no buffer.
    rbuf: Vec<u8>,
    rpos: usize,
    /// The last `recv` returned less than it asked for: the socket is (most likely) empty,
    /// so the next read waits for readability instead of trying a `recv` first.
    drained: bool,
    /// The socket reported end of stream.
    eof: bool,
    /// A wait for readability (after a short read) or writability (after `EAGAIN`).
    read_wait: Option<Readiness>,
    write_wait: Option<Readiness>,
    /// Plaintext bytes accepted since the last full write to the socket.
    unflushed: usize,
    /// close_notify queued (poll_shutdown started).
    closing: bool,
    /// Shared with the task driving h2 (see [`FlushTick`]).
    tick: Rc<FlushTick>,
    /// The poll of the driving task in which a flush was deferred.
    deferred: Option<u32>,
}

/// An io_uring poll on the socket (`TcpStream::readable`/`writable`), owning its own handle
/// to the stream so that it can live next to it.
type Readiness = Pin<Box<dyn Future<Output = io::Result<()>>>>;

impl fmt::Debug for RustlsIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RustlsIo")
            .field("fd", &self.sock.as_raw_fd())
            .field("buffered_in", &(self.rbuf.len() - self.rpos))
            .field("unflushed", &self.unflushed)
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl RustlsIo {
    fn new(sock: TcpStream, mut conn: rustls::Connection, tick: Rc<FlushTick>) -> Self {
        conn.set_buffer_limit(Some(RUSTLS_SEND_LIMIT));
        RustlsIo {
            sock: Rc::new(sock),
            conn,
            rbuf: Vec::new(),
            rpos: 0,
            // The handshake may have left the socket empty or not: try a recv first.
            drained: false,
            eof: false,
            read_wait: None,
            write_wait: None,
            unflushed: 0,
            closing: false,
            tick,
            deferred: None,
        }
    }

    /// Writes a deferred flush once the driving task is in a later poll than the one that
    /// deferred it. Pending (socket full) is not an error: the task is woken when it drains,
    /// and the bytes stay due.
    fn write_due(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.deferred {
            Some(p) if p != self.tick.poll.get() => match self.poll_write_tls(cx) {
                Poll::Ready(r) => r,
                Poll::Pending => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Writes what rustls holds for the socket until it holds nothing (Ready) or the socket
    /// is full (Pending, woken when it drains).
    fn poll_write_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            if let Some(w) = self.write_wait.as_mut() {
                ready!(w.as_mut().poll(cx))?;
                self.write_wait = None;
            }
            let mut out = SocketWriter {
                fd: self.sock.as_raw_fd(),
            };
            match self.conn.write_tls(&mut out) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let sock = self.sock.clone();
                    self.write_wait = Some(Box::pin(async move { sock.writable(false).await }));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.unflushed = 0;
        self.deferred = None;
        Poll::Ready(Ok(()))
    }

    /// Hands rustls the next piece of buffered ciphertext and lets it decrypt what is
    /// complete. rustls takes at most 4 KiB per call, from memory that is cheap; the syscall
    /// was the expensive part.
    fn feed(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let mut rest = &self.rbuf[self.rpos..];
        let n = self.conn.read_tls(&mut rest)?;
        self.rpos += n;
        if self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
        }
        if let Err(e) = self.conn.process_new_packets() {
            // rustls queued an alert describing the failure: a last try to tell the peer.
            let _ = self.poll_write_tls(cx);
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        Ok(())
    }

    /// Reads from the socket into `rbuf`: Ready(true) when bytes arrived, Ready(false) at end
    /// of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            if self.drained {
                if self.read_wait.is_none() {
                    // Idle: give the buffer back rather than pin it for the connection's life.
                    if self.rbuf.is_empty() {
                        self.rbuf = Vec::new();
                    }
                    let sock = self.sock.clone();
                    self.read_wait = Some(Box::pin(async move { sock.readable(false).await }));
                }
                if let Some(w) = self.read_wait.as_mut() {
                    ready!(w.as_mut().poll(cx))?;
                }
                self.read_wait = None;
                self.drained = false;
            }
            if self.rbuf.capacity() < RUSTLS_READ_CHUNK {
                self.rbuf.reserve_exact(RUSTLS_READ_CHUNK);
            }
            let len = self.rbuf.len();
            let spare = self.rbuf.spare_capacity_mut();
            let want = spare.len();
            let n = match net::recv_nonblocking(self.sock.as_raw_fd(), spare) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.drained = true;
                    continue;
                }
                Err(e) => return Poll::Ready(Err(e)),
            };
            // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
            unsafe { self.rbuf.set_len(len + n) };
            self.drained = n < want;
            return Poll::Ready(Ok(n > 0));
        }
    }
}

impl AsyncRead for RustlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.write_due(cx)?;
        let start = buf.filled().len();
        loop {
            // Plaintext rustls already has goes first, straight into h2's buffer.
            loop {
                if buf.remaining() == 0 {
                    return Poll::Ready(Ok(()));
                }
                match this.conn.reader().into_first_chunk() {
                    // close_notify: end of stream once everything before it is delivered.
                    Ok([]) => return Poll::Ready(Ok(())),
                    Ok(chunk) => {
                        let n = chunk.len().min(buf.remaining());
                        buf.put_slice(&chunk[..n]);
                        this.conn.reader().consume(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // TCP end of stream without close_notify: deliver what came before it
                    // first, then the error.
                    Err(_) if buf.filled().len() > start => return Poll::Ready(Ok(())),
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if this.rpos < this.rbuf.len() {
                this.feed(cx)?;
                continue;
            }
            if this.eof {
                // Tell rustls (it then reports a missing close_notify as UnexpectedEof).
                this.conn.read_tls(&mut io::empty())?;
                this.conn
                    .process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if buf.filled().len() > start {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if buf.filled().len() > start {
                // h2 has something to chew on; the next read comes back for more.
                return Poll::Ready(Ok(()));
            }
            match ready!(this.poll_fill(cx)) {
                Ok(true) => {}
                Ok(false) => this.eof = true,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for RustlsIo {
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
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        loop {
            // rustls encrypts into its send buffer here (records span the slices, so a frame
            // head and its payload share one record), up to RUSTLS_SEND_LIMIT.
            let n = this.conn.writer().write_vectored(bufs)?;
            if n > 0 {
                this.unflushed += n;
                if this.unflushed >= RUSTLS_EAGER_WRITE {
                    // Pending only means the socket is full; the bytes are accepted either way
                    // and the flush that follows waits for room.
                    if let Poll::Ready(Err(e)) = this.poll_write_tls(cx) {
                        return Poll::Ready(Err(e));
                    }
                }
                return Poll::Ready(Ok(n));
            }
            // The send buffer is full: make room first.
            ready!(this.poll_write_tls(cx))?;
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.tick.armed.get() && this.conn.wants_write() {
            let now = this.tick.poll.get();
            match this.deferred {
                None => {
                    this.deferred = Some(now);
                    this.tick.repoll.set(true);
                    return Poll::Ready(Ok(()));
                }
                Some(p) if p == now => return Poll::Ready(Ok(())),
                Some(_) => {}
            }
        }
        this.poll_write_tls(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            this.closing = true;
            this.conn.send_close_notify();
        }
        ready!(this.poll_write_tls(cx))?;
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

/// The stream h2 runs on for one HBONE connection.
// The rustls variant is large, but boxing it would add an indirection to every read and write
// of the userspace path, which is the one without kernel help.
#[allow(clippy::large_enum_variant)]
pub enum HboneIo {
    /// Userspace rustls.
    Rustls(RustlsIo),
    /// Kernel TLS.
    Kernel(KtlsIo),
}

impl fmt::Debug for HboneIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HboneIo::Rustls(_) => f.write_str("HboneIo::Rustls"),
            HboneIo::Kernel(k) => f.debug_tuple("HboneIo::Kernel").field(k).finish(),
        }
    }
}

impl AsyncRead for HboneIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HboneIo::Rustls(s) => Pin::new(s).poll_read(cx, buf),
            HboneIo::Kernel(k) => Pin::new(k).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HboneIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            HboneIo::Rustls(s) => Pin::new(s).poll_write(cx, buf),
            HboneIo::Kernel(k) => Pin::new(k).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            HboneIo::Rustls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            HboneIo::Kernel(k) => Pin::new(k).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            HboneIo::Rustls(s) => s.is_write_vectored(),
            HboneIo::Kernel(k) => k.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HboneIo::Rustls(s) => Pin::new(s).poll_flush(cx),
            HboneIo::Kernel(k) => Pin::new(k).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HboneIo::Rustls(s) => Pin::new(s).poll_shutdown(cx),
            HboneIo::Kernel(k) => Pin::new(k).poll_shutdown(cx),
        }
    }
}

/// An HBONE connection after its TLS handshake.
#[derive(Debug)]
pub struct Established {
    /// What h2 runs on.
    pub io: HboneIo,
    /// Poll the h2 connection through this (see [`FlushTick`]).
    pub tick: Rc<FlushTick>,
    /// How its records are carried.
    pub path: TlsPath,
    /// The TX key budget of an offloaded connection (`None` on rustls, which counts and
    /// rekeys by itself).
    pub budget: Option<Rc<KeyBudget>>,
}

/// A connection lost between the TLS handshake and its first HTTP/2 byte: mostly while
/// switching to kTLS, when rustls had given up (or was about to give up) its secrets, so it
/// cannot continue in userspace either.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    /// The offload crate refused or the kernel rejected the keys.
    #[error("switching to kTLS: {0}")]
    Ktls(#[from] KtlsError),
    /// Socket I/O while finishing the last record or flushing rustls failed.
    #[error("switching to kTLS: {context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The error.
        source: io::Error,
    },
    /// rustls failed on the record that completed the handshake's last read.
    #[error("switching to kTLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// A connection staying on userspace rustls could not leave monoio's poll mode (the
    /// runtime refused to deregister the socket); nothing was sent on it yet.
    #[error("after the TLS handshake: leaving poll mode: {0}")]
    PollMode(io::Error),
}

/// Finishes a handshaken connection: offloads it to the kernel when this shard, the kernel
/// and the negotiated cipher suite allow, else keeps it on userspace rustls ([`RustlsIo`]). Counts the
/// outcome in the shard's counters.
pub async fn establish(
    shard: &Rc<Shard>,
    tls: tokio_rustls::TlsStream<HandshakeIo>,
) -> Result<Established, OffloadError> {
    let Some(cap) = shard.tls.ktls.as_ref() else {
        return userspace(shard, tls);
    };
    let (io, common) = tls.get_ref();
    let suite = common.negotiated_cipher_suite().map(|s| s.suite());
    let cipher = suite
        .filter(|s| cap.can_offload_suite(*s))
        .and_then(Cipher::from_suite);
    let Some(cipher) = cipher.filter(|_| io.cork.is_some()) else {
        tracing::debug!(shard = shard.id, ?suite, "kTLS: this kernel cannot offload the negotiated cipher suite; the connection stays on userspace rustls");
        return userspace(shard, tls);
    };
    // Attaching the ULP is the one step that can fail without losing the connection: the
    // socket stays plain TCP until keys are installed. So it comes before the secrets leave
    // rustls.
    if let Err(e) = ktls::enable_ulp(io.io.as_raw_fd()) {
        tracing::warn!(shard = shard.id, error = %e, "kTLS: the connection stays on userspace rustls");
        return userspace(shard, tls);
    }
    // Committed: an error from here on loses the connection.
    let hio = match tls {
        tokio_rustls::TlsStream::Client(s) => {
            let (io, conn) = s.into_inner();
            (io, rustls::Connection::from(conn))
        }
        tokio_rustls::TlsStream::Server(s) => {
            let (io, conn) = s.into_inner();
            (io, rustls::Connection::from(conn))
        }
    };
    let result = offload(shard, hio, cipher).await;
    if result.is_err() {
        bump(&shard.counters().ktls_failed);
    }
    result
}

fn userspace(
    shard: &Shard,
    tls: tokio_rustls::TlsStream<HandshakeIo>,
) -> Result<Established, OffloadError> {
    // Past the handshake nothing reads through the cork any more: the record layer reads the
    // socket itself.
    let (hio, conn) = match tls {
        tokio_rustls::TlsStream::Client(s) => {
            let (io, conn) = s.into_inner();
            (io, rustls::Connection::from(conn))
        }
        tokio_rustls::TlsStream::Server(s) => {
            let (io, conn) = s.into_inner();
            (io, rustls::Connection::from(conn))
        }
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|s| Cipher::from_suite(s.suite()));
    // Off monoio's poll I/O: RustlsIo drives the socket itself.
    let sock = hio
        .io
        .try_into_comp_io()
        .map_err(|(e, _)| OffloadError::PollMode(e))?;
    bump(&shard.counters().tls_userspace);
    let tick = Rc::new(FlushTick::default());
    Ok(Established {
        io: HboneIo::Rustls(RustlsIo::new(sock, conn, tick.clone())),
        tick,
        path: TlsPath::userspace(cipher),
        budget: None,
    })
}

async fn offload(
    shard: &Rc<Shard>,
    (mut hio, mut conn): (HandshakeIo, rustls::Connection),
    cipher: Cipher,
) -> Result<Established, OffloadError> {
    let mut early = Vec::new();
    // 1. The handshake may have stopped reading inside a record (tokio-rustls keeps reading
    //    after the handshake until the socket has nothing more). Read exactly the rest of it
    //    and let rustls decrypt it, so the kernel starts at a record boundary.
    let mut cork = hio.cork.take().unwrap_or_default();
    let mut chunk = Vec::new();
    if !cork.at_boundary() {
        tracing::debug!(
            shard = shard.id,
            missing = cork.max_read(),
            "kTLS: finishing a record the handshake left half-read"
        );
    }
    while !cork.at_boundary() {
        drain_plaintext(&mut conn, &mut early)?;
        chunk.resize(cork.max_read(), 0);
        let n = read_some(&mut hio.io, &mut chunk)
            .await
            .map_err(|source| OffloadError::Io {
                context: "reading the rest of a record",
                source,
            })?;
        if n == 0 {
            return Err(OffloadError::Io {
                context: "reading the rest of a record",
                source: io::ErrorKind::UnexpectedEof.into(),
            });
        }
        cork.advance(&chunk[..n]);
        feed(&mut conn, &chunk[..n])?;
    }
    // 2. Flush what rustls still has for the peer, then take its secrets and the plaintext it
    //    decrypted but nobody read yet.
    let extracted = loop {
        match ktls::try_extract(conn)? {
            Handoff::Ready(x) => break x,
            Handoff::NeedsFlush(mut c) => {
                let mut out = Vec::new();
                while c.wants_write() {
                    c.write_tls(&mut out).map_err(|source| OffloadError::Io {
                        context: "collecting rustls output",
                        source,
                    })?;
                }
                write_all(&mut hio.io, &out)
                    .await
                    .map_err(|source| OffloadError::Io {
                        context: "flushing rustls output",
                        source,
                    })?;
                conn = *c;
            }
        }
    };
    early.extend_from_slice(&extracted.plaintext);
    // 3. Keys into the kernel.
    let off = ktls::enable(hio.io.as_raw_fd(), extracted.secrets)?;
    let c = shard.counters();
    if off.tx {
        bump(&c.ktls_tx);
    }
    if off.rx {
        bump(&c.ktls_rx);
    }
    tracing::debug!(
        shard = shard.id,
        peer = ?hio.io.peer_addr().ok(),
        %cipher,
        early = early.len(),
        "kTLS: HBONE connection offloaded"
    );
    let budget = Rc::new(KeyBudget::new(cipher, shard.opts.ktls_tx_record_limit));
    Ok(Established {
        io: HboneIo::Kernel(KtlsIo::new(shard.clone(), hio.io, early, budget.clone())),
        // The kernel's socket takes every write at once; nothing to defer.
        tick: Rc::new(FlushTick::default()),
        path: TlsPath {
            ktls_tx: off.tx,
            ktls_rx: off.rx,
            cipher: Some(cipher),
        },
        budget: Some(budget),
    })
}

/// Moves the plaintext rustls has decrypted into `out` (so its buffer never fills while we
/// feed it more).
fn drain_plaintext(conn: &mut rustls::Connection, out: &mut Vec<u8>) -> Result<(), OffloadError> {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    loop {
        match conn.reader().read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            // TCP EOF without close_notify: what was decrypted is still good.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(source) => {
                return Err(OffloadError::Io {
                    context: "draining rustls plaintext",
                    source,
                })
            }
        }
    }
}

/// Gives rustls bytes read from the socket and processes them.
fn feed(conn: &mut rustls::Connection, mut bytes: &[u8]) -> Result<(), OffloadError> {
    while !bytes.is_empty() {
        let n = conn
            .read_tls(&mut bytes)
            .map_err(|source| OffloadError::Io {
                context: "handing the record to rustls",
                source,
            })?;
        if n == 0 {
            return Err(OffloadError::Io {
                context: "handing the record to rustls",
                source: io::ErrorKind::WriteZero.into(),
            });
        }
        conn.process_new_packets()?;
    }
    Ok(())
}

async fn read_some(io: &mut TcpStreamPoll, buf: &mut [u8]) -> io::Result<usize> {
    poll_fn(|cx| {
        let mut rb = ReadBuf::new(buf);
        ready!(Pin::new(&mut *io).poll_read(cx, &mut rb))?;
        Poll::Ready(Ok(rb.filled().len()))
    })
    .await
}

async fn write_all(io: &mut TcpStreamPoll, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *io).poll_write(cx, buf)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_overcounted_never_under() {
        assert_eq!(records_for(0), 0);
        assert_eq!(records_for(1), 1);
        assert_eq!(records_for(16 * 1024 - 1), 1);
        // Exactly one full record is charged as two: the bound may be loose, never short.
        assert_eq!(records_for(16 * 1024), 2);
        assert_eq!(records_for(1 << 20), 65);
    }

    #[test]
    fn budget_retires_then_exhausts_aes_only() {
        let b = KeyBudget::new(Cipher::Aes128Gcm, 10);
        assert!(!b.is_retired());
        assert!(!b.charge(9));
        assert!(
            b.charge(1),
            "the charge that crosses the threshold reports it"
        );
        assert!(b.is_retired());
        assert!(!b.charge(1), "reported once");
        assert!(!b.exhausted());
        b.charge(TX_RECORD_MARGIN);
        assert!(b.exhausted());

        let c = KeyBudget::new(Cipher::Chacha20Poly1305, 10);
        c.charge(1 << 40);
        assert!(!c.is_retired() && !c.exhausted());
    }

    #[test]
    fn default_limits_stay_under_the_aes_gcm_bound() {
        // RFC 8446 5.5: 2^24.5 full-size records per AES-GCM key.
        let rfc = (2f64).powf(24.5) as u64;
        let hard = KeyBudget::new(Cipher::Aes128Gcm, DEFAULT_TX_RECORD_LIMIT).limit;
        assert!(hard <= 1 << 24, "at most where rustls itself rekeys");
        assert!(hard < rfc);
    }

    #[test]
    fn budget_wakes_the_waiter_when_retired() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let b = KeyBudget::new(Cipher::Aes256Gcm, 3);
        assert!(b.poll_retired(&mut cx).is_pending());
        b.charge(2);
        assert_eq!(count.0.load(Ordering::Relaxed), 0);
        b.charge(2);
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        assert!(b.poll_retired(&mut cx).is_ready());
    }

    #[test]
    fn path_names() {
        assert_eq!(
            TlsPath::userspace(None).to_string(),
            "tls=userspace ktls.tx=false ktls.rx=false tls.cipher=-"
        );
        let both = TlsPath {
            ktls_tx: true,
            ktls_rx: true,
            cipher: Some(Cipher::Aes128Gcm),
        };
        assert_eq!(
            both.to_string(),
            "tls=ktls ktls.tx=true ktls.rx=true tls.cipher=aes-128-gcm"
        );
    }
}
