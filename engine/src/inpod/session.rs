//! The ZDS state machine, sans IO: one received packet in, one [`Step`] out (an answer to send
//! at once, or an [`Action`] for the control thread to perform and then answer).
//!
//! Protocol, as istio-cni and ztunnel speak it: on each new connection the agent announces every
//! pod it knows (`add`, or `keep` for a pod whose netns it lost), then sends `snapshot_sent`;
//! pods the proxy still holds that were not announced are then removed. After the snapshot only
//! `add` and `del` come. Every request gets exactly one `Ack`.
//!
//! Unlike ztunnel, which drops the connection on most malformed messages and exits on a `keep`
//! after the snapshot, a second `snapshot_sent` or an `add` without workload info, every bad
//! request here is refused with an error ack and changes nothing: the other pods and the
//! connection carry on.

use std::collections::{HashMap, HashSet};

use super::zds::{Ack, DecodeError, WorkloadInfo, WorkloadRequest};
use super::{NetnsCheckError, NetnsFd, NetnsId};

/// What came with a packet as SCM_RIGHTS, as the socket layer found and checked it. Fds that
/// cannot be used are closed before the session sees them.
#[derive(Debug)]
pub enum Attached {
    /// No fd.
    None,
    /// Exactly one fd, a network namespace.
    Netns(NetnsFd),
    /// Exactly one fd that is not a network namespace (already closed).
    NotNetns(NetnsCheckError),
    /// More than one fd (all already closed).
    Several(usize),
}

/// One packet from the agent.
#[derive(Debug)]
pub struct Packet<'a> {
    /// The message (its start only, when `truncated`).
    pub bytes: &'a [u8],
    /// Its fds.
    pub attached: Attached,
    /// The message was longer than the receive limit (MSG_TRUNC).
    pub truncated: bool,
    /// Some of its fds did not fit the control buffer and were closed by the kernel (MSG_CTRUNC).
    pub control_truncated: bool,
}

/// What the control thread is to do.
#[derive(Debug)]
pub enum Action {
    /// Start serving a pod: make its listeners inside `netns`.
    AddPod {
        /// Pod uid.
        uid: String,
        /// Who the pod is (namespace and service account are never empty).
        workload: WorkloadInfo,
        /// The pod's network namespace.
        netns: NetnsFd,
        /// The pod was already served in this other namespace (its sandbox was recreated):
        /// stop that first.
        replaces: Option<NetnsId>,
    },
    /// The agent has no netns for this pod but it lives on: keep serving it across the snapshot.
    KeepPod {
        /// Pod uid.
        uid: String,
    },
    /// Stop serving a pod and drain its connections.
    DelPod {
        /// Pod uid.
        uid: String,
    },
    /// The agent's snapshot is complete: remove these pods (held from an earlier connection,
    /// not announced on this one), then count as ready.
    SnapshotDone {
        /// Uids to remove, sorted.
        remove: Vec<String>,
    },
}

/// The answer to one request.
#[derive(Debug)]
pub enum Reply {
    /// Done.
    Ok,
    /// The request was refused by the protocol; nothing changed.
    Refused(Refusal),
    /// The control thread could not perform the action (its error, as the agent will read it).
    Failed(String),
}

impl Reply {
    /// The wire ack: empty error for success.
    pub fn ack(&self) -> Ack {
        match self {
            Reply::Ok => Ack::ok(),
            Reply::Refused(r) => Ack {
                error: r.to_string(),
            },
            Reply::Failed(e) => Ack { error: e.clone() },
        }
    }

    /// The encoded `WorkloadResponse`.
    pub fn encode(&self) -> Vec<u8> {
        self.ack().encode()
    }

    /// Whether this answers success.
    pub fn is_ok(&self) -> bool {
        matches!(self, Reply::Ok)
    }
}

