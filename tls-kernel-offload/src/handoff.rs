//! Taking a finished rustls connection apart for the kernel: reading the handshake without
//! over-reading, flushing, draining already-decrypted plaintext, extracting secrets.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::RawFd;

use rustls::{Connection, ExtractedSecrets, ProtocolVersion};

use crate::crypto_info::{enable_ulp, set_crypto_info, CryptoInfo};
use crate::{Cipher, Direction, KtlsError};

/// TLS record header: type (1), legacy version (2), length (2).
const RECORD_HEADER_LEN: usize = 5;

/// Tracks TLS record boundaries in a byte stream so a reader can stop exactly at the end
/// of a record.
///
/// Why: rustls buffers whatever it is given. If the handshake loop reads a chunk that
/// ends in the middle of the first post-handshake record, rustls keeps the partial record
/// in its private deframer buffer, where neither [`drain_and_extract`] nor the kernel can
/// reach it, and the stream is corrupt after offload. Reading at most
/// [`RecordBoundary::max_read`] bytes at a time (header, then body, record by record)
/// keeps every byte rustls sees inside whole records. This costs two reads per record
/// during the handshake only.
///
/// Pure state machine, so async callers (monoio, io_uring) size their own reads with it;
/// blocking callers use [`Corked`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordBoundary {
    header: [u8; RECORD_HEADER_LEN],
    header_len: usize,
    body_left: usize,
}

impl RecordBoundary {
    /// A tracker positioned at the start of a record.
    pub fn new() -> Self {
        Self::default()
    }

    /// The most bytes that may be read next without crossing a record boundary (never 0).
    pub fn max_read(&self) -> usize {
        if self.header_len < RECORD_HEADER_LEN {
            RECORD_HEADER_LEN - self.header_len
        } else {
            self.body_left
        }
    }

    /// Whether the bytes seen so far end exactly at a record boundary.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0
    }

    /// Accounts for bytes that were read (at most [`max_read`](Self::max_read) of them
    /// per call; extra bytes are accounted record by record anyway).
    pub fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.header_len < RECORD_HEADER_LEN {
                let take = (RECORD_HEADER_LEN - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
                self.header_len += take;
                data = &data[take..];
                if self.header_len == RECORD_HEADER_LEN {
                    self.body_left =
                        usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                    if self.body_left == 0 {
                        self.header_len = 0;
                    }
                }
            } else {
                let take = self.body_left.min(data.len());
                self.body_left -= take;
                data = &data[take..];
                if self.body_left == 0 {
                    self.header_len = 0;
                }
            }
        }
    }
}

/// A `Read + Write` wrapper for blocking sockets whose reads never cross a TLS record
/// boundary (see [`RecordBoundary`]). Use it as the I/O for the rustls handshake
/// (`conn.complete_io(&mut corked)`) when the connection will be offloaded.
#[derive(Debug)]
pub struct Corked<S> {
    inner: S,
    boundary: RecordBoundary,
}

impl<S> Corked<S> {
    /// Wraps a stream positioned at a record boundary (a fresh connection is).
    pub fn new(inner: S) -> Self {
        Corked {
            inner,
            boundary: RecordBoundary::new(),
        }
    }

    /// Whether everything read so far ended on a record boundary.
    pub fn at_boundary(&self) -> bool {
        self.boundary.at_boundary()
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped stream, mutably (for writes or socket options).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the stream.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Read> Read for Corked<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.boundary.max_read());
        let got = self.inner.read(&mut buf[..n])?;
        self.boundary.advance(&buf[..got]);
        Ok(got)
    }
}

impl<S: Write> Write for Corked<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What [`try_extract`] produced.
pub struct Extracted {
    /// The traffic secrets and record sequence numbers, for [`enable`].
    pub secrets: ExtractedSecrets,
    /// Application data rustls had already decrypted but the caller had not read. It
    /// comes *before* anything read from the socket after offload; deliver it first.
    pub plaintext: Vec<u8>,
    /// The negotiated cipher.
    pub cipher: Cipher,
}

impl fmt::Debug for Extracted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Extracted")
            .field("cipher", &self.cipher)
            .field("tx_seq", &self.secrets.tx.0)
            .field("rx_seq", &self.secrets.rx.0)
            .field("plaintext_len", &self.plaintext.len())
            .finish_non_exhaustive()
    }
}

