//! HBONE `CONNECT` requests: what the client sends and what the server accepts.

use std::net::{IpAddr, SocketAddr};

use http::header::HeaderName;
use http::{HeaderValue, Method, Request, StatusCode};

use crate::addr::AddrText;

/// Header carrying the original client address (RFC 7239), as ztunnel sends it.
pub const FORWARDED: &str = "forwarded";
/// W3C baggage header describing the source workload.
pub const BAGGAGE: &str = "baggage";
/// W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

// Parsed once here rather than from the string on every request.
const FORWARDED_NAME: HeaderName = HeaderName::from_static(FORWARDED);
/// [`BAGGAGE`] as a header name.
pub const BAGGAGE_NAME: HeaderName = HeaderName::from_static(BAGGAGE);
const TRACEPARENT_NAME: HeaderName = HeaderName::from_static(TRACEPARENT);

/// Who is calling, for the `baggage` header (W3C baggage, OpenTelemetry k8s keys).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    /// `k8s.cluster.name`.
    pub cluster: String,
    /// `k8s.namespace.name`.
    pub namespace: String,
    /// Workload kind, lower case (`deployment`, `pod`, ...): the key becomes `k8s.<kind>.name`.
    pub workload_type: String,
    /// Workload name for `k8s.<kind>.name`.
    pub workload_name: String,
    /// `service.name` (canonical service).
    pub service: String,
    /// `service.version` (canonical revision).
    pub version: String,
}

impl Baggage {
    /// The header value: comma-separated `key=value` members, empty values left out.
    pub fn header_value(&self) -> String {
        let mut out = String::new();
        let mut add = |k: &str, v: &str| {
            if v.is_empty() {
                return;
            }
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(k);
            out.push('=');
            // Values come from config; keep the header valid whatever they hold.
            push_sanitized(&mut out, v);
        };
        add("k8s.cluster.name", &self.cluster);
        add("k8s.namespace.name", &self.namespace);
        if !self.workload_type.is_empty() {
            let mut key = String::from("k8s.");
            push_sanitized(&mut key, &self.workload_type.to_lowercase());
            key.push_str(".name");
            add(&key, &self.workload_name);
        }
        add("service.name", &self.service);
        add("service.version", &self.version);
        out
    }

    /// The header, `None` when there is nothing to say. Every stream from one source workload
    /// carries the same one: build it once per workload and share it (a clone of a
    /// `HeaderValue` shares its bytes).
    pub fn header(&self) -> Option<HeaderValue> {
        baggage_header(self.header_value())
    }
}

/// A `baggage` header from its text, `None` when there is nothing in it (no header is sent).
pub fn baggage_header(text: String) -> Option<HeaderValue> {
    if text.is_empty() {
        return None;
    }
    HeaderValue::try_from(text).ok()
}

/// Appends `v` without what a header value or a baggage member cannot hold, straight into
/// the value being built (a CONNECT builds several per connection; the answer's `baggage` is
/// built with it too).
pub fn push_sanitized(out: &mut String, v: &str) {
    // By byte: what is kept is ASCII, and no byte of a longer character is ASCII.
    for b in v.bytes() {
        if b.is_ascii_graphic() && !matches!(b, b',' | b';' | b'=' | b'"' | b'\\') {
            out.push(char::from(b));
        }
    }
}

/// A W3C `traceparent`: version 00, random trace and span ids, sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// 16-byte trace id (never all zero).
    pub trace_id: u128,
    /// 8-byte parent span id (never zero).
    pub span_id: u64,
}

impl TraceParent {
    /// A fresh trace from the given random source.
    pub fn random<R: rand::Rng + ?Sized>(rng: &mut R) -> Self {
        TraceParent {
            trace_id: rng.gen::<u128>() | 1,
            span_id: rng.gen::<u64>() | 1,
        }
    }

    /// The header value `00-<32 hex>-<16 hex>-01`.
    pub fn header_value(&self) -> String {
        String::from_utf8_lossy(&self.text()).into_owned()
    }

    /// The header value, digit by digit (the formatter took a tenth of a CONNECT's cost).
    fn text(&self) -> [u8; 55] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = *b"00-00000000000000000000000000000000-0000000000000000-01";
        let mut id = self.trace_id;
        for d in out[3..35].iter_mut().rev() {
            *d = HEX[(id & 0xf) as usize];
            id >>= 4;
        }
        let mut span = self.span_id;
        for d in out[36..52].iter_mut().rev() {
            *d = HEX[(span & 0xf) as usize];
            span >>= 4;
        }
        out
    }
}

/// Everything the client side needs to open one HBONE stream.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// The workload address and target port the stream is for (`:authority`).
    pub target: SocketAddr,
    /// The original client address (`forwarded: for=...`).
    pub source: SocketAddr,
    /// The service hostname when the client dialled a service VIP (`;host=...`).
    pub service_host: Option<String>,
    /// The source workload's description ([`Baggage::header`]), if any.
    pub baggage: Option<HeaderValue>,
    /// Trace context for the stream.
    pub traceparent: TraceParent,
}

