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
    /// istiod answered with a gRPC error.
    #[error("control plane: {0}")]
    Grpc(String),
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
        XdsError::Grpc(format!("{:?}: {}{hint}", s.code(), s.message()))
    }
}
