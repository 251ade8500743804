//! [`EngineError`]: why ringtun could not start or keep running.

use std::net::SocketAddr;

use crate::options::ListenerKind;
use crate::{config, pki, tls};

/// Why ringtun could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The config file is invalid; the message names file, line and field.
    #[error("{0}")]
    Config(Box<config::ConfigError>),
    /// Certificates could not be loaded.
    #[error("{0}")]
    Tls(Box<tls::TlsSetupError>),
    /// Generating demo or test certificates failed.
    #[error("{0}")]
    Pki(#[from] pki::PkiError),
    /// A listener could not be bound.
    #[error("cannot listen for {kind} on {addr}: {source} (is another proxy running, or is the address not local?)")]
    Listen {
        /// What the listener was for.
        kind: ListenerKind,
        /// Where.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// SO_MARK could not be set.
    #[error("cannot set SO_MARK {mark:#x} on sockets: {source}; ringtun needs CAP_NET_ADMIN for this, or pass --mark 0 if no capture rule relies on it")]
    Mark {
        /// The mark.
        mark: u32,
        /// OS error.
        source: std::io::Error,
    },
    /// io_uring was demanded but is not available.
    #[error("--io-driver io-uring was requested but io_uring is not available on this kernel (or is disabled by seccomp / kernel.io_uring_disabled); use --io-driver auto or legacy")]
    NoIoUring,
    /// `--ktls on` was given but the kernel cannot offload TLS.
    #[error("--ktls on was requested, but {reason}; run with --ktls auto to fall back to userspace rustls where the kernel cannot offload")]
    KtlsUnavailable {
        /// What the capability probe found.
        reason: String,
    },
    /// A shard thread could not be started.
    #[error("cannot start shard thread: {0}")]
    Thread(std::io::Error),
    /// A shard could not take its listener.
    #[error("shard {shard}: {error}")]
    ShardListen {
        /// Which shard.
        shard: usize,
        /// What failed.
        error: String,
    },
    /// A shard stopped unexpectedly during start-up.
    #[error("a shard stopped during start-up; see the log above")]
    ShardDied,
    /// A command-line value was invalid.
    #[error("{0}")]
    Usage(String),
    /// The metrics, readiness or admin listener could not be bound.
    #[error("cannot serve the metrics/readiness/admin endpoints: {0} (is another ringtun or ztunnel running here?)")]
    Admin(std::io::Error),
    /// The control-plane (xDS) client could not start.
    #[error("{0}")]
    Xds(crate::xds::XdsError),
    /// Stopped while waiting for the proxy's certificate from the control plane's CA.
    #[error("stopped: {0}")]
    NoCertificate(String),
    /// The DNS proxy could not start (ISTIO_META_DNS_CAPTURE=false turns it off).
    #[error("DNS proxy: {0} (ISTIO_META_DNS_CAPTURE=false turns it off)")]
    Dns(#[from] crate::dns::DnsError),
}

// Boxed so every Result<_, EngineError> stays small; these errors are rare and start-up only.
impl From<config::ConfigError> for EngineError {
    fn from(e: config::ConfigError) -> Self {
        EngineError::Config(Box::new(e))
    }
}

impl From<tls::TlsSetupError> for EngineError {
    fn from(e: tls::TlsSetupError) -> Self {
        EngineError::Tls(Box::new(e))
    }
}
