//! The one stream type h2 sees, whichever record layer carries the connection.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{KeysIo, KtlsIo, RustlsIo};

/// The stream h2 runs on for one HBONE connection.
// The rustls variant is large, but boxing it would add an indirection to every read and write
// of the userspace path, which is the one without kernel help.
#[allow(clippy::large_enum_variant)]
pub enum HboneIo {
    /// Userspace rustls.
    Rustls(RustlsIo),
    /// ringtun's userspace record layer over rustls' keys.
    Keys(KeysIo),
    /// Kernel TLS.
    Kernel(KtlsIo),
}

impl fmt::Debug for HboneIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HboneIo::Rustls(_) => f.write_str("HboneIo::Rustls"),
            HboneIo::Keys(_) => f.write_str("HboneIo::Keys"),
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
            HboneIo::Keys(s) => Pin::new(s).poll_read(cx, buf),
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
            HboneIo::Keys(s) => Pin::new(s).poll_write(cx, buf),
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
            HboneIo::Keys(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            HboneIo::Kernel(k) => Pin::new(k).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            HboneIo::Rustls(s) => s.is_write_vectored(),
            HboneIo::Keys(s) => s.is_write_vectored(),
            HboneIo::Kernel(k) => k.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HboneIo::Rustls(s) => Pin::new(s).poll_flush(cx),
            HboneIo::Keys(s) => Pin::new(s).poll_flush(cx),
            HboneIo::Kernel(k) => Pin::new(k).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HboneIo::Rustls(s) => Pin::new(s).poll_shutdown(cx),
            HboneIo::Keys(s) => Pin::new(s).poll_shutdown(cx),
            HboneIo::Kernel(k) => Pin::new(k).poll_shutdown(cx),
        }
    }
}
