//! The lookup index behind a [`Snapshot`](super::Snapshot), and how a [`Delta`] changes it.
//!
//! Every table is a [`ChunkMap`], so the next snapshot starts as a clone of the previous one
//! (a few reference counts) and a change touches only what it is about: a workload's own
//! entries (its IPs, name, uid) and the endpoint lists of the services it joins or leaves,
//! recomputed from their members; a service's VIPs, hostname and endpoint list. Policies are
//! few: their tables are rebuilt when one changes, and shared untouched otherwise.
//!
//! Conflicts (two workloads on one IP, two services on one VIP, ...) keep every claimant in
//! config order ([`Claims`]) and the lookup applies ztunnel's rule, so the result never depends
//! on the order changes came in: applying deltas one by one gives what building the final
//! config at once gives.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use super::chunked::{claim, reclaim, unclaim, ChunkMap, Claims, NsName, Pair};
use super::delta::{Delta, EntryKey};
use super::model::{HealthStatus, LoadBalancerHealthPolicy, NetworkMode, Protocol};
use super::model::{Policy, PolicyScope, Service, Workload};

/// A service as the index holds it: the value, its id (unique within a snapshot and kept
/// across updates of the same entry; the file's position for a full build) and its endpoints,
/// so that a lookup by VIP finds them without another table.
#[derive(Clone, Debug)]
pub(super) struct Svc {
    pub(super) service: Arc<Service>,
    pub(super) id: usize,
    pub(super) endpoints: Arc<PortEndpoints>,
}

/// One endpoint: the workload and the port to dial on it.
pub(super) type Endpoint = (Arc<Workload>, u16);

/// A service's endpoints per service port (sorted, searched in order: services have few
/// ports), each list in config order, with whether it [is uniform](uniform).
pub(super) type PortEndpoints = [(u16, Box<[Endpoint]>, bool)];

/// Whether every endpoint has an address and capacity 1, so that a capacity-weighted draw
/// among them all is a uniform one (the common case, drawn without a pass over the list).
fn uniform(endpoints: &[Endpoint]) -> bool {
    endpoints
        .iter()
        .all(|(w, _)| w.capacity == 1 && !w.workload_ips.is_empty())
}

/// Workloads listing one service key, in config order.
type Members = BTreeMap<EntryKey, Arc<Workload>>;

/// Services (entry → service key) whose own `endpoints` name one workload uid.
type Referrers = BTreeMap<EntryKey, Arc<str>>;

#[derive(Clone, Debug, Default)]
pub(super) struct Index {
    pub(super) workloads: ChunkMap<EntryKey, Arc<Workload>>,
    pub(super) services: ChunkMap<EntryKey, Svc>,
    pub(super) by_vip: ChunkMap<IpAddr, Claims<Svc>>,
    pub(super) by_host: ChunkMap<NsName, Claims<Svc>>,
    pub(super) by_ip: ChunkMap<IpAddr, Claims<Arc<Workload>>>,
    pub(super) by_name: ChunkMap<NsName, Claims<Arc<Workload>>>,
    pub(super) by_uid: ChunkMap<Arc<str>, Claims<Arc<Workload>>>,
    /// Service key (`namespace/hostname`) → the services carrying it (duplicates share
    /// endpoints, each with its own health policy).
    carriers: ChunkMap<Arc<str>, Claims<Svc>>,
    /// Service key → the workloads listing it.
    members: ChunkMap<Arc<str>, Arc<Members>>,
    /// Workload uid → the services whose `endpoints` name it, so that a change to a workload
    /// with that uid refreshes them.
    referrers: ChunkMap<Arc<str>, Arc<Referrers>>,
    pub(super) policies: Arc<PolicyTables>,
    next_service_id: usize,
}

/// Authorization policies, as ztunnel's `PolicyStore` files them.
#[derive(Debug, Default)]
pub(super) struct PolicyTables {
    /// Every policy, config order.
    pub(super) list: Box<[(EntryKey, Arc<Policy>)]>,
    /// Namespace (`""`: global) → positions in `list` of its effective policies, config order.
    pub(super) by_namespace: HashMap<String, Box<[usize]>>,
    /// `namespace/name` → position in `list` of the effective (last) policy with that key.
    pub(super) by_key: HashMap<String, usize>,
}

