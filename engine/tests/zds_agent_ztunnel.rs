//! The fake node agent (`tests/peers/node_agent.py`) checked against the real ztunnel
//! (`../shared/ztunnel/ztunnel`) in shared mode: ztunnel connects to the agent's socket
//! (`INPOD_UDS`), acks the agent's `add` and `snapshot_sent`, opens 15001/15006/15008 inside the
//! pod's network namespace (not its own), closes them on `del`, and carries pod-to-pod traffic
//! over HBONE for two pods the agent handed it. Its answers to each bad message are pinned too:
//! they are the baseline ringtun's in-pod mode is to beat. So are its `workload_manager_*`
//! metrics and `/config_dump`'s `workloadState`, and what it does to a deleted pod's live
//! connection (cut at once). Without the binary these tests fail, never skip.

mod common;
mod inpod_common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use inpod_common::*;
use ringtun_testbed::{Netns, DEFAULT_MARK};

/// The pod listeners ztunnel opens in each pod: outbound capture, plaintext inbound, HBONE.
const POD_PORTS: [u16; 3] = [15001, 15006, 15008];

/// The two-workload mesh config (client 10.77.0.1, server 10.77.0.2) with
/// `trustDomain: cluster.local`, which ztunnel's test-CA certificates then name.
fn write_config(dir: &TempDir) -> PathBuf {
    let text = mesh_config(&["/10.96.0.10"], false).replace(
        "  network: \"\"\n",
        "  network: \"\"\n  trustDomain: cluster.local\n",
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// ztunnel in shared mode inside the "node" namespace `node`, taking pods from the agent at
/// `uds`; killed on drop, its log printed if the test failed.
struct SharedZtunnel {
    child: Child,
    log: PathBuf,
}

impl SharedZtunnel {
    fn start(node: &Netns, uds: &Path, config: &Path, dir: &Path) -> SharedZtunnel {
        let log = dir.join("ztunnel.log");
        let mut cmd = node.exec(common::ztunnel::ztunnel_bin());
        cmd.env("PROXY_MODE", "shared").env("INPOD_UDS", uds);
        let child = common::ztunnel::ztunnel_local_env(&mut cmd, config)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("ztunnel log"))
            .stderr(std::fs::File::create(dir.join("ztunnel.err")).expect("ztunnel log"))
            .spawn()
            .expect("spawn ztunnel");
        SharedZtunnel { child, log }
    }

    fn text(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for SharedZtunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("===== ztunnel log =====\n{}", self.text());
        }
    }
}

