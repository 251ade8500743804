//! In-pod mode end to end: ringtun in shared mode (PROXY_MODE=shared) takes pods from a fake
//! istio-cni node agent (`tests/peers/node_agent.py`) over ZDS, opens 15001/15006/15008 inside
//! each pod's network namespace, presents each pod's own identity (issued from `--ca-cert`),
//! and connects upstream from inside the pod, so traffic leaves with the pod's address.
//!
//! The pods are two namespaces joined by a veth (10.77.0.1 "client", 10.77.0.2 "server"), each
//! with istio-cni's in-pod capture rules. Each "node" is a namespace of its own with no link to
//! anything: a proxy there can only carry the pods' traffic from inside the pods' namespaces.

mod common;
mod inpod_common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use inpod_common::node::*;
use inpod_common::*;
use ringtun_testbed::transfer::transfer_paced;
use ringtun_testbed::{Netns, Process};

/// The pod listeners: outbound capture, plaintext inbound, HBONE.
const POD_PORTS: [u16; 3] = [15001, 15006, 15008];

fn has_pod_ports(ports: &[u16]) -> bool {
    POD_PORTS.iter().all(|p| ports.contains(p))
}

fn no_pod_ports(ports: &[u16]) -> bool {
    !POD_PORTS.iter().any(|p| ports.contains(p))
}

/// The mesh config (client 10.77.0.1, server 10.77.0.2, service VIP 10.96.0.10:80 → 5201)
/// with a trust domain, as ztunnel's test CA names it.
/// Runs `during` once a paced 8 MiB echo from `client` through the VIP is under way (1 MiB
/// sent), then waits for the transfer: whether every byte came back intact.
fn exact_across(client: &Netns, chunk: usize, during: impl FnOnce()) -> std::io::Result<bool> {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let runner = s.spawn(move || {
            let pace = Duration::from_millis(20);
            transfer_paced(
                client,
                "10.96.0.10:80",
                8 << 20,
                chunk,
                pace,
                1 << 20,
                |_| {
                    let _ = tx.send(());
                },
            )
            .map(|t| t.is_exact())
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("transfer under way");
        during();
        runner.join().expect("transfer thread")
    })
}

