//! The crate's one error type.

use std::net::SocketAddr;

/// What went wrong in the HBONE protocol layer, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// A SPIFFE URI did not have the `spiffe://<trust domain>/ns/<ns>/sa/<sa>` shape.
    #[error("invalid SPIFFE identity {uri:?}: {why} (expected spiffe://<trust domain>/ns/<namespace>/sa/<service account>)")]
    InvalidIdentity {
        /// The text that was rejected.
        uri: String,
        /// Which part was wrong.
        why: &'static str,
    },
    /// A certificate could not be parsed as X.509.
    #[error("certificate is not valid X.509 DER: {0}")]
    BadCertificate(String),
    /// A certificate carried no SPIFFE URI SAN.
    #[error("certificate carries no SPIFFE identity (no spiffe:// URI subject alternative name)")]
    NoIdentity,
    /// The peer presented no certificate at all.
    #[error("peer presented no certificate; HBONE requires mutual TLS")]
    NoPeerCertificate,
    /// The peer's identity is not one the destination may have.
    #[error("peer identity {actual} is not among the expected identities [{expected}]; check the destination workload's serviceAccount and the service's subjectAltNames")]
    IdentityMismatch {
        /// Identity found in the peer's certificate.
        actual: String,
        /// Identities that would have been accepted, comma-separated.
        expected: String,
    },
    /// The peer's identity belongs to another trust domain.
    #[error("peer identity {actual} is outside trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        /// Identity found in the peer's certificate.
        actual: String,
        /// The trust domain this ringtun serves.
        trust_domain: String,
    },
    /// The server answered a CONNECT with a status other than 200.
    #[error("HBONE peer {peer} refused CONNECT to {authority}: HTTP {status}")]
    Refused {
        /// The HBONE peer (its port 15008 address).
        peer: SocketAddr,
        /// The authority that was asked for.
        authority: SocketAddr,
        /// The status it answered.
        status: u16,
    },
    /// An HTTP/2 protocol error or a reset from the peer.
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
}
