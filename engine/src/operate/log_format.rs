//! The log's line layout, ztunnel's, so a pipeline that parses ztunnel's log parses ringtun's:
//! text (`time<TAB>level<TAB>target<TAB>message<TAB>key=value …`) or, with `LOG_FORMAT=json`,
//! one JSON object a line (`level`, `time`, `scope`, `message`, then the fields).

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Which layout: ztunnel's `LOG_FORMAT` (`plain`, the default, or `json`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Tab-separated columns, then `key=value` fields.
    #[default]
    Plain,
    /// One JSON object a line.
    Json,
}

impl LogFormat {
    /// The layout `LOG_FORMAT` names (`json`; anything else is plain, as ztunnel reads it).
    pub fn from_env() -> LogFormat {
        match std::env::var("LOG_FORMAT").as_deref() {
            Ok("json") => LogFormat::Json,
            _ => LogFormat::Plain,
        }
    }
}

/// One field's value, kept as its kind so JSON can write numbers as numbers.
enum Value {
    /// Text (quoted in both layouts).
    Str(String),
    /// A number or boolean, written bare.
    Bare(String),
    /// Something formatted with `%` or `?`: bare in text, a string in JSON.
    Shown(String),
}

/// Collects an event's message and fields in the order they were written.
#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(&'static str, Value)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.fields
                .push((field.name(), Value::Str(value.to_owned())));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.fields
            .push((field.name(), Value::Bare(value.to_string())));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.fields
            .push((field.name(), Value::Bare(value.to_string())));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.fields
            .push((field.name(), Value::Bare(value.to_string())));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields
                .push((field.name(), Value::Shown(format!("{value:?}"))));
        }
    }
}

/// Formats events in ztunnel's layout.
pub struct IstioFormat(pub LogFormat);

impl<S, N> FormatEvent<S, N> for IstioFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut f = Fields::default();
        event.record(&mut f);
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        let level = meta.level().as_str().to_ascii_lowercase();
        match self.0 {
            LogFormat::Plain => {
                write!(w, "{time}\t{level}\t{}\t{}\t", meta.target(), f.message)?;
                for (i, (k, v)) in f.fields.iter().enumerate() {
                    let sep = if i == 0 { "" } else { " " };
                    match v {
                        Value::Str(s) => write!(w, "{sep}{k}={s:?}")?,
                        Value::Bare(s) | Value::Shown(s) => write!(w, "{sep}{k}={s}")?,
                    }
                }
                writeln!(w)
            }
            LogFormat::Json => {
                let mut line = String::with_capacity(256);
                let _ = write!(
                    line,
                    "{{\"level\":{},\"time\":{},\"scope\":{},\"message\":{}",
                    json(&level),
                    json(&time),
                    json(meta.target()),
                    json(&f.message)
                );
                for (k, v) in &f.fields {
                    let _ = match v {
                        Value::Str(s) | Value::Shown(s) => write!(line, ",{}:{}", json(k), json(s)),
                        Value::Bare(s) => write!(line, ",{}:{s}", json(k)),
                    };
                }
                writeln!(w, "{line}}}")
            }
        }
    }
}

/// A JSON string literal.
fn json(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Written(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Written {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn line(format: LogFormat) -> String {
        let written = Written::default();
        let w = written.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .event_format(IstioFormat(format))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let addr: std::net::SocketAddr = "10.0.0.1:80".parse().expect("addr");
            tracing::event!(target: "access", tracing::Level::ERROR, src.addr = %addr, src.workload = "client", bytes_sent = 7u64, error = "a \"b\"", "connection complete");
        });
        let bytes = written.0.lock().expect("lock").clone();
        String::from_utf8(bytes).expect("UTF-8")
    }

    #[test]
    fn plain_is_ztunnels_tab_separated_layout() {
        let l = line(LogFormat::Plain);
        let cols: Vec<&str> = l.trim_end().split('\t').collect();
        assert_eq!(cols.len(), 5, "{l}");
        assert!(cols[0].ends_with('Z') && cols[0].contains('T'), "{l}");
        assert_eq!(
            &cols[1..4],
            ["error", "access", "connection complete"],
            "{l}"
        );
        assert_eq!(
            cols[4],
            r#"src.addr=10.0.0.1:80 src.workload="client" bytes_sent=7 error="a \"b\"""#
        );
    }

    #[test]
    fn json_is_one_object_with_typed_fields() {
        let l = line(LogFormat::Json);
        let v: serde_json::Value = serde_json::from_str(l.trim_end()).expect("JSON");
        assert_eq!(v["level"], "error");
        assert_eq!(v["scope"], "access");
        assert_eq!(v["message"], "connection complete");
        assert_eq!(v["src.addr"], "10.0.0.1:80");
        assert_eq!(v["src.workload"], "client");
        assert_eq!(v["bytes_sent"], 7);
        assert_eq!(v["error"], "a \"b\"");
        let keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 8, "{l}");
    }
}