/// Result of [`try_extract`].
pub enum Handoff {
    /// Secrets are out; the rustls connection is consumed.
    Ready(Extracted),
    /// rustls still has TLS records to send (e.g. session tickets, the client Finished).
    /// Write them to the socket (`conn.write_tls(..)` until `conn.wants_write()` is
    /// false, with the caller's own async I/O if need be), then call [`try_extract`]
    /// again with the connection handed back here.
    NeedsFlush(Box<Connection>),
}

impl fmt::Debug for Handoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Handoff::Ready(x) => f.debug_tuple("Ready").field(x).finish(),
            Handoff::NeedsFlush(_) => f.write_str("NeedsFlush(..)"),
        }
    }
}

/// Non-blocking-friendly extraction: never touches the socket.
///
/// Checks the handshake is complete and TLS 1.3 with an offloadable cipher; if rustls
/// still holds TLS output, hands the connection back as [`Handoff::NeedsFlush`];
/// otherwise drains the plaintext rustls already decrypted and extracts the secrets.
/// Errors before extraction leave nothing half done, but the connection is consumed;
/// check [`crate::Capability::can_offload_suite`] first if userspace fallback matters.
pub fn try_extract(conn: impl Into<Connection>) -> Result<Handoff, KtlsError> {
    let mut conn: Connection = conn.into();
    if conn.is_handshaking() {
        return Err(KtlsError::HandshakeIncomplete);
    }
    match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => {}
        v => return Err(KtlsError::NotTls13(format!("{v:?}"))),
    }
    let suite = conn
        .negotiated_cipher_suite()
        .ok_or(KtlsError::HandshakeIncomplete)?
        .suite();
    let cipher = Cipher::from_suite(suite)
        .ok_or_else(|| KtlsError::UnsupportedCipher(format!("{suite:?}")))?;
    if conn.wants_write() {
        return Ok(Handoff::NeedsFlush(Box::new(conn)));
    }
    let plaintext = drain_plaintext(&mut conn)?;
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(KtlsError::Extract)?;
    Ok(Handoff::Ready(Extracted {
        secrets,
        plaintext,
        cipher,
    }))
}

/// Reads out everything rustls decrypted but nobody read yet.
fn drain_plaintext(conn: &mut Connection) -> Result<Vec<u8>, KtlsError> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match conn.reader().read(&mut chunk) {
            // Ok(0): the peer sent close_notify; the kernel will then just see TCP EOF.
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            // Nothing (more) buffered.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(out),
            // TCP EOF without close_notify: what was buffered is still good.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(out),
            Err(e) => return Err(KtlsError::io("draining rustls plaintext", e)),
        }
    }
}

