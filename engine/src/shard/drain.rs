//! [`DrainSignal`]: the one-shot "draining started" signal every connection on a shard can
//! wait on.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::task::{Context, Poll, Waker};

/// A one-shot signal that tasks on this shard can wait on (no atomics: one thread).
///
/// Every inbound HBONE connection waits on it for its whole life, so each one registers
/// through a [`DrainWaiter`] that forgets its waker when the connection ends. (A plain list of
/// wakers would grow by one per connection ever accepted, keep each finished task's memory
/// alive through its waker, and be scanned on every poll of every connection.)
#[derive(Default)]
pub struct DrainSignal {
    fired: Cell<bool>,
    next_key: Cell<u64>,
    wakers: RefCell<HashMap<u64, Waker>>,
}

impl DrainSignal {
    /// Whether draining has started.
    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }

    /// A handle one task polls to learn that draining started.
    pub fn waiter(&self) -> DrainWaiter<'_> {
        let key = self.next_key.get();
        self.next_key.set(key + 1);
        DrainWaiter { signal: self, key }
    }

    /// Tasks waiting right now.
    pub fn waiting(&self) -> usize {
        self.wakers.borrow().len()
    }

    /// Fires the signal: every waiting task is woken, later waiters see it at once.
    pub(super) fn fire(&self) {
        self.fired.set(true);
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for (_, w) in wakers {
            w.wake();
        }
    }
}

/// One task's registration with a [`DrainSignal`]; dropping it unregisters the task.
pub struct DrainWaiter<'a> {
    signal: &'a DrainSignal,
    key: u64,
}

impl DrainWaiter<'_> {
    /// Ready once draining has started; otherwise the task is woken when it does.
    pub fn poll_fired(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.fired.get() {
            return Poll::Ready(());
        }
        let mut wakers = self.signal.wakers.borrow_mut();
        match wakers.get_mut(&self.key) {
            Some(w) if w.will_wake(cx.waker()) => {}
            Some(w) => *w = cx.waker().clone(),
            None => {
                wakers.insert(self.key, cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

impl Drop for DrainWaiter<'_> {
    fn drop(&mut self) {
        self.signal.wakers.borrow_mut().remove(&self.key);
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
        let live = signal.waiter();
        assert!(live.poll_fired(&mut cx).is_pending());
        signal.fire();
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            1,
            "the live waiter is woken"
        );
        assert!(live.poll_fired(&mut cx).is_ready());
        assert!(
            signal.waiter().poll_fired(&mut cx).is_ready(),
            "late waiters see it too"
        );
    }
}
