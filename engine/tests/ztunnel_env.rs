//! ztunnel's environment variables, read under their own names by `ringtun run`, as an
//! operator's DaemonSet sets them: values that apply show in the start-up line, Go durations
//! are understood, and the ones ringtun cannot honour, or that contradict each other, stop it
//! with a message that names them. Each run is in its own network namespace (the default
//! ports), so the tests run in parallel.

mod common;

use common::*;

/// Runs `ringtun run` in a fresh namespace with `env` set and the workload flag only when
/// `workload` is given; returns whether it got ready and what it printed.
fn run_with_env(tag: &'static str, env: &[(&str, &str)], workload: bool) -> (bool, String) {
    let (ns, dir) = one_node(tag, &["default/client"]);
    let log = dir.join("ringtun.log");
    let mut cmd = one_node_command(
        &ns,
        &dir,
        "default/client",
        workload.then_some("default/client"),
    );
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (ready, _, text) = run_until_ready(&ns, cmd, &log);
    (ready, text)
}

#[test]
fn ztunnel_variables_set_what_they_set_in_ztunnel() {
    let (ready, log) = run_with_env(
        "zev",
        &[
            ("PROXY_MODE", "dedicated"),
            ("ZTUNNEL_WORKER_THREADS", "2"),
            ("IPV6_ENABLED", "false"),
            ("PACKET_MARK", "1337"),
            ("POOL_MAX_STREAMS_PER_CONNECTION", "7"),
            ("POOL_UNUSED_RELEASE_TIMEOUT", "2m30s"),
            ("CONNECTION_TERMINATION_DEADLINE", "1.5s"),
            ("ENABLE_ORIG_SRC", "false"),
        ],
        true,
    );
    assert!(ready, "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("ringtun ready"))
        .expect("ready line");
    for want in [
        "workers=2",
        "0.0.0.0:15001",
        "mark=0x539",
        "pool_max_streams=7",
        "pool_unused_release=150s",
        "drain_deadline=1.5s",
    ] {
        assert!(line.contains(want), "{want} in: {line}");
    }
    assert!(!line.contains("[::]"), "IPV6_ENABLED=false: {line}");
}

#[test]
fn ztunnel_defaults_apply_without_variables() {
    let (ready, log) = run_with_env("zed", &[], true);
    assert!(ready, "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("ringtun ready"))
        .expect("ready line");
    assert!(line.contains("pool_unused_release=300s"), "{line}");
    assert!(line.contains("pool_max_streams=100"), "{line}");
}

#[test]
fn contradictions_and_unsupported_settings_are_refused_by_name() {
    for (tag, env, workload, want) in [
        (
            "zeo",
            vec![("ENABLE_ORIG_SRC", "true")],
            true,
            "ENABLE_ORIG_SRC",
        ),
        (
            "zen",
            vec![("PROXY_MODE", "dedicated")],
            false,
            "PROXY_MODE=dedicated",
        ),
        (
            "zes",
            vec![("PROXY_MODE", "shared")],
            true,
            "PROXY_MODE=shared",
        ),
        (
            "zep",
            vec![("POOL_UNUSED_RELEASE_TIMEOUT", "5 minutes")],
            true,
            "POOL_UNUSED_RELEASE_TIMEOUT",
        ),
        ("zem", vec![("PROXY_MODE", "ambient")], true, "PROXY_MODE"),
    ] {
        let (ready, log) = run_with_env(tag, &env, workload);
        assert!(!ready, "{env:?} must not start: {log}");
        assert!(
            log.contains(want),
            "{env:?}: the message names {want}: {log}"
        );
    }
}
