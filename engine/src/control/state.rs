//! What the operator endpoints see of the running proxy: the control thread's side of
//! [`Admin`], so `operate` never imports the control thread or the shards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::certs::Certificates;
use crate::config::Snapshot;
use crate::inpod::manager::WorkloadManager;
use crate::metrics::ShardReport;
use crate::operate::admin::Role;
use crate::operate::admin::{Admin, NotReady};
use crate::operate::config_dump::{self, Facts};
use crate::operate::logging::{self, LogFilterError};
use crate::operate::prometheus::ProcessInfo;
use crate::options::{IoDriver, RunOptions};
use crate::shard::{ShardMsg, ShardTx};
use crate::xds::SharedXdsStatus;

/// The running proxy as the control thread knows it, shared with the endpoints' threads.
pub(super) struct ControlState {
    senders: Vec<ShardTx>,
    /// Every shard listens on every listener and runs the config source's config (with xDS:
    /// istiod's first push, not the empty config before it).
    config_in: AtomicBool,
    /// In-pod mode: the node agent's first snapshot is acknowledged (true without it).
    pods_in: AtomicBool,
    /// In-pod mode: the workload manager's pod states and metrics, for `/config_dump`'s
    /// `workloadState` and `/metrics` (unset without in-pod mode).
    pods: OnceLock<Arc<WorkloadManager>>,
    draining: AtomicBool,
    quit: AtomicBool,
    current: Mutex<Snapshot>,
    /// The shards run and answer messages (scrapes wait for them only then).
    shards_running: AtomicBool,
    /// Every identity's certificate (the proxy's and, in-pod, the pods').
    certs: Arc<Certificates>,
    /// What the kernel can offload.
    ktls: Option<tls_kernel_offload::Capability>,
    driver: IoDriver,
    workers: usize,
    /// ztunnel's `config` section of `/config_dump`.
    dump_config: Mutex<serde_json::Value>,
    /// The xDS client's state, when the config comes from istiod.
    xds: OnceLock<SharedXdsStatus>,
    /// The DNS proxy, when it runs (in in-pod mode the ZDS thread adds each pod's listeners).
    dns: OnceLock<Arc<crate::dns::DnsServer>>,
}

impl ControlState {
    /// Not ready yet: the shards are still taking their listeners.
    pub(super) fn new(
        senders: Vec<ShardTx>,
        snapshot: Snapshot,
        certs: Arc<Certificates>,
        ktls: Option<tls_kernel_offload::Capability>,
        driver: IoDriver,
        workers: usize,
    ) -> Self {
        ControlState {
            senders,
            config_in: AtomicBool::new(false),
            pods_in: AtomicBool::new(true),
            pods: OnceLock::new(),
            draining: AtomicBool::new(false),
            quit: AtomicBool::new(false),
            current: Mutex::new(snapshot),
            shards_running: AtomicBool::new(false),
            certs,
            ktls,
            driver,
            workers,
            dump_config: Mutex::new(serde_json::Value::Null),
            xds: OnceLock::new(),
            dns: OnceLock::new(),
        }
    }

    /// The DNS proxy runs: `/metrics` shows its counters, pods get its listeners.
    pub(super) fn set_dns(&self, dns: Arc<crate::dns::DnsServer>) {
        let _ = self.dns.set(dns);
    }

    /// The DNS proxy, when it runs.
    pub(super) fn dns(&self) -> Option<&Arc<crate::dns::DnsServer>> {
        self.dns.get()
    }

    /// The config comes from istiod: `/config_dump` and `/metrics` show the client's state.
    pub(super) fn set_xds(&self, status: SharedXdsStatus) {
        let _ = self.xds.set(status);
    }

    /// Sets what `/config_dump` shows as ztunnel's `config`: `opts` under ztunnel's keys.
    pub(super) fn set_options(&self, opts: &RunOptions) {
        if let Ok(mut c) = self.dump_config.lock() {
            *c = config_dump::ztunnel_config(ztunnel_settings(opts));
        }
    }

    /// The shard threads run: scrapes may ask them.
    pub(super) fn set_shards_running(&self) {
        self.shards_running.store(true, Ordering::Relaxed);
    }

