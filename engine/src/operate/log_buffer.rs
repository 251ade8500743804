//! Where log lines go: stderr, one `write` per shard tick rather than one per line.
//!
//! Every connection writes an access line when it closes (as ztunnel does). With a `write(2)`
//! per line, a shard closing thousands of connections a second spent about a sixth of its CPU
//! on the log (round 10 of the benchmark reports). On a shard thread, lines are appended to
//! the thread's buffer instead, and a task of the shard ([`flusher`]) writes the buffer out
//! once the connections that were ready in the same tick have run: a line reaches stderr
//! before the shard next waits for I/O, in the same order, whole. Other threads (the control
//! thread, the admin API) and a shard thread before its runtime starts write at once.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Write};
use std::task::{Poll, Waker};

use tracing_subscriber::fmt::MakeWriter;

/// Past this many bytes a buffer is written out at once, without waiting for the tick's end.
const FLUSH_AT: usize = 64 * 1024;

/// One shard thread's pending lines and the task that writes them.
struct TickBuffer {
    bytes: Vec<u8>,
    flusher: Option<Waker>,
}

thread_local! {
    /// Set while a shard's [`Batching`] guard lives on this thread.
    static TICK: RefCell<Option<TickBuffer>> = const { RefCell::new(None) };
}

/// Writes `bytes` to stderr and empties it; a line that cannot be written is dropped, as a
/// direct write's error would be.
fn write_out(bytes: &mut Vec<u8>) {
    if !bytes.is_empty() {
        #[cfg(not(test))]
        let _ = io::stderr().lock().write_all(bytes);
        #[cfg(test)]
        tests::WRITTEN.with(|w| w.borrow_mut().extend_from_slice(bytes));
        bytes.clear();
    }
}

/// Appends `line` to this thread's tick buffer; `false` where the thread has none (write it
/// at once).
fn append(line: &[u8]) -> bool {
    TICK.with(|t| {
        let Ok(mut t) = t.try_borrow_mut() else {
            return false;
        };
        let Some(b) = t.as_mut() else {
            return false;
        };
        let first = b.bytes.is_empty();
        b.bytes.extend_from_slice(line);
        if b.bytes.len() >= FLUSH_AT {
            write_out(&mut b.bytes);
        } else if first {
            if let Some(w) = &b.flusher {
                w.wake_by_ref();
            }
        }
        true
    })
}

/// Writes this thread's pending lines now.
fn flush_now() {
    TICK.with(|t| {
        if let Ok(mut t) = t.try_borrow_mut() {
            if let Some(b) = t.as_mut() {
                write_out(&mut b.bytes);
            }
        }
    });
}

/// While it lives, log lines written on this thread wait for [`flusher`]; dropped (the shard
/// ends, or unwinds), it writes what is pending and lines go straight to stderr again.
pub struct Batching(());

impl Drop for Batching {
    fn drop(&mut self) {
        TICK.with(|t| {
            if let Ok(mut t) = t.try_borrow_mut() {
                if let Some(mut b) = t.take() {
                    write_out(&mut b.bytes);
                }
            }
        });
    }
}

/// Starts batching this thread's log lines; the shard must also run [`flusher`] as a task.
pub fn batching() -> Batching {
    TICK.with(|t| {
        if let Ok(mut t) = t.try_borrow_mut() {
            *t = Some(TickBuffer {
                bytes: Vec::new(),
                flusher: None,
            });
        }
    });
    Batching(())
}

/// The shard's task that writes the lines buffered during a tick. Woken by the first line of
/// a tick, it runs after the tasks already queued, so one write carries every line they add.
pub fn flusher() -> impl Future<Output = ()> {
    std::future::poll_fn(|cx| {
        flush_now();
        TICK.with(|t| {
            if let Ok(mut t) = t.try_borrow_mut() {
                if let Some(b) = t.as_mut() {
                    if !b.flusher.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        b.flusher = Some(cx.waker().clone());
                    }
                }
            }
        });
        Poll::Pending
    })
}

/// Writes one whole line: into the thread's tick buffer where there is one, else to stderr
/// at once (in tests, into the thread's record of what was written).
pub fn write_line(line: &[u8]) {
    if !append(line) {
        #[cfg(not(test))]
        let _ = io::stderr().write_all(line);
        #[cfg(test)]
        tests::WRITTEN.with(|w| w.borrow_mut().extend_from_slice(line));
    }
}

/// Takes what this thread wrote through [`write_line`] and its tick buffer (tests).
#[cfg(test)]
pub fn take_written() -> Vec<u8> {
    tests::WRITTEN.with(|w| std::mem::take(&mut *w.borrow_mut()))
}

/// The log's writer: the thread's tick buffer where there is one, else stderr.
#[derive(Clone, Copy, Debug, Default)]
pub struct LineSink;

/// One event's line, handed to [`LineSink`].
#[derive(Debug)]
pub struct LineWriter;

impl<'a> MakeWriter<'a> for LineSink {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter
    }
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if append(buf) {
            Ok(buf.len())
        } else {
            io::stderr().write(buf)
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if append(buf) {
            Ok(())
        } else {
            io::stderr().write_all(buf)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// What this test thread's buffer wrote out.
        pub(super) static WRITTEN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }

    fn written() -> Vec<u8> {
        WRITTEN.with(|w| std::mem::take(&mut *w.borrow_mut()))
    }

    fn pending() -> Vec<u8> {
        TICK.with(|t| {
            t.borrow()
                .as_ref()
                .map(|b| b.bytes.clone())
                .unwrap_or_default()
        })
    }

    #[test]
    fn lines_wait_for_the_flusher_only_while_batching() {
        assert!(!append(b"direct\n"), "no buffer before batching starts");
        let guard = batching();
        assert!(append(b"one\n"));
        assert!(append(b"two\n"));
        assert_eq!(pending(), b"one\ntwo\n");
        // The flusher writes them out and waits for the next tick's first line.
        let mut fut = std::pin::pin!(flusher());
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(
            written().is_empty(),
            "nothing written before the flusher runs"
        );
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(pending(), b"");
        assert_eq!(written(), b"one\ntwo\n", "one write, lines in order");
        assert!(append(b"three\n"));
        drop(guard);
        assert_eq!(
            written(),
            b"three\n",
            "the guard's drop writes what is pending"
        );
        assert!(!append(b"after\n"), "and ends batching");
    }

    #[test]
    fn a_full_buffer_is_written_without_waiting_for_the_tick() {
        let _guard = batching();
        let line = vec![b'x'; 1024];
        for _ in 0..(FLUSH_AT / line.len()) {
            assert!(append(&line));
        }
        assert!(
            pending().is_empty(),
            "written out once it reached {FLUSH_AT}"
        );
        assert_eq!(written().len(), FLUSH_AT);
    }
}
