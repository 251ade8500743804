//! [`Snapshot`]: the immutable lookup index of one config generation, handed to every shard.

use std::net::IpAddr;
use std::sync::Arc;

use super::chunked::Pair;
use super::delta::Delta;
use super::index::{ip_rank, Endpoint, Index, PortEndpoints, Svc};
use super::model::{LocalConfig, Policy, Service, Workload};

/// Immutable lookup index of one config generation; handed to every worker shard.
///
/// Cloning is cheap (one `Arc`); all lookups are hash-map hits that do not allocate.
/// The next generation is built from the previous one with [`Snapshot::apply`], which costs
/// what the change touches, not the size of the mesh (see `index.rs`).
/// IP lookups ignore the network (ztunnel keys by `network/IP`); see each method.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Config generation this index was built from.
    pub generation: u64,
    /// The generation whose change last touched the authorization policies: a generation
    /// after it that a shard takes can change no policy answer, so live connections need no
    /// re-check (ztunnel's `PolicyWatcher` wakes on policy changes only).
    policies_changed_at: u64,
    index: Arc<Index>,
}

/// A service in a [`Snapshot`] together with its id.
#[derive(Clone, Copy, Debug)]
pub struct ServiceRef<'a> {
    /// The service.
    pub service: &'a Service,
    /// Unique within a Snapshot and kept while the service is updated, usable as a per-service
    /// key; for a config built at once, its position in the list of services.
    pub index: usize,
    endpoints: &'a PortEndpoints,
}

impl<'a> ServiceRef<'a> {
    fn of(svc: &'a Svc) -> Self {
        ServiceRef {
            service: &svc.service,
            index: svc.id,
            endpoints: &svc.endpoints,
        }
    }
}

/// The endpoints of one service port: a borrowed slice, no allocation.
#[derive(Clone, Copy, Debug)]
pub struct Endpoints<'a> {
    entries: &'a [Endpoint],
    uniform: bool,
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

    /// The `i`-th endpoint (config order), e.g. `get(rr % len)`.
    pub fn get(&self, i: usize) -> Option<(&'a Workload, u16)> {
        self.entries.get(i).map(|(w, port)| (&**w, *port))
    }

    /// Whether every endpoint has an IP address and capacity 1: a capacity-weighted draw over
    /// them is then a uniform one.
    pub fn is_uniform(&self) -> bool {
        self.uniform
    }

    /// Iterates `(workload, target_port)` in config order.
    pub fn iter(&self) -> EndpointsIter<'a> {
        EndpointsIter {
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
    entries: std::slice::Iter<'a, Endpoint>,
}

impl<'a> Iterator for EndpointsIter<'a> {
    type Item = (&'a Workload, u16);
    fn next(&mut self) -> Option<Self::Item> {
        self.entries.next().map(|(w, port)| (&**w, *port))
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.entries.size_hint()
    }
}

impl ExactSizeIterator for EndpointsIter<'_> {}

impl Snapshot {
    /// Builds the index of a whole config (entries keyed by position). Conflicts resolve as
    /// ztunnel does (see the lookups); `parse` reports them as warnings.
    pub fn new(config: LocalConfig, generation: u64) -> Snapshot {
        let mut index = Index::with_capacity(config.workloads.len(), config.services.len());
        index.apply(Delta::from_config(config));
        Snapshot {
            generation,
            // A whole config may change anything.
            policies_changed_at: generation,
            index: Arc::new(index),
        }
    }

    /// The next generation: this one with `delta` applied. Shares every table and bucket the
    /// change does not touch with this snapshot, which stays as it was.
    pub fn apply(&self, delta: Delta, generation: u64) -> Snapshot {
        let policies_changed_at = if delta.policies.is_empty() {
            self.policies_changed_at
        } else {
            generation
        };
        let mut index = (*self.index).clone();
        index.apply(delta);
        Snapshot {
            generation,
            policies_changed_at,
            index: Arc::new(index),
        }
    }

    /// Whether this generation's policies may differ from those of generation `since` (the
    /// one a shard had before): whether live connections must be re-checked. Generations in
    /// between that a shard never saw count too.
    pub fn policies_changed_since(&self, since: u64) -> bool {
        self.policies_changed_at > since
    }

    /// Number of workloads.
    pub fn workload_count(&self) -> usize {
        self.index.workloads.len()
    }

    /// Number of services.
    pub fn service_count(&self) -> usize {
        self.index.services.len()
    }

    /// Number of authorization policies (a replaced duplicate counted too).
    pub fn policy_count(&self) -> usize {
        self.index.policies.list.len()
    }

    /// Every workload, in config order. Sorts them: for operators, not for connections.
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> + '_ {
        let mut all: Vec<_> = self.index.workloads.iter().collect();
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        all.into_iter().map(|(_, w)| &**w)
    }

