//! Chains a thread has already verified, so that a peer which connects again does not cost a
//! chain validation on every handshake.
//!
//! Validating a peer's chain checks an ECDSA signature per certificate; with a TLS handshake
//! per connection (a pool that does not hold connections, a peer that does not pool) that was
//! about a seventh of a tunnel's CPU. The handshake's own proof, the peer's signature over
//! this handshake with its certificate's key (`CertificateVerify`), is checked every time:
//! what is remembered is only that these exact certificates chained to the verifier's roots,
//! and the window in which every one of them is valid, so an expired chain is verified again
//! (and refused). Remembered per thread (a shard verifies its own handshakes: no lock) and per
//! verifier (new roots make a new verifier, which remembers nothing); only chains that passed.
//! Revocation is not checked by these verifiers: one that learns to (CRLs) must forget what it
//! remembered whenever its lists change.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Chains one thread remembers, over all verifiers; past this it forgets them all.
const SEEN_MAX: usize = 1024;

/// A chain's digest (with its verifier's number): SHA-256, so a chain that was never verified
/// cannot pass for one that was.
type Key = [u8; 32];

/// When every certificate of a chain is valid: Unix seconds, both ends included (as webpki
/// checks them).
#[derive(Clone, Copy, Debug)]
struct Window {
    not_before: i64,
    not_after: i64,
}

thread_local! {
    static CHAINS: RefCell<HashMap<Key, Window>> = RefCell::new(HashMap::new());
}

/// Numbers verifiers, so that one never takes another's (other roots') chains as verified.
static NEXT_VERIFIER: AtomicU64 = AtomicU64::new(1);

/// One verifier's memory of the chains it verified, kept per thread.
#[derive(Debug)]
pub(crate) struct Seen {
    verifier: u64,
}

impl Seen {
    /// A memory for a new verifier: nothing verified yet.
    pub(crate) fn new() -> Seen {
        Seen {
            verifier: NEXT_VERIFIER.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn key(&self, end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Key {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(&self.verifier.to_be_bytes());
        for c in std::iter::once(end_entity).chain(intermediates) {
            // Lengths first: certificates of other sizes cannot be spliced into the same bytes.
            ctx.update(&(c.len() as u64).to_be_bytes());
            ctx.update(c);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        key
    }

    /// `Ok` if this thread's verifier verified exactly this chain before and all of it is
    /// valid at `now`; else the chain's key, for [`Seen::remember`] once it is verified.
    pub(crate) fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), Key> {
        let key = self.key(end_entity, intermediates);
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let hit = CHAINS.with(|c| {
            c.borrow()
                .get(&key)
                .is_some_and(|w| w.not_before <= now && now <= w.not_after)
        });
        if hit {
            Ok(())
        } else {
            Err(key)
        }
    }

    /// Remembers a chain that just passed verification (a certificate that does not parse
    /// here is not remembered: it is verified each time, as before).
    pub(crate) fn remember(
        &self,
        key: Key,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) {
        let mut window = Window {
            not_before: i64::MIN,
            not_after: i64::MAX,
        };
        for c in std::iter::once(end_entity).chain(intermediates) {
            let Ok((_, cert)) = X509Certificate::from_der(c) else {
                return;
            };
            let v = cert.validity();
            window.not_before = window.not_before.max(v.not_before.timestamp());
            window.not_after = window.not_after.min(v.not_after.timestamp());
        }
        CHAINS.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() >= SEEN_MAX {
                c.clear();
            }
            c.insert(key, window);
        });
    }
}

#[cfg(test)]
pub(crate) fn remembered() -> usize {
    CHAINS.with(|c| c.borrow().len())
}
