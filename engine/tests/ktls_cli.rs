//! `--ktls` on the command line: `on` refuses to start where the kernel cannot offload TLS
//! (the dev host: no `CONFIG_TLS`), `auto` and `off` start and say what they do, bad values
//! are usage errors. Each ringtun runs in a network namespace of its own, so that its readiness
//! port (15021, what the tests wait on) and its other operator ports are its own; the proxy
//! listeners bind to 127.0.0.1 port 0.
//!
//! Where the kernel *can* offload (the kTLS VM), `--ktls on` must start instead; the test
//! follows what `tls_kernel_offload::probe()` says about the kernel it runs on.

mod common;

use std::process::{Command, Output, Stdio};

use common::*;
use ringtun_testbed::Netns;

fn run_cmd(ns: &Netns, dir: &TempDir, extra: &[&str]) -> Command {
    let mut cmd = one_node_command(ns, dir, "default/client", Some("default/client"));
    cmd.args(["--workers", "1", "--mark", "0"])
        .args(["--outbound-listen", "127.0.0.1:0"])
        .args(["--inbound-listen", "127.0.0.1:0"])
        .args(["--inbound-plaintext-listen", "127.0.0.1:0"])
        .args(extra)
        .stdin(Stdio::null());
    cmd
}

/// Runs ringtun until it exits, or until it answers ready on 15021 (then kills it); returns
/// whether it got ready and everything it printed.
fn start_or_fail(ns: &Netns, dir: &TempDir, extra: &[&str]) -> (bool, Output) {
    let log = dir.join(&format!("ringtun-{}.log", extra.join("_")));
    let (ready, status, text) = run_until_ready(ns, run_cmd(ns, dir, extra), &log);
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
    let (ns, dir) = one_node("kcon", &["default/client"]);
    let (ready, out) = start_or_fail(&ns, &dir, &["--ktls", "on"]);
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
    let (ns, dir) = one_node("kcau", &["default/client"]);
    let (ready, out) = start_or_fail(&ns, &dir, &["--ktls", "auto"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(ready, "--ktls auto must always start:\n{log}");
    if cap.is_available() {
        assert!(log.contains("kTLS available"), "{log}");
    } else {
        assert!(
            log.contains("kTLS unavailable") && log.contains("ringtun's record layer"),
            "auto should announce the userspace fallback, on ringtun's own records by default:\n{log}"
        );
    }

    let (ready, out) = start_or_fail(&ns, &dir, &["--ktls", "off"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(ready, "--ktls off must always start:\n{log}");
    assert!(log.contains("kTLS off"), "{log}");
    assert!(
        !log.contains("kTLS available"),
        "off must not probe:\n{log}"
    );

    // The other userspace record layer is named as such.
    let (ready, out) = start_or_fail(&ns, &dir, &["--ktls", "off", "--tls-records", "rustls"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(ready, "--tls-records rustls must start:\n{log}");
    assert!(
        log.contains("kTLS off") && log.contains("userspace rustls (--tls-records rustls)"),
        "{log}"
    );
}

#[test]
fn ktls_bad_values_are_usage_errors() {
    let (ns, dir) = one_node("kcbd", &["default/client"]);
    let out = run_cmd(&ns, &dir, &["--ktls", "maybe"])
        .output()
        .expect("run ringtun");
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ktls") && err.contains("auto"), "{err}");

    let out = run_cmd(&ns, &dir, &["--ktls-tx-record-limit", "0"])
        .output()
        .expect("run ringtun");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ktls-tx-record-limit"), "{err}");

    // Above the default (half of where a rustls peer rekeys) is refused too.
    let out = run_cmd(&ns, &dir, &["--ktls-rx-record-limit", "16777216"])
        .output()
        .expect("run ringtun");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ktls-rx-record-limit"), "{err}");
}
