//! The log's line layout, ztunnel's, so a pipeline that parses ztunnel's log parses ringtun's:
//! text (`time<TAB>level<TAB>target<TAB>message<TAB>key=value …`) or, with `LOG_FORMAT=json`,
//! one JSON object a line (`level`, `time`, `scope`, `message`, then the fields).

use std::cell::RefCell;
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

/// Writes an event's fields straight into one line buffer, in the order they were written,
/// so a line costs no allocation per field (the access log writes about thirty per
/// connection); the message is kept apart, as it comes first on the line.
struct Fields<'a> {
    layout: LogFormat,
    message: &'a mut String,
    out: &'a mut String,
    n: usize,
}

impl Fields<'_> {
    /// Starts the next field: its separator and key.
    fn key(&mut self, name: &str) {
        match self.layout {
            LogFormat::Plain => {
                if self.n > 0 {
                    self.out.push(' ');
                }
                self.out.push_str(name);
                self.out.push('=');
            }
            LogFormat::Json => {
                self.out.push(',');
                json_str(self.out, name);
                self.out.push(':');
            }
        }
        self.n += 1;
    }

    /// A value written bare in both layouts (numbers, booleans).
    fn bare(&mut self, name: &str, value: fmt::Arguments<'_>) {
        self.key(name);
        let _ = self.out.write_fmt(value);
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
            return;
        }
        self.key(field.name());
        match self.layout {
            LogFormat::Plain => {
                let _ = write!(self.out, "{value:?}");
            }
            LogFormat::Json => json_str(self.out, value),
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.bare(field.name(), format_args!("{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.bare(field.name(), format_args!("{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.bare(field.name(), format_args!("{value}"));
    }

    /// Something formatted with `%` or `?`: bare in text, a string in JSON.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
            return;
        }
        self.key(field.name());
        match self.layout {
            LogFormat::Plain => {
                let _ = write!(self.out, "{value:?}");
            }
            LogFormat::Json => {
                self.out.push('"');
                let _ = write!(JsonEscaped(self.out), "{value:?}");
                self.out.push('"');
            }
        }
    }
}

thread_local! {
    /// Each thread's message and field buffers, reused from line to line.
    static SCRATCH: RefCell<(String, String)> = const { RefCell::new((String::new(), String::new())) };
}

/// Formats events in ztunnel's layout.
pub struct IstioFormat(pub LogFormat);

impl IstioFormat {
    /// Writes one line of `event` to `w`, using `message` and `fields` as scratch.
    fn line(
        &self,
        mut w: Writer<'_>,
        event: &Event<'_>,
        message: &mut String,
        fields: &mut String,
    ) -> fmt::Result {
        message.clear();
        fields.clear();
        event.record(&mut Fields {
            layout: self.0,
            message,
            out: fields,
            n: 0,
        });
        let meta = event.metadata();
        let level = match *meta.level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warn",
            tracing::Level::INFO => "info",
            tracing::Level::DEBUG => "debug",
            tracing::Level::TRACE => "trace",
        };
        match self.0 {
            LogFormat::Plain => {
                SystemTime.format_time(&mut w)?;
                writeln!(w, "\t{level}\t{}\t{message}\t{fields}", meta.target())
            }
            LogFormat::Json => {
                // The time and level need no escaping.
                w.write_str("{\"level\":\"")?;
                w.write_str(level)?;
                w.write_str("\",\"time\":\"")?;
                SystemTime.format_time(&mut w)?;
                w.write_str("\",\"scope\":")?;
                json_str(&mut w, meta.target());
                w.write_str(",\"message\":")?;
                json_str(&mut w, message);
                writeln!(w, "{fields}}}")
            }
        }
    }
}

impl<S, N> FormatEvent<S, N> for IstioFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut s) => {
                let (message, fields) = &mut *s;
                self.line(w, event, message, fields)
            }
            // An event logged while formatting another (a Display impl that logs): its own
            // buffers.
            Err(_) => self.line(w, event, &mut String::new(), &mut String::new()),
        })
    }
}

/// Appends `s` as a JSON string literal (as serde_json escapes it).
fn json_str(out: &mut impl fmt::Write, s: &str) {
    let _ = out.write_char('"');
    let _ = JsonEscaped(out).write_str(s);
    let _ = out.write_char('"');
}

/// Escapes what it is given as the inside of a JSON string, as serde_json does.
struct JsonEscaped<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for JsonEscaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let esc: &str = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            if esc.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(esc)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
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
    fn json_strings_are_escaped_as_serde_json_escapes_them() {
        let nasty = "a\"b\\c\nd\re\tf\u{8}g\u{c}h\u{1}i\u{1f}j/ü\u{7f}";
        let mut mine = String::new();
        json_str(&mut mine, nasty);
        assert_eq!(mine, serde_json::Value::from(nasty).to_string());
        let back: String = serde_json::from_str(&mine).expect("valid JSON");
        assert_eq!(back, nasty);
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
