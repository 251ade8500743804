//! Batching the userspace path's writes across the streams of one shard tick.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

thread_local! {
    /// This shard's `--write-batch-bytes` (0: never).
    static BATCH_BYTES: Cell<usize> = const { Cell::new(0) };
}

/// Sets this thread's `--write-batch-bytes`: a connection holding that many bytes for its
/// deferred write ends the shard's busy ticks (0: never).
pub fn set_write_batch_bytes(n: u32) {
    BATCH_BYTES.with(|b| b.set(n as usize));
}

/// A deferred write of `unflushed` bytes is large enough to go at the end of this tick rather
/// than after more busy ticks: it asks the runtime for its next quiet point without them.
///
/// Busy ticks batch a busy shard's small writes into one `sendmsg`; a write already this
/// large gains little per byte from more, and holding it back leaves the peer waiting. In
/// the rr16 closed loop every tick finds completions waiting, so the limit always ran out and
/// each batch was held for four ticks: the loop did ×0.89–0.92 the requests of a shard
/// without busy ticks (round 25 of `benches/`), while at 2,000 req/s, where a write holds one
/// request, the busy ticks are what saves CPU.
pub(super) fn hurry_if_full(unflushed: usize) {
    let limit = BATCH_BYTES.with(Cell::get);
    if limit != 0 && unflushed >= limit {
        monoio::hurry_quiet();
    }
}

/// Lets an HBONE connection's writes wait for the shard's quiet point, so that frames from
/// every stream that became ready meanwhile leave in one record batch and one `writev`.
///
/// h2 flushes its I/O after every DATA frame it sends without copying (payloads over 256
/// bytes) and at the end of every poll; with sixteen streams each sending a small request, that
/// was one `writev` per request although all sixteen were ready at once. The task that drives
/// the h2 connection polls it through [`FlushTick::poll`], which numbers its polls by the
/// runtime's quiet points (vendor/monoio patch 5: where the shard has run every ready task
/// and, on io_uring, up to `--write-batch-ticks` ticks of completions that were already
/// waiting); a flush only marks the bytes due and has the task woken at the next quiet point,
/// and the poll then writes them (at its first read or flush). Outside a runtime each poll
/// is a tick of its own. Until a driver polls through it (the h2 handshake), flushes write at
/// once. The decision itself is the record pump's ([`super::pump::RecordPump::flush`]).
///
/// The poll that writes them need not be h2's: h2 is polled with a waker that notes whether
/// anything of its own (a stream, the socket) woke the task. When nothing did, the task was
/// woken only for the deferred flush, and the record layer's send hook ([`FlushTick::set_send`])
/// writes it without a poll of h2 (2,000 instructions a request on each side at a low rate,
/// round 20 of `benches/`); otherwise h2 is polled as before and writes them itself.
#[derive(Default)]
pub struct FlushTick {
    /// A driver polls through [`FlushTick::poll`]: flushes may be deferred.
    armed: Cell<bool>,
    /// The tick the driving task's current poll is in: the runtime's quiet points passed (the
    /// poll's own number outside a runtime).
    poll: Cell<u32>,
    /// A flush was deferred during this poll: poll the task once more.
    repoll: Cell<bool>,
    /// A deferred flush will wake the task: the tick number it was deferred in.
    flush_pending: Cell<Option<u32>>,
    /// h2's last poll returned Pending: it has registered a wake-up for everything it waits on
    /// (after Ready, e.g. an accepted stream, it may have more without being woken).
    h2_waits: Cell<bool>,
    /// What h2 is polled with: the task's waker, noting h2's own wake-ups.
    noted: RefCell<Option<(Arc<Noted>, Waker)>>,
    /// Writes the record layer's deferred bytes to the socket: `true` once all are written.
    send: RefCell<Option<Box<dyn FnMut() -> bool>>>,
}

