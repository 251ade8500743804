//! Istio's TCP metrics and ringtun's own figures, counted per shard and summed on scrape.
//!
//! Each shard keeps its own [`ShardMetrics`] in plain cells and maps: updating them is a hash
//! lookup when a connection opens (the series it counts in, which it then holds), never an
//! atomic and never per byte. A scrape is a
//! message to every shard asking for a [`ShardReport`]; the operator side
//! (`operate::prometheus`) sums the reports and renders them.

use std::cell::{Cell, RefCell};
// foldhash, not SipHash: a connection hashes its labels (some from the client's baggage) when
// it opens; foldhash is seeded at random too, so colliding baggage cannot be made in advance,
// at a fraction of SipHash's cost.
use foldhash::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use crate::config::{ByWorkload, Service, Workload};

/// Who reports a connection: the source side (outbound) or the destination side (inbound).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reporter {
    /// The client's proxy.
    Source,
    /// The server's proxy.
    Destination,
}

impl Reporter {
    /// The `reporter` label value, as Istio spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// A workload as Istio's metric labels and ztunnel's access log name it; one shared copy per
/// workload and shard ([`ShardMetrics::party`]), so a connection holds a pointer, not strings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Party {
    /// `name` (the pod): the access log's `src.workload`/`dst.workload`.
    pub name: String,
    /// `namespace`: `*_workload_namespace`, the access log's `src.namespace`/`dst.namespace`.
    pub namespace: String,
    /// `workloadName` (the deployment): `source_workload`/`destination_workload`.
    pub workload_name: String,
    /// `canonicalName`: `*_canonical_service`.
    pub canonical_name: String,
    /// `*_app`: the canonical name of a known workload; for a source known only from its
    /// baggage, its workload name (as ztunnel's `with_derived_source` fills it).
    pub app: String,
    /// `canonicalRevision`: `*_canonical_revision` and `*_version`.
    pub canonical_revision: String,
    /// `clusterId`: `*_cluster`, the access log's `src.cluster`/`dst.cluster`.
    pub cluster: String,
    /// `locality.region`: `*_region`.
    pub region: String,
    /// `locality.zone`: `*_zone`.
    pub zone: String,
}

impl Party {
    /// The labels of `w`.
    pub fn of(w: &Workload) -> Party {
        Party {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            workload_name: w.workload_name.clone(),
            canonical_name: w.canonical_name.clone(),
            app: w.canonical_name.clone(),
            canonical_revision: w.canonical_revision.clone(),
            cluster: w.cluster_id.clone(),
            region: w.locality.region.clone(),
            zone: w.locality.zone.clone(),
        }
    }

    /// A source the config does not know, as its request's `baggage` headers describe it
    /// (ztunnel's `parse_baggage_header` and `DerivedWorkload`): the last value of each key
    /// wins, empty values count as absent, other keys are ignored. The access log names it by
    /// its `service.name`, as ztunnel falls back to the canonical service.
    pub fn from_baggage<'a>(values: impl IntoIterator<Item = &'a str>) -> Party {
        let mut p = Party::default();
        for member in values.into_iter().flat_map(|v| v.split(',')) {
            let mut kv = member.split('=');
            let (Some(key), Some(value)) = (kv.next(), kv.next()) else {
                continue;
            };
            let slot = match key {
                "k8s.cluster.name" => &mut p.cluster,
                "k8s.namespace.name" => &mut p.namespace,
                "k8s.deployment.name" | "k8s.cronjob.name" | "k8s.pod.name" | "k8s.job.name" => {
                    &mut p.workload_name
                }
                "service.name" => &mut p.canonical_name,
                "service.version" => &mut p.canonical_revision,
                "cloud.region" => &mut p.region,
                "cloud.availability_zone" => &mut p.zone,
                _ => continue,
            };
            value.clone_into(slot);
        }
        p.name = p.canonical_name.clone();
        p.app = p.workload_name.clone();
        p
    }

    /// Whether these are still `w`'s labels (a config update may have changed them).
    fn describes(&self, w: &Workload) -> bool {
        self.name == w.name
            && self.namespace == w.namespace
            && self.workload_name == w.workload_name
            && self.canonical_name == w.canonical_name
            && self.app == w.canonical_name
            && self.canonical_revision == w.canonical_revision
            && self.cluster == w.cluster_id
            && self.region == w.locality.region
            && self.zone == w.locality.zone
    }
}

/// A service as the `destination_service*` labels name it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    /// `hostname`: `destination_service`, the access log's `dst.service`.
    pub hostname: String,
    /// `name`: `destination_service_name`.
    pub name: String,
    /// `namespace`: `destination_service_namespace`.
    pub namespace: String,
}

impl ServiceName {
    /// The names of `s`.
    pub fn of(s: &Service) -> ServiceName {
        ServiceName {
            hostname: s.hostname.clone(),
            name: s.name.clone(),
            namespace: s.namespace.clone(),
        }
    }
}

