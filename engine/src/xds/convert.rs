//! Istio's xDS resources → ringtun's config model, with ztunnel's xDS defaults (an empty
//! service account is `default`, an empty trust domain `cluster.local`, an empty cluster
//! `Kubernetes`, an absent capacity 1) and its refusals (an address that is neither 4 nor 16
//! bytes, an enum value it does not know, a service key without `/`).
//!
//! Stricter than ztunnel where it would silently change a value: a port above 65535 and a CIDR
//! whose prefix is too long are refused (ztunnel truncates the port and drops the CIDR, which
//! can widen a DENY policy's reach), so the resource is NACKed instead.

use std::net::IpAddr;

use super::proto::{
    AddressType, Authorization, AuthzMatch, GatewayDestination as XdsDestination, MatchType, Port,
    XdsCidr, XdsGatewayAddress, XdsService, XdsStringMatch, XdsWorkload,
};
use crate::config::{
    ApplicationTunnel, ApplicationTunnelProtocol, Clause, GatewayAddress, GatewayDestination,
    HealthStatus, IpFamily, IpNet, LoadBalancer, LoadBalancerHealthPolicy, LoadBalancerMode,
    LoadBalancerScope, Locality, NamespacedHostname, NetworkAddress, NetworkMode, Policy,
    PolicyAction, PolicyMatch, PolicyScope, PortMap, Protocol, Rule, Service, ServiceAccountMatch,
    StringMatch, Workload,
};

/// Why a resource cannot be applied (the reason a NACK carries).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// The bytes do not decode as the resource type.
    #[error("decode: {0}")]
    Decode(String),
    /// The resource entry carries no body.
    #[error("the resource has no body")]
    MissingResource,
    /// An `Address` that is neither a workload nor a service.
    #[error("unknown address type")]
    UnknownAddressType,
    /// An IP of the wrong length.
    #[error("{field}: an address of {len} bytes (an IP has 4 or 16)")]
    AddressBytes {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// An enum value this version does not know.
    #[error("{field}: unknown value {value}")]
    Enum {
        /// Which field.
        field: &'static str,
        /// The value.
        value: i32,
    },
    /// A port above 65535.
    #[error("{field}: port {value} is out of range")]
    Port {
        /// Which field.
        field: &'static str,
        /// The value.
        value: u32,
    },
    /// A workload's service key without `/`.
    #[error("services: key {0:?} is not namespace/hostname")]
    ServiceKey(String),
    /// A gateway address without a destination.
    #[error("{0}: the gateway address has no destination")]
    MissingGateway(&'static str),
    /// A CIDR prefix longer than the address.
    #[error("{field}: prefix /{len} is too long for {addr}")]
    Prefix {
        /// Which field.
        field: &'static str,
        /// The address.
        addr: IpAddr,
        /// The prefix length.
        len: u32,
    },
}

/// What an `Address` resource holds, converted.
#[derive(Debug, Clone, PartialEq)]
pub enum Converted {
    /// A workload (with its `services` map).
    Workload(Box<Workload>),
    /// A service.
    Service(Box<Service>),
}

/// Decodes and converts one `Address` body.
pub fn address(body: &[u8]) -> Result<Converted, ConvertError> {
    let addr = <super::proto::Address as prost::Message>::decode(body)
        .map_err(|e| ConvertError::Decode(e.to_string()))?;
    match addr.r#type {
        Some(AddressType::Workload(w)) => Ok(Converted::Workload(Box::new(workload(w)?))),
        Some(AddressType::Service(s)) => Ok(Converted::Service(Box::new(service(s)?))),
        None => Err(ConvertError::UnknownAddressType),
    }
}

/// Decodes and converts one `Authorization` body.
pub fn authorization(body: &[u8]) -> Result<Policy, ConvertError> {
    let a = <Authorization as prost::Message>::decode(body)
        .map_err(|e| ConvertError::Decode(e.to_string()))?;
    policy(a)
}

fn ip(field: &'static str, b: &[u8]) -> Result<IpAddr, ConvertError> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        return Ok(IpAddr::from(v4));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(b) {
        return Ok(IpAddr::from(v6));
    }
    Err(ConvertError::AddressBytes {
        field,
        len: b.len(),
    })
}

fn port(field: &'static str, p: u32) -> Result<u16, ConvertError> {
    u16::try_from(p).map_err(|_| ConvertError::Port { field, value: p })
}

fn ports(field: &'static str, list: &[Port]) -> Result<PortMap, ConvertError> {
    list.iter()
        .map(|p| Ok((port(field, p.service_port)?, port(field, p.target_port)?)))
        .collect()
}

