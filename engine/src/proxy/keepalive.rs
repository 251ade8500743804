//! HTTP/2 PING keepalive on HBONE connections, as ztunnel's: once a connection has been up for
//! the interval, a PING every interval; a peer that leaves one unanswered for the timeout is
//! dead and its connection is closed, so pooled streams stop going to it and nothing waits on
//! it forever (the kernel may keep a dead peer's TCP connection open for many minutes).

use std::time::Duration;

/// When to ping and when to give up (`interval` zero: no keepalive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Time between PINGs (and before the first).
    pub interval: Duration,
    /// How long a PING may go unanswered.
    pub timeout: Duration,
}

impl Default for Keepalive {
    /// ztunnel's: every 10 s, dead after 20 s without an answer.
    fn default() -> Self {
        Keepalive {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
        }
    }
}

/// Pings the peer for as long as it answers; returns why it is considered dead. Polled in the
/// task that drives the connection (the answer arrives through it); never returns when the
/// keepalive is off or h2 gave no PING handle.
pub async fn watch(ping: Option<h2::PingPong>, ka: Keepalive) -> String {
    let Some(mut ping) = ping.filter(|_| !ka.interval.is_zero()) else {
        return std::future::pending().await;
    };
    loop {
        monoio::time::sleep(ka.interval).await;
        match monoio::time::timeout(ka.timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("PING failed: {e}"),
            Err(_) => return format!("no answer to a PING within {:?}", ka.timeout),
        }
    }
}
