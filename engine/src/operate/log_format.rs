//! The log's line layout, ztunnel's, so a pipeline that parses ztunnel's log parses ringtun's:
//! text (`time<TAB>level<TAB>target<TAB>message<TAB>key=value …`) or, with `LOG_FORMAT=json`,
//! one JSON object a line (`level`, `time`, `scope`, `message`, then the fields).

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::OnceLock;

use ringtun_hbone::addr::AddrText;

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

    /// The layout of this process's log: the one the log was installed with, plain before.
    pub fn current() -> LogFormat {
        PROCESS_FORMAT.get().copied().unwrap_or_default()
    }

    /// Makes this the layout of [`Line`]s too (the log's installer calls it once).
    pub fn install(self) {
        let _ = PROCESS_FORMAT.set(self);
    }
}

/// Set once, when the log is installed; read by every [`Line`].
static PROCESS_FORMAT: OnceLock<LogFormat> = OnceLock::new();

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

    /// A string: quoted as `{:?}` quotes it in text, a JSON string in JSON.
    fn string(&mut self, name: &str, value: &str) {
        self.key(name);
        match self.layout {
            LogFormat::Plain => debug_str(self.out, value),
            LogFormat::Json => json_str(self.out, value),
        }
    }

    /// A string made of `pieces`, logged as the string they join into.
    fn pieces(&mut self, name: &str, pieces: &[&str]) {
        if !pieces.iter().all(|p| p.bytes().all(plain_byte)) {
            self.string(name, &pieces.concat());
            return;
        }
        // Nothing to escape in either layout.
        self.key(name);
        self.out.push('"');
        pieces.iter().for_each(|p| self.out.push_str(p));
        self.out.push('"');
    }

    /// A value logged with `%` (`Display`): bare in text, a string in JSON.
    fn display(&mut self, name: &str, value: impl fmt::Display) {
        self.shown(name, format_args!("{value}"));
    }

    /// A formatted value (`%` or `?`): bare in text, a string in JSON.
    fn shown(&mut self, name: &str, value: fmt::Arguments<'_>) {
        self.key(name);
        match self.layout {
            LogFormat::Plain => {
                let _ = self.out.write_fmt(value);
            }
            LogFormat::Json => {
                self.out.push('"');
                let _ = JsonEscaped(self.out).write_fmt(value);
                self.out.push('"');
            }
        }
    }

    /// A socket address logged with `%`: as [`Fields::display`] writes it, digit by digit.
    fn addr(&mut self, name: &str, value: SocketAddr) {
        self.key(name);
        // An address needs no escaping in either layout.
        match self.layout {
            LogFormat::Plain => AddrText(value).push_to(self.out),
            LogFormat::Json => {
                self.out.push('"');
                AddrText(value).push_to(self.out);
                self.out.push('"');
            }
        }
    }
}

/// A byte `{:?}` writes as itself inside a quoted string.
fn plain_byte(b: u8) -> bool {
    (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\'
}

/// A log line written without a tracing event, in the same layout and to the same place as
/// the events' lines: the access log's. A connection's line has about thirty fields, and
/// tracing's per-field visit (a value set walked through `dyn` calls, each `Option` unwrapped
/// by its own visit, the subscriber stack around it) cost more than writing them; here each
/// field is written where it is known. Callers check that the line's target and level are
/// enabled first ([`tracing::enabled!`]), so the log's filter applies as to any event.
pub struct Line<'a>(Fields<'a>);

impl Line<'_> {
    /// `name="value"` (text) where there is a value; a JSON string in JSON.
    pub fn str(&mut self, name: &str, value: Option<&str>) {
        if let Some(v) = value {
            self.0.string(name, v);
        }
    }

    /// As [`Line::str`], for a value given in pieces (written one after another).
    pub fn pieces<const N: usize>(&mut self, name: &str, value: Option<[&str; N]>) {
        if let Some(v) = value {
            self.0.pieces(name, &v);
        }
    }

    /// `name=value` (text, bare) where there is a value; a JSON string in JSON.
    pub fn display(&mut self, name: &str, value: Option<impl fmt::Display>) {
        if let Some(v) = value {
            self.0.display(name, v);
        }
    }

    /// A socket address, bare in text.
    pub fn addr(&mut self, name: &str, value: Option<SocketAddr>) {
        if let Some(v) = value {
            self.0.addr(name, v);
        }
    }

    /// A number, bare in both layouts.
    pub fn num(&mut self, name: &str, value: Option<u64>) {
        if let Some(v) = value {
            self.0.bare(name, itoa::Buffer::new().format(v));
        }
    }

    /// `true` or `false`, bare in both layouts.
    pub fn flag(&mut self, name: &str, value: Option<bool>) {
        if let Some(v) = value {
            self.0.bare(name, if v { "true" } else { "false" });
        }
    }
}