/// What to do with one packet.
#[derive(Debug)]
pub enum Step {
    /// Send this answer; nothing to perform.
    Reply(Reply),
    /// Perform this, then answer with its outcome ([`Reply::Ok`] or [`Reply::Failed`]).
    Act(Action),
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The message exceeded the receive limit.
    #[error("message longer than the {limit}-byte limit")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The kernel dropped fds that did not fit the control buffer.
    #[error("more fds came with the message than one request can carry")]
    ControlTruncated,
    /// Not a valid `WorkloadRequest`.
    #[error("cannot decode the WorkloadRequest: {0}")]
    Decode(#[from] DecodeError),
    /// An `add`, `keep` or `del` with an empty uid.
    #[error("{kind} with an empty uid")]
    EmptyUid {
        /// `add`, `keep` or `del`.
        kind: &'static str,
    },
    /// An `add` without the netns fd.
    #[error("add of pod {uid:?} came without its network namespace fd")]
    MissingFd {
        /// Pod uid.
        uid: String,
    },
    /// An `add` whose fd is not a network namespace.
    #[error("add of pod {uid:?}: {source}")]
    NotNetns {
        /// Pod uid.
        uid: String,
        /// What the fd is instead.
        source: NetnsCheckError,
    },
    /// More than one fd came with one request.
    #[error("{count} fds came with the {kind}, expected {expected}")]
    FdCount {
        /// The request.
        kind: &'static str,
        /// How many came.
        count: usize,
        /// How many it takes.
        expected: usize,
    },
    /// An `add` without `workload_info`.
    #[error("add of pod {uid:?} has no workload_info")]
    NoWorkloadInfo {
        /// Pod uid.
        uid: String,
    },
    /// `workload_info` lacks what the pod's identity is made of.
    #[error("add of pod {uid:?}: workload_info has no {field}")]
    IncompleteWorkloadInfo {
        /// Pod uid.
        uid: String,
        /// `namespace` or `service_account`.
        field: &'static str,
    },
    /// A `del` of a pod this proxy does not hold.
    #[error("del of unknown pod {uid:?}")]
    UnknownPod {
        /// Pod uid.
        uid: String,
    },
    /// `keep` is only valid before `snapshot_sent`.
    #[error("keep of pod {uid:?} after snapshot_sent (keep is only valid during the snapshot)")]
    KeepAfterSnapshot {
        /// Pod uid.
        uid: String,
    },
    /// Only one `snapshot_sent` per connection.
    #[error("snapshot_sent was already received on this connection")]
    SecondSnapshot,
}

/// The protocol state: pods held across connections, and the snapshot of the current one.
#[derive(Debug, Default)]
pub struct Session {
    /// Pods the control thread holds (serving, or retrying to), by uid.
    pods: HashMap<String, NetnsId>,
    /// Held pods announced (`add`, `keep`) on this connection before `snapshot_sent`.
    announced: HashSet<String>,
    snapshot_done: bool,
}

impl Session {
    /// A session holding no pods, before any connection.
    pub fn new() -> Self {
        Session::default()
    }

    /// A new connection to the agent: a new snapshot is expected. Pods stay held.
    pub fn reconnected(&mut self) {
        self.announced.clear();
        self.snapshot_done = false;
    }

    /// Whether this connection's `snapshot_sent` has been received (readiness).
    pub fn snapshot_done(&self) -> bool {
        self.snapshot_done
    }

    /// The pods held, by uid, with their namespaces.
    pub fn pods(&self) -> impl Iterator<Item = (&str, NetnsId)> {
        self.pods.iter().map(|(uid, id)| (uid.as_str(), *id))
    }

    /// Takes one packet from the agent. Never panics; a refusal leaves the state unchanged.
    pub fn on_packet(&mut self, packet: Packet<'_>) -> Step {
        match self.step(packet) {
            Ok(step) => step,
            Err(refusal) => Step::Reply(Reply::Refused(refusal)),
        }
    }

    fn step(&mut self, packet: Packet<'_>) -> Result<Step, Refusal> {
        if packet.truncated {
            return Err(Refusal::TooLarge {
                limit: packet.bytes.len(),
            });
        }
        if packet.control_truncated {
            return Err(Refusal::ControlTruncated);
        }
        let request = WorkloadRequest::decode(packet.bytes)?;
        match request {
            WorkloadRequest::Add { uid, workload_info } => {
                self.add(uid, workload_info, packet.attached)
            }
            WorkloadRequest::Keep { uid } => {
                no_fd("keep", &packet.attached)?;
                non_empty("keep", &uid)?;
                if self.snapshot_done {
                    return Err(Refusal::KeepAfterSnapshot { uid });
                }
                if !self.pods.contains_key(&uid) {
                    // Keep means "do not remove it if you have it": nothing to keep.
                    return Ok(Step::Reply(Reply::Ok));
                }
                self.announced.insert(uid.clone());
                Ok(Step::Act(Action::KeepPod { uid }))
            }
            WorkloadRequest::Del { uid } => {
                no_fd("del", &packet.attached)?;
                non_empty("del", &uid)?;
                if self.pods.remove(&uid).is_none() {
                    return Err(Refusal::UnknownPod { uid });
                }
                self.announced.remove(&uid);
                Ok(Step::Act(Action::DelPod { uid }))
            }
            WorkloadRequest::SnapshotSent => {
                no_fd("snapshot_sent", &packet.attached)?;
                if self.snapshot_done {
                    return Err(Refusal::SecondSnapshot);
                }
                let mut remove: Vec<String> = self
                    .pods
                    .keys()
                    .filter(|uid| !self.announced.contains(*uid))
                    .cloned()
                    .collect();
                remove.sort();
                for uid in &remove {
                    self.pods.remove(uid);
                }
                self.announced.clear();
                self.snapshot_done = true;
                Ok(Step::Act(Action::SnapshotDone { remove }))
            }
        }
    }

