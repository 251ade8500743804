//! `/config_dump` on the admin port, in ztunnel's JSON shape so `istioctl ztunnel-config`
//! and other tools written for ztunnel read it: `workloads`, `services`, `policies`,
//! `certificates`, `config`, `staticConfig`, `stagedServices`, `version`, with ztunnel's keys
//! and ztunnel's rule for leaving empty ones out. What ringtun has that ztunnel lacks is under
//! `ringtun`.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use crate::exposition::rfc3339;

use crate::config::{
    ApplicationTunnelProtocol, GatewayAddress, GatewayDestination, HealthStatus, NetworkMode,
    Policy, PolicyMatch, Protocol, Service, StringMatch, Workload,
};
use crate::config::{ServiceEndpoint, Snapshot};
use crate::operate::prometheus::ProcessInfo;
use crate::xds::XdsStatus;

/// What `/config_dump` reports beside the config itself.
pub struct Facts {
    /// Our SPIFFE identity.
    pub identity: String,
    /// Unix time our certificate expires.
    pub not_after: i64,
    /// What the kernel can offload (its debug form), when HBONE connections try kTLS.
    pub ktls: Option<String>,
    /// Worker shards.
    pub shards: usize,
    /// Driver and draining, as `/metrics` reports them.
    pub info: ProcessInfo,
    /// ztunnel's `config` section: its keys, with ringtun's settings where one means the
    /// same (see [`ztunnel_config`]).
    pub config: Value,
    /// In-pod mode: ztunnel's `workloadState` (pod uid → state and info), built by the control
    /// side, which knows the pods; `None` leaves the key out, as ztunnel's dedicated mode does.
    pub workload_state: Option<Value>,
}

/// The JSON body of `/config_dump`.
pub fn render(snap: &Snapshot, facts: &Facts) -> String {
    // One pass over the workloads for every service's live endpoints (the workloads that name
    // it), not one per service: a mesh holds tens of thousands.
    let mut members: HashMap<String, Vec<&Workload>> = HashMap::new();
    for w in snap.workloads() {
        for key in w.services.keys() {
            members.entry(key.clone()).or_default().push(w);
        }
    }
    let workloads: Vec<Value> = snap.workloads().map(|w| workload(w, false)).collect();
    let services: Vec<Value> = snap
        .services()
        .map(|s| service(s, Some(members.get(&s.key()).map_or(&[][..], |v| &v[..]))))
        .collect();
    let policies: Vec<Value> = snap.policies().map(policy).collect();
    let mut ringtun = json!({
        "configGeneration": snap.generation,
        "shards": facts.shards,
        "driver": facts.info.driver,
        "ktls": facts.ktls,
        "draining": facts.info.draining,
    });
    // Only with istiod: ztunnel's dump has no such section, so it lives under ringtun's key.
    if let (Some(x), Some(map)) = (&facts.info.xds, ringtun.as_object_mut()) {
        map.insert("xds".into(), xds(x));
    }
    let mut dump = json!({
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "certificates": certificates(facts),
        "config": facts.config,
        "staticConfig": {
            "workloads": snap.workloads().map(|w| workload(w, true)).collect::<Vec<_>>(),
            "services": snap.services().map(|s| service(s, None)).collect::<Vec<_>>(),
            "policies": policies,
        },
        "stagedServices": {},
        "version": version(),
        "ringtun": ringtun,
    });
    if let (Some(state), Some(map)) = (&facts.workload_state, dump.as_object_mut()) {
        map.insert("workloadState".into(), state.clone());
    }
    dump.to_string()
}

