//! Authorization by scanning the policy list: the reference [`PolicyIndex`] is checked
//! against, and the rules both share (which policies apply, in which order, and the decision).
//!
//! [`PolicyIndex`]: super::PolicyIndex

use super::matcher::{policy_matches, Subject};
use super::model::{Connection, Decision, DenyReason, Evaluation};
use crate::config::{Policy, PolicyAction, PolicyScope, Snapshot, Workload};

/// Authorizes `conn` to `workload` (the destination) under `snapshot`'s policies.
///
/// Scans the policy list; no setup, but for the connection path prefer
/// [`PolicyIndex::evaluate`], which gives the same result from precomputed tables.
/// Only `workload.namespace` and `workload.authorization_policies` are read.
pub fn evaluate(snapshot: &Snapshot, workload: &Workload, conn: &Connection<'_>) -> Evaluation {
    let policies = || snapshot.policies();
    if policies().len() == 0 {
        return Evaluation {
            decision: Decision::Allow,
            dry_run: Vec::new(),
        };
    }
    let effective = move |i: usize, p: &Policy| !policies().skip(i + 1).any(|q| same_key(p, q));
    let ns = workload.namespace.as_str();
    let own = policies().enumerate().filter(move |&(i, p)| {
        !ns.is_empty() && p.scope == PolicyScope::Namespace && p.namespace == ns && effective(i, p)
    });
    let global = policies()
        .enumerate()
        .filter(move |&(i, p)| in_global_bucket(p) && effective(i, p));
    let listed = workload
        .authorization_policies
        .iter()
        .enumerate()
        .filter_map(move |(i, key)| {
            let p = policies().rev().find(|p| has_key(p, key))?;
            listed_is_new(workload, i, key, p).then_some(p)
        });
    decide(own.chain(global).map(|(_, p)| p).chain(listed), conn)
}

/// The decision over the applicable policies, in order (each at most once).
pub(super) fn decide<'p, I>(applicable: I, conn: &Connection<'_>) -> Evaluation
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

pub(super) fn not_allowed() -> Decision {
    Decision::Deny {
        policy: String::new(),
        reason: DenyReason::NotAllowed,
    }
}

/// In ztunnel's `""` bucket: global policies, and namespace policies written with `namespace: ""`.
pub(super) fn in_global_bucket(p: &Policy) -> bool {
    match p.scope {
        PolicyScope::Global => true,
        PolicyScope::Namespace => p.namespace.is_empty(),
        PolicyScope::WorkloadSelector => false,
    }
}

/// Whether `p`, listed at `i` in `workload.authorization_policies` under `key`, is not
/// already applied through the namespace buckets or an earlier entry of the list.
pub(super) fn listed_is_new(workload: &Workload, i: usize, key: &str, p: &Policy) -> bool {
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
pub(super) fn has_key(p: &Policy, key: &str) -> bool {
    key.strip_prefix(p.namespace.as_str())
        .and_then(|rest| rest.strip_prefix('/'))
        == Some(p.name.as_str())
}

/// `p.key() == q.key()` without building either (ztunnel compares the joined strings).
pub(super) fn same_key(p: &Policy, q: &Policy) -> bool {
    fn joined(p: &Policy) -> impl Iterator<Item = u8> + '_ {
        p.namespace
            .bytes()
            .chain(std::iter::once(b'/'))
            .chain(p.name.bytes())
    }
    p.namespace.len() + p.name.len() == q.namespace.len() + q.name.len() && joined(p).eq(joined(q))
}
