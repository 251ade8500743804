//! The Delta ADS session, sans IO: the requests that open a stream, and for each response the
//! resources applied, the ones refused, and the ACK or NACK to send back.
//!
//! As ztunnel: both types are subscribed as wildcards (every resource istiod has for this
//! proxy); a reconnecting stream tells istiod what is already held
//! (`initial_resource_versions`), so only changes come; each resource is applied on its own, so
//! one that cannot be converted is named in the NACK and keeps its previous version (or stays
//! absent) while the others of the same response apply; a removal always applies. The session
//! counts as synced once each type has had a response that was fully ACKed, which is when
//! ztunnel reports ready. With on-demand addresses ([`super::demand`]) the `Address`
//! subscription starts empty and grows by the names asked for.
//!
//! Each response also says what it changed as a [`Delta`] (the converted resources put or
//! removed, keyed by xDS name), which the control thread applies to the snapshot in force: a
//! workload's change costs what it touches, not a rebuild of the mesh. The values are shared
//! (`Arc`) between what the session holds and the snapshots.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::convert::{self, ConvertError, Converted};
use super::demand::Demands;
use super::proto::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource, Status};
use crate::config::{Change, Delta, EntryKey, LocalConfig, Policy, Service, Workload};

/// xDS type of workloads and services.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// xDS type of authorization policies.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
/// Both types, in the order they are subscribed.
pub const TYPES: [&str; 2] = [ADDRESS_TYPE, AUTHORIZATION_TYPE];

/// A resource that could not be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Its xDS name.
    pub name: String,
    /// Why.
    pub reason: ConvertError,
}

/// What one response did.
#[derive(Debug)]
pub struct Handled {
    /// The ACK (no error detail) or NACK to send back.
    pub reply: DeltaDiscoveryRequest,
    /// The resources refused (empty on an ACK).
    pub rejected: Vec<Rejected>,
    /// Whether the held state changed (a new config is due).
    pub changed: bool,
    /// What changed, in order.
    pub delta: Delta,
    /// Whether this response completed the first sync.
    pub synced_now: bool,
    /// The on-demand addresses it answers (found, or removed: not found).
    pub answered: Vec<IpAddr>,
}

impl Handled {
    /// The NACK's message, if this is a NACK.
    pub fn nack(&self) -> Option<&str> {
        self.reply.error_detail.as_ref().map(|s| s.message.as_str())
    }
}

/// A resource held: its version and converted value.
#[derive(Debug, Clone)]
struct Held<T> {
    version: String,
    value: Arc<T>,
}

/// The session: the node it speaks for and every resource it holds.
#[derive(Debug)]
pub struct Session {
    node: Node,
    workloads: BTreeMap<String, Held<Workload>>,
    services: BTreeMap<String, Held<Service>>,
    policies: BTreeMap<String, Held<Policy>>,
    /// Per type (in [`TYPES`] order): has had a fully ACKed response.
    acked: [bool; 2],
    /// On-demand addresses, when on (`XDS_ON_DEMAND`).
    demands: Option<Demands>,
}

impl Session {
    /// A session holding nothing yet.
    pub fn new(node: Node) -> Self {
        Session {
            node,
            workloads: BTreeMap::new(),
            services: BTreeMap::new(),
            policies: BTreeMap::new(),
            acked: [false; 2],
            demands: None,
        }
    }

    /// The same session with on-demand addresses on `network` (ztunnel's `XDS_ON_DEMAND`).
    pub fn on_demand(mut self, network: &str) -> Self {
        self.demands = Some(Demands::new(network));
        self
    }

