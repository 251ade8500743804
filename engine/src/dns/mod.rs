//! ztunnel's DNS proxy: answers A and AAAA queries for the mesh's names from the config
//! snapshot and relays everything else to the upstream resolvers. One job per file: `wire`
//! (the message format), `names` (the aliases of a query name), `resolve` (the mesh's answer;
//! no I/O), `forward` (upstream, UDP then TCP), `server` (the listeners), `metrics`.
//!
//! **Where it runs.** On a thread of its own ("ringtun-dns") with a tokio current-thread
//! runtime, not on the shards. Queries are few and tiny next to the tunnelled bytes, and what
//! a query waits on (an upstream answer, a timeout, a TCP retry) would otherwise sit in every
//! shard's loop; one thread serves every listener, in ringtun's namespace or any pod's, and
//! the shards' hot loop stays as it was. ztunnel runs it on its own tokio runtime likewise.
//!
//! **Where it listens.** With DNS capture on (`ISTIO_META_DNS_CAPTURE`, on unless `false`, as
//! in ztunnel): in dedicated and node mode on `ISTIO_META_DNS_PROXY_ADDR` (ztunnel's default
//! `localhost:15053`: 127.0.0.1 and, where the namespace has it, ::1), UDP and TCP; in in-pod
//! mode on the same address inside every pod's namespace, bound when the pod is added
//! (`control::pods`) and closed when it is deleted.

mod forward;
pub mod metrics;
pub mod names;
pub mod resolve;
mod server;
pub mod wire;

pub use forward::{parse_resolv_conf, ForwardError, Forwarder, NetnsRef};
pub use metrics::{DnsMetrics, DnsReport};
pub use server::{type_label, udp_limit, Who};

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::Snapshot;
use server::{Command, Shared, Sockets};

/// The port ztunnel's DNS proxy listens on.
pub const DEFAULT_PORT: u16 = 15053;

/// Where the proxy listens (ztunnel's `DNS_PROXY_ADDR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    /// `localhost:PORT`: 127.0.0.1 and ::1 (the latter where the namespace has it).
    Localhost(u16),
    /// One address.
    Addr(SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Listen, String> {
        if let Some(port) = s.strip_prefix("localhost:") {
            return port
                .parse()
                .map(Listen::Localhost)
                .map_err(|_| format!("{s:?}: bad port"));
        }
        s.parse()
            .map(Listen::Addr)
            .map_err(|_| format!("{s:?}: expected localhost:PORT or IP:PORT"))
    }
}

/// The DNS proxy's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsOptions {
    /// Where it listens (in each pod, in in-pod mode).
    pub listen: Listen,
    /// The resolv.conf whose nameservers are the upstreams (ztunnel reads `/etc/resolv.conf`).
    pub resolv_conf: PathBuf,
    /// Upstream resolvers instead of the resolv.conf's.
    pub upstreams: Vec<SocketAddr>,
    /// Each upstream attempt's limit.
    pub upstream_timeout: Duration,
    /// The cluster domain (`CLUSTER_DOMAIN`).
    pub cluster_domain: String,
    /// `PREFERED_SERVICE_NAMESPACE` (ztunnel's spelling).
    pub preferred_namespace: Option<String>,
    /// `IPV6_ENABLED`: AAAA answers for mesh names.
    pub ipv6: bool,
    /// SO_MARK on upstream sockets.
    pub mark: u32,
}

/// Why the DNS proxy cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The cluster domain is not a DNS name.
    #[error("CLUSTER_DOMAIN {0:?} is not a DNS name")]
    Domain(String),
    /// A listener could not be bound.
    #[error("DNS listener on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The thread could not start.
    #[error("DNS thread: {0}")]
    Thread(io::Error),
}

/// The running DNS proxy: a handle for the control side.
pub struct DnsServer {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<thread::JoinHandle<()>>,
    listen: Listen,
    /// `IPV6_ENABLED`: `localhost` includes ::1.
    ipv6: bool,
    /// Where ringtun's own listeners are bound (empty in in-pod mode).
    pub bound: Vec<SocketAddr>,
}

