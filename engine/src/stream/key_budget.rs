//! Counting the records an offloaded connection sends and receives under its one pair of
//! keys: nobody else counts once the kernel does the record layer.

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

/// Records an offloaded AES-GCM connection receives under the peer's key before it is
/// retired: 2^23, half of where the peer must rekey.
///
/// A rustls peer (ztunnel) sends a TLS KeyUpdate once it has sent its AES-GCM suite's
/// `confidentiality_limit` of records under one key: 2^24 for both TLS 1.3 AES-GCM suites,
/// with the ring and the aws-lc-rs providers alike (rustls 0.23, `CipherSuiteCommon`;
/// ChaCha20-Poly1305's is `u64::MAX`, so it never does). A kernel that cannot install the
/// next RX key must then close the connection with every stream on it. Retiring at 2^23
/// moves new streams to a fresh connection long before, and leaves another 2^23 records
/// (at least 128 GiB at full records) for the streams already there to finish.
pub const DEFAULT_RX_RECORD_LIMIT: u64 = 1 << 23;

/// How many records an offloaded connection has sent and received with its one pair of
/// keys, and whether it should stop taking new streams.
///
/// The kernel on Linux before 6.14 cannot rekey, so there an offloaded connection keeps its
/// first keys for life (on 6.14 and later [`super::KtlsIo`] follows the peer's KeyUpdate and
/// the counts start again, [`KeyBudget::rx_rekeyed`]). Past a direction's retire point the
/// connection is *retired*: the
/// outbound pool stops handing it out and the inbound side sends GOAWAY, so new streams go
/// to a fresh connection with fresh keys while the streams already on it finish.
///
/// - **Sending**: past `tx_retire_at +` [`TX_RECORD_MARGIN`] writes fail and the connection
///   closes, before the AES-GCM limit is reached.
/// - **Receiving**: the peer guards its own key (it rekeys at its limit; see
///   [`DEFAULT_RX_RECORD_LIMIT`]), so there is no hard stop here, only the retirement that
///   makes a long-lived connection unlikely to ever see the peer's KeyUpdate.
///
/// ChaCha20-Poly1305 has no practical limit (RFC 8446 section 5.5) and is never retired.
/// Shared (`Rc`) between the connection's [`super::KtlsIo`] and whoever decides about new
/// streams.
pub struct KeyBudget {
    tx: Cell<u64>,
    tx_retire_at: u64,
    tx_limit: u64,
    /// Records received as of the kernel's last answer (its RX record sequence number).
    rx: Cell<u64>,
    /// Plaintext bytes read since that answer.
    rx_unchecked: Cell<u64>,
    rx_retire_at: u64,
    retired: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl fmt::Debug for KeyBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyBudget")
            .field("tx", &self.tx.get())
            .field("tx_retire_at", &self.tx_retire_at)
            .field("rx", &self.rx.get())
            .field("rx_retire_at", &self.rx_retire_at)
            .field("retired", &self.retired.get())
            .finish_non_exhaustive()
    }
}

/// The limits a connection's [`KeyBudget`] starts from (`--ktls-tx-record-limit`,
/// `--ktls-rx-record-limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLimits {
    /// Records sent before the connection retires.
    pub tx: u64,
    /// Records received before the connection retires.
    pub rx: u64,
}

impl Default for RecordLimits {
    fn default() -> Self {
        RecordLimits {
            tx: DEFAULT_TX_RECORD_LIMIT,
            rx: DEFAULT_RX_RECORD_LIMIT,
        }
    }
}

impl KeyBudget {
    /// A budget for fresh keys of `cipher`; `rx_seq` is the number of records rustls already
    /// received under the peer's key before the switch.
    pub fn new(cipher: Cipher, limits: RecordLimits, rx_seq: u64) -> Self {
        let (tx_retire_at, tx_limit, rx_retire_at) = match cipher {
            Cipher::Aes128Gcm | Cipher::Aes256Gcm => (
                limits.tx,
                limits.tx.saturating_add(TX_RECORD_MARGIN),
                limits.rx,
            ),
            _ => (u64::MAX, u64::MAX, u64::MAX),
        };
        KeyBudget {
            tx: Cell::new(0),
            tx_retire_at,
            tx_limit,
            rx: Cell::new(rx_seq),
            rx_unchecked: Cell::new(0),
            rx_retire_at,
            retired: Cell::new(false),
            waker: Cell::new(None),
        }
    }

