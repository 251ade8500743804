//! Command-line interface: `ringtun run`, `check-config`, `gen-certs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ringtun_hbone::pool::PoolLimits;
use ringtun_hbone::settings::H2Settings;
use ringtun_hbone::Identity;
use tracing_subscriber::EnvFilter;

use crate::admin::Role;
use crate::options::{IoDriver, KtlsMode, RunOptions, TlsCipher, UringTaskrun};
use crate::tls::CertPaths;
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

/// Options of `ringtun run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// ztunnel local config (YAML), the file ztunnel reads from LOCAL_XDS_PATH; reloaded on change.
    #[arg(long, env = "LOCAL_XDS_PATH")]
    pub config: PathBuf,
    /// Our certificate chain (PEM): leaf first, with a spiffe:// URI SAN.
    #[arg(long)]
    pub cert_chain: PathBuf,
    /// Private key of the leaf certificate (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// Mesh root certificates (PEM) that peers' chains must end at.
    #[arg(long)]
    pub roots: PathBuf,
    /// Trust domain of the mesh.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The workload this ringtun serves, NAMESPACE/NAME[/SA] (as ztunnel's PROXY_WORKLOAD_INFO).
    #[arg(long, env = "PROXY_WORKLOAD_INFO")]
    pub workload: Option<String>,
    /// Serve every workload of this node instead (config `node` field).
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    /// `k8s.cluster.name` in baggage for workloads without clusterId.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// Worker shards; default: one per available core.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS")]
    pub workers: Option<usize>,
    /// ztunnel's proxy mode: `dedicated` serves the one workload named by --workload
    /// (PROXY_WORKLOAD_INFO); `shared` serves a node's workloads (--node, NODE_NAME). Checked
    /// against the other flags; without it the flags alone decide.
    #[arg(long, env = "PROXY_MODE", value_enum)]
    pub proxy_mode: Option<ProxyMode>,
    /// Listen on IPv6 (dual stack) by default; `false` listens on IPv4 only, as ztunnel's
    /// IPV6_ENABLED.
    #[arg(long, env = "IPV6_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub ipv6_enabled: bool,
    /// ztunnel's ENABLE_ORIG_SRC (connect to the workload from the client's own address). Not
    /// supported yet: `true` is refused at start rather than silently ignored.
    #[arg(long, env = "ENABLE_ORIG_SRC", default_value_t = false, action = clap::ArgAction::Set)]
    pub enable_orig_src: bool,
    /// Do not pin shards to cores.
    #[arg(long)]
    pub no_pin: bool,
    /// I/O driver for the shards.
    #[arg(long, value_enum, default_value = "auto")]
    pub io_driver: IoDriver,
    /// The TLS 1.3 suite HBONE connections prefer: `aes128` (AES-128-GCM, less CPU per byte) or
    /// `aes256` (AES-256-GCM first, ztunnel's order). Both are always offered and accepted, so
    /// either meshes with ztunnel; as a server ringtun applies its own preference.
    #[arg(long, value_enum, default_value = "aes128")]
    pub tls_cipher: TlsCipher,
    /// TCP keepalive on every socket ringtun accepts or opens: the first probe after this many
    /// seconds without traffic, then one every as many seconds, 9 at most (ztunnel's 180 s);
    /// 0: off.
    #[arg(long, default_value_t = 180)]
    pub tcp_keepalive_secs: u64,
    /// HBONE connections send an HTTP/2 PING this often (milliseconds; 0: never), as ztunnel.
    #[arg(long, default_value_t = 10_000)]
    pub hbone_keepalive_interval_ms: u64,
    /// An HBONE connection whose peer leaves a PING unanswered this long (milliseconds) is
    /// closed: pooled streams go elsewhere, its streams end.
    #[arg(long, default_value_t = 20_000)]
    pub hbone_keepalive_timeout_ms: u64,
    /// When an io_uring shard runs its completions: `defer` (batched at the shard's wait),
    /// `coop` (at its next kernel entry) or `interrupt` (the kernel default). A kernel without
    /// the chosen flags gets the next one down, announced in the log.
    #[arg(long, value_enum, default_value = "defer")]
    pub uring_taskrun: UringTaskrun,
    /// Outbound capture listener (repeatable). Default [::]:15001, or 0.0.0.0:15001 without IPv6.
    #[arg(long)]
    pub outbound_listen: Vec<SocketAddr>,
    /// HBONE listener (repeatable). Default [::]:15008.
    #[arg(long)]
    pub inbound_listen: Vec<SocketAddr>,
    /// Plaintext inbound capture listener (repeatable). Default [::]:15006.
    #[arg(long)]
    pub inbound_plaintext_listen: Vec<SocketAddr>,
    /// SO_MARK set on every socket ringtun opens, so capture rules can skip it (0: none).
    #[arg(long, env = "PACKET_MARK", default_value = "0x539", value_parser = parse_u32)]
    pub mark: u32,
    /// Streams per pooled HBONE connection before another is opened.
    #[arg(long, env = "POOL_MAX_STREAMS_PER_CONNECTION", default_value_t = 100)]
    pub pool_max_streams: u32,
    /// Close pooled HBONE connections unused this long (milliseconds, or a Go duration such as
    /// `5m` as ztunnel's POOL_UNUSED_RELEASE_TIMEOUT); ztunnel's 5 minutes by default.
    #[arg(long, env = "POOL_UNUSED_RELEASE_TIMEOUT", default_value = "300000", value_parser = |s: &str| parse_millis(s, "POOL_UNUSED_RELEASE_TIMEOUT"))]
    pub pool_idle_timeout_ms: u64,
    /// HTTP/2 stream window (bytes).
    #[arg(long, default_value_t = H2Settings::default().stream_window)]
    pub h2_stream_window: u32,
    /// HTTP/2 connection window (bytes).
    #[arg(long, default_value_t = H2Settings::default().connection_window)]
    pub h2_connection_window: u32,
    /// HTTP/2 max frame size (bytes).
    #[arg(long, default_value_t = H2Settings::default().max_frame_size)]
    pub h2_max_frame_size: u32,
    /// HTTP/2 concurrent streams accepted per inbound connection.
    #[arg(long, default_value_t = H2Settings::default().max_concurrent_streams)]
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 max header list size (bytes).
    #[arg(long, default_value_t = H2Settings::default().max_header_list_size)]
    pub h2_max_header_list_size: u32,
    /// TCP connect timeout (milliseconds).
    #[arg(long, default_value_t = 10_000)]
    pub connect_timeout_ms: u64,
    /// Close a tunnelled connection idle (no bytes either way) this long, in milliseconds.
    /// Default 0: never, as ztunnel (a database connection idle for an hour must survive).
    #[arg(long, default_value_t = 0)]
    pub idle_timeout_ms: u64,
    /// Connections one shard carries at most; beyond, new ones are refused with RST.
    #[arg(long, default_value_t = 100_000)]
    pub max_connections_per_shard: u64,
    /// TLS handshake timeout (milliseconds).
    #[arg(long, default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// Prometheus metrics listener (`/metrics`).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Readiness listener (`/healthz/ready`).
    #[arg(long)]
    pub readiness_listen: Option<SocketAddr>,
    /// Admin API listener (`/config_dump`, `/logging`, `/quitquitquit`); keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_listen: SocketAddr,
    /// On SIGTERM or /quitquitquit, how long live connections may finish (milliseconds, or a
    /// Go duration as ztunnel's CONNECTION_TERMINATION_DEADLINE); ztunnel's DaemonSet gives
    /// 30 s of termination grace.
    #[arg(long, env = "CONNECTION_TERMINATION_DEADLINE", default_value = "30000", value_parser = |s: &str| parse_millis(s, "CONNECTION_TERMINATION_DEADLINE"))]
    pub drain_timeout_ms: u64,
    /// How often to check the config file for changes (milliseconds).
    #[arg(long, default_value_t = 500)]
    pub config_poll_ms: u64,
    /// Kernel TLS (kTLS) for HBONE connections: `auto` offloads where the kernel can and
    /// falls back to userspace rustls otherwise, `on` refuses to start without kTLS, `off`
    /// always uses userspace rustls.
    #[arg(long, value_enum, default_value = "auto")]
    pub ktls: KtlsMode,
    /// Records an offloaded AES-GCM connection may send with one key before it is retired
    /// (no new streams, GOAWAY). Lowering it is for tests; the default is also the maximum.
    #[arg(long, hide = true, default_value_t = crate::transport::DEFAULT_TX_RECORD_LIMIT)]
    pub ktls_tx_record_limit: u64,
}