/// The labels of one Istio TCP metric series, as ztunnel's `CommonTrafficLabels` fills them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpLabels {
    /// `reporter`.
    pub reporter: Option<Reporter>,
    /// The source workload, when known: `source_workload`, `source_canonical_*`, `source_app`,
    /// `source_version`, `source_cluster`, `source_region`, `source_zone`.
    pub source: Option<Arc<Party>>,
    /// `source_principal`: the identity the client proved over mTLS (empty: `unknown`).
    pub source_principal: String,
    /// The destination workload, when known: the `destination_*` workload labels.
    pub destination: Option<Arc<Party>>,
    /// `destination_principal` (empty: `unknown`).
    pub destination_principal: String,
    /// The service dialled: `destination_service`, `destination_service_name`,
    /// `destination_service_namespace`.
    pub destination_service: Option<Arc<ServiceName>>,
    /// `request_protocol`: always `tcp` here.
    pub request_protocol: &'static str,
    /// `response_flags`: `-` when fine, else why it failed (`DENY`, `CONNECT`).
    pub response_flags: String,
    /// `connection_security_policy`: `mutual_tls` over HBONE, `unknown` in plaintext.
    pub connection_security_policy: &'static str,
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
    /// Adds another shard's counts of the same series.
    pub fn add(&mut self, o: &TcpCounts) {
        self.opened += o.opened;
        self.closed += o.closed;
        self.failed += o.failed;
        self.sent += o.sent;
        self.received += o.received;
    }
}

/// ringtun's own gauges, per shard: values that go up and down, read as they are now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardGauges {
    /// Connections open now.
    pub open_connections: u64,
    /// Pooled HBONE connections now.
    pub pool_connections: u64,
    /// Streams over pooled HBONE connections now.
    pub pool_streams: u64,
    /// Config generation this shard uses.
    pub config_generation: u64,
    /// Tunnelled connections open now, reported as source (outbound) and as destination.
    pub sockets_open: [u64; 2],
}

/// ringtun's own counters, per shard: totals since start that only go up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardCounters {
    /// Connections accepted.
    pub accepted: u64,
    /// Of those, the ones taken with a direct `accept4` behind an io_uring accept (a burst).
    pub accepted_direct: u64,
    /// HBONE connections whose TLS ran in the kernel (TX and RX).
    pub ktls_connections: u64,
    /// HBONE connections whose TLS ran in userspace rustls.
    pub userspace_tls_connections: u64,
    /// HBONE connections lost while switching to kTLS.
    pub ktls_failed: u64,
    /// kTLS connections retired (no new streams) as a key (TX, or the peer's RX) neared its usage limit.
    pub ktls_retired: u64,
    /// Connections refused at accept because the shard was at `--max-connections-per-shard`.
    pub refused_overloaded: u64,
    /// Connections refused or failed before tunnelling (HBONE handshakes included).
    pub failed: u64,
    /// HBONE streams opened on a new pooled connection.
    pub pool_new: u64,
    /// HBONE streams opened on a pooled connection that was already open.
    pub pool_reused: u64,
}

/// One Istio TCP series of a shard: its labels and counts, in one shared copy that the
/// connections counting in it hold, so that a connection's bytes and its close are counted
/// without hashing its labels again.
#[derive(Debug)]
pub struct Series {
    labels: TcpLabels,
    counts: Cell<TcpCounts>,
}

impl Series {
    /// The series' labels.
    pub fn labels(&self) -> &TcpLabels {
        &self.labels
    }

    /// The series' counts now.
    pub fn counts(&self) -> TcpCounts {
        self.counts.get()
    }

    fn count(&self, f: impl FnOnce(&mut TcpCounts)) {
        let mut c = self.counts.get();
        f(&mut c);
        self.counts.set(c);
    }
}

/// A shard's metrics, owned by the shard thread.
#[derive(Default)]
pub struct ShardMetrics {
    /// Every series this shard has counted in (a Prometheus counter never goes away).
    tcp: RefCell<HashMap<TcpLabels, Rc<Series>>>,
    /// One shared copy of each workload's labels, by uid, kept while the workload's copies
    /// keep describing them.
    parties: ByWorkload<Arc<Party>>,
    /// One shared copy of each service's names, by hostname.
    services: RefCell<HashMap<String, Arc<ServiceName>>>,
}

/// Past this many workloads (or services) seen, a shard forgets the copies it keeps, so
/// workloads that come and go do not grow it without end.
const INTERNED_MAX: usize = 4096;

impl ShardMetrics {
    /// The series of `labels`, made on first use.
    fn series(&self, labels: &TcpLabels) -> Rc<Series> {
        let mut map = self.tcp.borrow_mut();
        // get first: the common case finds the series without cloning the labels.
        if let Some(s) = map.get(labels) {
            return s.clone();
        }
        let s = Rc::new(Series {
            labels: labels.clone(),
            counts: Cell::new(TcpCounts::default()),
        });
        map.insert(labels.clone(), s.clone());
        s
    }

