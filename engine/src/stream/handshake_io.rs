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
}

impl HandshakeIo {
    /// Wraps a socket at the start of a TLS connection.
    pub fn new(io: TcpStreamPoll, corked: bool) -> Self {
        HandshakeIo {
            io,
            cork: corked.then(RecordBoundary::new),
        }
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
