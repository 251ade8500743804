//! The variants (ways of handing bytes to a kTLS socket) and the stream every run sends.

use std::fmt;
use std::sync::OnceLock;

use crate::{PERIOD, TAIL};

/// A way of handing bytes to the kTLS socket (see the binary's docs for each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    UringSend,
    Write,
    UringSendZc,
    MsgZerocopy,
    Sendfile,
    SendfileRo,
    UringRecvSend,
    ReadWrite,
    Splice,
    UringSplice,
}

/// Every variant, in the table's order.
pub const ALL: [Variant; 10] = [
    Variant::UringSend,
    Variant::Write,
    Variant::UringSendZc,
    Variant::MsgZerocopy,
    Variant::Sendfile,
    Variant::SendfileRo,
    Variant::UringRecvSend,
    Variant::ReadWrite,
    Variant::Splice,
    Variant::UringSplice,
];

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::UringSend => "uring-send",
            Variant::Write => "write",
            Variant::UringSendZc => "uring-send-zc",
            Variant::MsgZerocopy => "msg-zerocopy",
            Variant::Sendfile => "sendfile",
            Variant::SendfileRo => "sendfile-ro",
            Variant::UringRecvSend => "uring-recv-send",
            Variant::ReadWrite => "read-write",
            Variant::Splice => "splice",
            Variant::UringSplice => "uring-splice",
        }
    }

    /// Whether the bytes come from a plaintext socket (relay) rather than a buffer.
    pub fn relays(self) -> bool {
        matches!(
            self,
            Variant::UringRecvSend | Variant::ReadWrite | Variant::Splice | Variant::UringSplice
        )
    }

    /// The variant the ratios in the table are relative to.
    pub fn baseline(self) -> Variant {
        if self.relays() {
            Variant::UringRecvSend
        } else {
            Variant::UringSend
        }
    }

    pub fn parse(s: &str) -> Option<Variant> {
        ALL.iter().copied().find(|v| v.name() == s)
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ------------------------------------------------------------------ the stream

/// The bytes every run sends: xorshift output, repeating every [`PERIOD`] bytes.
pub struct Pattern {
    pub bytes: Vec<u8>,
}

impl Pattern {
    pub fn get() -> &'static Pattern {
        static P: OnceLock<Pattern> = OnceLock::new();
        P.get_or_init(|| {
            let mut bytes = ringtun_testbed::pattern(PERIOD);
            bytes.reserve(TAIL);
            bytes.extend_from_within(..TAIL);
            Pattern { bytes }
        })
    }

    /// The `len` stream bytes starting at stream offset `off` (`len` ≤ [`TAIL`]).
    pub fn at(&self, off: usize, len: usize) -> &[u8] {
        let start = off % PERIOD;
        &self.bytes[start..start + len]
    }
}
