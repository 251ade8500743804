//! A workload (ztunnel `LocalWorkload`) and its enums.

use super::de::{de_ip_list, de_parsed};
use super::values::{ApplicationTunnel, GatewayAddress, HealthStatus, Locality, PortMap};
use serde::de::Deserializer;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

/// One workload (ztunnel `LocalWorkload` = flattened `Workload` + `services` map).
///
/// Defaults are those of ztunnel's serde model, which differ from the xDS
/// defaults: an absent `serviceAccount`, `clusterId`, `workloadType` stays
/// empty here (xDS would give `default`, `Kubernetes`, `deployment`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// `uid`: ztunnel's primary key, e.g. `cluster1//v1/Pod/default/client` (default empty).
    #[serde(default)]
    pub uid: String,
    /// `name` (default empty).
    #[serde(default)]
    pub name: String,
    /// `namespace` (required by ztunnel).
    pub namespace: String,
    /// `serviceAccount` (default empty).
    #[serde(default)]
    pub service_account: String,
    /// `workloadIps` (required by ztunnel; may be an empty list).
    #[serde(deserialize_with = "de_ip_list")]
    pub workload_ips: Vec<IpAddr>,
    /// `protocol`: `HBONE` or `TCP` (default `TCP`).
    #[serde(default)]
    pub protocol: Protocol,
    /// `node` (default empty).
    #[serde(default)]
    pub node: String,
    /// `network` (default empty).
    #[serde(default)]
    pub network: String,
    /// `trustDomain`: `None` when the key is absent (use the process-wide trust domain);
    /// `Some("")` when written empty (ztunnel then uses an empty trust domain).
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// `workloadType` (ztunnel local-config default: empty; xDS would say `deployment`).
    #[serde(default)]
    pub workload_type: String,
    /// `workloadName` (default empty).
    #[serde(default)]
    pub workload_name: String,
    /// `canonicalName` (default empty).
    #[serde(default)]
    pub canonical_name: String,
    /// `canonicalRevision` (default empty).
    #[serde(default)]
    pub canonical_revision: String,
    /// `clusterId` (ztunnel local-config default: empty; xDS would say `Kubernetes`).
    #[serde(default)]
    pub cluster_id: String,
    /// `services`: `"namespace/hostname"` → service port → target port. ztunnel
    /// requires the key; ringtun accepts its absence (empty map) with a warning.
    #[serde(default, deserialize_with = "de_workload_services")]
    pub services: BTreeMap<String, PortMap>,
    /// `hostname` (default empty).
    #[serde(default)]
    pub hostname: String,
    /// `networkMode`: `Standard` or `HostNetwork` (default `Standard`).
    #[serde(default)]
    pub network_mode: NetworkMode,
    /// `waypoint` (optional).
    #[serde(default)]
    pub waypoint: Option<GatewayAddress>,
    /// `networkGateway` (optional).
    #[serde(default)]
    pub network_gateway: Option<GatewayAddress>,
    /// `nativeTunnel` (default false).
    #[serde(default)]
    pub native_tunnel: bool,
    /// `applicationTunnel` (optional).
    #[serde(default)]
    pub application_tunnel: Option<ApplicationTunnel>,
    /// `authorizationPolicies`: keys `"namespace/name"` of `WorkloadSelector` policies.
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    /// `status`: `Healthy` or `Unhealthy` (default `Healthy`).
    #[serde(default)]
    pub status: HealthStatus,
    /// `locality` (default all empty).
    #[serde(default)]
    pub locality: Locality,
    /// `capacity` (default 1).
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    /// Which copy of the workload this is (not part of the config).
    #[serde(skip)]
    pub stamp: Stamp,
}

/// A number no other [`Workload`] value has had: made anew by `Default` and by every `clone`,
/// so a shard can remember what it derived from a workload (its metric labels) and know by
/// one comparison, without reading its fields, that the snapshot's workload is still that
/// one. Equal to every other stamp, so it never changes whether two workloads compare equal.
/// The config builds a workload, then shares it behind an `Arc` and never edits it again:
/// an edit in place after a shard has looked at it would go unnoticed.
pub struct Stamp(u64);

impl std::fmt::Debug for Stamp {
    // Without the number: a workload's debug form is compared as a whole, and two copies
    // of one workload must read the same.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stamp")
    }
}

impl Stamp {
    /// A stamp never handed out before in this process.
    pub fn new() -> Stamp {
        // Relaxed: only uniqueness matters, and fetch_add gives it in any order. Stamps are
        // made when the control thread builds config, never on the data path.
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Stamp(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The number.
    pub fn get(&self) -> u64 {
        self.0
    }
}

impl Default for Stamp {
    fn default() -> Stamp {
        Stamp::new()
    }
}

impl Clone for Stamp {
    fn clone(&self) -> Stamp {
        Stamp::new()
    }
}

impl PartialEq for Stamp {
    fn eq(&self, _: &Stamp) -> bool {
        true
    }
}

impl Eq for Stamp {}

fn default_capacity() -> u32 {
    1
}

/// Workload tunnel protocol (`protocol:`), spelled `HBONE` / `TCP` as in ztunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
pub enum Protocol {
    /// `HBONE`: the workload accepts mTLS HTTP/2 CONNECT on port 15008.
    #[serde(rename = "HBONE")]
    Hbone,
    /// `TCP`: plain TCP (ztunnel's default).
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
}

/// `networkMode`: `Standard` or `HostNetwork`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
pub enum NetworkMode {
    /// The workload has its own IPs (default).
    #[default]
    Standard,
    /// Host-network pod: ztunnel does not index it by IP.
    HostNetwork,
}

/// A workload `services` key: must contain `/` (ztunnel fails the load otherwise).
struct ServiceKey(String);

impl<'de> Deserialize<'de> for ServiceKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_parsed(d, "a service key `namespace/hostname`", |s| {
            s.contains('/').then(|| ServiceKey(s.to_owned()))
        })
    }
}

impl PartialEq for ServiceKey {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for ServiceKey {}
impl PartialOrd for ServiceKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ServiceKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

fn de_workload_services<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, PortMap>, D::Error> {
    Ok(BTreeMap::<ServiceKey, PortMap>::deserialize(d)?
        .into_iter()
        .map(|(k, v)| (k.0, v))
        .collect())
}
