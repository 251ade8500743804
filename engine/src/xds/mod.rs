//! Istio's control plane, first steps: workloads, services and policies from istiod over Delta
//! xDS, and certificates from its CA.
//!
//! - [`proto`]: Envoy's and Istio's messages, by hand, with their field numbers.
//! - [`convert`]: `Address` and `Authorization` resources → the config model, with ztunnel's
//!   defaults.
//! - [`session`]: the Delta ADS session, sans IO (initial requests, ACK/NACK, what is held).
//! - [`channel`]: the TLS gRPC channel to istiod and the token headers.
//! - [`client`]: the ADS client on a thread of its own (its own small tokio runtime, never a
//!   shard): connects, subscribes, reconnects with backoff, and hands each new config to the
//!   control thread.
//! - [`demand`]: on-demand addresses (`XDS_ON_DEMAND`): the names asked for and their answers.
//! - [`status`]: what the client has seen (stream, versions, NACKs), for `/config_dump` and
//!   `/metrics`.
//! - [`ca`]: `CreateCertificate` for a fresh P-256 key.
//!
//! Environment variables and defaults are ztunnel's (`XDS_ADDRESS`, `XDS_ROOT_CA`,
//! `CA_ADDRESS`, `CA_ROOT_CA`, `ALT_XDS_HOSTNAME`, `AUTH_TOKEN`, `CLUSTER_ID`, `SECRET_TTL`,
//! `XDS_ON_DEMAND`,
//! `INSTANCE_IP`, `POD_NAME`, `POD_NAMESPACE`, `NODE_NAME`, `ISTIO_META_*`); `ringtun run`
//! reads them (see `cli`).

pub mod ca;
pub mod channel;
pub mod client;
pub mod convert;
pub mod demand;
mod error;
mod node;
pub mod proto;
pub mod session;
pub mod status;

#[cfg(test)]
mod tests;

pub use channel::{Endpoint, RootCert, Token};
pub use client::{spawn, Demander, XdsHandle, XdsUpdate};
pub use error::XdsError;
pub use node::{NodeInfo, XdsOptions};
pub use status::{SharedXdsStatus, XdsStatus};
