//! On-demand addresses (ztunnel's `XDS_ON_DEMAND=true`): instead of every address istiod
//! has, the client subscribes to none and asks for each destination a connection meets.
//!
//! As ztunnel's client (`src/xds/client.rs`, `src/state.rs`): the first `Address` request of a
//! stream subscribes and unsubscribes `*` in one go ("subscribe to nothing"; istiod then sends
//! what it adds unasked, such as the workloads of the proxy's node); policies stay a wildcard
//! subscription. An unknown destination is asked for as `network/IP` with a request that only
//! subscribes that name. The name is remembered with the held resources, so a new stream names
//! it in `initial_resource_versions` (version empty) and istiod answers it again; a name istiod
//! answers as removed (its "not found") is forgotten.
//!
//! A demand counts as answered when a response carries a resource of that name or with it
//! among its aliases, or removes the name. ztunnel matches the name only, and istiod names an
//! address by its workload uid or service hostname (the IP an alias), so there the connection
//! that asked waits on; ringtun's is answered by the response that brings what it asked for.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use super::proto::DeltaDiscoveryResponse;

/// ringtun's wait for istiod's answer to a demand, by default (ztunnel waits without limit).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);

/// The resource name of an address on `network` (ztunnel's `NetworkAddress` as text).
pub fn resource_name(network: &str, ip: IpAddr) -> String {
    format!("{network}/{ip}")
}

/// The names asked for on demand, and those still waiting for their answer.
#[derive(Debug, Default)]
pub struct Demands {
    /// The proxy's network (ztunnel's `NETWORK`; empty by default).
    network: String,
    /// Every name asked for and not answered as removed: resubscribed on a new stream.
    asked: BTreeSet<String>,
    /// Names waiting for an answer, with the address each one is for.
    pending: BTreeMap<String, IpAddr>,
}

impl Demands {
    /// No demand yet, for a proxy on `network`.
    pub fn new(network: &str) -> Self {
        Demands {
            network: network.to_owned(),
            ..Default::default()
        }
    }

    /// The name to ask istiod for `ip` by, now waiting for its answer (asked each time, as
    /// ztunnel does: a demand that timed out may be answered the next time).
    pub fn ask(&mut self, ip: IpAddr) -> String {
        let name = resource_name(&self.network, ip);
        self.asked.insert(name.clone());
        self.pending.insert(name.clone(), ip);
        name
    }

    /// The names asked for, to name on a new stream.
    pub fn asked(&self) -> impl Iterator<Item = &String> {
        self.asked.iter()
    }

    /// The addresses `resp` (an `Address` response) answers; forgets names it removes.
    pub fn answered(&mut self, resp: &DeltaDiscoveryResponse) -> Vec<IpAddr> {
        if self.pending.is_empty() && self.asked.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let named = resp
            .resources
            .iter()
            .flat_map(|r| std::iter::once(&r.name).chain(r.aliases.iter()));
        for name in named {
            if let Some(ip) = self.pending.remove(name) {
                out.push(ip);
            }
        }
        for name in &resp.removed_resources {
            self.asked.remove(name);
            if let Some(ip) = self.pending.remove(name) {
                out.push(ip);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::proto::Resource;

    fn response(resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            resources,
            removed_resources: removed.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_demand_is_answered_by_name_alias_or_removal_and_a_removal_forgets_it() {
        let mut d = Demands::new("");
        let vip: IpAddr = "10.96.0.10".parse().expect("ip");
        let gone: IpAddr = "10.96.0.99".parse().expect("ip");
        assert_eq!(d.ask(vip), "/10.96.0.10");
        d.ask(gone);
        // Named by the service, the IP an alias: as istiod answers.
        let svc = Resource {
            name: "default/server.default.svc.cluster.local".into(),
            aliases: vec!["/10.96.0.10".into()],
            ..Default::default()
        };
        assert_eq!(d.answered(&response(vec![svc.clone()], &[])), [vip]);
        assert!(d.answered(&response(vec![svc], &[])).is_empty(), "once");
        assert_eq!(d.answered(&response(vec![], &["/10.96.0.99"])), [gone]);
        let asked: Vec<_> = d.asked().cloned().collect();
        assert_eq!(asked, ["/10.96.0.10"], "the unknown one is forgotten");
    }
}
