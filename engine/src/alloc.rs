//! ringtun's allocator: mimalloc, asked for plain blocks where plain blocks will do, and the
//! one thing ringtun asks of it beyond malloc and free.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

// mimalloc's library comes from the `mimalloc` crate. The few entry points used are declared
// here rather than pulling in libmimalloc-sys's `extended` feature and its dependencies. The
// library must still name the crate: one nobody names is not linked, and binaries built on
// the library alone (tests, fuzz targets) would miss the symbols.
extern crate mimalloc as _;

unsafe extern "C" {
    fn mi_collect(force: bool);
    fn mi_malloc(size: usize) -> *mut c_void;
    fn mi_zalloc(size: usize) -> *mut c_void;
    fn mi_realloc(p: *mut c_void, newsize: usize) -> *mut c_void;
    fn mi_free(p: *mut c_void);
    fn mi_malloc_aligned(size: usize, alignment: usize) -> *mut c_void;
    fn mi_zalloc_aligned(size: usize, alignment: usize) -> *mut c_void;
    fn mi_realloc_aligned(p: *mut c_void, newsize: usize, alignment: usize) -> *mut c_void;
}

/// The alignment every mimalloc block has whatever its size: a machine word (its smallest size
/// class is one word, so a one-word block is no more aligned than that).
const PLAIN_ALIGN: usize = std::mem::size_of::<usize>();

/// The global allocator (main.rs): mimalloc.
///
/// The `mimalloc` crate's own `MiMalloc` sends every allocation through `mi_malloc_aligned`,
/// whose small-block fast path checks the alignment of the next free block and whose other
/// sizes (every buffer above 1 KiB) go through a generic aligned path before the plain one.
/// Nearly all of ringtun's allocations ask for a word's alignment or less, which every block
/// has, so those take `mi_malloc` directly: about 450 instructions fewer per request on each
/// side of the request/response test, 2,600 per pooled connection (counted with
/// `ringtun-bench --instructions`, round 21 of `benches/`).
pub struct Mimalloc;

// SAFETY: each method hands a layout's request to the mimalloc entry point with the same
// contract (a block of at least `size` bytes aligned to `align`, freed by `mi_free`): the
// plain entry points only when every block they return already has that alignment.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= PLAIN_ALIGN {
            mi_malloc(layout.size()).cast()
        } else {
            mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= PLAIN_ALIGN {
            mi_zalloc(layout.size()).cast()
        } else {
            mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi_free(ptr.cast());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= PLAIN_ALIGN {
            mi_realloc(ptr.cast(), new_size).cast()
        } else {
            mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        }
    }
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
