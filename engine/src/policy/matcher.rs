//! Whether one policy matches one connection: ztunnel's `Authorization::matches`
//! (`src/rbac.rs`), without allocating.

use super::model::Connection;
use crate::config::{Policy, PolicyMatch, ServiceAccountMatch, StringMatch};
use ringtun_hbone::Identity;
use std::net::IpAddr;

/// The connection's attributes in the shape matching needs, computed once per evaluation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Subject<'a> {
    identity: Option<&'a Identity>,
    /// Source namespace; `""` without an identity (ztunnel's `unwrap_or_default()`).
    namespace: &'a str,
    src_ip: IpAddr,
    dst_ip: IpAddr,
    dst_port: u16,
}

impl<'a> Subject<'a> {
    /// IPv4-mapped IPv6 addresses are matched in their IPv4 form, as ztunnel's
    /// listeners canonicalize the socket addresses before authorizing.
    pub(crate) fn new(conn: &Connection<'a>) -> Self {
        Subject {
            identity: conn.src_identity,
            namespace: conn.src_identity.map_or("", |i| i.namespace.as_str()),
            src_ip: conn.src_ip.to_canonical(),
            dst_ip: conn.dst_ip.to_canonical(),
            dst_port: conn.dst_port,
        }
    }
}

/// ANY rule matches; an empty rule list matches nothing ("allow nothing" / no-op deny).
pub(crate) fn policy_matches(policy: &Policy, s: &Subject<'_>) -> bool {
    policy.rules.iter().any(|rule| {
        // ALL clauses; a rule without clauses matches everything.
        rule.clauses.iter().all(|clause| {
            // ANY match; an empty clause matches everything, an empty match nothing.
            clause.matches.is_empty()
                || clause
                    .matches
                    .iter()
                    .any(|m| !m.is_empty() && match_matches(m, s))
        })
    })
}

/// Every field pair must pass: a non-empty positive list needs ANY entry to match, and
/// no entry of the negative list may match.
fn match_matches(m: &PolicyMatch, s: &Subject<'_>) -> bool {
    field(&m.destination_ips, &m.not_destination_ips, |n| {
        n.contains(s.dst_ip)
    }) && field(&m.source_ips, &m.not_source_ips, |n| n.contains(s.src_ip))
        && field(&m.destination_ports, &m.not_destination_ports, |&p| {
            p == s.dst_port
        })
        && field(&m.service_accounts, &m.not_service_accounts, |sa| {
            service_account_matches(sa, s.identity)
        })
        && field(&m.principals, &m.not_principals, |p| {
            s.identity.is_some_and(|id| Principal::of(id).matches(p))
        })
        && field(&m.namespaces, &m.not_namespaces, |n| n.matches(s.namespace))
}

fn field<T>(positive: &[T], negative: &[T], pred: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&pred)) && !negative.iter().any(&pred)
}

/// Namespace and service account must both be equal; the trust domain is not compared;
/// no identity never matches.
fn service_account_matches(sa: &ServiceAccountMatch, id: Option<&Identity>) -> bool {
    id.is_some_and(|id| id.namespace == sa.namespace && id.service_account == sa.service_account)
}

/// The principal ztunnel matches against: the identity URI without `spiffe://`, i.e.
/// `td/ns/<ns>/sa/<sa>`, kept as borrowed parts so matching does not allocate.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Principal<'a>([&'a str; 5]);

impl<'a> Principal<'a> {
    pub(crate) fn of(id: &'a Identity) -> Self {
        Principal([
            &id.trust_domain,
            "/ns/",
            &id.namespace,
            "/sa/",
            &id.service_account,
        ])
    }

    fn len(&self) -> usize {
        self.0.iter().map(|p| p.len()).sum()
    }

    fn starts_with(&self, prefix: &str) -> bool {
        let mut rest = prefix.as_bytes();
        for part in self.0.iter().map(|p| p.as_bytes()) {
            if rest.len() <= part.len() {
                return part.starts_with(rest);
            }
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        }
        rest.is_empty()
    }

    fn ends_with(&self, suffix: &str) -> bool {
        let mut rest = suffix.as_bytes();
        for part in self.0.iter().rev().map(|p| p.as_bytes()) {
            if rest.len() <= part.len() {
                return part.ends_with(rest);
            }
            match rest.strip_suffix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        }
        rest.is_empty()
    }

    /// ztunnel's `StringMatch::matches` applied to the principal string.
    pub(crate) fn matches(&self, m: &StringMatch) -> bool {
        match m {
            StringMatch::Exact(x) => self.len() == x.len() && self.starts_with(x),
            StringMatch::Prefix(x) => self.starts_with(x),
            StringMatch::Suffix(x) => self.ends_with(x),
            StringMatch::Presence => self.len() > 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(td: &str, ns: &str, sa: &str) -> Identity {
        Identity::new(td, ns, sa)
    }

    #[test]
    fn principal_is_uri_without_scheme() {
        let i = id("cluster.local", "default", "sleep");
        let p = Principal::of(&i);
        let full = "cluster.local/ns/default/sa/sleep";
        assert!(p.matches(&StringMatch::Exact(full.into())));
        assert!(!p.matches(&StringMatch::Exact(format!("spiffe://{full}"))));
        assert!(!p.matches(&StringMatch::Exact(format!("{full}x"))));
        assert!(!p.matches(&StringMatch::Exact(
            "cluster.local/ns/default/sa/slee".into()
        )));
        assert!(p.matches(&StringMatch::Prefix("cluster.local/ns/def".into())));
        assert!(p.matches(&StringMatch::Prefix(String::new())));
        assert!(p.matches(&StringMatch::Prefix(full.into())));
        assert!(!p.matches(&StringMatch::Prefix(format!("{full}/"))));
        assert!(p.matches(&StringMatch::Suffix("/sa/sleep".into())));
        assert!(p.matches(&StringMatch::Suffix("local/ns/default/sa/sleep".into())));
        assert!(!p.matches(&StringMatch::Suffix(format!("x{full}"))));
        assert!(p.matches(&StringMatch::Presence));
        // The empty trust domain ringtun accepts still yields "/ns/...".
        let e = id("", "a", "b");
        assert!(Principal::of(&e).matches(&StringMatch::Exact("/ns/a/sa/b".into())));
    }

    fn string_match() -> impl Strategy<Value = StringMatch> {
        let s = "[a-z/.]{0,12}|cluster\\.local/ns/[a-z]{0,3}(/sa/[a-z]{0,3})?";
        prop_oneof![
            s.prop_map(StringMatch::Exact),
            s.prop_map(StringMatch::Prefix),
            s.prop_map(StringMatch::Suffix),
            Just(StringMatch::Presence),
        ]
    }

    proptest! {
        /// The allocation-free principal equals ztunnel's string form minus `spiffe://`.
        #[test]
        fn principal_parts_equal_string(
            td in "[a-z.]{0,6}|cluster\\.local",
            ns in "[a-z]{1,3}",
            sa in "[a-z/]{1,3}",
            m in string_match(),
        ) {
            let i = id(&td, &ns, &sa);
            let s = i.to_string();
            let stripped = s.strip_prefix("spiffe://").unwrap_or_default();
            prop_assert_eq!(Principal::of(&i).matches(&m), m.matches(stripped));
        }
    }
}
