//! Istio's TCP metrics, counted per shard and summed on scrape.
//!
//! Each shard keeps its own [`ShardMetrics`] in plain cells and maps: updating them is a hash
//! lookup on connection open and close, never an atomic and never per byte. A scrape is a
//! message to every shard asking for a copy ([`ShardMetrics::export`]); the control side sums the
//! copies and renders Prometheus text (or OpenMetrics) with [`render`]. Label names and family
//! names are ztunnel's so dashboards keep working.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::rc::Rc;

/// Who reports a connection: the source side (outbound) or the destination side (inbound).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reporter {
    /// The client's proxy.
    Source,
    /// The server's proxy.
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// The labels of one Istio TCP metric series.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpLabels {
    /// `reporter`.
    pub reporter: Option<Reporter>,
    /// `source_workload`.
    pub source_workload: String,
    /// `source_workload_namespace`.
    pub source_workload_namespace: String,
    /// `source_principal` (SPIFFE URI or `unknown`).
    pub source_principal: String,
    /// `destination_workload`.
    pub destination_workload: String,
    /// `destination_workload_namespace`.
    pub destination_workload_namespace: String,
    /// `destination_principal`.
    pub destination_principal: String,
    /// `destination_service` (hostname, or `unknown`).
    pub destination_service: String,
    /// `request_protocol`: always `tcp` here.
    pub request_protocol: &'static str,
    /// `response_flags`: `-` when fine, else why it failed (e.g. `DENY`, `UF` upstream failure).
    pub response_flags: String,
    /// `connection_security_policy`: `mutual_tls` over HBONE, `unknown` in plaintext.
    pub connection_security_policy: &'static str,
}

impl TcpLabels {
    fn pairs(&self) -> [(&'static str, &str); 11] {
        [
            (
                "reporter",
                self.reporter.map_or("unknown", Reporter::as_str),
            ),
            ("source_workload", or_unknown(&self.source_workload)),
            (
                "source_workload_namespace",
                or_unknown(&self.source_workload_namespace),
            ),
            ("source_principal", or_unknown(&self.source_principal)),
            (
                "destination_workload",
                or_unknown(&self.destination_workload),
            ),
            (
                "destination_workload_namespace",
                or_unknown(&self.destination_workload_namespace),
            ),
            (
                "destination_principal",
                or_unknown(&self.destination_principal),
            ),
            ("destination_service", or_unknown(&self.destination_service)),
            ("request_protocol", self.request_protocol),
            ("response_flags", or_dash(&self.response_flags)),
            (
                "connection_security_policy",
                self.connection_security_policy,
            ),
        ]
    }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "unknown"
    } else {
        s
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// Counts of one series.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounts {
    /// Connections opened.
    pub opened: u64,
    /// Connections closed.
    pub closed: u64,
    /// Connections that failed before carrying data (refused, unreachable, denied).
    pub failed: u64,
    /// Bytes sent back to the client (`istio_tcp_sent_bytes_total`: the response direction).
    pub sent: u64,
    /// Bytes received from the client (`istio_tcp_received_bytes_total`: the request direction).
    pub received: u64,
}

impl TcpCounts {
    fn add(&mut self, o: &TcpCounts) {
        self.opened += o.opened;
        self.closed += o.closed;
        self.failed += o.failed;
        self.sent += o.sent;
        self.received += o.received;
    }
}

/// Gauges and counters of ringtun itself, per shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardGauges {
    /// Connections open now.
    pub open_connections: u64,
    /// Connections accepted since start.
    pub accepted: u64,
    /// Pooled HBONE connections now.
    pub pool_connections: u64,
    /// Streams over pooled HBONE connections now.
    pub pool_streams: u64,
    /// HBONE connections whose TLS runs in the kernel (TX and RX).
    pub ktls_connections: u64,
    /// HBONE connections whose TLS runs in userspace rustls.
    pub userspace_tls_connections: u64,
    /// HBONE connections lost while switching to kTLS.
    pub ktls_failed: u64,
    /// kTLS connections retired (no new streams) as their TX key neared its usage limit.
    pub ktls_retired: u64,
    /// Config generation this shard uses.
    pub config_generation: u64,
    /// Connections refused at accept because the shard was at `--max-connections-per-shard`.
    pub refused_overloaded: u64,
    /// Tunnelled connections open now, reported as source (outbound) and as destination.
    pub sockets_open: [u64; 2],
}

/// A shard's metrics, owned by the shard thread.
#[derive(Default)]
pub struct ShardMetrics {
    tcp: RefCell<HashMap<TcpLabels, TcpCounts>>,
    /// One shared copy of each label set live connections count their bytes in.
    interned: RefCell<HashMap<TcpLabels, Rc<TcpLabels>>>,
}

impl ShardMetrics {
    fn with(&self, labels: &TcpLabels, f: impl FnOnce(&mut TcpCounts)) {
        let mut map = self.tcp.borrow_mut();
        // get_mut first: the common case finds the series without cloning the labels.
        if let Some(c) = map.get_mut(labels) {
            f(c);
        } else {
            let mut c = TcpCounts::default();
            f(&mut c);
            map.insert(labels.clone(), c);
        }
    }

