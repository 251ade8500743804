//! The conversion and the session, on messages built here.

use prost::Message;

use super::convert::{self, ConvertError, Converted};
use super::proto::*;
use super::session::{Session, ADDRESS_TYPE, AUTHORIZATION_TYPE};
use crate::config::{HealthStatus, PolicyAction, PolicyScope, Protocol, Snapshot, StringMatch};

fn xds_workload(uid: &str, ip: [u8; 4]) -> XdsWorkload {
    XdsWorkload {
        uid: uid.into(),
        name: "server".into(),
        namespace: "default".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: 1,
        services: [(
            "default/server.default.svc.cluster.local".to_owned(),
            PortList {
                ports: vec![Port {
                    service_port: 80,
                    target_port: 5201,
                }],
            },
        )]
        .into(),
        ..Default::default()
    }
}

fn xds_service() -> XdsService {
    XdsService {
        name: "server".into(),
        namespace: "default".into(),
        hostname: "server.default.svc.cluster.local".into(),
        addresses: vec![XdsNetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 10],
        }],
        ports: vec![Port {
            service_port: 80,
            target_port: 5201,
        }],
        ..Default::default()
    }
}

fn address_resource(name: &str, a: AddressType) -> Resource {
    Resource {
        name: name.into(),
        version: "v1".into(),
        resource: Some(Any {
            type_url: ADDRESS_TYPE.into(),
            value: Address { r#type: Some(a) }.encode_to_vec(),
        }),
        ..Default::default()
    }
}

fn deny_9999() -> Authorization {
    Authorization {
        name: "deny".into(),
        namespace: "default".into(),
        scope: 1,
        action: 1,
        rules: vec![AuthzRule {
            clauses: vec![AuthzClause {
                matches: vec![AuthzMatch {
                    destination_ports: vec![9999],
                    principals: vec![
                        XdsStringMatch {
                            match_type: Some(MatchType::Prefix("cluster.local/".into())),
                        },
                        XdsStringMatch { match_type: None },
                    ],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    }
}

fn response(
    type_url: &str,
    nonce: &str,
    resources: Vec<Resource>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: nonce.into(),
        resources,
        removed_resources: removed.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

#[test]
fn a_workload_takes_ztunnels_xds_defaults() {
    let w = convert::workload(xds_workload("uid-1", [10, 77, 0, 2])).expect("converts");
    assert_eq!(w.service_account, "default");
    assert_eq!(w.trust_domain.as_deref(), Some("cluster.local"));
    assert_eq!(w.cluster_id, "Kubernetes");
    assert_eq!(w.workload_type, "deployment");
    assert_eq!(w.capacity, 1);
    assert_eq!(w.protocol, Protocol::Hbone);
    assert_eq!(w.status, HealthStatus::Healthy);
    assert_eq!(
        w.workload_ips,
        vec!["10.77.0.2".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        w.services["default/server.default.svc.cluster.local"][&80],
        5201
    );
}

#[test]
fn malformed_values_are_refused_with_a_reason() {
    let mut w = xds_workload("uid-1", [10, 77, 0, 2]);
    w.addresses = vec![vec![1, 2, 3, 4, 5]];
    assert_eq!(
        convert::workload(w),
        Err(ConvertError::AddressBytes {
            field: "addresses",
            len: 5
        })
    );
    let mut w = xds_workload("uid-1", [10, 77, 0, 2]);
    w.tunnel_protocol = 7;
    assert!(matches!(
        convert::workload(w),
        Err(ConvertError::Enum { value: 7, .. })
    ));
    let mut w = xds_workload("uid-1", [10, 77, 0, 2]);
    w.services.insert("no-slash".into(), PortList::default());
    assert!(matches!(
        convert::workload(w),
        Err(ConvertError::ServiceKey(_))
    ));
    let mut s = xds_service();
    s.ports[0].target_port = 70_000;
    assert!(matches!(
        convert::service(s),
        Err(ConvertError::Port { value: 70_000, .. })
    ));
    let mut p = deny_9999();
    p.rules[0].clauses[0].matches[0].source_ips = vec![XdsCidr {
        address: vec![10, 0, 0, 0],
        length: 33,
    }];
    assert!(matches!(
        convert::policy(p),
        Err(ConvertError::Prefix { len: 33, .. })
    ));
    assert!(matches!(
        convert::address(&[0xff, 0xff]),
        Err(ConvertError::Decode(_))
    ));
    assert_eq!(convert::address(&[]), Err(ConvertError::UnknownAddressType));
}

#[test]
fn a_policy_keeps_its_rules_and_skips_untyped_matchers() {
    let p = convert::policy(deny_9999()).expect("converts");
    assert_eq!(p.key(), "default/deny");
    assert_eq!(p.scope, PolicyScope::Namespace);
    assert_eq!(p.action, PolicyAction::Deny);
    let m = &p.rules[0].clauses[0].matches[0];
    assert_eq!(m.destination_ports, vec![9999]);
    assert_eq!(
        m.principals,
        vec![StringMatch::Prefix("cluster.local/".into())]
    );
}

#[test]
fn the_first_requests_subscribe_both_types_with_the_node() {
    let node = super::NodeInfo {
        ip: Some("10.77.0.1".into()),
        pod_name: "client".into(),
        pod_namespace: "default".into(),
        ..Default::default()
    }
    .node();
    assert_eq!(
        node.id,
        "ztunnel~10.77.0.1~client.default~default.svc.cluster.local"
    );
    let s = Session::new(node.clone());
    let reqs = s.initial_requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].type_url, ADDRESS_TYPE);
    assert_eq!(reqs[1].type_url, AUTHORIZATION_TYPE);
    for r in &reqs {
        assert_eq!(r.node.as_ref(), Some(&node));
        assert!(r.resource_names_subscribe.is_empty(), "wildcard");
        assert!(r.initial_resource_versions.is_empty(), "nothing held yet");
    }
}

#[test]
fn responses_are_acked_applied_and_resubscribed() {
    let mut s = Session::new(Node::default());
    let h = s.handle(response(
        ADDRESS_TYPE,
        "n1",
        vec![
            address_resource(
                "uid-1",
                AddressType::Workload(xds_workload("uid-1", [10, 77, 0, 2])),
            ),
            address_resource(
                "default/server.default.svc.cluster.local",
                AddressType::Service(xds_service()),
            ),
        ],
        &[],
    ));
    assert_eq!(h.reply.response_nonce, "n1");
    assert_eq!(h.reply.type_url, ADDRESS_TYPE);
    assert!(h.nack().is_none());
    assert!(h.changed && !h.synced_now && !s.synced());
    let auth = Resource {
        name: "default/deny".into(),
        version: "p1".into(),
        resource: Some(Any {
            type_url: AUTHORIZATION_TYPE.into(),
            value: deny_9999().encode_to_vec(),
        }),
        ..Default::default()
    };
    let h = s.handle(response(AUTHORIZATION_TYPE, "n2", vec![auth], &[]));
    assert!(h.synced_now && s.synced());

    let snap = Snapshot::new(s.config(), 2);
    let svc = snap
        .service_by_vip("10.96.0.10".parse().unwrap())
        .expect("the service by its VIP");
    let eps = snap.endpoints(svc, 80);
    assert_eq!(eps.len(), 1, "the workload is the service's endpoint");

    // The same resource again changes nothing; a reconnect names what is held.
    let h = s.handle(response(
        ADDRESS_TYPE,
        "n3",
        vec![address_resource(
            "uid-1",
            AddressType::Workload(xds_workload("uid-1", [10, 77, 0, 2])),
        )],
        &[],
    ));
    assert!(!h.changed);
    let again = s.initial_requests();
    assert_eq!(
        again[0]
            .initial_resource_versions
            .keys()
            .collect::<Vec<_>>(),
        vec!["default/server.default.svc.cluster.local", "uid-1"]
    );
    assert_eq!(again[1].initial_resource_versions["default/deny"], "p1");

    // A removal applies.
    let h = s.handle(response(ADDRESS_TYPE, "n4", vec![], &["uid-1"]));
    assert!(h.changed);
    assert_eq!(s.counts(), (0, 1, 1));
}

#[test]
fn a_bad_resource_is_nacked_by_name_and_the_rest_applies() {
    let mut s = Session::new(Node::default());
    s.handle(response(
        ADDRESS_TYPE,
        "n1",
        vec![address_resource(
            "uid-1",
            AddressType::Workload(xds_workload("uid-1", [10, 77, 0, 2])),
        )],
        &[],
    ));
    let mut bad = xds_workload("uid-1", [10, 77, 0, 9]);
    bad.addresses.push(vec![1, 2, 3]);
    let garbage = Resource {
        name: "garbage".into(),
        resource: Some(Any {
            type_url: ADDRESS_TYPE.into(),
            value: vec![0xff, 0xff],
        }),
        ..Default::default()
    };
    let h = s.handle(response(
        ADDRESS_TYPE,
        "n2",
        vec![
            address_resource("uid-1", AddressType::Workload(bad)),
            garbage,
            address_resource(
                "uid-2",
                AddressType::Workload(xds_workload("uid-2", [10, 77, 0, 3])),
            ),
        ],
        &[],
    ));
    let nack = h.nack().expect("a NACK");
    assert!(
        nack.contains("uid-1: addresses: an address of 3 bytes"),
        "{nack}"
    );
    assert!(nack.contains("garbage: decode"), "{nack}");
    assert!(!nack.contains("uid-2"), "{nack}");
    assert_eq!(h.reply.response_nonce, "n2");
    assert!(h.changed, "uid-2 applied");
    let config = s.config();
    let ips: Vec<String> = config
        .workloads
        .iter()
        .map(|w| w.workload_ips[0].to_string())
        .collect();
    assert_eq!(
        ips,
        vec!["10.77.0.2", "10.77.0.3"],
        "uid-1 keeps its last good version"
    );
    assert!(
        !s.synced(),
        "a NACKed response does not count towards readiness"
    );
}

#[test]
fn metadata_comes_from_istio_meta_variables() {
    let info = super::NodeInfo::default().with_env_metadata([
        ("ISTIO_META_CLUSTER_ID".to_owned(), "c1".to_owned()),
        (
            "ISTIO_METAJSON_LABELS".to_owned(),
            r#"{"app":"x"}"#.to_owned(),
        ),
        ("ISTIO_METAJSON_BAD".to_owned(), "{".to_owned()),
        ("OTHER".to_owned(), "y".to_owned()),
    ]);
    let node = info.node();
    assert_eq!(
        node.id, "ztunnel~1.1.1.1~.~.svc.cluster.local",
        "ztunnel's defaults"
    );
    let fields = node.metadata.expect("metadata").fields;
    assert_eq!(fields["CLUSTER_ID"], string_value("c1"));
    assert!(matches!(fields["LABELS"].kind, Some(Kind::StructValue(_))));
    assert!(!fields.contains_key("BAD") && !fields.contains_key("OTHER"));
    assert_eq!(fields["INSTANCE_IPS"], string_value("1.1.1.1"));
}

#[test]
fn converted_kinds() {
    let body = Address {
        r#type: Some(AddressType::Service(xds_service())),
    }
    .encode_to_vec();
    assert!(matches!(convert::address(&body), Ok(Converted::Service(_))));
}

/// XDS_ON_DEMAND as ztunnel: addresses subscribe to nothing, policies to everything; a demand
/// asks for `network/IP` alone; istiod's answer (the service named by its hostname, the IP an
/// alias) answers it and is applied; a new stream names the asked name (no version) among
/// what is held; an unknown IP is answered as removed and then forgotten.
#[test]
fn on_demand_subscribes_to_nothing_asks_by_ip_and_resubscribes_what_it_asked() {
    let mut s = Session::new(Node::default()).on_demand("");
    let reqs = s.initial_requests();
    assert_eq!(reqs[0].type_url, ADDRESS_TYPE);
    assert_eq!(reqs[0].resource_names_subscribe, ["*"]);
    assert_eq!(reqs[0].resource_names_unsubscribe, ["*"]);
    assert_eq!(reqs[1].type_url, AUTHORIZATION_TYPE);
    assert!(
        reqs[1].resource_names_subscribe.is_empty(),
        "policies: wildcard"
    );
    assert!(reqs[1].resource_names_unsubscribe.is_empty());
    for (t, n) in [(ADDRESS_TYPE, "n1"), (AUTHORIZATION_TYPE, "n2")] {
        assert!(s.handle(response(t, n, vec![], &[])).nack().is_none());
    }
    assert!(s.synced(), "an empty first answer syncs, as in ztunnel");

    let vip: std::net::IpAddr = "10.96.0.10".parse().expect("ip");
    let unknown: std::net::IpAddr = "10.96.0.99".parse().expect("ip");
    let ask = s.demand(vip).expect("on");
    assert_eq!(ask.resource_names_subscribe, ["/10.96.0.10"]);
    assert!(ask.node.is_none() && ask.response_nonce.is_empty());
    s.demand(unknown);
    let mut svc = address_resource(
        "default/server.default.svc.cluster.local",
        AddressType::Service(xds_service()),
    );
    svc.aliases = vec!["/10.96.0.10".into()];
    let h = s.handle(response(ADDRESS_TYPE, "n3", vec![svc], &[]));
    assert_eq!(h.answered, [vip]);
    assert_eq!(h.delta.services.len(), 1);
    let h = s.handle(response(ADDRESS_TYPE, "n4", vec![], &["/10.96.0.99"]));
    assert_eq!(h.answered, [unknown]);
    assert!(h.delta.is_empty());
    let policy = s.handle(response(AUTHORIZATION_TYPE, "n5", vec![], &["/10.96.0.10"]));
    assert!(policy.answered.is_empty(), "only addresses answer demands");

    let again = s.initial_requests();
    let held = &again[0].initial_resource_versions;
    assert_eq!(held["default/server.default.svc.cluster.local"], "v1");
    assert_eq!(held["/10.96.0.10"], "", "asked for: resubscribed");
    assert!(!held.contains_key("/10.96.0.99"), "not found: forgotten");
    assert_eq!(again[0].resource_names_subscribe, ["*"]);

    let off = Session::new(Node::default()).demand(vip);
    assert!(off.is_none(), "off: nothing is asked");
}
