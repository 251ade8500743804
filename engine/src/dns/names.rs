//! The names a query may stand for, from the client's point of view, as ztunnel expands them
//! (its `dns::name_util` and `Store::get_aliases`/`to_kube_fqdns`/`get_wildcards`): the name
//! itself, its Kubernetes FQDN forms relative to the client's namespace, and the same for the
//! name with one of the client's search domains stripped. Pure functions over [`Name`].

use super::wire::Name;

/// One name to look up for a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alias {
    /// The name to look up.
    pub name: Name,
    /// The query name with a search domain stripped, when this alias came from it: the answer
    /// then is a CNAME from the query name to this one, and the addresses under this one.
    pub stripped: Option<Name>,
    /// Whether the name may be `<pod>.<subdomain>.<namespace>.svc.<domain>` (a pod of a
    /// headless service).
    pub pod_host: bool,
}

/// The cluster's domains: `cluster.local`, `svc.cluster.local`.
#[derive(Clone, Debug)]
pub struct Domains {
    /// The cluster domain (`CLUSTER_DOMAIN`, `cluster.local`).
    pub domain: Name,
    /// `svc.` + the cluster domain.
    pub svc: Name,
}

impl Domains {
    /// The domains of the cluster domain `domain` (dotted, e.g. `cluster.local`); `None` if it
    /// is not a valid name.
    pub fn new(domain: &str) -> Option<Domains> {
        let domain = Name::parse(domain)?;
        let svc = append(&Name::parse("svc")?, &domain)?;
        Some(Domains { domain, svc })
    }

    /// `<ns>.svc.<domain>`.
    pub fn namespaced(&self, namespace: &str) -> Option<Name> {
        append(&Name::parse(namespace)?, &self.svc)
    }

    /// ztunnel's search domains for a pod in `namespace` in shared mode (what Kubernetes
    /// writes into a pod's resolv.conf): `<ns>.svc.<domain>`, `svc.<domain>`, `<domain>`.
    pub fn search(&self, namespace: &str) -> Vec<Name> {
        let mut out: Vec<Name> = self.namespaced(namespace).into_iter().collect();
        out.push(self.svc.clone());
        out.push(self.domain.clone());
        out
    }

    /// `.svc.<domain>` as text without the trailing dot: a hostname ending so is a
    /// Kubernetes service's.
    pub fn cluster_local_suffix(&self) -> String {
        format!(".{}", self.svc.to_lookup().unwrap_or_default())
    }
}

/// `a` followed by `b`; `None` if the result would be too long.
pub fn append(a: &Name, b: &Name) -> Option<Name> {
    Name::from_labels(a.labels().iter().chain(b.labels()))
}

fn label_eq(a: &[u8], b: &[u8]) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Whether `name` ends with the labels of `domain` and has more labels than it.
pub fn has_domain(name: &Name, domain: &Name) -> bool {
    if is_wildcard(domain) || name.len() <= domain.len() {
        return false;
    }
    let skip = name.len() - domain.len();
    name.labels()[skip..]
        .iter()
        .zip(domain.labels())
        .all(|(a, b)| label_eq(a, b))
}

/// `name` without the labels of `domain`, if it ends with them and something is left.
pub fn trim_domain(name: &Name, domain: &Name) -> Option<Name> {
    if !has_domain(name, domain) {
        return None;
    }
    Name::from_labels(&name.labels()[..name.len() - domain.len()])
}

/// Whether the first label is `*`.
pub fn is_wildcard(name: &Name) -> bool {
    name.labels().first().is_some_and(|l| l.as_slice() == b"*")
}

/// The name, then `*.` with each leading label replaced in turn: `a.b.c` → `a.b.c`, `*.b.c`,
/// `*.c`.
pub fn wildcards(name: &Name) -> Vec<Name> {
    let mut out = vec![name.clone()];
    let labels = name.labels();
    for i in 1..labels.len() {
        let star: &[u8] = b"*";
        if let Some(w) =
            Name::from_labels(std::iter::once(star).chain(labels[i..].iter().map(|l| l.as_slice())))
        {
            out.push(w);
        }
    }
    out
}

/// The Kubernetes FQDNs `name` may be short for, from a client whose namespaced domain is
/// `namespaced` (`<ns>.svc.<domain>`), each with whether it is a pod host form.
pub fn kube_fqdns(name: &Name, namespaced: &Name, d: &Domains) -> Vec<(Name, bool)> {
    let svc = Name::parse("svc").unwrap_or_default();
    let mut out = Vec::new();
    let mut push = |base: &Name, pod: bool| {
        if let Some(n) = append(name, base) {
            out.push((n, pod));
        }
    };
    match name.len() {
        // <service>
        1 => push(namespaced, false),
        2 => {
            // <service>.<namespace>
            push(&d.svc, false);
            // <pod>.<subdomain>
            push(namespaced, true);
        }
        3 => {
            // <service>.<namespace>.svc
            if has_domain(name, &svc) {
                push(&d.domain, false);
            }
            // <pod>.<subdomain>.<namespace>
            push(&d.svc, true);
        }
        // <pod>.<subdomain>.<namespace>.svc
        4 if has_domain(name, &svc) => push(&d.domain, true),
        _ => {}
    }
    out
}

