//! The crate's one error type.

use std::io;

use crate::record::{
    ALERT_BAD_RECORD_MAC, ALERT_CLOSE_NOTIFY, ALERT_RECORD_OVERFLOW, ALERT_UNEXPECTED_MESSAGE,
};
use crate::{Cipher, Direction};

/// Everything that can go wrong while moving a TLS connection into the kernel or while
/// reading from / writing to an offloaded socket.
///
/// Every message says what happened and what the caller should do about it. Errors up to
/// and including [`KtlsError::Extract`] leave the rustls connection usable (keep it in
/// userspace); once secrets are extracted, any error means the connection must be closed,
/// because neither rustls nor the kernel can carry on with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KtlsError {
    /// `setsockopt(TCP_ULP, "tls")` failed.
    #[error("kTLS unavailable: setsockopt(TCP_ULP, \"tls\") failed with {}: {hint}", errno_desc(.source))]
    Ulp {
        /// The OS error.
        #[source]
        source: io::Error,
        /// What this errno usually means here.
        hint: &'static str,
    },

    /// The kernel refused the key material for one direction.
    #[error(
        "the kernel rejected {cipher} keys for {direction} with {}: this kernel lacks that \
         cipher (or the socket already has keys); call probe() at startup and keep such \
         connections on userspace rustls",
        errno_desc(.source)
    )]
    CryptoRejected {
        /// TX or RX.
        direction: Direction,
        /// The cipher that was refused.
        cipher: Cipher,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The negotiated cipher suite has no kernel equivalent this crate knows about.
    #[error(
        "cipher suite {0} cannot be offloaded: only TLS 1.3 AES-128-GCM, AES-256-GCM and \
         CHACHA20-POLY1305 can; keep this connection on userspace rustls"
    )]
    UnsupportedCipher(String),

    /// Key or IV of the wrong length for the cipher (a rustls/provider mismatch).
    #[error(
        "{cipher} secret has the wrong length ({what} is {got} bytes, the kernel wants \
         {want}); this is a bug in the crypto provider glue — keep the connection in userspace"
    )]
    BadSecretLength {
        /// The cipher.
        cipher: Cipher,
        /// "key" or "iv".
        what: &'static str,
        /// Length received.
        got: usize,
        /// Length required.
        want: usize,
    },

    /// The connection negotiated something other than TLS 1.3.
    #[error(
        "negotiated protocol is {0}, not TLS 1.3; this crate only offloads TLS 1.3 — keep \
         the connection on userspace rustls"
    )]
    NotTls13(String),

    /// Secrets were requested before the handshake finished.
    #[error(
        "the TLS handshake is not complete; drive the rustls connection until \
         is_handshaking() is false before offloading"
    )]
    HandshakeIncomplete,

    /// rustls still holds TLS records for the peer.
    #[error(
        "rustls still holds TLS records for the peer; write them out (write_tls until \
         wants_write() is false) before extracting secrets"
    )]
    PendingTlsOutput,

    /// rustls refused to hand out its traffic secrets.
    #[error(
        "rustls refused to export the traffic secrets ({0}); set \
         enable_secret_extraction = true on the ClientConfig/ServerConfig"
    )]
    Extract(#[source] rustls::Error),

    /// A system call failed.
    #[error("{context} failed: {}", errno_desc(.source))]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The peer sent a fatal alert.
    #[error(
        "peer sent TLS alert {} (level {level}, description {description}); the connection \
         is dead — close it",
        alert_name(*.description)
    )]
    PeerAlert {
        /// Alert level (1 warning, 2 fatal; TLS 1.3 treats most as fatal anyway).
        level: u8,
        /// Alert description (RFC 8446 section 6).
        description: u8,
    },

    /// The peer rotated its keys; the kernel cannot follow.
    #[error(
        "peer sent a TLS 1.3 KeyUpdate (update_requested={update_requested}): records after \
         it use keys this offload cannot install (Linux < 6.14 has no kTLS rekey; on later \
         kernels follow_key_update needs the handshake's traffic secrets from SecretLog) — \
         close the connection so the peer reconnects"
    )]
    KeyUpdate {
        /// Whether the peer asked us to update our sending keys too.
        update_requested: bool,
    },

    /// A record failed authentication.
    #[error(
        "a TLS record failed to decrypt (EBADMSG): the stream is corrupt, the keys or \
         sequence numbers handed to the kernel were wrong, or the peer rekeyed after a \
         KeyUpdate — close the connection"
    )]
    BadRecord(#[source] io::Error),

    /// A record of a type that must not appear after the handshake.
    #[error(
        "unexpected TLS record after offload (content type {content_type}, {len} bytes{}); \
         close the connection",
        handshake_note(*.handshake_type)
    )]
    UnexpectedRecord {
        /// TLS content type (21 alert, 22 handshake, 20 change_cipher_spec, ...).
        content_type: u8,
        /// Handshake message type, when the record was a handshake record.
        handshake_type: Option<u8>,
        /// Payload length.
        len: usize,
    },
}

