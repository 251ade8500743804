//! ringtun's benchmarks. They are binaries, not tests (see `benches/README.md`):
//!
//! - `accept_handoff`: SO_REUSEPORT listener per worker vs. one acceptor handing fds to workers
//!   over channels (std blocking sockets, loopback);
//! - `byte_path`: the demo topology (two network namespaces, two ringtuns) with throughput, CPU
//!   per GiB, and syscall counts and sizes under strace or perf.
//!
//! ARCHITECTURE.md at the repository root quotes their figures.