    /// Every service, in config order. Sorts them: for operators, not for connections.
    pub fn services(&self) -> impl Iterator<Item = &Service> + '_ {
        let mut all: Vec<_> = self.index.services.iter().collect();
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        all.into_iter().map(|(_, s)| &*s.service)
    }

    /// Every authorization policy, in config order (a replaced duplicate too).
    pub fn policies(
        &self,
    ) -> impl DoubleEndedIterator<Item = &Policy> + ExactSizeIterator + Clone + '_ {
        self.index.policies.list.iter().map(|(_, p)| &**p)
    }

    /// The service owning VIP `ip` in any network (ztunnel matches `network/IP`; ringtun
    /// ignores the network). If several services claim it, the last in config order wins.
    /// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) match their IPv4 form.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<ServiceRef<'_>> {
        let svc = self.index.by_vip.get(&ip.to_canonical())?.last()?;
        Some(ServiceRef::of(svc))
    }

    /// The service `namespace/hostname` (the last one if defined twice).
    pub fn service_by_host(&self, namespace: &str, hostname: &str) -> Option<ServiceRef<'_>> {
        let at = (namespace, hostname);
        let svc = self.index.by_host.get(&at as &dyn Pair)?.last()?;
        Some(ServiceRef::of(svc))
    }

    /// The workload owning `ip` in any network. Host-network workloads are not indexed.
    /// If several claim it: a `//Pod/` uid first, then HBONE, then the later one (ztunnel's rule).
    /// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) match their IPv4 form.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        let claims = self.index.by_ip.get(&ip.to_canonical())?;
        Some(claims.best_by(|w| ip_rank(w))?)
    }

    /// The first workload (config order) with this namespace and name.
    pub fn workload_by_name(&self, namespace: &str, name: &str) -> Option<&Workload> {
        let at = (namespace, name);
        Some(self.index.by_name.get(&at as &dyn Pair)?.first()?)
    }

    /// Every workload with this namespace and name, in config order (the same pod name may be
    /// claimed on several nodes).
    pub fn workloads_by_name<'a>(
        &'a self,
        namespace: &str,
        name: &str,
    ) -> impl Iterator<Item = &'a Workload> + 'a {
        let at = (namespace, name);
        self.index
            .by_name
            .get(&at as &dyn Pair)
            .into_iter()
            .flat_map(|claims| claims.iter().map(|(_, w)| &**w))
    }

    /// The workload with this uid (the last one if repeated, as in ztunnel).
    pub fn workload_by_uid(&self, uid: &str) -> Option<&Workload> {
        Some(self.index.by_uid.get(uid)?.last()?)
    }

    /// The effective authorization policy stored under `namespace/name`, if any.
    pub fn policy(&self, key: &str) -> Option<&Policy> {
        let t = &self.index.policies;
        Some(&t.list.get(*t.by_key.get(key)?)?.1)
    }

    /// The effective policies filed under `namespace`, config order: its `Namespace`-scoped
    /// ones, or for `""` the `Global` ones (and any written with `namespace: ""`).
    pub fn policies_in(&self, namespace: &str) -> impl Iterator<Item = &Policy> + Clone {
        let t = &self.index.policies;
        let bucket = t.by_namespace.get(namespace).map_or(&[][..], |b| &b[..]);
        bucket.iter().filter_map(|&i| Some(&*t.list.get(i)?.1))
    }

    /// Endpoints of `service` for `service_port`, as ztunnel's `load_balance` filters them:
    /// none unless the service's `ports` has that port; then every workload whose `services`
    /// map has the key `namespace/hostname`, with the target port its own map gives, else the
    /// service's (a workload with neither, the service's being 0, is left out). Unhealthy
    /// workloads are left out unless the service's health policy is `AllowAll`. Config order;
    /// then the service's own written `endpoints` that no such workload replaced (see
    /// `Index::refresh_endpoints`). (A `ServiceRef` carries them: one from another snapshot
    /// gives that snapshot's.)
    pub fn endpoints<'a>(&self, service: ServiceRef<'a>, service_port: u16) -> Endpoints<'a> {
        let (entries, uniform) = service
            .endpoints
            .iter()
            .find(|(port, _, _)| *port == service_port)
            .map_or((&[][..], true), |(_, e, uniform)| (&e[..], *uniform));
        Endpoints { entries, uniform }
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
- {name: s, namespace: ns, hostname: s, vips: [/10.96.0.1, net2/fd00::1], ports: {80: 1, 443: 0}}
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
        // b lacks port 80: the service's target port; c is unhealthy.
        assert_eq!(eps, [("a", 8080), ("b", 1), ("d", 8081)]);
        assert!(s.endpoints(svc, 80).is_uniform());
        let weighted = snap(&TEXT.replace("uid: d,", "uid: d, capacity: 2,"));
        let svc2 = weighted.service_by_vip(ip("10.96.0.1")).unwrap();
        assert!(!weighted.endpoints(svc2, 80).is_uniform());
        let eps = s.endpoints(svc, 443);
        assert_eq!(eps.len(), 2);
        assert_eq!(
            eps.get(1).map(|(w, p)| (w.name.as_str(), p)),
            Some(("b", 9443))
        );
        // d lacks 443 and the service maps it to 0: no fallback.
        assert_eq!(eps.get(2).map(|(w, _)| w.name.clone()), None);
        assert!(s.endpoints(svc, 8080).is_empty());
        let t = s.service_by_host("ns", "t").unwrap();
        assert!(s.endpoints(t, 80).is_empty());
    }

    #[test]
    fn allow_all_health_policy_keeps_unhealthy() {
        let text = TEXT.replace(
            "ports: {80: 1, 443: 0}}",
            "ports: {80: 1, 443: 0}, loadBalancer: {healthPolicy: AllowAll}}",
        );
        let s = snap(&text);
        let svc = s.service_by_vip(ip("10.96.0.1")).unwrap();
        let names: Vec<_> = s
            .endpoints(svc, 80)
            .iter()
            .map(|(w, _)| w.name.clone())
            .collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
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
        assert!(Arc::ptr_eq(&s.index, &c.index));
        let h = std::thread::spawn(move || c.workload_by_ip(ip("10.0.0.1")).map(|w| w.uid.clone()));
        assert_eq!(h.join().unwrap().as_deref(), Some("a"));
    }
}
