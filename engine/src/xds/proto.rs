//! The protobuf messages ringtun exchanges with istiod, written by hand with prost's derive and
//! the field numbers of their `.proto` files (no protoc, no build script):
//!
//! - Envoy's Delta ADS (`envoy.service.discovery.v3`, `envoy.config.core.v3.Node`) and
//!   `google.rpc.Status` (a NACK's detail);
//! - Istio's Workload API (`istio.workload`, `workload.proto`): the `Address` resource;
//! - Istio's L4 authorization (`istio.security`, `authorization.proto`);
//! - Istio's CA API (`istio.v1.auth`, `security/v1alpha1/ca.proto`).
//!
//! Only the fields a node proxy reads are declared; prost skips the others. Enums stay `i32`
//! on the wire so an unknown value reaches the conversion (and is NACKed) instead of failing
//! the whole response. Field docs are Istio's meaning in a few words.

use std::collections::BTreeMap;

pub use prost_types::{value::Kind, Any, ListValue, Struct, Value};

/// gRPC path of Delta ADS.
pub const DELTA_ADS_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// gRPC path of the Istio CA's `CreateCertificate`.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

// ---------------------------------------------------------------------------------------------
// envoy.config.core.v3 / envoy.service.discovery.v3 / google.rpc

/// `envoy.config.core.v3.Node`: who is asking.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Node {
    /// `ztunnel~IP~pod.ns~ns.svc.cluster.local`.
    #[prost(string, tag = "1")]
    pub id: String,
    /// Pod name, namespace, IPs, node name and `ISTIO_META_*`.
    #[prost(message, optional, tag = "3")]
    pub metadata: Option<Struct>,
}

/// `google.rpc.Status`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    /// gRPC code.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// Why.
    #[prost(string, tag = "2")]
    pub message: String,
}

/// `DeltaDiscoveryRequest`: a subscription change, an ACK or a NACK.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeltaDiscoveryRequest {
    /// Sent on the first request of each type on a stream.
    #[prost(message, optional, tag = "1")]
    pub node: Option<Node>,
    /// The resource type.
    #[prost(string, tag = "2")]
    pub type_url: String,
    /// Names to add to the subscription.
    #[prost(string, repeated, tag = "3")]
    pub resource_names_subscribe: Vec<String>,
    /// Names to drop from it.
    #[prost(string, repeated, tag = "4")]
    pub resource_names_unsubscribe: Vec<String>,
    /// On a new stream: what the client already holds (name → version).
    #[prost(btree_map = "string, string", tag = "5")]
    pub initial_resource_versions: BTreeMap<String, String>,
    /// The nonce of the response this ACKs or NACKs.
    #[prost(string, tag = "6")]
    pub response_nonce: String,
    /// Set on a NACK.
    #[prost(message, optional, tag = "7")]
    pub error_detail: Option<Status>,
}

/// `DeltaDiscoveryResponse`: resources added or changed, names removed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeltaDiscoveryResponse {
    /// For debugging only.
    #[prost(string, tag = "1")]
    pub system_version_info: String,
    /// Added or changed resources.
    #[prost(message, repeated, tag = "2")]
    pub resources: Vec<Resource>,
    /// Their type.
    #[prost(string, tag = "4")]
    pub type_url: String,
    /// What to ACK or NACK.
    #[prost(string, tag = "5")]
    pub nonce: String,
    /// Names of resources gone.
    #[prost(string, repeated, tag = "6")]
    pub removed_resources: Vec<String>,
}

/// One resource of a delta response.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    /// Its version.
    #[prost(string, tag = "1")]
    pub version: String,
    /// The resource itself.
    #[prost(message, optional, tag = "2")]
    pub resource: Option<Any>,
    /// Its name (a workload's uid, a service's `ns/hostname`, a policy's `ns/name`).
    #[prost(string, tag = "3")]
    pub name: String,
    /// Other names (`network/IP`).
    #[prost(string, repeated, tag = "4")]
    pub aliases: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// istio.workload

/// `Address`: a workload or a service.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Address {
    /// Which.
    #[prost(oneof = "AddressType", tags = "1, 2")]
    pub r#type: Option<AddressType>,
}

/// `Address.type`.
// Decoded once per resource and converted at once; boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum AddressType {
    /// A pod, VM, ….
    #[prost(message, tag = "1")]
    Workload(XdsWorkload),
    /// A service.
    #[prost(message, tag = "2")]
    Service(XdsService),
}

/// `istio.workload.Service`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct XdsService {
    /// Name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Namespace.
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// FQDN.
    #[prost(string, tag = "3")]
    pub hostname: String,
    /// VIPs.
    #[prost(message, repeated, tag = "4")]
    pub addresses: Vec<XdsNetworkAddress>,
    /// Ports.
    #[prost(message, repeated, tag = "5")]
    pub ports: Vec<Port>,
    /// SANs to verify instead of the workloads' identities.
    #[prost(string, repeated, tag = "6")]
    pub subject_alt_names: Vec<String>,
    /// Waypoint.
    #[prost(message, optional, tag = "7")]
    pub waypoint: Option<XdsGatewayAddress>,
    /// Endpoint selection.
    #[prost(message, optional, tag = "8")]
    pub load_balancing: Option<LoadBalancing>,
    /// `IPFamilies`.
    #[prost(int32, tag = "9")]
    pub ip_families: i32,
    /// Preferred in hostname lookups.
    #[prost(bool, tag = "11")]
    pub canonical: bool,
}