/// Marks `service_key`'s endpoints for recomputing (allocating only the first time).
fn touch(touched: &mut BTreeSet<Arc<str>>, service_key: &str) {
    if !touched.contains(service_key) {
        touched.insert(service_key.into());
    }
}

/// ztunnel's preference among workloads sharing an address: Pod uid, then HBONE.
pub(super) fn ip_rank(w: &Workload) -> u8 {
    u8::from(w.uid.contains("//Pod/")) * 2 + u8::from(w.protocol == Protocol::Hbone)
}

impl Index {
    /// An empty index sized for about `workloads` workloads and `services` services.
    pub(super) fn with_capacity(workloads: usize, services: usize) -> Index {
        Index {
            workloads: ChunkMap::with_capacity(workloads),
            services: ChunkMap::with_capacity(services),
            by_vip: ChunkMap::with_capacity(services),
            by_host: ChunkMap::with_capacity(services),
            by_ip: ChunkMap::with_capacity(workloads),
            by_name: ChunkMap::with_capacity(workloads),
            by_uid: ChunkMap::with_capacity(workloads),
            carriers: ChunkMap::with_capacity(services),
            members: ChunkMap::with_capacity(services),
            referrers: ChunkMap::default(),
            policies: Arc::default(),
            next_service_id: 0,
        }
    }

    /// Applies `delta`: each list in order, then the endpoints of every service key touched.
    pub(super) fn apply(&mut self, delta: Delta) {
        self.reserve(delta.workloads.len(), delta.services.len());
        let mut touched = BTreeSet::new();
        for (key, w) in delta.workloads {
            self.put_workload(key, w, &mut touched);
        }
        for (key, s) in delta.services {
            self.put_service(key, s, &mut touched);
        }
        if !delta.policies.is_empty() {
            let mut all: BTreeMap<EntryKey, Arc<Policy>> =
                self.policies.list.iter().cloned().collect();
            for (key, p) in delta.policies {
                match p {
                    Some(p) => all.insert(key, p),
                    None => all.remove(&key),
                };
            }
            self.policies = Arc::new(PolicyTables::new(all.into_iter().collect()));
        }
        for service_key in &touched {
            self.refresh_endpoints(service_key);
        }
    }

    /// Room for `workloads` and `services` more (at most: some may be updates or removals).
    fn reserve(&mut self, workloads: usize, services: usize) {
        self.workloads.reserve(workloads);
        self.by_ip.reserve(workloads);
        self.by_name.reserve(workloads);
        self.by_uid.reserve(workloads);
        self.services.reserve(services);
        self.by_vip.reserve(services);
        self.by_host.reserve(services);
        self.carriers.reserve(services);
        self.members.reserve(services);
    }

    fn put_workload(
        &mut self,
        key: EntryKey,
        new: Option<Arc<Workload>>,
        touched: &mut BTreeSet<Arc<str>>,
    ) {
        let old = match &new {
            Some(w) => self.workloads.insert(key.clone(), w.clone()),
            None => self.workloads.remove(&key),
        };
        if let (Some(old), Some(new)) = (&old, &new) {
            if Arc::ptr_eq(old, new) {
                return;
            }
        }
        if let Some(old) = old {
            self.unindex_workload(&key, &old, touched);
        }
        if let Some(new) = new {
            self.index_workload(&key, &new, touched);
        }
    }

    fn unindex_workload(&mut self, key: &EntryKey, w: &Workload, touched: &mut BTreeSet<Arc<str>>) {
        if w.network_mode != NetworkMode::HostNetwork {
            for ip in &w.workload_ips {
                unclaim(&mut self.by_ip, &ip.to_canonical(), key);
            }
        }
        unclaim(
            &mut self.by_name,
            &(w.namespace.as_str(), w.name.as_str()) as &dyn Pair,
            key,
        );
        unclaim(&mut self.by_uid, w.uid.as_str(), key);
        self.touch_referrers(&w.uid, touched);
        for service_key in w.services.keys() {
            let Some(members) = self.members.get_mut(service_key.as_str()) else {
                continue;
            };
            Arc::make_mut(members).remove(key);
            if members.is_empty() {
                self.members.remove(service_key.as_str());
            }
            touch(touched, service_key);
        }
    }