fn write_config(dir: &TempDir) -> PathBuf {
    let text = mesh_config(&["/10.96.0.10"], false).replace(
        "  network: \"\"\n",
        "  network: \"\"\n  trustDomain: cluster.local\n",
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// A node: its agent and its ringtun, serving `pods` (uid, namespace, name).
struct Node {
    agent: NodeAgent,
    ringtun: Process,
}

/// How a node's proxy is started, given the agent's socket.
type Spawn<'a> = &'a dyn Fn(&std::path::Path) -> Process;

impl Node {
    /// Starts the agent and ringtun in `ns`, hands over `pods` and the snapshot, and waits until
    /// ringtun is ready and every pod has its listeners.
    fn start(
        ns: &Netns,
        name: &str,
        dir: &TempDir,
        config: &std::path::Path,
        ca: &NodeCa,
        pods: &[(&str, &Netns, &str)],
        env: &[(&str, &str)],
    ) -> Node {
        let adir = dir.join(name);
        std::fs::create_dir_all(&adir).expect("agent dir");
        let agent = NodeAgent::start(&adir.join("zds.sock"), &adir);
        let spawn =
            |uds: &std::path::Path| spawn_shared(ns, name, dir.path(), config, uds, ca, env);
        Node::start_with(ns, name, agent, &spawn, pods)
    }

    /// Starts the proxy `spawn` makes in `ns` with `agent`, hands over `pods` and the snapshot,
    /// and waits until the proxy is ready and every pod has its listeners.
    fn start_with(
        ns: &Netns,
        name: &str,
        mut agent: NodeAgent,
        spawn: Spawn<'_>,
        pods: &[(&str, &Netns, &str)],
    ) -> Node {
        let mut ringtun = spawn(&agent.socket);
        assert_eq!(agent.accept(), 1, "ringtun announces ZDS V1");
        for (uid, pod, who) in pods {
            assert_eq!(agent.ack(&add_pod(uid, pod, who)), "", "add {uid}");
        }
        assert_ne!(readiness(ns), 200, "{name}: ready before the snapshot");
        assert_eq!(agent.ack("snapshot"), "");
        wait_ready(&mut ringtun, ns);
        for (uid, pod, _) in pods {
            wait_ports(pod, &format!("{uid} listeners"), has_pod_ports);
        }
        let own = listening_ports(ns);
        assert!(
            no_pod_ports(&own),
            "{name}: pod listeners belong in the pods, the node has {own:?}"
        );
        Node { agent, ringtun }
    }

    fn access(&self) -> Vec<AccessLine> {
        parse_access(&self.ringtun.log())
    }

    /// Waits until an access line of this node satisfies `pred`.
    fn wait_access(&self, what: &str, pred: impl Fn(&AccessLine) -> bool) -> AccessLine {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.access();
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return l.clone();
            }
            let seen: Vec<&str> = lines.iter().map(|l| l.raw.as_str()).collect();
            assert!(
                Instant::now() < deadline,
                "{}: no access line {what}:\n{}",
                self.ringtun.name(),
                seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

#[test]
fn pod_to_service_to_pod_across_two_ringtun_nodes_with_each_pods_identity() {
    let dir = TempDir::new("inpod-two");
    let pods = two_nodes("ipt");
    let (node_a, node_b) = (netns("ina"), netns("inb"));
    capture_pod(&pods.client);
    capture_pod(&pods.server);
    let to_server = echo_server(&pods.server, "10.77.0.2:5201");
    let to_client = echo_server(&pods.client, "10.77.0.1:5201");
    let config = write_config(&dir);
    let ca = NodeCa::generate(&dir.join("ca"));
    let a = Node::start(
        &node_a,
        "a",
        &dir,
        &config,
        &ca,
        &[("pod-client", &pods.client, "client")],
        &[],
    );
    let b = Node::start(
        &node_b,
        "b",
        &dir,
        &config,
        &ca,
        &[("pod-server", &pods.server, "server")],
        &[],
    );

    echo_ok(&pods.client, "10.96.0.10:80", 1 << 20);
    assert_eq!(to_server.records.wait_count(1, IO_TIMEOUT), 1);
    // The echo server sees the client pod's own address: the HBONE connection left from
    // inside the client pod, and node b connected from inside the server pod.
    let seen = to_server.records.all();
    assert_eq!(
        seen[0].peer.ip().to_string(),
        "10.77.0.2",
        "node b connects to the app from the server pod (no ENABLE_ORIG_SRC): {seen:?}"
    );
    let out = a.wait_access("outbound for the client pod", |l| {
        l.is("direction", "outbound") && l.is("dst.addr", "10.77.0.2:15008")
    });
    assert_eq!(out.get("src.identity"), Some(CLIENT_ID), "{}", out.raw);
    assert_eq!(out.get("dst.identity"), Some(SERVER_ID), "{}", out.raw);
    assert_eq!(out.get("src.workload"), Some("client"), "{}", out.raw);
    // Which pod and which network namespace, after ztunnel's fields.
    assert_eq!(out.get("pod.uid"), Some("pod-client"), "{}", out.raw);
    let client_netns = format!("net:[{}]", netns_ino(&pods.client));
    assert_eq!(
        out.get("pod.netns"),
        Some(client_netns.as_str()),
        "{}",
        out.raw
    );
    let inb = b.wait_access("inbound for the server pod", |l| {
        l.is("direction", "inbound") && l.is("dst.hbone_addr", "10.77.0.2:5201")
    });
    assert_eq!(inb.get("pod.uid"), Some("pod-server"), "{}", inb.raw);
    // /config_dump's workloadState, as ztunnel's: the agent's uid → state and WorkloadInfo.
    let (_, body) = http_in(&node_a, ADMIN, "GET", "/config_dump").expect("config_dump");
    let dump: serde_json::Value = serde_json::from_str(&body).expect("config_dump is JSON");
    let state = &dump["workloadState"];
    assert_eq!(state["pod-client"]["state"], "Up", "{state}");
    assert_eq!(
        state["pod-client"]["info"],
        serde_json::json!({"name": "client", "namespace": "default", "serviceAccount": "client"}),
        "{state}"
    );
    assert_eq!(
        state["pod-client"]["netns"],
        client_netns.as_str(),
        "{state}"
    );
    assert_eq!(state.as_object().map(|o| o.len()), Some(1), "{state}");
    let server_netns = format!("net:[{}]", netns_ino(&pods.server));
    assert_eq!(
        inb.get("pod.netns"),
        Some(server_netns.as_str()),
        "{}",
        inb.raw
    );
    assert_eq!(inb.get("src.identity"), Some(CLIENT_ID), "{}", inb.raw);
    assert_eq!(inb.get("dst.identity"), Some(SERVER_ID), "{}", inb.raw);
    assert!(
        inb.get("src.addr")
            .is_some_and(|s| s.starts_with("10.77.0.1:")),
        "HBONE came from the client pod's address: {}",
        inb.raw
    );

    // The other way: the server pod to the client pod's address, node b outbound, node a in.
    echo_ok(&pods.server, "10.77.0.1:5201", 256 << 10);
    assert_eq!(to_client.records.wait_count(1, IO_TIMEOUT), 1);
    let back = b.wait_access("outbound for the server pod", |l| {
        l.is("direction", "outbound") && l.is("dst.addr", "10.77.0.1:15008")
    });
    assert_eq!(back.get("src.identity"), Some(SERVER_ID), "{}", back.raw);
    a.wait_access("inbound for the client pod", |l| {
        l.is("direction", "inbound")
            && l.is("dst.hbone_addr", "10.77.0.1:5201")
            && l.is("dst.identity", CLIENT_ID)
    });
    drop((a, b));
}

#[test]
fn pods_added_and_deleted_while_traffic_runs_leave_the_others_alone() {
    let dir = TempDir::new("inpod-churn");
    let pods = two_nodes("ipc");
    let node = netns("inn");
    let spare = netns("ipx");
    capture_pod(&pods.client);
    capture_pod(&pods.server);
    let to_server = echo_server(&pods.server, "10.77.0.2:5201");
    let config = write_config(&dir);
    let ca = NodeCa::generate(&dir.join("ca"));
    // One node serves the server pod from the start; the client pod comes after readiness.
    let mut n = Node::start(
        &node,
        "n",
        &dir,
        &config,
        &ca,
        &[("pod-server", &pods.server, "server")],
        &[("CONNECTION_TERMINATION_DEADLINE", "1500")],
    );
    assert_eq!(
        n.agent.ack(&add_pod("pod-client", &pods.client, "client")),
        ""
    );
    wait_ports(&pods.client, "client pod listeners", has_pod_ports);
    echo_ok(&pods.client, "10.96.0.10:80", 256 << 10);

    // A pod added and deleted while a transfer runs: the transfer does not notice.
    let client = &pods.client;
    let exact = exact_across(client, 64 << 10, || {
        assert_eq!(n.agent.ack(&add_pod("pod-spare", &spare, "spare")), "");
        wait_ports(&spare, "spare pod listeners", has_pod_ports);
        assert_eq!(n.agent.ack("del pod-spare"), "");
        wait_ports(&spare, "spare pod listeners after del", no_pod_ports);
        wait_ports(client, "client pod listeners stay", has_pod_ports);
        wait_ports(&pods.server, "server pod listeners stay", has_pod_ports);
    });
    assert!(
        matches!(exact, Ok(true)),
        "transfer across the churn: {exact:?}"
    );
    echo_ok(client, "10.96.0.10:80", 256 << 10);

    // The client pod deleted while a long transfer runs: its listeners go at once, the
    // transfer runs on until the termination deadline (1.5 s) and is then cut.
    let (outcome, after) = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let runner = s.spawn(move || {
            let pace = Duration::from_millis(20);
            transfer_paced(
                client,
                "10.96.0.10:80",
                64 << 20,
                32 << 10,
                pace,
                64 << 10,
                |_| {
                    let _ = tx.send(());
                },
            )
            .map(|t| t.is_exact())
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("long transfer under way");
        let deleted = Instant::now();
        assert_eq!(n.agent.ack("del pod-client"), "");
        wait_ports(client, "client pod listeners after del", no_pod_ports);
        let outcome = runner.join().expect("transfer thread");
        (outcome, deleted.elapsed())
    });
    assert!(
        !matches!(outcome, Ok(true)),
        "a 64 MiB paced transfer cannot finish in time; it must be cut: {outcome:?}"
    );
    assert!(
        after >= Duration::from_millis(1200) && after < Duration::from_secs(15),
        "cut at the 1.5 s deadline, not at once nor never: {after:?}"
    );
    wait_ports(
        &pods.server,
        "server pod listeners after the client's del",
        has_pod_ports,
    );
    assert!(to_server.records.wait_count(3, IO_TIMEOUT) >= 3);

    // With the client pod out of the mesh (its capture rules gone, as istio-cni removes them),
    // its plaintext reaches the server pod's 15006, served inside the server pod.
    pods.client
        .nft("delete table inet ringtun")
        .expect("remove the client pod's capture");
    echo_ok(&pods.client, "10.77.0.2:5201", 256 << 10);
    let lines = || parse_access(&n.ringtun.log());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lines().iter().any(|l| {
        l.is("path", "plaintext")
            && l.is("dst.addr", "10.77.0.2:5201")
            && l.is("dst.workload", "server")
            && l.is("end", "closed")
    }) {
        assert!(
            Instant::now() < deadline,
            "no inbound-plaintext line:\n{}",
            n.ringtun.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(n.ringtun.is_alive(), "ringtun exited");
    assert!(!n.ringtun.log().contains("panicked"), "{}", n.ringtun.log());
}

#[test]
fn ringtun_and_ztunnel_nodes_carry_pod_traffic_both_ways() {
    let dir = TempDir::new("inpod-zt");
    let pods = two_nodes("ipz");
    let (node_r, node_z) = (netns("inr"), netns("inz"));
    capture_pod(&pods.client);
    capture_pod(&pods.server);
    let to_server = echo_server(&pods.server, "10.77.0.2:5201");
    let to_client = echo_server(&pods.client, "10.77.0.1:5201");
    let config = write_config(&dir);
    // ztunnel's FAKE_CA signs with the test CA: ringtun signs its pods' certificates with it too.
    let ca = NodeCa::ztunnel_test_ca(&dir.join("ca"));
    let r = Node::start(
        &node_r,
        "r",
        &dir,
        &config,
        &ca,
        &[("pod-client", &pods.client, "client")],
        &[],
    );
    let zdir = dir.join("z");
    std::fs::create_dir_all(&zdir).expect("ztunnel dir");
    let agent = NodeAgent::start(&zdir.join("zds.sock"), &zdir);
    let spawn = |uds: &std::path::Path| spawn_ztunnel_shared(&node_z, &zdir, &config, uds);
    let z = Node::start_with(
        &node_z,
        "z",
        agent,
        &spawn,
        &[("pod-server", &pods.server, "server")],
    );

    // ringtun's pod → service VIP → ztunnel's pod.
    echo_ok(&pods.client, "10.96.0.10:80", 1 << 20);
    assert_eq!(to_server.records.wait_count(1, IO_TIMEOUT), 1);
    let out = r.wait_access("outbound to ztunnel's pod", |l| {
        l.is("direction", "outbound") && l.is("dst.addr", "10.77.0.2:15008")
    });
    assert_eq!(out.get("src.identity"), Some(CLIENT_ID), "{}", out.raw);
    assert_eq!(out.get("dst.identity"), Some(SERVER_ID), "{}", out.raw);

    // ztunnel's pod → ringtun's pod.
    echo_ok(&pods.server, "10.77.0.1:5201", 1 << 20);
    assert_eq!(to_client.records.wait_count(1, IO_TIMEOUT), 1);
    let inb = r.wait_access("inbound from ztunnel's pod", |l| {
        l.is("direction", "inbound") && l.is("dst.hbone_addr", "10.77.0.1:5201")
    });
    assert_eq!(inb.get("src.identity"), Some(SERVER_ID), "{}", inb.raw);
    assert_eq!(inb.get("dst.identity"), Some(CLIENT_ID), "{}", inb.raw);
    assert!(z.ringtun.is_alive(), "ztunnel exited");
}

#[test]
fn bad_agent_messages_and_agent_restarts_leave_the_pods_serving() {
    let dir = TempDir::new("inpod-agent");
    let pods = two_nodes("ipb");
    let node = netns("inm");
    capture_pod(&pods.client);
    capture_pod(&pods.server);
    let _echo = echo_server(&pods.server, "10.77.0.2:5201");
    let config = write_config(&dir);
    let ca = NodeCa::generate(&dir.join("ca"));
    let both = [
        ("pod-client", &pods.client, "client"),
        ("pod-server", &pods.server, "server"),
    ];
    let mut n = Node::start(&node, "n", &dir, &config, &ca, &both, &[]);
    echo_ok(&pods.client, "10.96.0.10:80", 256 << 10);

    // Every bad message gets an error ack; the connection, the pods and ringtun carry on
    // (ztunnel drops the connection on most of these and exits on the last three).
    let marker = dir.join("not-a-netns");
    std::fs::write(&marker, b"").expect("marker file");
    let (m, p) = (marker.display(), pods.client.path().display().to_string());
    let w = "default x x";
    let cases = [
        "garbage ffffffff".to_owned(),
        "garbage ''".to_owned(),
        format!("add-nofd pod-x {w}"),
        format!("add-fd pod-x {m} {w}"),
        "del pod-unknown".to_owned(),
        format!("add-twofds pod-x {p} {w}"),
        format!("del-fd pod-client {m}"),
        "oversized 20000".to_owned(),
        "keep pod-client".to_owned(),
        "snapshot".to_owned(),
        format!("add-noinfo pod-y {p}"),
    ];
    for line in &cases {
        let err = n.agent.ack(line);
        assert!(!err.is_empty(), "{line}: an error ack was expected");
        assert_eq!(
            n.agent.cmd("expect-close 0.2")["event"],
            "open",
            "{line}: the connection stays up"
        );
        assert!(n.ringtun.is_alive(), "ringtun exited after {line}");
    }
    wait_ports(&pods.client, "client pod after bad messages", has_pod_ports);
    wait_ports(&pods.server, "server pod after bad messages", has_pod_ports);
    echo_ok(&pods.client, "10.96.0.10:80", 256 << 10);

    // The agent restarts while a transfer runs: ringtun reconnects, takes the new snapshot
    // (both pods again), and the transfer never notices.
    let client = &pods.client;
    let exact = exact_across(client, 64 << 10, || {
        n.agent.restart();
        assert_eq!(n.agent.accept(), 1, "ringtun reconnects to the new agent");
        for (uid, pod, who) in &both {
            assert_eq!(n.agent.ack(&add_pod(uid, pod, who)), "", "re-add {uid}");
        }
        assert_eq!(n.agent.ack("snapshot"), "");
    });
    assert!(
        matches!(exact, Ok(true)),
        "transfer across the agent restart: {exact:?}"
    );
    assert_eq!(readiness(&node), 200, "still ready after the agent restart");

    // Restarted again, the agent no longer knows the server pod: its listeners go after the
    // snapshot, the client pod's stay.
    n.agent.restart();
    n.agent.accept();
    assert_eq!(n.agent.ack(&add_pod("pod-client", client, "client")), "");
    wait_ports(
        &pods.server,
        "server pod still served before the snapshot",
        has_pod_ports,
    );
    assert_eq!(n.agent.ack("snapshot"), "");
    wait_ports(
        &pods.server,
        "server pod left out of the snapshot",
        no_pod_ports,
    );
    wait_ports(client, "client pod re-announced", has_pod_ports);

    // SIGTERM: the pods' listeners close, ringtun exits.
    n.ringtun.signal(libc::SIGTERM).expect("SIGTERM");
    wait_ports(client, "client pod after SIGTERM", no_pod_ports);
    assert!(
        n.ringtun.wait_exit(Duration::from_secs(10)).is_some(),
        "ringtun exits after SIGTERM"
    );
    assert!(!n.ringtun.log().contains("panicked"), "{}", n.ringtun.log());
}

#[test]
fn a_new_ringtun_takes_the_pods_over_while_the_old_one_drains_a_transfer() {
    let dir = TempDir::new("inpod-restart");
    let pods = two_nodes("ipr");
    let (node_old, node_new) = (netns("ino"), netns("inw"));
    capture_pod(&pods.client);
    capture_pod(&pods.server);
    let to_server = echo_server(&pods.server, "10.77.0.2:5201");
    let config = write_config(&dir);
    let ca = NodeCa::generate(&dir.join("ca"));
    let both = [
        ("pod-client", &pods.client, "client"),
        ("pod-server", &pods.server, "server"),
    ];
    let mut old = Node::start(&node_old, "old", &dir, &config, &ca, &both, &[]);
    echo_ok(&pods.client, "10.96.0.10:80", 64 << 10);

    // An upgrade: the new process (its own namespace, as a new DaemonSet pod) connects to the
    // agent, gets the snapshot and binds the pods' listeners beside the old ones
    // (SO_REUSEPORT); the old one is told to stop and drains. The transfer it carries finishes.
    let client = &pods.client;
    let mut new_proc = None;
    let exact = exact_across(client, 32 << 10, || {
        let socket = old.agent.socket.clone();
        let mut p = spawn_shared(&node_new, "new", dir.path(), &config, &socket, &ca, &[]);
        // Queued first, it is the one the agent takes next (the old one, cut off by the
        // agent's accept, reconnects behind it).
        p.wait_log_line(&["connected to the node agent"], Duration::from_secs(20))
            .expect("the new ringtun connects");
        assert_eq!(old.agent.accept(), 1, "the new ringtun says hello");
        old.agent.replay();
        wait_ready(&mut p, &node_new);
        old.ringtun
            .signal(libc::SIGTERM)
            .expect("SIGTERM the old ringtun");
        new_proc = Some(p);
    });
    assert!(
        matches!(exact, Ok(true)),
        "the old ringtun's transfer across the upgrade: {exact:?}"
    );
    assert!(
        old.ringtun.wait_exit(Duration::from_secs(15)).is_some(),
        "the old ringtun exits once drained"
    );
    let new_proc = new_proc.expect("new ringtun");
    wait_ports(
        &pods.client,
        "client pod served by the new ringtun",
        has_pod_ports,
    );
    echo_ok(&pods.client, "10.96.0.10:80", 256 << 10);
    assert!(to_server.records.wait_count(3, IO_TIMEOUT) >= 3);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !parse_access(&new_proc.log())
        .iter()
        .any(|l| l.is("direction", "outbound") && l.is("end", "closed"))
    {
        assert!(
            Instant::now() < deadline,
            "the new ringtun carried nothing:\n{}",
            new_proc.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}