    /// Records sent so far (an upper bound).
    pub fn tx_records(&self) -> u64 {
        self.tx.get()
    }

    /// Records received, as of the kernel's last answer.
    pub fn rx_records(&self) -> u64 {
        self.rx.get()
    }

    /// Whether the connection should take no new streams.
    pub fn is_retired(&self) -> bool {
        self.retired.get()
    }

    /// Ready once the connection is retired; registers `cx` to be woken when it happens.
    pub fn poll_retired(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_retired() {
            return Poll::Ready(());
        }
        self.waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }

    /// Whether writes must fail: the TX key is worn out.
    pub(super) fn exhausted(&self) -> bool {
        self.tx.get() >= self.tx_limit
    }

    /// Retires the connection; true the first time.
    fn retire(&self) -> bool {
        if self.retired.replace(true) {
            return false;
        }
        if let Some(w) = self.waker.take() {
            w.wake();
        }
        true
    }

    /// Accounts for `records` sent; true when this charge retired the connection.
    pub(super) fn charge_tx(&self, records: u64) -> bool {
        let now = self.tx.get().saturating_add(records);
        self.tx.set(now);
        now >= self.tx_retire_at && self.retire()
    }

    /// Accounts for `bytes` of application data read; true when it is time to ask the
    /// kernel how many records it has decrypted ([`KeyBudget::rx_seen`]).
    ///
    /// Why this errs on the early side: the kernel may return several records in one read,
    /// so reads cannot be counted as records, but every record the peer sends carries at
    /// least one byte (rustls never sends empty application data records), so the records
    /// received are at most the last exact count plus the bytes read since. Only when that
    /// upper bound reaches the retire point is the exact count needed; with full records
    /// that is one `getsockopt` per several MiB, and at most one per read near the end. A
    /// peer sending empty records could be undercounted; the price would only be the
    /// close on its KeyUpdate that this budget is meant to make rare, never a key overused
    /// by ringtun (the peer guards its own key).
    pub(super) fn rx_bytes(&self, bytes: usize) -> bool {
        if self.retired.get() || bytes == 0 {
            return false;
        }
        let unchecked = self.rx_unchecked.get().saturating_add(bytes as u64);
        self.rx_unchecked.set(unchecked);
        self.rx.get().saturating_add(unchecked) >= self.rx_retire_at
    }

    /// The kernel's exact count of records received (its RX record sequence number); true
    /// when it retired the connection.
    pub(super) fn rx_seen(&self, records: u64) -> bool {
        self.rx.set(records.max(self.rx.get()));
        self.rx_unchecked.set(0);
        self.rx.get() >= self.rx_retire_at && self.retire()
    }

    /// The peer's next key is installed (it sent a KeyUpdate): its record count starts again.
    pub(super) fn rx_rekeyed(&self) {
        self.rx.set(0);
        self.rx_unchecked.set(0);
    }

    /// Our next key is installed (we answered a KeyUpdate): writes may go on past the old
    /// key's limit. A retired connection stays retired.
    pub(super) fn tx_rekeyed(&self) {
        self.tx.set(0);
    }

