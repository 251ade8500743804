//! The process's log: installed once at start, its filter changed live by the admin API
//! (`POST /logging?level=`, `POST /logging?reset`).

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::EnvFilter;

use super::log_format::{IstioFormat, LogFormat};

/// Why the log filter could not be changed; the admin API answers with the message.
#[derive(Debug, thiserror::Error)]
pub enum LogFilterError {
    /// The filter text is not valid `EnvFilter` syntax.
    #[error("bad filter {filter:?}: {source}")]
    Parse {
        /// The text given.
        filter: String,
        /// What the parser said.
        source: tracing_subscriber::filter::ParseError,
    },
    /// No reloadable subscriber was installed by [`init`].
    #[error("logging is not reloadable in this process")]
    NotReloadable,
    /// The subscriber refused the new filter.
    #[error("{0}")]
    Reload(#[from] tracing_subscriber::reload::Error),
    /// A thread panicked while it held the filter's text.
    #[error("poisoned lock: another task failed inside")]
    Poisoned,
}

type FilterHandle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// The reload handle of the installed filter; unset where another subscriber was installed
/// first (tests), which leaves the filter fixed.
static LOG_FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// The start-up log filter and the one in force now, as text.
static LOG_FILTER_TEXT: Mutex<(String, String)> = Mutex::new((String::new(), String::new()));

/// Installs the log subscriber: stderr (batched per shard tick, [`super::log_buffer`]), in
/// ztunnel's layout (`LOG_FORMAT=json` for JSON).
pub fn init(filter: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, text) = match EnvFilter::try_new(filter) {
        Ok(f) => (f, filter.to_owned()),
        Err(e) => {
            eprintln!("ringtun: bad --log filter {filter:?} ({e}); using info");
            (EnvFilter::new("info"), "info".to_owned())
        }
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let layout = LogFormat::from_env();
    layout.install();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(super::log_buffer::LineSink)
        .event_format(IstioFormat(layout));
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = LOG_FILTER.set(handle);
        if let Ok(mut t) = LOG_FILTER_TEXT.lock() {
            *t = (text.clone(), text);
        }
    }
}

/// The log filter in force (the admin API's `POST /logging` without a query).
pub fn filter() -> String {
    LOG_FILTER_TEXT
        .lock()
        .map(|t| t.1.clone())
        .unwrap_or_default()
}

/// Puts the start-up log filter back (`POST /logging?reset`).
pub fn reset_filter() -> Result<String, LogFilterError> {
    let start = LOG_FILTER_TEXT
        .lock()
        .map(|t| t.0.clone())
        .map_err(|_| LogFilterError::Poisoned)?;
    set_filter(&start)
}

/// Replaces the log filter of the running process (the admin API's `/logging?level=`).
pub fn set_filter(filter: &str) -> Result<String, LogFilterError> {
    let parsed = EnvFilter::try_new(filter).map_err(|source| LogFilterError::Parse {
        filter: filter.to_owned(),
        source,
    })?;
    let handle = LOG_FILTER.get().ok_or(LogFilterError::NotReloadable)?;
    handle.reload(parsed)?;
    if let Ok(mut t) = LOG_FILTER_TEXT.lock() {
        t.1 = filter.to_owned();
    }
    Ok(filter.to_owned())
}
