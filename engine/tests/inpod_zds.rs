//! ringtun's ZDS client (`ringtun::inpod`) against the independent fake node agent
//! (`tests/peers/node_agent.py`): the pods' real network namespace fds arrive and are the named
//! namespaces, keep/del/snapshot and reconnection reconcile the pods held, and every bad message
//! (garbage, an empty packet, missing or extra fds, a fd that is not a netns, an add without
//! workload info, an oversized message, an unknown uid, keep after the snapshot, a second
//! snapshot) gets an error ack while the session carries on and no fd leaks.

mod common;
mod inpod_common;

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use common::{netns, TempDir};
use inpod_common::*;
use ringtun::inpod::session::{Action, Reply, Session};
use ringtun::inpod::uds::{Handled, ZdsClient, ZdsError};
use ringtun::inpod::{netns_id, NetnsId};
use ringtun_testbed::Netns;

const WAIT: Option<Duration> = Some(Duration::from_secs(10));

/// Connects ringtun's client to the agent and has the agent read its hello.
fn connect(agent: &mut NodeAgent) -> ZdsClient {
    let client = ZdsClient::connect(&agent.socket).expect("connect to the agent");
    assert_eq!(agent.accept(), 1, "ringtun announces ZDS version V1");
    client
}

/// Has the agent send `line`, the client handle it with `perform`, and returns the client's
/// answer and the error of the ack the agent received.
fn exchange(
    agent: &mut NodeAgent,
    client: &mut ZdsClient,
    session: &mut Session,
    line: &str,
    perform: impl FnOnce(Action) -> Reply,
) -> (Reply, String) {
    agent.send(line);
    let reply = match client.handle_next(session, WAIT, perform) {
        Ok(Handled::Answered(r)) => r,
        other => panic!("{line}: {other:?}"),
    };
    let e = agent.event();
    (reply, NodeAgent::ack_error(&e, line))
}

fn add_line(uid: &str, ns: &Netns, who: &str) -> String {
    format!("add {uid} {} default {who} {who}", ns.path().display())
}

fn id_of(ns: &Netns) -> NetnsId {
    let meta = std::fs::metadata(ns.path()).expect("stat netns");
    use std::os::unix::fs::MetadataExt;
    NetnsId {
        dev: meta.dev(),
        ino: meta.ino(),
    }
}

/// Expects an AddPod for `uid` in `ns` (the received fd is that namespace) by `who`.
fn expect_add(
    uid: &str,
    ns: &Netns,
    who: &str,
    replaces: Option<NetnsId>,
) -> impl FnOnce(Action) -> Reply {
    let (uid, want, who) = (uid.to_owned(), id_of(ns), who.to_owned());
    move |a| match a {
        Action::AddPod {
            uid: got,
            workload,
            netns,
            replaces: r,
        } => {
            assert_eq!(got, uid);
            assert_eq!(
                (workload.namespace.as_str(), workload.name.as_str()),
                ("default", who.as_str())
            );
            assert_eq!(workload.service_account, who);
            assert_eq!(netns.id, want, "the fd's namespace identity");
            // And from the fd itself, not only what the client recorded.
            assert_eq!(netns_id(netns.fd.as_fd()).expect("fstat fd"), want);
            assert_eq!(r, replaces);
            Reply::Ok
        }
        other => panic!("expected AddPod {uid}, got {other:?}"),
    }
}

fn no_action(a: Action) -> Reply {
    panic!("no action expected, got {a:?}")
}

fn held(session: &Session) -> Vec<String> {
    let mut v: Vec<String> = session.pods().map(|(u, _)| u.to_owned()).collect();
    v.sort();
    v
}