    /// In-pod mode: not ready until the node agent's first snapshot is in, whatever the
    /// config; called before the ZDS thread starts. Returns the pods' workload manager.
    pub(super) fn expect_pods(&self) -> Arc<WorkloadManager> {
        self.pods_in.store(false, Ordering::SeqCst);
        self.pods.get_or_init(Default::default).clone()
    }

    /// ztunnel's in-pod `workloadState` for `/config_dump`; `None` without in-pod mode.
    fn workload_state(&self) -> Option<serde_json::Value> {
        Some(self.pods.get()?.workload_state())
    }

    /// Every shard listens and runs the source's config; returns whether that made ringtun
    /// ready (readiness answers 200 unless draining).
    pub(super) fn set_config_in(&self) -> bool {
        // SeqCst on both flags: of two threads setting one each, at least one sees both.
        !self.config_in.swap(true, Ordering::SeqCst) && self.pods_in.load(Ordering::SeqCst)
    }

    /// The node agent's first snapshot is acknowledged; returns whether that made ringtun
    /// ready (with xDS, istiod's first config may still be missing).
    pub(super) fn set_pods_in(&self) -> bool {
        !self.pods_in.swap(true, Ordering::SeqCst) && self.config_in.load(Ordering::SeqCst)
    }

    /// Whether the config is in force and, in in-pod mode, the agent's snapshot is in and
    /// no pod's listeners wait for a retry (ztunnel's workload manager readiness).
    pub(super) fn is_ready(&self) -> bool {
        self.config_in.load(Ordering::SeqCst)
            && self.pods_in.load(Ordering::SeqCst)
            && !self.pods.get().is_some_and(|p| p.has_pending())
    }

    /// A drain began: readiness answers 503 from now on.
    pub(super) fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether `/quitquitquit` asked for a drain.
    pub(super) fn quit_requested(&self) -> bool {
        self.quit.load(Ordering::Relaxed)
    }

    /// The config generation every shard now uses, for `/config_dump`.
    pub(super) fn set_current(&self, snap: Snapshot) {
        if let Ok(mut cur) = self.current.lock() {
            *cur = snap;
        }
    }
}

impl Admin for ControlState {
    fn scrape(&self) -> Vec<ShardReport> {
        if !self.shards_running.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let (tx, rx) = crossbeam_channel::bounded(self.senders.len());
        let asked = self
            .senders
            .iter()
            .filter(|s| s.send(ShardMsg::Scrape(tx.clone())).is_ok())
            .count();
        let mut out: Vec<ShardReport> = (0..asked)
            .filter_map(|_| rx.recv_timeout(Duration::from_secs(2)).ok())
            .collect();
        out.sort_by_key(|r| r.shard);
        out
    }

    fn info(&self) -> ProcessInfo {
        ProcessInfo {
            driver: match self.driver {
                IoDriver::Legacy => "legacy".into(),
                _ => "io_uring".into(),
            },
            ktls_available: self.ktls.is_some(),
            draining: self.draining.load(Ordering::Relaxed),
            certs: self.certs.report(),
            fds: ProcessInfo::read_fds(),
            xds: self
                .xds
                .get()
                .and_then(|s| s.lock().ok().map(|s| s.clone())),
            workload_manager: self.pods.get().map(|p| p.metrics()),
            dns: self.dns.get().map(|d| d.metrics().report()),
        }
    }

    fn ready(&self) -> Result<(), NotReady> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(NotReady::Draining);
        }
        if !self.is_ready() {
            return Err(NotReady::Starting);
        }
        Ok(())
    }

    fn config_dump(&self) -> String {
        let Ok(snap) = self.current.lock() else {
            return "{}".into();
        };
        let info = self.info();
        // The proxy's own certificate as it is now (renewed ones included).
        let own = self.certs.own_identity();
        let not_after = info
            .certs
            .certificates
            .iter()
            .find(|c| c.identity == own)
            .and_then(|c| c.not_after())
            .unwrap_or_default();
        let facts = Facts {
            identity: own.to_string(),
            not_after,
            ktls: self.ktls.as_ref().map(|k| format!("{k:?}")),
            shards: self.workers,
            info,
            config: self
                .dump_config
                .lock()
                .map(|c| c.clone())
                .unwrap_or_default(),
            // Built here: `operate` knows nothing of pods.
            workload_state: self.workload_state(),
        };
        config_dump::render(&snap, &facts)
    }

    fn set_log_level(&self, level: &str) -> Result<String, LogFilterError> {
        logging::set_filter(level)
    }

    fn log_level(&self) -> String {
        logging::filter()
    }

    fn reset_log_level(&self) -> Result<String, LogFilterError> {
        logging::reset_filter()
    }

    fn quit(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.quit.store(true, Ordering::Relaxed);
    }
}

