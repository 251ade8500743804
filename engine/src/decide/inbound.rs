//! Inbound admission: whether a connection arriving on 15008 or 15006 is for a workload served
//! here, and whether policy lets it in; and re-checking what policy admitted when it changes.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

use ringtun_hbone::connect::push_sanitized;
use ringtun_hbone::Identity;

use super::{Refusal, Scope};
use crate::config::{Service, Snapshot, Workload};
use crate::net;
use crate::policy::{self, Decision, PolicyIndex};

/// What authorization admitted a connection on: re-evaluated when policies change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The peer's verified identity (HBONE); `None` for plaintext.
    pub src_identity: Option<Rc<Identity>>,
    /// The connection's own source IP.
    pub src_ip: IpAddr,
    /// Destination workload IP.
    pub dst_ip: IpAddr,
    /// Destination port.
    pub dst_port: u16,
    /// The config generation that admitted it.
    pub generation: u64,
}

/// An inbound connection as the checks see it.
#[derive(Clone, Copy, Debug)]
pub struct Arrival<'a> {
    /// The connection's own peer address (never a client's `forwarded` claim: trusting it would
    /// let any mesh client pick the address a `sourceIps` rule sees, as ztunnel also refuses).
    pub src_ip: IpAddr,
    /// The peer's verified identity (HBONE); `None` for plaintext.
    pub src_identity: Option<&'a Rc<Identity>>,
    /// Where it is for: the CONNECT authority, or the original destination.
    pub dst: SocketAddr,
    /// The local address the connection reached, when known.
    pub reached: Option<SocketAddr>,
}

/// The decision on an inbound connection, with what the access record and the metrics name.
#[derive(Debug)]
pub struct Admission<'s> {
    /// The source's workload entry, if the source IP has one.
    pub src_workload: Option<&'s Workload>,
    /// The destination workload, once it is known to be served here.
    pub dst_workload: Option<&'s Workload>,
    /// Carry it, re-checked on policy changes with this grant; or refuse it.
    pub outcome: Result<Grant, Refusal>,
    /// What `dryRun` policies would have done (see [`policy`]); usually empty.
    pub dry_run: Vec<(String, Decision)>,
}

/// What an HBONE CONNECT's authority names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authority {
    /// `ip:port`, canonical.
    Addr(SocketAddr),
    /// `hostname:port`: a service port, as a network gateway sends it (ztunnel's
    /// `SvcHostname`); [`resolve_hostname`] turns it into an address.
    Host(String, u16),
}

/// The destination an HBONE CONNECT asks for, parsed as ztunnel parses it: a CONNECT whose
/// authority is `ip:port` or `hostname:port` (400 otherwise). Port 0 passes, as in ztunnel:
/// the connect to it fails (503).
pub fn connect_target(method: &http::Method, uri: &http::Uri) -> Result<Authority, Refusal> {
    if method != http::Method::CONNECT {
        return Err(Refusal::NotConnect {
            method: method.to_string(),
        });
    }
    let bad = |authority: &str| Refusal::BadAuthority {
        authority: authority.to_owned(),
    };
    let Some(authority) = uri.authority() else {
        return Err(bad(""));
    };
    if let Ok(addr) = authority.as_str().parse::<SocketAddr>() {
        return Ok(Authority::Addr(net::canonical(addr)));
    }
    match authority.port_u16() {
        Some(port) if authority.host().parse::<IpAddr>().is_err() => {
            Ok(Authority::Host(authority.host().to_owned(), port))
        }
        _ => Err(bad(authority.as_str())),
    }
}

/// Where a `hostname:port` CONNECT that reached `reached` goes, and the service it named, as
/// ztunnel's `resolve_inbound_target`: the address reached (the workload served there), at the
/// target port of the named service — the service in the workload's namespace first, else any with
/// that hostname; the port from the workload's own endpoint map, else the service's `ports`.
pub fn resolve_hostname<'s>(
    scope: &Scope,
    snap: &'s Snapshot,
    reached: IpAddr,
    host: &str,
    port: u16,
) -> Result<(SocketAddr, &'s Service), Refusal> {
    let Some(w) = snap
        .workload_by_ip(reached)
        .filter(|_| scope.serves(snap, reached))
    else {
        return Err(Refusal::NotServed { dst: reached });
    };
    let svc = match snap.service_by_host(&w.namespace, host) {
        Some(s) => s.service,
        // A hostname CONNECT is rare (gateway traffic): a scan is cheaper than an index.
        None => snap
            .services()
            .find(|s| s.hostname == host)
            .ok_or_else(|| Refusal::NoHostname {
                host: host.to_owned(),
            })?,
    };
    let target = w
        .services
        .get(&svc.key())
        .and_then(|ports| ports.get(&port))
        .or_else(|| svc.ports.get(&port))
        .copied()
        .filter(|&p| p != 0)
        .ok_or_else(|| Refusal::NoServicePort {
            host: host.to_owned(),
            port,
        })?;
    Ok((SocketAddr::new(reached, target), svc))
}

