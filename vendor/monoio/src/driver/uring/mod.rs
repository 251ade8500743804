//! Monoio Uring Driver.

use std::{
    cell::UnsafeCell,
    io,
    mem::ManuallyDrop,
    os::unix::prelude::{AsRawFd, RawFd},
    rc::Rc,
    task::{Context, Poll},
    time::Duration,
};

use io_uring::{cqueue, opcode, types::Timespec, IoUring};
use lifecycle::Lifecycle;

use super::{
    op::{CompletionMeta, Op, OpAble},
    // ready::Ready,
    // scheduled_io::ScheduledIo,
    util::timespec,
    Driver,
    Inner,
    CURRENT,
};
use crate::utils::slab::Slab;

pub(crate) mod buf_ring;
mod lifecycle;
pub(crate) mod multi;
#[cfg(feature = "sync")]
mod waker;
#[cfg(feature = "sync")]
pub(crate) use waker::UnparkHandle;

#[allow(unused)]
pub(crate) const CANCEL_USERDATA: u64 = u64::MAX;
pub(crate) const TIMEOUT_USERDATA: u64 = u64::MAX - 1;
#[allow(unused)]
pub(crate) const EVENTFD_USERDATA: u64 = u64::MAX - 2;
#[cfg(feature = "poll-io")]
pub(crate) const POLLER_USERDATA: u64 = u64::MAX - 3;

pub(crate) const MIN_REVERSED_USERDATA: u64 = u64::MAX - 3;

/// Driver with uring.
pub struct IoUringDriver {
    inner: Rc<UnsafeCell<UringInner>>,

    // Used as timeout buffer
    timespec: *mut Timespec,

    // Used as read eventfd buffer
    #[cfg(feature = "sync")]
    eventfd_read_dst: *mut u8,

    // Used for drop
    #[cfg(feature = "sync")]
    thread_id: usize,
}

pub(crate) struct UringInner {
    /// In-flight operations
    ops: Ops,

    #[cfg(feature = "poll-io")]
    poll: super::poll::Poll,
    #[cfg(feature = "poll-io")]
    poller_installed: bool,

    /// IoUring bindings
    uring: ManuallyDrop<IoUring>,

    /// Shared waker
    #[cfg(feature = "sync")]
    shared_waker: std::sync::Arc<waker::EventWaker>,

    // Mark if eventfd is in the ring
    #[cfg(feature = "sync")]
    eventfd_installed: bool,

    // Waker receiver
    #[cfg(feature = "sync")]
    waker_receiver: flume::Receiver<std::task::Waker>,

    // Uring support ext_arg
    ext_arg: bool,

    /// ringtun patch 6: the provided buffers of multishot receives, once one was armed.
    recv_ring: Option<buf_ring::BufRing>,

    /// ringtun patch 6: cancels to submit (of multishot receives whose owner fell behind,
    /// or that found the submission queue full).
    cancels: Vec<u64>,
}

// When dropping the driver, all in-flight operations must have completed. This
// type wraps the slab and ensures that, on drop, the slab is empty.
struct Ops {
    slab: Slab<Lifecycle>,
}

impl IoUringDriver {
    const DEFAULT_ENTRIES: u32 = 1024;

    pub(crate) fn new(b: &io_uring::Builder) -> io::Result<IoUringDriver> {
        Self::new_with_entries(b, Self::DEFAULT_ENTRIES)
    }

    #[cfg(not(feature = "sync"))]
    pub(crate) fn new_with_entries(
        urb: &io_uring::Builder,
        entries: u32,
    ) -> io::Result<IoUringDriver> {
        let uring = ManuallyDrop::new(urb.build(entries)?);

        let inner = Rc::new(UnsafeCell::new(UringInner {
            #[cfg(feature = "poll-io")]
            poll: super::poll::Poll::with_capacity(entries as usize)?,
            #[cfg(feature = "poll-io")]
            poller_installed: false,
            ops: Ops::new(),
            ext_arg: uring.params().is_feature_ext_arg(),
            recv_ring: None,
            cancels: Vec::new(),
            uring,
        }));

        Ok(IoUringDriver {
            inner,
            timespec: Box::leak(Box::new(Timespec::new())) as *mut Timespec,
        })
    }

