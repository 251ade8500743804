//! Which answer the mesh gives a query, as ztunnel's `dns::server::Store` decides it: the
//! services (and pods of headless services) of one config generation, searched under every
//! alias of the query name ([`super::names`]), the client's namespace first. Pure: the server
//! hands in the snapshot's [`MeshIndex`], the client and the question, and gets a
//! [`Resolution`] back; no socket, no clock, no randomness (the server shuffles).

use std::collections::HashMap;
use std::net::IpAddr;

use super::names::{aliases, is_wildcard, wildcards, Alias, Domains};
use super::wire::{Name, TYPE_A, TYPE_AAAA};
use crate::config::Snapshot;
use crate::config::{IpFamily, Service, Workload};

/// The TTL of every answer the mesh gives (ztunnel's `DEFAULT_TTL_SECONDS`).
pub const TTL: u32 = 30;

/// The querying workload, as far as the answer depends on it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Client {
    /// Its name, for the DNS access log.
    pub name: String,
    /// Its namespace: short names are expanded in it, and its services win.
    pub namespace: String,
    /// Its network: a VIP of another network is not answered.
    pub network: String,
    /// Its cluster: a headless pod of the same cluster wins.
    pub cluster_id: String,
    /// `source_canonical_service` of the metrics.
    pub canonical_name: String,
    /// `source_canonical_revision` of the metrics.
    pub canonical_revision: String,
}

impl Client {
    /// The client a config workload is.
    pub fn of(w: &Workload) -> Client {
        Client {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            network: w.network.clone(),
            cluster_id: w.cluster_id.clone(),
            canonical_name: w.canonical_name.clone(),
            canonical_revision: w.canonical_revision.clone(),
        }
    }
}

/// What the mesh says to a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Not the mesh's: the query goes upstream as it came.
    Forward,
    /// An authoritative answer (NOERROR; no address at all is an empty answer, not NXDOMAIN,
    /// since the name exists).
    Answer {
        /// A CNAME from the query name to this one, when a search domain was stripped.
        cname: Option<Name>,
        /// The owner name of the address records.
        owner: Name,
        /// The addresses, in config order.
        addrs: Vec<IpAddr>,
    },
}

/// One service as DNS needs it.
#[derive(Clone, Debug)]
struct DnsService {
    namespace: String,
    vips: Vec<(String, IpAddr)>,
    ip_families: Option<IpFamily>,
    headless: bool,
    /// Endpoints' workloads: for a headless service's addresses and its pods' names.
    endpoints: Vec<DnsEndpoint>,
}

#[derive(Clone, Debug)]
struct DnsEndpoint {
    /// The pod's `hostname` (empty: it has no name of its own under the service, as ztunnel
    /// finds none without one).
    hostname: String,
    namespace: String,
    cluster_id: String,
    ips: Vec<IpAddr>,
}

/// The services of one config generation by hostname, built once per generation on the DNS
/// thread (ztunnel keeps the same table in its `ServiceStore`).
#[derive(Clone, Debug, Default)]
pub struct MeshIndex {
    /// The generation it was built from.
    pub generation: u64,
    services: Vec<DnsService>,
    by_host: HashMap<String, Vec<usize>>,
}

impl MeshIndex {
    /// Indexes `snap`'s services; `suffix` is [`Domains::cluster_local_suffix`].
    pub fn build(snap: &Snapshot, suffix: &str) -> MeshIndex {
        let mut members: HashMap<String, Vec<&Workload>> = HashMap::new();
        for w in snap.workloads() {
            for key in w.services.keys() {
                members.entry(key.clone()).or_default().push(w);
            }
        }
        let mut index = MeshIndex {
            generation: snap.generation,
            ..MeshIndex::default()
        };
        for s in snap.services() {
            let mut eps: Vec<&Workload> = members.remove(&s.key()).unwrap_or_default();
            for e in s.endpoints.values() {
                if let Some(w) = snap.workload_by_uid(&e.workload_uid) {
                    if !eps.iter().any(|x| x.uid == w.uid) {
                        eps.push(w);
                    }
                }
            }
            let id = index.services.len();
            index
                .by_host
                .entry(s.hostname.to_ascii_lowercase())
                .or_default()
                .push(id);
            index.services.push(dns_service(s, &eps, suffix));
        }
        index
    }
}

fn dns_service(s: &Service, eps: &[&Workload], suffix: &str) -> DnsService {
    DnsService {
        namespace: s.namespace.clone(),
        vips: s
            .vips
            .iter()
            .map(|v| (v.network.clone(), v.address))
            .collect(),
        ip_families: s.ip_families,
        headless: s.vips.is_empty() && s.hostname.to_ascii_lowercase().ends_with(suffix),
        endpoints: eps
            .iter()
            .map(|w| DnsEndpoint {
                hostname: w.hostname.clone(),
                namespace: w.namespace.clone(),
                cluster_id: w.cluster_id.clone(),
                ips: w.workload_ips.clone(),
            })
            .collect(),
    }
}

