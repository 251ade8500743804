//! What a userspace record layer is to its driver, whichever it is: the [`Records`]
//! operations, their answers, and the flush decisions both layers share.

use std::cell::RefCell;
use std::io;
use std::mem::MaybeUninit;

use tokio::io::ReadBuf;

/// Bytes asked of the socket per read: 64 KiB is four full TLS records, so a bulk transfer
/// makes one read syscall per four records instead of rustls' own 4 KiB reads (four syscalls
/// per record).
pub const READ_CHUNK: usize = 64 * 1024;

/// Read buffers a shard keeps after their connections drained them, at most.
///
/// A layer gives its read buffer back whenever the socket runs dry, so that an idle connection
/// pins none (see [`Records::release_idle_input`]); on a connection with a message now and then
/// that was a 64 KiB allocation and its free for every message, about 250 instructions a
/// request on each side (round 21 of `benches/`). Two spares cover the busy connections of a
/// shard that are between two reads at once, and hold 256 KiB at the most (each is 64 KiB to
/// twice that).
const SPARE_READ_BUFFERS: usize = 2;

thread_local! {
    /// This shard's spare read buffers (a shard is one thread), empty, each of
    /// [`READ_CHUNK`] to twice that.
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty read buffer with room for [`READ_CHUNK`]: one this shard kept, or a new one.
pub(super) fn take_read_buffer() -> Vec<u8> {
    SPARE
        .try_with(|s| s.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| Vec::with_capacity(READ_CHUNK))
}

/// Keeps a drained read buffer for this shard's next read, if there is room; frees it
/// otherwise (and frees buffers a bulk transfer grew past twice [`READ_CHUNK`]).
pub(super) fn give_back_read_buffer(mut buf: Vec<u8>) {
    let cap = buf.capacity();
    if !(READ_CHUNK..=2 * READ_CHUNK).contains(&cap) {
        return;
    }
    buf.clear();
    let _ = SPARE.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARE_READ_BUFFERS {
            s.push(buf);
        }
    });
}

/// How many read buffers this shard keeps right now.
#[cfg(test)]
pub(super) fn spare_read_buffers() -> usize {
    SPARE.with(|s| s.borrow().len())
}

/// Frees this shard's spare read buffers. The idle sweep calls it before it hands freed
/// memory back to the OS (connections went quiet) and when it stops (none left to watch); an
/// HBONE connection that drains after that leaves its buffer here until the shard's next
/// traffic, two of them at most (256 KiB).
pub fn drop_spare_read_buffers() {
    let _ = SPARE.try_with(|s| std::mem::take(&mut *s.borrow_mut()));
}

/// Encrypted bytes a layer may hold for the socket before a write must wait for a flush; also
/// about the most one `writev` sends (rustls hands out at most 64 records per call).
pub const SEND_LIMIT: usize = 512 * 1024;

/// Encrypted bytes buffered since the last flush past which a write goes to the socket at
/// once, without waiting for h2's flush: big enough to batch a 256 KiB DATA frame into one
/// `writev`, small enough that bulk data starts moving before the send limit stalls h2.
pub const EAGER_WRITE: usize = 256 * 1024;

