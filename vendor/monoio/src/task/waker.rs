use std::{
    future::Future,
    marker::PhantomData,
    mem::ManuallyDrop,
    ops,
    ptr::NonNull,
    task::{RawWaker, RawWakerVTable, Waker},
};

use super::{core::Header, Schedule};

pub(super) struct WakerRef<'a, S: 'static> {
    waker: ManuallyDrop<Waker>,
    _p: PhantomData<(&'a Header, S)>,
}

/// Returns a `WakerRef` which avoids having to pre-emptively increase the
/// refcount if there is no need to do so.
pub(super) fn waker_ref<T, S>(header: &Header) -> WakerRef<'_, S>
where
    T: Future,
    S: Schedule,
{
    // `Waker::will_wake` uses the VTABLE pointer as part of the check. This
    // means that `will_wake` will always return false when using the current
    // task's waker. (discussion at rust-lang/rust#66281).
    //
    // To fix this, we use a single vtable. Since we pass in a reference at this
    // point and not an *owned* waker, we must ensure that `drop` is never
    // called on this waker instance. This is done by wrapping it with
    // `ManuallyDrop` and then never calling drop.
    let waker = unsafe { ManuallyDrop::new(Waker::from_raw(raw_waker(header))) };

    WakerRef {
        waker,
        _p: PhantomData,
    }
}

impl<S> ops::Deref for WakerRef<'_, S> {
    type Target = Waker;

    fn deref(&self) -> &Waker {
        &self.waker
    }
}

// ringtun patch: one vtable for every task's waker. Upstream built the vtable in a generic
// function (`&RawWakerVTable::new(...)` per task type), and a promoted constant is not one
// object: each codegen unit that instantiates it has its own copy. The waker a task is polled
// with and a clone of it made elsewhere then differ in their vtable pointer, so
// `Waker::will_wake` was false for a task's own waker, and every `will_wake` check in h2,
// ringtun and futures cloned and dropped a waker on every poll. A `static` has one address; the
// task's own functions are reached through its header's vtable.
static WAKER_VTABLE: RawWakerVTable =
    RawWakerVTable::new(clone_waker, wake_by_val, wake_by_ref, drop_waker);

unsafe fn clone_waker(ptr: *const ()) -> RawWaker {
    let header = ptr as *const Header;
    trace!("MONOIO DEBUG[Waker]: clone_waker");
    (*header).state.ref_inc();
    raw_waker(header)
}

unsafe fn drop_waker(ptr: *const ()) {
    let header = ptr as *const Header;
    if (*header).state.ref_dec() {
        ((*header).vtable.dealloc)(NonNull::new_unchecked(ptr as *mut Header));
    }
}

unsafe fn wake_by_val(ptr: *const ()) {
    let header = ptr as *const Header;
    ((*header).vtable.wake_by_val)(NonNull::new_unchecked(ptr as *mut Header));
}

// Wake without consuming the waker
unsafe fn wake_by_ref(ptr: *const ()) {
    let header = ptr as *const Header;
    ((*header).vtable.wake_by_ref)(NonNull::new_unchecked(ptr as *mut Header));
}

pub(super) fn raw_waker(header: *const Header) -> RawWaker {
    RawWaker::new(header as *const (), &WAKER_VTABLE)
}
