//! ringtun patch 5: wake-ups at the runtime's quiet points (see PATCHED.md).
//!
//! A quiet point is where the runtime has run every ready task and would wait in its driver.
//! A task that wants to act once per burst of work (ringtun's HBONE connections write the
//! frames of every stream that became ready at one) asks to be woken there. When the driver
//! can tell without waiting that completions are already there (io_uring: its completion
//! queue, or the kernel's task-work flag), the runtime first runs the tasks they wake, up to
//! a configurable number of such busy ticks in a row, so that a busy shard passes fewer quiet
//! points and each carries more work. Between two points the runtime parks at least once,
//! without waiting if it must, for what only a park does (timers, the poller).

use std::cell::{Cell, RefCell};
use std::task::Waker;

use crate::runtime::CURRENT;

/// A runtime's quiet-point state.
#[derive(Default)]
pub(crate) struct Quiet {
    /// Wakers to wake at the next quiet point.
    waiting: RefCell<Vec<Waker>>,
    /// The list being woken: kept so that its room is reused.
    spare: Cell<Vec<Waker>>,
    /// Quiet points passed.
    points: Cell<u32>,
    /// Busy ticks in a row that may pass before a quiet point is taken anyway.
    busy_limit: Cell<u32>,
    /// A waiting task has enough to do at the point that more busy ticks would only delay
    /// it: the next point comes as soon as the run queue empties.
    hurried: Cell<bool>,
}

impl Quiet {
    /// Whether any task waits for a quiet point.
    pub(crate) fn has_waiting(&self) -> bool {
        !self.waiting.borrow().is_empty()
    }

    /// Busy ticks in a row allowed before a quiet point.
    pub(crate) fn busy_limit(&self) -> u32 {
        self.busy_limit.get()
    }

    /// Whether a task asked for the next point without busy ticks ([`hurry_quiet`]).
    pub(crate) fn hurried(&self) -> bool {
        self.hurried.get()
    }

    /// Passes a quiet point: counts it and wakes everything that waited for it.
    pub(crate) fn pass(&self) {
        self.points.set(self.points.get().wrapping_add(1));
        self.hurried.set(false);
        let mut woken = self.spare.take();
        std::mem::swap(&mut woken, &mut *self.waiting.borrow_mut());
        // A woken task that asks again lands on the fresh list, for the next point.
        for w in woken.drain(..) {
            w.wake();
        }
        self.spare.set(woken);
    }
}

/// Wakes `waker` at this thread's runtime's next quiet point. Outside a runtime it is woken at
/// once and the answer is `false`.
pub fn wake_when_quiet(waker: &Waker) -> bool {
    if !CURRENT.is_set() {
        waker.wake_by_ref();
        return false;
    }
    CURRENT.with(|ctx| ctx.quiet.waiting.borrow_mut().push(waker.clone()));
    true
}

/// How many quiet points this thread's runtime has passed (wrapping); `None` outside a
/// runtime.
pub fn quiet_points() -> Option<u32> {
    if !CURRENT.is_set() {
        return None;
    }
    Some(CURRENT.with(|ctx| ctx.quiet.points.get()))
}

/// Asks for this thread's runtime's next quiet point as soon as the run queue empties, without
/// the busy ticks [`set_quiet_busy_ticks`] allows: a task that waits for the point already has
/// a batch large enough that more completions would only delay it. Outside a runtime this does
/// nothing.
pub fn hurry_quiet() {
    if CURRENT.is_set() {
        CURRENT.with(|ctx| ctx.quiet.hurried.set(true));
    }
}

/// Sets how many ticks in a row that found completions already waiting may pass before a
/// quiet point is taken anyway (0, the default: a quiet point whenever the run queue empties).
/// Only a driver that can see waiting completions without a system call (io_uring) defers;
/// outside a runtime this does nothing.
pub fn set_quiet_busy_ticks(n: u32) {
    if CURRENT.is_set() {
        CURRENT.with(|ctx| ctx.quiet.busy_limit.set(n));
    }
}