    #[cfg(feature = "sync")]
    pub(crate) fn new_with_entries(
        urb: &io_uring::Builder,
        entries: u32,
    ) -> io::Result<IoUringDriver> {
        let uring = ManuallyDrop::new(urb.build(entries)?);

        // Create eventfd and register it to the ring.
        let waker = {
            let fd = crate::syscall!(eventfd(0, libc::EFD_CLOEXEC))?;
            unsafe {
                use std::os::unix::io::FromRawFd;
                std::fs::File::from_raw_fd(fd)
            }
        };

        let (waker_sender, waker_receiver) = flume::unbounded::<std::task::Waker>();

        let inner = Rc::new(UnsafeCell::new(UringInner {
            #[cfg(feature = "poll-io")]
            poller_installed: false,
            #[cfg(feature = "poll-io")]
            poll: super::poll::Poll::with_capacity(entries as usize)?,
            ops: Ops::new(),
            ext_arg: uring.params().is_feature_ext_arg(),
            recv_ring: None,
            cancels: Vec::new(),
            uring,
            shared_waker: std::sync::Arc::new(waker::EventWaker::new(waker)),
            eventfd_installed: false,
            waker_receiver,
        }));

        let thread_id = crate::builder::BUILD_THREAD_ID.with(|id| *id);
        let driver = IoUringDriver {
            inner,
            timespec: Box::leak(Box::new(Timespec::new())) as *mut Timespec,
            eventfd_read_dst: Box::leak(Box::new([0_u8; 8])) as *mut u8,
            thread_id,
        };

        // Register unpark handle
        super::thread::register_unpark_handle(thread_id, driver.unpark().into());
        super::thread::register_waker_sender(thread_id, waker_sender);
        Ok(driver)
    }

    #[allow(unused)]
    fn num_operations(&self) -> usize {
        let inner = self.inner.get();
        unsafe { (*inner).ops.slab.len() }
    }

    // Flush to make enough space
    fn flush_space(inner: &mut UringInner, need: usize) -> io::Result<()> {
        let sq = inner.uring.submission();
        debug_assert!(sq.capacity() >= need);
        if sq.len() + need > sq.capacity() {
            drop(sq);
            inner.submit()?;
        }
        Ok(())
    }

    #[cfg(feature = "sync")]
    fn install_eventfd(&self, inner: &mut UringInner, fd: RawFd) {
        let entry = opcode::Read::new(io_uring::types::Fd(fd), self.eventfd_read_dst, 8)
            .build()
            .user_data(EVENTFD_USERDATA);

        let mut sq = inner.uring.submission();
        let _ = unsafe { sq.push(&entry) };
        inner.eventfd_installed = true;
    }

    #[cfg(feature = "poll-io")]
    fn install_poller(&self, inner: &mut UringInner, fd: RawFd) {
        let entry = opcode::PollAdd::new(io_uring::types::Fd(fd), libc::POLLIN as _)
            .build()
            .user_data(POLLER_USERDATA);

        let mut sq = inner.uring.submission();
        let _ = unsafe { sq.push(&entry) };
        inner.poller_installed = true;
    }

    fn install_timeout(&self, inner: &mut UringInner, duration: Duration) {
        let timespec = timespec(duration);
        unsafe {
            std::ptr::replace(self.timespec, timespec);
        }
        let entry = opcode::Timeout::new(self.timespec as *const Timespec)
            .build()
            .user_data(TIMEOUT_USERDATA);

        let mut sq = inner.uring.submission();
        let _ = unsafe { sq.push(&entry) };
    }