impl DnsServer {
    /// Starts the thread; upstreams from `opts.upstreams`, else the resolv.conf (a missing
    /// one is logged: queries the mesh does not answer then fail with SERVFAIL).
    pub fn start(opts: &DnsOptions, snapshot: Snapshot) -> Result<DnsServer, DnsError> {
        let domains = names::Domains::new(&opts.cluster_domain)
            .ok_or_else(|| DnsError::Domain(opts.cluster_domain.clone()))?;
        let servers = if opts.upstreams.is_empty() {
            match std::fs::read_to_string(&opts.resolv_conf) {
                Ok(text) => parse_resolv_conf(&text),
                Err(e) => {
                    tracing::warn!(path = %opts.resolv_conf.display(), error = %e, "DNS proxy: no resolv.conf; only mesh names resolve");
                    Vec::new()
                }
            }
        } else {
            opts.upstreams.clone()
        };
        let shared = Arc::new(Shared {
            snapshot: Mutex::new(Some(snapshot)),
            policy: resolve::Policy {
                domains,
                preferred_namespace: opts.preferred_namespace.clone(),
                ipv6: opts.ipv6,
            },
            forwarder: Forwarder {
                servers: servers.clone(),
                timeout: opts.upstream_timeout,
                mark: opts.mark,
            },
            metrics: DnsMetrics::default(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let s = shared.clone();
        let thread = thread::Builder::new()
            .name("ringtun-dns".into())
            .spawn(move || server::run(s, rx))
            .map_err(DnsError::Thread)?;
        tracing::info!(listen = ?opts.listen, upstreams = ?servers, "DNS proxy started");
        Ok(DnsServer {
            shared,
            commands: tx,
            thread: Some(thread),
            listen: opts.listen,
            ipv6: opts.ipv6,
            bound: Vec::new(),
        })
    }

    /// Listens in ringtun's own namespace for `who` (dedicated or node mode).
    pub fn listen_here(&mut self, who: Who) -> Result<(), DnsError> {
        let sockets = bind(self.listen, self.ipv6)?;
        self.bound = sockets
            .udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect();
        tracing::info!(addrs = ?self.bound, "DNS proxy listening (UDP and TCP)");
        self.serve(String::new(), who, sockets, None);
        Ok(())
    }

    /// In-pod mode: binds the pod's DNS listeners inside `netns` and serves them, forwarding
    /// from inside it too. An error leaves nothing bound.
    pub fn add_pod(
        &self,
        uid: &str,
        namespace: &str,
        name: &str,
        netns: NetnsRef,
    ) -> Result<(), String> {
        let (listen, ipv6) = (self.listen, self.ipv6);
        let fd = netns.as_fd().as_raw_fd();
        let sockets = thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: `netns` outlives this scoped thread.
                let ns = unsafe { BorrowedFd::borrow_raw(fd) };
                crate::net::setns_net(ns)
                    .map_err(|e| format!("DNS: entering the pod's namespace: {e}"))?;
                bind(listen, ipv6).map_err(|e| e.to_string())
            })
            .join()
            .unwrap_or_else(|_| Err("DNS: the bind thread panicked".into()))
        })?;
        let who = Who::Pod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        self.serve(uid.to_owned(), who, sockets, Some(netns));
        Ok(())
    }

    /// In-pod mode: closes the pod's DNS listeners.
    pub fn remove_pod(&self, uid: &str) {
        let _ = self.commands.send(Command::Stop(uid.to_owned()));
    }

    fn serve(&self, key: String, who: Who, sockets: Sockets, netns: Option<NetnsRef>) {
        let _ = self.commands.send(Command::Serve {
            key,
            who,
            sockets,
            netns,
        });
    }

    /// The config generation queries see from now on.
    pub fn set_snapshot(&self, snap: Snapshot) {
        if let Ok(mut s) = self.shared.snapshot.lock() {
            *s = Some(snap);
        }
    }

    /// A handle on the counters (for `/metrics`).
    pub fn metrics(&self) -> DnsMetrics {
        self.shared.metrics.clone()
    }

    /// Closes every listener and ends the thread (without waiting for it: see `Drop`).
    pub fn close(&self) {
        let _ = self.commands.send(Command::Shutdown);
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds UDP and TCP on `listen` in this thread's namespace. For `localhost`, ::1 is skipped
/// without `ipv6` or where the namespace has no IPv6 loopback (as ztunnel downgrades per pod).
fn bind(listen: Listen, ipv6: bool) -> Result<Sockets, DnsError> {
    let addrs: Vec<(SocketAddr, bool)> = match listen {
        Listen::Localhost(port) => {
            let mut v = vec![((Ipv4Addr::LOCALHOST, port).into(), true)];
            if ipv6 {
                v.push(((Ipv6Addr::LOCALHOST, port).into(), false));
            }
            v
        }
        Listen::Addr(a) => vec![(a, true)],
    };
    let mut out = Sockets {
        udp: Vec::new(),
        tcp: Vec::new(),
    };
    for (addr, required) in addrs {
        match bind_one(addr, out.udp.first().and_then(|s| s.local_addr().ok())) {
            Ok((u, t)) => {
                out.udp.push(u);
                out.tcp.push(t);
            }
            Err(source) if required => return Err(DnsError::Bind { addr, source }),
            Err(e) => tracing::debug!(%addr, error = %e, "DNS proxy: no IPv6 loopback here"),
        }
    }
    Ok(out)
}

/// One UDP socket and one TCP listener on `addr` (port 0: the UDP one's port, else the
/// first address's).
fn bind_one(
    mut addr: SocketAddr,
    first: Option<SocketAddr>,
) -> io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    use socket2::{Domain, Protocol, Socket, Type};
    if addr.port() == 0 {
        if let Some(f) = first {
            addr.set_port(f.port());
        }
    }
    let udp = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual stack where the address is the wildcard; a loopback address ignores it.
        let _ = udp.set_only_v6(false);
    }
    // SO_REUSEPORT: a new ringtun takes a pod over beside the old one, as the other
    // listeners do.
    udp.set_reuse_port(true)?;
    udp.bind(&addr.into())?;
    let udp: std::net::UdpSocket = udp.into();
    addr.set_port(udp.local_addr()?.port());
    let tcp = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        let _ = tcp.set_only_v6(false);
    }
    tcp.set_reuse_address(true)?;
    tcp.set_reuse_port(true)?;
    tcp.bind(&addr.into())?;
    tcp.listen(128)?;
    Ok((udp, tcp.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_read_as_ztunnels() {
        assert_eq!("localhost:15053".parse(), Ok(Listen::Localhost(15053)));
        assert_eq!(
            "[::]:15053".parse(),
            Ok(Listen::Addr("[::]:15053".parse().unwrap()))
        );
        assert!("localhost".parse::<Listen>().is_err());
        assert!("localhost:x".parse::<Listen>().is_err());
        assert!("10.0.0.1".parse::<Listen>().is_err());
    }

    #[test]
    fn localhost_binds_both_loopbacks_on_one_port() {
        let s = bind(Listen::Localhost(0), true).unwrap();
        let ports: Vec<u16> = s
            .udp
            .iter()
            .map(|u| u.local_addr().unwrap().port())
            .chain(s.tcp.iter().map(|t| t.local_addr().unwrap().port()))
            .collect();
        assert!(ports.iter().all(|p| *p == ports[0] && *p != 0), "{ports:?}");
        let v4 = bind(Listen::Localhost(0), false).unwrap();
        assert_eq!(v4.udp.len(), 1);
    }
}