/// Resolution settings that do not change per query.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The cluster's domains.
    pub domains: Domains,
    /// `PREFERED_SERVICE_NAMESPACE`: the namespace whose service wins after the client's.
    pub preferred_namespace: Option<String>,
    /// `IPV6_ENABLED`: without it AAAA queries for mesh names are answered empty.
    pub ipv6: bool,
}

/// Whether the mesh answers `qtype` at all (ztunnel answers A and AAAA; the rest goes up).
pub fn answers_type(qtype: u16) -> bool {
    qtype == TYPE_A || qtype == TYPE_AAAA
}

/// What was found for a query.
enum Found<'a> {
    Service(&'a DnsService),
    Pod(&'a DnsEndpoint),
}

/// Resolves `qname`/`qtype` for `client` against `index`.
pub fn resolve(
    index: &MeshIndex,
    policy: &Policy,
    client: &Client,
    qname: &Name,
    qtype: u16,
) -> Resolution {
    if !answers_type(qtype) {
        return Resolution::Forward;
    }
    let Some((found, alias, matched)) = find(index, policy, client, qname) else {
        return Resolution::Forward;
    };
    let empty = Resolution::Answer {
        cname: None,
        owner: qname.clone(),
        addrs: Vec::new(),
    };
    if !family_allowed(&found, qtype, policy.ipv6) {
        return empty;
    }
    let want = |ip: &IpAddr| is_type(ip, qtype) && (policy.ipv6 || ip.is_ipv4());
    let addrs: Vec<IpAddr> = match found {
        Found::Pod(p) => p.ips.iter().copied().filter(want).collect(),
        Found::Service(s) if s.vips.is_empty() => s
            .endpoints
            .iter()
            .filter_map(|e| e.ips.iter().copied().find(want))
            .collect(),
        Found::Service(s) => s
            .vips
            .iter()
            .filter(|(net, ip)| *net == client.network && want(ip))
            .map(|(_, ip)| *ip)
            .collect(),
    };
    if addrs.is_empty() {
        return empty;
    }
    match alias.stripped {
        Some(stripped) if !is_wildcard(&matched) => Resolution::Answer {
            cname: Some(stripped.clone()),
            owner: stripped,
            addrs,
        },
        _ => Resolution::Answer {
            cname: None,
            owner: qname.clone(),
            addrs,
        },
    }
}

fn is_type(ip: &IpAddr, qtype: u16) -> bool {
    match ip {
        IpAddr::V4(_) => qtype == TYPE_A,
        IpAddr::V6(_) => qtype == TYPE_AAAA,
    }
}

/// ztunnel's `service_family_allowed`: a single-stack service answers the other family
/// empty (its pods may be dual-stack), and AAAA is empty when IPv6 is off.
fn family_allowed(found: &Found<'_>, qtype: u16, ipv6: bool) -> bool {
    if !ipv6 && qtype == TYPE_AAAA {
        return false;
    }
    match found {
        Found::Service(s) => !matches!(
            (s.ip_families, qtype),
            (Some(IpFamily::Ipv4), TYPE_AAAA) | (Some(IpFamily::Ipv6), TYPE_A)
        ),
        Found::Pod(_) => true,
    }
}

/// ztunnel's `find_server`: for each alias, the service under the alias or its wildcards
/// (client's namespace first, then the preferred one, then the first), then, for a pod host
/// form, the pod of a headless service.
fn find<'a>(
    index: &'a MeshIndex,
    policy: &Policy,
    client: &Client,
    qname: &Name,
) -> Option<(Found<'a>, Alias, Name)> {
    for alias in aliases(qname, &client.namespace, &policy.domains) {
        for candidate in wildcards(&alias.name) {
            let Some(host) = candidate.to_lookup() else {
                continue;
            };
            let services = index.by_host.get(&host).map_or(&[][..], |v| &v[..]);
            let usable = services
                .iter()
                .map(|&i| &index.services[i])
                // Without a VIP only a Kubernetes headless service is answered; the rest
                // (a ServiceEntry without addresses, say) goes upstream.
                .filter(|s| !s.vips.is_empty() || s.headless);
            if let Some(s) = best(usable, client, policy) {
                return Some((Found::Service(s), alias, candidate));
            }
        }
        if alias.pod_host {
            if let Some(pod) = headless_pod(index, client, &alias.name) {
                let name = alias.name.clone();
                return Some((Found::Pod(pod), alias, name));
            }
        }
    }
    None
}

