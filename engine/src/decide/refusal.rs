//! [`Refusal`]: what a connection that is not carried gets, as a value.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use http::StatusCode;
use ringtun_hbone::connect;

/// How a refusal reaches the client: an HTTP status on its CONNECT stream (15008), or a TCP
/// reset of the captured connection (15001, 15006).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carrier {
    /// An HBONE CONNECT stream: answered with [`Refusal::status`].
    Stream,
    /// A captured TCP connection: reset.
    Tcp,
}

/// Why a connection is not carried. Every refusal counts as a failed connection; the proxy
/// paths answer it (status or reset) and write its access record once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// It reached a capture listener without being redirected there, so it has no original
    /// destination (connecting to the listener's own address would loop).
    NotRedirected,
    /// A service VIP with no endpoint its load-balancing rules allow for the port (ztunnel's
    /// `NoHealthyUpstream`).
    NoEndpoint {
        /// The dialled VIP and port.
        dst: SocketAddr,
    },
    /// A plain TCP destination could not be reached.
    Unreachable {
        /// Where.
        target: SocketAddr,
        /// The connect error.
        error: String,
    },
    /// The HBONE stream to the destination could not be opened (the text names the step).
    Tunnel(String),
    /// The CONNECT itself is not acceptable (not a CONNECT, no `ip:port` authority).
    Malformed(connect::Refusal),
    /// Dedicated mode: the CONNECT names another address than the one the connection reached
    /// (ztunnel's `IPMismatch`).
    IpMismatch {
        /// The address the CONNECT names.
        dst: IpAddr,
        /// The address the connection reached.
        reached: IpAddr,
    },
    /// The destination is one of ringtun's own listeners (ztunnel's `SelfCall`).
    OwnPort,
    /// The destination is no workload this ringtun serves.
    NotServed,
    /// Authorization policy refuses it.
    Denied {
        /// The short reason (`denied by authorization policy`, `no authorization policy
        /// allows it`).
        why: &'static str,
        /// The policy's decision in ztunnel's words, naming the policy where one decided.
        detail: String,
    },
    /// The local workload did not accept the connection.
    DestinationUnreachable,
    /// The CONNECT stream went away before it could be answered.
    Lost(String),
}

impl Refusal {
    /// The status a CONNECT stream is answered with, as ztunnel answers it; `None` where there
    /// is no stream to answer.
    pub fn status(&self) -> Option<StatusCode> {
        Some(match self {
            Refusal::Malformed(r) => r.status,
            Refusal::IpMismatch { .. } => StatusCode::BAD_REQUEST,
            Refusal::Denied { .. } => StatusCode::UNAUTHORIZED,
            Refusal::OwnPort | Refusal::NotServed | Refusal::DestinationUnreachable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::NotRedirected
            | Refusal::NoEndpoint { .. }
            | Refusal::Unreachable { .. }
            | Refusal::Tunnel(_)
            | Refusal::Lost(_) => return None,
        })
    }

    /// Istio's `response_flags`: `DENY` for policy, `CONNECT` for the rest (the connection was
    /// not established); none for a stream lost before its answer.
    pub fn response_flags(&self) -> Option<&'static str> {
        match self {
            Refusal::Denied { .. } => Some("DENY"),
            Refusal::Lost(_) => None,
            _ => Some("CONNECT"),
        }
    }

    /// The access log's `reason`: on a stream, the status it was answered with first.
    pub fn reason(&self, carrier: Carrier) -> String {
        match (carrier, self.status()) {
            (Carrier::Stream, Some(status)) => format!("{} {self}", status.as_u16()),
            _ => self.to_string(),
        }
    }
}

/// The reason without the status.
impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotRedirected => f.write_str(
                "connection was not redirected (no original destination); this listener only serves captured traffic",
            ),
            Refusal::NoEndpoint { dst } => write!(f, "no healthy upstream: {dst}"),
            Refusal::Unreachable { target, error } => write!(f, "connect {target}: {error}"),
            Refusal::Tunnel(why) => f.write_str(why),
            Refusal::Malformed(r) => f.write_str(r.reason),
            Refusal::IpMismatch { dst, reached } => write!(
                f,
                "destination IP mismatch: {dst} is not the address this connection reached ({reached})"
            ),
            Refusal::OwnPort => f.write_str("the destination is one of ringtun's own ports"),
            Refusal::NotServed => f.write_str("destination is not a workload served here"),
            Refusal::Denied { why, detail } => write!(f, "{why}: {detail}"),
            Refusal::DestinationUnreachable => f.write_str("destination unreachable"),
            Refusal::Lost(why) => write!(f, "hbone: {why}"),
        }
    }
}
