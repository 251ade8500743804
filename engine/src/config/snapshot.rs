//! [`Snapshot`]: the immutable lookup index built once per config generation.

use super::model::{HealthStatus, LoadBalancerHealthPolicy, LocalConfig, NetworkMode, Protocol};
use super::model::{Policy, PolicyScope, Service, Workload};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// Immutable lookup index built once per config generation; handed to every worker shard.
///
/// Cloning is cheap (one `Arc`); all lookups are hash-map hits that do not allocate.
/// IP lookups ignore the network (ztunnel keys by `network/IP`); see each method.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Config generation this index was built from.
    pub generation: u64,
    index: Arc<Index>,
}

#[derive(Debug)]
struct Index {
    config: LocalConfig,
    service_by_vip: HashMap<IpAddr, usize>,
    service_by_host: HashMap<String, HashMap<String, usize>>,
    workload_by_ip: HashMap<IpAddr, usize>,
    workload_by_name: HashMap<String, HashMap<String, usize>>,
    workload_by_uid: HashMap<String, usize>,
    /// Per service index: service port → endpoints in config order.
    endpoints: Vec<HashMap<u16, Box<[EndpointIndex]>>>,
    /// Authorization policies, as ztunnel's `PolicyStore` files them.
    policies: PolicyTables,
}

#[derive(Debug)]
struct PolicyTables {
    /// Namespace (`""`: global) → positions in `config().policies`, config order.
    by_namespace: HashMap<String, Box<[usize]>>,
    /// `namespace/name` → position of the effective (last) policy with that key.
    by_key: HashMap<String, usize>,
}

/// A service in a [`Snapshot`] together with its index.
#[derive(Clone, Copy, Debug)]
pub struct ServiceRef<'a> {
    /// The service.
    pub service: &'a Service,
    /// Position in `config().services`; stable within a Snapshot, usable as a round-robin key.
    pub index: usize,
}

/// One precomputed endpoint: a workload index into `config().workloads` and its target port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointIndex {
    /// Position in `config().workloads`.
    pub workload: usize,
    /// Port to dial on the workload.
    pub target_port: u16,
}

/// The endpoints of one service port: a borrowed slice, no allocation.
#[derive(Clone, Copy, Debug)]
pub struct Endpoints<'a> {
    workloads: &'a [Workload],
    entries: &'a [EndpointIndex],
}

impl<'a> Endpoints<'a> {
    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there is no endpoint.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The `i`-th endpoint (config order), e.g. `get(rr % len)` for round robin.
    pub fn get(&self, i: usize) -> Option<(&'a Workload, u16)> {
        let e = self.entries.get(i)?;
        Some((self.workloads.get(e.workload)?, e.target_port))
    }

    /// The raw indices.
    pub fn indices(&self) -> &'a [EndpointIndex] {
        self.entries
    }

    /// Iterates `(workload, target_port)` in config order.
    pub fn iter(&self) -> EndpointsIter<'a> {
        EndpointsIter {
            workloads: self.workloads,
            entries: self.entries.iter(),
        }
    }
}

impl<'a> IntoIterator for Endpoints<'a> {
    type Item = (&'a Workload, u16);
    type IntoIter = EndpointsIter<'a>;
    fn into_iter(self) -> EndpointsIter<'a> {
        self.iter()
    }
}

/// Iterator over [`Endpoints`].
#[derive(Clone, Debug)]
pub struct EndpointsIter<'a> {
    workloads: &'a [Workload],
    entries: std::slice::Iter<'a, EndpointIndex>,
}

impl<'a> Iterator for EndpointsIter<'a> {
    type Item = (&'a Workload, u16);
    fn next(&mut self) -> Option<Self::Item> {
        // Indices are built from the same config, so `get` always hits.
        self.entries
            .by_ref()
            .find_map(|e| Some((self.workloads.get(e.workload)?, e.target_port)))
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.entries.len()))
    }
}

/// ztunnel's preference among workloads sharing an address: Pod uid, then HBONE.
fn ip_rank(w: &Workload) -> u8 {
    u8::from(w.uid.contains("//Pod/")) * 2 + u8::from(w.protocol == Protocol::Hbone)
}

fn nested_get(
    map: &HashMap<String, HashMap<String, usize>>,
    outer: &str,
    inner: &str,
) -> Option<usize> {
    map.get(outer)?.get(inner).copied()
}

