//! Value types shared by workloads, services and gateways.

use super::de::de_parsed;
use serde::de::Deserializer;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Service port → target port, as written in `ports:` and in workload `services:` entries.
pub type PortMap = BTreeMap<u16, u16>;

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
