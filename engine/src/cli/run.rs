//! `ringtun run`'s flags, and how they become [`RunOptions`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use ringtun_hbone::pool::PoolLimits;
use ringtun_hbone::settings::H2Settings;

use super::values::{parse_millis, parse_u32};
use super::xds::XdsArgs;
use crate::operate::admin::Role;
use crate::options::{
    InpodOptions, IoDriver, Keepalive, KtlsMode, RunOptions, SignerPaths, TlsCipher, TlsRecords,
    UringTaskrun,
};
use crate::tls::CertPaths;
use crate::EngineError;

/// Options of `ringtun run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// ztunnel local config (YAML), the file ztunnel reads from LOCAL_XDS_PATH; reloaded on change.
    /// Required unless XDS_ADDRESS is set.
    #[arg(long, env = "LOCAL_XDS_PATH")]
    pub config: Option<PathBuf>,
    /// The control plane (istiod), instead of --config.
    #[command(flatten)]
    pub xds: XdsArgs,
    /// Our certificate chain (PEM): leaf first, with a spiffe:// URI SAN. Without the three
    /// certificate files, certificates come from istiod's CA (CA_ADDRESS, or XDS_ADDRESS's).
    #[arg(long, requires_all = ["key", "roots"])]
    pub cert_chain: Option<PathBuf>,
    /// Private key of the leaf certificate (PEM).
    #[arg(long, requires_all = ["cert_chain", "roots"])]
    pub key: Option<PathBuf>,
    /// Mesh root certificates (PEM) that peers' chains must end at.
    #[arg(long, requires_all = ["cert_chain", "key"])]
    pub roots: Option<PathBuf>,
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
    /// In shared mode, take pods from istio-cni's node agent and listen inside each pod's
    /// network namespace (ztunnel's INPOD_ENABLED); `false` keeps shared mode's listeners in
    /// ringtun's own namespace.
    #[arg(long, env = "INPOD_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub inpod_enabled: bool,
    /// The node agent's ZDS socket (in-pod mode).
    #[arg(long, env = "INPOD_UDS", default_value = crate::inpod::DEFAULT_INPOD_UDS)]
    pub inpod_uds: PathBuf,
    /// In-pod mode: a CA certificate (PEM) that signs each pod's own certificate, issued on
    /// first use (with --ca-key); without it every pod presents --cert-chain.
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The private key (PEM) of --ca-cert.
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
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
    /// How many ticks in a row an io_uring shard may run completions that are already waiting
    /// before its HBONE connections write what their streams sent (0: at the end of every
    /// tick). More ticks put more streams' frames into one write on a busy shard; an idle
    /// shard writes at once. The epoll driver cannot see waiting events without a system call
    /// and writes at the end of every tick.
    #[arg(long, default_value_t = 4)]
    pub write_batch_ticks: u32,
    /// Plaintext bytes an HBONE connection may hold for its next write before it stops the
    /// busy ticks of `--write-batch-ticks` and writes at the end of the tick (0: never). A batch
    /// that large costs little per byte to write, and holding it back leaves the peer idle.
    #[arg(long, default_value_t = 4096)]
    pub write_batch_bytes: u32,
    /// Provided buffers (16 KiB each) an io_uring shard lends to multishot receives on its
    /// plaintext sockets (0: one submitted receive per read). A receive takes a buffer only
    /// while its bytes are copied out; a connection that fills one reads into its own
    /// buffer until it goes quiet. The epoll driver ignores it.
    #[arg(long, default_value_t = 64)]
    pub uring_recv_buffers: u16,
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
    /// The userspace TLS record layer of HBONE connections the kernel does not carry: `own`
    /// (ringtun's, over the keys rustls derived in the handshake; one copy per received byte)
    /// or `rustls` (rustls' buffered connection throughout).
    #[arg(long, value_enum, default_value = "own")]
    pub tls_records: TlsRecords,
    /// Records an offloaded AES-GCM connection may send with one key before it is retired
    /// (no new streams, GOAWAY). Lowering it is for tests; the default is also the maximum.
    #[arg(long, hide = true, default_value_t = crate::stream::DEFAULT_TX_RECORD_LIMIT)]
    pub ktls_tx_record_limit: u64,
    /// Records an offloaded AES-GCM connection may receive under the peer's key before it
    /// is retired, well before a rustls peer must rekey (2^24). Lowering it is for tests;
    /// the default is also the maximum.
    #[arg(long, hide = true, default_value_t = crate::stream::DEFAULT_RX_RECORD_LIMIT)]
    pub ktls_rx_record_limit: u64,
    /// The DNS proxy (ztunnel's `DNS_CAPTURE` proxy metadata): on unless `false`; it answers
    /// the mesh's names and forwards the rest, on --dns-proxy-addr (in each pod in in-pod mode).
    #[arg(long, env = "ISTIO_META_DNS_CAPTURE", default_value = "true")]
    pub dns_capture: String,
    /// Where the DNS proxy listens, UDP and TCP: `localhost:PORT` (127.0.0.1 and ::1) or
    /// `IP:PORT` (ztunnel's `DNS_PROXY_ADDR` proxy metadata).
    #[arg(
        long,
        env = "ISTIO_META_DNS_PROXY_ADDR",
        default_value = "localhost:15053"
    )]
    pub dns_proxy_addr: crate::dns::Listen,
    /// The resolv.conf whose nameservers get the queries the mesh does not answer.
    #[arg(
        long,
        env = "RINGTUN_DNS_RESOLV_CONF",
        default_value = "/etc/resolv.conf"
    )]
    pub dns_resolv_conf: PathBuf,
    /// Upstream DNS resolver (repeatable), instead of the resolv.conf's nameservers.
    #[arg(long)]
    pub dns_upstream: Vec<SocketAddr>,
    /// How long one upstream DNS attempt may take (milliseconds) before the next server.
    #[arg(long, default_value_t = 5_000)]
    pub dns_upstream_timeout_ms: u64,
    /// The cluster's DNS domain, for short names (ztunnel's CLUSTER_DOMAIN).
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The namespace whose service answers a name several namespaces define, after the
    /// client's own (ztunnel's PREFERED_SERVICE_NAMESPACE, spelled as ztunnel spells it).
    #[arg(long, env = "PREFERED_SERVICE_NAMESPACE")]
    pub prefered_service_namespace: Option<String>,
}