/// `LoadBalancing`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LoadBalancing {
    /// `Scope` values.
    #[prost(int32, repeated, tag = "1")]
    pub routing_preference: Vec<i32>,
    /// `Mode`.
    #[prost(int32, tag = "2")]
    pub mode: i32,
    /// `HealthPolicy`.
    #[prost(int32, tag = "3")]
    pub health_policy: i32,
}

/// `istio.workload.Workload`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct XdsWorkload {
    /// Name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Namespace.
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// Raw IPs (4 or 16 bytes each).
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub addresses: Vec<Vec<u8>>,
    /// Network.
    #[prost(string, tag = "4")]
    pub network: String,
    /// `TunnelProtocol`: 0 none, 1 HBONE.
    #[prost(int32, tag = "5")]
    pub tunnel_protocol: i32,
    /// Trust domain (empty: cluster.local).
    #[prost(string, tag = "6")]
    pub trust_domain: String,
    /// Service account (empty: default).
    #[prost(string, tag = "7")]
    pub service_account: String,
    /// Waypoint.
    #[prost(message, optional, tag = "8")]
    pub waypoint: Option<XdsGatewayAddress>,
    /// Node.
    #[prost(string, tag = "9")]
    pub node: String,
    /// Canonical name (telemetry).
    #[prost(string, tag = "10")]
    pub canonical_name: String,
    /// Canonical revision (telemetry).
    #[prost(string, tag = "11")]
    pub canonical_revision: String,
    /// `WorkloadType`.
    #[prost(int32, tag = "12")]
    pub workload_type: i32,
    /// Workload (deployment, …) name.
    #[prost(string, tag = "13")]
    pub workload_name: String,
    /// Speaks the tunnel protocol itself.
    #[prost(bool, tag = "14")]
    pub native_tunnel: bool,
    /// `WorkloadSelector` policies that select it (`ns/name`).
    #[prost(string, repeated, tag = "16")]
    pub authorization_policies: Vec<String>,
    /// `WorkloadStatus`.
    #[prost(int32, tag = "17")]
    pub status: i32,
    /// Cluster (empty: Kubernetes).
    #[prost(string, tag = "18")]
    pub cluster_id: String,
    /// East-west gateway.
    #[prost(message, optional, tag = "19")]
    pub network_gateway: Option<XdsGatewayAddress>,
    /// Globally unique id: the resource name.
    #[prost(string, tag = "20")]
    pub uid: String,
    /// Hostname (DNS-resolved workloads).
    #[prost(string, tag = "21")]
    pub hostname: String,
    /// `namespace/hostname` → the ports it serves for that service.
    #[prost(btree_map = "string, message", tag = "22")]
    pub services: BTreeMap<String, PortList>,
    /// Application tunnel.
    #[prost(message, optional, tag = "23")]
    pub application_tunnel: Option<XdsApplicationTunnel>,
    /// Locality.
    #[prost(message, optional, tag = "24")]
    pub locality: Option<XdsLocality>,
    /// `NetworkMode`.
    #[prost(int32, tag = "25")]
    pub network_mode: i32,
    /// Relative capacity (`google.protobuf.UInt32Value`; absent: 1).
    #[prost(message, optional, tag = "27")]
    pub capacity: Option<u32>,
}

/// `Locality`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct XdsLocality {
    /// Region.
    #[prost(string, tag = "1")]
    pub region: String,
    /// Zone.
    #[prost(string, tag = "2")]
    pub zone: String,
    /// Subzone.
    #[prost(string, tag = "3")]
    pub subzone: String,
}

/// `PortList`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PortList {
    /// Ports.
    #[prost(message, repeated, tag = "1")]
    pub ports: Vec<Port>,
}

/// `Port`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Port {
    /// Service (frontend) port.
    #[prost(uint32, tag = "1")]
    pub service_port: u32,
    /// Target (backend) port.
    #[prost(uint32, tag = "2")]
    pub target_port: u32,
}

/// `ApplicationTunnel`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct XdsApplicationTunnel {
    /// 0 none, 1 PROXY.
    #[prost(int32, tag = "1")]
    pub protocol: i32,
    /// Port after the last hop (0: unset).
    #[prost(uint32, tag = "2")]
    pub port: u32,
}

/// `GatewayAddress`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct XdsGatewayAddress {
    /// Where.
    #[prost(oneof = "GatewayDestination", tags = "1, 2")]
    pub destination: Option<GatewayDestination>,
    /// Its HBONE port.
    #[prost(uint32, tag = "3")]
    pub hbone_mtls_port: u32,
}

