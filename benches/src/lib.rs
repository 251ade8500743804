//! ringtun's benchmarks. They are binaries, not tests (see `benches/README.md`):
//!
//! - `ringtun-bench`: ringtun against direct TCP (and optionally another tunnel such as Istio's
//!   ztunnel) on the two-namespace topology: throughput, latency, connection rate, CPU per GiB
//!   and per 1,000 connections, memory per idle connection, scaling with shards; table, JSON
//!   and an HTML/SVG report;
//! - `accept_handoff`: SO_REUSEPORT listener per worker vs. one acceptor handing fds to workers
//!   over channels (std blocking sockets, loopback);
//! - `byte_path`: the demo topology (two network namespaces, two ringtuns) with throughput, CPU
//!   per GiB, and syscall counts and sizes under strace or perf;
//! - criterion micro-benchmarks of the hot paths in `benches/benches/` (`cargo bench -p
//!   ringtun-benches`).
//!
//! `benches/reports/` and `docs/measurements/` record their figures. The modules below are shared
//! by the binaries.

pub mod load;
pub mod procs;
pub mod report;
pub mod stats;

/// `n` bytes of xorshift64 output: the payload the benchmarks send and check, incompressible
/// and cheap to make.
pub fn pattern(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}
