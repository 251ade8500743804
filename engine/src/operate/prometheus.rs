//! Prometheus text (and OpenMetrics) of the shards' reports: what `/metrics` on 15020 serves.
//!
//! The shards count ([`crate::metrics`]); this sums their copies and writes them out. Family
//! and label names are ztunnel's so its dashboards keep working.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::exposition::counter_header;
use crate::metrics::{
    Party, Reporter, ShardCounters, ShardGauges, ShardReport, TcpCounts, TcpLabels,
};

/// Process-wide facts rendered with the shard figures.
#[derive(Clone, Debug, Default)]
pub struct ProcessInfo {
    /// `io_uring` or `legacy`.
    pub driver: String,
    /// Whether the kernel TLS ULP is available.
    pub ktls_available: bool,
    /// Whether ringtun is draining.
    pub draining: bool,
    /// Certificates held and fetched (rendered by `CertReport::prometheus`).
    pub certs: crate::tls::CertReport,
    /// Open file descriptors and their limit (ztunnel's `process_open_fds`,
    /// `process_max_fds`), read when `/metrics` is scraped.
    pub fds: Option<(u64, u64)>,
    /// The xDS client's state, when the config comes from istiod.
    pub xds: Option<crate::xds::XdsStatus>,
    /// In-pod mode: ztunnel's `workload_manager_*` metrics.
    pub workload_manager: Option<crate::inpod::manager::ManagerMetrics>,
    /// The DNS proxy's counters, when it runs.
    pub dns: Option<crate::dns::DnsReport>,
}

impl ProcessInfo {
    /// The process's open file descriptors and their soft limit, now.
    pub fn read_fds() -> Option<(u64, u64)> {
        let open = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a live, writable rlimit.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return None;
        }
        Some((open, lim.rlim_cur))
    }
}