fn or_default(s: String, default: &str) -> String {
    if s.is_empty() {
        default.to_owned()
    } else {
        s
    }
}

fn unknown(field: &'static str, value: i32) -> ConvertError {
    ConvertError::Enum { field, value }
}

fn gateway(
    field: &'static str,
    g: Option<XdsGatewayAddress>,
) -> Result<Option<GatewayAddress>, ConvertError> {
    let Some(g) = g else { return Ok(None) };
    let destination = match g.destination {
        Some(XdsDestination::Address(a)) => GatewayDestination::Address(NetworkAddress {
            network: a.network,
            address: ip(field, &a.address)?,
        }),
        Some(XdsDestination::Hostname(h)) => GatewayDestination::Hostname(NamespacedHostname {
            namespace: h.namespace,
            hostname: h.hostname,
        }),
        None => return Err(ConvertError::MissingGateway(field)),
    };
    Ok(Some(GatewayAddress {
        destination,
        hbone_mtls_port: port(field, g.hbone_mtls_port)?,
    }))
}

/// ztunnel's `Workload::try_from(XdsWorkload)`.
pub fn workload(w: XdsWorkload) -> Result<Workload, ConvertError> {
    let workload_ips = w
        .addresses
        .iter()
        .map(|a| ip("addresses", a))
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = match w.tunnel_protocol {
        0 => Protocol::Tcp,
        1 => Protocol::Hbone,
        v => return Err(unknown("tunnel_protocol", v)),
    };
    let workload_type = match w.workload_type {
        0 => "deployment",
        1 => "cronjob",
        2 => "pod",
        3 => "job",
        v => return Err(unknown("workload_type", v)),
    };
    let status = match w.status {
        0 => HealthStatus::Healthy,
        1 => HealthStatus::Unhealthy,
        v => return Err(unknown("status", v)),
    };
    let network_mode = match w.network_mode {
        0 => NetworkMode::Standard,
        1 => NetworkMode::HostNetwork,
        v => return Err(unknown("network_mode", v)),
    };
    let application_tunnel = match w.application_tunnel {
        None => None,
        Some(t) => Some(ApplicationTunnel {
            protocol: match t.protocol {
                0 => ApplicationTunnelProtocol::None,
                1 => ApplicationTunnelProtocol::Proxy,
                v => return Err(unknown("application_tunnel.protocol", v)),
            },
            port: match t.port {
                0 => None,
                p => Some(port("application_tunnel.port", p)?),
            },
        }),
    };
    let mut services = std::collections::BTreeMap::new();
    for (key, list) in &w.services {
        if !key.contains('/') {
            return Err(ConvertError::ServiceKey(key.clone()));
        }
        services.insert(key.clone(), ports("services", &list.ports)?);
    }
    let locality = w.locality.map_or_else(Locality::default, |l| Locality {
        region: l.region,
        zone: l.zone,
        subzone: l.subzone,
    });
    Ok(Workload {
        waypoint: gateway("waypoint", w.waypoint)?,
        network_gateway: gateway("network_gateway", w.network_gateway)?,
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        service_account: or_default(w.service_account, "default"),
        workload_ips,
        protocol,
        node: w.node,
        network: w.network,
        trust_domain: Some(or_default(w.trust_domain, "cluster.local")),
        workload_type: workload_type.to_owned(),
        workload_name: w.workload_name,
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        cluster_id: or_default(w.cluster_id, "Kubernetes"),
        services,
        hostname: w.hostname,
        network_mode,
        native_tunnel: w.native_tunnel,
        application_tunnel,
        authorization_policies: w.authorization_policies,
        status,
        locality,
        capacity: w.capacity.unwrap_or(1),
        stamp: Default::default(),
    })
}