thread_local! {
    /// Each thread's [`Line`] buffer, reused from line to line.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Writes one line at `level` with `target` and `message`, its fields written by `fields`,
/// to the log's sink ([`super::log_buffer`]).
pub fn write_line(
    level: tracing::Level,
    target: &str,
    message: &str,
    fields: impl FnOnce(&mut Line<'_>),
) {
    write_line_as(LogFormat::current(), level, target, message, fields);
}

/// [`write_line`] in a given layout.
fn write_line_as(
    layout: LogFormat,
    level: tracing::Level,
    target: &str,
    message: &str,
    fields: impl FnOnce(&mut Line<'_>),
) {
    let write = |buf: &mut String| {
        buf.clear();
        let _ = head(&mut Writer::new(buf), layout, level, target, message);
        let mut message = String::new();
        let mut line = Line(Fields {
            layout,
            message: &mut message,
            out: buf,
            n: 0,
        });
        fields(&mut line);
        buf.push_str(end(layout));
        super::log_buffer::write_line(buf.as_bytes());
    };
    LINE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => write(&mut buf),
        // A line written while writing another (a Display impl that logs): its own buffer.
        Err(_) => write(&mut String::new()),
    });
}

/// A level as ztunnel's log names it.
fn level_name(level: tracing::Level) -> &'static str {
    match level {
        tracing::Level::ERROR => "error",
        tracing::Level::WARN => "warn",
        tracing::Level::INFO => "info",
        tracing::Level::DEBUG => "debug",
        tracing::Level::TRACE => "trace",
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
        self.shown(field.name(), format_args!("{value:?}"));
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
        head(&mut w, self.0, *meta.level(), meta.target(), message)?;
        w.write_str(fields)?;
        w.write_str(end(self.0))
    }
}

/// A line's start, up to where its fields go: the time, level, target and message, in
/// `layout`.
fn head(
    w: &mut Writer<'_>,
    layout: LogFormat,
    level: tracing::Level,
    target: &str,
    message: &str,
) -> fmt::Result {
    let level = level_name(level);
    match layout {
        LogFormat::Plain => {
            now(w)?;
            for part in ["\t", level, "\t", target, "\t", message, "\t"] {
                w.write_str(part)?;
            }
            Ok(())
        }
        LogFormat::Json => {
            // The time and level need no escaping.
            w.write_str("{\"level\":\"")?;
            w.write_str(level)?;
            w.write_str("\",\"time\":\"")?;
            now(w)?;
            w.write_str("\",\"scope\":")?;
            json_str(w, target);
            w.write_str(",\"message\":")?;
            json_str(w, message);
            Ok(())
        }
    }
}

/// What ends a line after its fields, in `layout`.
fn end(layout: LogFormat) -> &'static str {
    match layout {
        LogFormat::Plain => "\n",
        LogFormat::Json => "}\n",
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
    if s.bytes().all(plain_byte) {
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

    /// What the events `f` logs look like in `format`.
    fn traced(format: LogFormat, f: impl FnOnce()) -> String {
        let written = Written::default();
        let w = written.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .event_format(IstioFormat(format))
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = written.0.lock().expect("lock").clone();
        String::from_utf8(bytes).expect("UTF-8")
    }

    fn line(format: LogFormat) -> String {
        traced(format, || {
            let addr: std::net::SocketAddr = "10.0.0.1:80".parse().expect("addr");
            tracing::event!(target: "access", tracing::Level::ERROR, src.addr = %addr, src.workload = "client", bytes_sent = 7u64, error = "a \"b\"", "connection complete");
        })
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

    /// A value whose `Display` output needs quoting.
    struct Shown(&'static str);

    impl fmt::Display for Shown {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    #[test]
    fn a_line_written_directly_is_the_line_tracing_writes() {
        let addr: std::net::SocketAddr = "10.0.0.1:80".parse().expect("addr");
        let v6: std::net::SocketAddr = "[fd00::1]:15008".parse().expect("addr");
        for layout in [LogFormat::Plain, LogFormat::Json] {
            let from_tracing = traced(layout, || {
                tracing::event!(target: "access", tracing::Level::INFO,
                    src.addr = %addr,
                    src.workload = Some("client"),
                    src.namespace = None::<&str>,
                    src.identity = Some(Shown("spiffe://td/ns/a/sa/b").to_string()),
                    dst.addr = Some(tracing::field::display(v6)),
                    dst.hbone_addr = Some(tracing::field::display(Shown("svc.ns:80"))),
                    odd = Some(Shown("say \"hi\"\t\\").to_string()),
                    bytes_sent = Some(7u64),
                    ktls.tx = Some(false),
                    shard = 3u32,
                    end = Some(tracing::field::display(Shown("a \"b\""))),
                    unicode = "ü\u{1}",
                    joined = "a/b",
                    joined_odd = "a\"/b",
                    "connection {}", "complete"
                );
            });
            log_buffer_taken();
            write_line_as(
                layout,
                tracing::Level::INFO,
                "access",
                "connection complete",
                |l| {
                    l.addr("src.addr", Some(addr));
                    l.str("src.workload", Some("client"));
                    l.str("src.namespace", None);
                    l.pieces("src.identity", Some(["spiffe://td", "/ns/a/sa/b"]));
                    l.addr("dst.addr", Some(v6));
                    l.display("dst.hbone_addr", Some(Shown("svc.ns:80")));
                    l.pieces("odd", Some(["say \"hi\"", "\t\\"]));
                    l.num("bytes_sent", Some(7));
                    l.flag("ktls.tx", Some(false));
                    l.num("shard", Some(3));
                    l.display("end", Some(Shown("a \"b\"")));
                    l.str("unicode", Some("ü\u{1}"));
                    l.pieces("joined", Some(["a", "/", "b"]));
                    l.pieces("joined_odd", Some(["a\"", "/", "b"]));
                },
            );
            let direct = String::from_utf8(log_buffer_taken()).expect("UTF-8");
            // Equal but for the time.
            let untimed = |l: &str| -> String {
                let at = l.find("202").expect("a time");
                format!("{}{}", &l[..at], &l[at + 27..])
            };
            assert_eq!(untimed(&direct), untimed(&from_tracing), "{layout:?}");
            assert!(direct.ends_with('\n'));
        }
    }

    fn log_buffer_taken() -> Vec<u8> {
        super::super::log_buffer::take_written()
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