/// ztunnel's two proxy modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyMode {
    /// One workload (PROXY_WORKLOAD_INFO).
    Dedicated,
    /// A node's workloads.
    Shared,
}

/// Milliseconds as a plain number (`1500`), or a Go duration as ztunnel's environment takes
/// them (`1.5s`, `5m`, `1h30m`, `300ms`, `0`); `var` names the environment variable that may
/// have given it, for the error.
fn parse_millis(s: &str, var: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    go_duration(s)
        .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
        .ok_or_else(|| {
            format!("{s:?} (the flag or {var}): expected milliseconds or a duration such as 300ms, 5s, 5m, 1h30m")
        })
}

/// A Go `time.ParseDuration` string (units ns, us, µs, ms, s, m, h; no sign).
fn go_duration(s: &str) -> Option<Duration> {
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let value: f64 = num.parse().ok()?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_end);
        let secs = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * secs;
        rest = next;
    }
    Duration::try_from_secs_f64(total).ok()
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?}: {e}"))
}

fn default_listen(port: u16, ipv6: bool) -> Vec<SocketAddr> {
    if ipv6 && crate::net::ipv6_available() {
        vec![SocketAddr::from(([0u16; 8], port))]
    } else {
        vec![SocketAddr::from(([0, 0, 0, 0], port))]
    }
}

