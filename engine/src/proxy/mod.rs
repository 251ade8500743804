//! The proxy paths: where each accepted connection goes and how its bytes move.
//!
//! - [`serve`]: a shard's thread: control messages, and accept loops that hand each
//!   connection to its path;
//! - [`outbound`]: 15001 capture → routing → HBONE (or plain TCP) to the peer;
//! - [`inbound`]: 15008 HBONE → admission → the local workload;
//! - [`plaintext`]: 15006 plaintext capture and outbound passthrough;
//! - [`copy`]: the copy loops all of them end in;
//! - [`keepalive`]: HTTP/2 PING keepalive on HBONE connections;
//! - [`access`]: the access-log line each connection leaves;
//! - `lifecycle`: the record that writes it, once, and the one way to refuse a connection.
//!
//! What to do with a connection is decided in [`crate::decide`], apart from any I/O; the paths
//! here carry out those decisions.

pub mod access;
pub mod copy;
pub mod inbound;
pub mod keepalive;
mod lifecycle;
pub mod outbound;
pub mod plaintext;
pub mod serve;

/// The shard's live-connection registry, which the copy loops report to (kept here as well for
/// the relay benchmark's path).
pub use crate::shard::live;

use std::os::fd::AsRawFd;

use monoio::net::TcpStream;

use crate::decide::{self, Refusal};
use crate::net;

/// Where a connection that reached a capture listener was going before the redirect; a
/// connection that was not redirected is refused (see [`decide::captured`]).
fn original_destination(client: &TcpStream) -> Result<std::net::SocketAddr, Refusal> {
    let local = client
        .local_addr()
        .map(net::canonical)
        .map_err(|_| Refusal::NotRedirected)?;
    let original =
        net::original_dst(client.as_raw_fd(), local).map_err(|_| Refusal::NotRedirected)?;
    decide::captured(local, original)
}

#[cfg(test)]
mod tests;