/// `GatewayAddress.destination`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum GatewayDestination {
    /// A service.
    #[prost(message, tag = "1")]
    Hostname(XdsNamespacedHostname),
    /// An address.
    #[prost(message, tag = "2")]
    Address(XdsNetworkAddress),
}

/// `NetworkAddress`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct XdsNetworkAddress {
    /// Network.
    #[prost(string, tag = "1")]
    pub network: String,
    /// Raw IP.
    #[prost(bytes = "vec", tag = "2")]
    pub address: Vec<u8>,
}

/// `NamespacedHostname`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct XdsNamespacedHostname {
    /// Namespace.
    #[prost(string, tag = "1")]
    pub namespace: String,
    /// Hostname.
    #[prost(string, tag = "2")]
    pub hostname: String,
}

// ---------------------------------------------------------------------------------------------
// istio.security

/// `Authorization`: one L4 policy.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Authorization {
    /// Name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Namespace.
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// `Scope`: 0 global, 1 namespace, 2 workload selector.
    #[prost(int32, tag = "3")]
    pub scope: i32,
    /// `Action`: 0 allow, 1 deny.
    #[prost(int32, tag = "4")]
    pub action: i32,
    /// Any rule matching applies the action (Istio calls them groups).
    #[prost(message, repeated, tag = "5")]
    pub rules: Vec<AuthzRule>,
    /// Log only.
    #[prost(bool, tag = "6")]
    pub dry_run: bool,
}

/// A rule: every clause must match.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthzRule {
    /// Clauses (Istio calls them rules).
    #[prost(message, repeated, tag = "1")]
    pub clauses: Vec<AuthzClause>,
}

/// A clause: any match may match.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthzClause {
    /// Matches.
    #[prost(message, repeated, tag = "2")]
    pub matches: Vec<AuthzMatch>,
}

/// `Match`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthzMatch {
    /// Source namespaces.
    #[prost(message, repeated, tag = "1")]
    pub namespaces: Vec<XdsStringMatch>,
    /// Not these.
    #[prost(message, repeated, tag = "2")]
    pub not_namespaces: Vec<XdsStringMatch>,
    /// Source principals (identity without `spiffe://`).
    #[prost(message, repeated, tag = "3")]
    pub principals: Vec<XdsStringMatch>,
    /// Not these.
    #[prost(message, repeated, tag = "4")]
    pub not_principals: Vec<XdsStringMatch>,
    /// Source CIDRs.
    #[prost(message, repeated, tag = "5")]
    pub source_ips: Vec<XdsCidr>,
    /// Not these.
    #[prost(message, repeated, tag = "6")]
    pub not_source_ips: Vec<XdsCidr>,
    /// Destination CIDRs.
    #[prost(message, repeated, tag = "7")]
    pub destination_ips: Vec<XdsCidr>,
    /// Not these.
    #[prost(message, repeated, tag = "8")]
    pub not_destination_ips: Vec<XdsCidr>,
    /// Destination ports.
    #[prost(uint32, repeated, tag = "9")]
    pub destination_ports: Vec<u32>,
    /// Not these.
    #[prost(uint32, repeated, tag = "10")]
    pub not_destination_ports: Vec<u32>,
    /// Source service accounts.
    #[prost(message, repeated, tag = "11")]
    pub service_accounts: Vec<XdsServiceAccountMatch>,
    /// Not these.
    #[prost(message, repeated, tag = "12")]
    pub not_service_accounts: Vec<XdsServiceAccountMatch>,
}

/// `Address` of a match: an IP and a prefix length.
#[derive(Clone, PartialEq, prost::Message)]
pub struct XdsCidr {
    /// Raw IP.
    #[prost(bytes = "vec", tag = "1")]
    pub address: Vec<u8>,
    /// Prefix length.
    #[prost(uint32, tag = "2")]
    pub length: u32,
}

/// `ServiceAccountMatch`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct XdsServiceAccountMatch {
    /// Namespace.
    #[prost(string, tag = "1")]
    pub namespace: String,
    /// Service account.
    #[prost(string, tag = "2")]
    pub service_account: String,
}

/// `StringMatch`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct XdsStringMatch {
    /// How.
    #[prost(oneof = "MatchType", tags = "1, 2, 3, 4")]
    pub match_type: Option<MatchType>,
}

/// `StringMatch.match_type`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum MatchType {
    /// Equal.
    #[prost(string, tag = "1")]
    Exact(String),
    /// Starts with.
    #[prost(string, tag = "2")]
    Prefix(String),
    /// Ends with.
    #[prost(string, tag = "3")]
    Suffix(String),
    /// Any non-empty value (`google.protobuf.Empty`).
    #[prost(message, tag = "4")]
    Presence(()),
}

// ---------------------------------------------------------------------------------------------
// istio.v1.auth

/// `IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM CSR.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested lifetime, seconds.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// E.g. `ImpersonatedIdentity` (node mode).
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<Struct>,
}

/// `IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM: the leaf first, the root(s) last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// A string `google.protobuf.Value`.
pub fn string_value(s: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}
