//! L4 authorization: ztunnel's `policies` evaluated for one inbound connection.
//!
//! Pure logic, no sockets: the inbound paths call [`evaluate`] (or
//! [`PolicyIndex::evaluate`]) once per accepted connection or HBONE CONNECT stream, with
//! the destination workload and what they know about the peer ([`Connection`]).
//!
//! # Semantics (verified against ztunnel)
//!
//! Matching one policy is ztunnel's `Authorization::matches` in `src/rbac.rs`:
//!
//! * a policy matches if ANY of its `rules` matches; a policy with no rules (`rules: []`,
//!   Istio's "allow nothing" spec) matches nothing;
//! * a rule matches if ALL its clauses match; a rule with no clauses (`[[]]`) matches
//!   everything;
//! * a clause matches if ANY of its matches matches; an empty clause matches everything,
//!   but a match with every list empty (`{}`) is skipped, i.e. never matches;
//! * inside a match, each field pair must pass: a non-empty positive list (`principals`,
//!   `namespaces`, `sourceIps`, ...) needs ANY entry to match, and NO entry of its `not*`
//!   list may match. Pairs: `destinationIps` (CIDR contains the destination IP),
//!   `sourceIps` (source IP), `destinationPorts`, `serviceAccounts` (identity namespace
//!   AND service account equal; trust domain ignored), `principals`, `namespaces`.
//! * `principals` are compared with the identity URI stripped of `spiffe://`, i.e.
//!   `cluster.local/ns/default/sa/sleep`, using `Exact`/`Prefix`/`Suffix`/`Presence`
//!   (`Presence` = non-empty); `namespaces` with the identity's namespace.
//! * Without an identity (plaintext on 15006): no principal and no service account
//!   matches (so `notPrincipals`/`notServiceAccounts` always pass), and the namespace is
//!   the empty string — `namespaces: [!Presence []]` fails, `notNamespaces: [!Exact x]`
//!   passes, and `!Exact ""` / `!Prefix ""` match.
//! * IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are matched in IPv4 form, as ztunnel's
//!   listeners canonicalize socket addresses before authorizing.
//!
//! Which policies apply to a workload is ztunnel's `PolicyStore` (`src/state/policy.rs`)
//! and `DemandProxyState::assert_rbac` (`src/state.rs`): the `Namespace`-scoped policies
//! whose namespace equals the workload's, every `Global` policy whatever namespace it is
//! written in (ztunnel files them under the namespace `""`; a `Namespace`-scoped policy
//! written with `namespace: ""` therefore applies to everyone too), and the policies the
//! workload lists in `authorizationPolicies` — looked up by `namespace/name` whatever their
//! scope, unknown keys skipped (`config::parse` warns about them). Two policies with the
//! same `namespace/name`: the later one replaces the earlier. A policy reached twice is
//! evaluated once.
//!
//! The decision, also `assert_rbac`: if any applicable enforced DENY policy matches →
//! [`DenyReason::DeniedBy`] (ztunnel's `ExplicitlyDenied`, reported with the first
//! matching policy); else if no enforced ALLOW policy applies → allow; else if one matches
//! → allow; else [`DenyReason::NotAllowed`]. The order among applicable policies is:
//! the workload's namespace, then global, then its list (ztunnel iterates hash sets, so
//! it has no defined order; only which DENY policy is named can differ).
//!
//! `dryRun` policies never change the decision. They follow ztunnel's dry-run support
//! (istio/ztunnel PRs #1659 and #1745): dry-run DENY policies are all evaluated, even when
//! an enforced DENY matches, and each match is reported as `Deny { DeniedBy }`; when no
//! enforced DENY matched, dry-run ALLOW policies are evaluated, each match reported as
//! [`Decision::Allow`], and if no enforced ALLOW applies, dry-run ALLOWs do, and none of
//! them matched ("enforcing would block this connection"), each is reported as
//! `Deny { NotAllowed }`. Dry-run ALLOW policies do not count as "an ALLOW applies".
//! Nothing else is reported, so the list is empty (no allocation) in the common case.
//!
//! # Policy changes and live connections
//!
//! ztunnel re-evaluates live connections: every inbound connection is registered in its
//! `ConnectionManager` (`src/proxy/connection_manager.rs`), and `PolicyWatcher` subscribes
//! to the policy store's change notification (sent after each xDS `Authorization` update);
//! on a change it re-runs `assert_rbac` for every tracked inbound connection and drains
//! those now denied, which end with `AuthorizationPolicyLateRejection` and the log line
//! "connection ... closed because it's no longer allowed after a policy update".
//!
//! ringtun does the same on each shard: a connection admitted by policy keeps a
//! `decide::Grant`, and each new config generation re-evaluates every grant on the
//! shard that owns it (an [`Evaluation`] is a pure function of snapshot, workload and
//! connection); those denied are cut with an access line flagged `DENY`.
//!
//! # Cost
//!
//! [`evaluate`] scans `config().policies` (a few passes; duplicate keys make it
//! quadratic in the number of policies) and needs no setup. [`PolicyIndex`] reads the
//! tables each [`Snapshot`] carries (built once per config generation, on the control side)
//! and only visits the applicable policies; use it on the connection path. Neither allocates when the result is an allow without dry-run
//! reports, neither takes locks or touches atomics.