/// Blocking convenience: flushes pending TLS output to `sock`, drains the plaintext rustls
/// already decrypted, and extracts the secrets.
///
/// `sock` must be the connection's socket in blocking mode (a non-blocking one makes this
/// fail with `WouldBlock` part-way, and the connection is lost); async callers use
/// [`try_extract`] and flush with their own I/O.
pub fn drain_and_extract<W: Write>(
    conn: impl Into<Connection>,
    sock: &mut W,
) -> Result<Extracted, KtlsError> {
    let mut conn: Connection = conn.into();
    while conn.wants_write() {
        match conn.write_tls(sock) {
            Ok(0) => {
                return Err(KtlsError::io(
                    "flushing rustls output",
                    io::Error::from(io::ErrorKind::WriteZero),
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(KtlsError::io("flushing rustls output", e)),
        }
    }
    sock.flush()
        .map_err(|e| KtlsError::io("flushing rustls output", e))?;
    match try_extract(conn)? {
        Handoff::Ready(x) => Ok(x),
        Handoff::NeedsFlush(_) => Err(KtlsError::PendingTlsOutput),
    }
}

/// What [`enable`] switched on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloaded {
    /// The kernel encrypts what is written to the socket.
    pub tx: bool,
    /// The kernel decrypts what is read from the socket.
    pub rx: bool,
    /// The cipher in use.
    pub cipher: Cipher,
}

/// Moves the record layer of a TLS 1.3 connection into the kernel: attaches the `tls`
/// ULP (if not yet attached, see [`enable_ulp`]), then installs TX and RX keys.
///
/// `fd` is the connected TCP socket the secrets belong to; from now on plain
/// `write`/`send` on it send application data records, and reads go through
/// [`crate::recv_record`] / [`crate::recv_data`] (a plain `read` works too, but fails
/// with `EIO` when a non-data record, such as a session ticket, arrives).
///
/// Both directions or an error: rustls gave up the secrets, so on error the connection
/// cannot continue in userspace either — close it.
pub fn enable(fd: RawFd, secrets: ExtractedSecrets) -> Result<Offloaded, KtlsError> {
    let (tx_seq, tx) = &secrets.tx;
    let (rx_seq, rx) = &secrets.rx;
    let tx_info = CryptoInfo::from_secrets(*tx_seq, tx)?;
    let rx_info = CryptoInfo::from_secrets(*rx_seq, rx)?;
    let cipher = tx_info.cipher();
    enable_ulp(fd)?;
    set_crypto_info(fd, Direction::Tx, &tx_info).map_err(|source| KtlsError::CryptoRejected {
        direction: Direction::Tx,
        cipher,
        source,
    })?;
    set_crypto_info(fd, Direction::Rx, &rx_info).map_err(|source| KtlsError::CryptoRejected {
        direction: Direction::Rx,
        cipher: rx_info.cipher(),
        source,
    })?;
    tracing::debug!(fd, %cipher, tx_seq, rx_seq, "kTLS enabled");
    Ok(Offloaded {
        tx: true,
        rx: true,
        cipher,
    })
}

/// [`drain_and_extract`] then [`enable`] on a blocking socket: returns what was switched
/// on and the already-decrypted plaintext to deliver before reading from the socket.
///
/// `conn` is consumed even on error; callers that want to fall back to userspace rustls
/// check [`crate::Capability::can_offload_suite`] and call [`enable_ulp`] before this.
pub fn offload<S: Write + std::os::fd::AsRawFd>(
    conn: impl Into<Connection>,
    sock: &mut S,
) -> Result<(Offloaded, Vec<u8>), KtlsError> {
    let fd = sock.as_raw_fd();
    // Fail before the secrets leave rustls when the kernel has no TLS ULP at all.
    enable_ulp(fd)?;
    let x = drain_and_extract(conn, sock)?;
    let off = enable(fd, x.secrets)?;
    Ok((off, x.plaintext))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ty: u8, body_len: usize) -> Vec<u8> {
        let mut r = vec![ty, 3, 3];
        r.extend_from_slice(&(body_len as u16).to_be_bytes());
        r.resize(r.len() + body_len, 0xee);
        r
    }

    #[test]
    fn boundary_walks_records() {
        let mut b = RecordBoundary::new();
        assert_eq!(b.max_read(), 5);
        b.advance(&[23, 3, 3]);
        assert_eq!(b.max_read(), 2);
        assert!(!b.at_boundary());
        b.advance(&[0x01, 0x00]);
        assert_eq!(b.max_read(), 256);
        b.advance(&[0; 200]);
        assert_eq!(b.max_read(), 56);
        b.advance(&[0; 56]);
        assert!(b.at_boundary());
        assert_eq!(b.max_read(), 5);
    }

    #[test]
    fn boundary_handles_empty_records_and_bulk_advance() {
        let mut stream = record(22, 0);
        stream.extend(record(23, 3));
        stream.extend(record(21, 2));
        let mut b = RecordBoundary::new();
        b.advance(&stream);
        assert!(b.at_boundary());
        b.advance(&stream[..stream.len() - 1]);
        assert_eq!(b.max_read(), 1);
    }

    #[test]
    fn corked_never_reads_past_a_record() {
        let mut stream = record(22, 10);
        stream.extend(record(23, 40_000 % 16_384));
        let second_start = 15;
        let mut c = Corked::new(io::Cursor::new(stream.clone()));
        let mut buf = [0u8; 4096];
        let mut total = 0;
        let mut reads = Vec::new();
        loop {
            let n = c.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            reads.push(n);
            total += n;
            // A read that starts in the first record never reaches into the second.
            assert!(
                total <= second_start || total - n >= second_start,
                "{reads:?}"
            );
        }
        assert_eq!(total, stream.len());
        assert!(c.at_boundary());
        assert_eq!(&reads[..2], &[5, 10]);
    }
}
