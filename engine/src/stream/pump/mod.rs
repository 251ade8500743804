//! The userspace record layer as a state machine without I/O: ciphertext in, plaintext out;
//! plaintext in, ciphertext out; and the decisions about when ciphertext should go.
//!
//! [`RecordPump`] owns the rustls connection and the ciphertext read from the socket but not
//! yet decrypted. It never touches a socket or a waker: its driver ([`super::RustlsIo`]) reads
//! the socket into [`RecordPump::input_buffer`], hands its writes to [`RecordPump::transmit`],
//! and does what each call's answer says (read the socket, wait for room, poll once more).
//! So the whole record logic (records split anywhere, partial socket writes, close_notify,
//! corrupt input) is tested with two in-memory rustls connections, and fuzzed.

use std::io::{self, BufRead as _, Write as _};
use std::mem::MaybeUninit;

use tokio::io::ReadBuf;

#[cfg(test)]
mod pair;
#[cfg(test)]
mod script;
#[cfg(test)]
mod tests;

/// Bytes asked of the socket per read: 64 KiB is four full TLS records, so a bulk transfer
/// makes one read syscall per four records instead of rustls' own 4 KiB reads (four syscalls
/// per record).
pub const READ_CHUNK: usize = 64 * 1024;

/// Encrypted bytes rustls may hold for the socket before a write must wait for a flush; also
/// the most one `writev` sends (rustls hands out at most 64 records per call).
pub const SEND_LIMIT: usize = 512 * 1024;

/// Encrypted bytes buffered since the last flush past which a write goes to the socket at
/// once, without waiting for h2's flush: big enough to batch a 256 KiB DATA frame into one
/// `writev`, small enough that bulk data starts moving before the send limit stalls h2.
pub const EAGER_WRITE: usize = 256 * 1024;

/// One HBONE connection's userspace TLS record layer after the handshake.
pub struct RecordPump {
    conn: rustls::Connection,
    /// Ciphertext read from the socket; `rbuf[rpos..]` is not yet handed to rustls.
    rbuf: Vec<u8>,
    rpos: usize,
    /// The socket reported end of stream.
    eof: bool,
    /// Plaintext bytes accepted since the last complete transmit.
    unflushed: usize,
    /// close_notify queued.
    closing: bool,
    /// The poll of the driving task in which a flush was deferred (see [`RecordPump::flush`]).
    deferred: Option<u32>,
}

/// What [`RecordPump::read`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// This many plaintext bytes went into the caller's buffer (none when it had no room).
    Data(usize),
    /// End of stream: the peer's close_notify, after everything it sent before it.
    Eof,
    /// Nothing to deliver until more ciphertext arrives: read the socket, hand the bytes in
    /// (or [`RecordPump::input_ended`]), and read again.
    NeedInput,
}

/// A read that failed.
#[derive(Debug)]
pub struct ReadError {
    /// What h2 is told.
    pub error: io::Error,
    /// rustls rejected the peer's records and queued an alert saying why: worth one attempt
    /// to [`RecordPump::transmit`] before the connection is dropped.
    pub alert: bool,
}

impl ReadError {
    fn plain(error: io::Error) -> Self {
        ReadError {
            error,
            alert: false,
        }
    }
}

/// What [`RecordPump::write`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Write {
    /// `n` plaintext bytes were taken (encrypted into the send buffer). `transmit_now`:
    /// enough is waiting ([`EAGER_WRITE`]) that it should go to the socket without waiting
    /// for a flush.
    Accepted {
        /// Bytes taken.
        n: usize,
        /// Transmit before returning to the writer.
        transmit_now: bool,
    },
    /// The send buffer is full ([`SEND_LIMIT`]): transmit, then write again.
    Full,
}

/// What [`RecordPump::flush`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Flush {
    /// Transmit everything now.
    Now,
    /// Leave the bytes for a later poll of the driving task. `repoll`: the deferral is new
    /// in this poll, so the task must be polled once more (see [`super::FlushTick`]).
    Later {
        /// Have the driving task polled again.
        repoll: bool,
    },
}

/// What [`RecordPump::transmit`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Transmit {
    /// This many ciphertext bytes went to the writer; more may be waiting.
    Sent(usize),
    /// Nothing (more) to send: everything written so far is on its way.
    Done,
}

