//! Command-line interface: `ringtun run`, `check-config`, `gen-certs`; the flags and
//! what each command calls.

mod run;
mod values;
mod xds;

pub use run::{ProxyMode, RunArgs};
pub use xds::XdsArgs;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringtun_hbone::Identity;

use crate::operate::logging;
use crate::{config, control, pki, EngineError};

/// ringtun: HBONE tunnel engine, a drop-in for Istio ambient's ztunnel.
#[derive(Parser, Debug)]
#[command(name = "ringtun", version, about, long_about = None)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `debug`, `ringtun=debug,access=info`.
    #[arg(long, global = true, env = "RINGTUN_LOG", default_value = "info")]
    pub log: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
// Parsed once per process; boxing `RunArgs` would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the tunnel: capture outbound on 15001, serve HBONE on 15008 and plaintext on 15006.
    Run(RunArgs),
    /// Parse a ztunnel local config file and report errors with file, line and field.
    CheckConfig {
        /// The config file.
        file: PathBuf,
    },
    /// Create a CA (or reuse the one in DIR) and issue SPIFFE workload certificates.
    GenCerts {
        /// Directory for ca.pem/ca.key and <ns>.<sa>.pem/.key.
        #[arg(long)]
        dir: PathBuf,
        /// Trust domain of the identities.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Identities to issue, as NAMESPACE/SERVICEACCOUNT (repeatable).
        #[arg(long = "identity", required = true)]
        identities: Vec<String>,
    },
}

/// Runs `ringtun run` until killed.
pub fn run(args: RunArgs) -> Result<(), EngineError> {
    let opts = args.into_options()?;
    control::raise_nofile();
    control::block_signals();
    let running = control::start(opts.clone())?;
    running.serve(&opts)
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(&cli.log);
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::CheckConfig { file } => check_config(&file),
        Command::GenCerts {
            dir,
            trust_domain,
            identities,
        } => gen_certs(&dir, &trust_domain, &identities),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringtun: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path) -> Result<(), EngineError> {
    let loaded = config::load(file)?;
    for w in &loaded.warnings {
        eprintln!("{}: warning: {w}", file.display());
    }
    let c = &loaded.config;
    println!(
        "{}: ok: {} workloads, {} services, {} policies",
        file.display(),
        c.workloads.len(),
        c.services.len(),
        c.policies.len()
    );
    Ok(())
}

fn gen_certs(dir: &std::path::Path, td: &str, identities: &[String]) -> Result<(), EngineError> {
    let ca = pki::Ca::open_or_create(dir)?;
    for spec in identities {
        let (ns, sa) = spec
            .split_once('/')
            .filter(|(n, s)| !n.is_empty() && !s.is_empty() && !s.contains('/'))
            .ok_or_else(|| {
                EngineError::Usage(format!(
                    "--identity {spec:?}: expected NAMESPACE/SERVICEACCOUNT"
                ))
            })?;
        let id = Identity::new(td, ns, sa);
        let paths = ca.issue(&id)?;
        println!("{id}: {} {}", paths.chain.display(), paths.key.display());
    }
    Ok(())
}
