//! HTTP/2 abuse from a client with a valid certificate (`tests/peers/h2_abuse.py`): rapid
//! reset, CONTINUATION floods and oversized header blocks are cut off or refused while other
//! clients keep being served, and the server stays up.
//!
//! Each test builds its own namespaces; they need root and fail without it.

mod common;

use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const LOG_WAIT: Duration = Duration::from_secs(10);

#[test]
fn rapid_reset_flood_is_cut_off_while_others_are_served() {
    let t = ServerOnly::start("oar");
    let (flood, normal) = t.abuse_while_serving(
        "rapid-reset",
        &["--authority", "10.77.0.2:5201", "--count", "20000"],
        Duration::from_millis(200),
        4 * MIB,
    );
    let r = abuse_result(&flood);
    eprintln!("rapid reset: {r}");
    assert!(
        disconnected(&r),
        "the server kept serving a client that reset {} streams: {r}",
        r["streams_sent"]
    );
    assert_echoed(&normal, 4 * MIB);
    assert!(t.server.is_alive(), "ringtun died");
    t.server.assert_no_panic();
    // Still serving afterwards.
    let run = py_client(
        &t.nodes.client,
        &t.dir,
        "default.client",
        "10.77.0.2:5201",
        MIB,
    );
    assert_echoed(&run, MIB);
}

#[test]
fn continuation_flood_is_cut_off_while_others_are_served() {
    let t = ServerOnly::start("oac");
    // Many empty CONTINUATION frames, then large ones.
    for (frame_size, count) in [("0", "2000000"), ("4096", "20000")] {
        let (flood, normal) = t.abuse_while_serving(
            "continuation",
            &[
                "--authority",
                "10.77.0.2:5201",
                "--frame-size",
                frame_size,
                "--count",
                count,
            ],
            Duration::from_millis(200),
            4 * MIB,
        );
        let r = abuse_result(&flood);
        eprintln!("CONTINUATION flood of {frame_size}-byte frames: {r}");
        assert!(
            disconnected(&r),
            "the server took {} CONTINUATION frames of {frame_size} bytes without hanging up: {r}",
            r["continuation_frames_sent"]
        );
        assert!(
            r["continuation_frames_sent"].as_u64() < count.parse().ok(),
            "the server read the whole flood before hanging up: {r}"
        );
        assert_echoed(&normal, 4 * MIB);
        assert!(t.server.is_alive(), "ringtun died");
    }
    assert_eq!(
        t.echo.records.all().len(),
        2,
        "the flooded requests never reached the workload"
    );
    t.server.assert_no_panic();
}

#[test]
fn oversized_headers_are_refused_and_the_server_stays_up() {
    let t = ServerOnly::start("obh");
    // Control: a header block well under the 16 KiB limit is served.
    let run = h2_abuse(
        &t.nodes.client,
        &t.dir,
        "big-headers",
        &["--authority", "10.77.0.2:5201", "--header-bytes", "4000"],
    );
    let r = abuse_result(&run);
    assert_eq!(r["statuses"]["1"], 200, "a 4 KB header block is fine: {r}");
    t.echo.records.wait_count(1, LOG_WAIT);

    let run = h2_abuse(
        &t.nodes.client,
        &t.dir,
        "big-headers",
        &["--authority", "10.77.0.2:5201", "--header-bytes", "40000"],
    );
    let r = abuse_result(&run);
    eprintln!("oversized headers: {r}");
    assert_ne!(
        r["statuses"]["1"], 200,
        "a 40 KB header block was accepted: {r}"
    );
    assert!(
        !r["statuses"]["1"].is_null() || !r["rst"]["1"].is_null() || disconnected(&r),
        "the oversized request got no answer at all: {r}"
    );
    assert_eq!(
        t.echo.records.all().len(),
        1,
        "the oversized request never reached the workload"
    );
    assert!(t.server.is_alive(), "ringtun died");
    let run = py_client(
        &t.nodes.client,
        &t.dir,
        "default.client",
        "10.77.0.2:5201",
        MIB,
    );
    assert_echoed(&run, MIB);
    t.server.assert_no_panic();
}
