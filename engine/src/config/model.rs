//! The data model of ztunnel's local config, field for field.
//!
//! Every value check happens inside a `Deserialize` impl so that
//! `serde_yaml_ng` attaches the field path and the line/column to the error.
//! Field names, defaults and enum spellings follow ztunnel's
//! `src/xds.rs` (`LocalConfig`, `LocalWorkload`), `src/state/workload.rs`
//! (`Workload`), `src/state/service.rs` (`Service`) and `src/rbac.rs`
//! (`Authorization`).

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Service port → target port, as written in `ports:` and in workload `services:` entries.
pub type PortMap = BTreeMap<u16, u16>;

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
}

fn default_capacity() -> u32 {
    1
}

impl Workload {
    /// `namespace/name`, for messages.
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
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

/// `status`: `Healthy` or `Unhealthy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
pub enum HealthStatus {
    /// Eligible as a service endpoint (default).
    #[default]
    Healthy,
    /// Excluded from service endpoints unless the service's health policy is `AllowAll`.
    Unhealthy,
}

/// `locality: {region, zone, subzone}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
pub struct Locality {
    /// `region`.
    #[serde(default)]
    pub region: String,
    /// `zone`.
    #[serde(default)]
    pub zone: String,
    /// `subzone`.
    #[serde(default)]
    pub subzone: String,
}

/// `waypoint` / `networkGateway`: `{destination, hboneMtlsPort}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    /// `destination`: `"network/IP"` or `"namespace/hostname"`.
    pub destination: GatewayDestination,
    /// `hboneMtlsPort`.
    pub hbone_mtls_port: u16,
}

/// A gateway destination: an address if the string parses as `network/IP`, else a hostname.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GatewayDestination {
    /// `"network/IP"`.
    Address(NetworkAddress),
    /// `"namespace/hostname"`.
    Hostname(NamespacedHostname),
}

/// `applicationTunnel: {protocol, port}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
pub struct ApplicationTunnel {
    /// `protocol`: `NONE` or `PROXY`.
    pub protocol: ApplicationTunnelProtocol,
    /// `port` (optional).
    #[serde(default)]
    pub port: Option<u16>,
}

/// `applicationTunnel.protocol`, spelled `NONE` / `PROXY` as in ztunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum ApplicationTunnelProtocol {
    /// `NONE`.
    #[serde(rename = "NONE")]
    None,
    /// `PROXY`: PROXY protocol in front of the payload.
    #[serde(rename = "PROXY")]
    Proxy,
}

/// A `namespace/hostname` pair (ztunnel `NamespacedHostname`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedHostname {
    /// Namespace (before the first `/`).
    pub namespace: String,
    /// Hostname (after the first `/`).
    pub hostname: String,
}

impl fmt::Display for NamespacedHostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.hostname)
    }
}

impl NamespacedHostname {
    /// Splits `ns/host` at the first `/`, like ztunnel; `None` if there is no `/`.
    pub fn parse(s: &str) -> Option<Self> {
        let (namespace, hostname) = s.split_once('/')?;
        Some(Self {
            namespace: namespace.to_owned(),
            hostname: hostname.to_owned(),
        })
    }
}

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
    /// `port`: service port → target port.
    #[serde(default)]
    pub port: PortMap,
    /// `status` (default `Healthy`).
    #[serde(default)]
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

/// A `"network/IP"` address (ztunnel `NetworkAddress`); the network may be empty (`/10.0.0.1`).
/// A bare IP is refused, as ztunnel refuses it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetworkAddress {
    /// Network name (before the first `/`; empty for the default network).
    pub network: String,
    /// The IP.
    pub address: IpAddr,
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

impl FromStr for NetworkAddress {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (network, ip) = s.split_once('/').ok_or(())?;
        let address = IpAddr::from_str(ip).map_err(|_| ())?;
        Ok(Self {
            network: network.to_owned(),
            address,
        })
    }
}

/// An authorization policy (ztunnel `Authorization`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// `name` (required).
    pub name: String,
    /// `namespace` (required).
    pub namespace: String,
    /// `scope`: `Global`, `Namespace` or `WorkloadSelector` (required).
    pub scope: PolicyScope,
    /// `action`: `Allow` or `Deny` (required).
    pub action: PolicyAction,
    /// `rules`: any rule matching makes the policy match (required; may be empty).
    pub rules: Vec<Rule>,
    /// `dryRun`: ztunnel requires it; ringtun defaults it to false with a warning.
    #[serde(default)]
    pub dry_run: bool,
}