    /// The request that asks istiod for `ip`; `None` when on-demand is off.
    pub fn demand(&mut self, ip: IpAddr) -> Option<DeltaDiscoveryRequest> {
        self.demands.as_mut().map(|d| DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE.to_owned(),
            resource_names_subscribe: vec![d.ask(ip)],
            ..Default::default()
        })
    }

    /// The first request of each type on a new stream: the node, a wildcard subscription and
    /// what is already held. On demand, addresses subscribe to nothing (`*` subscribed and
    /// unsubscribed at once, as ztunnel) but the names already asked for, held with no version.
    pub fn initial_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        TYPES
            .iter()
            .map(|t| {
                let mut r = DeltaDiscoveryRequest {
                    node: Some(self.node.clone()),
                    type_url: (*t).to_owned(),
                    initial_resource_versions: self.versions(t),
                    ..Default::default()
                };
                if let Some(d) = self.demands.as_ref().filter(|_| *t == ADDRESS_TYPE) {
                    r.resource_names_subscribe = vec!["*".to_owned()];
                    r.resource_names_unsubscribe = vec!["*".to_owned()];
                    for name in d.asked() {
                        r.initial_resource_versions.entry(name.clone()).or_default();
                    }
                }
                r
            })
            .collect()
    }

    fn versions(&self, type_url: &str) -> BTreeMap<String, String> {
        fn of<T>(m: &BTreeMap<String, Held<T>>) -> impl Iterator<Item = (String, String)> + '_ {
            m.iter().map(|(k, h)| (k.clone(), h.version.clone()))
        }
        match type_url {
            ADDRESS_TYPE => of(&self.workloads).chain(of(&self.services)).collect(),
            AUTHORIZATION_TYPE => of(&self.policies).collect(),
            _ => BTreeMap::new(),
        }
    }

    /// Whether every type has had a fully ACKed response.
    pub fn synced(&self) -> bool {
        self.acked.iter().all(|a| *a)
    }

    /// Applies one response and says what to answer.
    pub fn handle(&mut self, resp: DeltaDiscoveryResponse) -> Handled {
        let was_synced = self.synced();
        let answered = match &mut self.demands {
            Some(d) if resp.type_url == ADDRESS_TYPE => d.answered(&resp),
            _ => Vec::new(),
        };
        let mut rejected = Vec::new();
        let mut delta = Delta::default();
        match resp.type_url.as_str() {
            ADDRESS_TYPE => {
                for name in &resp.removed_resources {
                    remove(&mut self.workloads, name, &mut delta.workloads);
                    remove(&mut self.services, name, &mut delta.services);
                }
                for r in &resp.resources {
                    match body(r).and_then(convert::address) {
                        Ok(Converted::Workload(w)) => {
                            remove(&mut self.services, &r.name, &mut delta.services);
                            put(&mut self.workloads, r, *w, &mut delta.workloads);
                        }
                        Ok(Converted::Service(s)) => {
                            remove(&mut self.workloads, &r.name, &mut delta.workloads);
                            put(&mut self.services, r, *s, &mut delta.services);
                        }
                        Err(reason) => rejected.push(Rejected {
                            name: r.name.clone(),
                            reason,
                        }),
                    }
                }
            }
            AUTHORIZATION_TYPE => {
                for name in &resp.removed_resources {
                    remove(&mut self.policies, name, &mut delta.policies);
                }
                for r in &resp.resources {
                    match body(r).and_then(convert::authorization) {
                        Ok(p) => put(&mut self.policies, r, p, &mut delta.policies),
                        Err(reason) => rejected.push(Rejected {
                            name: r.name.clone(),
                            reason,
                        }),
                    }
                }
            }
            // ztunnel ACKs a type it has no handler for, after logging it.
            other => tracing::error!(type_url = other, "xDS response of an unknown type"),
        }
        let error_detail = (!rejected.is_empty()).then(|| Status {
            code: 0,
            message: rejected
                .iter()
                .map(|r| format!("{}: {}", r.name, r.reason))
                .collect::<Vec<_>>()
                .join("; "),
        });
        if error_detail.is_none() {
            if let Some(i) = TYPES.iter().position(|t| *t == resp.type_url) {
                self.acked[i] = true;
            }
        }
        Handled {
            reply: DeltaDiscoveryRequest {
                type_url: resp.type_url,
                response_nonce: resp.nonce,
                error_detail,
                ..Default::default()
            },
            rejected,
            changed: !delta.is_empty(),
            delta,
            synced_now: !was_synced && self.synced(),
            answered,
        }
    }

    /// What is held, as the config model (workloads, services and policies by xDS name). A
    /// copy of everything: the running proxy takes [`Handled::delta`] instead.
    pub fn config(&self) -> LocalConfig {
        fn all<T: Clone>(m: &BTreeMap<String, Held<T>>) -> Vec<T> {
            m.values().map(|h| (*h.value).clone()).collect()
        }
        LocalConfig {
            workloads: all(&self.workloads),
            services: all(&self.services),
            policies: all(&self.policies),
        }
    }

    /// How many workloads, services and policies are held.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.workloads.len(),
            self.services.len(),
            self.policies.len(),
        )
    }
}

