//! `--ktls` on the command line: `on` refuses to start where the kernel cannot offload TLS
//! (the dev host: no `CONFIG_TLS`), `auto` and `off` start and say what they do, bad values
//! are usage errors. No namespaces: the listeners bind to 127.0.0.1 port 0.
//!
//! Where the kernel *can* offload (the kTLS VM), `--ktls on` must start instead; the test
//! follows what `tls_kernel_offload::probe()` says about the kernel it runs on.

mod common;

use std::process::{Command, Output, Stdio};

use common::*;

/// Certificates and a config for one ringtun, in a scratch directory.
fn setup(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    gen_certs(dir.path(), "cluster.local", &["default/client"]);
    write_atomic(
        &dir.join("config.yaml"),
        &mesh_config(&["/10.96.0.10"], false),
    );
    dir
}

fn run_cmd(dir: &TempDir, extra: &[&str]) -> Command {
    let (chain, key) = cert_paths(dir.path(), "default/client");
    let mut cmd = Command::new(ringtun_bin());
    cmd.arg("run")
        .arg("--config")
        .arg(dir.join("config.yaml"))
        .arg("--cert-chain")
        .arg(chain)
        .arg("--key")
        .arg(key)
        .arg("--roots")
        .arg(dir.join("ca.pem"))
        .args([
            "--workload",
            "default/client",
            "--workers",
            "1",
            "--mark",
            "0",
        ])
        .args(["--outbound-listen", "127.0.0.1:0"])
        .args(["--inbound-listen", "127.0.0.1:0"])
        .args(["--inbound-plaintext-listen", "127.0.0.1:0"])
        .args(extra)
        .env("RINGTUN_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

/// Runs ringtun until it exits, or until it logs `ringtun ready` (then kills it); returns
/// whether it got ready and everything it printed.
fn start_or_fail(dir: &TempDir, extra: &[&str]) -> (bool, Output) {
    let log = dir.join(&format!("ringtun-{}.log", extra.join("_")));
    let (ready, status, text) = run_until_ready(run_cmd(dir, extra), &log);
    (
        ready,
        Output {
            status,
            stdout: Vec::new(),
            stderr: text.into_bytes(),
        },
    )
}

#[test]
fn ktls_on_refuses_without_kernel_tls() {
    let cap = tls_kernel_offload::probe();
    let dir = setup("kcli-on");
    let (ready, out) = start_or_fail(&dir, &["--ktls", "on"]);
    let err = String::from_utf8_lossy(&out.stderr);
    if cap.is_available() {
        assert!(
            ready,
            "kTLS is available ({cap}) but --ktls on did not start:\n{err}"
        );
        assert!(err.contains("kTLS available"), "{err}");
        return;
    }
    assert!(!ready, "--ktls on started without kTLS ({cap}):\n{err}");
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit status: {}\n{err}",
        out.status
    );
    assert!(
        err.contains("--ktls on was requested") && err.contains("kTLS unavailable"),
        "the refusal should name the flag and the probe's reason:\n{err}"
    );
    assert!(
        err.contains("--ktls auto"),
        "the refusal should say how to run anyway:\n{err}"
    );
    // The reason is the probe's, errno included (ENOENT on a kernel without CONFIG_TLS).
    if let Some(u) = &cap.unavailable {
        assert!(err.contains(&u.reason), "{err}\n(probe: {})", u.reason);
    }
}

#[test]
fn ktls_auto_and_off_start_and_announce() {
    let cap = tls_kernel_offload::probe();
    let dir = setup("kcli-auto");
    let (ready, out) = start_or_fail(&dir, &["--ktls", "auto"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(ready, "--ktls auto must always start:\n{log}");
    if cap.is_available() {
        assert!(log.contains("kTLS available"), "{log}");
    } else {
        assert!(
            log.contains("kTLS unavailable") && log.contains("userspace rustls"),
            "auto should announce the userspace fallback:\n{log}"
        );
    }

    let (ready, out) = start_or_fail(&dir, &["--ktls", "off"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(ready, "--ktls off must always start:\n{log}");
    assert!(log.contains("kTLS off"), "{log}");
    assert!(
        !log.contains("kTLS available"),
        "off must not probe:\n{log}"
    );
}

#[test]
fn ktls_bad_values_are_usage_errors() {
    let dir = setup("kcli-bad");
    let out = run_cmd(&dir, &["--ktls", "maybe"])
        .output()
        .expect("run ringtun");
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ktls") && err.contains("auto"), "{err}");

    let out = run_cmd(&dir, &["--ktls-tx-record-limit", "0"])
        .output()
        .expect("run ringtun");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ktls-tx-record-limit"), "{err}");
}