    fn inner_park(&self, timeout: Option<Duration>) -> io::Result<()> {
        let inner = unsafe { &mut *self.inner.get() };

        #[allow(unused_mut)]
        let mut need_wait = true;

        #[cfg(feature = "sync")]
        {
            // Process foreign wakers
            while let Ok(w) = inner.waker_receiver.try_recv() {
                w.wake();
                need_wait = false;
            }

            // Set status as not awake if we are going to sleep
            if need_wait {
                inner
                    .shared_waker
                    .awake
                    .store(false, std::sync::atomic::Ordering::Release);
            }

            // Process foreign wakers left
            while let Ok(w) = inner.waker_receiver.try_recv() {
                w.wake();
                need_wait = false;
            }
        }

        if need_wait {
            // Install timeout and eventfd for unpark if sync is enabled

            // 1. alloc spaces
            let mut space = 0;
            #[cfg(feature = "sync")]
            if !inner.eventfd_installed {
                space += 1;
            }
            #[cfg(feature = "poll-io")]
            if !inner.poller_installed {
                space += 1;
            }
            if timeout.is_some() {
                space += 1;
            }
            if space != 0 {
                Self::flush_space(inner, space)?;
            }

            // 2.1 install poller
            #[cfg(feature = "poll-io")]
            if !inner.poller_installed {
                self.install_poller(inner, inner.poll.as_raw_fd());
            }

            // 2.2 install eventfd and timeout
            #[cfg(feature = "sync")]
            if !inner.eventfd_installed {
                self.install_eventfd(inner, inner.shared_waker.as_raw_fd());
            }

            // 2.3 install timeout and submit_and_wait with timeout
            if timeout.is_some_and(|d| d.is_zero()) {
                // ringtun patch 5: a zero timeout does not wait. A wait for one completion
                // with a timeout already past sleeps on a timer that fires a moment later.
                Self::enter_nowait(inner)?;
            } else if let Some(duration) = timeout {
                match inner.ext_arg {
                    // Submit and Wait with timeout in an TimeoutOp way.
                    // Better compatibility(5.4+).
                    false => {
                        self.install_timeout(inner, duration);
                        inner.uring.submit_and_wait(1)?;
                    }
                    // Submit and Wait with enter args.
                    // Better performance(5.11+).
                    true => {
                        let timespec = timespec(duration);
                        let args = io_uring::types::SubmitArgs::new().timespec(&timespec);
                        if let Err(e) = inner.uring.submitter().submit_with_args(1, &args) {
                            if e.raw_os_error() != Some(libc::ETIME) {
                                return Err(e);
                            }
                        }
                    }
                }
            } else {
                // Submit and Wait without timeout
                inner.uring.submit_and_wait(1)?;
            }
        } else {
            // Submit only
            inner.uring.submit()?;
        }

        // Set status as awake
        #[cfg(feature = "sync")]
        inner
            .shared_waker
            .awake
            .store(true, std::sync::atomic::Ordering::Release);

        // Process CQ
        inner.tick()?;

        Ok(())
    }

    #[cfg(feature = "poll-io")]
    #[inline]
    pub(crate) fn register_poll_io(
        this: &Rc<UnsafeCell<UringInner>>,
        source: &mut impl mio::event::Source,
        interest: mio::Interest,
    ) -> io::Result<usize> {
        let inner = unsafe { &mut *this.get() };
        inner.poll.register(source, interest)
    }

    #[cfg(feature = "poll-io")]
    #[inline]
    pub(crate) fn deregister_poll_io(
        this: &Rc<UnsafeCell<UringInner>>,
        source: &mut impl mio::event::Source,
        token: usize,
    ) -> io::Result<()> {
        let inner = unsafe { &mut *this.get() };
        inner.poll.deregister(source, token)
    }
}

impl Driver for IoUringDriver {
    /// Enter the driver context. This enables using uring types.
    fn with<R>(&self, f: impl FnOnce() -> R) -> R {
        // TODO(ihciah): remove clone
        let inner = Inner::Uring(self.inner.clone());
        CURRENT.set(&inner, f)
    }

    fn submit(&self) -> io::Result<()> {
        let inner = unsafe { &mut *self.inner.get() };
        inner.submit()?;
        inner.tick()?;
        Ok(())
    }

    fn park(&self) -> io::Result<()> {
        self.inner_park(None)
    }

    fn park_timeout(&self, duration: Duration) -> io::Result<()> {
        self.inner_park(Some(duration))
    }

    // ringtun patch 5. Completions are waiting when the queue holds some, or when the kernel
    // has task work for this ring (`IORING_SQ_TASKRUN`, set with `IORING_SETUP_TASKRUN_FLAG`:
    // under `DEFER_TASKRUN` a completion is only produced when the thread enters with
    // `GETEVENTS`). Without that flag nothing is seen but what is already queued.
    fn reap_ready(&self) -> io::Result<bool> {
        let inner = unsafe { &mut *self.inner.get() };
        let (taskrun, queued) = {
            let sq = inner.uring.submission();
            (sq.taskrun(), !sq.is_empty())
        };
        if !taskrun && inner.uring.completion().is_empty() {
            return Ok(false);
        }
        if taskrun || queued {
            // The task work runs, and what the ticks queued goes in, before their completions.
            Self::enter_nowait(inner)?;
        }
        inner.tick()?;
        Ok(true)
    }

    #[cfg(feature = "sync")]
    type Unpark = waker::UnparkHandle;

    #[cfg(feature = "sync")]
    fn unpark(&self) -> Self::Unpark {
        UringInner::unpark(&self.inner)
    }
}