#[test]
fn ringtun_takes_pods_from_the_agent_and_reconciles_on_reconnect() {
    let dir = TempDir::new("zds-rt");
    let (p1, p2, p3) = (netns("rzp"), netns("rzp"), netns("rzp"));
    let mut agent = NodeAgent::start(&dir.join("zds.sock"), dir.path());
    let mut session = Session::new();
    let mut client = connect(&mut agent);
    let (a, c, s) = (&mut agent, &mut client, &mut session);

    for (uid, ns, who) in [
        ("pod1", &p1, "client"),
        ("pod2", &p2, "server"),
        ("pod3", &p3, "client"),
    ] {
        let (r, err) = exchange(
            a,
            c,
            s,
            &add_line(uid, ns, who),
            expect_add(uid, ns, who, None),
        );
        assert!(r.is_ok() && err.is_empty(), "{uid}: {err}");
    }
    assert!(!s.snapshot_done(), "not ready before the snapshot");
    let (_, err) = exchange(a, c, s, "snapshot", |a| match a {
        Action::SnapshotDone { remove } if remove.is_empty() => Reply::Ok,
        other => panic!("{other:?}"),
    });
    assert_eq!(err, "");
    assert!(s.snapshot_done());
    let (_, err) = exchange(a, c, s, "del pod2", |a| match a {
        Action::DelPod { uid } if uid == "pod2" => Reply::Ok,
        other => panic!("{other:?}"),
    });
    assert_eq!(err, "");
    // A failure of the control thread reaches the agent as the ack's error.
    let (_, err) = exchange(a, c, s, &add_line("pod4", &p2, "server"), |_| {
        Reply::Failed("cannot listen in the pod".into())
    });
    assert_eq!(err, "cannot listen in the pod");
    assert_eq!(held(s), ["pod1", "pod3", "pod4"]);

    // The agent drops the connection: a new one, a new snapshot; pod4 is not announced.
    assert_eq!(a.cmd("close")["event"], "closed-by-agent");
    assert!(matches!(
        c.handle_next(s, WAIT, no_action),
        Ok(Handled::Closed)
    ));
    s.reconnected();
    *c = connect(a);
    let (r, err) = exchange(a, c, s, &add_line("pod1", &p1, "client"), no_action);
    assert!(r.is_ok() && err.is_empty(), "replayed pod1: {err}");
    let (_, err) = exchange(a, c, s, "keep pod3", |a| match a {
        Action::KeepPod { uid } if uid == "pod3" => Reply::Ok,
        other => panic!("{other:?}"),
    });
    assert_eq!(err, "");
    let (_, err) = exchange(a, c, s, "snapshot", |a| match a {
        Action::SnapshotDone { remove } if remove == ["pod4"] => Reply::Ok,
        other => panic!("{other:?}"),
    });
    assert_eq!(err, "");
    assert_eq!(held(s), ["pod1", "pod3"]);

    // pod1's sandbox was recreated: same uid, another namespace.
    let line = add_line("pod1", &p2, "client");
    let (_, err) = exchange(
        a,
        c,
        s,
        &line,
        expect_add("pod1", &p2, "client", Some(id_of(&p1))),
    );
    assert_eq!(err, "");
}

/// Whether any fd of this process refers to `path`.
fn fd_open_on(path: &Path) -> bool {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
        })
        .unwrap_or(false)
}