    /// A connection was established; returns the shared copy of its labels that its live
    /// byte counts are reported under (one per label set, not one per connection).
    pub fn opened(&self, labels: &TcpLabels) -> Rc<TcpLabels> {
        self.with(labels, |c| c.opened += 1);
        let mut interned = self.interned.borrow_mut();
        if let Some(l) = interned.get(labels) {
            return l.clone();
        }
        let l = Rc::new(labels.clone());
        interned.insert(labels.clone(), l.clone());
        l
    }

    /// Bytes a live connection moved since its last report.
    pub fn moved(&self, labels: &TcpLabels, received: u64, sent: u64) {
        self.with(labels, |c| {
            c.received += received;
            c.sent += sent;
        });
    }

    /// A connection closed; `received` and `sent` are its bytes not reported while it lived.
    pub fn closed(&self, labels: &TcpLabels, received: u64, sent: u64) {
        self.with(labels, |c| {
            c.closed += 1;
            c.received += received;
            c.sent += sent;
        });
    }

    /// A connection failed or was refused before it could be established.
    pub fn failed(&self, labels: &TcpLabels) {
        self.with(labels, |c| c.failed += 1);
    }

    /// A copy of the series, for the scraper.
    pub fn export(&self) -> Vec<(TcpLabels, TcpCounts)> {
        self.tcp
            .borrow()
            .iter()
            .map(|(l, c)| (l.clone(), *c))
            .collect()
    }
}

/// What one shard reports on scrape.
#[derive(Clone, Debug, Default)]
pub struct ShardReport {
    /// Shard number.
    pub shard: usize,
    /// Istio TCP series.
    pub tcp: Vec<(TcpLabels, TcpCounts)>,
    /// ringtun's own figures.
    pub gauges: ShardGauges,
}

/// Process-wide facts rendered with the shard figures.
#[derive(Clone, Debug, Default)]
pub struct ProcessInfo {
    /// `io_uring` or `legacy`.
    pub driver: String,
    /// Whether the kernel TLS ULP is available.
    pub ktls_available: bool,
    /// Whether ringtun is draining.
    pub draining: bool,
}

fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn labels_text(pairs: &[(&str, &str)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{k}=\"{}\"", escape(v));
    }
    s.push('}');
    s
}

/// Reads one figure out of a counts struct.
type Getter<T> = fn(&T) -> u64;
/// Name, help text and getter of one metric family.
type Family<T> = (&'static str, &'static str, Getter<T>);