impl RunArgs {
    /// Resolves defaults and validates values.
    pub fn into_options(self) -> Result<RunOptions, EngineError> {
        let workload = match &self.workload {
            None => None,
            Some(s) => {
                let parts: Vec<&str> = s.split('/').collect();
                match parts.as_slice() {
                    [ns, name] | [ns, name, _] if !ns.is_empty() && !name.is_empty() => {
                        Some((ns.to_string(), name.to_string()))
                    }
                    _ => {
                        return Err(EngineError::Usage(format!(
                            "--workload {s:?}: expected NAMESPACE/NAME or NAMESPACE/NAME/SERVICEACCOUNT"
                        )))
                    }
                }
            }
        };
        match (self.proxy_mode, &workload, &self.node) {
            (Some(ProxyMode::Dedicated), None, _) => {
                return Err(EngineError::Usage(
                    "PROXY_MODE=dedicated needs the workload it serves: --workload or PROXY_WORKLOAD_INFO".into(),
                ))
            }
            (Some(ProxyMode::Shared), Some(_), _) => {
                return Err(EngineError::Usage(
                    "PROXY_MODE=shared serves a node's workloads: drop --workload (PROXY_WORKLOAD_INFO), or use PROXY_MODE=dedicated".into(),
                ))
            }
            _ => {}
        }
        if self.enable_orig_src {
            return Err(EngineError::Usage(
                "ENABLE_ORIG_SRC=true (connecting to workloads from the client's own address) is not supported yet; set it to false".into(),
            ));
        }
        let ipv6 = self.ipv6_enabled;
        let or_default = |v: Vec<SocketAddr>, port| {
            if v.is_empty() {
                default_listen(port, ipv6)
            } else {
                v
            }
        };
        let workers = self
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if workers == 0 {
            return Err(EngineError::Usage("--workers must be at least 1".into()));
        }
        let max_records = crate::transport::DEFAULT_TX_RECORD_LIMIT;
        if self.ktls_tx_record_limit == 0 || self.ktls_tx_record_limit > max_records {
            return Err(EngineError::Usage(format!(
                "--ktls-tx-record-limit must be between 1 and {max_records}"
            )));
        }
        Ok(RunOptions {
            config_path: self.config,
            config_poll: Duration::from_millis(self.config_poll_ms.max(10)),
            certs: CertPaths {
                chain: self.cert_chain,
                key: self.key,
                roots: self.roots,
            },
            trust_domain: self.trust_domain,
            cluster_id: self.cluster_id,
            workload,
            node: self.node,
            workers,
            pin: !self.no_pin,
            io_driver: self.io_driver,
            uring_taskrun: self.uring_taskrun,
            tls_cipher: self.tls_cipher,
            tcp_keepalive: Duration::from_secs(self.tcp_keepalive_secs),
            keepalive: crate::proxy::keepalive::Keepalive {
                interval: Duration::from_millis(self.hbone_keepalive_interval_ms),
                timeout: Duration::from_millis(self.hbone_keepalive_timeout_ms),
            },
            outbound: or_default(self.outbound_listen, 15001),
            inbound: or_default(self.inbound_listen, 15008),
            inbound_plaintext: or_default(self.inbound_plaintext_listen, 15006),
            mark: self.mark,
            pool: PoolLimits {
                max_streams: self.pool_max_streams.max(1),
                idle_timeout: Duration::from_millis(self.pool_idle_timeout_ms),
            },
            h2: H2Settings {
                stream_window: self.h2_stream_window,
                connection_window: self.h2_connection_window,
                max_frame_size: self.h2_max_frame_size,
                max_concurrent_streams: self.h2_max_concurrent_streams,
                max_header_list_size: self.h2_max_header_list_size,
                ..H2Settings::default()
            }
            .sanitized(),
            admin_listeners: vec![
                (
                    Role::Metrics,
                    self.metrics_listen
                        .unwrap_or_else(|| default_listen(15020, ipv6)[0]),
                ),
                (
                    Role::Readiness,
                    self.readiness_listen
                        .unwrap_or_else(|| default_listen(15021, ipv6)[0]),
                ),
                (Role::Admin, self.admin_listen),
            ],
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_connections_per_shard: self.max_connections_per_shard.max(1),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            ktls: self.ktls,
            ktls_tx_record_limit: self.ktls_tx_record_limit,
        })
    }
}

