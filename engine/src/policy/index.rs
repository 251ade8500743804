//! [`PolicyIndex`]: [`super::evaluate`] over the policy tables a [`Snapshot`] carries.

use super::model::{Connection, Evaluation};
use super::scan::{decide, listed_is_new};
use crate::config::{Policy, Snapshot, Workload};

/// Evaluates connections against a snapshot's policy tables, so that it costs hash lookups
/// plus the applicable policies only, instead of scans over every policy.
///
/// The tables mirror ztunnel's `PolicyStore` (`src/state/policy.rs`): policies keyed by
/// `namespace/name` (a later duplicate replaces an earlier one), and per-namespace buckets of
/// `Namespace`-scoped policies, with `Global` policies in the `""` bucket. They are built on the
/// control side when the policies change (generations that change only workloads share them)
/// and reach every shard with the [`Snapshot`]; this is a borrowed view of them (no allocation, no atomics).
/// [`PolicyIndex::evaluate`] gives exactly what [`super::evaluate`] gives for the same snapshot.
#[derive(Clone, Copy, Debug)]
pub struct PolicyIndex<'a> {
    snapshot: &'a Snapshot,
}

impl<'a> PolicyIndex<'a> {
    /// The policy tables of `snapshot`.
    pub fn new(snapshot: &'a Snapshot) -> PolicyIndex<'a> {
        PolicyIndex { snapshot }
    }

    /// The snapshot the tables belong to.
    pub fn snapshot(&self) -> &'a Snapshot {
        self.snapshot
    }

    /// The effective policy stored under `namespace/name`, if any.
    pub fn get(&self, key: &str) -> Option<&'a Policy> {
        self.snapshot.policy(key)
    }

    /// Authorizes `conn` to `workload`; same result as [`super::evaluate`] on the
    /// indexed snapshot. `workload` is normally one of that snapshot's workloads; only its
    /// `namespace` and `authorization_policies` are read.
    pub fn evaluate(&self, workload: &Workload, conn: &Connection<'_>) -> Evaluation {
        let snap = self.snapshot;
        // A workload in namespace "" would get the global bucket twice.
        let own = snap
            .policies_in(&workload.namespace)
            .filter(|_| !workload.namespace.is_empty());
        let listed = workload
            .authorization_policies
            .iter()
            .enumerate()
            .filter_map(move |(i, key)| {
                let p = snap.policy(key)?;
                listed_is_new(workload, i, key, p).then_some(p)
            });
        decide(own.chain(snap.policies_in("")).chain(listed), conn)
    }
}