fn body(r: &Resource) -> Result<&[u8], ConvertError> {
    r.resource
        .as_ref()
        .map(|a| a.value.as_slice())
        .ok_or(ConvertError::MissingResource)
}

/// Holds `value` under the resource's name; a change of value goes into `delta`.
fn put<T: PartialEq>(
    map: &mut BTreeMap<String, Held<T>>,
    r: &Resource,
    value: T,
    delta: &mut Vec<Change<T>>,
) {
    let version = r.version.clone();
    if let Some(h) = map.get_mut(&r.name) {
        if *h.value == value {
            h.version = version;
            return;
        }
    }
    let value = Arc::new(value);
    delta.push((EntryKey::from(r.name.as_str()), Some(value.clone())));
    map.insert(r.name.clone(), Held { version, value });
}

/// Drops `name`; its removal goes into `delta` if it was held.
fn remove<T>(map: &mut BTreeMap<String, Held<T>>, name: &str, delta: &mut Vec<Change<T>>) {
    if map.remove(name).is_some() {
        delta.push((EntryKey::from(name), None));
    }
}

#[cfg(test)]
mod delta_tests {
    use prost::Message;

    use super::*;
    use crate::config::Snapshot;
    use crate::xds::proto::{Address, AddressType, Any, Port, PortList, XdsNetworkAddress};
    use crate::xds::proto::{XdsService, XdsWorkload};

    fn resource(name: &str, version: &str, a: AddressType) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            resource: Some(Any {
                type_url: ADDRESS_TYPE.into(),
                value: Address { r#type: Some(a) }.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    fn workload(ip: u8) -> AddressType {
        AddressType::Workload(XdsWorkload {
            uid: "w".into(),
            name: "w".into(),
            namespace: "ns".into(),
            addresses: vec![vec![10, 0, 0, ip]],
            services: [(
                "ns/s.ns.svc".to_owned(),
                PortList {
                    ports: vec![Port {
                        service_port: 80,
                        target_port: 8080,
                    }],
                },
            )]
            .into(),
            ..Default::default()
        })
    }

    fn service() -> AddressType {
        AddressType::Service(XdsService {
            name: "s".into(),
            namespace: "ns".into(),
            hostname: "s.ns.svc".into(),
            addresses: vec![XdsNetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 1],
            }],
            ..Default::default()
        })
    }

    fn response(resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: "n".into(),
            resources,
            removed_resources: removed.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    /// What each response hands over, applied in turn, is what the session holds.
    #[test]
    fn deltas_name_only_what_changed_and_add_up_to_the_state() {
        let mut s = Session::new(Node::default());
        let mut snap = Snapshot::new(LocalConfig::default(), 1);
        let mut step = |s: &mut Session, resp| {
            let h = s.handle(resp);
            let counts = (
                h.delta.workloads.len(),
                h.delta.services.len(),
                h.delta.policies.len(),
            );
            snap = snap.apply(h.delta, snap.generation + 1);
            let full = Snapshot::new(s.config(), 0);
            let ip = "10.0.0.1".parse().expect("ip");
            assert_eq!(
                snap.workload_by_ip(ip).map(|w| w.uid.clone()),
                full.workload_by_ip(ip).map(|w| w.uid.clone())
            );
            assert_eq!(snap.workload_count(), full.workload_count());
            assert_eq!(snap.service_count(), full.service_count());
            counts
        };
        let r = response(
            vec![
                resource("a", "1", workload(1)),
                resource("s", "1", service()),
            ],
            &[],
        );
        assert_eq!(step(&mut s, r), (1, 1, 0));
        // The same value under a new version: nothing to hand over.
        assert_eq!(
            step(&mut s, response(vec![resource("a", "2", workload(1))], &[])),
            (0, 0, 0)
        );
        assert_eq!(s.initial_requests()[0].initial_resource_versions["a"], "2");
        // A name that turns from a workload into a service: removed from one, put in the other.
        assert_eq!(
            step(&mut s, response(vec![resource("a", "3", service())], &[])),
            (1, 1, 0)
        );
        assert_eq!(s.counts(), (0, 2, 0));
        // Removals of what is held, and only those.
        assert_eq!(step(&mut s, response(vec![], &["a", "nothing"])), (0, 1, 0));
        assert_eq!(s.counts(), (0, 1, 0));
    }
}