    fn index_workload(
        &mut self,
        key: &EntryKey,
        w: &Arc<Workload>,
        touched: &mut BTreeSet<Arc<str>>,
    ) {
        if w.network_mode != NetworkMode::HostNetwork {
            for ip in &w.workload_ips {
                claim(&mut self.by_ip, ip.to_canonical(), key, w);
            }
        }
        claim(
            &mut self.by_name,
            NsName::new(&w.namespace, &w.name),
            key,
            w,
        );
        claim(&mut self.by_uid, w.uid.as_str().into(), key, w);
        self.touch_referrers(&w.uid, touched);
        for service_key in w.services.keys() {
            match self.members.get_mut(service_key.as_str()) {
                Some(members) => {
                    Arc::make_mut(members).insert(key.clone(), w.clone());
                }
                None => {
                    let members = BTreeMap::from([(key.clone(), w.clone())]);
                    self.members
                        .insert(service_key.as_str().into(), Arc::new(members));
                }
            }
            touch(touched, service_key);
        }
    }

    fn put_service(
        &mut self,
        key: EntryKey,
        new: Option<Arc<Service>>,
        touched: &mut BTreeSet<Arc<str>>,
    ) {
        let old = self.services.remove(&key);
        if let Some(old) = &old {
            let s = &old.service;
            for vip in &s.vips {
                unclaim(&mut self.by_vip, &vip.address.to_canonical(), &key);
            }
            let host = (s.namespace.as_str(), s.hostname.as_str());
            unclaim(&mut self.by_host, &host as &dyn Pair, &key);
            let service_key = s.key();
            unclaim(&mut self.carriers, service_key.as_str(), &key);
            for ep in s.endpoints.values() {
                self.unrefer(&ep.workload_uid, &key);
            }
            touched.insert(service_key.into());
        }
        let Some(service) = new else {
            return;
        };
        let id = old.map_or_else(
            || {
                self.next_service_id += 1;
                self.next_service_id - 1
            },
            |o| o.id,
        );
        let svc = Svc {
            service,
            id,
            endpoints: Vec::new().into(),
        };
        let s = &svc.service;
        for vip in &s.vips {
            claim(&mut self.by_vip, vip.address.to_canonical(), &key, &svc);
        }
        claim(
            &mut self.by_host,
            NsName::new(&s.namespace, &s.hostname),
            &key,
            &svc,
        );
        let service_key: Arc<str> = s.key().into();
        claim(&mut self.carriers, service_key.clone(), &key, &svc);
        for ep in s.endpoints.values() {
            let uid = ep.workload_uid.as_str();
            match self.referrers.get_mut(uid) {
                Some(r) => {
                    Arc::make_mut(r).insert(key.clone(), service_key.clone());
                }
                None => {
                    let r = BTreeMap::from([(key.clone(), service_key.clone())]);
                    self.referrers.insert(uid.into(), Arc::new(r));
                }
            }
        }
        touched.insert(service_key);
        self.services.insert(key, svc);
    }

    /// Marks for refreshing the services whose own `endpoints` name `uid`.
    fn touch_referrers(&self, uid: &str, touched: &mut BTreeSet<Arc<str>>) {
        if let Some(r) = self.referrers.get(uid) {
            for service_key in r.values() {
                touch(touched, service_key);
            }
        }
    }

    /// Forgets that service entry `key` names `uid` in its `endpoints`.
    fn unrefer(&mut self, uid: &str, key: &EntryKey) {
        let Some(r) = self.referrers.get_mut(uid) else {
            return;
        };
        Arc::make_mut(r).remove(key);
        if r.is_empty() {
            self.referrers.remove(uid);
        }
    }

