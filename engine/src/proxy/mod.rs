//! The proxy paths: where each accepted connection goes and how its bytes move.
//!
//! - [`outbound`]: 15001 capture → service/workload lookup → HBONE (or plain TCP) to the peer;
//! - [`inbound`]: 15008 HBONE → identity check → the local workload;
//! - [`plaintext`]: 15006 plaintext capture and outbound passthrough;
//! - [`copy`]: the copy loops all of them end in;
//! - [`keepalive`]: HTTP/2 PING keepalive on HBONE connections;
//! - [`live`]: the shard's registry of live connections (idle limits, policy re-checks);
//! - [`access`]: the access-log line each connection leaves.

pub mod access;
pub mod copy;
pub mod inbound;
pub mod keepalive;
pub mod live;
pub mod outbound;
pub mod plaintext;
