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
    fn bare(&mut self, name: &str, value: &str) {
        self.key(name);
        self.out.push_str(value);
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
            LogFormat::Plain => debug_str(self.out, value),
            LogFormat::Json => json_str(self.out, value),
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.bare(field.name(), itoa::Buffer::new().format(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.bare(field.name(), itoa::Buffer::new().format(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.bare(field.name(), if value { "true" } else { "false" });
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
                now(&mut w)?;
                for part in [
                    "\t",
                    level,
                    "\t",
                    meta.target(),
                    "\t",
                    message,
                    "\t",
                    fields,
                ] {
                    w.write_str(part)?;
                }
                w.write_char('\n')
            }
            LogFormat::Json => {
                // The time and level need no escaping.
                w.write_str("{\"level\":\"")?;
                w.write_str(level)?;
                w.write_str("\",\"time\":\"")?;
                now(&mut w)?;
                w.write_str("\",\"scope\":")?;
                json_str(&mut w, meta.target());
                w.write_str(",\"message\":")?;
                json_str(&mut w, message);
                w.write_str(fields)?;
                w.write_str("}\n")
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

/// Appends `s` as `{s:?}` writes it (ztunnel's text layout quotes strings so), without the
/// formatter when nothing in it needs escaping, as nothing does in names and addresses.
fn debug_str(out: &mut String, s: &str) {
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

thread_local! {
    /// The second the thread last wrote a time in, and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Writes the time now as tracing's `SystemTime` writes it (`2026-12-05T07:50:01.123456Z`),
/// formatting the date and time of day once a second instead of once a line.
fn now(w: &mut Writer<'_>) -> fmt::Result {
    let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) else {
        return SystemTime.format_time(w);
    };
    let secs = t.as_secs();
    SECOND.with(|cell| {
        let Ok(mut cached) = cell.try_borrow_mut() else {
            return SystemTime.format_time(w);
        };
        if cached.0 != secs {
            cached.1.clear();
            civil(&mut cached.1, secs);
            cached.0 = secs;
        }
        w.write_str(&cached.1)?;
        let mut micros = itoa::Buffer::new();
        let micros = micros.format(t.subsec_micros());
        w.write_char('.')?;
        w.write_str(&"000000"[micros.len()..])?;
        w.write_str(micros)?;
        w.write_char('Z')
    })
}

/// Appends the UTC date and time of day of `secs` since the epoch, `YYYY-MM-DDTHH:MM:SS`.
fn civil(out: &mut String, secs: u64) {
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    out.push_str(crate::exposition::rfc3339(secs).trim_end_matches('Z'));
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
    fn strings_are_quoted_as_debug_quotes_them() {
        for s in [
            "client",
            "10.0.0.1:80",
            "it's",
            "a \"b\"",
            "back\\slash",
            "tab\t",
            "ü",
            "\u{7f}",
            "",
        ] {
            let mut mine = String::new();
            debug_str(&mut mine, s);
            assert_eq!(mine, format!("{s:?}"));
        }
    }

    #[test]
    fn times_are_written_as_tracing_writes_them() {
        let mut mine = String::new();
        for (secs, want) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_796_456_999, "2026-12-05T07:49:59"),
            (4_107_542_400, "2100-03-01T00:00:00"),
            (253_402_300_799, "9999-12-31T23:59:59"),
        ] {
            mine.clear();
            civil(&mut mine, secs);
            assert_eq!(mine, want);
        }
        // Against tracing's own clock: the same layout, within the same second.
        for _ in 0..5 {
            let (mut a, mut b) = (String::new(), String::new());
            now(&mut Writer::new(&mut a)).expect("write");
            SystemTime
                .format_time(&mut Writer::new(&mut b))
                .expect("write");
            assert_eq!(a.len(), b.len(), "{a} {b}");
            assert!(a.ends_with('Z') && a.as_bytes()[19] == b'.', "{a}");
            if a[..19] == b[..19] {
                return;
            }
        }
        panic!("never in the same second as tracing's clock");
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
