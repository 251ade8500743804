//! Run-time options of `ringtun run`, independent of how they were given (CLI, env, demo).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ringtun_hbone::pool::PoolLimits;
use ringtun_hbone::settings::H2Settings;

use crate::operate::admin::Role;
use crate::tls::CertPaths;

/// Which monoio driver the shards run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IoDriver {
    /// io_uring where the kernel allows it, else the legacy driver (announced in the log).
    Auto,
    /// io_uring only; refuse to start without it.
    IoUring,
    /// epoll (the legacy driver), e.g. where seccomp or sysctl forbid io_uring.
    Legacy,
}

/// When the kernel runs an io_uring shard's completion work (its "task work").
///
/// Without a setup flag every completion interrupts the shard thread to run it (an IPI or a
/// signal-style notification while the thread is in user space), which on a busy shard costs
/// more than the completion itself. The flags move that work to the shard's own next
/// `io_uring_enter`. Older kernels lack them: a ring the kernel refuses is built with the next
/// variant down (`defer` → `coop` → `interrupt`) and the log says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UringTaskrun {
    /// `SINGLE_ISSUER | DEFER_TASKRUN` (Linux 6.1): completions are produced only when the
    /// shard waits for them, in one batch.
    Defer,
    /// `SINGLE_ISSUER | COOP_TASKRUN | TASKRUN_FLAG` (Linux 6.0): no interrupt, the work runs
    /// at the next kernel entry.
    Coop,
    /// No flag: the kernel's default (every completion interrupts the thread).
    Interrupt,
}

impl UringTaskrun {
    /// The variant to try when the kernel refuses this one.
    pub fn fallback(self) -> Option<UringTaskrun> {
        match self {
            UringTaskrun::Defer => Some(UringTaskrun::Coop),
            UringTaskrun::Coop => Some(UringTaskrun::Interrupt),
            UringTaskrun::Interrupt => None,
        }
    }

    /// The ring builder with this variant's setup flags.
    pub fn builder(self) -> io_uring::Builder {
        let mut b = io_uring::IoUring::builder();
        match self {
            UringTaskrun::Defer => {
                b.setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_taskrun_flag();
            }
            UringTaskrun::Coop => {
                b.setup_single_issuer()
                    .setup_coop_taskrun()
                    .setup_taskrun_flag();
            }
            UringTaskrun::Interrupt => {}
        }
        b
    }
}

/// Which AES-GCM suite HBONE connections prefer (both are always offered and accepted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsCipher {
    /// `TLS13_AES_128_GCM_SHA256` first: less cipher work per byte.
    Aes128,
    /// `TLS13_AES_256_GCM_SHA384` first, as ztunnel orders them.
    Aes256,
}

impl From<TlsCipher> for ringtun_hbone::verify::CipherPreference {
    fn from(c: TlsCipher) -> Self {
        match c {
            TlsCipher::Aes128 => Self::Aes128,
            TlsCipher::Aes256 => Self::Aes256,
        }
    }
}

/// Which userspace TLS record layer carries an HBONE connection the kernel does not (no kTLS,
/// or `--ktls off`). rustls does the handshake either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsRecords {
    /// ringtun's own, over the keys rustls derived (as kTLS gets them): a received byte is
    /// opened where it was read and copied once.
    #[default]
    Own,
    /// rustls' buffered connection for the connection's whole life.
    Rustls,
}

impl std::fmt::Display for TlsRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsRecords::Own => "own",
            TlsRecords::Rustls => "rustls",
        })
    }
}

/// Whether HBONE connections hand their TLS record layer to the kernel (kTLS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KtlsMode {
    /// kTLS where the kernel supports it, else userspace rustls (announced in the log).
    Auto,
    /// kTLS required: refuse to start when the kernel cannot do it.
    On,
    /// Always userspace rustls; the kernel is not even probed.
    Off,
}

impl std::fmt::Display for KtlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KtlsMode::Auto => "auto",
            KtlsMode::On => "on",
            KtlsMode::Off => "off",
        })
    }
}

/// What a listener is for: which proxy path its connections take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// 15001: outbound capture (original destination after REDIRECT).
    Outbound,
    /// 15008: HBONE over mutual TLS.
    Inbound,
    /// 15006: plaintext inbound capture.
    InboundPlaintext,
}

impl std::fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ListenerKind::Outbound => "outbound",
            ListenerKind::Inbound => "inbound-hbone",
            ListenerKind::InboundPlaintext => "inbound-plaintext",
        })
    }
}

/// HTTP/2 PING keepalive on HBONE connections: when to ping and when to give up (`interval`
/// zero: no keepalive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Time between PINGs (and before the first).
    pub interval: Duration,
    /// How long a PING may go unanswered.
    pub timeout: Duration,
}

impl Default for Keepalive {
    /// ztunnel's: every 10 s, dead after 20 s without an answer.
    fn default() -> Self {
        Keepalive {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
        }
    }
}

