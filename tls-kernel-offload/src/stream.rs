//! A blocking `Read + Write` view of an offloaded socket, for std-socket users and tests.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use crate::record::{recv_data, send_close_notify};

/// An offloaded socket as `Read + Write`: reads go through [`recv_data`] after first
/// returning the plaintext rustls had already decrypted; writes go straight to the socket
/// (the kernel encrypts them).
///
/// Errors from [`recv_data`] surface as `io::Error`s wrapping the
/// [`crate::KtlsError`] (get it back with `into_inner` and `downcast`).
#[derive(Debug)]
pub struct KtlsStream<S> {
    inner: S,
    pending: Vec<u8>,
    pending_pos: usize,
}

impl<S: AsRawFd> KtlsStream<S> {
    /// Wraps an offloaded socket; `early_plaintext` is what [`crate::offload`] /
    /// [`crate::drain_and_extract`] returned, delivered before socket data.
    pub fn new(inner: S, early_plaintext: Vec<u8>) -> Self {
        KtlsStream {
            inner,
            pending: early_plaintext,
            pending_pos: 0,
        }
    }

    /// Sends close_notify through the kernel (the TLS end of our sending side).
    pub fn send_close_notify(&self) -> io::Result<()> {
        send_close_notify(self.inner.as_raw_fd())
    }

    /// The socket.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The socket, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the socket, dropping undelivered early plaintext.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsRawFd> AsRawFd for KtlsStream<S> {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl<S: AsRawFd> Read for KtlsStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pending_pos < self.pending.len() {
            let n = buf.len().min(self.pending.len() - self.pending_pos);
            buf[..n].copy_from_slice(&self.pending[self.pending_pos..self.pending_pos + n]);
            self.pending_pos += n;
            if self.pending_pos == self.pending.len() {
                self.pending = Vec::new();
                self.pending_pos = 0;
            }
            return Ok(n);
        }
        Ok(recv_data(self.inner.as_raw_fd(), buf)?)
    }
}

impl<S: Write> Write for KtlsStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