/// Installs the log subscriber (stderr, key=value fields).
pub fn init_logging(filter: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, text) = match EnvFilter::try_new(filter) {
        Ok(f) => (f, filter.to_owned()),
        Err(e) => {
            eprintln!("ringtun: bad --log filter {filter:?} ({e}); using info");
            (EnvFilter::new("info"), "info".to_owned())
        }
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = LOG_FILTER.set(handle);
        if let Ok(mut t) = LOG_FILTER_TEXT.lock() {
            *t = (text.clone(), text);
        }
    }
}

/// The start-up log filter and the one in force now, as text.
static LOG_FILTER_TEXT: std::sync::Mutex<(String, String)> =
    std::sync::Mutex::new((String::new(), String::new()));

/// The log filter in force (the admin API's `POST /logging` without a query).
pub fn log_filter() -> String {
    LOG_FILTER_TEXT
        .lock()
        .map(|t| t.1.clone())
        .unwrap_or_default()
}

/// Puts the start-up log filter back (`POST /logging?reset`).
pub fn reset_log_filter() -> Result<String, String> {
    let start = LOG_FILTER_TEXT
        .lock()
        .map(|t| t.0.clone())
        .map_err(|e| e.to_string())?;
    set_log_filter(&start)
}

type FilterHandle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;
static LOG_FILTER: std::sync::OnceLock<FilterHandle> = std::sync::OnceLock::new();

/// Replaces the log filter of the running process (the admin API's `/logging?level=`).
pub fn set_log_filter(filter: &str) -> Result<String, String> {
    let parsed = EnvFilter::try_new(filter).map_err(|e| format!("bad filter {filter:?}: {e}"))?;
    let handle = LOG_FILTER
        .get()
        .ok_or_else(|| "logging is not reloadable in this process".to_owned())?;
    handle.reload(parsed).map_err(|e| e.to_string())?;
    if let Ok(mut t) = LOG_FILTER_TEXT.lock() {
        t.1 = filter.to_owned();
    }
    Ok(filter.to_owned())
}

/// Runs `ringtun run` until killed.
pub fn run(args: RunArgs) -> Result<(), EngineError> {
    let opts = args.into_options()?;
    raise_nofile();
    control::block_signals();
    let running = control::start(opts.clone())?;
    running.serve(&opts)
}

/// Raises the soft open-files limit to the hard limit. Every tunnelled connection holds one or
/// two sockets, so the usual soft default of 1024 would refuse connections (accept fails with
/// EMFILE) long before memory or CPU run out; the hard limit is what the operator allows.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid, initialised struct.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0
            && (lim.rlim_cur >= lim.rlim_max || {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0
            })
    };
    if raised {
        tracing::debug!(limit = lim.rlim_cur, "open files limit");
    } else {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot raise the open files limit; connections beyond it will be refused"
        );
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn tunnels_have_no_idle_limit_unless_asked() {
        let w = Wrap::try_parse_from([
            "ringtun",
            "--config",
            "c.yaml",
            "--cert-chain",
            "c.pem",
            "--key",
            "k.pem",
            "--roots",
            "r.pem",
        ])
        .expect("parse");
        assert_eq!(
            w.run.idle_timeout_ms, 0,
            "ztunnel never cuts an idle tunnel"
        );
    }

    #[test]
    fn go_durations_as_ztunnel_reads_them() {
        let ms = |s| parse_millis(s, "X");
        assert_eq!(ms("1500"), Ok(1500));
        assert_eq!(ms("300ms"), Ok(300));
        assert_eq!(ms("1.5s"), Ok(1500));
        assert_eq!(ms("5m"), Ok(300_000));
        assert_eq!(ms("1h30m"), Ok(5_400_000));
        assert_eq!(ms("2m30s"), Ok(150_000));
        assert_eq!(ms("0"), Ok(0));
        for bad in ["", "5 minutes", "m", "-1s", "1d", "1.2.3s"] {
            let e = ms(bad).expect_err(bad);
            assert!(e.contains("X"), "{bad}: {e}");
        }
    }
}
