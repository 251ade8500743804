//! After the TLS handshake: hand the record layer to the kernel, or keep it in userspace.

use std::future::poll_fn;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Poll};

use monoio::net::tcp::stream_poll::TcpStreamPoll;
use tls_kernel_offload::{self as ktls, Cipher, Handoff, KtlsError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::ctx::bump;
use super::pump::{KeyPump, RecordPump};
use super::TlsPath;
use super::{FlushTick, HandshakeIo, HboneIo, KeyBudget, KeysIo, KtlsIo, RustlsIo, StreamCtx};
use crate::options::TlsRecords;

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
/// taking the record layer over from rustls (for the kernel or ringtun's own), when rustls
/// had given up (or was about to give up) its secrets, so it cannot continue on its own
/// either.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    /// The offload crate refused or the kernel rejected the keys.
    #[error("taking the record layer over from rustls: {0}")]
    Ktls(#[from] KtlsError),
    /// Socket I/O while finishing the last record or flushing rustls failed.
    #[error("taking the record layer over from rustls: {context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The error.
        source: io::Error,
    },
    /// rustls failed on the record that completed the handshake's last read.
    #[error("taking the record layer over from rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// A connection staying on userspace rustls could not leave monoio's poll mode (the
    /// runtime refused to deregister the socket); nothing was sent on it yet.
    #[error("after the TLS handshake: leaving poll mode: {0}")]
    PollMode(io::Error),
}

/// Finishes a handshaken connection: offloads it to the kernel when this shard, the kernel
/// and the negotiated cipher suite allow, else keeps it in userspace, on ringtun's record
/// layer ([`KeysIo`], `--tls-records own`) or rustls' ([`RustlsIo`]). Counts the outcome in
/// the context's counters.
pub async fn establish(
    ctx: &Rc<StreamCtx>,
    tls: tokio_rustls::TlsStream<HandshakeIo>,
) -> Result<Established, OffloadError> {
    let Some(cap) = ctx.ktls.as_ref() else {
        return userspace(ctx, tls).await;
    };
    let (io, common) = tls.get_ref();
    let suite = common.negotiated_cipher_suite().map(|s| s.suite());
    let cipher = suite
        .filter(|s| cap.can_offload_suite(*s))
        .and_then(Cipher::from_suite);
    let Some(cipher) = cipher.filter(|_| io.cork.is_some()) else {
        tracing::debug!(shard = ctx.shard, ?suite, "kTLS: this kernel cannot offload the negotiated cipher suite; the connection stays in userspace");
        return userspace(ctx, tls).await;
    };
    // Attaching the ULP is the one step that can fail without losing the connection: the
    // socket stays plain TCP until keys are installed. So it comes before the secrets leave
    // rustls.
    if let Err(e) = ktls::enable_ulp(io.io.as_raw_fd()) {
        tracing::warn!(shard = ctx.shard, error = %e, "kTLS: the connection stays in userspace");
        return userspace(ctx, tls).await;
    }
    // Committed: an error from here on loses the connection.
    let result = offload(ctx, into_parts(tls), cipher).await;
    if result.is_err() {
        bump(&ctx.counters.ktls_failed);
    }
    result
}

/// The socket and the rustls connection of either end of a handshake.
fn into_parts(tls: tokio_rustls::TlsStream<HandshakeIo>) -> (HandshakeIo, rustls::Connection) {
    match tls {
        tokio_rustls::TlsStream::Client(s) => {
            let (io, conn) = s.into_inner();
            (io, conn.into())
        }
        tokio_rustls::TlsStream::Server(s) => {
            let (io, conn) = s.into_inner();
            (io, conn.into())
        }
    }
}

async fn userspace(
    ctx: &Rc<StreamCtx>,
    tls: tokio_rustls::TlsStream<HandshakeIo>,
) -> Result<Established, OffloadError> {
    let (hio, conn) = into_parts(tls);
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|s| Cipher::from_suite(s.suite()));
    if ctx.records == TlsRecords::Own && hio.cork.is_some() {
        if let Some(cipher) = cipher {
            let result = own_records(ctx, (hio, conn), cipher).await;
            if result.is_err() {
                bump(&ctx.counters.ktls_failed);
            }
            return result;
        }
    }
    // rustls rekeys by itself here: the secrets it logged are not needed.
    if let Some(random) = hio.client_random() {
        ktls::SecretLog::global().forget(&random);
    }
    in_userspace(ctx, hio, cipher, |sock, tick| {
        HboneIo::Rustls(RustlsIo::new(sock, RecordPump::new(conn), tick))
    })
}

