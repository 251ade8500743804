//! ztunnel's local config: parsing, validation and the per-generation lookup index.
//!
//! ringtun reads, unchanged, the YAML file that ztunnel reads from `LOCAL_XDS_PATH`
//! (ztunnel's `LocalConfig` in `src/xds.rs`). The format is ztunnel's, not ringtun's:
//!
//! ```yaml
//! workloads:                       # ztunnel LocalWorkload = Workload + `services`
//! - uid: cluster1//v1/Pod/default/server
//!   name: server
//!   namespace: default             # required
//!   serviceAccount: server
//!   workloadIps: ["10.77.0.2"]     # required
//!   protocol: HBONE                # HBONE | TCP (default TCP)
//!   node: node-b
//!   network: ""
//!   services:                      # "namespace/hostname" -> servicePort: targetPort
//!     "default/server.default.svc.cluster.local": {80: 5201}
//! services:
//! - name: server
//!   namespace: default
//!   hostname: server.default.svc.cluster.local
//!   vips: ["/10.96.0.10"]          # "network/IP"; the network may be empty
//!   ports: {80: 5201}
//! policies:                        # ztunnel Authorization
//! - name: deny-9999
//!   namespace: default
//!   scope: Namespace               # Global | Namespace | WorkloadSelector
//!   action: Allow                  # Allow | Deny
//!   dryRun: false
//!   rules: [[[{notDestinationPorts: [9999]}]]]   # rules → clauses → matches
//! ```
//!
//! Keys are camelCase and enum spellings are ztunnel's. Every key ztunnel's model has is
//! modelled here (see [`Workload`], [`Service`], [`Policy`]). Where ztunnel would refuse
//! a file but the intent is clear, ringtun accepts it and returns a warning instead:
//! unknown fields (reported by path, e.g. `workloads[0].fooBar`), a workload without a
//! `services` key, a policy without `dryRun`. Every value is checked while parsing, so an
//! error reads `file:line:column: field: what`, e.g.
//!
//! ```text
//! /etc/ringtun/config.yaml:8:13: workloads[0].protocol: unknown variant `HBON`, expected `HBONE` or `TCP`
//! ```
//!
//! Inconsistencies that ztunnel loads anyway (duplicate IPs or VIPs, a workload naming an
//! undefined service, ...) are warnings. An empty file is a valid empty config.
//!
//! [`Snapshot`] indexes one config for O(1), allocation-free lookups on the connection path;
//! a [`Delta`] (istiod's updates) makes the next one at the cost of what it changes.

mod by_workload;
mod chunked;
mod delta;
mod error;
mod index;
mod model;
mod parse;
mod snapshot;
mod validate;

#[cfg(test)]
mod delta_tests;

pub use by_workload::ByWorkload;
pub use delta::{Change, Delta, EntryKey};
pub use error::ConfigError;
pub use model::{
    ApplicationTunnel, ApplicationTunnelProtocol, Clause, GatewayAddress, GatewayDestination,
    HealthStatus, IpFamily, IpNet, LoadBalancer, LoadBalancerHealthPolicy, LoadBalancerMode,
    LoadBalancerScope, LocalConfig, Locality, NamespacedHostname, NetworkAddress, NetworkMode,
    Policy, PolicyAction, PolicyMatch, PolicyScope, PortMap, Protocol, Rule, Service,
    ServiceAccountMatch, ServiceEndpoint, Stamp, StringMatch, Workload,
};
pub use parse::{load, parse, Loaded};

/// One workload entry from its YAML fields (`uid: …, name: …`), for tests.
#[cfg(test)]
pub(crate) fn test_workload(fields: &str) -> Workload {
    let text = format!("workloads:\n- {{{fields}, workloadIps: [], services: {{}}}}\n");
    match parse(std::path::Path::new("t.yaml"), &text) {
        Ok(mut l) => l.config.workloads.remove(0),
        Err(e) => panic!("{e}"),
    }
}
pub use snapshot::{Endpoints, EndpointsIter, ServiceRef, Snapshot};
