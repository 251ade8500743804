//! Decisions apart from I/O: where an outbound connection goes ([`route()`]), whether an
//! inbound one is for a workload served here and allowed in ([`admit_hbone`],
//! [`admit_plaintext`]), what policy admitted it on ([`Grant`], re-checked by [`revoked`]),
//! and the refusal a connection gets when it is not carried ([`Refusal`]).
//!
//! Pure functions over a config [`Snapshot`](crate::config::Snapshot) and plain values (the
//! shard's options as a [`Scope`], its random source for endpoint choices as a
//! [`Balancer`]): no sockets, no shard, no clock. The proxy paths act on what they return, once.

mod balance;
mod inbound;
mod refusal;
mod route;
mod scope;

use std::net::SocketAddr;

pub use balance::Balancer;
pub use inbound::{
    admit_hbone, admit_plaintext, authorize, connect_target, resolve_hostname, response_baggage,
    revoked, Admission, Arrival, Authority, Grant,
};
pub use refusal::Refusal;
pub use route::{request_baggage, route, Route};
pub use scope::Scope;

/// The original destination of a connection that reached a capture listener at `local`:
/// `original` (what the redirect rewrote, canonical), unless it is the listener itself, i.e.
/// the connection was not redirected and connecting onwards would loop.
pub fn captured(local: SocketAddr, original: SocketAddr) -> Result<SocketAddr, Refusal> {
    if original == local {
        return Err(Refusal::NotRedirected);
    }
    Ok(crate::net::canonical(original))
}

#[cfg(test)]
mod balance_tests;
#[cfg(test)]
mod tests;
