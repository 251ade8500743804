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
//! by the binaries; namespaces, processes, certificates, the byte pattern and `/proc` figures
//! come from the test bed (`ringtun-testbed`).

pub mod load;
pub mod relay_plan;
pub mod report;
pub mod stats;