    /// The shared copy of `w`'s labels (made anew when a config update changed them).
    pub fn party(&self, w: &Workload) -> Arc<Party> {
        // The same workload value as last time cannot have changed its labels: one stamp
        // comparison, where reading nine strings to find that out was 2% of a pooled
        // connection's CPU. Another copy compares the strings and keeps the shared labels if
        // they still hold.
        self.parties
            .get_keeping(w, |p, w| p.describes(w), |w| Arc::new(Party::of(w)))
    }

    /// The shared copy of `s`'s names.
    pub fn service(&self, s: &Service) -> Arc<ServiceName> {
        let mut map = self.services.borrow_mut();
        if let Some(n) = map
            .get(&s.hostname)
            .filter(|n| n.name == s.name && n.namespace == s.namespace)
        {
            return n.clone();
        }
        if map.len() >= INTERNED_MAX {
            map.clear();
        }
        let n = Arc::new(ServiceName::of(s));
        map.insert(s.hostname.clone(), n.clone());
        n
    }

    /// A connection was established; returns the series its live byte counts (and, unless
    /// it ends flagged, its close) are counted in.
    pub fn opened(&self, labels: &TcpLabels) -> Rc<Series> {
        let s = self.series(labels);
        s.count(|c| c.opened += 1);
        s
    }

    /// Bytes a live connection moved since its last report.
    pub fn moved(&self, series: &Series, received: u64, sent: u64) {
        series.count(|c| {
            c.received += received;
            c.sent += sent;
        });
    }

    /// A connection closed in the series of `labels`; `received` and `sent` are its bytes not
    /// reported while it lived.
    pub fn closed(&self, labels: &TcpLabels, received: u64, sent: u64) {
        self.closed_in(&self.series(labels), received, sent);
    }

    /// A connection closed in `series` (the one it opened in).
    pub fn closed_in(&self, series: &Series, received: u64, sent: u64) {
        series.count(|c| {
            c.closed += 1;
            c.received += received;
            c.sent += sent;
        });
    }

    /// A connection failed or was refused before it could be established.
    pub fn failed(&self, labels: &TcpLabels) {
        self.series(labels).count(|c| c.failed += 1);
    }

    /// A copy of the series, for the scraper.
    pub fn export(&self) -> Vec<(TcpLabels, TcpCounts)> {
        self.tcp
            .borrow()
            .values()
            .map(|s| (s.labels.clone(), s.counts.get()))
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
    /// ringtun's own gauges.
    pub gauges: ShardGauges,
    /// ringtun's own counters.
    pub counters: ShardCounters,
}

#[cfg(test)]
mod tests {
    use super::{Party, ShardMetrics};
    use crate::config::Workload;
    use std::sync::Arc;

    fn workload(revision: &str) -> Workload {
        crate::config::test_workload(&format!(
            "uid: c//Pod/ns/a, name: a, namespace: ns, canonicalName: app, canonicalRevision: {revision}"
        ))
    }

    #[test]
    fn a_workload_keeps_its_labels_until_a_copy_changes_them() {
        let m = ShardMetrics::default();
        let v1 = workload("v1");
        let first = m.party(&v1);
        assert_eq!(first.canonical_revision, "v1");
        assert!(Arc::ptr_eq(&first, &m.party(&v1)));
        // A copy is another value (a new stamp) with the same labels: the same shared copy.
        let copy = v1.clone();
        assert_eq!(copy, v1);
        assert_ne!(copy.stamp.get(), v1.stamp.get());
        assert!(Arc::ptr_eq(&first, &m.party(&copy)));
        // A config update that changed a label: new labels, under the same uid.
        let mut v2 = v1.clone();
        v2.canonical_revision = "v2".into();
        let second = m.party(&v2);
        assert_eq!(second.canonical_revision, "v2");
        assert!(Arc::ptr_eq(&second, &m.party(&v2)));
        assert_eq!(m.party(&v1).canonical_revision, "v1");
    }

    #[test]
    fn a_source_is_read_from_its_baggage_as_ztunnel_reads_it() {
        let p = Party::from_baggage([
            "k8s.cluster.name=c1,k8s.namespace.name=ns1,k8s.deployment.name=wl1,other=x",
            "service.name=svc1,service.version=v9,k8s.namespace.name=ns2,cloud.region=r,k8s.cluster.name=",
        ]);
        assert_eq!(
            p,
            Party {
                // The access log names it by its service, as ztunnel does.
                name: "svc1".into(),
                namespace: "ns2".into(),
                workload_name: "wl1".into(),
                canonical_name: "svc1".into(),
                app: "wl1".into(),
                canonical_revision: "v9".into(),
                cluster: String::new(),
                region: "r".into(),
                zone: String::new(),
            }
        );
        assert_eq!(Party::from_baggage([]), Party::default());
    }
}
