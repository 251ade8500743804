//! [`PolicyIndex`]: per-generation lookup tables for [`super::evaluate`]'s policy selection.

use super::{decide, listed_is_new, Connection, Evaluation};
use crate::config::{Policy, PolicyScope, Snapshot, Workload};
use std::collections::HashMap;

/// Policy lookup tables built once per config generation, so that evaluating a connection
/// costs hash lookups plus the applicable policies only, instead of scans over every policy.
///
/// Mirrors ztunnel's `PolicyStore` (`src/state/policy.rs`): policies keyed by
/// `namespace/name` (a later duplicate replaces an earlier one), and per-namespace buckets
/// of `Namespace`-scoped policies, with `Global` policies in the `""` bucket.
///
/// Holds a clone of the [`Snapshot`] (one `Arc`); `Send + Sync`, no locks.
/// [`PolicyIndex::evaluate`] gives exactly what [`super::evaluate`] gives for the same snapshot.
#[derive(Clone, Debug)]
pub struct PolicyIndex {
    snapshot: Snapshot,
    /// Namespace (`""` = global) → positions in `config().policies`, config order.
    by_namespace: HashMap<String, Box<[usize]>>,
    /// `namespace/name` → position of the effective (last) policy with that key.
    by_key: HashMap<String, usize>,
}

impl PolicyIndex {
    /// Builds the tables for `snapshot`'s policies.
    pub fn new(snapshot: &Snapshot) -> PolicyIndex {
        let policies = &snapshot.config().policies;
        let keys: Vec<String> = policies.iter().map(Policy::key).collect();
        let mut by_key = HashMap::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            by_key.insert(key.clone(), i);
        }
        let mut buckets: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, (p, key)) in policies.iter().zip(&keys).enumerate() {
            if by_key.get(key) != Some(&i) {
                continue; // replaced by a later policy with the same key
            }
            let bucket = match p.scope {
                PolicyScope::Global => "",
                PolicyScope::Namespace => p.namespace.as_str(),
                PolicyScope::WorkloadSelector => continue,
            };
            buckets.entry(bucket.to_owned()).or_default().push(i);
        }
        PolicyIndex {
            snapshot: snapshot.clone(),
            by_namespace: buckets
                .into_iter()
                .map(|(ns, v)| (ns, v.into_boxed_slice()))
                .collect(),
            by_key,
        }
    }

    /// The snapshot the tables were built from.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The effective policy stored under `namespace/name`, if any.
    pub fn get(&self, key: &str) -> Option<&Policy> {
        self.snapshot.config().policies.get(*self.by_key.get(key)?)
    }

    /// Authorizes `conn` to `workload`; same result as [`super::evaluate`] on the
    /// indexed snapshot. `workload` is normally one of that snapshot's workloads; only its
    /// `namespace` and `authorization_policies` are read.
    pub fn evaluate(&self, workload: &Workload, conn: &Connection<'_>) -> Evaluation {
        let policies = &self.snapshot.config().policies;
        let bucket = |ns: &str| self.by_namespace.get(ns).map_or(&[][..], |b| &b[..]);
        // A workload in namespace "" would get the global bucket twice.
        let own = if workload.namespace.is_empty() {
            &[][..]
        } else {
            bucket(&workload.namespace)
        };
        let listed = workload
            .authorization_policies
            .iter()
            .enumerate()
            .filter_map(move |(i, key)| {
                let p = policies.get(*self.by_key.get(key.as_str())?)?;
                listed_is_new(workload, i, key, p).then_some(p)
            });
        let applicable = own
            .iter()
            .chain(bucket(""))
            .filter_map(|&i| policies.get(i))
            .chain(listed);
        decide(applicable, conn)
    }
}
