//! `ringtun run` inside a namespace, as the demo, the benchmarks and the end-to-end tests start
//! it: the config and the certificates in `ringtun gen-certs`'s layout, readiness asked on
//! 15021.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::error::Result;
use crate::netns::Netns;
use crate::process::Process;

/// The demo's ztunnel-format local config: workloads client 10.77.0.1 and server 10.77.0.2
/// (the [`crate::TwoNodes`] addresses), service VIP 10.96.0.10:80 → 5201.
pub const DEMO_CONFIG: &str = include_str!("../demo/config.yaml");

/// How long a starting ringtun gets to answer ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The chain and key `ringtun gen-certs` (and [`crate::certs::write_workload_certs`]) write in
/// `dir` for the identity `ns/sa`: `ns.sa.pem` and `ns.sa.key`.
pub fn cert_paths(dir: &Path, identity: &str) -> (PathBuf, PathBuf) {
    let base = identity.replace('/', ".");
    (
        dir.join(format!("{base}.pem")),
        dir.join(format!("{base}.key")),
    )
}

/// What a `ringtun run` reads: the config, and a directory with `ca.pem` and the workload's
/// certificate.
#[derive(Clone, Debug)]
pub struct RunFiles {
    /// `--config`.
    pub config: PathBuf,
    /// Directory with `ca.pem` and the certificate of `identity`.
    pub certs: PathBuf,
    /// Whose certificate to present, `ns/sa`.
    pub identity: String,
    /// `--workload ns/name`, if given (ringtun also takes it from `PROXY_WORKLOAD_INFO`).
    pub workload: Option<String>,
}

impl RunFiles {
    /// The files of the workload `identity` (`ns/sa`, also its `--workload ns/name`).
    pub fn new(config: &Path, certs: &Path, identity: &str) -> RunFiles {
        RunFiles {
            config: config.to_owned(),
            certs: certs.to_owned(),
            identity: identity.to_owned(),
            workload: Some(identity.to_owned()),
        }
    }

    /// The same files with `--workload` given as `workload`, or left out.
    pub fn with_workload(mut self, workload: Option<&str>) -> RunFiles {
        self.workload = workload.map(str::to_owned);
        self
    }

    /// `run --config … --cert-chain … --key … --roots … [--workload …]`, to follow the binary.
    pub fn args(&self) -> Vec<OsString> {
        let (chain, key) = cert_paths(&self.certs, &self.identity);
        let mut args: Vec<OsString> = vec!["run".into(), "--config".into()];
        args.push(self.config.clone().into());
        args.extend(["--cert-chain".into(), chain.into()]);
        args.extend(["--key".into(), key.into()]);
        args.extend(["--roots".into(), self.certs.join("ca.pem").into()]);
        if let Some(w) = &self.workload {
            args.extend(["--workload".into(), w.into()]);
        }
        args
    }

    /// `ip netns exec NS BIN run …`, to be given further arguments and the environment.
    pub fn command(&self, ns: &Netns, bin: &Path) -> Command {
        let mut cmd = ns.exec(bin);
        cmd.args(self.args());
        cmd
    }
}

/// Starts `cmd` (a `ringtun run` inside `ns`, or a wrapper such as strace around one) with its
/// output in `log`, and waits until it answers ready on 15021.
pub fn start(ns: &Netns, cmd: Command, name: &str, log: &Path) -> Result<Process> {
    let mut p = Process::spawn(cmd, name, log)?;
    p.wait_ready(ns, READY_TIMEOUT)?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_arguments_follow_the_gen_certs_layout() {
        let files = RunFiles::new(
            Path::new("/w/config.yaml"),
            Path::new("/w/certs"),
            "default/client",
        );
        let args: Vec<String> = files
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            "run --config /w/config.yaml --cert-chain /w/certs/default.client.pem \
             --key /w/certs/default.client.key --roots /w/certs/ca.pem --workload default/client"
        );
        let without = files.with_workload(None).args();
        assert!(!without.iter().any(|a| a == "--workload"), "{without:?}");
    }
}