    fn add(
        &mut self,
        uid: String,
        workload_info: Option<WorkloadInfo>,
        attached: Attached,
    ) -> Result<Step, Refusal> {
        // The fd is checked first so that every refusal below closes it (by dropping it).
        let netns = match attached {
            Attached::Netns(fd) => fd,
            Attached::None => return Err(Refusal::MissingFd { uid }),
            Attached::NotNetns(source) => return Err(Refusal::NotNetns { uid, source }),
            Attached::Several(count) => {
                return Err(Refusal::FdCount {
                    kind: "add",
                    count,
                    expected: 1,
                })
            }
        };
        non_empty("add", &uid)?;
        let workload = workload_info.ok_or_else(|| Refusal::NoWorkloadInfo { uid: uid.clone() })?;
        for (field, value) in [
            ("namespace", &workload.namespace),
            ("service_account", &workload.service_account),
        ] {
            if value.is_empty() {
                return Err(Refusal::IncompleteWorkloadInfo { uid, field });
            }
        }
        if !self.snapshot_done {
            self.announced.insert(uid.clone());
        }
        let replaces = match self.pods.insert(uid.clone(), netns.id) {
            // The same pod in the same namespace again (a replayed snapshot): already served.
            Some(old) if old == netns.id => return Ok(Step::Reply(Reply::Ok)),
            other => other,
        };
        Ok(Step::Act(Action::AddPod {
            uid,
            workload,
            netns,
            replaces,
        }))
    }
}

fn no_fd(kind: &'static str, attached: &Attached) -> Result<(), Refusal> {
    let count = match attached {
        Attached::None => return Ok(()),
        Attached::Netns(_) | Attached::NotNetns(_) => 1,
        Attached::Several(n) => *n,
    };
    Err(Refusal::FdCount {
        kind,
        count,
        expected: 0,
    })
}

fn non_empty(kind: &'static str, uid: &str) -> Result<(), Refusal> {
    if uid.is_empty() {
        return Err(Refusal::EmptyUid { kind });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fake_netns(ino: u64) -> NetnsFd {
        // The session never looks at the fd itself; any open file stands in for a namespace.
        let fd = std::fs::File::open("/dev/null")
            .expect("open /dev/null")
            .into();
        NetnsFd {
            fd,
            id: NetnsId { dev: 4, ino },
        }
    }

    fn info() -> Option<WorkloadInfo> {
        Some(WorkloadInfo {
            name: "p".into(),
            namespace: "default".into(),
            service_account: "sa".into(),
        })
    }

    fn feed(s: &mut Session, req: WorkloadRequest, attached: Attached) -> Step {
        let bytes = req.encode();
        s.on_packet(Packet {
            bytes: &bytes,
            attached,
            truncated: false,
            control_truncated: false,
        })
    }

    fn add(s: &mut Session, uid: &str, ino: u64) -> Step {
        let req = WorkloadRequest::Add {
            uid: uid.into(),
            workload_info: info(),
        };
        feed(s, req, Attached::Netns(fake_netns(ino)))
    }

    fn snapshot(s: &mut Session) -> Step {
        feed(s, WorkloadRequest::SnapshotSent, Attached::None)
    }

    fn del(s: &mut Session, uid: &str) -> Step {
        feed(s, WorkloadRequest::Del { uid: uid.into() }, Attached::None)
    }

    fn keep(s: &mut Session, uid: &str) -> Step {
        feed(s, WorkloadRequest::Keep { uid: uid.into() }, Attached::None)
    }

    fn refused(step: Step) -> Refusal {
        match step {
            Step::Reply(Reply::Refused(r)) => r,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn removed(step: Step) -> Vec<String> {
        match step {
            Step::Act(Action::SnapshotDone { remove }) => remove,
            other => panic!("expected SnapshotDone, got {other:?}"),
        }
    }

    #[test]
    fn add_snapshot_del() {
        let mut s = Session::new();
        match add(&mut s, "a", 1) {
            Step::Act(Action::AddPod {
                uid,
                workload,
                netns,
                replaces: None,
            }) => {
                assert_eq!(uid, "a");
                assert_eq!(workload.service_account, "sa");
                assert_eq!(netns.id.ino, 1);
            }
            other => panic!("{other:?}"),
        }
        assert!(!s.snapshot_done());
        assert_eq!(removed(snapshot(&mut s)), Vec::<String>::new());
        assert!(s.snapshot_done());
        assert!(matches!(
            add(&mut s, "b", 2),
            Step::Act(Action::AddPod { .. })
        ));
        assert!(matches!(del(&mut s, "a"), Step::Act(Action::DelPod { uid }) if uid == "a"));
        let held: Vec<&str> = s.pods().map(|(u, _)| u).collect();
        assert_eq!(held, ["b"]);
    }

    #[test]
    fn reconnect_removes_pods_not_announced() {
        let mut s = Session::new();
        for (uid, ino) in [("a", 1), ("b", 2), ("c", 3), ("d", 4)] {
            add(&mut s, uid, ino);
        }
        snapshot(&mut s);
        s.reconnected();
        assert!(!s.snapshot_done());
        // a: replayed, same netns. b: kept. c: new netns. d: not announced.
        assert!(matches!(add(&mut s, "a", 1), Step::Reply(Reply::Ok)));
        assert!(matches!(
            keep(&mut s, "b"),
            Step::Act(Action::KeepPod { .. })
        ));
        assert!(matches!(
            add(&mut s, "c", 30),
            Step::Act(Action::AddPod {
                replaces: Some(NetnsId { ino: 3, .. }),
                ..
            })
        ));
        // keep of a pod this proxy never had: nothing to keep, not an error.
        assert!(matches!(keep(&mut s, "zz"), Step::Reply(Reply::Ok)));
        assert_eq!(removed(snapshot(&mut s)), ["d"]);
        let mut held: Vec<&str> = s.pods().map(|(u, _)| u).collect();
        held.sort();
        assert_eq!(held, ["a", "b", "c"]);
    }

    #[test]
    fn del_before_snapshot_is_not_resurrected() {
        let mut s = Session::new();
        add(&mut s, "a", 1);
        snapshot(&mut s);
        s.reconnected();
        add(&mut s, "a", 1);
        assert!(matches!(del(&mut s, "a"), Step::Act(Action::DelPod { .. })));
        assert_eq!(removed(snapshot(&mut s)), Vec::<String>::new());
        assert_eq!(s.pods().count(), 0);
    }

    #[test]
    fn every_bad_request_is_refused_and_changes_nothing() {
        let mut s = Session::new();
        add(&mut s, "a", 1);
        snapshot(&mut s);
        let add_req = |uid: &str, workload_info| WorkloadRequest::Add {
            uid: uid.into(),
            workload_info,
        };
        let cases: Vec<(Step, &str)> = vec![
            (
                s.on_packet(Packet {
                    bytes: &[0xff, 0xff, 0xff],
                    attached: Attached::None,
                    truncated: false,
                    control_truncated: false,
                }),
                "cannot decode",
            ),
            (
                s.on_packet(Packet {
                    bytes: &[],
                    attached: Attached::None,
                    truncated: false,
                    control_truncated: false,
                }),
                "no payload",
            ),
            (
                s.on_packet(Packet {
                    bytes: &[0x0a; 16],
                    attached: Attached::Netns(fake_netns(9)),
                    truncated: true,
                    control_truncated: false,
                }),
                "16-byte limit",
            ),
            (
                s.on_packet(Packet {
                    bytes: &add_req("b", info()).encode(),
                    attached: Attached::Netns(fake_netns(9)),
                    truncated: false,
                    control_truncated: true,
                }),
                "more fds",
            ),
            (
                feed(&mut s, add_req("b", info()), Attached::None),
                "without its network namespace fd",
            ),
            (
                feed(
                    &mut s,
                    add_req("b", info()),
                    Attached::NotNetns(NetnsCheckError::OtherNamespace(libc::CLONE_NEWUTS)),
                ),
                "not a network namespace",
            ),
            (
                feed(&mut s, add_req("b", info()), Attached::Several(2)),
                "2 fds came with the add",
            ),
            (
                feed(&mut s, add_req("b", None), Attached::Netns(fake_netns(9))),
                "has no workload_info",
            ),
            (
                feed(
                    &mut s,
                    add_req(
                        "b",
                        Some(WorkloadInfo {
                            service_account: String::new(),
                            ..info().unwrap_or_default()
                        }),
                    ),
                    Attached::Netns(fake_netns(9)),
                ),
                "no service_account",
            ),
            (
                feed(&mut s, add_req("", info()), Attached::Netns(fake_netns(9))),
                "empty uid",
            ),
            (del(&mut s, "nope"), "unknown pod"),
            (del(&mut s, ""), "empty uid"),
            (
                feed(
                    &mut s,
                    WorkloadRequest::Del { uid: "a".into() },
                    Attached::Netns(fake_netns(9)),
                ),
                "1 fds came with the del, expected 0",
            ),
            (keep(&mut s, "a"), "after snapshot_sent"),
            (snapshot(&mut s), "already received"),
        ];
        for (step, want) in cases {
            let r = refused(step).to_string();
            assert!(r.contains(want), "{r:?} lacks {want:?}");
        }
        let held: Vec<(&str, NetnsId)> = s.pods().collect();
        assert_eq!(held, [("a", NetnsId { dev: 4, ino: 1 })]);
        assert!(s.snapshot_done());
        // And the session still works.
        assert!(matches!(del(&mut s, "a"), Step::Act(Action::DelPod { .. })));
    }

    #[test]
    fn refusals_before_the_snapshot_do_not_count_as_announced() {
        let mut s = Session::new();
        add(&mut s, "a", 1);
        snapshot(&mut s);
        s.reconnected();
        let bad = WorkloadRequest::Add {
            uid: "a".into(),
            workload_info: None,
        };
        refused(feed(&mut s, bad, Attached::Netns(fake_netns(1))));
        assert_eq!(removed(snapshot(&mut s)), ["a"]);
    }

    #[test]
    fn replies_encode_as_acks() {
        assert_eq!(Reply::Ok.encode(), [0x0a, 0x00]);
        let r = Reply::Refused(Refusal::SecondSnapshot);
        assert!(!r.is_ok());
        assert_eq!(
            r.ack().error,
            "snapshot_sent was already received on this connection"
        );
        assert_eq!(Reply::Failed("x".into()).ack().error, "x");
    }

    fn arb_attached() -> impl Strategy<Value = u8> {
        0u8..4
    }

    fn attached(kind: u8, ino: u64) -> Attached {
        match kind {
            0 => Attached::None,
            1 => Attached::Netns(fake_netns(ino)),
            2 => Attached::NotNetns(NetnsCheckError::OtherNamespace(0)),
            _ => Attached::Several(3),
        }
    }

    proptest! {
        #[test]
        fn arbitrary_packets_never_panic(
            packets in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..64), arb_attached(), any::<bool>(), any::<bool>(), 0u64..4),
                1..20,
            ),
            reconnect_at in 0usize..20,
        ) {
            let mut s = Session::new();
            for (i, (bytes, kind, truncated, control_truncated, ino)) in packets.into_iter().enumerate() {
                if i == reconnect_at {
                    s.reconnected();
                }
                let _ = s.on_packet(Packet { bytes: &bytes, attached: attached(kind, ino), truncated, control_truncated });
            }
        }

        #[test]
        fn valid_request_sequences_never_panic_and_keep_pods_consistent(
            ops in proptest::collection::vec((0u8..5, 0u8..4, 0u64..3), 1..40),
        ) {
            let mut s = Session::new();
            for (op, pod, ino) in ops {
                let uid = format!("pod{pod}");
                let step = match op {
                    0 => add(&mut s, &uid, ino),
                    1 => del(&mut s, &uid),
                    2 => keep(&mut s, &uid),
                    3 => snapshot(&mut s),
                    _ => { s.reconnected(); continue; }
                };
                match step {
                    Step::Act(Action::DelPod { uid }) => prop_assert!(s.pods().all(|(u, _)| u != uid)),
                    Step::Act(Action::AddPod { uid, netns, .. }) => {
                        prop_assert!(s.pods().any(|(u, id)| u == uid && id == netns.id))
                    }
                    Step::Act(Action::SnapshotDone { remove }) => {
                        prop_assert!(s.snapshot_done());
                        prop_assert!(s.pods().all(|(u, _)| !remove.iter().any(|r| r == u)))
                    }
                    _ => {}
                }
            }
        }
    }
}