impl std::fmt::Debug for RecordPump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordPump")
            .field("buffered_in", &self.buffered_input())
            .field("unflushed", &self.unflushed)
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
            unflushed: 0,
            closing: false,
            deferred: None,
        }
    }

    /// Ciphertext received and not yet handed to rustls.
    pub fn buffered_input(&self) -> usize {
        self.rbuf.len() - self.rpos
    }

    /// Plaintext accepted since the last complete transmit.
    pub fn unflushed(&self) -> usize {
        self.unflushed
    }

    /// Whether the socket's end of stream was handed in.
    pub fn is_eof(&self) -> bool {
        self.eof
    }

    /// Room for the next socket read (at least [`READ_CHUNK`] once the buffer is empty); say
    /// how much arrived with [`RecordPump::input_received`].
    pub fn input_buffer(&mut self) -> &mut [MaybeUninit<u8>] {
        if self.rbuf.capacity() < READ_CHUNK {
            self.rbuf.reserve_exact(READ_CHUNK);
        }
        self.rbuf.spare_capacity_mut()
    }

    /// `n` bytes of ciphertext arrived at the front of [`RecordPump::input_buffer`].
    ///
    /// # Safety
    ///
    /// The first `n` bytes of the slice the last `input_buffer` call returned must have been
    /// initialised since (by the socket read), and no other call came in between.
    pub unsafe fn input_received(&mut self, n: usize) {
        let len = self.rbuf.len();
        debug_assert!(n <= self.rbuf.capacity() - len);
        // SAFETY: the caller initialised these bytes of the spare capacity.
        unsafe { self.rbuf.set_len(len + n) };
    }

    /// Ciphertext that arrived (a copy; the driver reads into [`RecordPump::input_buffer`]
    /// instead).
    pub fn receive(&mut self, bytes: &[u8]) {
        self.rbuf.extend_from_slice(bytes);
    }

    /// The socket reached end of stream: reads end once what came before is delivered
    /// (with `UnexpectedEof` if the peer sent no close_notify).
    pub fn input_ended(&mut self) {
        self.eof = true;
    }

    /// Gives the input buffer back when it holds nothing, so an idle connection does not pin
    /// it for its whole life; the driver calls this before it waits for the socket.
    pub fn release_idle_input(&mut self) {
        if self.rbuf.is_empty() {
            self.rbuf = Vec::new();
        }
    }

    /// Delivers plaintext into `buf`, decrypting buffered ciphertext as needed.
    pub fn read(&mut self, buf: &mut ReadBuf<'_>) -> Result<Read, ReadError> {
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

    /// Encrypts plaintext into the send buffer (records span the slices, so a frame head and
    /// its payload share one record), up to [`SEND_LIMIT`].
    pub fn write(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<Write> {
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
        self.unflushed += n;
        Ok(Write::Accepted {
            n,
            transmit_now: self.unflushed >= EAGER_WRITE,
        })
    }

    /// The writer asked for a flush. `tick`: the driving task's poll number when it polls
    /// through a [`super::FlushTick`] (flushes may then wait for the end of the tick), `None`
    /// when every flush should transmit at once.
    pub fn flush(&mut self, tick: Option<u32>) -> Flush {
        let Some(now) = tick.filter(|_| self.conn.wants_write()) else {
            return Flush::Now;
        };
        match self.deferred {
            None => {
                self.deferred = Some(now);
                Flush::Later { repoll: true }
            }
            Some(p) if p == now => Flush::Later { repoll: false },
            Some(_) => Flush::Now,
        }
    }

    /// Whether a flush deferred in an earlier poll is due now, in poll `now` of the driving
    /// task.
    pub fn flush_due(&self, now: u32) -> bool {
        matches!(self.deferred, Some(p) if p != now)
    }

    /// Writes the next piece of ciphertext into `out` (the socket: a `WouldBlock` from it is
    /// passed on, and the call repeated once there is room).
    pub fn transmit(&mut self, out: &mut dyn io::Write) -> io::Result<Transmit> {
        if !self.conn.wants_write() {
            self.unflushed = 0;
            self.deferred = None;
            return Ok(Transmit::Done);
        }
        match self.conn.write_tls(out)? {
            0 => Err(io::ErrorKind::WriteZero.into()),
            n => Ok(Transmit::Sent(n)),
        }
    }

    /// Queues close_notify (once); transmit it, then shut the socket's sending side.
    pub fn close(&mut self) {
        if !self.closing {
            self.closing = true;
            self.conn.send_close_notify();
        }
    }
}
