//! Where the config comes from, so the control loop does not care: ztunnel's local file
//! (loaded at start, then watched), or istiod over xDS (the client runs on its own thread; the
//! first config arrives after start, and readiness waits for it).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::watch::ConfigFile;
use crate::config::{self, Delta, LocalConfig};
use crate::options::RunOptions;
use crate::xds::{self, XdsHandle};
use crate::EngineError;

/// A new config from the source.
pub(super) enum Update {
    /// A whole config (the file): the next snapshot is built from it.
    Full(LocalConfig),
    /// Changes to the config in force (istiod): the next snapshot is the current one with
    /// them applied.
    Delta(Delta),
}

/// The config source of a running ringtun.
pub(super) enum ConfigSource {
    /// The local file, checked every `poll`.
    File {
        /// Its path.
        path: PathBuf,
        /// What was last seen of it.
        file: ConfigFile,
        /// How often to look.
        poll: Duration,
        /// When to look next.
        next: Instant,
    },
    /// istiod.
    Xds {
        /// `XDS_ADDRESS`, for messages.
        address: String,
        /// The client's updates.
        handle: XdsHandle,
        /// On-demand addresses answered by the updates taken so far, for the shards.
        answered: Vec<IpAddr>,
    },
}

fn load(path: &Path) -> Result<LocalConfig, config::ConfigError> {
    let loaded = config::load(path)?;
    for w in &loaded.warnings {
        tracing::warn!(config = %path.display(), "{w}");
    }
    Ok(loaded.config)
}

impl ConfigSource {
    /// Opens the source; the file's config comes back at once (an invalid file stops the
    /// start), istiod's later through [`ConfigSource::poll`].
    pub(super) fn open(
        opts: &RunOptions,
    ) -> Result<(ConfigSource, Option<LocalConfig>), EngineError> {
        if let Some(x) = &opts.xds {
            let handle = xds::spawn(x.clone()).map_err(EngineError::Xds)?;
            let source = ConfigSource::Xds {
                address: x.endpoint.url.clone(),
                handle,
                answered: Vec::new(),
            };
            return Ok((source, None));
        }
        let path = opts.config_path.clone();
        let config = load(&path)?;
        let source = ConfigSource::File {
            file: ConfigFile::new(&path),
            path,
            poll: opts.config_poll,
            next: Instant::now() + opts.config_poll,
        };
        Ok((source, Some(config)))
    }

    /// A new config, when one is due: the file changed (an invalid one is an error, logged by
    /// the caller, and the previous config stays), or istiod sent changes (all those waiting,
    /// as one batch).
    pub(super) fn poll(&mut self) -> Option<Result<Update, config::ConfigError>> {
        match self {
            ConfigSource::File {
                path,
                file,
                poll,
                next,
            } => {
                if Instant::now() < *next {
                    return None;
                }
                *next = Instant::now() + *poll;
                file.changed().then(|| load(path).map(Update::Full))
            }
            ConfigSource::Xds {
                handle, answered, ..
            } => {
                let mut waiting = handle.updates.try_iter();
                let first = waiting.next()?;
                let (mut delta, mut due) = (first.delta, first.config_due);
                answered.extend(first.answered);
                for later in waiting {
                    delta.append(later.delta);
                    due |= later.config_due;
                    answered.extend(later.answered);
                }
                // Answers alone (an address istiod does not know) make no new config.
                (due || !delta.is_empty()).then_some(Ok(Update::Delta(delta)))
            }
        }
    }

    /// The on-demand addresses answered since the last call: for the shards, once the config
    /// that answers them is theirs.
    pub(super) fn take_answered(&mut self) -> Vec<IpAddr> {
        match self {
            ConfigSource::File { .. } => Vec::new(),
            ConfigSource::Xds { answered, .. } => std::mem::take(answered),
        }
    }

    /// Where shards ask for unknown destinations, when the source is istiod on demand.
    pub(super) fn demander(&self) -> Option<crate::xds::Demander> {
        match self {
            ConfigSource::File { .. } => None,
            ConfigSource::Xds { handle, .. } => handle.demander.clone(),
        }
    }

    /// The xDS client's state, when the source is istiod.
    pub(super) fn xds_status(&self) -> Option<crate::xds::SharedXdsStatus> {
        match self {
            ConfigSource::File { .. } => None,
            ConfigSource::Xds { handle, .. } => Some(handle.status.clone()),
        }
    }

    /// What a reload is called in the log.
    pub(super) fn what(&self) -> &'static str {
        match self {
            ConfigSource::File { .. } => "config reloaded",
            ConfigSource::Xds { .. } => "config updated by the control plane",
        }
    }

    /// The file or the address, for the log.
    pub(super) fn describe(&self) -> String {
        match self {
            ConfigSource::File { path, .. } => path.display().to_string(),
            ConfigSource::Xds { address, .. } => format!("xds {address}"),
        }
    }
}
