//! ktls_zerocopy: with kernel TLS (kTLS) doing the encryption, does any zero-copy way of
//! handing bytes to the socket beat a plain write?
//!
//! Every run is a fresh loopback TCP connection on which rustls does a real TLS 1.3 handshake
//! (AES-128-GCM, certificates made in-process with rcgen, mutual auth as between two ringtuns),
//! after which `tls_kernel_offload::offload` hands both directions to the kernel. The client
//! end sends `--mib` MiB through its kTLS socket, in writes of `--sizes` bytes; the server end
//! reads with `recv_data` (kTLS RX) and compares every byte with the generated stream, so a
//! variant that drops, duplicates or garbles bytes fails the whole benchmark instead of
//! looking fast.
//!
//! Two shapes, each with its own baseline:
//!
//! - `buf` (bytes already in a user buffer, which is where h2 leaves a DATA frame):
//!   - `uring-send` — io_uring `IORING_OP_SEND` with `MSG_NOSIGNAL`, one op in flight: what
//!     monoio's `TcpStream::write` submits. **Baseline.**
//!   - `write` — blocking `send(2)`.
//!   - `uring-send-zc` — io_uring `IORING_OP_SEND_ZC` (kernel ≥ 6.0), waiting for the
//!     buffer-release notification of every send.
//!   - `msg-zerocopy` — `SO_ZEROCOPY` + `send(MSG_ZEROCOPY)`, completions read from the
//!     socket's error queue.
//!   - `sendfile` — `sendfile(2)` from a memfd holding the stream (page-cache pages go
//!     into the record without a user-space copy).
//!   - `sendfile-ro` — the same after `setsockopt(SOL_TLS, TLS_TX_ZEROCOPY_RO, 1)`.
//! - `sock` (bytes arriving on a plaintext TCP socket and leaving on the kTLS one: the shape
//!   of ringtun's outbound path, app socket in, HBONE socket out). A feeder thread writes the
//!   stream into a second loopback connection; a relay thread moves it to the kTLS socket:
//!   - `uring-recv-send` — io_uring `RECV` into a buffer of `size`, then `SEND`s of what
//!     arrived. **Baseline.**
//!   - `read-write` — the same with blocking `recv(2)` / `send(2)`.
//!   - `splice` — `splice(2)` socket → pipe → kTLS socket, pipe sized to `size`.
//!   - `uring-splice` — the same two splices as io_uring `IORING_OP_SPLICE` ops.
//!
//! Measured per run: throughput (first byte sent to last byte verified), CPU time of the
//! sending (or relaying) thread (`getrusage(RUSAGE_THREAD)`), and CPU time of the whole
//! machine (busy jiffies of `/proc/stat`: this catches work the kernel does elsewhere, e.g.
//! io_uring's io-wq workers, which run `IORING_OP_SPLICE`, and softirqs). The receiver's
//! decryption and comparison are in the machine figure for every variant alike. Variants
//! alternate run by run so drift hits all of them; the table gives medians.
//!
//! A variant the kernel refuses (an errno on the first send) is reported as such and not
//! retried. Needs a kernel with kTLS (`tls` module); the dev hosts have none, so run it in
//! the VM: `deploy/vm/bench-ktls-zerocopy.sh`. `--plain` skips TLS altogether (plain TCP) to
//! check the harness itself on any kernel; its numbers say nothing about kTLS.
//!
//! ```text
//! ktls_zerocopy [--sizes 16384,65536,262144] [--mib 32] [--reps 5] [--variants a,b,..]
//!               [--cipher aes128|aes256|chacha20] [--json FILE] [--plain]
//! ```

mod runs;
mod send;
mod sys;
mod tls;
mod variants;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tls_kernel_offload::{probe, Cipher};

use crate::runs::{print_table, run_once, RunResult};
use crate::variants::{Variant, ALL};

pub const MIB: usize = 1024 * 1024;
/// The stream repeats with this period. Not a power of two and not a multiple of any write
/// size, so a chunk delivered twice or skipped lands at an offset whose expected bytes differ.
pub const PERIOD: usize = 4 * MIB + 4093;
/// The pattern buffer is the period plus this much of its own start, so any slice of up to
/// this length at any offset is contiguous (no write is split at the wrap-around).
pub const TAIL: usize = MIB;
/// Receiver's read buffer.
pub const RECV_BUF: usize = 256 * 1024;
/// A run that takes longer than this is reported as hung and ends the benchmark.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Parser, Debug)]
#[command(about = "kTLS TX: plain writes against SEND_ZC, MSG_ZEROCOPY, sendfile and splice")]
struct Args {
    /// Bytes per write / splice / sendfile call.
    #[arg(long, value_delimiter = ',', default_value = "16384,65536,262144")]
    sizes: Vec<usize>,
    /// MiB sent per run.
    #[arg(long, default_value_t = 32)]
    mib: usize,
    /// Runs per variant and size.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Variants to run (default: all).
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// Write every run as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No TLS at all: plain TCP. Checks the harness on kernels without kTLS, and shows
    /// what the copies cost where no encryption hides them.
    #[arg(long)]
    plain: bool,
    /// TLS 1.3 cipher suite: aes128 (TLS13_AES_128_GCM_SHA256), aes256, chacha20.
    #[arg(long, default_value = "aes128", value_parser = parse_cipher)]
    cipher: Cipher,
}

