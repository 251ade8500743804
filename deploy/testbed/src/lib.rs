//! ringtun's test bed: everything the end-to-end tests, the benchmarks and the demo build on.
//!
//! - [`netns`]: named network namespaces, entered by threads, with nftables capture rules the
//!   way Istio ambient's CNI sets them; [`topology`]: two of them joined by a veth pair;
//! - [`process`]: processes started with their output in a log, awaited through readiness
//!   (`GET /healthz/ready` on 15021), stopped on drop; [`ringtun`]: `ringtun run` inside a
//!   namespace, with the demo config;
//! - [`certs`]: a throwaway CA and SPIFFE workload certificates (rcgen);
//! - [`echo`]: sockets inside a namespace and a recording echo server; [`transfer`]: the byte
//!   pattern and checked transfers; [`sys`]: `/proc` figures and the open-files limit.
//!
//! Everything here drives the real kernel and needs root: it fails with [`Error::NotRoot`]
//! (never silently skips) without it, and every failing command is reported with its stderr so
//! that a broken host is easy to diagnose. Namespaces are deleted when their [`Netns`] value is
//! dropped, including while a test panics, and processes still running inside are killed first
//! so that nothing is left behind.

#![warn(missing_docs)]

pub mod certs;
pub mod echo;
mod error;
pub mod netns;
pub mod process;
pub mod ringtun;
pub mod sys;
pub mod topology;
pub mod transfer;

pub use echo::{
    bind_in, connect_in, connect_marked_in, echoed_bytes, EchoRecord, EchoServer, Records,
};
pub use error::{Error, Result};
pub use netns::{require_root, Netns, DEFAULT_MARK};
pub use process::Process;
pub use ringtun::{RunFiles, DEMO_CONFIG};
pub use topology::{TwoNodes, TwoNodesConfig};
pub use transfer::{pattern, sha256_hex, transfer, Pattern, Transfer};
