//! ringtun patch 6: a provided-buffer ring for multishot receives (see PATCHED.md).
//!
//! One ring per driver, registered with the kernel on the first multishot receive. A receive
//! that finds bytes takes the ring's next free buffer; the buffer comes back when the
//! [`RecvBuf`](super::multi::RecvBuf) that carries it drops. Buffers are owned by the ring
//! for its whole life, so an idle socket waiting in a multishot receive holds none.

use std::{
    alloc::{alloc, alloc_zeroed, dealloc, Layout},
    cell::Cell,
    io,
    sync::atomic::{AtomicU16, Ordering},
};

use io_uring::{types::BufRingEntry, IoUring};

/// The buffer group id of the ring (the only group this driver registers).
pub(crate) const BGID: u16 = 0;

thread_local! {
    /// Buffers (count, bytes each) that this thread's next ring registers; (0, 0): none.
    static CONFIG: Cell<(u16, u32)> = const { Cell::new((0, 0)) };
}

/// Sets how many buffers, of how many bytes each, the ring of the io_uring driver built on
/// this thread will hold. A count of 0 turns multishot receives off (they answer
/// `Unsupported`). The count is rounded up to a power of two, at most 32768. Takes effect when
/// the ring is first needed.
pub fn set_recv_buffers(count: u16, size: u32) {
    CONFIG.with(|c| c.set((count, size)));
}

/// The buffers asked for on this thread: (count, size), count 0 when off.
pub(crate) fn recv_buffers() -> (u16, u32) {
    CONFIG.with(|c| c.get())
}

pub(crate) struct BufRing {
    ring: *mut BufRingEntry,
    ring_layout: Layout,
    bufs: *mut u8,
    bufs_layout: Layout,
    entries: u16,
    buf_size: u32,
    tail: u16,
}

impl BufRing {
    /// Allocates `count` buffers of `size` bytes and registers them as group [`BGID`].
    pub(crate) fn new(uring: &IoUring, count: u16, size: u32) -> io::Result<Self> {
        let entries = count.max(1).checked_next_power_of_two().unwrap_or(1 << 15).min(1 << 15);
        if size == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "recv buffer size 0"));
        }
        // The kernel wants the ring page-aligned (64 KiB pages on some arm64 kernels).
        // SAFETY: sysconf has no preconditions.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            p if p > 0 => p as usize,
            _ => 4096,
        };
        let ring_layout = Layout::from_size_align(
            (entries as usize * std::mem::size_of::<BufRingEntry>()).max(page),
            page,
        )
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let bufs_layout = Layout::from_size_align(entries as usize * size as usize, page)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: both layouts have a non-zero size.
        let ring = unsafe { alloc_zeroed(ring_layout) } as *mut BufRingEntry;
        if ring.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let bufs = unsafe { alloc(bufs_layout) };
        if bufs.is_null() {
            unsafe { dealloc(ring as *mut u8, ring_layout) };
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let mut this = BufRing {
            ring,
            ring_layout,
            bufs,
            bufs_layout,
            entries,
            buf_size: size,
            tail: 0,
        };
        for bid in 0..entries {
            this.push(bid);
        }
        this.publish();
        // SAFETY: the ring stays allocated until `Drop`, which the driver runs only after
        // unregistering the group (`UringInner::drop`).
        unsafe { uring.submitter().register_buf_ring(ring as u64, entries, BGID) }?;
        Ok(this)
    }

    /// Bytes in each buffer.
    pub(crate) fn buf_size(&self) -> u32 {
        self.buf_size
    }

    fn push(&mut self, bid: u16) {
        let idx = (self.tail & (self.entries - 1)) as usize;
        // SAFETY: `idx` is within the ring; the kernel reads an entry only below the published
        // tail, and this one is above it until `publish`.
        let entry = unsafe { &mut *self.ring.add(idx) };
        entry.set_addr(self.bufs as u64 + bid as u64 * self.buf_size as u64);
        entry.set_len(self.buf_size);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail field lies in the ring's first entry, which is allocated; the
        // kernel reads it with acquire ordering.
        unsafe {
            let tail = BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Hands buffer `bid` back to the kernel.
    pub(crate) fn give_back(&mut self, bid: u16) {
        if bid < self.entries {
            self.push(bid);
            self.publish();
        }
    }

    /// The first `len` bytes of buffer `bid`.
    ///
    /// # Safety
    /// The kernel must have handed `bid` out with `len` bytes written, and it must not be
    /// given back while the slice lives.
    pub(crate) unsafe fn bytes(&self, bid: u16, len: u32) -> &[u8] {
        let len = len.min(self.buf_size) as usize;
        std::slice::from_raw_parts(self.bufs.add(bid as usize * self.buf_size as usize), len)
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts; the group is unregistered (or the
        // ring gone) by now.
        unsafe {
            dealloc(self.ring as *mut u8, self.ring_layout);
            dealloc(self.bufs, self.bufs_layout);
        }
    }
}
