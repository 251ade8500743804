//! The test bed's one error type.

use std::time::Duration;

/// Everything that can go wrong while building a topology, starting a process or making
/// certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process lacks the privileges needed to create namespaces.
    #[error(
        "network namespace topologies need root (effective uid is {euid}); \
         run as root, e.g. `sudo -E cargo nextest run` — these tests never skip silently"
    )]
    NotRoot {
        /// The effective uid found.
        euid: u32,
    },
    /// An external command (ip, nft, sysctl…) could not be started or exited with failure.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line, for the reader.
        command: String,
        /// Exit status, or the spawn error.
        status: String,
        /// What the command wrote on stderr (trimmed).
        stderr: String,
    },
    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being attempted.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A caller-supplied argument cannot be used (bad prefix, name too long…).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A started process exited before it was ready.
    #[error("{name} exited ({status}) before it was ready; the end of its log:\n{log_tail}")]
    Exited {
        /// The process, as its starter named it.
        name: String,
        /// How it exited.
        status: String,
        /// The last lines it wrote (stdout and stderr).
        log_tail: String,
    },
    /// A started process kept running but was not ready in time.
    #[error("{name} was not {what} within {waited:?}; the end of its log:\n{log_tail}")]
    NotReady {
        /// The process, as its starter named it.
        name: String,
        /// What was waited for (e.g. "ready on 127.0.0.1:15021").
        what: String,
        /// How long it was given.
        waited: Duration,
        /// The last lines it wrote (stdout and stderr).
        log_tail: String,
    },
    /// Something a caller checked did not hold (e.g. the demo's echo differs).
    #[error("check failed: {0}")]
    Check(String),
    /// rcgen refused to make a certificate.
    #[error("certificate generation: {0}")]
    Certificate(#[from] rcgen::Error),
}

impl Error {
    /// An [`Error::Io`] with `context`, for `map_err`.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