/// Every name the query `name` may stand for, for a client in `namespace`, first found first,
/// without repeats (ztunnel's order).
pub fn aliases(name: &Name, namespace: &str, d: &Domains) -> Vec<Alias> {
    let mut out: Vec<Alias> = Vec::new();
    let mut add = |a: Alias| {
        if !out.iter().any(|o| same_name(&o.name, &a.name)) {
            out.push(a);
        }
    };
    let pod_host = name.len() == 6;
    add(Alias {
        name: name.clone(),
        stripped: None,
        pod_host,
    });
    let Some(namespaced) = d.namespaced(namespace) else {
        return out;
    };
    for (fqdn, pod) in kube_fqdns(name, &namespaced, d) {
        add(Alias {
            name: fqdn,
            stripped: None,
            pod_host: pod,
        });
    }
    for search in d.search(namespace) {
        let Some(stripped) = trim_domain(name, &search) else {
            continue;
        };
        add(Alias {
            name: stripped.clone(),
            stripped: Some(stripped.clone()),
            pod_host,
        });
        for (fqdn, pod) in kube_fqdns(&stripped, &namespaced, d) {
            add(Alias {
                name: fqdn,
                stripped: Some(stripped.clone()),
                pod_host: pod,
            });
        }
    }
    out
}

/// Names compare without regard to ASCII case.
pub fn same_name(a: &Name, b: &Name) -> bool {
    a.len() == b.len()
        && a.labels()
            .iter()
            .zip(b.labels())
            .all(|(x, y)| label_eq(x, y))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    fn d() -> Domains {
        Domains::new("cluster.local").unwrap()
    }

    #[test]
    fn domains_trim_like_ztunnels_name_util() {
        let svc = n("svc.cluster.local");
        assert!(has_domain(&n("name.ns.svc.cluster.local"), &svc));
        assert!(!has_domain(&n("name.ns.a.different.domain"), &svc));
        assert!(!has_domain(&n("cluster.com"), &svc));
        assert_eq!(
            trim_domain(&n("name.ns.svc.cluster.local"), &svc),
            Some(n("name.ns"))
        );
        assert_eq!(trim_domain(&n("svc.cluster.local"), &svc), None);
        assert!(has_domain(&n("Name.NS.SVC.Cluster.Local"), &svc));
    }

    #[test]
    fn kube_fqdns_follow_ztunnels_cases() {
        let ns1 = n("ns1.svc.cluster.local");
        let cases: &[(&str, &[(&str, bool)])] = &[
            ("name", &[("name.ns1.svc.cluster.local", false)]),
            (
                "name.ns2",
                &[
                    ("name.ns2.svc.cluster.local", false),
                    ("name.ns2.ns1.svc.cluster.local", true),
                ],
            ),
            (
                "name.ns2.svc.",
                &[
                    ("name.ns2.svc.cluster.local", false),
                    ("name.ns2.svc.svc.cluster.local", true),
                ],
            ),
            (
                "name.ns2.not-svc.",
                &[("name.ns2.not-svc.svc.cluster.local", true)],
            ),
            (
                "pod.sub-domain.ns.svc",
                &[("pod.sub-domain.ns.svc.cluster.local", true)],
            ),
            ("pod.sub-domain.ns.not-svc", &[]),
            ("name.ns2.svc.cluster.", &[]),
            ("name.ns2.svc.cluster.local", &[]),
            (
                "www.google.com.",
                &[("www.google.com.svc.cluster.local", true)],
            ),
        ];
        for (host, want) in cases {
            let got = kube_fqdns(&n(host), &ns1, &d());
            let want: Vec<(Name, bool)> = want.iter().map(|(s, p)| (n(s), *p)).collect();
            assert_eq!(got, want, "{host}");
        }
    }

    #[test]
    fn wildcards_go_from_specific_to_broad() {
        assert_eq!(wildcards(&n("svc1.")), vec![n("svc1")]);
        let got = wildcards(&n("svc1.ns1.svc.cluster.local"));
        let want: Vec<Name> = [
            "svc1.ns1.svc.cluster.local",
            "*.ns1.svc.cluster.local",
            "*.svc.cluster.local",
            "*.cluster.local",
            "*.local",
        ]
        .iter()
        .map(|s| n(s))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn aliases_of_a_search_expanded_query() {
        let got = aliases(&n("productpage.ns1.ns1.svc.cluster.local"), "ns1", &d());
        let names: Vec<String> = got.iter().map(|a| a.name.to_string()).collect();
        assert_eq!(
            names,
            [
                "productpage.ns1.ns1.svc.cluster.local.",
                "productpage.ns1.",
                "productpage.ns1.svc.cluster.local.",
                "productpage.ns1.ns1.",
                "productpage.ns1.ns1.svc.",
            ]
        );
        assert_eq!(got[1].stripped, Some(n("productpage.ns1")));
        // Six labels: ztunnel takes the query for a pod host, and its stripped forms too.
        assert!(got[0].pod_host && got[1].pod_host);
        assert!(!got[2].pod_host);
    }
}
