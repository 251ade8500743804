//! ztunnel's DNS metrics (its `dns::metrics`): `istio_dns_requests_total`,
//! `istio_dns_upstream_requests_total`, `istio_dns_upstream_failures_total` and the histogram
//! `istio_dns_upstream_request_duration_seconds`, with its labels `request_query_type`,
//! `request_protocol`, `source_canonical_service`, `source_canonical_revision` and its buckets.
//!
//! The DNS thread counts into one [`DnsMetrics`] behind a mutex (a few queries a second, one
//! short lock each); a scrape takes a [`DnsReport`] copy and renders it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::exposition::counter_header;

/// ztunnel's bucket bounds, in its order (it registers `0.005` before `0.001`).
pub const BUCKETS: [f64; 6] = [0.005, 0.001, 0.01, 0.1, 1.0, 5.0];

/// The labels of every DNS series.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnsLabels {
    /// `a`, `aaaa`, `mx`, … (lowercase, as ztunnel writes the query type).
    pub query_type: String,
    /// `udp` or `tcp`.
    pub protocol: &'static str,
    /// The client's canonical service (`unknown` when not known).
    pub source_canonical_service: String,
    /// The client's canonical revision (`unknown` when not known).
    pub source_canonical_revision: String,
}

/// One upstream duration histogram.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Observations per bucket of [`BUCKETS`], each in the first bound that holds it (not
    /// cumulative).
    pub buckets: [u64; 6],
    /// Observations.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum: f64,
}

/// Every DNS series so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DnsReport {
    /// `istio_dns_requests_total`.
    pub requests: BTreeMap<DnsLabels, u64>,
    /// `istio_dns_upstream_requests_total`.
    pub upstream_requests: BTreeMap<DnsLabels, u64>,
    /// `istio_dns_upstream_failures_total`.
    pub upstream_failures: BTreeMap<DnsLabels, u64>,
    /// `istio_dns_upstream_request_duration_seconds`.
    pub upstream_duration: BTreeMap<DnsLabels, Histogram>,
}

/// The DNS thread's counters, shared with the scrape.
#[derive(Clone, Debug, Default)]
pub struct DnsMetrics(Arc<Mutex<DnsReport>>);

impl DnsMetrics {
    fn with(&self, f: impl FnOnce(&mut DnsReport)) {
        if let Ok(mut r) = self.0.lock() {
            f(&mut r);
        }
    }

    /// A query was answered (from the mesh, from upstream, or refused for an unknown client).
    pub fn request(&self, l: &DnsLabels) {
        self.with(|r| *r.requests.entry(l.clone()).or_default() += 1);
    }

    /// A query went upstream; `took` its time, `failed` whether no upstream answered.
    pub fn upstream(&self, l: &DnsLabels, took: Duration, failed: bool) {
        self.with(|r| {
            *r.upstream_requests.entry(l.clone()).or_default() += 1;
            if failed {
                *r.upstream_failures.entry(l.clone()).or_default() += 1;
            }
            let h = r.upstream_duration.entry(l.clone()).or_default();
            let secs = took.as_secs_f64();
            // prometheus-client's rule: the first bound (in registration order) that holds
            // the value takes it; past the last, only `+Inf` (the count) does.
            if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
                h.buckets[i] += 1;
            }
            h.count += 1;
            h.sum += secs;
        });
    }

    /// A copy of everything counted.
    pub fn report(&self) -> DnsReport {
        self.0.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "unknown"
    } else {
        s
    }
}

fn labels(l: &DnsLabels) -> String {
    let esc = |v: &str| {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    format!(
        "request_query_type=\"{}\",request_protocol=\"{}\",source_canonical_service=\"{}\",source_canonical_revision=\"{}\"",
        esc(&l.query_type),
        l.protocol,
        esc(or_unknown(&l.source_canonical_service)),
        esc(or_unknown(&l.source_canonical_revision)),
    )
}

impl DnsReport {
    /// The four families in Prometheus text (or OpenMetrics, without `_total` in counter
    /// family names), as ztunnel's registry writes them: a family's header always, a series
    /// once it was counted.
    pub fn prometheus(&self, openmetrics: bool) -> String {
        let mut out = String::new();
        let counters = [
            (
                "istio_dns_requests",
                "Total number of DNS requests (unstable).",
                &self.requests,
            ),
            (
                "istio_dns_upstream_requests",
                "Total number of DNS requests forwarded to upstream (unstable).",
                &self.upstream_requests,
            ),
            (
                "istio_dns_upstream_failures",
                "Total number of DNS requests forwarded to upstream (unstable).",
                &self.upstream_failures,
            ),
        ];
        for (name, help, series) in counters {
            counter_header(&mut out, name, help, openmetrics);
            for (l, v) in series {
                let _ = writeln!(out, "{name}_total{{{}}} {v}", labels(l));
            }
        }
        let name = "istio_dns_upstream_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Total time in seconds Istio takes to get DNS response from upstream (unstable).\n# TYPE {name} histogram"
        );
        if openmetrics {
            let _ = writeln!(out, "# UNIT {name} seconds");
        }
        for (l, h) in &self.upstream_duration {
            let l = labels(l);
            let _ = writeln!(out, "{name}_sum{{{l}}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{{l}}} {}", h.count);
            // prometheus-client writes each bucket with the running total in registration
            // order, which is what ztunnel's unsorted bounds give.
            let mut acc = 0;
            for (bound, n) in BUCKETS.iter().zip(h.buckets) {
                acc += n;
                let _ = writeln!(out, "{name}_bucket{{{l},le=\"{bound:?}\"}} {acc}");
            }
            let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {}", h.count);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_series_as_ztunnel_names_them() {
        let m = DnsMetrics::default();
        let l = DnsLabels {
            query_type: "a".into(),
            protocol: "udp",
            source_canonical_service: "client".into(),
            source_canonical_revision: String::new(),
        };
        m.request(&l);
        m.request(&l);
        m.upstream(&l, Duration::from_millis(3), false);
        m.upstream(&l, Duration::from_secs(2), true);
        let text = m.report().prometheus(false);
        let want = "request_query_type=\"a\",request_protocol=\"udp\",source_canonical_service=\"client\",source_canonical_revision=\"unknown\"";
        assert!(
            text.contains(&format!("istio_dns_requests_total{{{want}}} 2\n")),
            "{text}"
        );
        assert!(text.contains(&format!("istio_dns_upstream_requests_total{{{want}}} 2\n")));
        assert!(text.contains(&format!("istio_dns_upstream_failures_total{{{want}}} 1\n")));
        assert!(text.contains("# TYPE istio_dns_upstream_request_duration_seconds histogram"));
        assert!(text.contains(&format!(
            "istio_dns_upstream_request_duration_seconds_bucket{{{want},le=\"0.005\"}} 1\n"
        )));
        assert!(text.contains(&format!(
            "istio_dns_upstream_request_duration_seconds_bucket{{{want},le=\"5.0\"}} 2\n"
        )));
        assert!(text.contains(&format!(
            "istio_dns_upstream_request_duration_seconds_count{{{want}}} 2\n"
        )));
        // Without any query the headers are there, no series.
        let empty = DnsReport::default().prometheus(false);
        assert!(empty.contains("# TYPE istio_dns_requests_total counter"));
        assert!(!empty.contains("istio_dns_requests_total{"));
    }
}
