//! Interop with the real ztunnel (`../shared/ztunnel/ztunnel`, Istio's release build with its
//! test CA), end to end in network namespaces: ringtun → ztunnel and ztunnel → ringtun carry
//! checksummed bytes both ways through the service VIP, and each names the other's SPIFFE
//! identity. ringtun's certificates are issued from ztunnel's test CA (its `FAKE_CA` signs its
//! own). Without the binary the tests fail, never skip.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use ringtun_testbed::{echoed_bytes, Netns, TwoNodes};

const MIB: u64 = 1 << 20;
const LOG_WAIT: Duration = Duration::from_secs(10);

fn config() -> String {
    ztunnel_config()
}

fn topology(prefix: &'static str, config: &str) -> (TwoNodes, TempDir, PathBuf) {
    ztunnel_topology(prefix, config)
}

fn ringtun(ns: &Netns, who: &str, dir: &TempDir, config: &Path) -> Ringtun {
    Ringtun::start_as(ns, who, dir.path(), config, one_worker())
}

#[test]
fn ringtun_client_to_ztunnel_server() {
    let (nodes, dir, path) = topology("zrz", &config());
    let server = Ztunnel::start(&nodes.server, "server", &path, dir.path());
    let client = ringtun(&nodes.client, "client", &dir, &path);
    let _echo = echo_server(&nodes.server, "0.0.0.0:5201");
    let t = echo_ok(&nodes.client, "10.96.0.10:80", 4 * MIB);
    assert_eq!(t.sha_sent, t.sha_received);
    let line = client.wait_access("through ztunnel", LOG_WAIT, |l| {
        l.is("src.addr", &t.local.to_string())
    });
    assert!(line.is("end", "closed"), "{}", line.raw);
    assert!(line.is("dst.identity", SERVER_ID), "{}", line.raw);
    assert_eq!(line.num("bytes_recv"), 4 * MIB, "{}", line.raw);
    let zl = server.wait_access(&["connection complete", CLIENT_ID]);
    assert!(zl.contains("direction=\"inbound\""), "{zl}");
    client.assert_no_panic();
}

#[test]
fn ztunnel_client_to_ringtun_server() {
    let (nodes, dir, path) = topology("zzr", &config());
    let server = ringtun(&nodes.server, "server", &dir, &path);
    let client = Ztunnel::start(&nodes.client, "client", &path, dir.path());
    let echo = echo_server(&nodes.server, "0.0.0.0:5201");
    let t = echo_ok(&nodes.client, "10.96.0.10:80", 4 * MIB);
    echo.records
        .wait_for(LOG_WAIT, |r| r.sha256 == t.sha_sent)
        .expect("the workload got every byte");
    let line = server.wait_access("from ztunnel", LOG_WAIT, |l| l.is("direction", "inbound"));
    assert!(line.is("end", "closed"), "{}", line.raw);
    assert!(line.is("src.identity", CLIENT_ID), "{}", line.raw);
    assert_eq!(line.num("bytes_recv"), 4 * MIB, "{}", line.raw);
    let zl = client.wait_access(&["connection complete", SERVER_ID]);
    assert!(zl.contains("direction=\"outbound\""), "{zl}");
    server.assert_no_panic();
}

/// DENY the client identity on the server workload.
fn config_denying_client() -> String {
    config().replace(
        "policies: []\n",
        r#"policies:
- name: deny-client
  namespace: default
  scope: Namespace
  action: Deny
  dryRun: false
  rules:
  - - - principals: [!Exact "cluster.local/ns/default/sa/client"]
"#,
    )
}

/// What a client in `ns` sees of a refused connection through the VIP: the connect, a write
/// and a read; it must not get an echo.
fn refused_through_vip(ns: &Netns) {
    let n = echoed_bytes(ns, "10.96.0.10:80");
    assert_eq!(n, 0, "a denied connection echoed {n} bytes");
}

#[test]
fn each_side_reads_the_others_policy_refusal() {
    // ztunnel denies, ringtun's client side reports the 401 it got.
    {
        let (nodes, dir, path) = topology("zdz", &config_denying_client());
        let _server = Ztunnel::start(&nodes.server, "server", &path, dir.path());
        let client = ringtun(&nodes.client, "client", &dir, &path);
        let _echo = echo_server(&nodes.server, "0.0.0.0:5201");
        refused_through_vip(&nodes.client);
        let line = client.wait_access("refused by ztunnel", LOG_WAIT, |l| {
            l.is("direction", "outbound") && l.is("end", "error")
        });
        assert!(
            line.get("error").is_some_and(|r| r.contains("401")),
            "{}",
            line.raw
        );
    }
    // ringtun denies, ztunnel's client side reports the 401 it got.
    {
        let (nodes, dir, path) = topology("zdr", &config_denying_client());
        let server = ringtun(&nodes.server, "server", &dir, &path);
        let client = Ztunnel::start(&nodes.client, "client", &path, dir.path());
        let _echo = echo_server(&nodes.server, "0.0.0.0:5201");
        refused_through_vip(&nodes.client);
        let line = server.wait_access("the denial", LOG_WAIT, |l| l.is("direction", "inbound"));
        assert!(line.is("response_flags", "DENY"), "{}", line.raw);
        let zl = client.wait_access(&["error=\"http status: 401"]);
        assert!(zl.contains("direction=\"outbound\""), "{zl}");
    }
}