/// ztunnel's `config` keys. `settings` holds those ringtun has a value for, under ztunnel's
/// key; the rest are `null`.
pub fn ztunnel_config(settings: Map<String, Value>) -> Value {
    const KEYS: [&str; 52] = [
        "adminAddr",
        "altCaHostname",
        "altXdsHostname",
        "caAddress",
        "caHeaders",
        "caRootCert",
        "clusterDomain",
        "clusterId",
        "connectionWindowSize",
        "crlPath",
        "dnsProxy",
        "dnsProxyAddr",
        "dnsResolverCfg",
        "dnsResolverOpts",
        "enableEnhancedBaggage",
        "fakeCa",
        "fakeSelfInbound",
        "frameSize",
        "illegalPorts",
        "inboundAddr",
        "inboundPlaintextAddr",
        "inpodPortReuse",
        "inpodUds",
        "ipv6Enabled",
        "localNode",
        "localhostAppTunnel",
        "network",
        "numWorkerThreads",
        "outboundAddr",
        "packetMark",
        "poolMaxStreamsPerConn",
        "poolUnusedReleaseTimeout",
        "preferedServiceNamespace",
        "proxy",
        "proxyArgs",
        "proxyMetadata",
        "proxyMode",
        "proxyWorkloadInformation",
        "readinessAddr",
        "requireOriginalSource",
        "secretTtl",
        "selfTerminationDeadline",
        "socketConfig",
        "socks5Addr",
        "statsAddr",
        "windowSize",
        "xdsAddress",
        "xdsHeaders",
        "xdsOnDemand",
        "xdsRootCert",
        "ztunnelIdentity",
        "ztunnelWorkload",
    ];
    let mut out = Map::new();
    for k in KEYS {
        out.insert(
            k.to_owned(),
            settings.get(k).cloned().unwrap_or(Value::Null),
        );
    }
    Value::Object(out)
}

/// A duration as ztunnel's config shows one.
pub fn duration(d: std::time::Duration) -> Value {
    json!({"secs": d.as_secs(), "nanos": d.subsec_nanos()})
}

/// Inserts `key: value` unless `value` is its type's default, as ztunnel's
/// `skip_serializing_if = "is_default"` does.
fn put_nonempty(m: &mut Map<String, Value>, key: &str, value: Value) {
    let empty = match &value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_u64() == Some(0),
    };
    if !empty {
        m.insert(key.to_owned(), value);
    }
}

fn gateway(g: &GatewayAddress) -> Value {
    let destination = match &g.destination {
        GatewayDestination::Address(a) => json!({"address": a.to_string()}),
        GatewayDestination::Hostname(h) => json!({"hostname": h.to_string()}),
    };
    json!({"destination": destination, "hboneMtlsPort": g.hbone_mtls_port})
}

/// A workload as ztunnel serializes one; `with_services`: with its `services` map (ztunnel
/// shows it in `staticConfig` only, always: its live workloads hold services as endpoints).
fn workload(w: &Workload, with_services: bool) -> Value {
    let mut m = Map::new();
    m.insert(
        "workloadIps".into(),
        json!(w
            .workload_ips
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()),
    );
    put_nonempty(
        &mut m,
        "waypoint",
        w.waypoint.as_ref().map_or(Value::Null, gateway),
    );
    put_nonempty(
        &mut m,
        "networkGateway",
        w.network_gateway.as_ref().map_or(Value::Null, gateway),
    );
    let protocol = match w.protocol {
        Protocol::Hbone => "HBONE",
        Protocol::Tcp => "TCP",
    };
    m.insert("protocol".into(), json!(protocol));
    let mode = match w.network_mode {
        NetworkMode::Standard => "Standard",
        NetworkMode::HostNetwork => "HostNetwork",
    };
    m.insert("networkMode".into(), json!(mode));
    put_nonempty(&mut m, "uid", json!(w.uid));
    m.insert("name".into(), json!(w.name));
    m.insert("namespace".into(), json!(w.namespace));
    put_nonempty(&mut m, "trustDomain", json!(w.trust_domain));
    put_nonempty(&mut m, "serviceAccount", json!(w.service_account));
    put_nonempty(&mut m, "network", json!(w.network));
    put_nonempty(&mut m, "workloadName", json!(w.workload_name));
    put_nonempty(&mut m, "workloadType", json!(w.workload_type));
    put_nonempty(&mut m, "canonicalName", json!(w.canonical_name));
    put_nonempty(&mut m, "canonicalRevision", json!(w.canonical_revision));
    put_nonempty(&mut m, "hostname", json!(w.hostname));
    put_nonempty(&mut m, "node", json!(w.node));
    put_nonempty(&mut m, "nativeTunnel", json!(w.native_tunnel));
    if let Some(t) = &w.application_tunnel {
        let protocol = match t.protocol {
            ApplicationTunnelProtocol::None => "NONE",
            ApplicationTunnelProtocol::Proxy => "PROXY",
        };
        m.insert(
            "applicationTunnel".into(),
            json!({"protocol": protocol, "port": t.port}),
        );
    }
    put_nonempty(
        &mut m,
        "authorizationPolicies",
        json!(w.authorization_policies),
    );
    m.insert("status".into(), json!(health(w.status)));
    m.insert("clusterId".into(), json!(w.cluster_id));
    let l = &w.locality;
    let mut locality = Map::new();
    put_nonempty(&mut locality, "region", json!(l.region));
    put_nonempty(&mut locality, "zone", json!(l.zone));
    put_nonempty(&mut locality, "subzone", json!(l.subzone));
    if !locality.is_empty() {
        // ztunnel writes all three once any is set.
        m.insert(
            "locality".into(),
            json!({"region": l.region, "zone": l.zone, "subzone": l.subzone}),
        );
    }
    if with_services {
        let services: Map<String, Value> = w
            .services
            .iter()
            .map(|(k, ports)| (k.clone(), json!(ports)))
            .collect();
        // The file's form always has the key (ztunnel's local config requires it).
        m.insert("services".into(), Value::Object(services));
    }
    m.insert("capacity".into(), json!(w.capacity));
    Value::Object(m)
}

