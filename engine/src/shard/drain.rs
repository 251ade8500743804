//! [`DrainSignal`]: the one-shot "draining started" signal every connection on a shard can
//! wait on.

use std::cell::{Cell, RefCell};
use std::task::{Context, Poll, Waker};

/// A one-shot signal that tasks on this shard can wait on (no atomics: one thread).
///
/// Every inbound HBONE connection waits on it for its whole life, so each one registers
/// through a [`DrainWaiter`] that holds a slot of its own and frees it when the connection
/// ends. (A plain list of wakers would grow by one per connection ever accepted, keep each
/// finished task's memory alive through its waker, and be scanned on every poll of every
/// connection.) The slots are indexed, not hashed: a connection's task checks its slot on
/// every poll, about three times per request on a busy connection, and a SipHash lookup there
/// cost a serving tunnel 660 of its 27,500 userspace instructions per request (round 21 of
/// `benches/`).
#[derive(Default)]
pub struct DrainSignal {
    fired: Cell<bool>,
    slots: RefCell<Slots>,
}

/// Waiters' wakers by slot; a freed slot is reused before the list grows.
#[derive(Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
    taken: usize,
}

impl DrainSignal {
    /// Whether draining has started.
    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }

    /// A handle one task polls to learn that draining started.
    pub fn waiter(&self) -> DrainWaiter<'_> {
        let mut slots = self.slots.borrow_mut();
        slots.taken += 1;
        let slot = match slots.free.pop() {
            Some(slot) => slot,
            None => {
                slots.wakers.push(None);
                slots.wakers.len() - 1
            }
        };
        DrainWaiter { signal: self, slot }
    }

    /// Tasks waiting right now (holding a waiter).
    pub fn waiting(&self) -> usize {
        self.slots.borrow().taken
    }

    /// Fires the signal: every waiting task is woken, later waiters see it at once.
    pub(super) fn fire(&self) {
        self.fired.set(true);
        // Taken out first: a woken task may drop its waiter, which borrows the slots.
        let wakers: Vec<Waker> = self
            .slots
            .borrow_mut()
            .wakers
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for w in wakers {
            w.wake();
        }
    }
}

/// One task's registration with a [`DrainSignal`]; dropping it unregisters the task.
pub struct DrainWaiter<'a> {
    signal: &'a DrainSignal,
    slot: usize,
}

impl DrainWaiter<'_> {
    /// Ready once draining has started; otherwise the task is woken when it does.
    pub fn poll_fired(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.fired.get() {
            return Poll::Ready(());
        }
        let mut slots = self.signal.slots.borrow_mut();
        if let Some(entry) = slots.wakers.get_mut(self.slot) {
            match entry {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *entry = Some(cx.waker().clone()),
            }
        }
        Poll::Pending
    }
}

impl Drop for DrainWaiter<'_> {
    fn drop(&mut self) {
        let mut slots = self.signal.slots.borrow_mut();
        if let Some(entry) = slots.wakers.get_mut(self.slot) {
            // Dropping the waker here, not at the next fire, releases the task's memory now.
            *entry = None;
            slots.free.push(self.slot);
            slots.taken -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Count(AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn drain_waiters_unregister_when_dropped_and_wake_when_fired() {
        let signal = DrainSignal::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        // Connections that come and go leave nothing behind.
        for _ in 0..1000 {
            let w = signal.waiter();
            assert!(w.poll_fired(&mut cx).is_pending());
            assert!(
                w.poll_fired(&mut cx).is_pending(),
                "polled again: same entry"
            );
            assert_eq!(signal.waiting(), 1);
        }
        assert_eq!(signal.waiting(), 0);
        assert_eq!(
            signal.slots.borrow().wakers.len(),
            1,
            "a freed slot is reused, not added to"
        );
        let gone = signal.waiter();
        assert!(gone.poll_fired(&mut cx).is_pending());
        drop(gone);
        let live = signal.waiter();
        assert!(live.poll_fired(&mut cx).is_pending());
        let other = Arc::new(Count(AtomicUsize::new(0)));
        let other_waker = Waker::from(other.clone());
        let also = signal.waiter();
        assert!(also
            .poll_fired(&mut Context::from_waker(&other_waker))
            .is_pending());
        assert_eq!(signal.waiting(), 2);
        signal.fire();
        assert_eq!(
            other.0.load(Ordering::Relaxed),
            1,
            "every live waiter is woken"
        );
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            1,
            "the live waiter is woken, the dropped one is not"
        );
        assert!(live.poll_fired(&mut cx).is_ready());
        assert!(
            signal.waiter().poll_fired(&mut cx).is_ready(),
            "late waiters see it too"
        );
    }
}
