//! One run of one variant at one size, and the table of medians.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use serde::Serialize;
use tls_kernel_offload::{send_close_notify, Cipher};

use crate::send::{receive, relay, send_buf, SendReport};
use crate::sys::machine_busy;
use crate::tls::{ktls_pair, tcp_pair};
use crate::variants::{Pattern, Variant};
use crate::{MIB, RUN_TIMEOUT};

#[derive(Serialize, Clone, Debug)]
pub struct RunResult {
    pub variant: &'static str,
    pub size: usize,
    pub rep: usize,
    pub bytes: usize,
    /// Set when the kernel refused the variant (nothing measured).
    pub error: Option<String>,
    pub secs: f64,
    pub mib_per_s: f64,
    /// CPU seconds per GiB of the sending or relaying thread.
    pub sender_cpu_s_per_gib: f64,
    /// CPU seconds per GiB of the whole machine (all CPUs busy time).
    pub machine_cpu_s_per_gib: f64,
    pub zerocopy_completions: u64,
    pub zerocopy_copied: u64,
}

pub fn run_once(
    variant: Variant,
    size: usize,
    total: usize,
    tls: Option<Cipher>,
) -> io::Result<RunResult> {
    let plain = tls.is_none();
    let (sender, receiver, early) = ktls_pair(tls)?;
    let (rx_tx, rx_rx) = mpsc::channel();
    let rx = thread::spawn(move || {
        let r = receive(receiver, early, plain);
        let _ = rx_tx.send(Instant::now());
        r
    });
    // The plaintext source for relay variants: a feeder writing the stream into a second
    // loopback connection, at least as fast as any relay moves it.
    let source = if variant.relays() {
        let (mut feed, relay_in) = tcp_pair()?;
        let feeder = thread::spawn(move || -> io::Result<()> {
            let pat = Pattern::get();
            let mut off = 0;
            while off < total {
                let n = (256 * 1024).min(total - off);
                feed.write_all(pat.at(off, n))?;
                off += n;
            }
            feed.shutdown(Shutdown::Write)
        });
        Some((relay_in, feeder))
    } else {
        None
    };

    let busy0 = machine_busy()?;
    let t0 = Instant::now();
    let sfd = sender.as_raw_fd();
    let relay_fd = source.as_ref().map(|(s, _)| s.as_raw_fd());
    let tx = thread::spawn(move || -> io::Result<SendReport> {
        let r = match relay_fd {
            Some(src) => relay(variant, src, sfd, size),
            None => send_buf(variant, sfd, total, size),
        };
        if !plain {
            // The end of the TLS stream; the receiver's recv_data reads it as EOF.
            let _ = send_close_notify(sfd);
        }
        // SAFETY: shutdown on a descriptor the caller keeps open until this thread ends.
        unsafe { libc::shutdown(sfd, libc::SHUT_WR) };
        r
    });
    let sent = tx
        .join()
        .map_err(|_| io::Error::other("sender thread panicked"))?;
    let done_at = rx_rx
        .recv_timeout(RUN_TIMEOUT)
        .map_err(|_| io::Error::other(format!("{variant}/{size}: receiver hung")))?;
    let busy1 = machine_busy()?;
    let (got, bad) = rx
        .join()
        .map_err(|_| io::Error::other("receiver thread panicked"))??;
    if let Some((relay_in, feeder)) = source {
        drop(relay_in);
        // A refused relay variant leaves the feeder writing into a closed socket.
        let _ = feeder.join();
    }
    drop(sender);

    let secs = done_at.duration_since(t0).as_secs_f64();
    let gib = total as f64 / (1024.0 * MIB as f64);
    let mut r = RunResult {
        variant: variant.name(),
        size,
        rep: 0,
        bytes: got,
        error: None,
        secs,
        mib_per_s: total as f64 / MIB as f64 / secs,
        sender_cpu_s_per_gib: 0.0,
        machine_cpu_s_per_gib: busy1.saturating_sub(busy0).as_secs_f64() / gib,
        zerocopy_completions: 0,
        zerocopy_copied: 0,
    };
    match sent {
        Err(e) => {
            r.error = Some(e.to_string());
            return Ok(r);
        }
        Ok(s) => {
            r.sender_cpu_s_per_gib = s.cpu.as_secs_f64() / gib;
            r.zerocopy_completions = s.zc_done;
            r.zerocopy_copied = s.copied;
        }
    }
    if let Some(at) = bad {
        return Err(io::Error::other(format!(
            "{variant}/{size}: CORRUPT: byte {at} differs from what was sent"
        )));
    }
    if got != total {
        return Err(io::Error::other(format!(
            "{variant}/{size}: CORRUPT: received {got} bytes, sent {total}"
        )));
    }
    Ok(r)
}

// ------------------------------------------------------------------ report

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

pub struct Cell {
    pub mibs: f64,
    pub min: f64,
    pub max: f64,
    pub sender: f64,
    pub machine: f64,
}

pub fn cell(results: &[RunResult], v: Variant, size: usize) -> Option<Cell> {
    let rs: Vec<&RunResult> = results
        .iter()
        .filter(|r| r.variant == v.name() && r.size == size && r.error.is_none())
        .collect();
    if rs.is_empty() {
        return None;
    }
    let tp: Vec<f64> = rs.iter().map(|r| r.mib_per_s).collect();
    Some(Cell {
        min: tp.iter().copied().fold(f64::INFINITY, f64::min),
        max: tp.iter().copied().fold(0.0, f64::max),
        mibs: median(tp),
        sender: median(rs.iter().map(|r| r.sender_cpu_s_per_gib).collect()),
        machine: median(rs.iter().map(|r| r.machine_cpu_s_per_gib).collect()),
    })
}

pub fn print_table(results: &[RunResult], variants: &[Variant], sizes: &[usize]) {
    println!();
    println!("| size | variant | MiB/s median (min..max) | × baseline | sender CPU s/GiB | × baseline | machine CPU s/GiB | × baseline |");
    println!("|---|---|---|---|---|---|---|---|");
    for &size in sizes {
        for &v in variants {
            let label = if v == v.baseline() {
                format!("**{v}** (baseline)")
            } else {
                v.to_string()
            };
            let Some(c) = cell(results, v, size) else {
                let why = results
                    .iter()
                    .find(|r| r.variant == v.name() && r.size == size)
                    .and_then(|r| r.error.clone())
                    .unwrap_or_else(|| "not run".into());
                println!(
                    "| {} KiB | {label} | refused: {why} | | | | | |",
                    size / 1024
                );
                continue;
            };
            let base = cell(results, v.baseline(), size);
            let ratio = |x: f64, b: Option<f64>| match b {
                Some(b) if b > 0.0 => format!("{:.2}", x / b),
                _ => "–".into(),
            };
            println!(
                "| {} KiB | {label} | {:.1} ({:.1}..{:.1}) | {} | {:.2} | {} | {:.2} | {} |",
                size / 1024,
                c.mibs,
                c.min,
                c.max,
                ratio(c.mibs, base.as_ref().map(|b| b.mibs)),
                c.sender,
                ratio(c.sender, base.as_ref().map(|b| b.sender)),
                c.machine,
                ratio(c.machine, base.as_ref().map(|b| b.machine)),
            );
        }
    }
}
