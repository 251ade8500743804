//! The kernel's record layer: an offloaded socket read and written as plaintext.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use monoio::net::tcp::stream_poll::TcpStreamPoll;
use tls_kernel_offload::{self as ktls, KtlsError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::ctx::bump;
use super::early::Early;
use super::key_budget::{records_for, KeyBudget};
use super::StreamCtx;

/// How long to wait before retrying close_notify when the socket's send buffer is full, and
/// how often; after that the connection is shut down without it (the peer then sees a TCP
/// FIN without close_notify, which both kTLS and ringtun treat as end of stream).
const CLOSE_NOTIFY_RETRY: Duration = Duration::from_millis(10);
const CLOSE_NOTIFY_TRIES: u32 = 100;

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
    early: Early,
    /// close_notify (or TCP FIN) seen: every further read is end of stream.
    eof: bool,
    budget: Rc<KeyBudget>,
    /// Writes failed for good once the key budget ran out (logged once).
    exhausted_logged: bool,
    closing: Closing,
    ctx: Rc<StreamCtx>,
    peer: Option<SocketAddr>,
    /// The traffic secrets, where the kernel can install new keys (Linux 6.14+,
    /// `Capability::rekey`) and the handshake logged them: a peer KeyUpdate is followed
    /// instead of closing the connection.
    rekey: Option<Box<ktls::Rekey>>,
}

impl fmt::Debug for KtlsIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KtlsIo")
            .field("fd", &self.io.as_raw_fd())
            .field("peer", &self.peer)
            .field("early_left", &self.early.left())
            .field("eof", &self.eof)
            .field("tx_records", &self.budget.tx_records())
            .field("rx_records", &self.budget.rx_records())
            .finish_non_exhaustive()
    }
}

impl KtlsIo {
    pub(super) fn new(
        ctx: Rc<StreamCtx>,
        io: TcpStreamPoll,
        early: Vec<u8>,
        budget: Rc<KeyBudget>,
        rekey: Option<ktls::Rekey>,
    ) -> Self {
        let peer = io.peer_addr().ok();
        KtlsIo {
            io,
            early: Early::new(early),
            eof: false,
            budget,
            exhausted_logged: false,
            closing: Closing::Open,
            ctx,
            peer,
            rekey: rekey.map(Box::new),
        }
    }

    /// Follows a peer's KeyUpdate where the kernel and the secrets allow; `Err` (to close
    /// the connection with) where they do not or the kernel refused.
    fn follow_key_update(&mut self, update_requested: bool) -> Result<(), KtlsError> {
        let kernel_rekey = self.ctx.ktls.as_ref().is_some_and(|c| c.rekey);
        let Some(rekey) = self.rekey.as_mut().filter(|_| kernel_rekey) else {
            return Err(KtlsError::KeyUpdate { update_requested });
        };
        let tx = ktls::follow_key_update(self.io.as_raw_fd(), rekey, update_requested)?;
        self.budget.rx_rekeyed();
        if tx {
            self.budget.tx_rekeyed();
        }
        tracing::info!(
            shard = self.ctx.shard,
            peer = ?self.peer,
            update_requested,
            updates = rekey.updates(),
            "kTLS: followed the peer's TLS KeyUpdate (new RX key{})",
            if tx { ", and ours with a new TX key" } else { "" }
        );
        Ok(())
    }

    /// Logs why the record layer gave up on this connection, and turns it into the error h2
    /// sees.
    fn fail(&self, e: KtlsError) -> io::Error {
        let peer = self.peer.map(|p| p.to_string()).unwrap_or_default();
        match &e {
            // Reached only where the KeyUpdate cannot be followed (`follow_key_update`).
            KtlsError::KeyUpdate { .. } => {
                let kernel_rekey = self.ctx.ktls.as_ref().is_some_and(|c| c.rekey);
                tracing::warn!(
                    shard = self.ctx.shard,
                    %peer,
                    rx_records = self.budget.rx_records(),
                    kernel_rekey,
                    "kTLS: peer sent a TLS KeyUpdate; ringtun cannot install the peer's next key ({}), so the HBONE connection is closed rather than fed undecryptable records; the peer will reconnect",
                    if kernel_rekey {
                        "the handshake's traffic secrets were not captured"
                    } else {
                        "this kernel has no kTLS rekey; it came with Linux 6.14"
                    }
                )
            }
            _ => tracing::warn!(
                shard = self.ctx.shard,
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
                shard = self.ctx.shard,
                peer = ?self.peer,
                records = self.budget.tx_records(),
                "kTLS: the connection's TX key reached its usage limit; closing it"
            );
        }
        Err(io::Error::other(
            "kTLS TX key usage limit reached (no rekey); connection closed",
        ))
    }