/// A userspace TLS record layer without I/O, as its driver ([`super::UserspaceIo`]) sees it:
/// rustls' own ([`RecordPump`]) or ringtun's over the keys rustls derived ([`KeyPump`]).
pub trait Records {
    /// Ciphertext received and not yet handed on.
    fn buffered_input(&self) -> usize;
    /// Plaintext accepted since the last complete transmit.
    fn unflushed(&self) -> usize;
    /// Whether the socket's end of stream was handed in.
    fn is_eof(&self) -> bool;
    /// Room for the next socket read (at least [`READ_CHUNK`]); say how much arrived with
    /// [`Records::input_received`]. Asked for only after [`Read::NeedInput`].
    fn input_buffer(&mut self) -> &mut [MaybeUninit<u8>];
    /// `n` bytes of ciphertext arrived at the front of [`Records::input_buffer`].
    ///
    /// # Safety
    ///
    /// The first `n` bytes of the slice the last `input_buffer` call returned must have been
    /// initialised since (by the socket read), and no other call came in between.
    unsafe fn input_received(&mut self, n: usize);
    /// Ciphertext that arrived (a copy; the driver reads into [`Records::input_buffer`]
    /// instead).
    fn receive(&mut self, bytes: &[u8]);
    /// The socket reached end of stream: reads end once what came before is delivered
    /// (with `UnexpectedEof` if the peer sent no close_notify).
    fn input_ended(&mut self);
    /// Gives the input buffer back when it holds nothing, so an idle connection does not pin
    /// it for its whole life; the driver calls this before it waits for the socket.
    fn release_idle_input(&mut self);
    /// Delivers plaintext into `buf`, decrypting buffered ciphertext as needed.
    fn read(&mut self, buf: &mut ReadBuf<'_>) -> Result<Read, ReadError>;
    /// Encrypts plaintext into the send buffer (records span the slices, so a frame head and
    /// its payload share one record), up to [`SEND_LIMIT`].
    fn write(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<Write>;
    /// The writer asked for a flush. `tick`: the driving task's tick number when it polls
    /// through a [`super::FlushTick`] (flushes may then wait for the next tick), `None`
    /// when every flush should transmit at once.
    fn flush(&mut self, tick: Option<u32>) -> Flush;
    /// Whether a flush deferred in an earlier tick is due now, in tick `now` of the driving
    /// task.
    fn flush_due(&self, now: u32) -> bool;
    /// Writes the next piece of ciphertext into `out` (the socket: a `WouldBlock` from it is
    /// passed on, and the call repeated once there is room).
    fn transmit(&mut self, out: &mut dyn io::Write) -> io::Result<Transmit>;
    /// Queues close_notify (once); transmit it, then shut the socket's sending side.
    fn close(&mut self);
}

/// When accepted plaintext should go to the socket: at once past [`EAGER_WRITE`], else at
/// the flush h2 asks for, deferred to the driving task's next tick (both layers decide the
/// same way).
#[derive(Debug, Default)]
pub(super) struct Deferral {
    /// Plaintext bytes accepted since the last complete transmit.
    pub(super) unflushed: usize,
    /// The tick of the driving task in which a flush was deferred.
    deferred: Option<u32>,
}

impl Deferral {
    /// `n` more bytes were accepted: whether to transmit before returning to the writer.
    pub(super) fn accepted(&mut self, n: usize) -> bool {
        self.unflushed += n;
        self.unflushed >= EAGER_WRITE
    }

    /// The writer asked for a flush while `wants_write` bytes wait for the socket.
    pub(super) fn flush(&mut self, tick: Option<u32>, wants_write: bool) -> Flush {
        let Some(now) = tick.filter(|_| wants_write) else {
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

    pub(super) fn due(&self, now: u32) -> bool {
        matches!(self.deferred, Some(p) if p != now)
    }

    /// Everything accepted is on its way.
    pub(super) fn sent_all(&mut self) {
        self.unflushed = 0;
        self.deferred = None;
    }
}

/// What [`Records::read`] did.
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
    pub(super) fn plain(error: io::Error) -> Self {
        ReadError {
            error,
            alert: false,
        }
    }
}

/// What [`Records::write`] did.
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

/// What [`Records::flush`] decided.
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

/// What [`Records::transmit`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Transmit {
    /// This many ciphertext bytes went to the writer; more may be waiting.
    Sent(usize),
    /// Nothing (more) to send: everything written so far is on its way.
    Done,
}

/// Marks `n` more bytes of `buf`'s spare capacity as filled: what both layers' `input_received`
/// does with their input buffer.
///
/// # Safety
///
/// The first `n` bytes of `buf`'s spare capacity must have been initialised.
pub(super) unsafe fn filled(buf: &mut Vec<u8>, n: usize) {
    let len = buf.len();
    debug_assert!(n <= buf.capacity() - len);
    // SAFETY: the caller initialised these bytes of the spare capacity.
    unsafe { buf.set_len(len + n) };
}