/// The policy tables: a later policy with the same `namespace/name` replaces an earlier one
/// (and drops out of its bucket); `Global` policies go to the `""` bucket, `WorkloadSelector`
/// ones to none (workloads list them).
fn index_policies(policies: &[Policy]) -> PolicyTables {
    let keys: Vec<String> = policies.iter().map(Policy::key).collect();
    let mut by_key = HashMap::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        by_key.insert(key.clone(), i);
    }
    let mut buckets: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, (p, key)) in policies.iter().zip(&keys).enumerate() {
        if by_key.get(key) != Some(&i) {
            continue;
        }
        let bucket = match p.scope {
            PolicyScope::Global => "",
            PolicyScope::Namespace => p.namespace.as_str(),
            PolicyScope::WorkloadSelector => continue,
        };
        buckets.entry(bucket.to_owned()).or_default().push(i);
    }
    let by_namespace = buckets
        .into_iter()
        .map(|(ns, v)| (ns, v.into_boxed_slice()))
        .collect();
    PolicyTables {
        by_namespace,
        by_key,
    }
}

impl Snapshot {
    /// Builds the index. Conflicts resolve as ztunnel does (see the lookups); `parse`
    /// reports them as warnings.
    pub fn new(config: LocalConfig, generation: u64) -> Snapshot {
        // Services: a later service with the same VIP or namespace/hostname wins.
        let mut service_by_vip = HashMap::new();
        let mut service_by_host: HashMap<String, HashMap<String, usize>> = HashMap::new();
        for (i, s) in config.services.iter().enumerate() {
            for vip in &s.vips {
                service_by_vip.insert(vip.address.to_canonical(), i);
            }
            service_by_host
                .entry(s.namespace.clone())
                .or_default()
                .insert(s.hostname.clone(), i);
        }

        // Workloads by IP: host-network workloads are not indexed (as in ztunnel); among
        // workloads sharing an IP, prefer a Pod uid, then HBONE, then the later one.
        let mut workload_by_ip: HashMap<IpAddr, usize> = HashMap::new();
        let mut workload_by_name: HashMap<String, HashMap<String, usize>> = HashMap::new();
        let mut workload_by_uid = HashMap::new();
        for (i, w) in config.workloads.iter().enumerate() {
            if w.network_mode != NetworkMode::HostNetwork {
                for ip in &w.workload_ips {
                    let ip = ip.to_canonical();
                    let keep_old = workload_by_ip
                        .get(&ip)
                        .and_then(|&old| config.workloads.get(old))
                        .is_some_and(|old| ip_rank(old) > ip_rank(w));
                    if !keep_old {
                        workload_by_ip.insert(ip, i);
                    }
                }
            }
            workload_by_name
                .entry(w.namespace.clone())
                .or_default()
                .entry(w.name.clone())
                .or_insert(i);
            workload_by_uid.insert(w.uid.clone(), i);
        }

        // Endpoints: service key → services carrying it (duplicates share endpoints).
        let mut services_by_key: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, s) in config.services.iter().enumerate() {
            services_by_key.entry(s.key()).or_default().push(i);
        }
        let mut building: Vec<HashMap<u16, Vec<EndpointIndex>>> =
            vec![HashMap::new(); config.services.len()];
        for (wi, w) in config.workloads.iter().enumerate() {
            for (key, ports) in &w.services {
                let Some(service_indices) = services_by_key.get(key) else {
                    continue;
                };
                for &si in service_indices {
                    let allow_unhealthy = config.services[si]
                        .load_balancer
                        .as_ref()
                        .is_some_and(|lb| lb.health_policy == LoadBalancerHealthPolicy::AllowAll);
                    if w.status == HealthStatus::Unhealthy && !allow_unhealthy {
                        continue;
                    }
                    for (&service_port, &target_port) in ports {
                        building[si]
                            .entry(service_port)
                            .or_default()
                            .push(EndpointIndex {
                                workload: wi,
                                target_port,
                            });
                    }
                }
            }
        }
        let endpoints = building
            .into_iter()
            .map(|m| {
                m.into_iter()
                    .map(|(port, v)| (port, v.into_boxed_slice()))
                    .collect()
            })
            .collect();