    /// Recomputes the endpoints of every service carrying `service_key`, as ztunnel builds
    /// and filters them. Its endpoint set is the service's own `endpoints` (as written, keyed
    /// by endpoint uid) with the members merged in, each under its workload uid (replacing a
    /// written entry with that key), unhealthy members only under the `AllowAll` health
    /// policy (ztunnel's `should_include_endpoint`, applied to the members alone as its
    /// service store applies it to the workload-derived endpoints alone: a written endpoint's
    /// `status` filters nothing). Then its `load_balance`: only the service's own `ports` have
    /// endpoints; an endpoint serves one with the target port its own map gives, else the
    /// service's when that is not 0 (one with neither is left out); a written endpoint whose
    /// `workloadUid` names no workload is left out. Members first, in config order, then the
    /// written ones in key order.
    fn refresh_endpoints(&mut self, service_key: &str) {
        let Some(carriers) = self.carriers.get(service_key).cloned() else {
            return;
        };
        let members = self.members.get(service_key).cloned().unwrap_or_default();
        for (key, svc) in carriers.iter() {
            let allow_unhealthy = svc
                .service
                .load_balancer
                .as_ref()
                .is_some_and(|lb| lb.health_policy == LoadBalancerHealthPolicy::AllowAll);
            let mut ports: BTreeMap<u16, Vec<Endpoint>> = BTreeMap::new();
            let mut add = |w: &Arc<Workload>, map: &super::model::PortMap| {
                for (&service_port, &service_target) in &svc.service.ports {
                    let target_port = match map.get(&service_port) {
                        Some(&own) => own,
                        None if service_target != 0 => service_target,
                        None => continue,
                    };
                    ports
                        .entry(service_port)
                        .or_default()
                        .push((w.clone(), target_port));
                }
            };
            let mut merged: BTreeSet<&str> = BTreeSet::new();
            for w in members.values() {
                if w.status == HealthStatus::Unhealthy && !allow_unhealthy {
                    continue;
                }
                let Some(map) = w.services.get(service_key) else {
                    continue;
                };
                merged.insert(w.uid.as_str());
                add(w, map);
            }
            for (uid, ep) in &svc.service.endpoints {
                if merged.contains(uid.as_str()) {
                    continue;
                }
                let found = self.by_uid.get(ep.workload_uid.as_str());
                if let Some(w) = found.and_then(|c| c.last()) {
                    add(w, &ep.port);
                }
            }
            let endpoints: Vec<_> = ports
                .into_iter()
                .map(|(p, v)| {
                    let uniform = uniform(&v);
                    (p, v.into_boxed_slice(), uniform)
                })
                .collect();
            if endpoints.is_empty() && svc.endpoints.is_empty() {
                continue;
            }
            let svc = Svc {
                endpoints: endpoints.into(),
                ..svc.clone()
            };
            self.restore_service(key, &svc);
        }
    }

    /// Puts `svc` (with new endpoints) in place of the entry `key` wherever it is filed.
    fn restore_service(&mut self, key: &EntryKey, svc: &Svc) {
        let s = &svc.service;
        for vip in &s.vips {
            reclaim(&mut self.by_vip, &vip.address.to_canonical(), key, svc);
        }
        let host = (s.namespace.as_str(), s.hostname.as_str());
        reclaim(&mut self.by_host, &host as &dyn Pair, key, svc);
        reclaim(&mut self.carriers, s.key().as_str(), key, svc);
        self.services.insert(key.clone(), svc.clone());
    }
}

impl PolicyTables {
    /// The tables over `list` (config order): a later policy with the same `namespace/name`
    /// replaces an earlier one (and drops out of its bucket); `Global` policies go to the `""`
    /// bucket, `WorkloadSelector` ones to none (workloads list them).
    fn new(list: Box<[(EntryKey, Arc<Policy>)]>) -> PolicyTables {
        let keys: Vec<String> = list.iter().map(|(_, p)| p.key()).collect();
        let mut by_key = HashMap::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            by_key.insert(key.clone(), i);
        }
        let mut buckets: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, ((_, p), key)) in list.iter().zip(&keys).enumerate() {
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
            list,
            by_namespace,
            by_key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse, Delta, EntryKey, Snapshot};
    use std::net::IpAddr;
    use std::path::Path;
    use std::sync::Arc;

    fn snap(text: &str) -> Snapshot {
        match parse(Path::new("t.yaml"), text) {
            Ok(l) => Snapshot::new(l.config, 1),
            Err(e) => panic!("{e}"),
        }
    }

    /// `(workload name, target port)` of the service on 10.96.0.1, port 80.
    fn ends(s: &Snapshot) -> Vec<(String, u16)> {
        let ip: IpAddr = [10, 96, 0, 1].into();
        let Some(svc) = s.service_by_vip(ip) else {
            return Vec::new();
        };
        s.endpoints(svc, 80)
            .iter()
            .map(|(w, p)| (w.name.clone(), p))
            .collect()
    }

    const WRITTEN: &str = r#"
