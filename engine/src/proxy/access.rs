//! One access-log line per connection, written when it closes (by the connection's record in
//! `lifecycle`), with ztunnel's message, level and fields (`src.addr`, `src.workload`, …,
//! `bytes_sent`, `bytes_recv`, `duration`, `error`) so log pipelines written for ztunnel read
//! it; ringtun's own fields (`path`, `pool`, `tls`, `shard`, `end`, `response_flags`) follow.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use ringtun_hbone::addr::AddrText;
use ringtun_hbone::{Identity, HBONE_PORT};

use super::copy::End;
use crate::metrics::{Party, Reporter, Series, ServiceName, ShardMetrics, TcpLabels};
use crate::operate::log_format;
use crate::shard::pod::PodShard;
use crate::stream::TlsPath;

/// Which path a connection took through ringtun.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Captured on 15001 and sent over HBONE.
    Outbound,
    /// Captured on 15001 and sent as plain TCP (destination not in the mesh, or protocol TCP).
    Passthrough,
    /// Arrived over HBONE on 15008.
    Inbound,
    /// Arrived in plaintext on the 15006 capture.
    InboundPlaintext,
}

impl Direction {
    /// ztunnel's `direction`: `outbound` or `inbound`, whatever the carrier.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound | Direction::Passthrough => "outbound",
            Direction::Inbound | Direction::InboundPlaintext => "inbound",
        }
    }

    /// ringtun's `path`: `hbone`, `passthrough` (outbound plain TCP) or `plaintext` (15006).
    pub fn path(self) -> &'static str {
        match self {
            Direction::Outbound | Direction::Inbound => "hbone",
            Direction::Passthrough => "passthrough",
            Direction::InboundPlaintext => "plaintext",
        }
    }

    /// Whether the connection is carried over mutual TLS (HBONE).
    pub fn mtls(self) -> bool {
        matches!(self, Direction::Outbound | Direction::Inbound)
    }
}

/// Bytes a connection moved, by direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the client towards the destination (Istio's `received` on both ends).
    pub request: u64,
    /// From the destination back to the client (Istio's `sent` on both ends).
    pub response: u64,
}

/// How a connection ended: what its access line and its close in the metrics are written
/// with. Not kept in [`AccessLog`], which every connection holds for its whole life.
#[derive(Debug)]
pub struct Outcome {
    /// How it ended.
    pub end: End,
    /// Bytes each way, in total.
    pub bytes: Transferred,
    /// Of those, the bytes the metrics have not counted yet (the rest were counted while it
    /// lived).
    pub unreported: Transferred,
}

/// Everything logged about one connection while it lives; its end and byte counts come with
/// the [`Outcome`] when it is written.
///
/// Every idle connection keeps one (with its record's few extra fields) in a box of 256 bytes
/// or less, mimalloc's size class, so fields that can be derived are not stored.
#[derive(Debug)]
pub struct AccessLog {
    /// Path taken.
    pub direction: Direction,
    /// Original client address (inbound: the HBONE connection's peer).
    pub src_addr: SocketAddr,
    /// Client identity, when known.
    pub src_identity: Option<Rc<Identity>>,
    /// Source workload, when known.
    pub src_workload: Option<Arc<Party>>,
    /// Destination: the original destination outbound, the CONNECT authority inbound.
    pub dst_addr: Option<SocketAddr>,
    /// Over HBONE: outbound, the CONNECT authority sent (ztunnel's `dst.hbone_addr`; the
    /// HBONE connection went to its IP's 15008); inbound, our own address the HBONE connection
    /// reached. See [`AccessLog::logged_dst`].
    pub hbone: Option<SocketAddr>,
    /// The service dialled, when a VIP was (inbound: the one a hostname CONNECT named).
    pub dst_service: Option<Arc<ServiceName>>,
    /// Inbound: the CONNECT named `dst_service`'s hostname at this service port, which
    /// ztunnel's `dst.hbone_addr` then shows (`hostname:port`).
    pub hbone_service_port: Option<u16>,
    /// Destination workload, when known.
    pub dst_workload: Option<Arc<Party>>,
    /// Destination identity, when known.
    pub dst_identity: Option<Rc<Identity>>,
    /// Whether the HBONE connection was new or reused from the pool.
    pub pool_reused: Option<bool>,
    /// Record layer of the HBONE connection (kTLS per direction, or userspace rustls).
    pub tls: Option<TlsPath>,
    /// The metric series the connection counts in, once established.
    pub series: Option<Rc<Series>>,
    /// Start of the connection.
    pub started: quanta::Instant,
    /// Shard that carried it.
    pub shard: u32,
    /// Whether the connection was established (counted as opened in the metrics).
    pub established: bool,
    /// Refused before a destination was chosen: ztunnel logs these as `connection failed` and
    /// counts them in no Istio metric.
    pub early: bool,
    /// Why it was refused, for `response_flags` (`DENY`, `CONNECT`, ...).
    pub response_flags: Option<&'static str>,
    /// In-pod mode: the pod whose listener took the connection (`pod.uid`, `pod.netns`, last
    /// on the line, after ztunnel's fields and ringtun's own).
    pub pod: Option<Rc<PodShard>>,
}

