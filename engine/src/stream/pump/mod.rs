//! The userspace record layers as state machines without I/O: ciphertext in, plaintext out;
//! plaintext in, ciphertext out; and the decisions about when ciphertext should go.
//!
//! | file         | what                                                                   |
//! |--------------|------------------------------------------------------------------------|
//! | `records.rs` | [`Records`]: what a layer is to its driver; the flush decisions shared |
//! | `mod.rs`     | [`RecordPump`]: rustls' buffered connection throughout                  |
//! | `keys.rs`    | [`KeyPump`]: ringtun's records over the keys rustls derived (default)   |
//!
//! A layer owns the ciphertext read from the socket but not yet decrypted, and what it
//! sealed for the socket. It never touches a socket or a waker: its driver
//! ([`super::UserspaceIo`]) reads the socket into [`Records::input_buffer`], hands its writes
//! to [`Records::transmit`], and does what each call's answer says (read the socket, wait for
//! room, poll once more). So the whole record logic (records split anywhere, partial socket
//! writes, close_notify, corrupt input) is tested against a real rustls peer in memory, and
//! fuzzed, for both layers.

use std::io::{self, BufRead as _, Write as _};
use std::mem::MaybeUninit;

use tokio::io::ReadBuf;

pub use keys::{KeyPump, TX_REKEY_AT};
use records::Deferral;
pub use records::{
    drop_spare_read_buffers, Flush, Read, ReadError, Records, Transmit, Write, EAGER_WRITE,
    READ_CHUNK, SEND_LIMIT,
};

mod keys;
#[cfg(test)]
mod pair;
mod records;
#[cfg(test)]
mod script;
#[cfg(test)]
mod tests;

/// One HBONE connection's userspace TLS record layer after the handshake, on rustls.
pub struct RecordPump {
    conn: rustls::Connection,
    /// Ciphertext read from the socket; `rbuf[rpos..]` is not yet handed to rustls.
    rbuf: Vec<u8>,
    rpos: usize,
    /// The socket reported end of stream.
    eof: bool,
    /// close_notify queued.
    closing: bool,
    deferral: Deferral,
}

impl std::fmt::Debug for RecordPump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordPump")
            .field("buffered_in", &self.buffered_input())
            .field("unflushed", &self.deferral.unflushed)
            .field("eof", &self.eof)
            .field("closing", &self.closing)
            .finish_non_exhaustive()
    }
}

impl RecordPump {
    /// Takes over a connection whose handshake is done.
    pub fn new(mut conn: rustls::Connection) -> Self {
        conn.set_buffer_limit(Some(SEND_LIMIT));
        RecordPump {
            conn,
            rbuf: Vec::new(),
            rpos: 0,
            eof: false,
            closing: false,
            deferral: Deferral::default(),
        }
    }

    /// Hands rustls the next piece of buffered ciphertext and lets it decrypt what is
    /// complete. rustls takes at most 4 KiB per call, from memory that is cheap; the syscall
    /// was the expensive part.
    fn feed(&mut self) -> Result<(), ReadError> {
        let mut rest = &self.rbuf[self.rpos..];
        let n = self.conn.read_tls(&mut rest).map_err(ReadError::plain)?;
        self.rpos += n;
        if self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
        }
        self.conn.process_new_packets().map_err(|e| ReadError {
            error: io::Error::new(io::ErrorKind::InvalidData, e),
            alert: true,
        })?;
        Ok(())
    }
}

impl Records for RecordPump {
    fn buffered_input(&self) -> usize {
        self.rbuf.len() - self.rpos
    }

    fn unflushed(&self) -> usize {
        self.deferral.unflushed
    }

    fn is_eof(&self) -> bool {
        self.eof
    }

    fn input_buffer(&mut self) -> &mut [MaybeUninit<u8>] {
        if self.rbuf.capacity() == 0 {
            self.rbuf = records::take_read_buffer();
        }
        if self.rbuf.capacity() < READ_CHUNK {
            self.rbuf.reserve_exact(READ_CHUNK);
        }
        self.rbuf.spare_capacity_mut()
    }

    unsafe fn input_received(&mut self, n: usize) {
        // SAFETY: the caller initialised them (the trait's contract).
        unsafe { records::filled(&mut self.rbuf, n) };
    }

    fn receive(&mut self, bytes: &[u8]) {
        self.rbuf.extend_from_slice(bytes);
    }

    fn input_ended(&mut self) {
        self.eof = true;
    }

    fn release_idle_input(&mut self) {
        if self.rbuf.is_empty() {
            records::give_back_read_buffer(std::mem::take(&mut self.rbuf));
        }
    }

    fn read(&mut self, buf: &mut ReadBuf<'_>) -> Result<Read, ReadError> {
        let start = buf.filled().len();
        let done = |buf: &ReadBuf<'_>| Ok(Read::Data(buf.filled().len() - start));
        loop {
            // Plaintext rustls already has goes first, straight into the caller's buffer.
            loop {
                if buf.remaining() == 0 {
                    return done(buf);
                }
                match self.conn.reader().into_first_chunk() {
                    // close_notify: end of stream once everything before it is delivered.
                    Ok([]) if buf.filled().len() > start => return done(buf),
                    Ok([]) => return Ok(Read::Eof),
                    Ok(chunk) => {
                        let n = chunk.len().min(buf.remaining());
                        buf.put_slice(&chunk[..n]);
                        self.conn.reader().consume(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // TCP end of stream without close_notify: deliver what came before it
                    // first, then the error.
                    Err(_) if buf.filled().len() > start => return done(buf),
                    Err(e) => return Err(ReadError::plain(e)),
                }
            }
            if self.rpos < self.rbuf.len() {
                self.feed()?;
                continue;
            }
            if self.eof {
                // Tell rustls (it then reports a missing close_notify as UnexpectedEof).
                self.conn
                    .read_tls(&mut io::empty())
                    .map_err(ReadError::plain)?;
                self.conn
                    .process_new_packets()
                    .map_err(|e| ReadError::plain(io::Error::new(io::ErrorKind::InvalidData, e)))?;
                if buf.filled().len() > start {
                    return done(buf);
                }
                continue;
            }
            if buf.filled().len() > start {
                // The reader has something to chew on; the next read comes back for more.
                return done(buf);
            }
            return Ok(Read::NeedInput);
        }
    }

    fn write(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<Write> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(Write::Accepted {
                n: 0,
                transmit_now: false,
            });
        }
        let n = self.conn.writer().write_vectored(bufs)?;
        if n == 0 {
            return Ok(Write::Full);
        }
        Ok(Write::Accepted {
            n,
            transmit_now: self.deferral.accepted(n),
        })
    }

    fn flush(&mut self, tick: Option<u32>) -> Flush {
        self.deferral.flush(tick, self.conn.wants_write())
    }

    fn flush_due(&self, now: u32) -> bool {
        self.deferral.due(now)
    }

    fn transmit(&mut self, out: &mut dyn io::Write) -> io::Result<Transmit> {
        if !self.conn.wants_write() {
            self.deferral.sent_all();
            return Ok(Transmit::Done);
        }
        match self.conn.write_tls(out)? {
            0 => Err(io::ErrorKind::WriteZero.into()),
            n => Ok(Transmit::Sent(n)),
        }
    }

    fn close(&mut self) {
        if !self.closing {
            self.closing = true;
            self.conn.send_close_notify();
        }
    }
}
