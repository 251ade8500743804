//! Smoke test of the independent Python HBONE peers (`tests/peers/`) across a [`TwoNodes`]
//! topology, without ringtun: it proves the peers themselves work, so that an engine test that
//! fails with them points at the engine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ringtun_testbed::certs::Ca;
use ringtun_testbed::{Process, TwoNodes};

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/peers")
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);
impl TempDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!(
            "ringtun-testbed-peers-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `CA_NAME.pem` and, for each name, `NAME.pem`/`NAME.key` with a SPIFFE URI SAN.
fn write_certs(dir: &Path, ca_name: &str, trust_domain: &str, names: &[&str]) {
    let ca = Ca::new(ca_name).expect("CA");
    ca.write_pem(&dir.join(format!("{ca_name}.pem")))
        .expect("write CA");
    for name in names {
        ca.issue(&format!("spiffe://{trust_domain}/ns/default/sa/{name}"))
            .expect("issue")
            .write(
                &dir.join(format!("{name}.pem")),
                &dir.join(format!("{name}.key")),
            )
            .expect("write leaf");
    }
}

fn read_report(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("read report");
    serde_json::from_str(&text).expect("report is JSON")
}

#[test]
fn python_client_and_server_across_namespaces() {
    let t = TwoNodes::new("rtpy").expect("topology");
    let tmp = TempDir::new();
    let d = &tmp.0;
    write_certs(d, "ca", "cluster.local", &["client", "server"]);
    write_certs(d, "otherca", "cluster.local", &["intruder"]);
    let report = d.join("report.json");
    let p = |f: &str| d.join(f).to_string_lossy().into_owned();

    let mut cmd = t.server.exec("python3");
    cmd.arg(peers_dir().join("hbone_server.py"))
        .args(["--listen", "*:15008"])
        .args(["--cert", &p("server.pem"), "--key", &p("server.key")])
        .args(["--ca", &p("ca.pem"), "--report", &p("report.json")]);
    let mut server = Process::spawn(cmd, "hbone_server.py", &d.join("server.log"))
        .expect("start hbone_server.py");
    server
        .wait_until("writing its report", Duration::from_secs(10), |_| {
            report.exists()
        })
        .expect("hbone_server.py starts");

    let client = |cert: &str, extra: &[&str]| {
        let out = t
            .client
            .exec("python3")
            .arg(peers_dir().join("hbone_client.py"))
            .args(["--connect", "10.77.0.2:15008"])
            .args(["--cert", &p(&format!("{cert}.pem"))])
            .args(["--key", &p(&format!("{cert}.key"))])
            .args(["--ca", &p("ca.pem"), "--authority", "10.77.0.2:5201"])
            .args(extra)
            .output()
            .expect("run hbone_client.py");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("client prints JSON lines"))
            .collect();
        (
            out.status.code(),
            lines,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Good certificate: 200 and a 4 MiB echo, checksums equal; the server saw our identity.
    let (code, lines, err) = client("client", &["--bytes", "4194304", "--header", "x-t: 1"]);
    assert_eq!(code, Some(0), "client failed: {lines:?} {err}");
    let result = lines.last().expect("result line");
    assert_eq!(result["event"], "result");
    assert_eq!(result["sha256_sent"], result["sha256_received"]);
    assert_eq!(result["bytes_received"], 4194304);
    assert_eq!(
        lines[0]["server_identities"][0],
        "spiffe://cluster.local/ns/default/sa/server"
    );
    let r = read_report(&report);
    let conn = &r["connections"][0];
    assert_eq!(
        conn["peer_identities"][0],
        "spiffe://cluster.local/ns/default/sa/client"
    );
    assert!(conn["peer_addr"]
        .as_str()
        .expect("peer_addr")
        .starts_with("10.77.0.1:"));
    let s = &conn["streams"][0];
    assert_eq!(s["method"], "CONNECT");
    assert_eq!(s["authority"], "10.77.0.2:5201");
    assert_eq!(s["sha256_received"], result["sha256_sent"]);
    assert!(s["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .any(|h| h[0] == "x-t" && h[1] == "1"));

    // GET instead of CONNECT: 400, exit code 4.
    let (code, lines, _) = client("client", &["--method", "GET"]);
    assert_eq!(code, Some(4), "{lines:?}");
    assert_eq!(lines[1]["status"], 400);

    // Certificate from another CA: handshake refused, exit code 3, recorded by the server.
    let (code, lines, _) = client("intruder", &[]);
    assert_eq!(code, Some(3), "{lines:?}");
    let r = read_report(&report);
    assert_eq!(r["tls_errors"].as_array().map(Vec::len), Some(1), "{r}");

    // Nothing listening: connect error, exit code 2.
    let out = Command::new("ip")
        .args(["netns", "exec", t.client.name(), "python3"])
        .arg(peers_dir().join("hbone_client.py"))
        .args(["--connect", "10.77.0.2:15999"])
        .args(["--cert", &p("client.pem"), "--key", &p("client.key")])
        .args(["--ca", &p("ca.pem"), "--authority", "10.77.0.2:5201"])
        .output()
        .expect("run hbone_client.py");
    assert_eq!(out.status.code(), Some(2));
}
