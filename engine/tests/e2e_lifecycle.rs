//! One connection lifecycle, end to end: the bytes a connection moved mean the same in the
//! access log and the metrics of both ringtuns as in ztunnel's (the log from the side of the
//! workload each end reports for, the metrics with the request as `received` on both ends), and
//! ringtun's own figures count new and reused pooled streams and refused connections.
//!
//! Needs root (network namespaces); fails without it.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use common::*;
use ringtun_testbed::Netns;

const LOG_WAIT: Duration = Duration::from_secs(10);
/// Request bytes (client → server) and response bytes: different, so a swap shows.
const REQUEST: u64 = 100_003;
const RESPONSE: u64 = 300_007;

/// A server that reads each connection to its end, then answers `RESPONSE` bytes and closes.
fn answering_server(ns: &Netns, addr: &str) {
    let listener = bind_in(ns, addr);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
                if read_to_end_or_error(&mut conn).1.is_ok() {
                    let _ = conn.write_all(&vec![7u8; RESPONSE as usize]);
                }
            });
        }
    });
}

/// Sends `REQUEST` bytes to `dst` from inside `ns`, half-closes, and returns the answer's size.
fn request(ns: &Netns, dst: &str) -> u64 {
    let mut s = connect_in(ns, dst).unwrap_or_else(|e| panic!("connect {dst}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.write_all(&vec![1u8; REQUEST as usize])
        .and_then(|_| s.shutdown(Shutdown::Write))
        .unwrap_or_else(|e| panic!("send to {dst}: {e}"));
    let (back, end) = read_to_end_or_error(&mut s);
    end.unwrap_or_else(|e| panic!("answer from {dst}: {e}"));
    back.len() as u64
}

/// The Prometheus text of the ringtun in `ns`.
fn scrape(ns: &Netns) -> String {
    let mut s = connect_in(ns, "127.0.0.1:15020").expect("connect to the metrics port");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: ringtun\r\nConnection: close\r\n\r\n"
    )
    .expect("scrape request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("scrape");
    text
}

/// The sum of the samples of `name` whose labels include each of `labels` (`key="value"`).
fn sum(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn bytes_mean_the_same_in_both_logs_and_both_metrics_and_pool_figures_count() {
    let m = Mesh::start(MeshOptions::new("elc"));
    answering_server(&m.nodes.server, "10.77.0.2:5202");
    let client = &m.nodes.client;
    for _ in 0..2 {
        assert_eq!(request(client, "10.77.0.2:5202"), RESPONSE, "the answer");
    }
    // A service port without an endpoint: refused by the client ringtun.
    match connect_in(client, "10.96.0.10:81") {
        Ok(mut s) => {
            let _ = s.set_read_timeout(Some(IO_TIMEOUT));
            let _ = s.write_all(b"anybody there?");
            let mut buf = [0u8; 64];
            assert!(
                !matches!(s.read(&mut buf), Ok(n) if n > 0),
                "no answer from a port without endpoint"
            );
        }
        Err(e) => eprintln!("refused at connect: {e}"),
    }

    let ours = |l: &AccessLine, direction: &str| {
        l.is("direction", direction) && l.is("dst.hbone_addr", "10.77.0.2:5202")
    };
    let out = m
        .client
        .wait_access_all("for both requests and the refusal", LOG_WAIT, |ls| {
            ls.iter().filter(|l| ours(l, "outbound")).count() >= 2
                && ls.iter().any(|l| l.is("dst.addr", "10.96.0.10:81"))
        });
    let inb = m
        .server
        .wait_access_all("for both streams", LOG_WAIT, |ls| {
            ls.iter().filter(|l| ours(l, "inbound")).count() >= 2
        });
    let out: Vec<&AccessLine> = out.iter().filter(|l| ours(l, "outbound")).collect();
    let inb: Vec<&AccessLine> = inb.iter().filter(|l| ours(l, "inbound")).collect();
    for l in &out {
        // The source's workload sent the request.
        assert!(l.is("end", "closed"), "{}", l.raw);
        assert_eq!(l.num("bytes_sent"), REQUEST, "{}", l.raw);
        assert_eq!(l.num("bytes_recv"), RESPONSE, "{}", l.raw);
    }
    for l in &inb {
        // The destination's workload sent the response.
        assert!(l.is("end", "closed"), "{}", l.raw);
        assert_eq!(l.num("bytes_sent"), RESPONSE, "{}", l.raw);
        assert_eq!(l.num("bytes_recv"), REQUEST, "{}", l.raw);
    }
    assert!(out[0].is("pool", "new"), "{}", out[0].raw);
    assert!(out[1].is("pool", "reused"), "{}", out[1].raw);

    // The metrics count the request as received on both ends.
    for r in [&m.client, &m.server] {
        r.wait_log_count("admin endpoints up", 1, LOG_WAIT);
    }
    for (ns, reporter) in [(client, "source"), (&m.nodes.server, "destination")] {
        let text = scrape(ns);
        let series = [
            format!("reporter=\"{reporter}\""),
            "destination_workload=\"server\"".to_string(),
            "response_flags=\"-\"".to_string(),
        ];
        let series: Vec<&str> = series.iter().map(String::as_str).collect();
        assert_eq!(
            sum(&text, "istio_tcp_received_bytes_total", &series),
            2 * REQUEST,
            "{reporter}:\n{text}"
        );
        assert_eq!(
            sum(&text, "istio_tcp_sent_bytes_total", &series),
            2 * RESPONSE,
            "{reporter}:\n{text}"
        );
    }
    let text = scrape(client);
    let shard = ["shard=\"0\""];
    assert_eq!(
        sum(&text, "ringtun_pool_new_streams_total", &shard),
        1,
        "{text}"
    );
    assert_eq!(
        sum(&text, "ringtun_pool_reused_streams_total", &shard),
        1,
        "{text}"
    );
    assert_eq!(
        sum(&text, "ringtun_failed_connections_total", &shard),
        1,
        "the port without endpoint:\n{text}"
    );
    let text = scrape(&m.nodes.server);
    assert_eq!(
        sum(&text, "ringtun_failed_connections_total", &shard),
        0,
        "{text}"
    );
    m.client.assert_no_panic();
    m.server.assert_no_panic();
}