mod index;
mod matcher;

pub use index::PolicyIndex;

use crate::config::{Policy, PolicyAction, PolicyScope, Snapshot, Workload};
use matcher::{policy_matches, Subject};
use ringtun_hbone::Identity;
use std::fmt;
use std::net::IpAddr;

/// What authorization looks at in an inbound connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection<'a> {
    /// The peer's verified mTLS identity (HBONE); `None` for plaintext (port 15006).
    pub src_identity: Option<&'a Identity>,
    /// Source IP (matched by `sourceIps` / `notSourceIps`).
    pub src_ip: IpAddr,
    /// Destination IP (matched by `destinationIps` / `notDestinationIps`).
    pub dst_ip: IpAddr,
    /// Destination port (matched by `destinationPorts` / `notDestinationPorts`).
    pub dst_port: u16,
}

/// Why a connection is (or would be) refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// A DENY policy matched (ztunnel's `ExplicitlyDenied`).
    DeniedBy,
    /// ALLOW policies apply to the workload but none matched (ztunnel's `NotAllowed`).
    NotAllowed,
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DenyReason::DeniedBy => "explicitly denied",
            DenyReason::NotAllowed => "allow policies exist, but none allowed",
        })
    }
}

/// The outcome of authorizing a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Let it through.
    Allow,
    /// Refuse it.
    Deny {
        /// `namespace/name` of the DENY policy that matched; empty for
        /// [`DenyReason::NotAllowed`], which no single policy causes.
        policy: String,
        /// Why.
        reason: DenyReason,
    },
}

impl Decision {
    /// True for [`Decision::Allow`].
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// ztunnel's wording: `allowed`, `explicitly denied by: ns/name`,
/// `allow policies exist, but none allowed`.
impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allow => f.write_str("allowed"),
            Decision::Deny {
                policy,
                reason: DenyReason::DeniedBy,
            } => write!(f, "explicitly denied by: {policy}"),
            Decision::Deny {
                reason: DenyReason::NotAllowed,
                ..
            } => write!(f, "{}", DenyReason::NotAllowed),
        }
    }
}

/// The enforced decision plus what `dryRun` policies would have done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    /// What to do with the connection.
    pub decision: Decision,
    /// `(policy "namespace/name", what enforcing it would have done)` for the dry-run
    /// policies that have something to report (see the module docs); usually empty.
    pub dry_run: Vec<(String, Decision)>,
}

impl Evaluation {
    /// True when the connection may proceed.
    pub fn is_allowed(&self) -> bool {
        self.decision.is_allow()
    }
}

/// Authorizes `conn` to `workload` (the destination) under `snapshot`'s policies.
///
/// Scans the policy list; no setup, but for the connection path prefer
/// [`PolicyIndex::evaluate`], which gives the same result from precomputed tables.
/// Only `workload.namespace` and `workload.authorization_policies` are read.
pub fn evaluate(snapshot: &Snapshot, workload: &Workload, conn: &Connection<'_>) -> Evaluation {
    let policies = &snapshot.config().policies;
    if policies.is_empty() {
        return Evaluation {
            decision: Decision::Allow,
            dry_run: Vec::new(),
        };
    }
    let effective = |i: usize, p: &Policy| !policies.iter().skip(i + 1).any(|q| same_key(p, q));
    let ns = workload.namespace.as_str();
    let own = policies.iter().enumerate().filter(move |&(i, p)| {
        !ns.is_empty() && p.scope == PolicyScope::Namespace && p.namespace == ns && effective(i, p)
    });
    let global = policies
        .iter()
        .enumerate()
        .filter(move |&(i, p)| in_global_bucket(p) && effective(i, p));
    let listed = workload
        .authorization_policies
        .iter()
        .enumerate()
        .filter_map(move |(i, key)| {
            let p = policies.iter().rev().find(|p| has_key(p, key))?;
            listed_is_new(workload, i, key, p).then_some(p)
        });
    decide(own.chain(global).map(|(_, p)| p).chain(listed), conn)
}