/// The label pairs of one series, in ztunnel's order and spelling (its `CommonTrafficLabels`:
/// unknown values as `unknown`, the four locality labels only where a workload is known).
fn label_pairs(l: &TcpLabels) -> Vec<(&'static str, &str)> {
    let src = l.source.as_deref();
    let dst = l.destination.as_deref();
    let svc = l.destination_service.as_deref();
    fn of(p: Option<&Party>, get: fn(&Party) -> &str) -> &str {
        or_unknown(p.map(get).unwrap_or_default())
    }
    let mut pairs = vec![
        ("reporter", l.reporter.map_or("unknown", Reporter::as_str)),
        ("source_workload", of(src, |p| &p.workload_name)),
        ("source_canonical_service", of(src, |p| &p.canonical_name)),
        (
            "source_canonical_revision",
            of(src, |p| &p.canonical_revision),
        ),
        ("source_workload_namespace", of(src, |p| &p.namespace)),
        ("source_principal", or_unknown(&l.source_principal)),
        ("source_app", of(src, |p| &p.app)),
        ("source_version", of(src, |p| &p.canonical_revision)),
        ("source_cluster", of(src, |p| &p.cluster)),
        (
            "destination_service",
            or_unknown(svc.map(|s| s.hostname.as_str()).unwrap_or_default()),
        ),
        (
            "destination_service_namespace",
            or_unknown(svc.map(|s| s.namespace.as_str()).unwrap_or_default()),
        ),
        (
            "destination_service_name",
            or_unknown(svc.map(|s| s.name.as_str()).unwrap_or_default()),
        ),
        ("destination_workload", of(dst, |p| &p.workload_name)),
        (
            "destination_canonical_service",
            of(dst, |p| &p.canonical_name),
        ),
        (
            "destination_canonical_revision",
            of(dst, |p| &p.canonical_revision),
        ),
        ("destination_workload_namespace", of(dst, |p| &p.namespace)),
        (
            "destination_principal",
            or_unknown(&l.destination_principal),
        ),
        ("destination_app", of(dst, |p| &p.app)),
        ("destination_version", of(dst, |p| &p.canonical_revision)),
        ("destination_cluster", of(dst, |p| &p.cluster)),
        ("request_protocol", l.request_protocol),
        ("response_flags", or_dash(&l.response_flags)),
        ("connection_security_policy", l.connection_security_policy),
    ];
    if src.is_some() || dst.is_some() || !l.source_principal.is_empty() {
        pairs.extend([
            ("source_region", of(src, |p| &p.region)),
            ("source_zone", of(src, |p| &p.zone)),
            ("destination_region", of(dst, |p| &p.region)),
            ("destination_zone", of(dst, |p| &p.zone)),
        ]);
    }
    pairs
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

/// One of ringtun's per-shard figures: a gauge (a value now) or a counter (a total since start).
#[derive(Clone, Copy)]
enum Figure {
    Gauge(Getter<ShardGauges>),
    Counter(Getter<ShardCounters>),
}

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
            "The total number of TCP connections opened.",
            |c| c.opened,
        ),
        (
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed.",
            |c| c.closed,
        ),
        (
            "istio_tcp_connections_failed",
            "The total number of TCP connections that failed to establish (unstable).",
            |c| c.failed,
        ),
        (
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection.",
            |c| c.sent,
        ),
        (
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection.",
            |c| c.received,
        ),
    ];
    for (name, help, get) in families {
        counter_header(&mut out, name, help, openmetrics);
        // As ztunnel's registry: a series is there once it was counted in, and a connection's
        // byte series from the moment it opened (so a denial's flagged series has no
        // `opened` sample, and no bytes).
        let bytes = name.ends_with("_bytes");
        for (l, c) in tcp
            .iter()
            .filter(|(_, c)| if bytes { c.opened > 0 } else { get(c) > 0 })
        {
            let _ = writeln!(
                out,
                "{name}_total{} {}",
                labels_text(&label_pairs(l)),
                get(c)
            );
        }
    }
    let per_shard: [(&str, &str, Figure); 13] = [
        (
            "ringtun_open_connections",
            "Connections open now, per shard",
            Figure::Gauge(|g| g.open_connections),
        ),
        (
            "ringtun_accepted_connections",
            "Connections accepted, per shard",
            Figure::Counter(|c| c.accepted),
        ),
        (
            "ringtun_accepted_direct_connections",
            "Connections accepted with a direct accept4 behind an io_uring accept (a burst taken in one tick), per shard",
            Figure::Counter(|c| c.accepted_direct),
        ),
        (
            "ringtun_failed_connections",
            "Connections refused or failed before tunnelling, per shard",
            Figure::Counter(|c| c.failed),
        ),
        (
            "ringtun_pool_connections",
            "Pooled HBONE connections now, per shard",
            Figure::Gauge(|g| g.pool_connections),
        ),
        (
            "ringtun_pool_new_streams",
            "HBONE streams opened on a new pooled connection, per shard",
            Figure::Counter(|c| c.pool_new),
        ),
        (
            "ringtun_pool_reused_streams",
            "HBONE streams opened on an already open pooled connection, per shard",
            Figure::Counter(|c| c.pool_reused),
        ),
        (
            "ringtun_pool_streams",
            "Streams on pooled HBONE connections now, per shard",
            Figure::Gauge(|g| g.pool_streams),
        ),
        (
            "ringtun_ktls_connections",
            "HBONE connections with kernel TLS (TX and RX offloaded), per shard",
            Figure::Counter(|c| c.ktls_connections),
        ),
        (
            "ringtun_userspace_tls_connections",
            "HBONE connections with userspace TLS, per shard",
            Figure::Counter(|c| c.userspace_tls_connections),
        ),
        (
            "ringtun_ktls_failed_connections",
            "HBONE connections lost while taking the record layer over from rustls (for kernel TLS or ringtun's userspace records), per shard",
            Figure::Counter(|c| c.ktls_failed),
        ),
        (
            "ringtun_ktls_retired_connections",
            "Kernel TLS connections retired (no new streams) as a key (TX, or the peer's RX) neared its usage limit, per shard",
            Figure::Counter(|c| c.ktls_retired),
        ),
        (
            "ringtun_config_generation",
            "Config generation in use, per shard",
            Figure::Gauge(|g| g.config_generation),
        ),
    ];
    for (name, help, figure) in per_shard {
        let suffix = match figure {
            Figure::Counter(_) => {
                counter_header(&mut out, name, help, openmetrics);
                "_total"
            }
            Figure::Gauge(_) => {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
                ""
            }
        };
        for r in reports {
            let value = match figure {
                Figure::Counter(get) => get(&r.counters),
                Figure::Gauge(get) => get(&r.gauges),
            };
            let _ = writeln!(out, "{name}{suffix}{{shard=\"{}\"}} {value}", r.shard);
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
            r.shard, r.counters.refused_overloaded
        );
    }
    // ztunnel's own families, so its dashboards find a ringtun node (checked against a
    // running ztunnel's /metrics: `istio_build{component="ztunnel",tag=…}`,
    // `istio_tcp_sockets_open{reporter=…}`).
    let _ = writeln!(
        out,
        "# HELP istio_build Istio component build info.\n# TYPE istio_build gauge\nistio_build{} 1",
        labels_text(&[("component", "ztunnel"), ("tag", env!("CARGO_PKG_VERSION"))])
    );
    let _ = writeln!(
        out,
        "# HELP istio_tcp_sockets_open The current number of open TCP sockets (unstable).\n# TYPE istio_tcp_sockets_open gauge"
    );
    for (i, reporter) in ["source", "destination"].iter().enumerate() {
        let n: u64 = reports.iter().map(|r| r.gauges.sockets_open[i]).sum();
        let _ = writeln!(out, "istio_tcp_sockets_open{{reporter=\"{reporter}\"}} {n}");
    }
    if let Some((open, max)) = info.fds {
        let _ = writeln!(
            out,
            "# HELP process_open_fds Number of open file descriptors\n# TYPE process_open_fds gauge\nprocess_open_fds {open}\n# HELP process_max_fds Maximum number of file descriptors\n# TYPE process_max_fds gauge\nprocess_max_fds {max}"
        );
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
    // Certificates: ringtun's fetch counters and ztunnel's istio_cert_expiry_seconds.
    out.push_str(&info.certs.prometheus(openmetrics));
    if let Some(xds) = &info.xds {
        out.push_str(&xds.prometheus(openmetrics));
    }
    if let Some(m) = &info.workload_manager {
        out.push_str(&m.prometheus(openmetrics));
    }
    if let Some(dns) = &info.dns {
        out.push_str(&dns.prometheus(openmetrics));
    }
    if openmetrics {
        out.push_str("# EOF\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{ServiceName, ShardMetrics};
    use std::sync::Arc;

    fn party(name: &str, app: &str) -> Option<Arc<Party>> {
        Some(Arc::new(Party {
            name: format!("{name}-7d9f"),
            namespace: "default".into(),
            workload_name: name.into(),
            canonical_name: app.into(),
            app: app.into(),
            canonical_revision: "v1".into(),
            cluster: "Kubernetes".into(),
            region: "eu-west".into(),
            zone: String::new(),
        }))
    }

    fn service(hostname: &str) -> Option<Arc<ServiceName>> {
        Some(Arc::new(ServiceName {
            hostname: hostname.into(),
            name: "server".into(),
            namespace: "default".into(),
        }))
    }

    fn labels(r: Reporter) -> TcpLabels {
        TcpLabels {
            reporter: Some(r),
            source: party("client", "client-app"),
            source_principal: "spiffe://cluster.local/ns/default/sa/client".into(),
            destination: party("server", "server-app"),
            destination_principal: "spiffe://cluster.local/ns/default/sa/server".into(),
            destination_service: service("server.default.svc.cluster.local"),
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
                ..ShardReport::default()
            },
            ShardReport {
                shard: 1,
                tcp: b.export(),
                ..ShardReport::default()
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

    /// The exact text of a scrape of two shards (with every kind of series, escaping, a
    /// series with default labels), as rendered before the figures were split into gauges and
    /// counters: the rendering must not change a byte.
    #[test]
    fn text_is_unchanged() {
        let l = |reporter, flags: &str| TcpLabels {
            destination_service: service("ser\"ver\\x\ny"),
            response_flags: flags.into(),
            ..labels(reporter)
        };
        let a = ShardMetrics::default();
        let b = ShardMetrics::default();
        a.opened(&l(Reporter::Source, ""));
        a.closed(&l(Reporter::Source, ""), 10, 20);
        let live = b.opened(&l(Reporter::Source, ""));
        b.moved(&live, 5, 6);
        b.failed(&l(Reporter::Destination, "DENY"));
        b.failed(&TcpLabels::default());
        let report = |shard: usize, tcp, k: u64| ShardReport {
            shard,
            tcp,
            gauges: ShardGauges {
                open_connections: k + 1,
                pool_connections: k + 3,
                pool_streams: k + 4,
                config_generation: k + 7,
                sockets_open: [k + 9, k + 10],
            },
            counters: ShardCounters {
                accepted: k + 2,
                accepted_direct: k + 16,
                ktls_connections: k + 5,
                userspace_tls_connections: k + 6,
                refused_overloaded: k + 8,
                failed: k + 11,
                pool_new: k + 12,
                pool_reused: k + 13,
                ktls_failed: k + 14,
                ktls_retired: k + 15,
            },
        };
        let reports = [report(0, a.export(), 0), report(1, b.export(), 100)];
        let info = ProcessInfo {
            driver: "io_uring".into(),
            ktls_available: true,
            draining: true,
            certs: Default::default(),
            fds: Some((28, 20_000)),
            xds: None,
            workload_manager: None,
            dns: None,
        };
        let text = format!(
            "{}=====OM\n{}",
            render(&reports, &info, false),
            render(&reports, &ProcessInfo::default(), true)
        );
        // RINGTUN_UPDATE_GOLDEN=1 rewrites the file when the rendering is meant to change.
        if std::env::var_os("RINGTUN_UPDATE_GOLDEN").is_some() {
            let path = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/src/operate/testdata/metrics.txt"
            );
            std::fs::write(path, text.replace(env!("CARGO_PKG_VERSION"), "{VERSION}"))
                .expect("write the golden file");
        }
        let want =
            include_str!("testdata/metrics.txt").replace("{VERSION}", env!("CARGO_PKG_VERSION"));
        assert_eq!(text, want);
    }
}
