//! One access-log line per connection, written when it closes (by
//! the connection's record in `lifecycle`).

use std::fmt;
use std::net::SocketAddr;
use std::rc::Rc;

use ringtun_hbone::Identity;

use super::copy::End;
use crate::metrics::{Reporter, ShardMetrics, TcpLabels};
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

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Outbound => "outbound",
            Direction::Passthrough => "passthrough",
            Direction::Inbound => "inbound",
            Direction::InboundPlaintext => "inbound-plaintext",
        })
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

/// Everything logged about one connection.
#[derive(Debug)]
pub struct AccessLog {
    /// Path taken.
    pub direction: Direction,
    /// Original client address.
    pub src_addr: SocketAddr,
    /// Client identity, when known.
    pub src_identity: Option<Rc<Identity>>,
    /// Source workload `ns/name`, when known.
    pub src_workload: Option<String>,
    /// Destination (original destination outbound, authority inbound).
    pub dst_addr: Option<SocketAddr>,
    /// HBONE peer address outbound.
    pub dst_hbone: Option<SocketAddr>,
    /// Service hostname when a VIP was dialled.
    pub dst_service: Option<String>,
    /// Destination workload `ns/name`.
    pub dst_workload: Option<String>,
    /// Destination identity, when known.
    pub dst_identity: Option<Rc<Identity>>,
    /// Whether the HBONE connection was new or reused from the pool.
    pub pool_reused: Option<bool>,
    /// Record layer of the HBONE connection (kTLS per direction, or userspace rustls).
    pub tls: Option<TlsPath>,
    /// Bytes each way.
    pub bytes: Transferred,
    /// The metric series the connection counts in, once established.
    pub series: Option<Rc<TcpLabels>>,
    /// Start of the connection.
    pub started: quanta::Instant,
    /// How it ended.
    pub end: End,
    /// Shard that carried it.
    pub shard: usize,
    /// Whether the connection was established (counted as opened in the metrics).
    pub established: bool,
    /// Why it was refused, for `response_flags` (`DENY`, `CONNECT`, ...).
    pub response_flags: Option<&'static str>,
    /// In-pod mode: the pod whose listener took the connection (`pod.uid`, `pod.netns`, last
    /// on the line, after ztunnel's fields and ringtun's own).
    pub pod: Option<Rc<PodShard>>,
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
            dst_hbone: None,
            dst_service: None,
            dst_workload: None,
            dst_identity: None,
            pool_reused: None,
            tls: None,
            bytes: Transferred::default(),
            series: None,
            started: quanta::Instant::now(),
            end: End::Closed,
            shard,
            established: false,
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

    /// `(bytes_sent, bytes_received)` as ztunnel logs them: from the point of view of the
    /// workload this record reports for, which outbound sent the request and inbound sent the
    /// response (ztunnel's `ConnectionResult`: "Istio flips the metric for source, unflip for
    /// logs"). The metrics count the request as `received` on both ends.
    pub fn logged_bytes(&self) -> (u64, u64) {
        let b = self.bytes;
        match self.reporter() {
            Reporter::Source => (b.request, b.response),
            Reporter::Destination => (b.response, b.request),
        }
    }

    /// The Istio metric labels of this connection.
    pub fn labels(&self) -> TcpLabels {
        let split = |w: &Option<String>| -> (String, String) {
            match w.as_deref().and_then(|w| w.split_once('/')) {
                Some((ns, name)) => (name.to_owned(), ns.to_owned()),
                None => (String::new(), String::new()),
            }
        };
        let (src_name, src_ns) = split(&self.src_workload);
        let (dst_name, dst_ns) = split(&self.dst_workload);
        let mtls = matches!(self.direction, Direction::Outbound | Direction::Inbound);
        TcpLabels {
            reporter: Some(self.reporter()),
            source_workload: src_name,
            source_workload_namespace: src_ns,
            source_principal: self
                .src_identity
                .as_ref()
                .map(|i| i.to_string())
                .unwrap_or_default(),
            destination_workload: dst_name,
            destination_workload_namespace: dst_ns,
            destination_principal: self
                .dst_identity
                .as_ref()
                .map(|i| i.to_string())
                .unwrap_or_default(),
            destination_service: self.dst_service.clone().unwrap_or_default(),
            request_protocol: "tcp",
            response_flags: self.response_flags.unwrap_or_default().to_owned(),
            connection_security_policy: if mtls { "mutual_tls" } else { "unknown" },
        }
    }

    /// Marks the connection established: counted as opened now, as closed when it finishes.
    pub fn established(&mut self, metrics: &ShardMetrics) {
        self.established = true;
        self.series = Some(metrics.opened(&self.labels()));
    }

    /// Counts the connection's end in the shard's metrics and writes the access line;
    /// `unreported`: its bytes the metrics have not counted yet (the rest were counted while
    /// it lived).
    pub fn finish(&self, metrics: &ShardMetrics, unreported: Transferred) {
        if self.established {
            metrics.closed(&self.labels(), unreported.request, unreported.response);
        } else {
            metrics.failed(&self.labels());
        }
        self.emit();
    }

    /// Writes the line (target `access`).
    pub fn emit(&self) {
        match &self.end {
            End::Closed => tracing::info!(target: "access", "{self}"),
            _ => tracing::warn!(target: "access", "{self}"),
        }
    }
}

impl fmt::Display for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "direction={} src.addr={}", self.direction, self.src_addr)?;
        if let Some(v) = &self.src_identity {
            write!(f, " src.identity={v}")?;
        }
        if let Some(v) = &self.src_workload {
            write!(f, " src.workload={v}")?;
        }
        if let Some(v) = &self.dst_addr {
            write!(f, " dst.addr={v}")?;
        }
        if let Some(v) = &self.dst_hbone {
            write!(f, " dst.hbone={v}")?;
        }
        if let Some(v) = &self.dst_service {
            write!(f, " dst.service={v}")?;
        }
        if let Some(v) = &self.dst_workload {
            write!(f, " dst.workload={v}")?;
        }
        if let Some(v) = &self.dst_identity {
            write!(f, " dst.identity={v}")?;
        }
        if let Some(r) = self.pool_reused {
            write!(f, " pool={}", if r { "reused" } else { "new" })?;
        }
        if let Some(t) = self.tls {
            write!(f, " {t}")?;
        }
        let ms = quanta::Instant::now()
            .duration_since(self.started)
            .as_millis();
        let (sent, received) = self.logged_bytes();
        write!(
            f,
            " bytes_sent={sent} bytes_received={received} duration_ms={ms} shard={} end={}",
            self.shard, self.end
        )?;
        if let Some(flags) = self.response_flags {
            write!(f, " response_flags={flags}")?;
        }
        if let Some(r) = self.end.reason() {
            write!(f, " reason=\"{}\"", r.replace('"', "'"))?;
        }
        // In-pod mode (the pods' helper's hook): which pod, which network namespace.
        if let Some(p) = &self.pod {
            write!(f, " pod.uid={} pod.netns={}", p.pod.uid, p.pod.netns_name)?;
        }
        Ok(())
    }
}