/// The run options ztunnel's config has a key for, under that key and in its form.
fn ztunnel_settings(opts: &RunOptions) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::json;
    let first = |v: &[std::net::SocketAddr]| v.first().map(|a| a.to_string());
    let role = |r: Role| {
        opts.admin_listeners
            .iter()
            .find(|(role, _)| *role == r)
            .map(|(_, a)| a.to_string())
    };
    let keepalive = opts.tcp_keepalive;
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        m.insert(k.to_owned(), v);
    };
    put("proxy", json!(true));
    put("dnsProxy", json!(opts.dns.is_some()));
    if let Some(dns) = &opts.dns {
        put("clusterDomain", json!(dns.cluster_domain));
        put("preferedServiceNamespace", json!(dns.preferred_namespace));
    }
    put("clusterId", json!(opts.cluster_id));
    put("numWorkerThreads", json!(opts.workers));
    put("windowSize", json!(opts.h2.stream_window));
    put("connectionWindowSize", json!(opts.h2.connection_window));
    put("frameSize", json!(opts.h2.max_frame_size));
    put("poolMaxStreamsPerConn", json!(opts.pool.max_streams));
    put(
        "poolUnusedReleaseTimeout",
        config_dump::duration(opts.pool.idle_timeout),
    );
    put(
        "selfTerminationDeadline",
        config_dump::duration(opts.drain_timeout),
    );
    put("packetMark", json!(opts.mark));
    put("outboundAddr", json!(first(&opts.outbound)));
    put("inboundAddr", json!(first(&opts.inbound)));
    put(
        "inboundPlaintextAddr",
        json!(first(&opts.inbound_plaintext)),
    );
    put("statsAddr", json!(role(Role::Metrics)));
    put("readinessAddr", json!(role(Role::Readiness)));
    put("adminAddr", json!(role(Role::Admin)));
    put("ipv6Enabled", json!(opts.ipv6_enabled));
    // ztunnel shows it whether the proxy is on or not, in its `Address` enum's form.
    put(
        "dnsProxyAddr",
        match opts.dns_listen {
            crate::dns::Listen::Localhost(port) => json!({"Localhost": [opts.ipv6_enabled, port]}),
            crate::dns::Listen::Addr(a) => json!({"SocketAddr": a.to_string()}),
        },
    );
    put("requireOriginalSource", json!(false));
    put("localNode", json!(opts.node));
    put(
        "proxyMode",
        json!(if opts.inpod.is_some() {
            "Shared"
        } else {
            "Dedicated"
        }),
    );
    put(
        "proxyWorkloadInformation",
        json!(opts
            .workload
            .as_ref()
            .map(|(ns, name)| json!({"namespace": ns, "name": name}))),
    );
    put(
        "inpodUds",
        json!(opts.inpod.as_ref().map(|i| i.uds.display().to_string())),
    );
    put(
        "xdsAddress",
        json!(opts.xds.as_ref().map(|x| x.endpoint.url.clone())),
    );
    put(
        "socketConfig",
        json!({
            "keepaliveEnabled": !keepalive.is_zero(),
            "keepaliveTime": config_dump::duration(keepalive),
            "keepaliveInterval": config_dump::duration(keepalive),
            "keepaliveRetries": 9,
            "userTimeoutEnabled": false,
        }),
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Ca;
    use crate::tls::{CertPaths, TlsMaterial};
    use ringtun_hbone::Identity;

    fn tls() -> Arc<TlsMaterial> {
        // A directory per call: the tests run at once in one process, and each removes its own.
        static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ringtun-control-state-{}-{}",
            std::process::id(),
            CALLS.fetch_add(1, Ordering::Relaxed)
        ));
        let ca = Ca::open_or_create(&dir).expect("CA");
        let issued = ca
            .issue(&Identity::new("cluster.local", "default", "server"))
            .expect("issue");
        let paths = CertPaths {
            chain: issued.chain,
            key: issued.key,
            roots: issued.roots,
        };
        let tls = TlsMaterial::load(&paths, "cluster.local", Default::default()).expect("load");
        let _ = std::fs::remove_dir_all(&dir);
        Arc::new(tls)
    }

    fn certs() -> Arc<Certificates> {
        Arc::new(Certificates::Files {
            own: tls(),
            signer: None,
        })
    }

    #[test]
    fn ready_only_between_listening_and_draining() {
        let snap = Snapshot::new(Default::default(), 1);
        let state = ControlState::new(Vec::new(), snap, certs(), None, IoDriver::Legacy, 1);
        assert_eq!(
            state.ready(),
            Err(NotReady::Starting),
            "before the shards listen"
        );
        state.set_config_in();
        assert_eq!(state.ready(), Ok(()));
        state.quit();
        assert_eq!(
            state.ready(),
            Err(NotReady::Draining),
            "after /quitquitquit"
        );
        assert!(state.quit_requested());
        let state = ControlState::new(
            Vec::new(),
            Snapshot::new(Default::default(), 1),
            certs(),
            None,
            IoDriver::Legacy,
            1,
        );
        state.set_config_in();
        state.set_draining();
        assert_eq!(state.ready(), Err(NotReady::Draining), "after a signal");
        assert!(!state.quit_requested());
    }

    #[test]
    fn config_dump_has_a_workload_state_per_pod_in_in_pod_mode_only() {
        let fresh = || {
            ControlState::new(
                Vec::new(),
                Snapshot::new(Default::default(), 1),
                certs(),
                None,
                IoDriver::Legacy,
                1,
            )
        };
        let dump = |s: &ControlState| -> serde_json::Value {
            serde_json::from_str(&s.config_dump()).expect("config_dump is JSON")
        };
        let dedicated = fresh();
        assert_eq!(dump(&dedicated).get("workloadState"), None);

        let node = fresh();
        let pods = node.expect_pods();
        assert_eq!(dump(&node)["workloadState"], serde_json::json!({}));
        let info = |name: &str| crate::inpod::manager::PodInfo {
            name: name.into(),
            namespace: "default".into(),
            service_account: format!("sa-{name}"),
            netns: "net:[4026532001]".into(),
        };
        pods.up("uid-a", &info("a"));
        pods.up("uid-b", &info("b"));
        pods.down("uid-b");
        let d = dump(&node);
        assert_eq!(
            d["workloadState"],
            serde_json::json!({"uid-a": {
                "state": "Up",
                "info": {"name": "a", "namespace": "default", "serviceAccount": "sa-a"},
                "netns": "net:[4026532001]",
            }})
        );
        assert_eq!(
            d["ringtun"]["configGeneration"], 1,
            "the rest of the dump stays"
        );
    }

    /// In-pod mode with xDS: ready only once istiod's first config is in force and the node
    /// agent's first snapshot is acknowledged, whichever comes last.
    #[test]
    fn in_pod_readiness_waits_for_the_config_and_the_agents_snapshot() {
        let fresh = || {
            let s = ControlState::new(
                Vec::new(),
                Snapshot::new(Default::default(), 1),
                certs(),
                None,
                IoDriver::Legacy,
                1,
            );
            s.expect_pods();
            s
        };
        let state = fresh();
        assert!(!state.set_pods_in(), "the agent's snapshot alone");
        assert_eq!(state.ready(), Err(NotReady::Starting));
        assert!(!state.set_pods_in(), "a second snapshot changes nothing");
        assert!(state.set_config_in(), "then istiod's first config");
        assert_eq!(state.ready(), Ok(()));

        let state = fresh();
        assert!(!state.set_config_in(), "istiod's config alone");
        assert_eq!(state.ready(), Err(NotReady::Starting));
        assert!(state.set_pods_in(), "then the agent's snapshot");
        assert_eq!(state.ready(), Ok(()));
        assert!(!state.set_config_in(), "a later config is no new readiness");
    }
}