/// A connection a userspace record layer carries from here on (`layer` makes it from the
/// socket and the tick its flushes wait for); counted. Past the handshake nothing reads
/// through the cork any more: the layer's driver reads the socket itself, off monoio's poll
/// I/O.
fn in_userspace(
    ctx: &StreamCtx,
    hio: HandshakeIo,
    cipher: Option<Cipher>,
    layer: impl FnOnce(monoio::net::TcpStream, Rc<FlushTick>) -> HboneIo,
) -> Result<Established, OffloadError> {
    let sock = hio
        .io
        .try_into_comp_io()
        .map_err(|(e, _)| OffloadError::PollMode(e))?;
    bump(&ctx.counters.userspace);
    let tick = Rc::new(FlushTick::default());
    Ok(Established {
        io: layer(sock, tick.clone()),
        tick,
        path: TlsPath::userspace(cipher),
        budget: None,
    })
}

/// rustls finished the handshake; ringtun's userspace record layer takes the connection on
/// with its keys, at the record boundary the cork kept.
async fn own_records(
    ctx: &Rc<StreamCtx>,
    parts: (HandshakeIo, rustls::Connection),
    cipher: Cipher,
) -> Result<Established, OffloadError> {
    let (hio, extracted, early, rekey) = take_over(ctx, parts, cipher).await?;
    let (tx_seq, tx) = &extracted.secrets.tx;
    let (rx_seq, rx) = &extracted.secrets.rx;
    let tx = ktls::RecordKeys::from_secrets(*tx_seq, tx)?;
    let rx = ktls::RecordKeys::from_secrets(*rx_seq, rx)?;
    in_userspace(ctx, hio, Some(cipher), |sock, tick| {
        HboneIo::Keys(KeysIo::new(sock, KeyPump::new(tx, rx, rekey, early), tick))
    })
}

async fn offload(
    ctx: &Rc<StreamCtx>,
    parts: (HandshakeIo, rustls::Connection),
    cipher: Cipher,
) -> Result<Established, OffloadError> {
    let (hio, extracted, early, rekey) = take_over(ctx, parts, cipher).await?;
    // 3. Keys into the kernel. The peer's record count goes on from where rustls left it.
    let rx_seq = extracted.secrets.rx.0;
    let off = ktls::enable(hio.io.as_raw_fd(), extracted.secrets)?;
    let c = &ctx.counters;
    if off.tx {
        bump(&c.ktls_tx);
    }
    if off.rx {
        bump(&c.ktls_rx);
    }
    tracing::debug!(
        shard = ctx.shard,
        peer = ?hio.io.peer_addr().ok(),
        %cipher,
        early = early.len(),
        "kTLS: HBONE connection offloaded"
    );
    let budget = Rc::new(KeyBudget::new(cipher, ctx.record_limits, rx_seq));
    // The traffic secrets follow the peer's KeyUpdates only where the kernel can (6.14+).
    let rekey = rekey.filter(|_| ctx.ktls.as_ref().is_some_and(|c| c.rekey));
    Ok(Established {
        io: HboneIo::Kernel(KtlsIo::new(
            ctx.clone(),
            hio.io,
            early,
            budget.clone(),
            rekey,
        )),
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

/// Steps 1 and 2 of taking the record layer over from rustls (for the kernel or ringtun's
/// own): the socket at a record boundary, the secrets, the plaintext rustls decrypted that
/// nobody read yet, and the traffic secrets the handshake logged (claimed here whether or not
/// the next layer can use them, so that the log does not keep them).
async fn take_over(
    ctx: &Rc<StreamCtx>,
    (mut hio, mut conn): (HandshakeIo, rustls::Connection),
    cipher: Cipher,
) -> Result<(HandshakeIo, ktls::Extracted, Vec<u8>, Option<ktls::Rekey>), OffloadError> {
    let mut early = Vec::new();
    // 1. The handshake may have stopped reading inside a record (tokio-rustls keeps reading
    //    after the handshake until the socket has nothing more). Read exactly the rest of it
    //    and let rustls decrypt it, so the kernel starts at a record boundary.
    let mut cork = hio.cork.take().unwrap_or_default();
    let mut chunk = Vec::new();
    if !cork.at_boundary() {
        tracing::debug!(
            shard = ctx.shard,
            missing = cork.max_read(),
            "taking over from rustls: finishing a record the handshake left half-read"
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
    let is_client = matches!(conn, rustls::Connection::Client(_));
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
    let rekey = hio
        .client_random()
        .and_then(|r| ktls::SecretLog::global().take(&r, cipher, is_client));
    Ok((hio, extracted, early, rekey))
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
