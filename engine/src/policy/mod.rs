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
//! [`evaluate`] scans the snapshot's policy list (a few passes; duplicate keys make it
//! quadratic in the number of policies) and needs no setup. [`PolicyIndex`] reads the tables
//! each [`Snapshot`] carries (built on the control side when the policies change, shared by the
//! generations in between) and only visits the applicable policies; use it on the connection
//! path. Neither allocates when the result is an allow without dry-run reports, neither takes
//! locks or touches atomics.

mod index;
mod matcher;
mod model;
mod scan;

pub use index::PolicyIndex;
pub use model::{Connection, Decision, DenyReason, Evaluation};
pub use scan::evaluate;

#[cfg(test)]
mod tests;