#[test]
fn every_bad_message_gets_an_error_ack_and_the_session_goes_on() {
    let dir = TempDir::new("zds-rt-bad");
    let pod = netns("rzb");
    // A plain file sent where a netns fd belongs; every copy received must be closed again.
    let marker = dir.join("not-a-netns");
    std::fs::write(&marker, b"").expect("marker file");
    let m = marker.display().to_string();
    let p = pod.path().display().to_string();
    let mut agent = NodeAgent::start(&dir.join("zds.sock"), dir.path());
    let mut session = Session::new();
    let mut client = connect(&mut agent);
    let (a, c, s) = (&mut agent, &mut client, &mut session);
    let (_, err) = exchange(
        a,
        c,
        s,
        &add_line("pod1", &pod, "client"),
        expect_add("pod1", &pod, "client", None),
    );
    assert_eq!(err, "");
    let (_, err) = exchange(a, c, s, "snapshot", |_| Reply::Ok);
    assert_eq!(err, "");

    let w = "default x x";
    let cases = [
        (
            "garbage ffffffff".to_owned(),
            "cannot decode the WorkloadRequest",
        ),
        ("garbage ''".to_owned(), "request has no payload"),
        (
            format!("add-nofd pod-x {w}"),
            "came without its network namespace fd",
        ),
        (format!("add-fd pod-x {m} {w}"), "the fd is not a namespace"),
        (
            format!("add-twofds pod-x {m} {w}"),
            "2 fds came with the add, expected 1",
        ),
        (
            format!("del-fd pod1 {m}"),
            "1 fds came with the del, expected 0",
        ),
        (format!("add-noinfo pod-x {p}"), "has no workload_info"),
        (format!("raw 0a00 {p}"), "add with an empty uid"),
        (
            "oversized 20000".to_owned(),
            "longer than the 16384-byte limit",
        ),
        (
            "del pod-unknown".to_owned(),
            "del of unknown pod \"pod-unknown\"",
        ),
        ("keep pod1".to_owned(), "after snapshot_sent"),
        ("snapshot".to_owned(), "snapshot_sent was already received"),
    ];
    for (line, want) in cases {
        let (reply, err) = exchange(a, c, s, &line, no_action);
        assert!(!reply.is_ok(), "{line}");
        assert!(
            err.contains(want),
            "{line}: ack error {err:?} lacks {want:?}"
        );
        assert_eq!(held(s), ["pod1"], "{line} changed the pods held");
        assert!(s.snapshot_done(), "{line} undid the snapshot");
        assert!(!fd_open_on(&marker), "{line}: a received fd leaked");
    }
    // Still the same connection, still working.
    let (_, err) = exchange(a, c, s, "del pod1", |a| match a {
        Action::DelPod { uid } if uid == "pod1" => Reply::Ok,
        other => panic!("{other:?}"),
    });
    assert_eq!(err, "");
    assert_eq!(a.cmd("expect-close 0.2")["event"], "open");
}

#[test]
fn client_reconnects_to_a_restarted_agent() {
    let dir = TempDir::new("zds-rt-restart");
    let pod = netns("rzr");
    let sock = dir.join("zds.sock");
    let mut session = Session::new();
    let mut agent = NodeAgent::start(&sock, dir.path());
    let mut client = connect(&mut agent);
    let (_, err) = exchange(
        &mut agent,
        &mut client,
        &mut session,
        &add_line("pod1", &pod, "client"),
        expect_add("pod1", &pod, "client", None),
    );
    assert_eq!(err, "");
    let (_, err) = exchange(&mut agent, &mut client, &mut session, "snapshot", |_| {
        Reply::Ok
    });
    assert_eq!(err, "");

    // The agent goes away: the connection ends, and connecting fails until it is back.
    drop(agent);
    assert!(matches!(
        client.handle_next(&mut session, WAIT, no_action),
        Ok(Handled::Closed)
    ));
    assert!(matches!(
        ZdsClient::connect(&sock),
        Err(ZdsError::Connect { .. })
    ));
    let mut agent = NodeAgent::start(&sock, dir.path());
    session.reconnected();
    let mut client = connect(&mut agent);
    assert!(!session.snapshot_done());
    // The restarted agent still has the pod: replayed, nothing to do; nothing removed.
    let (r, err) = exchange(
        &mut agent,
        &mut client,
        &mut session,
        &add_line("pod1", &pod, "client"),
        no_action,
    );
    assert!(r.is_ok() && err.is_empty(), "{err}");
    let (_, err) = exchange(
        &mut agent,
        &mut client,
        &mut session,
        "snapshot",
        |a| match a {
            Action::SnapshotDone { remove } if remove.is_empty() => Reply::Ok,
            other => panic!("{other:?}"),
        },
    );
    assert_eq!(err, "");
    assert_eq!(held(&session), ["pod1"]);
}
