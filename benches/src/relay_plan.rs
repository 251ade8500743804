//! Where a benchmark relay listens and forwards on ringtun-bench's two-namespace topology.

use std::net::SocketAddr;

use ringtun_testbed::DEFAULT_MARK;

/// Where one side of a relay pair listens, where it forwards, and the mark its outgoing
/// connections carry (the client side's must pass the capture rule untouched).
///
/// The client side listens on the capture port (15001) and forwards every connection to the
/// server side's 15008; the server side forwards to the benchmark's load server. Each contender
/// pair has namespaces of its own with the same addresses, so these hold for every pair.
pub fn plan(side: &str) -> Option<(SocketAddr, SocketAddr, u32)> {
    match side {
        "client" => Some((
            SocketAddr::from(([0, 0, 0, 0], 15001)),
            SocketAddr::from(([10, 77, 0, 2], 15008)),
            DEFAULT_MARK,
        )),
        "server" => Some((
            SocketAddr::from(([0, 0, 0, 0], 15008)),
            SocketAddr::from(([10, 77, 0, 2], 5201)),
            0,
        )),
        _ => None,
    }
}
