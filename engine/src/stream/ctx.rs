//! What a byte stream is given by the shard it runs on ([`StreamCtx`]) and what it counts.

use std::cell::Cell;
use std::time::Duration;

use tls_kernel_offload::Capability;

use super::RecordLimits;
use crate::options::TlsRecords;

/// What the byte-stream layers need from the shard they run on, and nothing more: built once
/// per shard, shared (`Rc`) by its connections.
#[derive(Debug)]
pub struct StreamCtx {
    /// The shard's number, for log lines.
    pub shard: usize,
    /// What the kernel can offload (`--ktls` and the probe); `None` keeps every connection
    /// on userspace rustls.
    pub ktls: Option<Capability>,
    /// The userspace record layer of connections the kernel does not carry (`--tls-records`).
    pub records: TlsRecords,
    /// Records an offloaded AES-GCM connection sends and receives before it retires
    /// (`--ktls-tx-record-limit`, `--ktls-rx-record-limit`; see [`super::KeyBudget`]).
    pub record_limits: RecordLimits,
    /// How long the TLS handshake may take, and then the switch to kTLS
    /// (`--handshake-timeout-ms`).
    pub handshake_timeout: Duration,
    /// What happened to this shard's connections.
    pub counters: TlsCounters,
}

impl StreamCtx {
    /// A context with zeroed counters.
    pub fn new(
        shard: usize,
        ktls: Option<Capability>,
        records: TlsRecords,
        record_limits: RecordLimits,
        handshake_timeout: Duration,
    ) -> Self {
        StreamCtx {
            shard,
            ktls,
            records,
            record_limits,
            handshake_timeout,
            counters: TlsCounters::default(),
        }
    }
}

/// Per-shard counts of HBONE connections by record layer, since start (plain cells: one
/// thread).
#[derive(Debug, Default)]
pub struct TlsCounters {
    /// Connections whose sending side the kernel encrypts (kTLS TX).
    pub ktls_tx: Cell<u64>,
    /// Connections whose receiving side the kernel decrypts (kTLS RX).
    pub ktls_rx: Cell<u64>,
    /// Connections carried by a userspace record layer (no kTLS, or offload not possible).
    pub userspace: Cell<u64>,
    /// Connections lost while taking the record layer over from rustls (for kTLS or ringtun's
    /// own userspace records), after rustls gave up its secrets.
    pub ktls_failed: Cell<u64>,
    /// Offloaded connections retired because a key (ours or the peer's) neared its usage
    /// limit.
    pub ktls_retired: Cell<u64>,
}

pub(super) fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}