impl Policy {
    /// `namespace/name`: the key ztunnel stores the policy under and workloads list.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `scope` of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum PolicyScope {
    /// `Global`: applies to every workload.
    Global,
    /// `Namespace`: applies to workloads of the policy's namespace.
    Namespace,
    /// `WorkloadSelector`: applies to workloads listing it in `authorizationPolicies`.
    WorkloadSelector,
}

/// `action` of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum PolicyAction {
    /// `Allow`.
    Allow,
    /// `Deny`.
    Deny,
}

/// A rule: a list of clauses that must ALL match (a YAML list).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Rule {
    /// Clauses (typically from / to / when).
    pub clauses: Vec<Clause>,
}

/// A clause: a list of matches of which ANY must match (a YAML list); empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Clause {
    /// Alternatives.
    pub matches: Vec<PolicyMatch>,
}

/// One match (ztunnel `RbacMatch`): every non-empty list must match (ANY within a list),
/// and no entry of a `not*` list may match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyMatch {
    /// `namespaces` of the source identity.
    #[serde(default)]
    pub namespaces: Vec<StringMatch>,
    /// `notNamespaces`.
    #[serde(default)]
    pub not_namespaces: Vec<StringMatch>,
    /// `serviceAccounts` of the source identity.
    #[serde(default)]
    pub service_accounts: Vec<ServiceAccountMatch>,
    /// `notServiceAccounts`.
    #[serde(default)]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// `principals`: matched against the source identity without `spiffe://`.
    #[serde(default)]
    pub principals: Vec<StringMatch>,
    /// `notPrincipals`.
    #[serde(default)]
    pub not_principals: Vec<StringMatch>,
    /// `sourceIps`: CIDRs `a.b.c.d/len`.
    #[serde(default)]
    pub source_ips: Vec<IpNet>,
    /// `notSourceIps`.
    #[serde(default)]
    pub not_source_ips: Vec<IpNet>,
    /// `destinationIps`: CIDRs.
    #[serde(default)]
    pub destination_ips: Vec<IpNet>,
    /// `notDestinationIps`.
    #[serde(default)]
    pub not_destination_ips: Vec<IpNet>,
    /// `destinationPorts`.
    #[serde(default)]
    pub destination_ports: Vec<u16>,
    /// `notDestinationPorts`.
    #[serde(default)]
    pub not_destination_ports: Vec<u16>,
}

impl PolicyMatch {
    /// True when no list is set (ztunnel skips such a match: it matches nothing).
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
    }
}

/// A string matcher, written with YAML tags as serde_yaml (ztunnel) and serde_yaml_ng
/// require: `!Exact x`, `!Prefix x`, `!Suffix x`, `!Presence []` (the `{Exact: x}` map
/// form is refused by both).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(from = "RawStringMatch")]
pub enum StringMatch {
    /// `Exact`.
    Exact(String),
    /// `Prefix`.
    Prefix(String),
    /// `Suffix`.
    Suffix(String),
    /// `Presence`: any non-empty value.
    Presence,
}

impl StringMatch {
    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

/// ztunnel's exact shape (`Presence()` is a zero-length tuple variant).
#[derive(Deserialize)]
enum RawStringMatch {
    Prefix(String),
    Suffix(String),
    Exact(String),
    Presence(),
}

impl From<RawStringMatch> for StringMatch {
    fn from(raw: RawStringMatch) -> Self {
        match raw {
            RawStringMatch::Prefix(s) => StringMatch::Prefix(s),
            RawStringMatch::Suffix(s) => StringMatch::Suffix(s),
            RawStringMatch::Exact(s) => StringMatch::Exact(s),
            RawStringMatch::Presence() => StringMatch::Presence,
        }
    }
}

/// `{namespace, serviceAccount}` (both required, as in ztunnel).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    /// `namespace`.
    pub namespace: String,
    /// `serviceAccount`.
    pub service_account: String,
}

/// A CIDR `addr/prefix_len` (the prefix is required, as with ztunnel's `ipnet::IpNet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    /// Address as written (host bits are kept, ignored by [`IpNet::contains`]).
    pub addr: IpAddr,
    /// Prefix length (≤ 32 for IPv4, ≤ 128 for IPv6).
    pub prefix_len: u8,
}

