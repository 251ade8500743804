//! ringtun: a thread-per-core HBONE tunnel engine, a drop-in for Istio ambient's ztunnel.
//!
//! One shard per core runs a monoio runtime on io_uring and owns its listeners, connections,
//! HBONE pool and counters ([`shard`]); a control thread loads and watches the config, feeds
//! the shards and drains them ([`control`]). Each accepted connection takes one of the paths in
//! [`proxy`]. What operators see (metrics, readiness, the admin API, the log filter) is
//! [`operate`]; the command line is [`cli`]. Workloads, policies and certificates from istiod
//! (instead of a local file and mounted certificates) come through [`xds`]. Protocol logic that
//! needs no socket lives in the `ringtun-hbone` crate. The DNS proxy is [`dns`].
#![warn(missing_docs)]

pub mod alloc;
pub mod cli;
pub mod config;
pub mod control;
pub mod decide;
pub mod dns;
mod error;
pub mod exposition;
pub mod inpod;
pub mod metrics;
pub mod net;
pub mod operate;
pub mod options;
pub mod pki;
pub mod policy;
pub mod proxy;
pub mod shard;
pub mod stream;
pub mod tls;
pub mod xds;

pub use error::EngineError;