/// In-pod mode (ztunnel's shared mode with istio-cni): pods' namespaces come from the node
/// agent, and every pod gets its own listeners inside its namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InpodOptions {
    /// The node agent's ZDS socket (`INPOD_UDS`).
    pub uds: PathBuf,
    /// The CA that signs each pod's certificate (`--ca-cert`, `--ca-key`); without it every
    /// pod presents the process's own certificate.
    pub signer: Option<SignerPaths>,
}

/// A CA certificate and its key (PEM), to issue workload certificates locally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignerPaths {
    /// The CA certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// Everything `ringtun run` needs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// ztunnel local config file, watched for changes (unused when `xds` is set).
    pub config_path: PathBuf,
    /// Take the config from istiod over xDS instead of the file.
    pub xds: Option<crate::xds::XdsOptions>,
    /// How often the config file is checked for changes.
    pub config_poll: Duration,
    /// Certificate files (`--cert-chain`, `--key`, `--roots`); without them certificates come
    /// from istiod's CA (`ca`).
    pub certs: Option<CertPaths>,
    /// istiod's CA (`CA_ADDRESS`), used when no certificate files are given.
    pub ca: Option<crate::xds::ca::CaOptions>,
    /// Trust domain of the mesh.
    pub trust_domain: String,
    /// `k8s.cluster.name` for workloads whose config has no clusterId.
    pub cluster_id: String,
    /// The workload this ringtun serves (`namespace`, `name`), as ztunnel's dedicated mode.
    pub workload: Option<(String, String)>,
    /// Serve every workload on this node instead.
    pub node: Option<String>,
    /// Worker shards (one thread each).
    pub workers: usize,
    /// Pin shards to cores.
    pub pin: bool,
    /// Driver choice.
    pub io_driver: IoDriver,
    /// The AES-GCM suite HBONE connections prefer.
    pub tls_cipher: TlsCipher,
    /// TCP keepalive idle time and probe interval on every socket (zero: off).
    pub tcp_keepalive: Duration,
    /// HTTP/2 PING keepalive on HBONE connections.
    pub keepalive: Keepalive,
    /// io_uring setup flags for the shards' rings.
    pub uring_taskrun: UringTaskrun,
    /// Busy ticks an io_uring shard may run before its HBONE connections' deferred writes.
    pub write_batch_ticks: u32,
    /// Bytes waiting on an HBONE connection that end the busy ticks (0: never).
    pub write_batch_bytes: u32,
    /// Provided buffers of an io_uring shard's multishot receives (0: none).
    pub uring_recv_buffers: u16,
    /// Outbound capture listen addresses.
    pub outbound: Vec<SocketAddr>,
    /// HBONE listen addresses.
    pub inbound: Vec<SocketAddr>,
    /// Plaintext inbound capture listen addresses.
    pub inbound_plaintext: Vec<SocketAddr>,
    /// SO_MARK on every socket ringtun originates (0: none).
    pub mark: u32,
    /// HBONE pool limits.
    pub pool: PoolLimits,
    /// HTTP/2 settings.
    pub h2: H2Settings,
    /// TCP connect timeout for upstream and HBONE connections.
    pub connect_timeout: Duration,
    /// TLS handshake timeout, both directions.
    pub handshake_timeout: Duration,
    /// Kernel TLS for HBONE connections.
    pub ktls: KtlsMode,
    /// The userspace record layer where the kernel's is not used.
    pub tls_records: TlsRecords,
    /// Records an offloaded AES-GCM connection may send with one key before it takes no new
    /// streams (see `stream::KeyBudget`); the default is
    /// [`crate::stream::DEFAULT_TX_RECORD_LIMIT`].
    pub ktls_tx_record_limit: u64,
    /// Records an offloaded AES-GCM connection may receive under the peer's key before it
    /// takes no new streams; the default is [`crate::stream::DEFAULT_RX_RECORD_LIMIT`].
    pub ktls_rx_record_limit: u64,
    /// Metrics (15020), readiness (15021) and admin (127.0.0.1:15000) listeners.
    pub admin_listeners: Vec<(Role, SocketAddr)>,
    /// A tunnelled connection with no bytes either way for this long is closed (zero: never).
    pub idle_timeout: Duration,
    /// Connections a shard carries at most; more are refused at once (RST) and counted.
    pub max_connections_per_shard: u64,
    /// How long a drain lets live connections finish before exiting (and, in in-pod mode,
    /// how long a removed pod's connections may finish).
    pub drain_timeout: Duration,
    /// In-pod mode: listeners in each pod's namespace, handed over by the node agent.
    pub inpod: Option<InpodOptions>,
    /// The DNS proxy (`ISTIO_META_DNS_CAPTURE`), or `None` when it is off.
    pub dns: Option<crate::dns::DnsOptions>,
    /// Where the DNS proxy listens or would (`/config_dump` shows it either way, as ztunnel).
    pub dns_listen: crate::dns::Listen,
    /// `IPV6_ENABLED`.
    pub ipv6_enabled: bool,
}
