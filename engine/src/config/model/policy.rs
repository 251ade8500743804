//! An authorization policy (ztunnel `Authorization`) and its matchers.

use super::de::de_parsed;
use serde::de::Deserializer;
use serde::Deserialize;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

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

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_parsed(d, "a CIDR such as 10.0.0.0/8 or 10.0.0.1/32", IpNet::parse)
    }
}
