//! The connection lifecycle without sockets: a record is written exactly once, whether its
//! path finished, refused, or its task was dropped mid-way; and the bytes it logs mean what
//! ztunnel's do.

use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Context, Waker};
use std::time::Duration;

use super::access::Direction;
use super::copy::End;
use super::lifecycle::{Record, DROPPED};
use crate::decide::Refusal;
use crate::metrics::{Reporter, Series, TcpCounts, TcpLabels};
use crate::shard::{live, Tally};

/// The access lines `f` writes (on this thread, where the log's filter takes them: info and
/// above, as `RUST_LOG=info`).
fn access_lines(f: impl FnOnce()) -> Vec<String> {
    let subscriber = tracing_subscriber::fmt()
        .with_writer(std::io::sink)
        .with_max_level(tracing::Level::INFO)
        .finish();
    crate::operate::log_buffer::take_written();
    tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(crate::operate::log_buffer::take_written()).unwrap();
    text.lines()
        .filter(|l| l.contains("\taccess\t"))
        .map(str::to_owned)
        .collect()
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line
        .find(&format!(" {key}="))
        .or_else(|| line.find(&format!("\t{key}=")))?
        + key.len()
        + 2;
    let rest = &line[start..];
    Some(match rest.strip_prefix('"') {
        Some(quoted) => &quoted[..quoted.find('"').unwrap_or(quoted.len())],
        None => rest.split(' ').next().unwrap_or(rest),
    })
}

fn src() -> SocketAddr {
    "10.0.0.1:40000".parse().unwrap()
}

/// The one series in the tally's metrics.
fn series(tally: &Tally) -> (TcpLabels, TcpCounts) {
    let mut all = tally.metrics.export();
    assert_eq!(all.len(), 1, "{all:?}");
    all.remove(0)
}

