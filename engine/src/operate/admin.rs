//! The operator's HTTP endpoints, served off the worker shards: Prometheus metrics (15020),
//! readiness (15021) and the admin API (127.0.0.1:15000).
//!
//! These run on one small thread of their own with blocking std sockets: they see a request a
//! second at most, and keeping them off the shards keeps the data path free of them. A scrape
//! asks every shard for a copy of its counters ([`Admin::scrape`]) and sums them here.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::ShardReport;
use crate::operate::logging::LogFilterError;
use crate::operate::profile;
use crate::operate::prometheus::{self, ProcessInfo};

/// Largest request head accepted; admin requests are a line and a few headers.
const MAX_HEAD: usize = 8 * 1024;
/// A client that does not send its request in this time is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoints need from the running proxy.
pub trait Admin: Send + Sync + 'static {
    /// Counters of every shard, collected on the shards' own threads.
    fn scrape(&self) -> Vec<ShardReport>;
    /// Driver, kTLS, draining.
    fn info(&self) -> ProcessInfo;
    /// Ready: every shard has its listeners, a config is loaded, and not draining.
    fn ready(&self) -> Result<(), NotReady>;
    /// JSON for `/config_dump`.
    fn config_dump(&self) -> String;
    /// Changes the log filter (`/logging?level=`); returns the filter now in force.
    fn set_log_level(&self, level: &str) -> Result<String, LogFilterError>;
    /// The log filter in force (`POST /logging` without a query).
    fn log_level(&self) -> String;
    /// Puts the start-up log filter back (`/logging?reset`); returns it.
    fn reset_log_level(&self) -> Result<String, LogFilterError>;
    /// Starts a graceful drain (`/quitquitquit`).
    fn quit(&self);
}

/// Why `/healthz/ready` answers 503.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotReady {
    /// Shards are still taking their listeners.
    Starting,
    /// A drain has begun; the process is on its way out.
    Draining,
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NotReady::Starting => "starting",
            NotReady::Draining => "draining",
        })
    }
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `/metrics` (and `/stats/prometheus`, as ztunnel).
    Metrics,
    /// `/healthz/ready`.
    Readiness,
    /// `/config_dump`, `/logging`, `/quitquitquit`; bind it to loopback only.
    Admin,
}

/// Binds the listeners now (so a port clash fails start-up) and serves them on one thread each.
pub fn serve(
    admin: Arc<dyn Admin>,
    listeners: &[(Role, SocketAddr)],
    stop: Arc<AtomicBool>,
) -> io::Result<Vec<(Role, SocketAddr)>> {
    let mut bound = Vec::new();
    for &(role, addr) in listeners {
        let l = TcpListener::bind(addr)?;
        bound.push((role, l.local_addr()?));
        let admin = admin.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name(format!("ringtun-{role:?}").to_lowercase())
            .spawn(move || {
                for conn in l.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    match conn {
                        Ok(c) => {
                            if let Err(e) = handle(&*admin, role, c) {
                                tracing::debug!(?role, error = %e, "admin request failed");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(?role, error = %e, "admin accept failed");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })?;
    }
    Ok(bound)
}

struct Request {
    method: String,
    path: String,
    query: String,
    accept: String,
}

fn read_request(stream: &TcpStream) -> io::Result<Option<Request>> {
    let mut reader = BufReader::new(stream.take(MAX_HEAD as u64));
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(None);
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut accept = String::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("accept") {
                accept = v.trim().to_owned();
            }
        }
    }
    Ok(Some(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        accept,
    }))
}

