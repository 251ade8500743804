//! ringtun patch 6: multishot receives (see PATCHED.md).
//!
//! One submitted `IORING_OP_RECV` with `IORING_RECV_MULTISHOT` stays armed on its socket: each
//! time bytes arrive the kernel receives them into a buffer of the driver's provided-buffer
//! ring and posts a completion, without a new submission or a new poll of the socket. The
//! completions wait in the operation's slot, in order, until the owner takes them.

use std::{
    cell::UnsafeCell,
    io,
    rc::Rc,
    task::{Context, Poll, Waker},
};

use io_uring::{cqueue, opcode, types};

use super::{buf_ring::BGID, lifecycle::Lifecycle, UringInner};
use crate::driver::shared_fd::SharedFd;

/// A multishot operation's completions, kept in its slot until taken.
#[derive(Default)]
pub(crate) struct Multi {
    /// (result, flags) of each completion not taken yet, in order: rarely more than one, so
    /// a `Vec` (a `VecDeque` would put every idle connection's slot in a larger size class).
    pub(crate) queue: Vec<(io::Result<u32>, u32)>,
    pub(crate) waker: Option<Waker>,
    /// The last completion (no `IORING_CQE_F_MORE`) has arrived.
    pub(crate) ended: bool,
    /// The owner is gone: completions only give their buffers back.
    pub(crate) dropped: bool,
    /// Cancelled for holding [`QUEUE_LIMIT`] completions.
    pub(crate) capped: bool,
}

/// Completions a receive may hold for its owner before it is cancelled: an owner that does
/// not keep up (its task waits for flow control elsewhere) then holds at most this many of
/// the shard's buffers, and the socket's receive window closes as it would without the ring.
pub(crate) const QUEUE_LIMIT: usize = 2;

/// A multishot receive on a socket (io_uring driver only).
///
/// One pointer wide: it sits in every connection that reads this way, idle ones included.
pub struct RecvMulti(Box<Owner>);

struct Owner {
    driver: Rc<UnsafeCell<UringInner>>,
    /// The operation's slot; `usize::MAX` once it ended and was taken.
    index: usize,
    /// Keeps the socket open while the operation may run.
    _fd: SharedFd,
}

/// Bytes received by a [`RecvMulti`], in a buffer of the driver's ring; the buffer goes back
/// to the ring when this drops. Empty at end of file.
pub struct RecvBuf {
    driver: Rc<UnsafeCell<UringInner>>,
    bid: Option<u16>,
    len: u32,
}

impl RecvMulti {
    /// Arms a multishot receive on `fd`: `Unsupported` off io_uring or when the thread asked
    /// for no buffers ([`set_recv_buffers`](super::buf_ring::set_recv_buffers)).
    pub(crate) fn new(fd: &SharedFd) -> io::Result<RecvMulti> {
        crate::driver::CURRENT.with(|inner| match inner {
            crate::driver::Inner::Uring(this) => Self::submit(this, fd),
            #[allow(unreachable_patterns)]
            _ => Err(io::ErrorKind::Unsupported.into()),
        })
    }

    fn submit(this: &Rc<UnsafeCell<UringInner>>, fd: &SharedFd) -> io::Result<RecvMulti> {
        // SAFETY: the driver is only reached from its own thread, and no other borrow of it
        // lives across this call.
        let inner = unsafe { &mut *this.get() };
        inner.recv_ring()?;
        if inner.uring.submission().is_full() {
            inner.submit()?;
        }
        let index = inner
            .ops
            .slab
            .insert(Lifecycle::Multi(Box::default()));
        let sqe = opcode::RecvMulti::new(types::Fd(fd.raw_fd()), BGID)
            .build()
            .user_data(index as _);
        // SAFETY: the entry names no memory of ours but the ring, which outlives it.
        if unsafe { inner.uring.submission().push(&sqe) }.is_err() {
            inner.ops.slab.remove(index);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(RecvMulti(Box::new(Owner {
            driver: this.clone(),
            index,
            _fd: fd.clone(),
        })))
    }

    /// The next bytes (an empty buffer at end of file), an error, or `None` once the
    /// operation ended: after an error (`ENOBUFS` when the ring ran dry, `ECANCELED` after
    /// [`cancel`](Self::cancel)) or end of file. Bytes received before the end come first.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<RecvBuf>>> {
        let this = &mut *self.0;
        if this.index == usize::MAX {
            return Poll::Ready(None);
        }
        // SAFETY: as in `submit`.
        let inner = unsafe { &mut *this.driver.get() };
        let Some(mut slot) = inner.ops.slab.get(this.index) else {
            return Poll::Ready(None);
        };
        let Lifecycle::Multi(multi) = &mut *slot else {
            return Poll::Ready(None);
        };
        if !multi.queue.is_empty() {
            let (res, flags) = multi.queue.remove(0);
            let bid = cqueue::buffer_select(flags);
            return Poll::Ready(Some(match res {
                Ok(len) => Ok(RecvBuf {
                    driver: this.driver.clone(),
                    bid,
                    len,
                }),
                Err(e) => {
                    // Not expected with a buffer, but never kept from the ring.
                    if let Some(bid) = bid {
                        inner.give_back(bid);
                    }
                    Err(e)
                }
            }));
        }
        if multi.ended {
            slot.remove();
            this.index = usize::MAX;
            return Poll::Ready(None);
        }
        match &multi.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => multi.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Asks the kernel to stop the receive; what it received before still comes out of
    /// [`poll_next`](Self::poll_next), then `ECANCELED` or the end.
    pub fn cancel(&self) {
        if self.0.index != usize::MAX {
            // SAFETY: the slot is still ours; a cancel of a finished operation is harmless.
            unsafe { UringInner::cancel_op(&self.0.driver, self.0.index) };
        }
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        if self.index == usize::MAX {
            return;
        }
        // SAFETY: as in `submit`.
        let inner = unsafe { &mut *self.driver.get() };
        let Some(mut slot) = inner.ops.slab.get(self.index) else {
            return;
        };
        let Lifecycle::Multi(multi) = &mut *slot else {
            return;
        };
        let queued = std::mem::take(&mut multi.queue);
        let ended = multi.ended;
        multi.dropped = true;
        multi.waker = None;
        if ended {
            slot.remove();
        }
        for (_, flags) in queued {
            if let Some(bid) = cqueue::buffer_select(flags) {
                inner.give_back(bid);
            }
        }
        if !ended {
            // SAFETY: the slot stays until the kernel's last completion for it.
            unsafe { UringInner::cancel_op(&self.driver, self.index) };
        }
    }
}

impl RecvBuf {
    /// Whether this is the end of file.
    pub fn is_eof(&self) -> bool {
        self.bid.is_none() && self.len == 0
    }

    /// The bytes received.
    pub fn as_slice(&self) -> &[u8] {
        match self.bid {
            // SAFETY: the kernel wrote `len` bytes into `bid` and it is ours until drop.
            Some(bid) => unsafe { (*self.driver.get()).recv_bytes(bid, self.len) },
            None => &[],
        }
    }

    /// Bytes in each of the ring's buffers: a receive of this many most likely left more in
    /// the socket.
    pub fn capacity(&self) -> usize {
        // SAFETY: as in `as_slice`.
        unsafe { (*self.driver.get()).recv_buf_size() as usize }
    }
}

impl std::ops::Deref for RecvBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        if let Some(bid) = self.bid {
            // SAFETY: as in `RecvMulti::submit`.
            unsafe { (*self.driver.get()).give_back(bid) };
        }
    }
}