impl KtlsError {
    /// Whether this is a non-blocking socket's "try again later" (`EAGAIN`).
    pub fn is_would_block(&self) -> bool {
        matches!(self, KtlsError::Io { source, .. } if source.kind() == io::ErrorKind::WouldBlock)
    }

    pub(crate) fn io(context: &'static str, source: io::Error) -> Self {
        KtlsError::Io { context, source }
    }

    pub(crate) fn ulp(source: io::Error) -> Self {
        let hint = match source.raw_os_error() {
            Some(libc::ENOENT) => {
                "this kernel has no `tls` upper-layer protocol (CONFIG_TLS not built, or the \
                 tls module is not loaded and could not be auto-loaded); run `modprobe tls` \
                 or stay on userspace rustls"
            }
            Some(libc::ENOTCONN) => "the socket is not a connected TCP socket yet",
            Some(libc::EEXIST) => "the socket already has a different ULP attached",
            Some(libc::ENOPROTOOPT) | Some(libc::EOPNOTSUPP) => {
                "the socket is not TCP, or the kernel predates TCP_ULP (Linux < 4.13)"
            }
            Some(libc::EPERM) | Some(libc::EACCES) => {
                "not permitted (seccomp or LSM policy blocks TCP_ULP)"
            }
            _ => "stay on userspace rustls",
        };
        KtlsError::Ulp { source, hint }
    }
}

impl From<KtlsError> for io::Error {
    /// Keeps the OS error (and `WouldBlock`) intact for [`KtlsError::Io`]; everything else
    /// becomes an error of a fitting kind wrapping the `KtlsError`.
    fn from(e: KtlsError) -> Self {
        let kind = match &e {
            KtlsError::Io { source, .. } => {
                if let Some(code) = source.raw_os_error() {
                    return io::Error::from_raw_os_error(code);
                }
                source.kind()
            }
            KtlsError::PeerAlert { .. } => io::ErrorKind::ConnectionAborted,
            KtlsError::KeyUpdate { .. }
            | KtlsError::BadRecord(_)
            | KtlsError::UnexpectedRecord { .. } => io::ErrorKind::InvalidData,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Symbolic errno name plus the OS's text, e.g. `ENOENT (No such file or directory)`.
pub(crate) fn errno_desc(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!(
            "{} ({})",
            errno_name(code),
            io::Error::from_raw_os_error(code)
                .to_string()
                .split(" (os error")
                .next()
                .unwrap_or_default()
        ),
        None => e.to_string(),
    }
}

/// Names of the errnos these socket options produce; numbers for the rest.
pub(crate) fn errno_name(code: i32) -> std::borrow::Cow<'static, str> {
    let name = match code {
        libc::ENOENT => "ENOENT",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENOTCONN => "ENOTCONN",
        libc::ENOPROTOOPT => "ENOPROTOOPT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOMEM => "ENOMEM",
        libc::EBADMSG => "EBADMSG",
        libc::EKEYEXPIRED => "EKEYEXPIRED",
        libc::EIO => "EIO",
        libc::EAGAIN => "EAGAIN",
        libc::EPIPE => "EPIPE",
        libc::ECONNRESET => "ECONNRESET",
        libc::EBADF => "EBADF",
        libc::ENOTSOCK => "ENOTSOCK",
        libc::EMSGSIZE => "EMSGSIZE",
        _ => return format!("errno {code}").into(),
    };
    name.into()
}

/// RFC 8446 section 6 alert names, for messages.
pub(crate) fn alert_name(description: u8) -> &'static str {
    match description {
        ALERT_CLOSE_NOTIFY => "close_notify",
        ALERT_UNEXPECTED_MESSAGE => "unexpected_message",
        ALERT_BAD_RECORD_MAC => "bad_record_mac",
        ALERT_RECORD_OVERFLOW => "record_overflow",
        40 => "handshake_failure",
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired",
        46 => "certificate_unknown",
        47 => "illegal_parameter",
        48 => "unknown_ca",
        49 => "access_denied",
        50 => "decode_error",
        51 => "decrypt_error",
        70 => "protocol_version",
        71 => "insufficient_security",
        80 => "internal_error",
        86 => "inappropriate_fallback",
        90 => "user_canceled",
        109 => "missing_extension",
        110 => "unsupported_extension",
        112 => "unrecognized_name",
        113 => "bad_certificate_status_response",
        115 => "unknown_psk_identity",
        116 => "certificate_required",
        120 => "no_application_protocol",
        _ => "unknown",
    }
}

fn handshake_note(t: Option<u8>) -> String {
    match t {
        Some(t) => format!(", handshake message type {t}"),
        None => String::new(),
    }
}