    /// The kernel could not say: take the upper bound (every byte a record) as the count,
    /// which can only retire the connection early.
    pub(super) fn rx_unknown(&self) -> bool {
        self.rx_seen(self.rx.get().saturating_add(self.rx_unchecked.get()))
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

    fn limits(tx: u64, rx: u64) -> RecordLimits {
        RecordLimits { tx, rx }
    }

    #[test]
    fn budget_retires_then_exhausts_aes_only() {
        let b = KeyBudget::new(Cipher::Aes128Gcm, limits(10, u64::MAX), 0);
        assert!(!b.is_retired());
        assert!(!b.charge_tx(9));
        assert!(
            b.charge_tx(1),
            "the charge that crosses the threshold reports it"
        );
        assert!(b.is_retired());
        assert!(!b.charge_tx(1), "reported once");
        assert!(!b.exhausted());
        b.charge_tx(TX_RECORD_MARGIN);
        assert!(b.exhausted());

        let c = KeyBudget::new(Cipher::Chacha20Poly1305, limits(10, 10), 0);
        c.charge_tx(1 << 40);
        assert!(!c.rx_bytes(1 << 40), "ChaCha20 never asks the kernel");
        assert!(!c.rx_seen(1 << 40));
        assert!(!c.is_retired() && !c.exhausted());
    }

    #[test]
    fn default_limits_stay_under_the_aes_gcm_bound() {
        // RFC 8446 5.5: 2^24.5 full-size records per AES-GCM key.
        let rfc = (2f64).powf(24.5) as u64;
        let b = KeyBudget::new(Cipher::Aes128Gcm, RecordLimits::default(), 0);
        assert!(b.tx_limit <= 1 << 24, "at most where rustls itself rekeys");
        assert!(b.tx_limit < rfc);
        // A rustls peer sends KeyUpdate after 2^24 records (its AES-GCM
        // confidentiality_limit); retire with room to spare for streams in flight.
        assert!(b.rx_retire_at <= (1 << 24) / 2);
    }

    #[test]
    fn rx_asks_the_kernel_only_when_the_byte_bound_could_have_reached_the_limit() {
        // Three records already decrypted by rustls before the switch.
        let b = KeyBudget::new(Cipher::Aes256Gcm, limits(u64::MAX, 100), 3);
        assert_eq!(b.rx_records(), 3);
        // Every record carries at least a byte: 96 bytes cannot be more than 96 records.
        assert!(!b.rx_bytes(96));
        assert!(b.rx_bytes(1), "3 + 97 bytes could be 100 records");
        // The kernel says 10 records (big ones): not retired, and the next look waits
        // until 90 more bytes could be 90 more records.
        assert!(!b.rx_seen(10));
        assert!(!b.is_retired());
        assert!(!b.rx_bytes(89));
        assert!(b.rx_bytes(1));
        assert!(b.rx_seen(100), "the look that crosses the limit retires");
        assert!(b.is_retired());
        assert!(!b.rx_bytes(1 << 30), "retired: no more looks");
        assert!(!b.rx_seen(1000), "retired once");
    }

    #[test]
    fn rx_without_the_kernel_count_retires_early_never_late() {
        let b = KeyBudget::new(Cipher::Aes128Gcm, limits(u64::MAX, 100), 0);
        assert!(b.rx_bytes(100));
        // The kernel cannot say: the byte bound (100 records) is taken as the count.
        assert!(b.rx_unknown());
        assert!(b.is_retired());
        // The kernel's count never goes backwards in the budget.
        let c = KeyBudget::new(Cipher::Aes128Gcm, limits(u64::MAX, 100), 50);
        assert!(!c.rx_seen(7));
        assert_eq!(c.rx_records(), 50);
    }

    #[test]
    fn either_direction_retires_the_connection_once() {
        let b = KeyBudget::new(Cipher::Aes128Gcm, limits(10, 10), 0);
        assert!(b.rx_bytes(10) && b.rx_seen(10));
        assert!(b.is_retired());
        assert!(!b.charge_tx(10), "already retired by the RX side");
        assert!(!b.exhausted());
    }

    #[test]
    fn a_followed_key_update_starts_the_counts_again() {
        let b = KeyBudget::new(Cipher::Aes128Gcm, limits(10, 100), 60);
        b.charge_tx(10 + TX_RECORD_MARGIN);
        assert!(b.exhausted() && b.is_retired());
        b.rx_rekeyed();
        assert_eq!(b.rx_records(), 0);
        // The kernel's count under the new key is small again: no retirement from it.
        assert!(!b.rx_seen(5));
        assert_eq!(b.rx_records(), 5);
        b.tx_rekeyed();
        assert!(!b.exhausted(), "a new TX key may be used");
        assert!(b.is_retired(), "retired stays retired");
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
        let b = KeyBudget::new(Cipher::Aes256Gcm, limits(3, 5), 0);
        assert!(b.poll_retired(&mut cx).is_pending());
        b.charge_tx(2);
        assert_eq!(count.0.load(Ordering::Relaxed), 0);
        b.charge_tx(2);
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        assert!(b.poll_retired(&mut cx).is_ready());

        let r = KeyBudget::new(Cipher::Aes256Gcm, limits(3, 5), 0);
        assert!(r.poll_retired(&mut cx).is_pending());
        r.rx_seen(5);
        assert_eq!(count.0.load(Ordering::Relaxed), 2, "the RX side wakes too");
    }
}