/// Whether the log takes `access` lines at this level (its filter, as for any event).
fn access_enabled(level: tracing::Level) -> bool {
    // tracing's macro takes a constant level.
    match level {
        tracing::Level::ERROR => tracing::enabled!(target: "access", tracing::Level::ERROR),
        tracing::Level::WARN => tracing::enabled!(target: "access", tracing::Level::WARN),
        tracing::Level::INFO => tracing::enabled!(target: "access", tracing::Level::INFO),
        _ => tracing::enabled!(target: "access", tracing::Level::DEBUG),
    }
}

/// A CONNECT authority as logged: an address, or a service hostname and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HboneAddr<'a> {
    /// `ip:port`.
    Addr(SocketAddr),
    /// `hostname:port`.
    Host(&'a str, u16),
}

impl std::fmt::Display for HboneAddr<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HboneAddr::Addr(a) => AddrText(*a).fmt(f),
            HboneAddr::Host(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// A label value, `None` where ztunnel's would be `unknown` (and its log leaves the field out).
fn known(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

impl AccessLog {
    /// A record for a connection that starts now.
    pub fn new(direction: Direction, src_addr: SocketAddr, shard: usize) -> Self {
        AccessLog {
            direction,
            src_addr,
            src_identity: None,
            src_workload: None,
            dst_addr: None,
            hbone: None,
            dst_service: None,
            hbone_service_port: None,
            dst_workload: None,
            dst_identity: None,
            pool_reused: None,
            tls: None,
            series: None,
            started: quanta::Instant::now(),
            // A shard number never comes near u32::MAX.
            shard: u32::try_from(shard).unwrap_or(u32::MAX),
            established: false,
            early: false,
            response_flags: None,
            pod: None,
        }
    }

    /// Which end of the connection this record reports for: the source's ringtun outbound,
    /// the destination's inbound.
    pub fn reporter(&self) -> Reporter {
        match self.direction {
            Direction::Outbound | Direction::Passthrough => Reporter::Source,
            Direction::Inbound | Direction::InboundPlaintext => Reporter::Destination,
        }
    }

    /// `(bytes_sent, bytes_recv)` as ztunnel logs them: from the point of view of the
    /// workload this record reports for, which outbound sent the request and inbound sent the
    /// response (ztunnel's `ConnectionResult`: "Istio flips the metric for source, unflip for
    /// logs"). The metrics count the request as `received` on both ends.
    pub fn logged_bytes(&self, b: Transferred) -> (u64, u64) {
        match self.reporter() {
            Reporter::Source => (b.request, b.response),
            Reporter::Destination => (b.response, b.request),
        }
    }

    /// ztunnel's `dst.addr`: over HBONE, the HBONE connection's address on the destination
    /// side; otherwise the destination itself.
    pub fn logged_dst(&self) -> Option<SocketAddr> {
        let hbone = match self.direction {
            Direction::Outbound => self.hbone.map(|t| SocketAddr::new(t.ip(), HBONE_PORT)),
            Direction::Inbound => self.hbone,
            Direction::Passthrough | Direction::InboundPlaintext => None,
        };
        hbone.or(self.dst_addr)
    }

    /// ztunnel's `dst.hbone_addr`: the CONNECT authority, over HBONE.
    pub fn logged_hbone_addr(&self) -> Option<HboneAddr<'_>> {
        match self.direction {
            Direction::Outbound => self.hbone.map(HboneAddr::Addr),
            Direction::Inbound => match (&self.dst_service, self.hbone_service_port) {
                (Some(svc), Some(port)) => Some(HboneAddr::Host(&svc.hostname, port)),
                _ => self.dst_addr.map(HboneAddr::Addr),
            },
            Direction::Passthrough | Direction::InboundPlaintext => None,
        }
    }

    /// The Istio metric labels of this connection; `flagged`: with its `response_flags`
    /// (the series it closes in) rather than without (the series it opened in).
    pub fn labels(&self, flagged: bool) -> TcpLabels {
        let mtls = self.direction.mtls();
        let principal = |id: &Option<Rc<Identity>>| -> String {
            id.as_ref().map(|i| i.to_string()).unwrap_or_default()
        };
        TcpLabels {
            reporter: Some(self.reporter()),
            source: self.src_workload.clone(),
            // ztunnel names the source principal only from the identity the client proved.
            source_principal: if mtls {
                principal(&self.src_identity)
            } else {
                String::new()
            },
            destination: self.dst_workload.clone(),
            destination_principal: principal(&self.dst_identity),
            destination_service: self.dst_service.clone(),
            request_protocol: "tcp",
            response_flags: if flagged {
                self.response_flags.unwrap_or_default().to_owned()
            } else {
                String::new()
            },
            connection_security_policy: if mtls { "mutual_tls" } else { "unknown" },
        }
    }

    /// Marks the connection established: counted as opened now, as closed when it finishes.
    pub fn established(&mut self, metrics: &ShardMetrics) {
        self.established = true;
        self.series = Some(metrics.opened(&self.labels(false)));
    }

    /// Writes ztunnel's `connection opened` line (debug): the destination is chosen.
    pub fn opening(&self) {
        self.emit(tracing::Level::DEBUG, "connection opened", None);
    }

    /// Counts the connection's end in the shard's metrics and writes the access line.
    pub fn finish(&self, metrics: &ShardMetrics, outcome: &Outcome) {
        if self.established {
            let unreported = outcome.unreported;
            match &self.series {
                // Unflagged, it closes in the series it opened in: the labels were all known
                // before it was established.
                Some(series) if self.response_flags.is_none() => {
                    metrics.closed_in(series, unreported.request, unreported.response);
                }
                Some(series) => {
                    metrics.moved(series, unreported.request, unreported.response);
                    metrics.closed(&self.labels(true), 0, 0);
                }
                None => metrics.closed(&self.labels(true), 0, 0),
            }
        } else if !self.early {
            // As ztunnel: a connection that failed once its destination was chosen was opened,
            // and closed and failed with its response flags.
            metrics.opened(&self.labels(false));
            metrics.closed(&self.labels(true), 0, 0);
            metrics.failed(&self.labels(true));
        }
        if self.early {
            self.emit(tracing::Level::WARN, "connection failed", Some(outcome));
        } else {
            let level = match outcome.end {
                End::Closed | End::PeerReset => tracing::Level::INFO,
                _ => tracing::Level::ERROR,
            };
            self.emit(level, "connection complete", Some(outcome));
        }
    }

    /// Writes an `access` line: ztunnel's fields in ztunnel's order (an early refusal only
    /// `src.addr`, `dst.addr`, `direction` and `error`, as ztunnel's), then ringtun's own;
    /// `outcome`: when it is done, how it ended (bytes, duration, error). Written straight
    /// into the log ([`log_format::write_line`]), in the layout of tracing's lines.
    fn emit(&self, level: tracing::Level, message: &str, outcome: Option<&Outcome>) {
        if !access_enabled(level) {
            return;
        }
        let done = outcome.is_some();
        let end = outcome.map(|o| &o.end);
        let full = !self.early;
        let mtls = self.direction.mtls();
        let src = self.src_workload.as_deref().filter(|_| full);
        let dst = self.dst_workload.as_deref().filter(|_| full);
        let ms = quanta::Instant::now()
            .duration_since(self.started)
            .as_millis();
        let (sent, recv) = self.logged_bytes(outcome.map(|o| o.bytes).unwrap_or_default());
        let done_full = done && full;
        let tls = self.tls;
        log_format::write_line(level, "access", message, |l| {
            l.addr("src.addr", Some(self.src_addr));
            l.str("src.workload", src.and_then(|p| known(&p.name)));
            l.str("src.namespace", src.and_then(|p| known(&p.namespace)));
            // Quoted in both layouts, as ztunnel's are.
            let src_id = self.src_identity.as_deref().filter(|_| mtls && full);
            l.pieces("src.identity", src_id.map(Identity::pieces));
            l.str("src.cluster", src.and_then(|p| known(&p.cluster)));
            l.addr("dst.addr", self.logged_dst());
            l.display("dst.hbone_addr", self.logged_hbone_addr().filter(|_| full));
            let service = self.dst_service.as_deref().filter(|_| full);
            l.str("dst.service", service.map(|s| s.hostname.as_str()));
            l.str("dst.workload", dst.and_then(|p| known(&p.name)));
            l.str("dst.namespace", dst.and_then(|p| known(&p.namespace)));
            let dst_id = self.dst_identity.as_deref().filter(|_| mtls && full);
            l.pieces("dst.identity", dst_id.map(Identity::pieces));
            l.str("dst.cluster", dst.and_then(|p| known(&p.cluster)));
            l.str("direction", Some(self.direction.as_str()));
            l.num("bytes_sent", done_full.then_some(sent));
            l.num("bytes_recv", done_full.then_some(recv));
            let mut digits = itoa::Buffer::new();
            l.pieces("duration", done_full.then(|| [digits.format(ms), "ms"]));
            l.str("error", end.and_then(End::reason));
            l.str("path", Some(self.direction.path()));
            l.str(
                "pool",
                self.pool_reused.map(|r| if r { "reused" } else { "new" }),
            );
            l.str("tls", tls.map(TlsPath::name));
            l.flag("ktls.tx", tls.map(|t| t.ktls_tx));
            l.flag("ktls.rx", tls.map(|t| t.ktls_rx));
            l.str(
                "tls.cipher",
                tls.map(|t| t.cipher.map_or("-", |c| c.name())),
            );
            l.num("shard", Some(u64::from(self.shard)));
            l.display("end", end);
            l.str("response_flags", self.response_flags.filter(|_| done));
            // In-pod mode: which pod, which network namespace.
            l.str("pod.uid", self.pod.as_ref().map(|p| p.pod.uid.as_str()));
            l.str(
                "pod.netns",
                self.pod.as_ref().map(|p| p.pod.netns_name.as_str()),
            );
        });
    }
}
