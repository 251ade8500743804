//! HBONE protocol logic for ringtun.
//!
//! HBONE is Istio's tunnel: a TCP connection carried as one HTTP/2 `CONNECT` stream inside a mutual
//! TLS 1.3 connection to port 15008, with SPIFFE identities in the certificates. This crate holds
//! everything about that protocol that can be decided without a socket:
//!
//! - [`identity`]: SPIFFE identities (`spiffe://<trust domain>/ns/<namespace>/sa/<account>`);
//! - [`cert`]: reading identities out of X.509 certificates (URI SANs);
//! - [`verify`]: rustls verifiers that check a peer's chain against the mesh roots and its trust
//!   domain, and the post-handshake check that the peer is who the destination says it is;
//! - [`connect`]: building and validating `CONNECT` requests (`:authority`, `forwarded`, `baggage`,
//!   `traceparent`) and the status codes refusals map to;
//! - [`settings`]: HTTP/2 settings, ztunnel's defaults, applied to h2's builders;
//! - [`pool`]: which pooled HTTP/2 connection a new stream may ride on;
//! - [`stream`]: flow-controlled sending on an h2 stream.
//!
//! What it is not: no networking code, no runtime, no clock. Sockets, TLS handshakes and the event
//! loop live in the `ringtun` engine; time comes in as arguments. That keeps this logic testable
//! deterministically (see the proptests beside each module).
#![warn(missing_docs)]

pub mod addr;
pub mod cert;
pub mod connect;
pub mod error;
pub mod identity;
pub mod pool;
mod seen;
pub mod settings;
pub mod stream;
pub mod verify;

pub use error::HboneError;
pub use identity::Identity;

/// The port HBONE listens on, in ztunnel and here.
pub const HBONE_PORT: u16 = 15008;

/// The ALPN protocol id HBONE connections negotiate.
pub const ALPN_H2: &[u8] = b"h2";
