//! In-pod mode as an operator sees it, ztunnel's way: `/config_dump`'s `workloadState` and the
//! `workload_manager_*` metrics while pods are added, fail to set up, are retried, deleted and
//! drained.
//!
//! - A pod whose listeners cannot be made (its 15001 is taken) gets an error ack, shows as
//!   `Pending`, keeps ringtun unready (ztunnel's readiness) and is retried every 5 s; once the
//!   port is free it is `Up` and ringtun is ready.
//! - A pod deleted while one of its connections runs stays in `workloadState` (no longer an
//!   active proxy) until that connection ends; then it leaves and counts as a proxy stopped.

mod common;
mod inpod_common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use inpod_common::node::*;
use inpod_common::*;

/// `/config_dump`'s `workloadState` of the ringtun in `node`.
fn workload_state(node: &ringtun_testbed::Netns) -> serde_json::Value {
    let (status, body) = http_in(node, ADMIN, "GET", "/config_dump").expect("GET /config_dump");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("config_dump is JSON");
    v["workloadState"].clone()
}

/// Waits until `cond` holds on what `read` returns; fails with the last value.
fn wait_for<T: std::fmt::Debug>(what: &str, read: impl Fn() -> T, cond: impl Fn(&T) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = read();
        if cond(&v) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {v:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pending_pods_are_retried_and_deleted_pods_show_until_their_connections_end() {
    let dir = TempDir::new("inpod-state");
    let pods = two_nodes("ist");
    let node = netns("isn");
    // The server pod is no mesh member here: the client pod's connections go to it in plaintext
    // from the client pod's own namespace.
    let config = dir.join("config.yaml");
    let text = mesh_config(&["/10.96.0.10"], false).replacen(
        "workloadName: server\n  workloadIps: [\"10.77.0.2\"]\n  protocol: HBONE",
        "workloadName: server\n  workloadIps: [\"10.77.0.2\"]\n  protocol: TCP",
        1,
    );
    assert!(text.contains("protocol: TCP"), "config edit: {text}");
    std::fs::write(&config, text).expect("write config");
    capture_pod(&pods.client);
    let _echo = echo_server(&pods.server, "10.77.0.2:5201");
    let ca = NodeCa::generate(&dir.join("ca"));
    let mut agent = NodeAgent::start(&dir.join("zds.sock"), dir.path());
    // Long enough that the deleted pod's connection is never cut: it ends when the client says.
    let env = [("CONNECTION_TERMINATION_DEADLINE", "60s")];
    let mut ringtun = spawn_shared(
        &node,
        "state",
        dir.path(),
        &config,
        &agent.socket,
        &ca,
        &env,
    );
    assert_eq!(agent.accept(), 1, "ringtun announces ZDS V1");

    // Something else holds 15001 in the pod: its listeners cannot be made.
    let blocker = bind_in(&pods.client, "0.0.0.0:15001");
    let err = agent.ack(&add_pod("uid-client", &pods.client, "client"));
    assert!(
        err.contains("15001"),
        "an error ack naming the port: {err:?}"
    );
    assert_eq!(agent.ack("snapshot"), "");
    let ws = workload_state(&node);
    assert_eq!(ws["uid-client"]["state"], "Pending", "{ws}");
    assert_eq!(ws["uid-client"]["info"]["serviceAccount"], "client", "{ws}");
    assert_eq!(
        workload_manager(&node),
        [0.0, 1.0, 0.0, 0.0],
        "active, pending, started, stopped"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_ne!(readiness(&node), 200, "not ready while a pod is pending");

    // The port is free again: the retry (every 5 s) serves the pod.
    drop(blocker);
    wait_for(
        "the pending pod served on retry",
        || workload_state(&node)["uid-client"]["state"].clone(),
        |s| s == "Up",
    );
    wait_ready(&mut ringtun, &node);
    wait_ports(&pods.client, "client listeners", |p| p.contains(&15001));
    assert_eq!(workload_manager(&node), [1.0, 0.0, 1.0, 0.0]);

    // A connection through the pod's 15001, checked by its echo, held open.
    let mut conn = connect_in(&pods.client, "10.77.0.2:5201").expect("connect through 15001");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut echoed = [0u8; 64];
    conn.write_all(&[7u8; 64]).expect("write");
    conn.read_exact(&mut echoed)
        .expect("echo through the pod's proxy");
    assert_eq!(echoed, [7u8; 64]);

    assert_eq!(agent.ack("del uid-client"), "");
    wait_ports(&pods.client, "listeners gone", |p| !p.contains(&15001));
    let ws = workload_state(&node);
    assert_eq!(
        ws["uid-client"]["state"], "Up",
        "deleted, its connection still runs: {ws}"
    );
    assert_eq!(
        workload_manager(&node),
        [0.0, 0.0, 1.0, 0.0],
        "no longer active, not stopped yet"
    );
    // The connection still carries bytes.
    conn.write_all(&[9u8; 64]).expect("write after del");
    conn.read_exact(&mut echoed).expect("echo after del");
    assert_eq!(echoed, [9u8; 64]);

    drop(conn);
    wait_for(
        "the deleted pod leaves with its last connection",
        || workload_state(&node),
        |ws| ws.as_object().is_some_and(|o| o.is_empty()),
    );
    assert_eq!(workload_manager(&node), [0.0, 0.0, 1.0, 1.0]);
    ringtun.stop(Duration::from_secs(5));
}