/// Admits a CONNECT stream on 15008, with ztunnel's refusals: a dedicated ringtun delivers
/// only to the address the client connected to (400, `IPMismatch`), never to its own
/// listeners (503, `SelfCall`), only to workloads it serves (503), and as policy allows (401).
pub fn admit_hbone<'s>(scope: &Scope, snap: &'s Snapshot, a: &Arrival<'_>) -> Admission<'s> {
    let refused = |r| Admission {
        src_workload: snap.workload_by_ip(a.src_ip),
        dst_workload: None,
        outcome: Err(r),
        dry_run: Vec::new(),
    };
    if scope.is_dedicated() {
        if let Some(reached) = a.reached.filter(|l| l.ip() != a.dst.ip()) {
            return refused(Refusal::IpMismatch {
                dst: a.dst.ip(),
                reached: reached.ip(),
            });
        }
    }
    if scope.is_own_port(a.dst.port()) {
        return refused(Refusal::OwnPort);
    }
    admit(scope, snap, a)
}

/// Admits a connection captured on 15006: only to workloads served here, as policy allows
/// (without an identity, principal rules cannot match it).
pub fn admit_plaintext<'s>(scope: &Scope, snap: &'s Snapshot, a: &Arrival<'_>) -> Admission<'s> {
    admit(scope, snap, a)
}

fn admit<'s>(scope: &Scope, snap: &'s Snapshot, a: &Arrival<'_>) -> Admission<'s> {
    let src_workload = snap.workload_by_ip(a.src_ip);
    let dst_workload = snap
        .workload_by_ip(a.dst.ip())
        .filter(|_| scope.serves(snap, a.dst.ip()));
    let Some(w) = dst_workload else {
        return Admission {
            src_workload,
            dst_workload,
            outcome: Err(Refusal::NotServed { dst: a.dst.ip() }),
            dry_run: Vec::new(),
        };
    };
    let conn = policy::Connection {
        src_identity: a.src_identity.map(|i| &**i),
        src_ip: a.src_ip,
        dst_ip: a.dst.ip(),
        dst_port: a.dst.port(),
    };
    let (verdict, dry_run) = authorize(snap, w, &conn);
    Admission {
        src_workload,
        dst_workload,
        outcome: verdict.map(|()| Grant {
            src_identity: a.src_identity.cloned(),
            src_ip: a.src_ip,
            dst_ip: a.dst.ip(),
            dst_port: a.dst.port(),
            generation: snap.generation,
        }),
        dry_run,
    }
}

/// Applies the authorization policies of `workload` (under `snap`) to a new connection; also
/// returns what dry-run policies would have done, for the log.
pub fn authorize(
    snap: &Snapshot,
    workload: &Workload,
    conn: &policy::Connection<'_>,
) -> (Result<(), Refusal>, Vec<(String, Decision)>) {
    let eval = PolicyIndex::new(snap).evaluate(workload, conn);
    let verdict = match eval.decision {
        Decision::Allow => Ok(()),
        deny @ Decision::Deny { .. } => Err(Refusal::Denied {
            detail: deny.to_string(),
        }),
    };
    (verdict, eval.dry_run)
}

/// Why `snap`'s policies would refuse a live connection admitted on `g`; `None` when they allow
/// it. A destination no longer in the config is left alone: with no workload there are no
/// policies to apply (ztunnel keeps the workload it admitted against).
pub fn revoked(snap: &Snapshot, g: &Grant) -> Option<String> {
    let w = snap.workload_by_ip(g.dst_ip)?;
    let conn = policy::Connection {
        src_identity: g.src_identity.as_deref(),
        src_ip: g.src_ip,
        dst_ip: g.dst_ip,
        dst_port: g.dst_port,
    };
    match PolicyIndex::new(snap).evaluate(w, &conn).decision {
        Decision::Allow => None,
        deny => Some(deny.to_string()),
    }
}

/// The `baggage` ztunnel answers a CONNECT with: who the destination is, from the fields its
/// workload entry actually has (no defaults filled in, unlike a request's baggage), so the
/// client side can label its metrics. As ztunnel writes it, the workload's name goes under
/// `k8s.<type>.name` even when the entry has no type (`k8s..name=server`, checked against the
/// real ztunnel by `e2e_ztunnel_wire`).
pub fn response_baggage(w: &Workload) -> String {
    let mut kind = String::from("k8s.");
    push_sanitized(&mut kind, &w.workload_type.to_lowercase());
    kind.push_str(".name");
    let members = [
        ("k8s.cluster.name", &w.cluster_id),
        ("k8s.namespace.name", &w.namespace),
        (kind.as_str(), &w.workload_name),
        ("service.name", &w.canonical_name),
        ("service.version", &w.canonical_revision),
    ];
    let mut out = String::new();
    for (key, value) in members.iter().filter(|(_, v)| !v.is_empty()) {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(key);
        out.push('=');
        push_sanitized(&mut out, value);
    }
    out
}