/// ztunnel's `Service::try_from(&XdsService)`; endpoints come from the workloads.
pub fn service(s: XdsService) -> Result<Service, ConvertError> {
    let vips = s
        .addresses
        .iter()
        .map(|a| {
            Ok(NetworkAddress {
                network: a.network.clone(),
                address: ip("addresses", &a.address)?,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let load_balancer = match s.load_balancing {
        None => None,
        Some(lb) => Some(LoadBalancer {
            routing_preferences: lb
                .routing_preference
                .iter()
                .map(|&r| match r {
                    1 => Ok(LoadBalancerScope::Region),
                    2 => Ok(LoadBalancerScope::Zone),
                    3 => Ok(LoadBalancerScope::Subzone),
                    4 => Ok(LoadBalancerScope::Node),
                    5 => Ok(LoadBalancerScope::Cluster),
                    6 => Ok(LoadBalancerScope::Network),
                    v => Err(unknown("load_balancing.routing_preference", v)),
                })
                .collect::<Result<Vec<_>, _>>()?,
            mode: match lb.mode {
                0 => LoadBalancerMode::Standard,
                1 => LoadBalancerMode::Strict,
                2 => LoadBalancerMode::Failover,
                3 => LoadBalancerMode::Passthrough,
                v => return Err(unknown("load_balancing.mode", v)),
            },
            health_policy: match lb.health_policy {
                0 => LoadBalancerHealthPolicy::OnlyHealthy,
                1 => LoadBalancerHealthPolicy::AllowAll,
                v => return Err(unknown("load_balancing.health_policy", v)),
            },
        }),
    };
    let ip_families = match s.ip_families {
        0 => None,
        1 => Some(IpFamily::Ipv4),
        2 => Some(IpFamily::Ipv6),
        3 => Some(IpFamily::Dual),
        v => return Err(unknown("ip_families", v)),
    };
    Ok(Service {
        ports: ports("ports", &s.ports)?,
        waypoint: gateway("waypoint", s.waypoint)?,
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        vips,
        subject_alt_names: s.subject_alt_names,
        endpoints: Default::default(),
        load_balancer,
        ip_families,
        canonical: s.canonical,
    })
}

fn strings(list: &[XdsStringMatch]) -> Vec<StringMatch> {
    // ztunnel skips a matcher without a type.
    list.iter()
        .filter_map(|m| {
            Some(match m.match_type.as_ref()? {
                MatchType::Exact(s) => StringMatch::Exact(s.clone()),
                MatchType::Prefix(s) => StringMatch::Prefix(s.clone()),
                MatchType::Suffix(s) => StringMatch::Suffix(s.clone()),
                MatchType::Presence(()) => StringMatch::Presence,
            })
        })
        .collect()
}

fn cidrs(field: &'static str, list: &[XdsCidr]) -> Result<Vec<IpNet>, ConvertError> {
    list.iter()
        .map(|c| {
            let addr = ip(field, &c.address)?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            match u8::try_from(c.length) {
                Ok(len) if c.length <= max => Ok(IpNet {
                    addr,
                    prefix_len: len,
                }),
                _ => Err(ConvertError::Prefix {
                    field,
                    addr,
                    len: c.length,
                }),
            }
        })
        .collect()
}

fn match_ports(field: &'static str, list: &[u32]) -> Result<Vec<u16>, ConvertError> {
    list.iter().map(|&p| port(field, p)).collect()
}

fn policy_match(m: &AuthzMatch) -> Result<PolicyMatch, ConvertError> {
    let accounts = |list: &[super::proto::XdsServiceAccountMatch]| {
        list.iter()
            .map(|a| ServiceAccountMatch {
                namespace: a.namespace.clone(),
                service_account: a.service_account.clone(),
            })
            .collect()
    };
    Ok(PolicyMatch {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: cidrs("source_ips", &m.source_ips)?,
        not_source_ips: cidrs("not_source_ips", &m.not_source_ips)?,
        destination_ips: cidrs("destination_ips", &m.destination_ips)?,
        not_destination_ips: cidrs("not_destination_ips", &m.not_destination_ips)?,
        destination_ports: match_ports("destination_ports", &m.destination_ports)?,
        not_destination_ports: match_ports("not_destination_ports", &m.not_destination_ports)?,
    })
}

/// ztunnel's `Authorization::try_from(XdsRbac)`.
pub fn policy(a: Authorization) -> Result<Policy, ConvertError> {
    let scope = match a.scope {
        0 => PolicyScope::Global,
        1 => PolicyScope::Namespace,
        2 => PolicyScope::WorkloadSelector,
        v => return Err(unknown("scope", v)),
    };
    let action = match a.action {
        0 => PolicyAction::Allow,
        1 => PolicyAction::Deny,
        v => return Err(unknown("action", v)),
    };
    let rules = a
        .rules
        .iter()
        .map(|r| {
            Ok(Rule {
                clauses: r
                    .clauses
                    .iter()
                    .map(|c| {
                        Ok(Clause {
                            matches: c
                                .matches
                                .iter()
                                .map(policy_match)
                                .collect::<Result<_, _>>()?,
                        })
                    })
                    .collect::<Result<_, ConvertError>>()?,
            })
        })
        .collect::<Result<_, ConvertError>>()?;
    Ok(Policy {
        name: a.name,
        namespace: a.namespace,
        scope,
        action,
        rules,
        dry_run: a.dry_run,
    })
}
