//! Inbound admission: whether a connection arriving on 15008 or 15006 is for a workload served
//! here, and whether policy lets it in; and re-checking what policy admitted when it changes.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

use ringtun_hbone::connect::{self, Baggage};
use ringtun_hbone::Identity;

use super::{Refusal, Scope};
use crate::config::{Snapshot, Workload};
use crate::net;
use crate::policy::{self, Decision, DenyReason, PolicyIndex};

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

/// The destination an HBONE CONNECT asks for: its `ip:port` authority, canonical.
pub fn connect_target(
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> Result<SocketAddr, Refusal> {
    connect::parse_connect(method, uri, headers)
        .map(|t| net::canonical(t.target))
        .map_err(Refusal::Malformed)
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
            outcome: Err(Refusal::NotServed),
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
        Decision::Deny { policy, reason } => Err(Refusal::Denied {
            why: match reason {
                DenyReason::DeniedBy => "denied by authorization policy",
                DenyReason::NotAllowed => "no authorization policy allows it",
            },
            detail: deny_detail(&policy, reason),
        }),
    };
    (verdict, eval.dry_run)
}

fn deny_detail(policy: &str, reason: DenyReason) -> String {
    if policy.is_empty() {
        reason.to_string()
    } else {
        format!("{reason} {policy}")
    }
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
        Decision::Deny { policy, reason } => Some(deny_detail(&policy, reason)),
    }
}

/// The `baggage` ztunnel answers a CONNECT with: who the destination is, from the fields its
/// workload entry actually has (no defaults filled in, unlike a request's baggage), so the
/// client side can label its metrics. Checked against a real ztunnel for a workload with a
/// namespace only: `k8s.namespace.name=default`.
pub fn response_baggage(w: &Workload) -> String {
    Baggage {
        cluster: w.cluster_id.clone(),
        namespace: w.namespace.clone(),
        workload_type: if w.workload_name.is_empty() {
            String::new()
        } else {
            w.workload_type.clone()
        },
        workload_name: w.workload_name.clone(),
        service: w.canonical_name.clone(),
        version: w.canonical_revision.clone(),
    }
    .header_value()
}