/// The decision over the applicable policies, in order (each at most once).
fn decide<'p, I>(applicable: I, conn: &Connection<'_>) -> Evaluation
where
    I: Iterator<Item = &'p Policy> + Clone,
{
    let s = Subject::new(conn);
    let mut dry_run = Vec::new();

    // DENY: every dry-run one is reported; the first enforced match decides.
    let mut denied_by: Option<&Policy> = None;
    for p in applicable
        .clone()
        .filter(|p| p.action == PolicyAction::Deny)
    {
        if p.dry_run {
            if policy_matches(p, &s) {
                let key = p.key();
                dry_run.push((
                    key.clone(),
                    Decision::Deny {
                        policy: key,
                        reason: DenyReason::DeniedBy,
                    },
                ));
            }
        } else if denied_by.is_none() && policy_matches(p, &s) {
            denied_by = Some(p);
        }
    }
    if let Some(p) = denied_by {
        return Evaluation {
            decision: Decision::Deny {
                policy: p.key(),
                reason: DenyReason::DeniedBy,
            },
            dry_run,
        };
    }

    // ALLOW.
    let (mut any_allow, mut allowed) = (false, false);
    let (mut any_dry_allow, mut dry_allowed) = (false, false);
    for p in applicable
        .clone()
        .filter(|p| p.action == PolicyAction::Allow)
    {
        if p.dry_run {
            any_dry_allow = true;
            if policy_matches(p, &s) {
                dry_allowed = true;
                dry_run.push((p.key(), Decision::Allow));
            }
        } else {
            any_allow = true;
            allowed = allowed || policy_matches(p, &s);
        }
    }
    if !any_allow && any_dry_allow && !dry_allowed {
        // Enforcing the dry-run ALLOWs would refuse this connection.
        for p in applicable.filter(|p| p.action == PolicyAction::Allow && p.dry_run) {
            dry_run.push((p.key(), not_allowed()));
        }
    }
    let decision = if !any_allow || allowed {
        Decision::Allow
    } else {
        not_allowed()
    };
    Evaluation { decision, dry_run }
}

fn not_allowed() -> Decision {
    Decision::Deny {
        policy: String::new(),
        reason: DenyReason::NotAllowed,
    }
}

/// In ztunnel's `""` bucket: global policies, and namespace policies written with `namespace: ""`.
fn in_global_bucket(p: &Policy) -> bool {
    match p.scope {
        PolicyScope::Global => true,
        PolicyScope::Namespace => p.namespace.is_empty(),
        PolicyScope::WorkloadSelector => false,
    }
}

/// Whether `p`, listed at `i` in `workload.authorization_policies` under `key`, is not
/// already applied through the namespace buckets or an earlier entry of the list.
fn listed_is_new(workload: &Workload, i: usize, key: &str, p: &Policy) -> bool {
    let in_bucket = in_global_bucket(p)
        || (p.scope == PolicyScope::Namespace && p.namespace == workload.namespace);
    !in_bucket
        && !workload
            .authorization_policies
            .iter()
            .take(i)
            .any(|k| k == key)
}

/// `key == p.key()` without building the key.
fn has_key(p: &Policy, key: &str) -> bool {
    key.strip_prefix(p.namespace.as_str())
        .and_then(|rest| rest.strip_prefix('/'))
        == Some(p.name.as_str())
}

/// `p.key() == q.key()` without building either (ztunnel compares the joined strings).
fn same_key(p: &Policy, q: &Policy) -> bool {
    fn joined(p: &Policy) -> impl Iterator<Item = u8> + '_ {
        p.namespace
            .bytes()
            .chain(std::iter::once(b'/'))
            .chain(p.name.bytes())
    }
    p.namespace.len() + p.name.len() == q.namespace.len() + q.name.len() && joined(p).eq(joined(q))
}

#[cfg(test)]
mod tests;
