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
        touched.insert(service_key);
        self.services.insert(key, svc);
    }

    /// Recomputes the endpoints of every service carrying `service_key` from its members, as
    /// ztunnel's `load_balance` filters them: only the service's own `ports` have endpoints;
    /// a member serves one with the target port its own map gives, else the service's when
    /// that is not 0 (a member with neither is left out); unhealthy members only under the
    /// `AllowAll` health policy.
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
            for w in members.values() {
                if w.status == HealthStatus::Unhealthy && !allow_unhealthy {
                    continue;
                }
                let Some(map) = w.services.get(service_key) else {
                    continue;
                };
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
