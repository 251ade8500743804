//! The one thing ringtun asks of its allocator (mimalloc) beyond malloc and free.

// mimalloc comes from the `mimalloc` crate (the global allocator in main.rs). Only this one
// entry point of its extended API is used, so it is declared here rather than pulling in
// libmimalloc-sys's `extended` feature and its dependencies. The library must still name the
// crate: one nobody names is not linked, and binaries built on the library alone (tests, fuzz
// targets) would miss the symbol.
extern crate mimalloc as _;

unsafe extern "C" {
    fn mi_collect(force: bool);
}

/// Has the calling thread's allocator heap return the pages it has free to the OS now.
///
/// mimalloc gives freed pages back only after a delay (1 s), and only when it is next called on
/// that thread with work to do. A shard whose connections have all gone quiet does not allocate,
/// so the read buffers it let go of stayed resident for as long as the connections stayed idle.
/// The shard's idle sweeper calls this once after releasing buffers (not per connection: it
/// visits every page of the thread's heap, some hundreds of microseconds with 10,000
/// connections).
pub fn collect_freed() {
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any time.
    unsafe { mi_collect(true) }
}