impl ConnectRequest {
    /// The `forwarded` header value: `for="<ip:port>"` and `;host=<service>` when known.
    pub fn forwarded_value(&self) -> String {
        let mut v = String::from("for=\"");
        AddrText(self.source).push_to(&mut v);
        v.push('"');
        if let Some(host) = &self.service_host {
            v.push_str(";host=");
            push_sanitized(&mut v, host);
        }
        v
    }

    /// The HTTP/2 request: `CONNECT` with `:authority` = target and the three HBONE headers.
    pub fn to_request(&self) -> Request<()> {
        let mut req = Request::new(());
        *req.method_mut() = Method::CONNECT;
        // A SocketAddr always renders as a valid authority ("1.2.3.4:80", "[::1]:80").
        let mut authority = String::new();
        AddrText(self.target).push_to(&mut authority);
        if let Ok(uri) = http::Uri::try_from(authority) {
            *req.uri_mut() = uri;
        }
        let headers = req.headers_mut();
        // `forwarded` (the client's port) and `traceparent` (random) are never the same twice:
        // sent as never-indexed literals, they cost neither end an HPACK table insert nor
        // evict the entries later requests do repeat (`baggage`, the authority).
        if let Ok(mut v) = HeaderValue::try_from(self.forwarded_value()) {
            v.set_sensitive(true);
            headers.insert(FORWARDED_NAME, v);
        }
        if let Some(b) = &self.baggage {
            headers.insert(BAGGAGE_NAME, b.clone());
        }
        if let Ok(mut v) = HeaderValue::from_bytes(&self.traceparent.text()) {
            v.set_sensitive(true);
            headers.insert(TRACEPARENT_NAME, v);
        }
        req
    }
}

/// Why a `CONNECT` was refused, and the status it is answered with (as ztunnel answers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status sent back on the stream.
    pub status: StatusCode,
    /// Short reason for logs and `response_flags`.
    pub reason: &'static str,
}

impl Refusal {
    /// 400: not a CONNECT, its authority is not `ip:port`, or it names another address than
    /// the one the connection reached.
    pub const fn malformed(reason: &'static str) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            reason,
        }
    }
    /// 401: the caller's identity is not allowed here.
    pub const fn unauthorized(reason: &'static str) -> Self {
        Refusal {
            status: StatusCode::UNAUTHORIZED,
            reason,
        }
    }
    /// 503: the destination is not served by this ringtun, is one of its own ports, or cannot
    /// be reached.
    pub const fn unavailable(reason: &'static str) -> Self {
        Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason,
        }
    }
}

/// What a valid incoming `CONNECT` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectTarget {
    /// Destination `ip:port` from `:authority`.
    pub target: SocketAddr,
    /// Original client address from `forwarded: for=`, when present and well-formed: the
    /// client's claim, for logs at most, never for authorization.
    pub forwarded_for: Option<SocketAddr>,
}