/// ztunnel's `ServiceMatch::find_best_match`.
fn best<'a>(
    mut services: impl Iterator<Item = &'a DnsService> + Clone,
    client: &Client,
    policy: &Policy,
) -> Option<&'a DnsService> {
    if let Some(s) = services.clone().find(|s| s.namespace == client.namespace) {
        return Some(s);
    }
    if let Some(pref) = &policy.preferred_namespace {
        if let Some(s) = services.clone().find(|s| &s.namespace == pref) {
            return Some(s);
        }
    }
    services.next()
}

/// `<pod>.<subdomain>.<ns>.svc.<domain>`: the endpoint named `<pod>` of the headless service
/// `<subdomain>.<ns>.svc.<domain>`, one in the client's namespace and cluster first.
fn headless_pod<'a>(index: &'a MeshIndex, client: &Client, name: &Name) -> Option<&'a DnsEndpoint> {
    let (pod, rest) = name.labels().split_first()?;
    let pod = Name::from_labels([pod])?.to_lookup()?;
    let service = Name::from_labels(rest)?.to_lookup()?;
    let pods = index
        .by_host
        .get(&service)?
        .iter()
        .map(|&i| &index.services[i])
        .filter(|s| s.headless)
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| !e.hostname.is_empty() && e.hostname.eq_ignore_ascii_case(&pod));
    let pick = |same_ns: bool, same_cluster: bool| {
        pods.clone().find(|e| {
            (!same_ns || e.namespace == client.namespace)
                && (!same_cluster || e.cluster_id == client.cluster_id)
        })
    };
    pick(true, true)
        .or_else(|| pick(true, false))
        .or_else(|| pick(false, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use std::path::Path;

    const CONFIG: &str = r#"
workloads:
- {uid: c1, name: client, namespace: ns1, workloadIps: [10.0.0.1], services: {}}
- {uid: c2, name: other, namespace: ns2, network: nw2, workloadIps: [10.0.0.9], services: {}}
- {uid: p1, name: productpage-1, namespace: ns1, workloadIps: [10.1.0.1], services: {"ns1/productpage.ns1.svc.cluster.local": {9080: 9080}}}
- {uid: h1, name: db-0, hostname: db-0, namespace: ns1, workloadIps: [10.2.0.1, "fd00::21"], services: {"ns1/db.ns1.svc.cluster.local": {5432: 5432}}}
- {uid: h2, name: db-1, namespace: ns1, workloadIps: [10.2.0.2], services: {"ns1/db.ns1.svc.cluster.local": {5432: 5432}}}
services:
- {name: productpage, namespace: ns1, hostname: productpage.ns1.svc.cluster.local, vips: [/9.9.9.9, nw2/9.9.9.10, "/fd00::99"], ports: {9080: 9080}}
- {name: example, namespace: ns2, hostname: example.ns2.svc.cluster.local, vips: [/10.10.10.10], ports: {80: 80}}
- {name: dup, namespace: ns2, hostname: dup.svc.cluster.local, vips: [/11.0.0.2], ports: {80: 80}}
- {name: dup, namespace: ns1, hostname: dup.svc.cluster.local, vips: [/11.0.0.1], ports: {80: 80}}
- {name: google, namespace: ns1, hostname: www.google.com, vips: [/1.1.1.1], ports: {80: 80}}
- {name: wild, namespace: ns1, hostname: "*.wild.example", vips: [/2.2.2.2], ports: {80: 80}}
- {name: db, namespace: ns1, hostname: db.ns1.svc.cluster.local, vips: [], ipFamilies: IPv4, ports: {5432: 5432}}
- {name: se, namespace: ns1, hostname: novip.example, vips: [], ports: {80: 80}}
- {name: v4only, namespace: ns1, hostname: v4.ns1.svc.cluster.local, vips: [/3.3.3.3], ipFamilies: IPv4, ports: {80: 80}}
"#;

    fn setup() -> (MeshIndex, Policy) {
        let snap = match parse(Path::new("t.yaml"), CONFIG) {
            Ok(l) => Snapshot::new(l.config, 3),
            Err(e) => panic!("{e}"),
        };
        let domains = Domains::new("cluster.local").unwrap();
        let index = MeshIndex::build(&snap, &domains.cluster_local_suffix());
        (
            index,
            Policy {
                domains,
                preferred_namespace: None,
                ipv6: true,
            },
        )
    }

    fn ns1() -> Client {
        Client {
            namespace: "ns1".into(),
            ..Client::default()
        }
    }

    fn n(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn answer(owner: &str, cname: bool, addrs: &[&str], q: &str) -> Resolution {
        Resolution::Answer {
            cname: cname.then(|| n(owner)),
            owner: if cname { n(owner) } else { n(q) },
            addrs: ips(addrs),
        }
    }

    fn ask(q: &str, t: u16) -> Resolution {
        let (i, p) = setup();
        resolve(&i, &p, &ns1(), &n(q), t)
    }

    #[test]
    fn service_names_in_every_form() {
        for q in [
            "productpage.ns1.svc.cluster.local",
            "productpage.ns1",
            "productpage",
            "productpage.ns1.svc",
            "ProductPage.NS1.svc.cluster.local",
        ] {
            assert_eq!(ask(q, TYPE_A), answer(q, false, &["9.9.9.9"], q), "{q}");
        }
        // Only the client's network's VIPs; AAAA gets the v6 VIP.
        assert_eq!(
            ask("productpage", TYPE_AAAA),
            answer("productpage", false, &["fd00::99"], "productpage")
        );
        // Another namespace's service by its short name is not the mesh's.
        assert_eq!(ask("example", TYPE_A), Resolution::Forward);
        let q = "example.ns2";
        assert_eq!(ask(q, TYPE_A), answer(q, false, &["10.10.10.10"], q));
    }

    #[test]
    fn a_stripped_search_domain_answers_with_a_cname() {
        let q = "productpage.ns1.ns1.svc.cluster.local";
        assert_eq!(
            ask(q, TYPE_A),
            answer("productpage.ns1", true, &["9.9.9.9"], q)
        );
        let q = "www.google.com.ns1.svc.cluster.local";
        assert_eq!(
            ask(q, TYPE_A),
            answer("www.google.com", true, &["1.1.1.1"], q)
        );
        assert_eq!(
            ask("www.google.com", TYPE_A),
            answer("www.google.com", false, &["1.1.1.1"], "www.google.com")
        );
    }

    #[test]
    fn wildcards_and_namespace_preference() {
        let q = "a.wild.example";
        assert_eq!(ask(q, TYPE_A), answer(q, false, &["2.2.2.2"], q));
        let q = "dup.svc.cluster.local";
        assert_eq!(ask(q, TYPE_A), answer(q, false, &["11.0.0.1"], q));
        let (i, mut p) = setup();
        let c = Client {
            namespace: "ns3".into(),
            ..Client::default()
        };
        assert_eq!(
            resolve(&i, &p, &c, &n(q), TYPE_A),
            answer(q, false, &["11.0.0.2"], q)
        );
        p.preferred_namespace = Some("ns1".into());
        assert_eq!(
            resolve(&i, &p, &c, &n(q), TYPE_A),
            answer(q, false, &["11.0.0.1"], q)
        );
    }

    #[test]
    fn headless_services_answer_endpoints_and_pods() {
        let q = "db.ns1.svc.cluster.local";
        assert_eq!(
            ask(q, TYPE_A),
            answer(q, false, &["10.2.0.1", "10.2.0.2"], q)
        );
        // IPv4 single-stack: AAAA is empty although db-0 has a v6 address.
        assert_eq!(ask(q, TYPE_AAAA), answer(q, false, &[], q));
        let q = "db-0.db.ns1.svc.cluster.local";
        assert_eq!(ask(q, TYPE_A), answer(q, false, &["10.2.0.1"], q));
        assert_eq!(ask(q, TYPE_AAAA), answer(q, false, &["fd00::21"], q));
        // db-1 has no `hostname`: not a name of its own (forwarded, as ztunnel does).
        assert_eq!(ask("db-1.db", TYPE_A), Resolution::Forward);
        let q = "db-0.db";
        assert_eq!(ask(q, TYPE_A), answer(q, false, &["10.2.0.1"], q));
        assert_eq!(
            ask("db-9.db.ns1.svc.cluster.local", TYPE_A),
            Resolution::Forward
        );
    }

    #[test]
    fn families_types_and_unknown_names() {
        let q = "v4.ns1.svc.cluster.local";
        assert_eq!(ask(q, TYPE_AAAA), answer(q, false, &[], q));
        let (i, mut p) = setup();
        p.ipv6 = false;
        let q = "productpage";
        assert_eq!(
            resolve(&i, &p, &ns1(), &n(q), TYPE_AAAA),
            answer(q, false, &[], q)
        );
        assert_eq!(ask("productpage", 16), Resolution::Forward);
        assert_eq!(ask("novip.example", TYPE_A), Resolution::Forward);
        assert_eq!(ask("example.com", TYPE_A), Resolution::Forward);
        assert_eq!(ask(".", TYPE_A), Resolution::Forward);
        // A client on network nw2 sees that network's VIP only.
        let c = Client {
            namespace: "ns1".into(),
            network: "nw2".into(),
            ..Client::default()
        };
        let q = "productpage";
        assert_eq!(
            resolve(&i, &p, &c, &n(q), TYPE_A),
            answer(q, false, &["9.9.9.10"], q)
        );
    }
}