impl IoUringDriver {
    /// ringtun patch 5: submits what is queued and enters with `GETEVENTS` and no minimum:
    /// the kernel runs the ring's task work and returns without waiting.
    fn enter_nowait(inner: &mut UringInner) -> io::Result<()> {
        const IORING_ENTER_GETEVENTS: u32 = 1;
        let to_submit = inner.uring.submission().len() as u32;
        // SAFETY: no argument is passed; the ring's own fd and queues are the crate's.
        let entered = unsafe {
            inner
                .uring
                .submitter()
                .enter::<libc::sigset_t>(to_submit, 0, IORING_ENTER_GETEVENTS, None)
        };
        match entered {
            Err(e) if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)) => {
                Err(e)
            }
            _ => Ok(()),
        }
    }
}

impl UringInner {
    fn tick(&mut self) -> io::Result<()> {
        let cq = self.uring.completion();

        for cqe in cq {
            let index = cqe.user_data();
            match index {
                #[cfg(feature = "sync")]
                EVENTFD_USERDATA => self.eventfd_installed = false,
                #[cfg(feature = "poll-io")]
                POLLER_USERDATA => {
                    self.poller_installed = false;
                    self.poll.tick(Some(Duration::ZERO))?;
                }
                _ if index >= MIN_REVERSED_USERDATA => (),
                _ => self.ops.complete(
                    index as _,
                    resultify(&cqe),
                    cqe.flags(),
                    &mut self.recv_ring,
                    &mut self.cancels,
                ),
            }
        }
        if !self.cancels.is_empty() {
            self.push_cancels();
        }
        Ok(())
    }

    /// ringtun patch 6: whether slot `index` holds a multishot operation.
    fn is_multi(&mut self, index: usize) -> bool {
        matches!(
            self.ops.slab.get(index).as_deref(),
            Some(Lifecycle::Multi(..))
        )
    }

    /// ringtun patch 6: submits the cancels waiting in `cancels`, as many as the submission
    /// queue takes (the rest wait for the next tick).
    fn push_cancels(&mut self) {
        // Taken off the list before the push: a full queue's submit may tick, and that tick
        // pushes what is still listed.
        while let Some(index) = self.cancels.pop() {
            // A slot taken since by another kind of operation is not this cancel's: a
            // multishot receive ends with a completion without `F_MORE`, after which its
            // owner frees the slot.
            if self.is_multi(index as usize) && !self.push_cancel(index) {
                self.cancels.push(index);
                return;
            }
        }
    }

    /// Pushes a cancel of the operation in slot `index`, submitting first if the submission
    /// queue is full; `false` if it still did not fit.
    fn push_cancel(&mut self, index: u64) -> bool {
        let cancel = opcode::AsyncCancel::new(index).build().user_data(u64::MAX);
        // SAFETY: a cancel names no memory.
        if unsafe { self.uring.submission().push(&cancel) }.is_ok() {
            return true;
        }
        let _ = self.submit();
        // SAFETY: as above.
        unsafe { self.uring.submission().push(&cancel) }.is_ok()
    }

    fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.uring.submit() {
                #[cfg(feature = "unstable")]
                Err(ref e)
                    if matches!(e.kind(), io::ErrorKind::Other | io::ErrorKind::ResourceBusy) =>
                {
                    self.tick()?;
                }
                #[cfg(not(feature = "unstable"))]
                Err(ref e)
                    if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) =>
                {
                    // This error is constructed with io::Error::last_os_error():
                    // https://github.com/tokio-rs/io-uring/blob/01c83bbce965d4aaf93ebfaa08c3aa8b7b0f5335/src/sys/mod.rs#L32
                    // So we can use https://doc.rust-lang.org/nightly/std/io/struct.Error.html#method.raw_os_error
                    // to get the raw error code.
                    self.tick()?;
                }
                e => return e.map(|_| ()),
            }
        }
    }

    /// The provided-buffer ring, registered on first use with this thread's
    /// [`set_recv_buffers`](buf_ring::set_recv_buffers).
    pub(crate) fn recv_ring(&mut self) -> io::Result<&mut buf_ring::BufRing> {
        if self.recv_ring.is_none() {
            let (count, size) = buf_ring::recv_buffers();
            if count == 0 {
                return Err(io::ErrorKind::Unsupported.into());
            }
            match buf_ring::BufRing::new(&self.uring, count, size) {
                Ok(ring) => self.recv_ring = Some(ring),
                Err(e) => {
                    // A kernel without provided-buffer rings (before 5.19) is asked once;
                    // short memory may pass.
                    if e.kind() != io::ErrorKind::OutOfMemory
                        && e.raw_os_error() != Some(libc::ENOMEM)
                    {
                        buf_ring::set_recv_buffers(0, 0);
                    }
                    return Err(e);
                }
            }
        }
        // SAFETY: set just above when it was not.
        Ok(unsafe { self.recv_ring.as_mut().unwrap_unchecked() })
    }

    /// Gives a provided buffer back to the kernel.
    pub(crate) fn give_back(&mut self, bid: u16) {
        if let Some(ring) = self.recv_ring.as_mut() {
            ring.give_back(bid);
        }
    }

    /// Bytes in each provided buffer (0 with no ring).
    pub(crate) fn recv_buf_size(&self) -> u32 {
        self.recv_ring.as_ref().map_or(0, |r| r.buf_size())
    }

    /// The received bytes in provided buffer `bid`.
    ///
    /// # Safety
    /// As [`BufRing::bytes`](buf_ring::BufRing::bytes).
    pub(crate) unsafe fn recv_bytes(&self, bid: u16, len: u32) -> &[u8] {
        match self.recv_ring.as_ref() {
            Some(ring) => ring.bytes(bid, len),
            None => &[],
        }
    }

    fn new_op<T>(data: T, inner: &mut UringInner, driver: Inner) -> Op<T> {
        Op {
            driver,
            index: inner.ops.insert(),
            data: Some(data),
        }
    }

    pub(crate) fn submit_with_data<T>(
        this: &Rc<UnsafeCell<UringInner>>,
        data: T,
    ) -> io::Result<Op<T>>
    where
        T: OpAble,
    {
        let inner = unsafe { &mut *this.get() };
        // If the submission queue is full, flush it to the kernel
        if inner.uring.submission().is_full() {
            inner.submit()?;
        }

        // Create the operation
        let mut op = Self::new_op(data, inner, Inner::Uring(this.clone()));

        // Configure the SQE
        let data_mut = unsafe { op.data.as_mut().unwrap_unchecked() };
        let sqe = OpAble::uring_op(data_mut).user_data(op.index as _);

        {
            let mut sq = inner.uring.submission();

            // Push the new operation
            if unsafe { sq.push(&sqe).is_err() } {
                unimplemented!("when is this hit?");
            }
        }

        // Submit the new operation. At this point, the operation has been
        // pushed onto the queue and the tail pointer has been updated, so
        // the submission entry is visible to the kernel. If there is an
        // error here (probably EAGAIN), we still return the operation. A
        // future `io_uring_enter` will fully submit the event.

        // CHIHAI: We are not going to do syscall now. If we are waiting
        // for IO, we will submit on `park`.
        // let _ = inner.submit();
        Ok(op)
    }

    pub(crate) fn poll_op(
        this: &Rc<UnsafeCell<UringInner>>,
        index: usize,
        cx: &mut Context<'_>,
    ) -> Poll<CompletionMeta> {
        let inner = unsafe { &mut *this.get() };
        let lifecycle = unsafe { inner.ops.slab.get(index).unwrap_unchecked() };
        lifecycle.poll_op(cx)
    }

    #[cfg(feature = "poll-io")]
    pub(crate) fn poll_legacy_op<T: OpAble>(
        this: &Rc<UnsafeCell<Self>>,
        data: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<CompletionMeta> {
        let inner = unsafe { &mut *this.get() };
        let (direction, index) = match data.legacy_interest() {
            Some(x) => x,
            None => {
                // if there is no index provided, it means the action does not rely on fd
                // readiness. do syscall right now.
                return Poll::Ready(CompletionMeta {
                    result: OpAble::legacy_call(data),
                    flags: 0,
                });
            }
        };

        // wait io ready and do syscall
        inner
            .poll
            .poll_syscall(cx, index, direction, || OpAble::legacy_call(data))
    }

    pub(crate) fn drop_op<T: 'static>(
        this: &Rc<UnsafeCell<UringInner>>,
        index: usize,
        data: &mut Option<T>,
    ) {
        let inner = unsafe { &mut *this.get() };
        if index == usize::MAX {
            // already finished
            return;
        }
        if let Some(lifecycle) = inner.ops.slab.get(index) {
            let _must_finished = lifecycle.drop_op(data);
            // ringtun patch: a close is never cancelled. A dropped fd submits its close and
            // drops the op at once; the close runs inline at submission, so the cancel that
            // followed every socket's close only ever answered -ENOENT, one more submission
            // and lookup per socket (vendor/monoio/PATCHED.md). The op still completes and
            // frees its slot as any ignored op does.
            #[cfg(feature = "async-cancel")]
            if !_must_finished
                && std::any::TypeId::of::<T>()
                    != std::any::TypeId::of::<crate::driver::op::close::Close>()
            {
                // Try push cancel, if failed, will submit and re-push (ringtun patch 6: the
                // same push as every other cancel's).
                let _ = inner.push_cancel(index as u64);
            }
        }
    }

    pub(crate) unsafe fn cancel_op(this: &Rc<UnsafeCell<UringInner>>, index: usize) {
        let inner = &mut *this.get();
        if !inner.push_cancel(index as u64) && inner.is_multi(index) {
            // ringtun patch 6: not lost (an armed multishot receive would otherwise run for
            // the socket's whole life): pushed again at the next tick.
            inner.cancels.push(index as u64);
        }
    }

    #[cfg(feature = "sync")]
    pub(crate) fn unpark(this: &Rc<UnsafeCell<UringInner>>) -> waker::UnparkHandle {
        let inner = unsafe { &*this.get() };
        let weak = std::sync::Arc::downgrade(&inner.shared_waker);
        waker::UnparkHandle(weak)
    }
}

