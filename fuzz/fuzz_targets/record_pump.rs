//! The userspace record layers (`ringtun::stream::pump`: rustls' and ringtun's own) driven by arbitrary operations against
//! a real rustls peer: records split anywhere, arbitrary and corrupted ciphertext, reads and
//! writes of any size, sockets that take a little or nothing, flushes, close_notify, end of
//! stream. It must never panic or spin, and must deliver only what the peer sent.
//!
//! The operations are spelled out in the engine's `stream/pump/script.rs`, which its unit tests
//! also run; it and the in-memory TLS pair it uses are included from there rather than
//! exported by the engine for test use only.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringtun::stream::pump::{Flush, KeyPump, Read, RecordPump, Records, Transmit, Write};

#[path = "../../engine/src/stream/pump/pair.rs"]
mod pair;
#[path = "../../engine/src/stream/pump/script.rs"]
mod script;

fuzz_target!(|data: &[u8]| script::run(data));
