use super::*;
use std::str::FromStr;

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