fn parse_cipher(s: &str) -> Result<Cipher, String> {
    match s {
        "aes128" => Ok(Cipher::Aes128Gcm),
        "aes256" => Ok(Cipher::Aes256Gcm),
        "chacha20" => Ok(Cipher::Chacha20Poly1305),
        _ => Err(format!("unknown cipher {s:?} (aes128, aes256, chacha20)")),
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("ktls_zerocopy: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> io::Result<()> {
    let variants: Vec<Variant> = if args.variants.is_empty() {
        ALL.to_vec()
    } else {
        args.variants
            .iter()
            .map(|s| {
                Variant::parse(s).ok_or_else(|| {
                    let names: Vec<&str> = ALL.iter().map(|v| v.name()).collect();
                    io::Error::other(format!("unknown variant {s:?}; known: {}", names.join(",")))
                })
            })
            .collect::<io::Result<_>>()?
    };
    if let Some(&s) = args.sizes.iter().find(|&&s| s == 0 || s > TAIL) {
        return Err(io::Error::other(format!(
            "size {s} out of range (1..={TAIL})"
        )));
    }
    let tls = (!args.plain).then_some(args.cipher);
    // TLS_TX_ZEROCOPY_RO is a SOL_TLS option: plain TCP has none.
    let variants: Vec<Variant> = variants
        .into_iter()
        .filter(|&v| tls.is_some() || v != Variant::SendfileRo)
        .collect();
    if let Some(cipher) = tls {
        let cap = probe();
        if !cap.can_offload(cipher) {
            return Err(io::Error::other(format!(
                "needs kTLS with {cipher} ({cap}); run it in the VM: deploy/vm/bench-ktls-zerocopy.sh (or --plain to check the harness)"
            )));
        }
        println!("{cap}");
    }
    let total = args.mib * MIB;
    println!(
        "kernel {}, {} MiB per run, {} reps, sizes {:?}{}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        args.mib,
        args.reps,
        args.sizes,
        match tls {
            Some(c) => format!(", kTLS {c}"),
            None => ", PLAIN TCP (no TLS)".into(),
        }
    );
    // Warm-up: module loading, crypto tfm allocation, page cache of the binary.
    run_once(Variant::Write, 64 * 1024, 4 * MIB, tls)?;

    let mut results: Vec<RunResult> = Vec::new();
    let mut refused: Vec<(Variant, usize)> = Vec::new();
    for rep in 0..args.reps {
        for &size in &args.sizes {
            for &v in &variants {
                if refused.contains(&(v, size)) {
                    continue;
                }
                let mut r = run_once(v, size, total, tls)?;
                r.rep = rep;
                match &r.error {
                    Some(e) => {
                        println!("{v:>16} {:>4} KiB  refused: {e}", size / 1024);
                        refused.push((v, size));
                    }
                    None => println!(
                        "{v:>16} {:>4} KiB  rep {rep}  {:8.1} MiB/s  sender {:6.2} s/GiB  machine {:6.2} s/GiB{}",
                        size / 1024,
                        r.mib_per_s,
                        r.sender_cpu_s_per_gib,
                        r.machine_cpu_s_per_gib,
                        if r.zerocopy_completions > 0 {
                            format!(
                                "  zerocopy completions {} (copied {})",
                                r.zerocopy_completions, r.zerocopy_copied
                            )
                        } else {
                            String::new()
                        }
                    ),
                }
                results.push(r);
            }
        }
    }
    print_table(&results, &variants, &args.sizes);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&results).map_err(io::Error::other)?;
        std::fs::write(path, text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::thread;

    use super::*;
    use crate::send::receive;
    use crate::tls::tcp_pair;
    use crate::variants::Pattern;

    /// Every variant moves a stream intact over plain TCP on any kernel, and the receiver
    /// catches a stream that is not the pattern.
    #[test]
    fn every_variant_delivers_intact_over_plain_tcp() {
        // TLS_TX_ZEROCOPY_RO is a SOL_TLS option: plain TCP has none.
        for v in ALL.into_iter().filter(|&v| v != Variant::SendfileRo) {
            let r = run_once(v, 64 * 1024, 3 * MIB + 17, None).expect("run");
            assert!(r.error.is_none(), "{v}: {:?}", r.error);
            assert_eq!(r.bytes, 3 * MIB + 17, "{v}");
        }
    }

    #[test]
    fn receiver_detects_corruption() {
        let (mut a, b) = tcp_pair().expect("pair");
        let rx = thread::spawn(move || receive(b, Vec::new(), true));
        let mut data = Pattern::get().at(0, 100_000).to_vec();
        data[77_777] ^= 1;
        a.write_all(&data).expect("write");
        drop(a);
        let (got, bad) = rx.join().expect("join").expect("receive");
        assert_eq!(got, 100_000);
        assert_eq!(bad, Some(77_777));
    }

    #[test]
    fn pattern_slices_are_contiguous_across_the_period() {
        let p = Pattern::get();
        assert_eq!(
            p.at(PERIOD - 3, 6),
            &[p.at(PERIOD - 3, 3), p.at(0, 3)].concat()[..]
        );
    }
}
