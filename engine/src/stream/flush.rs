//! Batching the userspace path's writes across the streams of one shard tick.

use std::cell::Cell;
use std::task::{Context, Poll};

/// Lets an HBONE connection's writes wait for the end of a shard tick, so that frames from
/// every stream that became ready in the same tick leave in one record batch and one `writev`.
///
/// h2 flushes its I/O after every DATA frame it sends without copying (payloads over 256
/// bytes) and at the end of every poll; with sixteen streams each sending a small request, that
/// was one `writev` per request although all sixteen were ready at once. The task that drives
/// the h2 connection polls it through [`FlushTick::poll`], which numbers its polls; a flush
/// during a poll only marks the bytes due and has the task polled once more after the other
/// ready tasks of this tick, and the next poll writes them (at its first read or flush).
/// Until a driver polls through it (the h2 handshake), flushes write at once. The decision
/// itself is the record pump's ([`super::pump::RecordPump::flush`]).
#[derive(Debug, Default)]
pub struct FlushTick {
    /// A driver polls through [`FlushTick::poll`]: flushes may be deferred.
    armed: Cell<bool>,
    /// Which poll of the driving task this is.
    poll: Cell<u32>,
    /// A flush was deferred during this poll: poll the task once more.
    repoll: Cell<bool>,
}

impl FlushTick {
    /// Polls the h2 connection (`f`) as one tick of the driving task.
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.armed.set(true);
        self.poll.set(self.poll.get().wrapping_add(1));
        let r = f(cx);
        if self.repoll.replace(false) {
            // To the back of the shard's run queue: the streams woken in this tick buffer
            // their frames first.
            cx.waker().wake_by_ref();
        }
        r
    }

    /// The number of the driving task's current poll.
    pub(super) fn current(&self) -> u32 {
        self.poll.get()
    }

    /// The current poll's number when a driver polls through this tick (flushes may then be
    /// deferred), `None` before.
    pub(super) fn armed(&self) -> Option<u32> {
        self.armed.get().then(|| self.poll.get())
    }

    /// Has the driving task polled once more at the end of this poll.
    pub(super) fn repoll(&self) {
        self.repoll.set(true);
    }
}
