//! [`Refusal`]: what a connection that is not carried gets, as a value.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use http::StatusCode;

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
    /// The destination's proxy answered the CONNECT with this status (ztunnel's `HttpStatus`).
    PeerStatus(StatusCode),
    /// The request on 15008 is not a CONNECT (ztunnel's `NonConnectMethod`).
    NotConnect {
        /// The method it used.
        method: String,
    },
    /// The CONNECT's authority is neither `ip:port` nor `hostname:port` (ztunnel's
    /// `ConnectAddress` from its authority parser).
    BadAuthority {
        /// The authority as sent (empty when there was none).
        authority: String,
    },
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
    /// A hostname CONNECT names no known service (ztunnel's `NoHostname`).
    NoHostname {
        /// The hostname.
        host: String,
    },
    /// A hostname CONNECT names a service whose port maps to no target port here (ztunnel's
    /// `NoPortForServices`).
    NoServicePort {
        /// The hostname.
        host: String,
        /// The service port asked for.
        port: u16,
    },
    /// The destination is no workload this ringtun serves (ztunnel's `UnknownDestination`).
    NotServed {
        /// The destination address.
        dst: IpAddr,
    },
    /// Authorization policy refuses it.
    Denied {
        /// The policy's decision in ztunnel's words, naming the policy where one decided.
        detail: String,
    },
    /// The local workload did not accept the connection (ztunnel's `ConnectionFailed`).
    DestinationUnreachable {
        /// The connect error.
        error: String,
    },
    /// The CONNECT stream went away before it could be answered.
    Lost(String),
}

impl Refusal {
    /// The status a CONNECT stream is answered with, as ztunnel answers it; `None` where there
    /// is no stream to answer.
    pub fn status(&self) -> Option<StatusCode> {
        Some(match self {
            Refusal::NotConnect { .. }
            | Refusal::BadAuthority { .. }
            | Refusal::IpMismatch { .. } => StatusCode::BAD_REQUEST,
            Refusal::Denied { .. } => StatusCode::UNAUTHORIZED,
            Refusal::OwnPort
            | Refusal::NoHostname { .. }
            | Refusal::NoServicePort { .. }
            | Refusal::NotServed { .. }
            | Refusal::DestinationUnreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::NotRedirected
            | Refusal::NoEndpoint { .. }
            | Refusal::Unreachable { .. }
            | Refusal::Tunnel(_)
            | Refusal::PeerStatus(_)
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
}

/// The access log's `error`: ztunnel's text for the same case (its `proxy::Error` Display),
/// so a log pipeline matching on it reads both alike; the status is on the stream, not here.
impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotRedirected => f.write_str(
                "connection was not redirected (no original destination); this listener only serves captured traffic",
            ),
            Refusal::NoEndpoint { dst } => write!(f, "no healthy upstream: {dst}"),
            Refusal::Unreachable { target, error } => write!(f, "connect {target}: {error}"),
            Refusal::Tunnel(why) => f.write_str(why),
            Refusal::PeerStatus(status) => write!(f, "http status: {status}"),
            Refusal::NotConnect { method } => write!(f, "expected method CONNECT, got {method}"),
            Refusal::BadAuthority { authority } => {
                write!(f, "no valid authority pseudo header: {authority}")
            }
            Refusal::IpMismatch { dst, reached } => write!(f, "ip mismatch: {reached} != {dst}"),
            Refusal::OwnPort => f.write_str("attempted recursive call to ourselves"),
            Refusal::NoHostname { host } => {
                write!(f, "no service or workload for hostname: {host}")
            }
            Refusal::NoServicePort { host, port } => write!(
                f,
                "requested service {host}:{port} found, but cannot resolve port"
            ),
            Refusal::NotServed { dst } => write!(f, "unknown destination: {dst}"),
            Refusal::Denied { detail } => {
                write!(f, "connection closed due to policy rejection: {detail}")
            }
            Refusal::DestinationUnreachable { error } => write!(f, "connection failed: {error}"),
            Refusal::Lost(why) => write!(f, "hbone: {why}"),
        }
    }
}