fn respond(mut s: &TcpStream, status: &str, ctype: &str, body: &str) -> io::Result<()> {
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Whether the query has `key`, bare (`?reset`) or with a value.
fn has_param(query: &str, key: &str) -> bool {
    query
        .split('&')
        .any(|kv| kv == key || kv.split_once('=').is_some_and(|(k, _)| k == key))
}

const TEXT: &str = "text/plain; charset=utf-8";

fn handle(admin: &dyn Admin, role: Role, stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    let Some(req) = read_request(&stream)? else {
        return respond(&stream, "400 Bad Request", TEXT, "bad request\n");
    };
    match (role, req.method.as_str(), req.path.as_str()) {
        (Role::Metrics, "GET", "/metrics" | "/stats/prometheus") => {
            let om = req.accept.contains("application/openmetrics-text");
            let body = prometheus::render(&admin.scrape(), &admin.info(), om);
            let ctype = if om {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            } else {
                "text/plain; version=0.0.4; charset=utf-8"
            };
            respond(&stream, "200 OK", ctype, &body)
        }
        (Role::Readiness, "GET", "/healthz/ready") => match admin.ready() {
            Ok(()) => respond(&stream, "200 OK", TEXT, "ready\n"),
            Err(why) => respond(
                &stream,
                "503 Service Unavailable",
                TEXT,
                &format!("not ready: {why}\n"),
            ),
        },
        (Role::Admin, "GET", "/config_dump") => {
            respond(&stream, "200 OK", "application/json", &admin.config_dump())
        }
        // As ztunnel's admin (checked against a running one): every /logging request is a
        // POST; without a query it lists the filter (`istioctl ztunnel-config log` does that).
        (Role::Admin, "POST", "/logging") if req.query.is_empty() => respond(
            &stream,
            "200 OK",
            TEXT,
            &format!("current log filter: {}\n", admin.log_level()),
        ),
        (Role::Admin, "POST", "/logging") if has_param(&req.query, "reset") => {
            match admin.reset_log_level() {
                Ok(now) => respond(&stream, "200 OK", TEXT, &format!("log filter: {now}\n")),
                Err(e) => respond(&stream, "500 Internal Server Error", TEXT, &format!("{e}\n")),
            }
        }
        (Role::Admin, "POST", "/logging") => match query_param(&req.query, "level") {
            None => respond(
                &stream,
                "400 Bad Request",
                TEXT,
                "usage: POST /logging (list), POST /logging?level=info|debug|<filter>, POST /logging?reset\n",
            ),
            Some(level) => match admin.set_log_level(level) {
                Ok(now) => respond(&stream, "200 OK", TEXT, &format!("log filter: {now}\n")),
                Err(e) => respond(&stream, "400 Bad Request", TEXT, &format!("{e}\n")),
            },
        },
        // ztunnel's pprof endpoints, answered in text (`operate::profile` says why).
        (Role::Admin, "GET", "/debug/pprof/heap") => {
            respond(&stream, "200 OK", TEXT, &profile::heap())
        }
        (Role::Admin, "GET", "/debug/pprof/profile") => {
            match profile::window(query_param(&req.query, "seconds")) {
                Ok(w) => respond(&stream, "200 OK", TEXT, &profile::cpu(w)),
                Err(e) => respond(&stream, "400 Bad Request", TEXT, &format!("{e}\n")),
            }
        }
        (Role::Admin, "POST", "/quitquitquit") => {
            admin.quit();
            respond(&stream, "200 OK", TEXT, "draining\n")
        }
        (Role::Admin, _, "/logging" | "/quitquitquit") => respond(
            &stream,
            "405 Method Not Allowed",
            TEXT,
            "Invalid HTTP method: use POST\n",
        ),
        _ => respond(&stream, "404 Not Found", TEXT, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Fake {
        quit: AtomicBool,
        level: Mutex<String>,
    }

    impl Admin for Fake {
        fn scrape(&self) -> Vec<ShardReport> {
            vec![ShardReport::default()]
        }
        fn info(&self) -> ProcessInfo {
            ProcessInfo::default()
        }
        fn ready(&self) -> Result<(), NotReady> {
            if self.quit.load(Ordering::Relaxed) {
                Err(NotReady::Draining)
            } else {
                Ok(())
            }
        }
        fn config_dump(&self) -> String {
            "{}".into()
        }
        fn set_log_level(&self, level: &str) -> Result<String, LogFilterError> {
            *self.level.lock().map_err(|_| LogFilterError::Poisoned)? = level.into();
            Ok(level.into())
        }
        fn log_level(&self) -> String {
            self.level.lock().map(|l| l.clone()).unwrap_or_default()
        }
        fn reset_log_level(&self) -> Result<String, LogFilterError> {
            self.set_log_level("info")
        }
        fn quit(&self) {
            self.quit.store(true, Ordering::Relaxed);
        }
    }

    fn get(addr: SocketAddr, req: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn endpoints_answer_and_drain_flips_readiness() {
        let fake = Arc::new(Fake {
            quit: AtomicBool::new(false),
            level: Mutex::new(String::new()),
        });
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let bound = serve(
            fake.clone(),
            &[
                (Role::Metrics, any),
                (Role::Readiness, any),
                (Role::Admin, any),
            ],
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        let (m, r, a) = (bound[0].1, bound[1].1, bound[2].1);
        assert!(get(m, "GET /metrics HTTP/1.1\r\n\r\n").contains("ringtun_shards 1"));
        assert!(get(r, "GET /healthz/ready HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
        assert!(get(a, "GET /logging?level=debug HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(get(a, "POST /logging?level=debug HTTP/1.1\r\n\r\n").contains("log filter: debug"));
        assert_eq!(*fake.level.lock().unwrap(), "debug");
        assert!(get(a, "GET /logging HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(get(a, "POST /logging HTTP/1.1\r\n\r\n").contains("current log filter: debug"));
        assert!(get(a, "POST /logging?reset HTTP/1.1\r\n\r\n").contains("log filter: info"));
        assert!(get(a, "GET /quitquitquit HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(get(r, "GET /healthz/ready HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
        assert!(get(a, "POST /quitquitquit HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
        assert!(get(r, "GET /healthz/ready HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 503"));
        // The admin API is not served on the metrics port.
        assert!(get(m, "POST /quitquitquit HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(m, "garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    }
}
