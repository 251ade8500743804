//! Checked transfers: a fast pseudo-random byte pattern, sent through a connection and read
//! back concurrently, with SHA-256 of both directions.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::echo::connect_in;
use crate::netns::{random_u64, Netns};

/// A fast deterministic byte stream (xorshift64*): random enough that a misplaced or duplicated
/// chunk changes the checksum, incompressible, and cheap enough for gigabytes.
#[derive(Clone, Debug)]
pub struct Pattern(u64);

impl Pattern {
    /// A new stream with a random seed.
    pub fn new() -> Self {
        Pattern(random_u64() | 1)
    }

    /// The stream for `seed`: the same bytes every time, different bytes for different seeds.
    pub fn seeded(seed: u64) -> Self {
        Pattern(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// Fills `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

impl Default for Pattern {
    fn default() -> Self {
        Self::new()
    }
}

/// The first `n` bytes of the stream for seed 0: the benchmarks' payload, the same in every
/// run.
pub fn pattern(n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    Pattern::seeded(0).fill(&mut out);
    out
}

/// SHA-256 hex of a byte slice.
pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Outcome of [`transfer`].
#[derive(Debug, Clone)]
pub struct Transfer {
    /// The client socket's local address (what `forwarded: for=` should carry).
    pub local: SocketAddr,
    /// Bytes sent.
    pub sent: u64,
    /// Bytes received back.
    pub received: u64,
    /// SHA-256 of what was sent, hex.
    pub sha_sent: String,
    /// SHA-256 of what came back, hex.
    pub sha_received: String,
    /// How long it took.
    pub took: Duration,
}

impl Transfer {
    /// Whether everything came back unchanged.
    pub fn is_exact(&self) -> bool {
        self.received == self.sent && self.sha_sent == self.sha_received
    }
}

/// Sends `n` pattern bytes to `dst` from inside `ns`, half-closes and reads everything back
/// (concurrently, so neither side's buffers can deadlock the transfer).
pub fn transfer(ns: &Netns, dst: &str, n: u64) -> std::io::Result<Transfer> {
    transfer_with(ns, dst, n, |_| {})
}

/// Like [`transfer`], calling `at_half` once half of the bytes are written (hot-reload tests
/// use it to change things while the connection is open).
pub fn transfer_with(
    ns: &Netns,
    dst: &str,
    n: u64,
    at_half: impl FnOnce(u64),
) -> std::io::Result<Transfer> {
    transfer_paced(ns, dst, n, 256 * 1024, Duration::ZERO, n - n / 2, at_half)
}

/// Echoes `n` bytes through `dst` in writes of `chunk` bytes with `pause` after each, calling
/// `at_bytes(written)` once `at` bytes are written; reads the echo concurrently.
pub fn transfer_paced(
    ns: &Netns,
    dst: &str,
    n: u64,
    chunk: usize,
    pause: Duration,
    at: u64,
    at_bytes: impl FnOnce(u64),
) -> std::io::Result<Transfer> {
    let start = Instant::now();
    let s = connect_in(ns, dst)?;
    paced_on(s, start, n, chunk, pause, at, at_bytes)
}

/// [`transfer_paced`] on a socket the caller connected (e.g. a marked one that the outbound
/// capture leaves alone); `start` is when the connection began.
pub fn paced_on(
    mut s: TcpStream,
    start: Instant,
    n: u64,
    chunk: usize,
    pause: Duration,
    at: u64,
    at_bytes: impl FnOnce(u64),
) -> std::io::Result<Transfer> {
    let local = s.local_addr()?;
    let mut r = s.try_clone()?;
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, String)> {
        let mut h = Sha256::new();
        let mut got = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return Ok((got, hex::encode(h.finalize()))),
                Ok(k) => {
                    h.update(&buf[..k]);
                    got += k as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    });
    let mut pat = Pattern::new();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; chunk];
    let mut sent = 0u64;
    let mut at_bytes = Some(at_bytes);
    let write_result = (|| -> std::io::Result<()> {
        while sent < n {
            let k = (n - sent).min(chunk as u64) as usize;
            pat.fill(&mut buf[..k]);
            s.write_all(&buf[..k])?;
            h.update(&buf[..k]);
            sent += k as u64;
            if sent >= at {
                if let Some(f) = at_bytes.take() {
                    f(sent);
                }
            }
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
        s.shutdown(Shutdown::Write)
    })();
    let read_result = reader
        .join()
        .map_err(|_| std::io::Error::other("reader thread panicked"))?;
    write_result?;
    let (received, sha_received) = read_result?;
    Ok(Transfer {
        local,
        sent: n,
        received,
        sha_sent: hex::encode(h.finalize()),
        sha_received,
        took: start.elapsed(),
    })
}

/// Reads until EOF or error; returns the bytes read and how it ended.
pub fn read_to_end_or_error(s: &mut TcpStream) -> (Vec<u8>, std::io::Result<()>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, Ok(())),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (out, Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_repeat_per_seed_and_differ_across_seeds() {
        let (mut a, mut b) = (vec![0u8; 1027], vec![0u8; 1027]);
        Pattern::seeded(7).fill(&mut a);
        Pattern::seeded(7).fill(&mut b);
        assert_eq!(a, b);
        Pattern::seeded(8).fill(&mut b);
        assert_ne!(a, b);
        assert_eq!(pattern(1027), pattern(1027));
        // Filling in pieces of whole words gives the same stream as one fill.
        let mut p = Pattern::seeded(7);
        let mut c = vec![0u8; 1027];
        let (x, y) = c.split_at_mut(512);
        p.fill(x);
        p.fill(y);
        assert_eq!(a, c);
        assert_eq!(sha256_hex(b"abc").len(), 64);
    }
}