workloads:
- {uid: a, name: a, namespace: ns, workloadIps: [10.0.0.1], services: {}}
- {uid: b, name: b, namespace: ns, workloadIps: [10.0.0.2], services: {"ns/s": {80: 8082}}}
- {uid: c, name: c, namespace: ns, workloadIps: [10.0.0.3], status: Unhealthy, services: {"ns/s": {80: 8083}}}
services:
- name: s
  namespace: ns
  hostname: s
  vips: [/10.96.0.1]
  ports: {80: 1}
  endpoints:
    a: {workloadUid: a, port: {80: 9001}, status: Unhealthy}
    b: {workloadUid: b, port: {80: 9002}, status: Healthy}
    c: {workloadUid: c, port: {80: 9003}, status: Healthy}
    gone: {workloadUid: nobody, port: {80: 9004}, status: Healthy}
    z: {workloadUid: a, port: {}, status: Healthy}
"#;

    #[test]
    fn written_endpoints_merge_with_the_members_as_ztunnel_merges_them() {
        // a is only written (its own port map, and under another key the service's target
        // port), and a written status filters nothing (the real ztunnel routes to a written
        // Unhealthy endpoint too: its store health-filters only workload-derived ones); b lists the service, which replaces the written entry under its uid; c lists
        // it but is unhealthy, so the written entry stays; `nobody` is no workload.
        assert_eq!(
            ends(&snap(WRITTEN)),
            [
                ("b".into(), 8082),
                ("a".into(), 9001),
                ("c".into(), 9003),
                ("a".into(), 1)
            ]
        );
    }

    #[test]
    fn a_service_whose_only_endpoint_is_written_is_served() {
        let text = r#"
workloads:
- {uid: "c//Pod/ns/a", name: a, namespace: ns, workloadIps: [10.0.0.1], services: {}}
services:
- name: s
  namespace: ns
  hostname: s
  vips: [/10.96.0.1]
  ports: {80: 8080}
  endpoints:
    "c//Pod/ns/a": {workloadUid: "c//Pod/ns/a", port: {80: 8080}, status: Healthy}
"#;
        assert_eq!(ends(&snap(text)), [("a".into(), 8080)]);
    }

    #[test]
    fn a_workload_named_by_a_written_endpoint_refreshes_the_service_when_it_changes() {
        let text = r#"
workloads: []
services:
- name: s
  namespace: ns
  hostname: s
  vips: [/10.96.0.1]
  ports: {80: 8080}
  endpoints:
    later: {workloadUid: later, port: {}, status: Healthy}
"#;
        let first = snap(text);
        assert!(ends(&first).is_empty(), "no workload has the uid yet");
        let w = match parse(
            Path::new("w.yaml"),
            "workloads:\n- {uid: later, name: l, namespace: ns, workloadIps: [10.0.0.9], services: {}}\n",
        ) {
            Ok(mut l) => l.config.workloads.remove(0),
            Err(e) => panic!("{e}"),
        };
        let added = first.apply(
            Delta {
                workloads: vec![(EntryKey::from("w"), Some(Arc::new(w)))],
                ..Delta::default()
            },
            2,
        );
        assert_eq!(ends(&added), [("l".into(), 8080)]);
        let removed = added.apply(
            Delta {
                workloads: vec![(EntryKey::from("w"), None)],
                ..Delta::default()
            },
            3,
        );
        assert!(ends(&removed).is_empty());
    }
}
