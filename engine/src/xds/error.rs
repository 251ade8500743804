//! [`XdsError`]: why talking to istiod failed.

/// Why talking to istiod failed.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    /// `XDS_ADDRESS`/`CA_ADDRESS` is not a usable https URL.
    #[error("control plane address: {0}")]
    Address(String),
    /// istiod's root could not be read.
    #[error("control plane root certificate: {0}")]
    Root(String),
    /// The TLS settings could not be built.
    #[error("control plane TLS: {0}")]
    Tls(String),
    /// The token could not be read.
    #[error("control plane token: {0}")]
    Token(String),
    /// The connection failed (TCP, TLS or HTTP/2).
    #[error("cannot connect to the control plane: {0}")]
    Connect(String),
    /// istiod answered with a gRPC error (or ended the stream with one).
    #[error("control plane: {code:?}: {message}{hint}")]
    Grpc {
        /// The gRPC status code.
        code: tonic::Code,
        /// Its message.
        message: String,
        /// What to look at, where the message says.
        hint: &'static str,
    },
    /// A certificate request could not be made.
    #[error("certificate request: {0}")]
    Csr(String),
    /// The CA's answer is unusable.
    #[error("certificate response: {0}")]
    Certificate(String),
    /// The xDS thread could not be started.
    #[error("cannot start the xDS thread: {0}")]
    Thread(std::io::Error),
}

impl From<tonic::Status> for XdsError {
    fn from(s: tonic::Status) -> Self {
        let hint = if s.message().contains("authentication failure") {
            " (the token was refused; see istiod's log)"
        } else {
            ""
        };
        XdsError::Grpc {
            code: s.code(),
            message: s.message().to_owned(),
            hint,
        }
    }
}

impl XdsError {
    /// A stream end that is routine, not a failure: istiod's connection age (`GOAWAY`), a
    /// cancelled or timed-out stream. ztunnel counts these as `Reconnect` and reconnects after
    /// its initial backoff; the same codes and messages as its `xds/client.rs`.
    pub fn is_reconnect(&self) -> bool {
        let XdsError::Grpc { code, message, .. } = self else {
            return false;
        };
        matches!(
            code,
            tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ) || (*code == tonic::Code::Unavailable
            && (message.contains("transport is closing")
                || message.contains("received prior goaway")))
    }
}
