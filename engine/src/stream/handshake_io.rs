//! The socket under the TLS handshake, corked at TLS record boundaries when kTLS may follow.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use monoio::net::tcp::stream_poll::TcpStreamPoll;
use tls_kernel_offload::RecordBoundary;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The socket under the TLS handshake.
///
/// Corked (when kTLS may follow), reads never cross a TLS record boundary, so that after the
/// handshake rustls holds no fragment of a record and the kernel can take over exactly at
/// the next record. That costs two reads per record during the handshake; connections that
/// stay on rustls leave the wrapper behind afterwards ([`super::RustlsIo`] reads the socket
/// itself), and with kTLS off or unavailable the wrapper never corks at all.
#[derive(Debug)]
pub struct HandshakeIo {
    pub(super) io: TcpStreamPoll,
    pub(super) cork: Option<RecordBoundary>,
    /// The first bytes read and written while corked: one of them starts with the
    /// ClientHello, whose random names the connection's secrets in the kTLS key log
    /// (`tls_kernel_offload::SecretLog`).
    hello: Option<Box<FirstBytes>>,
}

/// Up to [`HELLO_PREFIX`] bytes each way.
#[derive(Debug, Default)]
struct FirstBytes {
    read: Vec<u8>,
    written: Vec<u8>,
}

/// Record header, handshake header, version and the 32-byte random.
const HELLO_PREFIX: usize = 43;

fn keep_first(into: &mut Vec<u8>, bytes: &[u8]) {
    let room = HELLO_PREFIX.saturating_sub(into.len());
    into.extend_from_slice(&bytes[..room.min(bytes.len())]);
}

impl HandshakeIo {
    /// Wraps a socket at the start of a TLS connection.
    pub fn new(io: TcpStreamPoll, corked: bool) -> Self {
        HandshakeIo {
            io,
            cork: corked.then(RecordBoundary::new),
            // Always: a connection that stays on rustls' records tells the key log to forget
            // its secrets by this random.
            hello: Some(Box::default()),
        }
    }

    /// The ClientHello's random, from whichever direction carried it.
    pub(super) fn client_random(&self) -> Option<[u8; 32]> {
        let h = self.hello.as_ref()?;
        tls_kernel_offload::client_random(&h.written)
            .or_else(|| tls_kernel_offload::client_random(&h.read))
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
        if let Some(h) = this.hello.as_mut() {
            keep_first(&mut h.read, part.filled());
        }
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
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        if let Some(h) = this.hello.as_mut() {
            keep_first(&mut h.written, &buf[..n]);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        if let Some(h) = this.hello.as_mut() {
            let mut left = n;
            for b in bufs {
                if left == 0 || h.written.len() >= HELLO_PREFIX {
                    break;
                }
                let k = left.min(b.len());
                keep_first(&mut h.written, &b[..k]);
                left -= k;
            }
        }
        Poll::Ready(Ok(n))
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
