//! SPIFFE identities as Istio uses them.

use std::fmt;

use crate::HboneError;

/// A workload identity: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
///
/// Istio's trust domain may be empty (ztunnel's test certificates use `spiffe:///ns/x/sa/y`), so an
/// empty trust domain is valid here too.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// Trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes service account.
    pub service_account: String,
}

const SCHEME: &str = "spiffe://";

impl Identity {
    /// Builds an identity from its parts.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// Parses `spiffe://td/ns/<ns>/sa/<sa>`; anything else (other paths, query, fragment) is refused.
    pub fn parse(uri: &str) -> Result<Self, HboneError> {
        let bad = |why| HboneError::InvalidIdentity {
            uri: uri.chars().take(256).collect(),
            why,
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("not a spiffe:// URI"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| bad("no path"))?;
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad("path is not /ns/<namespace>/sa/<service account>"));
        };
        if ns.is_empty() || sa.is_empty() {
            return Err(bad("empty namespace or service account"));
        }
        let valid = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        };
        if !valid(td) {
            return Err(bad("trust domain has characters outside [A-Za-z0-9._-]"));
        }
        if !valid(ns) || !valid(sa) {
            return Err(bad(
                "namespace or service account has characters outside [A-Za-z0-9._-]",
            ));
        }
        Ok(Identity::new(td, ns, sa))
    }

    /// The URI's text in pieces, in order: what `Display` writes, for writers that append
    /// strings without the formatter (the access log writes two identities a line).
    pub fn pieces(&self) -> [&str; 6] {
        [
            SCHEME,
            &self.trust_domain,
            "/ns/",
            &self.namespace,
            "/sa/",
            &self.service_account,
        ]
    }

    /// Whether a SAN string (as in a service's `subjectAltNames`) names this identity.
    pub fn matches_uri(&self, uri: &str) -> bool {
        Identity::parse(uri).is_ok_and(|other| &other == self)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.pieces().iter().try_for_each(|p| f.write_str(p))
    }
}

impl std::str::FromStr for Identity {
    type Err = HboneError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Identity::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_istio_identities() {
        let id = Identity::parse("spiffe://cluster.local/ns/default/sa/server").unwrap();
        assert_eq!(id, Identity::new("cluster.local", "default", "server"));
        let empty_td = Identity::parse("spiffe:///ns/default/sa/client").unwrap();
        assert_eq!(empty_td.trust_domain, "");
        assert_eq!(empty_td.to_string(), "spiffe:///ns/default/sa/client");
    }

    #[test]
    fn refuses_other_shapes() {
        for bad in [
            "",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://td/ns/a/sa/b#frag",
        ] {
            assert!(Identity::parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(td in "[a-z0-9.-]{0,20}", ns in "[a-z0-9-]{1,20}", sa in "[a-z0-9_.-]{1,20}") {
            let id = Identity::new(&td, &ns, &sa);
            prop_assert_eq!(Identity::parse(&id.to_string()).unwrap(), id);
        }

        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = Identity::parse(&s);
        }
    }
}
