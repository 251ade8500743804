//! A service (ztunnel `Service`), its endpoints and load-balancing settings.

use super::values::{GatewayAddress, HealthStatus, NetworkAddress, PortMap};
use serde::Deserialize;
use std::collections::BTreeMap;

/// One service (ztunnel `Service`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// `name` (required).
    pub name: String,
    /// `namespace` (required).
    pub namespace: String,
    /// `hostname` (required); workloads refer to the service as `namespace/hostname`.
    pub hostname: String,
    /// `vips`: `"network/IP"` strings, e.g. `/10.96.0.10` (required; may be empty).
    pub vips: Vec<NetworkAddress>,
    /// `ports`: service port → target port (required; may be empty).
    pub ports: PortMap,
    /// `subjectAltNames` (default empty).
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// `endpoints`: endpoint UID → endpoint, rarely written by hand (default empty).
    #[serde(default)]
    pub endpoints: BTreeMap<String, ServiceEndpoint>,
    /// `waypoint` (optional).
    #[serde(default)]
    pub waypoint: Option<GatewayAddress>,
    /// `loadBalancer` (optional).
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    /// `ipFamilies`: `Dual`, `IPv4` or `IPv6` (optional).
    #[serde(default)]
    pub ip_families: Option<IpFamily>,
    /// `canonical` (default false).
    #[serde(default)]
    pub canonical: bool,
}

impl Service {
    /// The `namespace/hostname` key workloads use in their `services` map.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// An entry of a service's `endpoints` map (ztunnel `Endpoint`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEndpoint {
    /// `workloadUid` (required).
    pub workload_uid: String,
    /// `port`: service port → target port (required, as in ztunnel, which refuses a config
    /// without it).
    pub port: PortMap,
    /// `status` (required, as in ztunnel).
    pub status: HealthStatus,
}

/// `loadBalancer: {routingPreferences, mode, healthPolicy}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    /// `routingPreferences`.
    #[serde(default)]
    pub routing_preferences: Vec<LoadBalancerScope>,
    /// `mode` (default `Standard`).
    #[serde(default)]
    pub mode: LoadBalancerMode,
    /// `healthPolicy` (default `OnlyHealthy`).
    #[serde(default)]
    pub health_policy: LoadBalancerHealthPolicy,
}

/// `loadBalancer.routingPreferences[]` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum LoadBalancerScope {
    /// `Region`.
    Region,
    /// `Zone`.
    Zone,
    /// `Subzone`.
    Subzone,
    /// `Node`.
    Node,
    /// `Cluster`.
    Cluster,
    /// `Network`.
    Network,
}

/// `loadBalancer.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
pub enum LoadBalancerMode {
    /// `Standard`: ignore routing preferences.
    #[default]
    Standard,
    /// `Strict`: only endpoints matching every preference.
    Strict,
    /// `Failover`: prefer matching endpoints.
    Failover,
    /// `Passthrough`: no endpoint selection, keep the original destination.
    Passthrough,
}

/// `loadBalancer.healthPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
pub enum LoadBalancerHealthPolicy {
    /// `OnlyHealthy` (default).
    #[default]
    OnlyHealthy,
    /// `AllowAll`: unhealthy workloads stay endpoints.
    AllowAll,
}

/// `ipFamilies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum IpFamily {
    /// `Dual`.
    Dual,
    /// `IPv4`.
    #[serde(rename = "IPv4")]
    Ipv4,
    /// `IPv6`.
    #[serde(rename = "IPv6")]
    Ipv6,
}
