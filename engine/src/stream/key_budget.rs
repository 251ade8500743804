//! Counting the records an offloaded connection sends with its one TX key: nobody else counts
//! once the kernel encrypts.

use std::cell::Cell;
use std::fmt;
use std::task::{Context, Poll, Waker};

use tls_kernel_offload::{self as ktls, Cipher};

/// Records an offloaded AES-GCM connection sends with one key before it is retired (no new
/// streams; GOAWAY from the server side): 2^23, about 8.4 million.
///
/// RFC 8446 section 5.5 allows about 2^24.5 full-size records per AES-GCM key; rustls
/// rekeys its own connections before 2^24. ringtun's count is an upper bound (every write
/// is charged as if it started a new record), so the real number is lower still. Retiring
/// at 2^23 leaves [`TX_RECORD_MARGIN`] (another 2^23 records, at least 128 GiB at full
/// records) for the streams already on the connection to finish before the hard stop at
/// 2^24.
pub const DEFAULT_TX_RECORD_LIMIT: u64 = 1 << 23;

/// Records a retired connection may still send before writes fail; see
/// [`DEFAULT_TX_RECORD_LIMIT`].
pub const TX_RECORD_MARGIN: u64 = 1 << 23;

/// How many records an offloaded connection has sent with its one TX key, and whether it
/// should stop being used.
///
/// The kernel on Linux before 6.13 cannot rekey (and ringtun does not implement kTLS rekey
/// for later kernels), so an offloaded connection keeps its first key for life. Past
/// `retire_at` records the connection is *retired*: the outbound pool stops handing it out
/// and the inbound side sends GOAWAY, so new streams go to a fresh connection with fresh
/// keys while the streams already on it finish. Past `retire_at +` [`TX_RECORD_MARGIN`]
/// writes fail and the connection closes, before the AES-GCM limit is reached.
/// ChaCha20-Poly1305 has no practical limit (RFC 8446 section 5.5) and is never retired.
///
/// Shared (`Rc`) between the connection's [`super::KtlsIo`] and whoever decides about new
/// streams.
pub struct KeyBudget {
    records: Cell<u64>,
    retire_at: u64,
    limit: u64,
    waker: Cell<Option<Waker>>,
}

impl fmt::Debug for KeyBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyBudget")
            .field("records", &self.records.get())
            .field("retire_at", &self.retire_at)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl KeyBudget {
    /// A budget for a fresh key of `cipher`, retiring after `retire_at` records.
    pub fn new(cipher: Cipher, retire_at: u64) -> Self {
        let (retire_at, limit) = match cipher {
            Cipher::Aes128Gcm | Cipher::Aes256Gcm => {
                (retire_at, retire_at.saturating_add(TX_RECORD_MARGIN))
            }
            _ => (u64::MAX, u64::MAX),
        };
        KeyBudget {
            records: Cell::new(0),
            retire_at,
            limit,
            waker: Cell::new(None),
        }
    }

    /// Records sent so far (an upper bound).
    pub fn records(&self) -> u64 {
        self.records.get()
    }

    /// Whether the connection should take no new streams.
    pub fn is_retired(&self) -> bool {
        self.records.get() >= self.retire_at
    }

    /// Ready once the connection is retired; registers `cx` to be woken when it happens.
    pub fn poll_retired(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_retired() {
            return Poll::Ready(());
        }
        self.waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }

    /// Whether writes must fail: the key is worn out.
    pub(super) fn exhausted(&self) -> bool {
        self.records.get() >= self.limit
    }

    /// Accounts for `records`; true when this charge retired the connection.
    pub(super) fn charge(&self, records: u64) -> bool {
        let before = self.records.get();
        let now = before.saturating_add(records);
        self.records.set(now);
        if before < self.retire_at && now >= self.retire_at {
            if let Some(w) = self.waker.take() {
                w.wake();
            }
            return true;
        }
        false
    }
}

/// Upper bound of the records one `write`/`writev` of `bytes` makes the kernel send: it
/// splits at 16 KiB and may close a record at the end of every call.
pub(super) fn records_for(bytes: usize) -> u64 {
    if bytes == 0 {
        0
    } else {
        1 + (bytes / ktls::MAX_RECORD_PLAINTEXT) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_overcounted_never_under() {
        assert_eq!(records_for(0), 0);
        assert_eq!(records_for(1), 1);
        assert_eq!(records_for(16 * 1024 - 1), 1);
        // Exactly one full record is charged as two: the bound may be loose, never short.
        assert_eq!(records_for(16 * 1024), 2);
        assert_eq!(records_for(1 << 20), 65);
    }

    #[test]
    fn budget_retires_then_exhausts_aes_only() {
        let b = KeyBudget::new(Cipher::Aes128Gcm, 10);
        assert!(!b.is_retired());
        assert!(!b.charge(9));
        assert!(
            b.charge(1),
            "the charge that crosses the threshold reports it"
        );
        assert!(b.is_retired());
        assert!(!b.charge(1), "reported once");
        assert!(!b.exhausted());
        b.charge(TX_RECORD_MARGIN);
        assert!(b.exhausted());

        let c = KeyBudget::new(Cipher::Chacha20Poly1305, 10);
        c.charge(1 << 40);
        assert!(!c.is_retired() && !c.exhausted());
    }

    #[test]
    fn default_limits_stay_under_the_aes_gcm_bound() {
        // RFC 8446 5.5: 2^24.5 full-size records per AES-GCM key.
        let rfc = (2f64).powf(24.5) as u64;
        let hard = KeyBudget::new(Cipher::Aes128Gcm, DEFAULT_TX_RECORD_LIMIT).limit;
        assert!(hard <= 1 << 24, "at most where rustls itself rekeys");
        assert!(hard < rfc);
    }

    #[test]
    fn budget_wakes_the_waiter_when_retired() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let b = KeyBudget::new(Cipher::Aes256Gcm, 3);
        assert!(b.poll_retired(&mut cx).is_pending());
        b.charge(2);
        assert_eq!(count.0.load(Ordering::Relaxed), 0);
        b.charge(2);
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        assert!(b.poll_retired(&mut cx).is_ready());
    }
}