/// HTTP status of ztunnel's readiness endpoint in `node`, `None` while it does not answer.
fn readiness(node: &Netns) -> Option<u16> {
    let mut s = connect_in(node, "127.0.0.1:15021").ok()?;
    s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: ztunnel\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

fn has_pod_ports(ports: &[u16]) -> bool {
    POD_PORTS.iter().all(|p| ports.contains(p))
}

fn no_pod_ports(ports: &[u16]) -> bool {
    !POD_PORTS.iter().any(|p| ports.contains(p))
}

fn add_line(uid: &str, ns: &Netns, who: &str) -> String {
    format!("add {uid} {} default {who} {who}", ns.path().display())
}

#[test]
fn ztunnel_opens_pod_listeners_in_the_pod_netns_on_add_and_closes_them_on_del() {
    let dir = TempDir::new("zds-zt");
    let node = netns("ztn");
    let pod = netns("ztp");
    let config = write_config(&dir);
    let mut agent = NodeAgent::start(&dir.join("zds.sock"), dir.path());
    let mut zt = SharedZtunnel::start(&node, &agent.socket, &config, dir.path());

    assert_eq!(agent.accept(), 1, "ztunnel announces ZDS version V1");
    assert_ne!(readiness(&node), Some(200), "ready before the snapshot");
    assert_eq!(agent.ack(&add_line("pod-client", &pod, "client")), "");
    wait_ports(&pod, "pod listeners after add", has_pod_ports);
    let node_ports = listening_ports(&node);
    assert!(
        no_pod_ports(&node_ports),
        "pod listeners must live in the pod's namespace only; the node has {node_ports:?}"
    );
    assert!(
        node_ports.contains(&15021),
        "readiness in the node: {node_ports:?}"
    );

    assert_eq!(agent.ack("snapshot"), "");
    let deadline = Instant::now() + Duration::from_secs(10);
    while readiness(&node) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "ztunnel never ready after the snapshot"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // What ringtun's in-pod mode copies (tests/inpod_state.rs): the workload manager's
    // metrics and /config_dump's workloadState, as ztunnel writes them.
    assert_eq!(workload_manager(&node), [1.0, 0.0, 1.0, 0.0]);
    let (status, body) = http_in(&node, ADMIN, "GET", "/config_dump").expect("config_dump");
    assert_eq!(status, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body).expect("config_dump is JSON");
    // ztunnel also lists each pod's connections (`connections.inbound`/`outbound`), which
    // ringtun does not (yet).
    let ws = &dump["workloadState"];
    assert_eq!(ws.as_object().map(|o| o.len()), Some(1), "{ws}");
    assert_eq!(ws["pod-client"]["state"], "Up", "{ws}");
    assert_eq!(
        ws["pod-client"]["info"],
        serde_json::json!({"name": "client", "namespace": "default", "serviceAccount": "client"}),
        "{ws}"
    );

    assert_eq!(agent.ack("del pod-client"), "");
    wait_ports(&pod, "pod listeners after del", no_pod_ports);
    let deadline = Instant::now() + Duration::from_secs(10);
    while workload_manager(&node) != [0.0, 0.0, 1.0, 1.0] {
        assert!(
            Instant::now() < deadline,
            "ztunnel's proxy never counted stopped: {:?}",
            workload_manager(&node)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(zt.is_alive(), "ztunnel exited:\n{}", zt.text());
}

#[test]
fn ztunnel_carries_pod_to_pod_traffic_for_pods_the_agent_hands_it() {
    let dir = TempDir::new("zds-zt-traffic");
    // The two "pods" joined by a veth (10.77.0.1 client, 10.77.0.2 server), and the node
    // namespace ztunnel runs in.
    let pods = two_nodes("ztt");
    let node = netns("ztn");
    // istio-cni's in-pod rules: outbound to 15001 except ztunnel's own marked sockets, inbound
    // to 15006 except HBONE and the health ports.
    pods.client
        .capture_outbound(15001, DEFAULT_MARK)
        .expect("outbound capture");
    pods.server
        .capture_inbound(15006, &INBOUND_EXCEPT)
        .expect("inbound capture");
    let echo = EchoServer::start(&pods.server, "10.77.0.2:5201").expect("echo server");
    let config = write_config(&dir);
    let mut agent = NodeAgent::start(&dir.join("zds.sock"), dir.path());
    let zt = SharedZtunnel::start(&node, &agent.socket, &config, dir.path());

    agent.accept();
    assert_eq!(
        agent.ack(&add_line("pod-client", &pods.client, "client")),
        ""
    );
    assert_eq!(
        agent.ack(&add_line("pod-server", &pods.server, "server")),
        ""
    );
    assert_eq!(agent.ack("snapshot"), "");
    wait_ports(&pods.client, "client pod listeners", has_pod_ports);
    wait_ports(&pods.server, "server pod listeners", has_pod_ports);

    echo_ok(&pods.client, "10.77.0.2:5201", 1 << 20);
    assert_eq!(echo.records.wait_count(1, IO_TIMEOUT), 1);
    // Both halves are ztunnel's: the client pod's outbound and the server pod's inbound, over
    // HBONE with the pods' own identities.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = zt.text();
        let hbone: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.contains("access")
                    && l.contains("dst.hbone_addr=10.77.0.2:5201")
                    && l.contains("src.identity=\"spiffe://cluster.local/ns/default/sa/client\"")
            })
            .collect();
        if hbone.len() >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no outbound and inbound HBONE access lines from ztunnel:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A connection held open through the client pod, then the pod deleted: ztunnel drains a
    // deleted pod at once (`DrainMode::Immediate`, "workload is gone"), so the connection is
    // cut and the pod leaves workloadState with it, counted as a proxy stopped. (ringtun gives
    // such connections CONNECTION_TERMINATION_DEADLINE and keeps the pod listed until they
    // end: tests/inpod_state.rs.) ztunnel also lists each pod's connections there.
    let mut conn = connect_in(&pods.client, "10.77.0.2:5201").expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    conn.write_all(&[1u8; 64]).expect("write");
    conn.read_exact(&mut buf).expect("echo through ztunnel");
    let workload_state = || {
        let (_, body) = http_in(&node, ADMIN, "GET", "/config_dump").expect("config_dump");
        let v: serde_json::Value = serde_json::from_str(&body).expect("config_dump is JSON");
        v["workloadState"].clone()
    };
    let ws = workload_state();
    assert_eq!(
        ws["pod-client"]["connections"]["outbound"][0]["originalDst"], "10.77.0.2:5201",
        "{ws}"
    );
    assert_eq!(workload_manager(&node), [2.0, 0.0, 2.0, 0.0]);
    assert_eq!(agent.ack("del pod-client"), "");
    let cut = conn
        .write_all(&[2u8; 64])
        .and_then(|()| conn.read_exact(&mut buf));
    assert!(
        cut.is_err(),
        "ztunnel cuts a deleted pod's connection at once"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while workload_state().get("pod-client").is_some() || workload_manager(&node)[3] < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the deleted pod never left: {} {:?}",
            workload_state(),
            workload_manager(&node)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(workload_manager(&node), [1.0, 0.0, 2.0, 1.0]);
}

/// How ztunnel answered one bad message.
#[derive(Debug, PartialEq)]
enum Seen {
    /// An error ack containing this, then the connection closed (ztunnel reconnects).
    NackAndClose(&'static str),
    /// An error ack containing this; the connection stays up.
    Nack(&'static str),
    /// A success ack.
    Ack,
    /// The connection closed without an answer.
    Close,
}

#[test]
fn ztunnel_answers_each_bad_agent_message() {
    let dir = TempDir::new("zds-zt-bad");
    let node = netns("ztn");
    let pod = netns("ztp");
    let config = write_config(&dir);
    let marker = dir.join("not-a-netns");
    std::fs::write(&marker, b"").expect("marker file");
    let mut agent = NodeAgent::start(&dir.join("zds.sock"), dir.path());
    let mut zt = SharedZtunnel::start(&node, &agent.socket, &config, dir.path());
    let w = "default client client";
    let p = pod.path().display().to_string();
    let m = marker.display().to_string();

    agent.accept();
    assert_eq!(agent.ack(&add_line("pod-client", &pod, "client")), "");
    assert_eq!(agent.ack("snapshot"), "");
    wait_ports(&pod, "pod listeners", has_pod_ports);

    let cases: Vec<(String, Seen)> = vec![
        (
            "garbage ffffffff".into(),
            Seen::NackAndClose("failed to decode Protobuf message"),
        ),
        // ztunnel reads a zero-length packet as the end of the stream.
        ("garbage ''".into(), Seen::Close),
        (
            format!("add-nofd pod-x {w}"),
            Seen::NackAndClose("No control message"),
        ),
        // It does not check the fd is a netns: setns fails and the pod is retried every 5 s.
        (
            format!("add-fd pod-x {m} {w}"),
            Seen::Nack("failure to start proxy"),
        ),
        ("del pod-unknown".into(), Seen::Ack),
        (
            format!("add-twofds pod-x {p} {w}"),
            Seen::NackAndClose("Expected 1 FD, got 2"),
        ),
        (
            format!("del-fd pod-client {m}"),
            Seen::NackAndClose("Unexpected control message"),
        ),
        (
            "oversized 5000".into(),
            Seen::NackAndClose("received truncated message"),
        ),
    ];
    for (line, want) in cases {
        let e = agent.cmd(&line);
        let seen = match e["event"].as_str() {
            Some("closed") => Seen::Close,
            Some("ack") => {
                let err = NodeAgent::ack_error(&e, &line);
                let closed = agent_closed(&mut agent);
                match (&want, err.is_empty(), closed) {
                    (Seen::Ack, true, false) => Seen::Ack,
                    (Seen::Nack(s), false, false) if err.contains(s) => Seen::Nack(s),
                    (Seen::NackAndClose(s), false, true) if err.contains(s) => {
                        Seen::NackAndClose(s)
                    }
                    _ => panic!("{line}: ack {err:?}, connection closed: {closed}"),
                }
            }
            _ => panic!("{line}: {e}"),
        };
        assert_eq!(seen, want, "{line}");
        if matches!(seen, Seen::Close | Seen::NackAndClose(_)) {
            // ztunnel reconnects at once; the agent replays its snapshot as istio-cni does.
            agent.accept();
            agent.replay();
        }
        // The pod served before is untouched: a dropped connection removes no pod.
        wait_ports(&pod, &format!("pod listeners after {line}"), has_pod_ports);
        assert!(zt.is_alive(), "ztunnel exited after {line}");
    }
    drop(zt);

    // These three make ztunnel give up on the agent and exit, taking every pod's listeners.
    let fatal = [
        ("keep pod-client", "pod keep received after snapshot"),
        ("snapshot", "pod snapshot received already"),
        (
            "add-noinfo pod-y PATH",
            "workload_info is required but not present",
        ),
    ];
    for (line, want) in fatal {
        let line = line.replace("PATH", &p);
        let mut zt = SharedZtunnel::start(&node, &agent.socket, &config, dir.path());
        agent.accept();
        assert_eq!(agent.ack(&add_line("pod-client", &pod, "client")), "");
        assert_eq!(agent.ack("snapshot"), "");
        wait_ports(&pod, "pod listeners", has_pod_ports);
        let err = agent.ack(&line);
        assert!(err.contains(want), "{line}: {err:?}");
        let status = zt.wait_exit(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| !s.success()),
            "{line}: ztunnel was expected to exit with failure, got {status:?}"
        );
        wait_ports(&pod, &format!("pod listeners after {line}"), no_pod_ports);
    }
}

/// Whether the proxy closed the agent's connection within a second.
fn agent_closed(agent: &mut NodeAgent) -> bool {
    let e = agent.cmd("expect-close 1");
    e["event"] == "closed"
}