impl fmt::Debug for FlushTick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlushTick")
            .field("armed", &self.armed.get())
            .field("poll", &self.poll.get())
            .field("flush_pending", &self.flush_pending.get())
            .field("h2_waits", &self.h2_waits.get())
            .finish_non_exhaustive()
    }
}

/// The driving task's waker, with a note that something other than the tick woke it.
struct Noted {
    task: Waker,
    woken: AtomicBool,
}

impl Noted {
    /// A noting waker around the task's `task`, and the note it keeps.
    fn around(task: &Waker) -> (Arc<Noted>, Waker) {
        let note = Arc::new(Noted {
            task: task.clone(),
            woken: AtomicBool::new(false),
        });
        (note.clone(), Waker::from(note))
    }
}

impl Wake for Noted {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Relaxed: the flag is read on the same shard thread that polls the task.
        self.woken.store(true, Ordering::Relaxed);
        self.task.wake_by_ref();
    }
}

impl FlushTick {
    /// Polls the h2 connection (`f`) as one tick of the driving task.
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.armed.set(true);
        let mut noted = self.noted.borrow_mut();
        // A new noting waker (the first poll, or the task's waker changed) has seen none of
        // the wake-ups h2 registered through the old one: h2 must be polled this time. h2
        // may still hold the old one afterwards (it registers anew only where its poll gets
        // that far), and a wake through it would go unnoticed: the noting waker must stay
        // the same for the task's life, which `will_wake` on monoio's task wakers gives
        // (vendor/monoio/PATCHED.md, patch 4; the tests below check both).
        let (renewed, (note, waker)) = match &mut *noted {
            Some(kept) if kept.0.task.will_wake(cx.waker()) => (false, &*kept),
            slot => (true, &*slot.insert(Noted::around(cx.waker()))),
        };
        let number = match monoio::quiet_points() {
            Some(q) => q,
            None => self.poll.get().wrapping_add(1),
        };
        self.poll.set(number);
        let flush_due = matches!(self.flush_pending.get(), Some(n) if n != number);
        if flush_due {
            self.flush_pending.set(None);
        }
        if flush_due
            && !renewed
            && self.h2_waits.get()
            && !note.woken.load(Ordering::Relaxed)
            && self.send_deferred()
        {
            // Only the tick woke the task, and the bytes are out: h2 has nothing to do, and
            // the wake-ups it registered in its last poll still stand.
            return Poll::Pending;
        }
        note.woken.store(false, Ordering::Relaxed);
        let r = f(&mut Context::from_waker(waker));
        self.h2_waits.set(r.is_pending());
        if self.repoll.replace(false) && self.flush_pending.get().is_none() {
            // At the shard's next quiet point: the streams woken until then buffer their
            // frames first. With the task's own waker, not the noting one, so that the
            // next poll can tell this wake from h2's.
            self.flush_pending.set(Some(number));
            monoio::wake_when_quiet(cx.waker());
        }
        r
    }

    /// Writes the deferred bytes through the record layer's hook; `false` when there is none
    /// or they did not all go (the socket is full or failed: h2's poll deals with it).
    fn send_deferred(&self) -> bool {
        match self.send.borrow_mut().as_mut() {
            Some(send) => send(),
            None => false,
        }
    }

    /// The record layer's way to write its deferred bytes without h2 (see above).
    pub(super) fn set_send(&self, send: Box<dyn FnMut() -> bool>) {
        *self.send.borrow_mut() = Some(send);
    }

    /// The driving task called into h2 itself (a GOAWAY): h2's next poll must not be skipped,
    /// though nothing woke the task for it.
    pub fn touched(&self) {
        self.flush_pending.set(None);
    }

    /// The tick number of the driving task's current poll.
    pub(super) fn current(&self) -> u32 {
        self.poll.get()
    }

    /// The current poll's tick number when a driver polls through this tick (flushes may then be
    /// deferred), `None` before.
    pub(super) fn armed(&self) -> Option<u32> {
        self.armed.get().then(|| self.poll.get())
    }

    /// Has the driving task polled once more at the next tick (the runtime's quiet point).
    pub(super) fn repoll(&self) {
        self.repoll.set(true);
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};

    use super::FlushTick;

    /// The driving task's waker: counts its wake-ups.
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    struct Bed {
        tick: FlushTick,
        task: Arc<Task>,
        waker: Waker,
        /// Calls of the send hook, and what it answers.
        sends: Rc<Cell<usize>>,
        all_sent: Rc<Cell<bool>>,
        /// What h2's side stashed to wake the task later.
        stashed: Option<Waker>,
    }

    impl Bed {
        fn new() -> Bed {
            let task = Arc::new(Task(AtomicUsize::new(0)));
            let tick = FlushTick::default();
            let sends = Rc::new(Cell::new(0));
            let all_sent = Rc::new(Cell::new(true));
            let (s, a) = (sends.clone(), all_sent.clone());
            tick.set_send(Box::new(move || {
                s.set(s.get() + 1);
                a.get()
            }));
            Bed {
                waker: Waker::from(task.clone()),
                task,
                tick,
                sends,
                all_sent,
                stashed: None,
            }
        }

        /// One poll of the task; `h2` stands for h2's poll: `defer` has the record layer defer
        /// a flush in it, `ready` is what it returns. Whether h2 was polled.
        fn poll(&mut self, defer: bool, ready: bool) -> bool {
            let polled = Cell::new(false);
            let mut cx = Context::from_waker(&self.waker);
            let tick = &self.tick;
            let mut stash = None;
            let _ = tick.poll(&mut cx, |cx| {
                polled.set(true);
                stash = Some(cx.waker().clone());
                if defer {
                    tick.repoll();
                }
                if ready {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            });
            if stash.is_some() {
                self.stashed = stash;
            }
            polled.get()
        }

        fn wakes(&self) -> usize {
            self.task.0.load(Ordering::Relaxed)
        }
    }

    #[test]
    fn a_repoll_only_for_the_deferred_flush_sends_it_without_polling_h2() {
        let mut bed = Bed::new();
        assert!(bed.poll(true, false), "the first poll is h2's");
        assert_eq!(
            bed.wakes(),
            1,
            "a deferred flush has the task polled once more"
        );
        assert!(
            !bed.poll(false, false),
            "nothing else woke it: h2 stays asleep"
        );
        assert_eq!(bed.sends.get(), 1, "the hook wrote the deferred bytes");
        assert_eq!(bed.wakes(), 1);
    }

    #[test]
    fn a_wake_through_a_replaced_noting_waker_still_gets_h2_polled() {
        let mut bed = Bed::new();
        assert!(bed.poll(true, false));
        // h2 wakes the task through the noting waker it kept, and the task is then polled
        // with another waker (a task's waker may change): the new noting waker has not seen
        // that wake, so h2 must run.
        bed.stashed.take().expect("h2 kept a waker").wake();
        let other = Arc::new(Task(AtomicUsize::new(0)));
        bed.waker = Waker::from(other);
        assert!(
            bed.poll(false, false),
            "h2 is polled: the wake through the old noting waker is not lost"
        );
        assert_eq!(bed.sends.get(), 0);
    }

    #[test]
    fn a_wake_from_h2s_side_meanwhile_gets_h2_polled() {
        let mut bed = Bed::new();
        assert!(bed.poll(true, false));
        // A stream (or the socket) wakes the task through the waker h2 was polled with.
        bed.stashed.take().expect("h2 kept a waker").wake();
        assert_eq!(bed.wakes(), 2, "the noting waker wakes the task itself");
        assert!(
            bed.poll(false, false),
            "h2 has work: it is polled, and writes the flush"
        );
        assert_eq!(bed.sends.get(), 0);
    }

    #[test]
    fn after_h2_returned_ready_it_is_polled_again() {
        // Ready (an accepted stream, say) registers no wake-up: h2 may hold more already.
        let mut bed = Bed::new();
        assert!(bed.poll(true, true));
        assert!(bed.poll(false, false));
        assert_eq!(bed.sends.get(), 0);
    }

    #[test]
    fn bytes_the_hook_could_not_write_are_left_to_h2() {
        let mut bed = Bed::new();
        bed.all_sent.set(false);
        assert!(bed.poll(true, false));
        assert!(
            bed.poll(false, false),
            "the socket was full: h2's poll waits for room"
        );
        assert_eq!(bed.sends.get(), 1);
    }

    #[test]
    fn a_direct_call_into_h2_gets_it_polled() {
        // The driving task queued a GOAWAY itself after a poll that deferred a flush.
        let mut bed = Bed::new();
        assert!(bed.poll(true, false));
        bed.tick.touched();
        assert!(bed.poll(false, false), "h2 must run to send it");
        assert_eq!(bed.sends.get(), 0);
    }

    #[test]
    fn a_task_polled_without_a_deferred_flush_polls_h2() {
        let mut bed = Bed::new();
        assert!(bed.poll(false, false));
        assert!(bed.poll(false, false), "no flush was pending");
        assert_eq!(bed.sends.get(), 0);
        assert_eq!(bed.wakes(), 0);
    }

    /// In a shard's own task the noting waker is built once, not at every poll: the check
    /// that keeps it (`Waker::will_wake`) must know the task's waker again. (monoio's task
    /// wakers once had a vtable per codegen unit, and in release builds every poll of every
    /// HBONE connection allocated a new one; vendor/monoio/PATCHED.md, patch 4.)
    #[test]
    fn a_shard_task_keeps_one_noting_waker_across_polls() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("a runtime");
        let notes = rt.block_on(async {
            monoio::spawn(async {
                let tick = FlushTick::default();
                let mut notes = Vec::new();
                for _ in 0..3 {
                    std::future::poll_fn(|cx| {
                        let _ = tick.poll(cx, |cx| {
                            // What h2 does with the waker it is given: keep it for later.
                            cx.waker().wake_by_ref();
                            Poll::<()>::Pending
                        });
                        let noted = tick.noted.borrow();
                        let (note, _) = noted.as_ref().expect("a noting waker");
                        notes.push(Arc::as_ptr(note) as usize);
                        Poll::Ready(())
                    })
                    .await;
                    // The next poll_fn is polled in a later run of the same task.
                    monoio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                notes
            })
            .await
        });
        assert_eq!(notes.len(), 3);
        assert!(
            notes.iter().all(|n| *n == notes[0]),
            "one noting waker for the task's whole life: {notes:?}"
        );
    }

    /// Why the test above holds in every build profile, not only where the compiler happens to
    /// keep one copy of a vtable: every monoio task's waker, whatever its future, has the one
    /// vtable (patch 4). With a vtable per task type, two tasks' wakers differ in every build,
    /// and a task's own waker and its clone differ wherever the copies land in two codegen
    /// units (release builds: the test above then fails).
    #[test]
    fn monoio_task_wakers_share_one_vtable() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .expect("a runtime");
        let (a, b) = rt.block_on(async {
            let a = monoio::spawn(std::future::poll_fn(|cx| {
                Poll::Ready(cx.waker().vtable() as *const _ as usize)
            }));
            let b = monoio::spawn(async {
                let kept = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
                kept.vtable() as *const _ as usize
            });
            (a.await, b.await)
        });
        assert_eq!(a, b, "two tasks' wakers (one a clone) have one vtable");
    }

    /// A flush deferred in a shard's task waits for the runtime's quiet point: a poll of the
    /// task before it (h2 woke it again: another stream's frames) does not make the bytes due,
    /// and the wake at the point writes them without polling h2.
    #[test]
    fn a_deferred_flush_waits_for_the_shards_quiet_point() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .expect("a runtime");
        let polls = rt.block_on(async {
            monoio::spawn(async {
                let tick = FlushTick::default();
                let sends = Rc::new(Cell::new(0));
                let s = sends.clone();
                tick.set_send(Box::new(move || {
                    s.set(s.get() + 1);
                    true
                }));
                let mut polls = Vec::new();
                std::future::poll_fn(|cx| {
                    let first = polls.is_empty();
                    let mut h2 = false;
                    let _ = tick.poll(cx, |cx| {
                        h2 = true;
                        if first {
                            tick.repoll();
                            cx.waker().wake_by_ref();
                        }
                        Poll::<()>::Pending
                    });
                    polls.push((tick.current(), h2, sends.get()));
                    if polls.len() == 3 {
                        Poll::Ready(std::mem::take(&mut polls))
                    } else {
                        Poll::Pending
                    }
                })
                .await
            })
            .await
        });
        let n = polls[0].0;
        assert_eq!(
            polls,
            vec![(n, true, 0), (n, true, 0), (n.wrapping_add(1), false, 1)],
            "(tick, h2 polled, sends) of each poll"
        );
    }

    /// Spawns readers on four socket pairs in the current shard, each writing the byte it read
    /// into the next pair, so that each hop of a token leaves task work for the ring; returns
    /// the hop count and the way in for the first hop. The token goes round until the
    /// runtime is dropped.
    fn token_ring() -> (Rc<Cell<usize>>, Rc<std::os::unix::net::UnixStream>) {
        use std::io::Write;
        const PAIRS: usize = 4;
        let hops = Rc::new(Cell::new(0usize));
        let mut into = Vec::new();
        let mut readers = Vec::new();
        for _ in 0..PAIRS {
            let (a, b) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
            b.set_nonblocking(true).expect("non-blocking");
            readers.push(monoio::net::UnixStream::from_std(a).expect("a monoio stream"));
            into.push(Rc::new(b));
        }
        for (i, mut r) in readers.into_iter().enumerate() {
            let (next, hops) = (into[(i + 1) % PAIRS].clone(), hops.clone());
            monoio::spawn(async move {
                use monoio::io::AsyncReadRent;
                let mut buf = vec![0u8; 1];
                loop {
                    let (n, b) = r.read(buf).await;
                    buf = b;
                    if !matches!(n, Ok(1)) {
                        return;
                    }
                    hops.set(hops.get() + 1);
                    // Direct: the byte is in the next reader's socket when this returns.
                    let _ = (&*next).write(&buf);
                }
            });
        }
        (hops, into[0].clone())
    }

    /// Waits for the current shard's next quiet point.
    async fn quiet_point() {
        let mut asked = false;
        std::future::poll_fn(|cx| {
            if asked {
                return Poll::Ready(());
            }
            asked = true;
            assert!(monoio::wake_when_quiet(cx.waker()));
            Poll::Pending
        })
        .await
    }

    /// How many hops of a token (`token_ring`) ran in `rt`'s shard between a task's asking
    /// for a quiet point and its wake.
    fn hops_before_the_quiet_point<D: monoio::Driver>(
        rt: &mut monoio::Runtime<D>,
        busy_ticks: u32,
    ) -> usize {
        hops_before_quiet_points(rt, busy_ticks, None)[0]
    }

    /// The same for the first quiet point and, when `unflushed` is given, for a second one
    /// after it, the first asked for by a connection holding `unflushed` bytes
    /// (`--write-batch-bytes` 8192). The epoll driver runs only the first: its readers' sockets
    /// are blocking, and a later tick would block in a read that has no token.
    fn hops_before_quiet_points<D: monoio::Driver>(
        rt: &mut monoio::Runtime<D>,
        busy_ticks: u32,
        unflushed: Option<usize>,
    ) -> [usize; 2] {
        use std::io::Write;
        rt.block_on(async move {
            monoio::set_quiet_busy_ticks(busy_ticks);
            let (hops, first) = token_ring();
            // Every reader's receive is in the kernel, waiting.
            monoio::time::sleep(std::time::Duration::from_millis(20)).await;
            (&*first).write_all(&[1]).expect("the first hop");
            let start = hops.get();
            if let Some(n) = unflushed {
                super::set_write_batch_bytes(8192);
                super::hurry_if_full(n);
            }
            quiet_point().await;
            let between = hops.get();
            if unflushed.is_none() {
                return [between - start, 0];
            }
            quiet_point().await;
            [between - start, hops.get() - between]
        })
    }

    /// Patch 5 of vendor/monoio: an io_uring shard whose ring already holds completions runs
    /// them, up to the busy limit, before its quiet point; with a limit of 0, or on the epoll
    /// driver (which cannot see waiting events without a system call), the point comes as
    /// soon as the run queue is empty.
    #[test]
    fn a_busy_ring_puts_off_the_quiet_point_up_to_its_limit() {
        use crate::options::UringTaskrun;
        for taskrun in [UringTaskrun::Defer, UringTaskrun::Coop] {
            for busy in [0, 3] {
                let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                    .enable_timer()
                    .uring_builder(taskrun.builder())
                    .build()
                    .expect("an io_uring runtime");
                assert_eq!(
                    hops_before_the_quiet_point(&mut rt, busy),
                    busy as usize,
                    "{taskrun:?}, limit {busy}: one hop per busy tick"
                );
            }
        }
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("an epoll runtime");
        assert_eq!(hops_before_the_quiet_point(&mut rt, 3), 0, "epoll");
    }

    /// A connection whose deferred write holds `--write-batch-bytes` ends the busy ticks: its
    /// quiet point comes as soon as the run queue is empty, and the next one, asked for
    /// without, waits them out again; one byte short, the point waits for them.
    #[test]
    fn a_full_batch_takes_the_next_quiet_point_without_busy_ticks() {
        use crate::options::UringTaskrun;
        for (unflushed, first) in [(8191, 3), (8192, 0)] {
            let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .enable_timer()
                .uring_builder(UringTaskrun::Defer.builder())
                .build()
                .expect("an io_uring runtime");
            let [hurried, next] = hops_before_quiet_points(&mut rt, 3, Some(unflushed));
            assert_eq!(hurried, first, "{unflushed} bytes waiting: busy ticks");
            assert!(
                next >= 3,
                "the next point had its busy ticks again: {next} hops"
            );
        }
    }

    /// A shard that never runs out of work, with a task that asks for every quiet point (a
    /// connection that always has more to write), still fires its timers: a park without
    /// waiting comes between two points, and only a park processes the timer wheel (and
    /// re-arms monoio's poller for the sockets in poll mode: the TLS handshakes).
    #[test]
    fn a_ring_that_stays_busy_still_fires_its_timers() {
        use crate::options::UringTaskrun;
        use std::io::Write;
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .enable_timer()
                .uring_builder(UringTaskrun::Defer.builder())
                .build()
                .expect("an io_uring runtime");
            let hops = rt.block_on(async {
                monoio::set_quiet_busy_ticks(3);
                let (hops, first) = token_ring();
                monoio::spawn(async {
                    loop {
                        quiet_point().await;
                    }
                });
                monoio::time::sleep(std::time::Duration::from_millis(20)).await;
                (&*first).write_all(&[1]).expect("the first hop");
                let start = hops.get();
                monoio::time::sleep(std::time::Duration::from_millis(20)).await;
                hops.get() - start
            });
            let _ = done.send(hops);
        });
        let hops = finished
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("a 20 ms timer on a busy shard fired within 20 s");
        assert!(
            hops > 100,
            "the token kept the shard busy meanwhile: {hops} hops"
        );
    }

    #[test]
    fn quiet_points_count_outside_and_inside_a_runtime() {
        assert_eq!(monoio::quiet_points(), None);
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .expect("a runtime");
        let (before, after) = rt.block_on(async {
            let before = monoio::quiet_points();
            quiet_point().await;
            (before, monoio::quiet_points())
        });
        let before = before.expect("inside a runtime");
        assert_eq!(after, Some(before.wrapping_add(1)));
    }
}