fn health(s: HealthStatus) -> &'static str {
    match s {
        HealthStatus::Healthy => "Healthy",
        HealthStatus::Unhealthy => "Unhealthy",
    }
}

fn endpoint(uid: &str, e: &ServiceEndpoint) -> Value {
    json!({"workloadUid": uid, "port": e.port, "status": health(e.status)})
}

/// A service as ztunnel serializes one; `workloads`: the live view, whose endpoints are the
/// workloads that name the service (`None`: the config file's, with its own endpoints only).
fn service(s: &Service, workloads: Option<&[&Workload]>) -> Value {
    let mut endpoints: Map<String, Value> = s
        .endpoints
        .iter()
        .map(|(uid, e)| (uid.clone(), endpoint(uid, e)))
        .collect();
    let key = s.key();
    for w in workloads.unwrap_or_default() {
        if let Some(ports) = w.services.get(&key) {
            endpoints.insert(
                w.uid.clone(),
                json!({"workloadUid": w.uid, "port": ports, "status": health(w.status)}),
            );
        }
    }
    let mut m = Map::new();
    m.insert("name".into(), json!(s.name));
    m.insert("namespace".into(), json!(s.namespace));
    m.insert("hostname".into(), json!(s.hostname));
    m.insert(
        "vips".into(),
        json!(s.vips.iter().map(|v| v.to_string()).collect::<Vec<_>>()),
    );
    m.insert("ports".into(), json!(s.ports));
    m.insert("endpoints".into(), Value::Object(endpoints));
    m.insert("subjectAltNames".into(), json!(s.subject_alt_names));
    put_nonempty(
        &mut m,
        "waypoint",
        s.waypoint.as_ref().map_or(Value::Null, gateway),
    );
    if let Some(lb) = &s.load_balancer {
        m.insert(
            "loadBalancer".into(),
            json!({
                "mode": format!("{:?}", lb.mode),
                "routingPreferences": lb
                    .routing_preferences
                    .iter()
                    .map(|p| format!("{p:?}"))
                    .collect::<Vec<_>>(),
                "healthPolicy": format!("{:?}", lb.health_policy),
            }),
        );
    }
    if let Some(f) = &s.ip_families {
        m.insert("ipFamilies".into(), json!(format!("{f:?}")));
    }
    m.insert("canonical".into(), json!(s.canonical));
    // ringtun serves every service to every client, as ztunnel's default visibility.
    m.insert("visibility".into(), json!("Public"));
    Value::Object(m)
}

fn string_matches(v: &[StringMatch]) -> Value {
    v.iter()
        .map(|m| match m {
            StringMatch::Exact(s) => json!({"Exact": s}),
            StringMatch::Prefix(s) => json!({"Prefix": s}),
            StringMatch::Suffix(s) => json!({"Suffix": s}),
            StringMatch::Presence => json!({"Presence": []}),
        })
        .collect()
}

