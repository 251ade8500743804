//! What authorization reads (a [`Connection`]) and what it answers (an [`Evaluation`]).

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