/// Validates an incoming request head on 15008. Only `CONNECT` with an `ip:port` authority passes.
pub fn parse_connect(
    method: &Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> Result<ConnectTarget, Refusal> {
    if method != Method::CONNECT {
        return Err(Refusal::malformed("method is not CONNECT"));
    }
    let authority = uri
        .authority()
        .ok_or(Refusal::malformed("CONNECT without :authority"))?;
    let target =
        parse_ip_port(authority.as_str()).ok_or(Refusal::malformed("authority is not ip:port"))?;
    let forwarded_for = headers
        .get(FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(forwarded_for);
    Ok(ConnectTarget {
        target,
        forwarded_for,
    })
}

/// Parses `1.2.3.4:80` or `[::1]:80`; host names, missing or zero ports are refused.
pub fn parse_ip_port(s: &str) -> Option<SocketAddr> {
    let addr: SocketAddr = s.parse().ok()?;
    (addr.port() != 0).then_some(addr)
}

/// The `for=` address of a `forwarded` header (first element), quoted or not.
pub fn forwarded_for(value: &str) -> Option<SocketAddr> {
    let first = value.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        if !k.eq_ignore_ascii_case("for") {
            return None;
        }
        let v = v.trim_matches('"');
        v.parse::<SocketAddr>()
            .ok()
            .or_else(|| v.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req() -> ConnectRequest {
        ConnectRequest {
            target: "10.77.0.2:5201".parse().unwrap(),
            source: "10.77.0.1:40000".parse().unwrap(),
            service_host: Some("server.default.svc.cluster.local".into()),
            baggage: Baggage {
                cluster: "Kubernetes".into(),
                namespace: "default".into(),
                workload_type: "deployment".into(),
                workload_name: "client".into(),
                service: "client".into(),
                version: "latest".into(),
            }
            .header(),
            traceparent: TraceParent {
                trace_id: 0xabc,
                span_id: 0x12,
            },
        }
    }

    #[test]
    fn request_has_hbone_shape() {
        let r = req().to_request();
        assert_eq!(r.method(), Method::CONNECT);
        assert_eq!(r.uri().authority().unwrap().as_str(), "10.77.0.2:5201");
        assert_eq!(
            r.headers()[FORWARDED],
            "for=\"10.77.0.1:40000\";host=server.default.svc.cluster.local"
        );
        assert_eq!(
            r.headers()[BAGGAGE],
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=client,service.name=client,service.version=latest"
        );
        assert_eq!(
            r.headers()[TRACEPARENT],
            "00-00000000000000000000000000000abc-0000000000000012-01"
        );
    }

    #[test]
    fn per_connection_values_are_never_indexed_and_no_baggage_means_no_header() {
        let r = req().to_request();
        // Unique per connection: kept out of both ends' HPACK tables.
        assert!(r.headers()[FORWARDED].is_sensitive());
        assert!(r.headers()[TRACEPARENT].is_sensitive());
        // Repeated by every stream of a workload: indexed once, then one byte per request.
        assert!(!r.headers()[BAGGAGE].is_sensitive());
        assert_eq!(Baggage::default().header(), None);
        let bare = ConnectRequest {
            baggage: Baggage::default().header(),
            ..req()
        };
        assert!(!bare.to_request().headers().contains_key(BAGGAGE));
    }

    #[test]
    fn server_accepts_what_client_sends() {
        let r = req().to_request();
        let t = parse_connect(r.method(), r.uri(), r.headers()).unwrap();
        assert_eq!(t.target, req().target);
        assert_eq!(t.forwarded_for, Some(req().source));
    }

    #[test]
    fn ipv6_authority_round_trips() {
        let mut c = req();
        c.target = "[fd77::2]:5201".parse().unwrap();
        c.source = "[fd77::1]:1234".parse().unwrap();
        let r = c.to_request();
        assert_eq!(r.uri().authority().unwrap().as_str(), "[fd77::2]:5201");
        let t = parse_connect(r.method(), r.uri(), r.headers()).unwrap();
        assert_eq!(t.target, c.target);
        assert_eq!(t.forwarded_for, Some(c.source));
    }

    #[test]
    fn refusals() {
        let h = http::HeaderMap::new();
        let uri: http::Uri = "10.0.0.1:80".parse().unwrap();
        assert_eq!(
            parse_connect(&Method::GET, &uri, &h).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        for bad in ["example.com:80", "10.0.0.1:0", "10.0.0.1"] {
            let uri: http::Uri = bad.parse().unwrap();
            assert_eq!(
                parse_connect(&Method::CONNECT, &uri, &h)
                    .unwrap_err()
                    .status,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }

    proptest! {
        #[test]
        fn any_ip_port_is_accepted_and_nothing_else_panics(s in ".{0,64}") {
            let _ = parse_ip_port(&s);
            let _ = forwarded_for(&s);
        }

        #[test]
        fn traceparent_is_written_as_the_formatter_writes_it(trace_id in any::<u128>(), span_id in any::<u64>()) {
            let t = TraceParent { trace_id, span_id };
            let want = format!("00-{trace_id:032x}-{span_id:016x}-01");
            prop_assert_eq!(t.header_value(), want.clone());
            let req = ConnectRequest { traceparent: t, ..req() }.to_request();
            prop_assert_eq!(req.headers()[TRACEPARENT].to_str().ok(), Some(want.as_str()));
        }

        #[test]
        fn baggage_is_always_a_valid_header(ns in ".{0,30}", name in ".{0,30}", kind in ".{0,10}") {
            let b = Baggage { namespace: ns, workload_name: name, workload_type: kind, ..Default::default() };
            prop_assert!(HeaderValue::try_from(b.header_value()).is_ok());
        }

        #[test]
        fn a_value_keeps_exactly_its_printable_ascii_but_separators(v in ".{0,40}") {
            let mut out = String::new();
            push_sanitized(&mut out, &v);
            let want: String = v
                .chars()
                .filter(|c| c.is_ascii_graphic() && !matches!(c, ',' | ';' | '=' | '"' | '\\'))
                .collect();
            prop_assert_eq!(out, want);
        }
    }

    #[test]
    fn baggage_members_drop_what_would_break_the_header() {
        let b = Baggage {
            namespace: "a b,c;d=e\"f\\gü".into(),
            workload_type: "Deploy ment".into(),
            workload_name: "w".into(),
            ..Default::default()
        };
        assert_eq!(
            b.header_value(),
            "k8s.namespace.name=abcdefg,k8s.deployment.name=w"
        );
    }
}
