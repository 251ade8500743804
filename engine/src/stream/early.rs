//! Plaintext rustls decrypted before the record layer was taken over from it: delivered
//! before anything the next layer reads (kTLS or ringtun's userspace records alike).

use tokio::io::ReadBuf;

/// What is left of that plaintext.
#[derive(Debug, Default)]
pub struct Early {
    bytes: Vec<u8>,
    pos: usize,
}

impl Early {
    /// The plaintext rustls handed over.
    pub fn new(bytes: Vec<u8>) -> Self {
        Early { bytes, pos: 0 }
    }

    /// Bytes not delivered yet.
    pub fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// Moves what fits into `buf`: `Some(n)` while any was left (then nothing else may be
    /// read first), `None` once all of it was delivered (its buffer is let go then).
    pub fn deliver(&mut self, buf: &mut ReadBuf<'_>) -> Option<usize> {
        if self.pos == self.bytes.len() {
            return None;
        }
        let n = buf.remaining().min(self.left());
        buf.put_slice(&self.bytes[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == self.bytes.len() {
            *self = Early::default();
        }
        Some(n)
    }
}