/// Runs `f` on a monoio runtime (the live registry spawns its sweeper there).
fn on_runtime<T>(f: impl Future<Output = T>) -> T {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Registers a live connection as the shard would, without a shard.
fn track(series: Option<(Rc<Series>, bool)>) -> live::Conn {
    let conn = live::Conn::new(Duration::ZERO, None);
    if let Some((labels, reversed)) = series {
        conn.count_in(labels, reversed);
    }
    conn
}

#[test]
fn a_task_dropped_before_its_path_ended_still_writes_its_record() {
    let tally = Rc::new(Tally::default());
    let lines = access_lines(|| {
        let task = async {
            let mut record: Record =
                Record::with_tally(tally.clone(), 3, Direction::Outbound, src());
            record.log().dst_addr = Some("10.96.0.10:80".parse().unwrap());
            std::future::pending::<()>().await;
            record.finish(End::Closed);
        };
        let mut task = Box::pin(task);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(task.as_mut().poll(&mut cx).is_pending());
        drop(task);
    });
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert!(line.contains("\terror\t"), "{line}");
    assert!(line.contains("connection complete"), "{line}");
    assert_eq!(field(line, "end"), Some("error"), "{line}");
    assert_eq!(field(line, "error"), Some(DROPPED), "{line}");
    assert_eq!(field(line, "dst.addr"), Some("10.96.0.10:80"), "{line}");
    assert_eq!(field(line, "shard"), Some("3"), "{line}");
    // As ztunnel's record dropped before its end: opened, closed and failed.
    let (_, counts) = series(&tally);
    assert_eq!((counts.opened, counts.failed, counts.closed), (1, 1, 1));
}

#[test]
fn a_copy_cancelled_mid_way_records_its_bytes_and_closes_its_series() {
    let tally = Rc::new(Tally::default());
    let lines = access_lines(|| {
        on_runtime(async {
            let mut record: Record =
                Record::with_tally(tally.clone(), 0, Direction::Outbound, src());
            let conn = record.carry_with(false, track);
            conn.moved(0, 7);
            conn.moved(1, 3);
            // The task goes away: the copy (holding `conn`) and the record drop together.
            drop(conn);
            drop(record);
        })
    });
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(field(line, "error"), Some(DROPPED), "{line}");
    assert_eq!(field(line, "bytes_sent"), Some("7"), "{line}");
    assert_eq!(field(line, "bytes_recv"), Some("3"), "{line}");
    let (labels, counts) = series(&tally);
    assert_eq!(labels.reporter, Some(Reporter::Source));
    assert_eq!((counts.opened, counts.closed, counts.failed), (1, 1, 0));
    assert_eq!((counts.received, counts.sent), (7, 3));
}

/// Pins what the byte fields mean, on both ends, against ztunnel: the access log counts from
/// the point of view of the workload the record reports for (`bytes_sent` outbound is the
/// request, inbound the response: ztunnel's `ConnectionResult` "unflips" Istio's metric for
/// logs); the metrics count the request as `received` on both ends.
#[test]
fn bytes_mean_what_ztunnel_means_in_the_log_and_in_the_metrics() {
    const REQUEST: u64 = 7;
    const RESPONSE: u64 = 3;
    for (direction, reversed, sent, received) in [
        (Direction::Outbound, false, REQUEST, RESPONSE),
        (Direction::Passthrough, false, REQUEST, RESPONSE),
        // Inbound copies run from the destination's socket: direction 0 is the response.
        (Direction::Inbound, true, RESPONSE, REQUEST),
        (Direction::InboundPlaintext, false, RESPONSE, REQUEST),
    ] {
        let tally = Rc::new(Tally::default());
        let lines = access_lines(|| {
            on_runtime(async {
                let mut record: Record = Record::with_tally(tally.clone(), 0, direction, src());
                let conn = record.carry_with(reversed, track);
                let (first, second) = if reversed {
                    (RESPONSE, REQUEST)
                } else {
                    (REQUEST, RESPONSE)
                };
                conn.moved(0, first);
                conn.moved(1, second);
                drop(conn);
                record.finish(End::Closed);
            })
        });
        let line = &lines[0];
        assert_eq!(field(line, "end"), Some("closed"), "{line}");
        assert_eq!(
            field(line, "bytes_sent"),
            Some(sent.to_string().as_str()),
            "{direction:?}: {line}"
        );
        assert_eq!(
            field(line, "bytes_recv"),
            Some(received.to_string().as_str()),
            "{direction:?}: {line}"
        );
        let (_, counts) = series(&tally);
        assert_eq!(
            (counts.received, counts.sent),
            (REQUEST, RESPONSE),
            "{direction:?}: Istio's received is the request on both ends"
        );
    }
}

#[test]
fn a_refusal_is_logged_and_counted_as_ztunnel_does() {
    let tally = Rc::new(Tally::default());
    let lines = access_lines(|| {
        let record: Record =
            Record::with_tally(tally.clone(), 0, Direction::InboundPlaintext, src());
        record.refuse(&Refusal::NotServed {
            dst: "10.0.0.9".parse().unwrap(),
        });
        let record: Record = Record::with_tally(tally.clone(), 0, Direction::Inbound, src());
        record.refuse(&Refusal::Denied {
            detail: "explicitly denied by: default/deny".into(),
        });
    });
    assert_eq!(lines.len(), 2, "{lines:?}");
    // Refused before a destination was chosen: ztunnel's early `connection failed`, a warning.
    assert!(lines[0].contains("\twarn\t") && lines[0].contains("connection failed"));
    assert_eq!(field(&lines[0], "response_flags"), Some("CONNECT"));
    assert_eq!(
        field(&lines[0], "error"),
        Some("unknown destination: 10.0.0.9")
    );
    assert!(lines[1].contains("\terror\t") && lines[1].contains("connection complete"));
    assert_eq!(field(&lines[1], "response_flags"), Some("DENY"));
    assert_eq!(
        field(&lines[1], "error"),
        Some("connection closed due to policy rejection: explicitly denied by: default/deny")
    );
    assert_eq!(tally.counters.failed.get(), 2);
    // Istio's metrics count only the denial (as ztunnel: opened, then closed and failed with
    // its flag); the early refusal is in none.
    let counts: Vec<(String, u64, u64, u64)> = tally
        .metrics
        .export()
        .into_iter()
        .map(|(l, c)| (l.response_flags, c.opened, c.closed, c.failed))
        .collect();
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(counts.contains(&(String::new(), 1, 0, 0)), "{counts:?}");
    assert!(counts.contains(&("DENY".into(), 0, 1, 1)), "{counts:?}");
}

#[test]
fn a_connection_cut_by_a_policy_update_is_flagged_deny() {
    let tally = Rc::new(Tally::default());
    let lines = access_lines(|| {
        on_runtime(async {
            let mut record: Record =
                Record::with_tally(tally.clone(), 0, Direction::Inbound, src());
            let conn = record.carry_with(true, track);
            drop(conn);
            record.finish(End::Revoked("no longer allowed".into()));
        })
    });
    assert_eq!(field(&lines[0], "response_flags"), Some("DENY"));
    assert_eq!(field(&lines[0], "end"), Some("error"));
    assert_eq!(
        tally.counters.failed.get(),
        0,
        "it was carried, not refused"
    );
    // As in ztunnel, the close is counted with the flag the end set.
    let counts: Vec<(String, u64, u64)> = tally
        .metrics
        .export()
        .into_iter()
        .map(|(l, c)| (l.response_flags, c.opened, c.closed))
        .collect();
    assert!(counts.contains(&(String::new(), 1, 0)), "{counts:?}");
    assert!(counts.contains(&("DENY".into(), 0, 1)), "{counts:?}");
}

#[test]
fn a_record_is_two_pointers() {
    // What a connection's task holds for its record while it copies.
    assert_eq!(
        std::mem::size_of::<Record>(),
        2 * std::mem::size_of::<usize>()
    );
}

#[test]
fn a_live_connections_record_fits_in_256_bytes() {
    // Every idle connection keeps its record's box for life; mimalloc's size classes around
    // it are 224, 256 and 320 bytes. Inbound has no pool slot to hold.
    let inbound = super::lifecycle::entry_size::<()>();
    let outbound = super::lifecycle::entry_size::<Option<crate::shard::pool::Slot>>();
    assert!(inbound <= 224, "inbound record {inbound} bytes");
    assert!(outbound <= 256, "outbound record {outbound} bytes");
}

/// The size of what `f` returns, without calling it.
fn returned_size<A, B, C, D, R>(_: fn(A, B, C, D) -> R) -> usize {
    std::mem::size_of::<R>()
}

#[test]
fn the_copy_leaves_its_connections_task_in_the_512_byte_class() {
    // Every tunnelled connection's task holds this future for life. Inbound, the task adds the
    // stream's record (16 bytes), the opening's box (8), their drop flags, and monoio's header
    // (24), trailer (16) and stage tag (8): 88 bytes in all. Past 424 the task moves from
    // mimalloc's 512-byte class to 640, 128 bytes more per idle connection.
    let copy = returned_size(super::copy::tcp_h2 as fn(_, _, _, _) -> _);
    assert!(copy <= 424, "tcp_h2's future is {copy} bytes");
}

#[test]
fn an_idle_outbound_connections_task_fits_in_512_bytes() {
    // monoio's task around it adds its header (24 bytes), trailer (16) and stage tag (8), and
    // `serve::Counted` its shard handle (8): past 456 bytes the task moves from mimalloc's
    // 512-byte class to 640.
    let handle = returned_size(super::outbound::handle as fn(_, _, _, _) -> _);
    assert!(handle <= 456, "outbound::handle's future is {handle} bytes");
}