impl IpNet {
    /// Parses `addr/len`; `None` on a missing or out-of-range prefix or a bad address.
    pub fn parse(s: &str) -> Option<Self> {
        let (addr, len) = s.split_once('/')?;
        let addr = IpAddr::from_str(addr).ok()?;
        // u8::from_str accepts a leading '+'; ipnet does not.
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let prefix_len = u8::from_str(len).ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix_len <= max).then_some(Self { addr, prefix_len })
    }

    /// Whether `ip` lies in the network (an IPv4 net never contains an IPv6 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

// ---------------------------------------------------------------------------
// Deserialize impls that validate strings (so errors carry path and line).
// ---------------------------------------------------------------------------

/// A visitor for a string that must pass `parse`; `expecting` names the format.
struct ParsedStr<F> {
    expecting: &'static str,
    parse: F,
}

impl<'de, T, F: FnOnce(&str) -> Option<T>> Visitor<'de> for ParsedStr<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        let expecting = self.expecting;
        (self.parse)(v).ok_or_else(|| E::invalid_value(Unexpected::Str(v), &expecting))
    }
}

fn de_parsed<'de, D, T>(
    d: D,
    expecting: &'static str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    d.deserialize_str(ParsedStr { expecting, parse })
}

/// An IP address with a message that shows the offending value.
struct Ip(IpAddr);

impl<'de> Deserialize<'de> for Ip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_parsed(d, "an IP address such as 10.0.0.1 or fd00::1", |s| {
            IpAddr::from_str(s).ok().map(Ip)
        })
    }
}

fn de_ip_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    Ok(Vec::<Ip>::deserialize(d)?
        .into_iter()
        .map(|ip| ip.0)
        .collect())
}

impl<'de> Deserialize<'de> for NetworkAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_parsed(
            d,
            "a network address `network/IP` such as `/10.96.0.10` or `net1/10.96.0.10`",
            |s| NetworkAddress::from_str(s).ok(),
        )
    }
}

impl<'de> Deserialize<'de> for NamespacedHostname {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_parsed(
            d,
            "a service key `namespace/hostname`",
            NamespacedHostname::parse,
        )
    }
}

impl<'de> Deserialize<'de> for GatewayDestination {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_parsed(
            d,
            "`network/IP` or `namespace/hostname`",
            |s| match NetworkAddress::from_str(s) {
                Ok(a) => Some(GatewayDestination::Address(a)),
                Err(()) => NamespacedHostname::parse(s).map(GatewayDestination::Hostname),
            },
        )
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_parsed(d, "a CIDR such as 10.0.0.0/8 or 10.0.0.1/32", IpNet::parse)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipnet_parse_and_contains() {
        let n = IpNet::parse("10.1.0.0/16").unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(!n.contains("::1".parse().unwrap()));
        let all = IpNet::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("192.168.1.1".parse().unwrap()));
        let host = IpNet::parse("fd00::1/128").unwrap();
        assert!(host.contains("fd00::1".parse().unwrap()));
        assert!(!host.contains("fd00::2".parse().unwrap()));
        for bad in [
            "10.0.0.1",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/",
            "x/8",
            "10.0.0.0/+8",
        ] {
            assert_eq!(IpNet::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn network_address_forms() {
        let a: NetworkAddress = "/10.0.0.1".parse().unwrap();
        assert_eq!(a.network, "");
        assert_eq!(a.to_string(), "/10.0.0.1");
        let b: NetworkAddress = "net1/fd00::1".parse().unwrap();
        assert_eq!(b.network, "net1");
        assert!(NetworkAddress::from_str("10.0.0.1").is_err());
        assert!(NetworkAddress::from_str("/10.0.0.300").is_err());
    }

    #[test]
    fn string_match() {
        assert!(StringMatch::Prefix("ns/".into()).matches("ns/a"));
        assert!(StringMatch::Suffix("/sa/x".into()).matches("td/ns/a/sa/x"));
        assert!(StringMatch::Exact("a".into()).matches("a"));
        assert!(!StringMatch::Exact("a".into()).matches("ab"));
        assert!(StringMatch::Presence.matches("x"));
        assert!(!StringMatch::Presence.matches(""));
    }

    #[test]
    fn namespaced_hostname_splits_at_first_slash() {
        let n = NamespacedHostname::parse("ns/a/b").unwrap();
        assert_eq!(n.namespace, "ns");
        assert_eq!(n.hostname, "a/b");
        assert!(NamespacedHostname::parse("nope").is_none());
    }
}