        let policies = index_policies(&config.policies);
        Snapshot {
            generation,
            index: Arc::new(Index {
                config,
                service_by_vip,
                service_by_host,
                workload_by_ip,
                workload_by_name,
                workload_by_uid,
                endpoints,
                policies,
            }),
        }
    }

    /// The config this index was built from.
    pub fn config(&self) -> &LocalConfig {
        &self.index.config
    }

    /// The service at `index` in `config().services`.
    pub fn service(&self, index: usize) -> Option<ServiceRef<'_>> {
        let service = self.index.config.services.get(index)?;
        Some(ServiceRef { service, index })
    }

    /// The service owning VIP `ip` in any network (ztunnel matches `network/IP`; ringtun
    /// ignores the network). If several services claim it, the last in the file wins.
    /// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) match their IPv4 form.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<ServiceRef<'_>> {
        self.service(*self.index.service_by_vip.get(&ip.to_canonical())?)
    }

    /// The service `namespace/hostname` (the last one if defined twice).
    pub fn service_by_host(&self, namespace: &str, hostname: &str) -> Option<ServiceRef<'_>> {
        self.service(nested_get(
            &self.index.service_by_host,
            namespace,
            hostname,
        )?)
    }

    /// The workload owning `ip` in any network. Host-network workloads are not indexed.
    /// If several claim it: a `//Pod/` uid first, then HBONE, then the later one (ztunnel's rule).
    /// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) match their IPv4 form.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.index
            .config
            .workloads
            .get(*self.index.workload_by_ip.get(&ip.to_canonical())?)
    }

    /// The first workload with this namespace and name.
    pub fn workload_by_name(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.index
            .config
            .workloads
            .get(nested_get(&self.index.workload_by_name, namespace, name)?)
    }

    /// The workload with this uid (the last one if repeated, as in ztunnel).
    pub fn workload_by_uid(&self, uid: &str) -> Option<&Workload> {
        self.index
            .config
            .workloads
            .get(*self.index.workload_by_uid.get(uid)?)
    }

    /// The effective authorization policy stored under `namespace/name`, if any.
    pub fn policy(&self, key: &str) -> Option<&Policy> {
        self.index
            .config
            .policies
            .get(*self.index.policies.by_key.get(key)?)
    }

    /// The effective policies filed under `namespace`, config order: its `Namespace`-scoped
    /// ones, or for `""` the `Global` ones (and any written with `namespace: ""`).
    pub fn policies_in(&self, namespace: &str) -> impl Iterator<Item = &Policy> + Clone {
        let bucket = self
            .index
            .policies
            .by_namespace
            .get(namespace)
            .map_or(&[][..], |b| &b[..]);
        bucket
            .iter()
            .filter_map(|&i| self.index.config.policies.get(i))
    }

    /// Endpoints of `service` for `service_port`: every workload whose `services` map has
    /// the key `namespace/hostname` and maps that port (the workload's own target port;
    /// a workload whose map lacks the port is skipped, no fallback to the service's `ports`).
    /// Unhealthy workloads are left out unless the service's health policy is `AllowAll`,
    /// as in ztunnel. Config order. Empty for a `ServiceRef` from another snapshot.
    pub fn endpoints(&self, service: ServiceRef<'_>, service_port: u16) -> Endpoints<'_> {
        let entries = self
            .index
            .endpoints
            .get(service.index)
            .and_then(|m| m.get(&service_port))
            .map_or(&[][..], |b| &b[..]);
        Endpoints {
            workloads: &self.index.config.workloads,
            entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use std::path::Path;

    fn snap(text: &str) -> Snapshot {
        match parse(Path::new("t.yaml"), text) {
            Ok(l) => Snapshot::new(l.config, 7),
            Err(e) => panic!("{e}"),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const TEXT: &str = r#"
workloads:
- {uid: a, name: a, namespace: ns, workloadIps: [10.0.0.1], services: {"ns/s": {80: 8080, 443: 8443}}}
- {uid: b, name: b, namespace: ns, workloadIps: [10.0.0.2], services: {"ns/s": {443: 9443}}}
- {uid: c, name: c, namespace: ns, workloadIps: [10.0.0.3], status: Unhealthy, services: {"ns/s": {80: 80}}}
- {uid: d, name: d, namespace: ns, workloadIps: [10.0.0.4], services: {"ns/s": {80: 8081}}}
services:
- {name: s, namespace: ns, hostname: s, vips: [/10.96.0.1, net2/fd00::1], ports: {80: 1, 443: 2}}
- {name: t, namespace: ns, hostname: t, vips: [/10.96.0.2], ports: {80: 1}}
"#;

    #[test]
    fn snapshot_is_clone_send_sync() {
        fn check<T: Clone + Send + Sync + 'static>() {}
        check::<Snapshot>();
    }

    #[test]
    fn endpoints_follow_workload_maps_in_config_order() {
        let s = snap(TEXT);
        assert_eq!(s.generation, 7);
        let svc = s.service_by_vip(ip("10.96.0.1")).unwrap();
        assert_eq!(svc.index, 0);
        assert_eq!(s.service_by_vip(ip("fd00::1")).unwrap().index, 0);
        let eps: Vec<_> = s
            .endpoints(svc, 80)
            .iter()
            .map(|(w, p)| (w.name.as_str(), p))
            .collect();
        // b lacks port 80 (skipped, no fallback); c is unhealthy.
        assert_eq!(eps, [("a", 8080), ("d", 8081)]);
        let eps = s.endpoints(svc, 443);
        assert_eq!(eps.len(), 2);
        assert_eq!(
            eps.get(1).map(|(w, p)| (w.name.as_str(), p)),
            Some(("b", 9443))
        );
        assert_eq!(eps.get(2).map(|(w, _)| w.name.clone()), None);
        assert!(s.endpoints(svc, 8080).is_empty());
        let t = s.service_by_host("ns", "t").unwrap();
        assert!(s.endpoints(t, 80).is_empty());
        // A ServiceRef with a foreign index yields nothing instead of panicking.
        let bogus = ServiceRef {
            service: svc.service,
            index: 99,
        };
        assert!(s.endpoints(bogus, 80).is_empty());
    }

    #[test]
    fn allow_all_health_policy_keeps_unhealthy() {
        let text = TEXT.replace(
            "ports: {80: 1, 443: 2}}",
            "ports: {80: 1, 443: 2}, loadBalancer: {healthPolicy: AllowAll}}",
        );
        let s = snap(&text);
        let svc = s.service_by_vip(ip("10.96.0.1")).unwrap();
        let names: Vec<_> = s
            .endpoints(svc, 80)
            .iter()
            .map(|(w, _)| w.name.clone())
            .collect();
        assert_eq!(names, ["a", "c", "d"]);
    }

    #[test]
    fn workload_lookups() {
        let s = snap(TEXT);
        assert_eq!(s.workload_by_ip(ip("10.0.0.2")).unwrap().name, "b");
        assert!(s.workload_by_ip(ip("10.0.0.9")).is_none());
        assert_eq!(s.workload_by_name("ns", "d").unwrap().uid, "d");
        assert!(s.workload_by_name("other", "d").is_none());
        assert_eq!(s.workload_by_uid("c").unwrap().name, "c");
        assert!(s.service_by_vip(ip("10.0.0.1")).is_none());
        assert_eq!(s.workload_by_ip(ip("::ffff:10.0.0.2")).unwrap().name, "b");
        assert_eq!(s.service_by_vip(ip("::ffff:10.96.0.2")).unwrap().index, 1);
    }

    #[test]
    fn ip_conflicts_resolve_like_ztunnel() {
        let text = r#"
workloads:
- {uid: "c//Pod/ns/pod", name: pod, namespace: ns, workloadIps: [10.0.0.1], services: {}}
- {uid: "c/x/WorkloadEntry/ns/we", name: we, namespace: ns, protocol: HBONE, workloadIps: [10.0.0.1], services: {}}
- {uid: "c//Pod/ns/hbone", name: hbone, namespace: ns, protocol: HBONE, workloadIps: [10.0.0.2], services: {}}
- {uid: "c//Pod/ns/later", name: later, namespace: ns, protocol: HBONE, workloadIps: [10.0.0.2], services: {}}
- {uid: "c//Pod/ns/host", name: host, namespace: ns, protocol: HBONE, networkMode: HostNetwork, workloadIps: [10.0.0.3], services: {}}
"#;
        let s = snap(text);
        assert_eq!(s.workload_by_ip(ip("10.0.0.1")).unwrap().name, "pod");
        assert_eq!(s.workload_by_ip(ip("10.0.0.2")).unwrap().name, "later");
        assert!(s.workload_by_ip(ip("10.0.0.3")).is_none());
        assert_eq!(s.workload_by_name("ns", "host").unwrap().name, "host");
    }

    #[test]
    fn duplicate_vip_last_service_wins() {
        let text = "services:\n- {name: a, namespace: ns, hostname: a, vips: [/10.96.0.1], ports: {}}\n- {name: b, namespace: ns, hostname: b, vips: [/10.96.0.1], ports: {}}\n";
        let s = snap(text);
        assert_eq!(s.service_by_vip(ip("10.96.0.1")).unwrap().service.name, "b");
    }

    #[test]
    fn clones_share_the_index() {
        let s = snap(TEXT);
        let c = s.clone();
        assert!(std::ptr::eq(s.config(), c.config()));
        let h = std::thread::spawn(move || c.workload_by_ip(ip("10.0.0.1")).map(|w| w.uid.clone()));
        assert_eq!(h.join().unwrap().as_deref(), Some("a"));
    }
}
