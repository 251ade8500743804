//! The data model of ztunnel's local config, field for field.
//!
//! Every value check happens inside a `Deserialize` impl so that
//! `serde_yaml_ng` attaches the field path and the line/column to the error.
//! Field names, defaults and enum spellings follow ztunnel's
//! `src/xds.rs` (`LocalConfig`, `LocalWorkload`), `src/state/workload.rs`
//! (`Workload`), `src/state/service.rs` (`Service`) and `src/rbac.rs`
//! (`Authorization`).

mod de;
mod policy;
mod service;
mod values;
mod workload;

#[cfg(test)]
mod tests;

use serde::Deserialize;

pub use policy::{
    Clause, IpNet, Policy, PolicyAction, PolicyMatch, PolicyScope, Rule, ServiceAccountMatch,
    StringMatch,
};
pub use service::{
    IpFamily, LoadBalancer, LoadBalancerHealthPolicy, LoadBalancerMode, LoadBalancerScope, Service,
    ServiceEndpoint,
};
pub use values::{
    ApplicationTunnel, ApplicationTunnelProtocol, GatewayAddress, GatewayDestination, HealthStatus,
    Locality, NamespacedHostname, NetworkAddress, PortMap,
};
pub use workload::{NetworkMode, Protocol, Stamp, Workload};

/// The whole file: ztunnel's `LocalConfig` (every top-level key is optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalConfig {
    /// `workloads:` — ztunnel's `LocalWorkload` list.
    #[serde(default)]
    pub workloads: Vec<Workload>,
    /// `services:` — ztunnel's `Service` list.
    #[serde(default)]
    pub services: Vec<Service>,
    /// `policies:` — ztunnel's `Authorization` list.
    #[serde(default)]
    pub policies: Vec<Policy>,
}