/// ztunnel's two proxy modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyMode {
    /// One workload (PROXY_WORKLOAD_INFO).
    Dedicated,
    /// A node's workloads.
    Shared,
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
        let mut workload_sa = None;
        let workload = match &self.workload {
            None => None,
            Some(s) => {
                let parts: Vec<&str> = s.split('/').collect();
                match parts.as_slice() {
                    [ns, name] | [ns, name, _] if !ns.is_empty() && !name.is_empty() => {
                        workload_sa = parts.get(2).filter(|sa| !sa.is_empty()).map(|sa| sa.to_string());
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
        let inpod = (self.proxy_mode == Some(ProxyMode::Shared) && self.inpod_enabled).then(|| {
            InpodOptions {
                uds: self.inpod_uds.clone(),
                signer: self
                    .ca_cert
                    .clone()
                    .zip(self.ca_key.clone())
                    .map(|(cert, key)| SignerPaths { cert, key }),
            }
        });
        if inpod.is_none() && self.ca_cert.is_some() {
            return Err(EngineError::Usage(
                "--ca-cert/--ca-key sign pods' certificates in in-pod mode (PROXY_MODE=shared); drop them or set PROXY_MODE=shared".into(),
            ));
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
        let xds = self.xds.options(
            &self.cluster_id,
            self.node.as_deref(),
            self.mark,
            self.dns_capture.eq_ignore_ascii_case("true"),
        )?;
        let certs = match (self.cert_chain, self.key, self.roots) {
            (Some(chain), Some(key), Some(roots)) => Some(CertPaths { chain, key, roots }),
            _ => None,
        };
        // Mounted files win: the CA is asked only without them, as before it existed.
        let ca = match &certs {
            Some(_) => None,
            None => self.xds.ca_options(
                &self.trust_domain,
                &self.cluster_id,
                self.mark,
                xds.as_ref(),
                workload
                    .as_ref()
                    .map(|(ns, _)| (ns.as_str(), workload_sa.as_deref())),
            )?,
        };
        if certs.is_none() && ca.is_none() {
            return Err(EngineError::Usage(
                "no certificates: give --cert-chain, --key and --roots, or CA_ADDRESS (or XDS_ADDRESS, whose istiod is the CA by default) to have istiod's CA issue them".into(),
            ));
        }
        if certs.is_none() && inpod.as_ref().is_some_and(|i| i.signer.is_some()) {
            return Err(EngineError::Usage(
                "--ca-cert/--ca-key sign pods' certificates against --roots: give --cert-chain, --key and --roots too, or drop them to have istiod's CA issue pods' certificates".into(),
            ));
        }
        let config_path = match (self.config, &xds) {
            (Some(path), None) => path,
            (None, Some(_)) => PathBuf::new(),
            (Some(_), Some(_)) => {
                return Err(EngineError::Usage(
                    "both --config (LOCAL_XDS_PATH) and XDS_ADDRESS are set: ringtun takes its config from one of them (unset XDS_ADDRESS, or set it empty, to use the file)".into(),
                ))
            }
            (None, None) => {
                return Err(EngineError::Usage(
                    "no config: give --config (LOCAL_XDS_PATH) with ztunnel's local config file, or XDS_ADDRESS to take it from istiod".into(),
                ))
            }
        };
        let max_records = crate::stream::DEFAULT_TX_RECORD_LIMIT;
        if self.ktls_tx_record_limit == 0 || self.ktls_tx_record_limit > max_records {
            return Err(EngineError::Usage(format!(
                "--ktls-tx-record-limit must be between 1 and {max_records}"
            )));
        }
        let max_rx = crate::stream::DEFAULT_RX_RECORD_LIMIT;
        if self.ktls_rx_record_limit == 0 || self.ktls_rx_record_limit > max_rx {
            return Err(EngineError::Usage(format!(
                "--ktls-rx-record-limit must be between 1 and {max_rx}"
            )));
        }
        Ok(RunOptions {
            config_path,
            xds,
            config_poll: Duration::from_millis(self.config_poll_ms.max(10)),
            certs,
            ca,
            trust_domain: self.trust_domain,
            cluster_id: self.cluster_id,
            workload,
            node: self.node,
            workers,
            pin: !self.no_pin,
            io_driver: self.io_driver,
            uring_taskrun: self.uring_taskrun,
            write_batch_ticks: self.write_batch_ticks,
            write_batch_bytes: self.write_batch_bytes,
            uring_recv_buffers: self.uring_recv_buffers,
            tls_cipher: self.tls_cipher,
            tcp_keepalive: Duration::from_secs(self.tcp_keepalive_secs),
            keepalive: Keepalive {
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
            tls_records: self.tls_records,
            ktls_tx_record_limit: self.ktls_tx_record_limit,
            ktls_rx_record_limit: self.ktls_rx_record_limit,
            inpod,
            dns: self
                .dns_capture
                .eq_ignore_ascii_case("true")
                .then(|| crate::dns::DnsOptions {
                    listen: self.dns_proxy_addr,
                    resolv_conf: self.dns_resolv_conf,
                    upstreams: self.dns_upstream,
                    upstream_timeout: Duration::from_millis(self.dns_upstream_timeout_ms.max(1)),
                    cluster_domain: self.cluster_domain,
                    preferred_namespace: self.prefered_service_namespace,
                    ipv6,
                    mark: self.mark,
                }),
            dns_listen: self.dns_proxy_addr,
            ipv6_enabled: ipv6,
        })
    }
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

    /// The certificate flags every `ringtun run` needs; `--config` is left to each test.
    const CERTS: [&str; 7] = [
        "ringtun",
        "--cert-chain",
        "c.pem",
        "--key",
        "k.pem",
        "--roots",
        "r.pem",
    ];

    fn parse(extra: &[&str]) -> Wrap {
        Wrap::try_parse_from(CERTS.iter().chain(extra).copied()).expect("parse")
    }

    /// Options of a `ringtun run` with a config file and `extra`.
    fn options(extra: &[&str]) -> Result<RunOptions, EngineError> {
        let args: Vec<&str> = ["--config", "c.yaml"]
            .iter()
            .chain(extra)
            .copied()
            .collect();
        options_without_config(&args)
    }

    /// Options of a `ringtun run` with only the certificate flags and `extra`.
    fn options_without_config(extra: &[&str]) -> Result<RunOptions, EngineError> {
        parse(extra).run.into_options()
    }

    #[test]
    fn dns_proxy_is_on_by_default_as_in_ztunnel() {
        let o = options(&[]).expect("defaults");
        let dns = o.dns.expect("DNS capture is on by default");
        assert_eq!(dns.listen, crate::dns::Listen::Localhost(15053));
        assert_eq!(dns.cluster_domain, "cluster.local");
        assert_eq!(dns.resolv_conf, std::path::Path::new("/etc/resolv.conf"));
        assert_eq!(dns.mark, 0x539);
        let o = options(&[
            "--dns-proxy-addr",
            "0.0.0.0:5353",
            "--dns-upstream",
            "10.0.0.10:53",
            "--cluster-domain",
            "corp.example",
        ])
        .expect("dns flags");
        let dns = o.dns.expect("on");
        assert_eq!(
            dns.listen,
            crate::dns::Listen::Addr("0.0.0.0:5353".parse().unwrap())
        );
        assert_eq!(dns.upstreams, vec!["10.0.0.10:53".parse().unwrap()]);
        assert_eq!(dns.cluster_domain, "corp.example");
        for off in ["false", "False", "no"] {
            assert!(options(&["--dns-capture", off]).expect("off").dns.is_none());
        }
        assert!(parse_err(&[
            "--config",
            "c.yaml",
            "--dns-proxy-addr",
            "localhost"
        ]));
    }

    fn parse_err(args: &[&str]) -> bool {
        Wrap::try_parse_from(CERTS.iter().chain(args).copied()).is_err()
    }

    #[test]
    fn shared_mode_is_in_pod_mode_unless_disabled() {
        let o = options(&["--proxy-mode", "shared"]).expect("shared");
        let inpod = o.inpod.expect("in-pod mode");
        assert_eq!(
            inpod.uds,
            std::path::Path::new(crate::inpod::DEFAULT_INPOD_UDS)
        );
        assert_eq!(inpod.signer, None);
        let o = options(&[
            "--proxy-mode",
            "shared",
            "--inpod-uds",
            "/run/z.sock",
            "--ca-cert",
            "ca.pem",
            "--ca-key",
            "ca.key",
        ])
        .expect("shared with a signer");
        let inpod = o.inpod.expect("in-pod mode");
        assert_eq!(inpod.uds, std::path::Path::new("/run/z.sock"));
        assert_eq!(
            inpod.signer,
            Some(SignerPaths {
                cert: "ca.pem".into(),
                key: "ca.key".into()
            })
        );
        let o = options(&["--proxy-mode", "shared", "--inpod-enabled", "false"]).expect("node");
        assert_eq!(
            o.inpod, None,
            "INPOD_ENABLED=false: shared mode in ringtun's namespace"
        );
        assert_eq!(options(&[]).expect("no mode").inpod, None);
        assert_eq!(
            options(&["--workload", "default/client"])
                .expect("dedicated")
                .inpod,
            None
        );
    }

    #[test]
    fn a_signer_outside_in_pod_mode_is_refused() {
        let e = options(&["--ca-cert", "ca.pem", "--ca-key", "ca.key"]).expect_err("refused");
        assert!(e.to_string().contains("--ca-cert"), "{e}");
        assert!(
            Wrap::try_parse_from(CERTS.iter().chain(&[
                "--config",
                "c.yaml",
                "--ca-cert",
                "ca.pem"
            ]))
            .is_err(),
            "--ca-cert needs --ca-key"
        );
    }

    #[test]
    fn tunnels_have_no_idle_limit_unless_asked() {
        let w = parse(&["--config", "c.yaml"]);
        assert_eq!(
            w.run.idle_timeout_ms, 0,
            "ztunnel never cuts an idle tunnel"
        );
    }

    #[test]
    fn the_config_comes_from_the_file_or_from_istiod_never_both() {
        let file = options_without_config(&["--config", "c.yaml"]).expect("the file");
        assert!(file.xds.is_none());
        let file = options_without_config(&["--config", "c.yaml", "--xds-address", ""])
            .expect("empty: the file");
        assert!(
            file.xds.is_none(),
            "an empty XDS_ADDRESS means no control plane"
        );
        let xds =
            options_without_config(&["--xds-address", "https://istiod.istio-system.svc:15012"])
                .expect("istiod");
        let x = xds.xds.expect("xds options");
        assert_eq!(x.endpoint.url, "https://istiod.istio-system.svc:15012");
        let bare = options_without_config(&["--xds-address", "istiod.istio-system.svc:15012"])
            .expect("a bare host:port, as ztunnel");
        assert_eq!(
            bare.xds.expect("xds options").endpoint.url,
            "https://istiod.istio-system.svc:15012",
            "taken as https, as ztunnel's validate_uri does"
        );
        assert_eq!(x.endpoint.cluster_id, "Kubernetes");
        assert_eq!(
            x.endpoint.mark, 0x539,
            "the control connection is marked like the rest"
        );
        for (args, want) in [
            (
                &[
                    "--config",
                    "c.yaml",
                    "--xds-address",
                    "https://istiod:15012",
                ][..],
                "both --config",
            ),
            (&[][..], "no config"),
            (
                &["--xds-address", "http://istiod:15012"][..],
                "not an https URL",
            ),
            (
                &["--xds-address", "istiod bad:15012"][..],
                "XDS_ADDRESS (--xds-address): control plane address: \"istiod bad:15012\" is not a URL",
            ),

        ] {
            match options_without_config(args) {
                Err(EngineError::Usage(m)) => assert!(m.contains(want), "{m}"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn without_certificate_files_istiods_ca_issues_them() {
        let run = |args: &[&str]| {
            Wrap::try_parse_from(["ringtun"].iter().chain(args))
                .expect("parse")
                .run
                .into_options()
        };
        let with_files = options_without_config(&["--xds-address", "https://istiod:15012"])
            .expect("files and istiod");
        assert!(
            with_files.certs.is_some() && with_files.ca.is_none(),
            "files win"
        );

        let o = run(&[
            "--xds-address",
            "https://istiod:15012",
            "--workload",
            "default/client/client-sa",
        ])
        .expect("the CA of XDS_ADDRESS");
        let ca = o.ca.expect("a CA");
        assert!(o.certs.is_none());
        assert_eq!(
            ca.endpoint.url, "https://istiod:15012",
            "XDS_ADDRESS's istiod"
        );
        assert_eq!(
            ca.ttl,
            Duration::from_secs(24 * 3600),
            "SECRET_TTL's default"
        );
        assert_eq!(
            ca.identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/client-sa"
        );
        assert!(!ca.impersonate, "dedicated mode asks for itself");

        let o = run(&[
            "--xds-address",
            "https://istiod:15012",
            "--ca-address",
            "ca.istio-system.svc:15012",
            "--secret-ttl",
            "1h",
            "--proxy-mode",
            "shared",
        ])
        .expect("shared mode");
        let ca = o.ca.expect("a CA");
        assert_eq!(ca.endpoint.url, "https://ca.istio-system.svc:15012");
        assert_eq!(ca.ttl, Duration::from_secs(3600));
        assert_eq!(
            ca.identity.to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/ztunnel",
            "the node proxy's own"
        );
        assert!(ca.impersonate, "a node proxy asks on its workloads' behalf");

        for (args, want) in [
            (
                &["--xds-address", "https://istiod:15012", "--ca-address", ""][..],
                "no certificates",
            ),
            (&["--config", "c.yaml"][..], "no certificates"),
            (
                &["--config", "c.yaml", "--ca-address", "http://ca:15012"][..],
                "CA_ADDRESS",
            ),
            (
                &["--config", "c.yaml", "--ca-address", "ca:notaport"][..],
                "CA_ADDRESS (--ca-address): control plane address: \"ca:notaport\" is not a URL",
            ),
        ] {
            match run(args) {
                Err(EngineError::Usage(m)) => assert!(m.contains(want), "{m}"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
        assert!(
            Wrap::try_parse_from(["ringtun", "--config", "c.yaml", "--cert-chain", "c.pem"])
                .is_err(),
            "the certificate files go together"
        );
    }

    #[test]
    fn on_demand_is_off_by_default_and_refused_with_the_dns_proxy_as_in_ztunnel() {
        let xds = ["--xds-address", "https://istiod:15012"];
        let off = options_without_config(&xds).expect("istiod");
        assert_eq!(off.xds.expect("xds").on_demand, None, "XDS_ON_DEMAND=false");
        let on: Vec<&str> = xds
            .iter()
            .copied()
            .chain(["--xds-on-demand", "true", "--dns-capture", "false"])
            .collect();
        let on = options_without_config(&on).expect("on demand");
        assert_eq!(
            on.xds.expect("xds").on_demand,
            Some(std::time::Duration::from_secs(5))
        );
        let with_dns: Vec<&str> = xds
            .iter()
            .copied()
            .chain(["--xds-on-demand", "true"])
            .collect();
        match options_without_config(&with_dns) {
            Err(EngineError::Usage(m)) => assert!(
                m.contains("DNS proxy does not currently support on-demand mode"),
                "{m}"
            ),
            other => panic!("accepted: {:?}", other.map(|o| o.xds)),
        }
    }
}