    fn charge(&self, bytes: usize) {
        if self.budget.charge_tx(records_for(bytes)) {
            bump(&self.ctx.counters.ktls_retired);
            tracing::info!(
                shard = self.ctx.shard,
                peer = ?self.peer,
                records = self.budget.tx_records(),
                "kTLS: TX key used for {} records; retiring the HBONE connection (no new streams)",
                self.budget.tx_records()
            );
        }
    }

    /// Accounts for `bytes` read from the kernel; asks it for its exact count of records
    /// received when the byte bound says the retire point could have been reached (see
    /// [`KeyBudget::rx_bytes`]).
    fn received(&self, bytes: usize) {
        if self.budget.rx_bytes(bytes) {
            self.look_rx();
        }
    }

    /// Reads the kernel's RX record sequence number (records decrypted under the peer's
    /// key, counting those rustls decrypted before the switch) into the budget.
    fn look_rx(&self) {
        let retired = match ktls::get_crypto_state(self.io.as_raw_fd(), ktls::Direction::Rx) {
            Ok(state) => self.budget.rx_seen(state.rec_seq),
            Err(e) => {
                tracing::debug!(shard = self.ctx.shard, peer = ?self.peer, error = %e, "kTLS: RX record count unavailable; counting every byte as a record");
                self.budget.rx_unknown()
            }
        };
        if retired {
            bump(&self.ctx.counters.ktls_retired);
            tracing::info!(
                shard = self.ctx.shard,
                peer = ?self.peer,
                records = self.budget.rx_records(),
                "kTLS: received {} records under the peer's key (a rustls peer must send a KeyUpdate at 2^24, {}); retiring the HBONE connection (no new streams)",
                self.budget.rx_records(),
                if self.rekey.is_some() {
                    "which ringtun would follow"
                } else {
                    "which this connection could not follow"
                }
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
        if this.early.deliver(buf).is_some() {
            return Poll::Ready(Ok(()));
        }
        if this.eof || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            let before = buf.filled().len();
            match ready!(Pin::new(&mut this.io).poll_read(cx, buf)) {
                Ok(()) => {
                    this.received(buf.filled().len() - before);
                    return Poll::Ready(Ok(()));
                }
                // A record that is not application data heads the queue.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
                Err(e) => return Poll::Ready(Err(this.read_error(e))),
            }
            let fd = this.io.as_raw_fd();
            match ktls::recv_data(fd, buf.initialize_unfilled()) {
                Ok(0) => {
                    tracing::debug!(shard = this.ctx.shard, peer = ?this.peer, "kTLS: close_notify or FIN from the peer");
                    this.eof = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    buf.advance(n);
                    // Tickets may have been skipped on the way: records the byte bound
                    // does not see, so ask the kernel now (rare: start and end of a
                    // connection).
                    this.look_rx();
                    return Poll::Ready(Ok(()));
                }
                // Only session tickets were there: wait for more through the runtime.
                Err(e) if e.is_would_block() => continue,
                // The kernel (6.14+) pauses decryption until the next key is in; then the
                // runtime's read goes on.
                Err(KtlsError::KeyUpdate { update_requested }) => {
                    match this.follow_key_update(update_requested) {
                        Ok(()) => continue,
                        Err(e) => return Poll::Ready(Err(this.fail(e))),
                    }
                }
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
                    tracing::debug!(shard = this.ctx.shard, peer = ?this.peer, error = %e, "kTLS: close_notify not sent");
                    Closing::Done
                }
            };
        }
    }
}