/// Renders the summed reports. `openmetrics` selects the OpenMetrics text format (counter
/// families named without `_total`, `# EOF` at the end); otherwise Prometheus text 0.0.4.
pub fn render(reports: &[ShardReport], info: &ProcessInfo, openmetrics: bool) -> String {
    let mut tcp: BTreeMap<TcpLabels, TcpCounts> = BTreeMap::new();
    for r in reports {
        for (l, c) in &r.tcp {
            tcp.entry(l.clone()).or_default().add(c);
        }
    }
    let mut out = String::new();
    let families: [Family<TcpCounts>; 5] = [
        (
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            |c| c.opened,
        ),
        (
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            |c| c.closed,
        ),
        (
            "istio_tcp_connections_failed",
            "The total number of TCP connections that failed to be established",
            |c| c.failed,
        ),
        (
            "istio_tcp_sent_bytes",
            "Total bytes sent during response in case of a TCP connection",
            |c| c.sent,
        ),
        (
            "istio_tcp_received_bytes",
            "Total bytes received during request in case of a TCP connection",
            |c| c.received,
        ),
    ];
    for (name, help, get) in families {
        counter_header(&mut out, name, help, openmetrics);
        for (l, c) in &tcp {
            let _ = writeln!(out, "{name}_total{} {}", labels_text(&l.pairs()), get(c));
        }
    }
    let per_shard: [(&str, &str, bool, Getter<ShardGauges>); 9] = [
        (
            "ringtun_open_connections",
            "Connections open now, per shard",
            false,
            |g| g.open_connections,
        ),
        (
            "ringtun_accepted_connections",
            "Connections accepted, per shard",
            true,
            |g| g.accepted,
        ),
        (
            "ringtun_pool_connections",
            "Pooled HBONE connections now, per shard",
            false,
            |g| g.pool_connections,
        ),
        (
            "ringtun_pool_streams",
            "Streams on pooled HBONE connections now, per shard",
            false,
            |g| g.pool_streams,
        ),
        (
            "ringtun_ktls_connections",
            "HBONE connections with kernel TLS (TX and RX offloaded), per shard",
            true,
            |g| g.ktls_connections,
        ),
        (
            "ringtun_userspace_tls_connections",
            "HBONE connections with userspace TLS, per shard",
            true,
            |g| g.userspace_tls_connections,
        ),
        (
            "ringtun_ktls_failed_connections",
            "HBONE connections lost while switching to kernel TLS, per shard",
            true,
            |g| g.ktls_failed,
        ),
        (
            "ringtun_ktls_retired_connections",
            "Kernel TLS connections retired (no new streams) as their TX key neared its usage limit, per shard",
            true,
            |g| g.ktls_retired,
        ),
        (
            "ringtun_config_generation",
            "Config generation in use, per shard",
            false,
            |g| g.config_generation,
        ),
    ];
    for (name, help, is_counter, get) in per_shard {
        if is_counter {
            counter_header(&mut out, name, help, openmetrics);
        } else {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        }
        let suffix = if is_counter { "_total" } else { "" };
        for r in reports {
            let _ = writeln!(
                out,
                "{name}{suffix}{{shard=\"{}\"}} {}",
                r.shard,
                get(&r.gauges)
            );
        }
    }
    counter_header(
        &mut out,
        "ringtun_refused_connections",
        "Connections refused at accept, per shard and reason",
        openmetrics,
    );
    for r in reports {
        let _ = writeln!(
            out,
            "ringtun_refused_connections_total{{shard=\"{}\",reason=\"overloaded\"}} {}",
            r.shard, r.gauges.refused_overloaded
        );
    }
    // ztunnel's own families, so its dashboards find a ringtun node (checked against a
    // running ztunnel's /metrics: `istio_build{component="ztunnel",tag=…}`,
    // `istio_tcp_sockets_open{reporter=…}`).
    let _ = writeln!(
        out,
        "# HELP istio_build Istio component build info\n# TYPE istio_build gauge\nistio_build{} 1",
        labels_text(&[("component", "ztunnel"), ("tag", env!("CARGO_PKG_VERSION"))])
    );
    let _ = writeln!(
        out,
        "# HELP istio_tcp_sockets_open The number of currently open TCP connections\n# TYPE istio_tcp_sockets_open gauge"
    );
    for (i, reporter) in ["source", "destination"].iter().enumerate() {
        let n: u64 = reports.iter().map(|r| r.gauges.sockets_open[i]).sum();
        let _ = writeln!(out, "istio_tcp_sockets_open{{reporter=\"{reporter}\"}} {n}");
    }
    let _ =
        writeln!(
        out,
        "# HELP ringtun_info Build and runtime facts\n# TYPE ringtun_info gauge\nringtun_info{} 1",
        labels_text(&[
            ("version", env!("CARGO_PKG_VERSION")),
            ("driver", &info.driver),
            ("ktls", if info.ktls_available { "available" } else { "unavailable" }),
        ])
    );
    let _ = writeln!(
        out,
        "# HELP ringtun_shards Worker shards\n# TYPE ringtun_shards gauge\nringtun_shards {}",
        reports.len()
    );
    let _ = writeln!(
        out,
        "# HELP ringtun_draining 1 while draining\n# TYPE ringtun_draining gauge\nringtun_draining {}",
        u8::from(info.draining)
    );
    if openmetrics {
        out.push_str("# EOF\n");
    }
    out
}

fn counter_header(out: &mut String, name: &str, help: &str, openmetrics: bool) {
    // Prometheus text names the family after the sample (`_total`); OpenMetrics without it.
    let family = if openmetrics {
        name.to_owned()
    } else {
        format!("{name}_total")
    };
    let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} counter");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(r: Reporter) -> TcpLabels {
        TcpLabels {
            reporter: Some(r),
            source_workload: "client".into(),
            source_workload_namespace: "default".into(),
            source_principal: "spiffe://cluster.local/ns/default/sa/client".into(),
            destination_workload: "server".into(),
            destination_workload_namespace: "default".into(),
            destination_principal: "spiffe://cluster.local/ns/default/sa/server".into(),
            destination_service: "server.default.svc.cluster.local".into(),
            request_protocol: "tcp",
            response_flags: String::new(),
            connection_security_policy: "mutual_tls",
        }
    }

    #[test]
    fn shards_are_summed_per_series() {
        let a = ShardMetrics::default();
        let b = ShardMetrics::default();
        let l = labels(Reporter::Source);
        a.opened(&l);
        a.closed(&l, 10, 20);
        b.opened(&l);
        b.closed(&l, 1, 2);
        b.failed(&labels(Reporter::Destination));
        let reports = vec![
            ShardReport {
                shard: 0,
                tcp: a.export(),
                gauges: ShardGauges::default(),
            },
            ShardReport {
                shard: 1,
                tcp: b.export(),
                gauges: ShardGauges::default(),
            },
        ];
        let text = render(&reports, &ProcessInfo::default(), false);
        assert!(text.contains("# TYPE istio_tcp_received_bytes_total counter"));
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_received_bytes_total{reporter=\"source\""))
            .unwrap();
        assert!(line.ends_with(" 11"), "{line}");
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_opened_total{reporter=\"source\""))
            .unwrap();
        assert!(line.ends_with(" 2"), "{line}");
        assert!(text.contains("response_flags=\"-\""));
        let om = render(&reports, &ProcessInfo::default(), true);
        assert!(om.contains("# TYPE istio_tcp_sent_bytes counter"));
        assert!(om.ends_with("# EOF\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