fn policy_match(pm: &PolicyMatch) -> Value {
    let nets =
        |v: &[crate::config::IpNet]| json!(v.iter().map(|n| n.to_string()).collect::<Vec<_>>());
    let sas = |v: &[crate::config::ServiceAccountMatch]| {
        json!(v
            .iter()
            .map(|s| json!({"namespace": s.namespace, "serviceAccount": s.service_account}))
            .collect::<Vec<_>>())
    };
    let mut m = Map::new();
    put_nonempty(&mut m, "namespaces", string_matches(&pm.namespaces));
    put_nonempty(&mut m, "notNamespaces", string_matches(&pm.not_namespaces));
    put_nonempty(&mut m, "serviceAccounts", sas(&pm.service_accounts));
    put_nonempty(&mut m, "notServiceAccounts", sas(&pm.not_service_accounts));
    put_nonempty(&mut m, "principals", string_matches(&pm.principals));
    put_nonempty(&mut m, "notPrincipals", string_matches(&pm.not_principals));
    put_nonempty(&mut m, "sourceIps", nets(&pm.source_ips));
    put_nonempty(&mut m, "notSourceIps", nets(&pm.not_source_ips));
    put_nonempty(&mut m, "destinationIps", nets(&pm.destination_ips));
    put_nonempty(&mut m, "notDestinationIps", nets(&pm.not_destination_ips));
    put_nonempty(&mut m, "destinationPorts", json!(pm.destination_ports));
    put_nonempty(
        &mut m,
        "notDestinationPorts",
        json!(pm.not_destination_ports),
    );
    Value::Object(m)
}

/// A policy as ztunnel serializes one: `rules` nested rule → clause → match.
fn policy(p: &Policy) -> Value {
    let rules: Vec<Value> = p
        .rules
        .iter()
        .map(|r| {
            json!(r
                .clauses
                .iter()
                .map(|c| json!(c.matches.iter().map(policy_match).collect::<Vec<_>>()))
                .collect::<Vec<_>>())
        })
        .collect();
    json!({
        "name": p.name,
        "namespace": p.namespace,
        "scope": format!("{:?}", p.scope),
        "action": format!("{:?}", p.action),
        "rules": rules,
        "dryRun": p.dry_run,
    })
}

/// Our certificate in ztunnel's `certificates` shape, from what ringtun keeps of it: the
/// identity and when it expires.
/// Every identity's certificate (state, chain with serial and validity, roots) as ztunnel shows
/// them, or the proxy's own from its facts when no list was given.
fn certificates(facts: &Facts) -> Value {
    let list = &facts.info.certs.certificates;
    if list.is_empty() {
        return json!([certificate(&facts.identity, facts.not_after)]);
    }
    list.iter().map(crate::tls::CertStatus::to_json).collect()
}

fn certificate(identity: &str, not_after: i64) -> Value {
    json!({
        "identity": identity,
        "state": "Available",
        "certChain": [{"expirationTime": rfc3339(not_after)}],
        "rootCerts": [],
    })
}

/// The xDS client's state: the stream, and per type URL what is held, the last version ACKed
/// and the last NACK.
fn xds(x: &XdsStatus) -> Value {
    let types: Map<String, Value> = x
        .types
        .iter()
        .map(|(url, t)| {
            let nack = t.last_nack.as_ref().map(|n| {
                json!({
                    "nonce": n.nonce,
                    "resources": n.resources,
                    "error": n.error,
                    "time": n.at.map(unix_time),
                })
            });
            let v = json!({
                "resources": t.resources,
                "ackedVersion": t.acked_version,
                "ackedNonce": t.acked_nonce,
                "messages": t.messages,
                "acks": t.acks,
                "nacks": t.nacks,
                "lastNack": nack,
            });
            (url.clone(), v)
        })
        .collect();
    let terminations: Map<String, Value> = x
        .terminations
        .iter()
        .map(|(why, n)| (why.label().to_owned(), json!(n)))
        .collect();
    json!({
        "address": x.address,
        "connected": x.is_connected(),
        "connectedSince": x.connected_since.map(unix_time),
        "reconnects": x.reconnects,
        "terminations": terminations,
        "types": types,
    })
}

fn unix_time(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(i64::try_from(secs).unwrap_or(i64::MAX))
}

/// ztunnel's `version` section, with ringtun's version.
fn version() -> Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "gitRevision": "unknown",
        "rustVersion": "unknown",
        "buildProfile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "buildStatus": "unknown",
        "istioVersion": "unknown",
        "cryptoProvider": "aws-lc-rs",
    })
}

#[cfg(test)]
mod tests;
