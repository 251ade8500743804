//! The byte stream HTTP/2 runs on in an HBONE connection: rustls does the handshake, then the
//! kernel's TLS record layer (kTLS) or, where the kernel has none, ringtun's own userspace one
//! carries the records with rustls' keys (`--tls-records rustls` keeps rustls' record layer
//! instead). One file per layer; none of them knows the shard, which hands each connection a
//! [`StreamCtx`].
//!
//! | file            | layer                                                               |
//! |-----------------|---------------------------------------------------------------------|
//! | `probe.rs`      | [`startup`]: can this kernel offload at all (once per process)       |
//! | `handshake.rs`  | [`handshake::client`] / [`handshake::server`]: the whole start-up     |
//! | `handshake_io.rs` | [`HandshakeIo`]: the socket under the TLS handshake, corked        |
//! | `establish.rs`  | [`establish`]: kTLS, ringtun's records or rustls', [`Established`]   |
//! | `early.rs`      | plaintext rustls decrypted before the take-over, delivered first     |
//! | `ktls.rs`       | [`KtlsIo`]: the kernel's record layer                                |
//! | `key_budget.rs` | [`KeyBudget`]: records sent and received with one pair of kTLS keys  |
//! | `pump/`         | [`pump::Records`]: the userspace record layers, no I/O: ringtun's    |
//! |                 | ([`pump::KeyPump`]) and rustls' ([`pump::RecordPump`])                 |
//! | `userspace.rs`  | [`UserspaceIo`]: the socket and waits around either                  |
//! | `flush.rs`      | [`FlushTick`]: one `writev` per shard tick                           |
//! | `hbone_io.rs`   | [`HboneIo`]: the one type h2 sees                                    |
//! | `path.rs`       | [`TlsPath`]: which layer carried a connection, for the access log    |
//!
//! A byte through the layers. Both ends of HBONE (outbound [`crate::proxy::outbound`], inbound
//! [`crate::proxy::inbound`]) start a connection with the same [`handshake`] sequence:
//!
//! 1. The socket is wrapped in a [`HandshakeIo`]. When kTLS or ringtun's record layer will
//!    take over (always, unless `--ktls off --tls-records rustls`) it is *corked*: every read
//!    stops at a TLS record boundary ([`tls_kernel_offload::RecordBoundary`]), so rustls never
//!    holds a fragment of a record the next layer would then miss.
//! 2. The tokio-rustls handshake runs over it, and the peer's identity is checked.
//! 3. [`establish`]: finish any record the handshake left half-read, flush what rustls still
//!    has to send, drain the plaintext it already decrypted and take its secrets; then, if the
//!    kernel can take this connection (probe result, negotiated cipher suite, the `tls` ULP
//!    attaches), hand them to the kernel and continue on a [`KtlsIo`], else continue on
//!    ringtun's userspace record layer with them ([`KeysIo`]: [`pump::KeyPump`] over
//!    [`tls_kernel_offload::RecordKeys`]). With `--tls-records rustls` and no kTLS the
//!    connection stays on rustls ([`RustlsIo`]). Whichever it is, the caller gets one
//!    [`HboneIo`], and everything above it (h2, the copy loops) is the same code.
//! 4. The HTTP/2 handshake runs on the [`HboneIo`].
//!
//! On the userspace path, a byte h2 writes is copied into the layer's send buffer behind a
//! record header and sealed there; it leaves in a `sendmsg` when h2 flushes, deferred to the
//! end of the shard tick by [`FlushTick`] so that every stream's frames share one `writev`. A
//! byte arriving is read by [`UserspaceIo`] in 64 KiB `recv`s into the layer's buffer, opened
//! in place there when h2 reads, and copied once, into h2's buffer. (Through rustls' layer it
//! was copied three times: into its deframer buffer in 4 KiB steps, into its plaintext queue,
//! into h2's buffer.) Session tickets are skipped, close_notify is end of stream, any other
//! alert a connection error, and a peer's KeyUpdate is followed with the traffic secrets the
//! handshake logged (`tls_kernel_offload::SecretLog`); ringtun moves its own key on every
//! [`pump::TX_REKEY_AT`] records, as rustls would.
//!
//! On the kTLS path the socket is read and written through monoio's poll I/O like any other,
//! as plaintext. The kernel reports a record that is not application data by failing the
//! plain read with `EIO`; [`KtlsIo`] then reads it with its record type (`recvmsg` and the
//! `TLS_GET_RECORD_TYPE` control message, via `tls_kernel_offload::recv_data`): session
//! tickets are skipped, close_notify is end of stream, any other alert is a connection error,
//! and a KeyUpdate is followed where the kernel can install new keys (Linux 6.14+, decided
//! by the startup probe: the next keys come from the handshake's traffic secrets, which rustls
//! logs to `tls_kernel_offload::SecretLog` only on such kernels) and otherwise closes the
//! connection with a log line naming why, because every record after it would be
//! undecryptable. Nobody counts records once the
//! kernel does the record layer, so [`KeyBudget`] does, both ways: what ringtun sends
//! (charged per write) and what the peer sends (the kernel's RX record sequence number);
//! either nearing its limit retires the connection long before a rustls peer's KeyUpdate
//! at 2^24 records. See there for the limits.

mod ctx;
mod early;
mod establish;
mod flush;
pub mod handshake;
mod handshake_io;
mod hbone_io;
mod key_budget;
mod ktls;
mod path;
mod probe;
pub mod pump;
mod userspace;

pub use ctx::{StreamCtx, TlsCounters};
pub use establish::{establish, Established, OffloadError};
pub use flush::{set_write_batch_bytes, FlushTick};
pub use handshake_io::HandshakeIo;
pub use hbone_io::HboneIo;
pub use key_budget::{
    KeyBudget, RecordLimits, DEFAULT_RX_RECORD_LIMIT, DEFAULT_TX_RECORD_LIMIT, TX_RECORD_MARGIN,
};
pub use ktls::KtlsIo;
pub use path::TlsPath;
pub use probe::startup;
pub use userspace::{KeysIo, RustlsIo, UserspaceIo};
