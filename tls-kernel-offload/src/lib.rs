//! Kernel TLS (kTLS) offload for rustls connections on Linux.
//!
//! After rustls has completed a TLS 1.3 handshake on a TCP socket, this crate hands the
//! traffic keys to the Linux kernel (`setsockopt(TCP_ULP, "tls")`, then `TLS_TX` and
//! `TLS_RX`), so the kernel does the record layer: plain `write`s become encrypted
//! records, and `recvmsg` returns decrypted payload plus the record type. ringtun uses it
//! to move bulk tunnel bytes without userspace crypto, and to make `splice`-style paths
//! possible.
//!
//! What it is:
//!
//! - [`probe`]: what this kernel supports (the `tls` ULP; AES-128-GCM, AES-256-GCM,
//!   ChaCha20-Poly1305, per direction), as a [`Capability`] to log once at startup.
//! - The handoff: read the handshake with [`Corked`] / [`RecordBoundary`] so rustls never
//!   holds part of a record, then [`drain_and_extract`] (blocking) or [`try_extract`]
//!   (never touches the socket; for async runtimes) to flush, collect already-decrypted
//!   plaintext and extract the secrets, then [`enable`]. [`offload`] does all of it on a
//!   blocking socket.
//! - The record layer's control plane after offload: [`recv_record`] / [`recv_data`] read
//!   with the `TLS_GET_RECORD_TYPE` control message and deal with session tickets,
//!   alerts, and KeyUpdate; [`send_close_notify`] / [`send_record`] write non-data
//!   records; [`get_tls_tx_rx`] proves offload is active. The pure parsers
//!   ([`parse_record_type_cmsg`], [`classify`], [`parse_handshake`]) serve callers that
//!   issue their own `recvmsg` (io_uring) and fuzzing.
//! - [`RecordKeys`]: the same TLS 1.3 records sealed and opened in userspace with the
//!   extracted keys (sans-IO), where the kernel has no kTLS; the engine's userspace record
//!   layer runs on it instead of rustls' buffered connection (one copy per received byte
//!   instead of three).
//!
//! What it is not:
//!
//! - Not an async runtime adapter: it works on raw fds with std sockets and `libc`; an
//!   io_uring runtime (monoio) issues the same syscalls through its own ops and uses the
//!   pure helpers here.
//! - Not TLS 1.2: ringtun (and this crate) offload TLS 1.3 only.
//! - Following a peer's KeyUpdate only where the kernel can: Linux 6.14 and later
//!   ([`Capability::rekey`]) take the next keys, which [`follow_key_update`] derives from the
//!   traffic secrets [`SecretLog`] collected during the handshake ([`Rekey`]), and
//!   [`send_key_update`] starts one of our own; before 6.14 a
//!   KeyUpdate is reported as [`KtlsError::KeyUpdate`] and the connection must be closed.
//! - Not a rustls fallback by itself: once secrets are extracted the rustls connection is
//!   gone, so check [`Capability::can_offload_suite`] and call [`enable_ulp`] *before*
//!   extracting if a connection must be able to stay on rustls.
//! - Not NIC offload (`TLS_HW`): whatever the kernel picks is fine, the API is the same.
#![warn(missing_docs)]
#![cfg(target_os = "linux")]

mod crypto_info;
mod error;
mod gcm;
mod handoff;
mod probe;
mod record;
mod rekey;
mod stream;
mod userspace;

pub use crypto_info::{
    enable_ulp, get_crypto_state, get_tls_tx_rx, Cipher, CryptoState, Direction,
};
pub use error::KtlsError;
pub use handoff::{
    drain_and_extract, enable, offload, try_extract, Corked, Extracted, Handoff, Offloaded,
    RecordBoundary,
};
pub use probe::{probe, Capability, Support, Unavailable};
pub use record::{
    classify, parse_handshake, parse_record_type_cmsg, record_type_cmsg, recv_data, recv_record,
    send_alert, send_close_notify, send_record, HandshakeMsg, HandshakeParseError, Record,
    ALERT_BAD_RECORD_MAC, ALERT_CLOSE_NOTIFY, ALERT_LEVEL_FATAL, ALERT_LEVEL_WARNING,
    ALERT_RECORD_OVERFLOW, ALERT_UNEXPECTED_MESSAGE, ALERT_USER_CANCELED, CONTENT_ALERT,
    CONTENT_APPLICATION_DATA, CONTENT_CHANGE_CIPHER_SPEC, CONTENT_HANDSHAKE, HANDSHAKE_KEY_UPDATE,
    HANDSHAKE_NEW_SESSION_TICKET, MAX_RECORD_PLAINTEXT, RECORD_TYPE_CMSG_SPACE,
};
pub use rekey::{
    client_random, follow_key_update, key_update_message, send_key_update, KeyUpdatePlan, Rekey,
    SecretLog, TrafficSecret,
};
pub use stream::KtlsStream;
pub use userspace::{
    record_len, OpenError, Opened, RecordKeys, HEADER_LEN, MAX_RECORD, OVERHEAD, TAG_LEN,
};
