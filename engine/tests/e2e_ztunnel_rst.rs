//! What the application behind a proxy sees when the HBONE peer resets an established CONNECT
//! stream with an error code (RST_STREAM `INTERNAL_ERROR`, `CONNECT_ERROR`), through the real
//! ztunnel (`../shared/ztunnel/ztunnel`) and through ringtun on each I/O driver, for the same
//! peer behaviour: the peer (`tests/peers/hbone_rst.py`, Python `ssl` + `h2`) sends 32 KiB on
//! the stream, waits, then resets it.
//!
//! - Outbound: the application's TCP connection is captured by the client node's proxy, the
//!   peer is the HBONE server on the server node.
//! - Inbound: the peer is the HBONE client; the server node's proxy connects to a backend on
//!   the server node, and the backend is what reads.
//!
//! Each side reads until end of file or error: the bytes it got and whether it ended with a
//! FIN or a RST must be ztunnel's. Needs root, python3 with `h2` and the ztunnel binary;
//! fails, never skips, without them.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::*;
use ringtun_testbed::transfer::read_to_end_or_error;
use ringtun_testbed::{Netns, Process};

/// The codes a peer resets with: INTERNAL_ERROR and CONNECT_ERROR (RFC 9113 section 7).
const CODES: [u32; 2] = [2, 10];
/// What the peer sends before its reset.
const BYTES: usize = 32 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// The proxy under test.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Ztunnel,
    Ringtun(&'static str),
}

/// Keeps a proxy running; killed on drop.
enum Proxy {
    // Held for its drop.
    Z(#[allow(dead_code)] Ztunnel),
    R(Ringtun),
}

impl Proxy {
    fn start(kind: Kind, ns: &Netns, who: &str, dir: &TempDir, config: &std::path::Path) -> Self {
        match kind {
            Kind::Ztunnel => Proxy::Z(Ztunnel::start(ns, who, config, dir.path())),
            Kind::Ringtun(driver) => {
                let mut extra = one_worker();
                extra.extend(["--io-driver".into(), driver.into()]);
                Proxy::R(Ringtun::start_as(ns, who, dir.path(), config, extra))
            }
        }
    }

    fn check(&self) {
        if let Proxy::R(r) = self {
            r.assert_no_panic();
        }
    }
}

/// How a read loop ended, and after how many bytes: `"32768 bytes, fin"` / `"…, rst"`.
fn seen(s: &mut TcpStream) -> String {
    use std::io::ErrorKind;
    s.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
    let (got, end) = read_to_end_or_error(s);
    let how = match end {
        Ok(()) => "fin".to_owned(),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => "rst".to_owned(),
        Err(e) => format!("error {:?}", e.kind()),
    };
    format!("{} bytes, {how}", got.len())
}

/// The backend's connection, if one comes within [`READ_TIMEOUT`] (a failing peer must fail
/// the test, not leave it waiting).
fn accept_within(listener: &std::net::TcpListener) -> Option<TcpStream> {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = std::time::Instant::now() + READ_TIMEOUT;
    while std::time::Instant::now() < deadline {
        match listener.accept() {
            Ok((c, _)) => {
                c.set_nonblocking(false).expect("blocking");
                return Some(c);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    None
}

/// `hbone_rst.py` arguments common to both roles: the identity's certificate and the code.
fn peer_cmd(
    ns: &Netns,
    dir: &TempDir,
    identity: &str,
    role: &str,
    code: u32,
) -> std::process::Command {
    let (cert, key) = cert_paths(dir.path(), identity);
    let mut cmd = ns.exec("python3");
    cmd.arg(peers_dir().join("hbone_rst.py"))
        .args(["--role", role, "--code", &code.to_string()])
        .args(["--bytes", &BYTES.to_string()])
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--ca")
        .arg(dir.join("ca.pem"));
    cmd
}

/// Outbound: what the application sees, per code, when the HBONE server resets the stream.
fn outbound(kind: Kind, prefix: &'static str) -> Vec<String> {
    let (nodes, dir, config) = ztunnel_topology(prefix, &ztunnel_config());
    let proxy = Proxy::start(kind, &nodes.client, "client", &dir, &config);
    let out = CODES
        .iter()
        .map(|&code| {
            let cmd = peer_cmd(&nodes.server, &dir, "default/server", "server", code);
            let log = dir.join(&format!("hbone-rst-server-{code}.log"));
            let peer = Process::spawn(cmd, "hbone_rst.py (server)", &log).expect("spawn peer");
            peer.wait_log_line(&["listening"], Duration::from_secs(15))
                .unwrap_or_else(|e| panic!("{e}"));
            let mut app =
                ringtun_testbed::connect_in(&nodes.client, "10.77.0.2:5201").expect("connect");
            let s = seen(&mut app);
            peer.wait_log_line(&["reset_sent"], Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("the peer never reset: {e}"));
            format!("code {code}: {s}")
        })
        .collect();
    proxy.check();
    out
}

/// Inbound: what the backend sees, per code, when the HBONE client resets the stream.
fn inbound(kind: Kind, prefix: &'static str) -> Vec<String> {
    // No capture on the client node: the peer speaks HBONE itself.
    let (nodes, dir, config) = mesh_files(prefix, &ztunnel_config(), use_test_ca);
    let proxy = Proxy::start(kind, &nodes.server, "server", &dir, &config);
    let listener = bind_in(&nodes.server, "0.0.0.0:5201");
    let out = CODES
        .iter()
        .map(|&code| {
            std::thread::scope(|s| {
                let backend = s.spawn(|| accept_within(&listener).map(|mut c| seen(&mut c)));
                let out = peer_cmd(&nodes.client, &dir, "default/client", "client", code)
                    .output()
                    .expect("run hbone_rst.py");
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success() && stdout.contains("reset_sent"),
                    "the peer never reset: {stdout}{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let s = backend.join().expect("backend");
                format!(
                    "code {code}: {}",
                    s.unwrap_or_else(|| "no connection".into())
                )
            })
        })
        .collect();
    proxy.check();
    out
}

const RINGTUNS: [(&str, &str, &str); 2] =
    [("io-uring", "rsou", "rsiu"), ("legacy", "rsol", "rsil")];

#[test]
fn peer_reset_with_an_error_code_outbound_is_ztunnels() {
    let reference = outbound(Kind::Ztunnel, "rsoz");
    eprintln!("ztunnel, outbound: {reference:?}");
    for (driver, prefix, _) in RINGTUNS {
        let ours = outbound(Kind::Ringtun(driver), prefix);
        eprintln!("ringtun {driver}, outbound: {ours:?}");
        assert_eq!(ours, reference, "ringtun ({driver}) vs ztunnel, outbound");
    }
}

#[test]
fn peer_reset_with_an_error_code_inbound_is_ztunnels() {
    let reference = inbound(Kind::Ztunnel, "rsiz");
    eprintln!("ztunnel, inbound: {reference:?}");
    for (driver, _, prefix) in RINGTUNS {
        let ours = inbound(Kind::Ringtun(driver), prefix);
        eprintln!("ringtun {driver}, inbound: {ours:?}");
        assert_eq!(ours, reference, "ringtun ({driver}) vs ztunnel, inbound");
    }
}