impl AsRawFd for IoUringDriver {
    fn as_raw_fd(&self) -> RawFd {
        unsafe { (*self.inner.get()).uring.as_raw_fd() }
    }
}

impl Drop for IoUringDriver {
    fn drop(&mut self) {
        trace!("MONOIO DEBUG[IoUringDriver]: drop");

        // Dealloc leaked memory
        unsafe { std::ptr::drop_in_place(self.timespec) };

        #[cfg(feature = "sync")]
        unsafe {
            std::ptr::drop_in_place(self.eventfd_read_dst)
        };

        // Deregister thread id
        #[cfg(feature = "sync")]
        {
            use crate::driver::thread::{unregister_unpark_handle, unregister_waker_sender};
            unregister_unpark_handle(self.thread_id);
            unregister_waker_sender(self.thread_id);
        }
    }
}

impl Drop for UringInner {
    fn drop(&mut self) {
        // no need to wait for completion, as the kernel will clean up the ring asynchronically.
        let _ = self.uring.submitter().submit();
        // ringtun patch 6: the kernel lets go of the buffers before they are freed.
        if let Some(ring) = self.recv_ring.take() {
            if self.uring.submitter().unregister_buf_ring(buf_ring::BGID).is_err() {
                // Still registered: the kernel may write into the buffers until the ring
                // is gone, so they are never freed.
                std::mem::forget(ring);
            }
        }
        unsafe {
            ManuallyDrop::drop(&mut self.uring);
        }
    }
}

impl Ops {
    const fn new() -> Self {
        Ops { slab: Slab::new() }
    }

    // Insert a new operation
    pub(crate) fn insert(&mut self) -> usize {
        self.slab.insert(Lifecycle::Submitted)
    }

    fn complete(
        &mut self,
        index: usize,
        result: io::Result<u32>,
        flags: u32,
        ring: &mut Option<buf_ring::BufRing>,
        cancels: &mut Vec<u64>,
    ) {
        let mut lifecycle = unsafe { self.slab.get(index).unwrap_unchecked() };
        // ringtun patch 6: a multishot operation queues its completions in its slot.
        if let Lifecycle::Multi(multi) = &mut *lifecycle {
            let more = cqueue::more(flags);
            if multi.dropped {
                if let (Some(bid), Some(ring)) = (cqueue::buffer_select(flags), ring.as_mut()) {
                    ring.give_back(bid);
                }
                if !more {
                    lifecycle.remove();
                }
                return;
            }
            multi.queue.push((result, flags));
            multi.ended |= !more;
            // An owner that does not take what arrives (its task waits on something else)
            // must not hold the shard's buffers or read past TCP's flow control: the receive
            // stops, and the owner arms a new one once it has caught up.
            if more && !multi.capped && multi.queue.len() >= multi::QUEUE_LIMIT {
                multi.capped = true;
                cancels.push(index as u64);
            }
            if let Some(waker) = multi.waker.take() {
                waker.wake();
            }
            return;
        }
        lifecycle.complete(result, flags);
    }
}

#[inline]
fn resultify(cqe: &cqueue::Entry) -> io::Result<u32> {
    let res = cqe.result();

    if res >= 0 {
        Ok(res as u32)
    } else {
        Err(io::Error::from_raw_os_error(-res))
    }
}
