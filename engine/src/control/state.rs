//! What the operator endpoints see of the running proxy: the control thread's side of
//! [`Admin`], so `operate` never imports the control thread or the shards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::config::Snapshot;
use crate::metrics::ShardReport;
use crate::operate::admin::Role;
use crate::operate::admin::{Admin, NotReady};
use crate::operate::config_dump::{self, Facts};
use crate::operate::logging::{self, LogFilterError};
use crate::operate::prometheus::ProcessInfo;
use crate::options::{IoDriver, RunOptions};
use crate::shard::ShardMsg;
use crate::tls::TlsMaterial;

/// The running proxy as the control thread knows it, shared with the endpoints' threads.
pub(super) struct ControlState {
    senders: Vec<Sender<ShardMsg>>,
    /// Every shard listens on every listener and the first config is loaded.
    ready: AtomicBool,
    draining: AtomicBool,
    quit: AtomicBool,
    current: Mutex<Snapshot>,
    tls: Arc<TlsMaterial>,
    driver: IoDriver,
    workers: usize,
    /// ztunnel's `config` section of `/config_dump`.
    dump_config: Mutex<serde_json::Value>,
}

impl ControlState {
    /// Not ready yet: the shards are still taking their listeners.
    pub(super) fn new(
        senders: Vec<Sender<ShardMsg>>,
        snapshot: Snapshot,
        tls: Arc<TlsMaterial>,
        driver: IoDriver,
        workers: usize,
    ) -> Self {
        ControlState {
            senders,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            quit: AtomicBool::new(false),
            current: Mutex::new(snapshot),
            tls,
            driver,
            workers,
            dump_config: Mutex::new(serde_json::Value::Null),
        }
    }

    /// Sets what `/config_dump` shows as ztunnel's `config`: `opts` under ztunnel's keys.
    pub(super) fn set_options(&self, opts: &RunOptions) {
        if let Ok(mut c) = self.dump_config.lock() {
            *c = config_dump::ztunnel_config(ztunnel_settings(opts));
        }
    }

    /// Every shard listens: readiness may answer 200 (unless draining).
    pub(super) fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Whether [`ControlState::set_ready`] was called.
    pub(super) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
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
            ktls_available: self.tls.ktls.is_some(),
            draining: self.draining.load(Ordering::Relaxed),
            fds: ProcessInfo::read_fds(),
        }
    }

    fn ready(&self) -> Result<(), NotReady> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(NotReady::Draining);
        }
        if !self.ready.load(Ordering::Relaxed) {
            return Err(NotReady::Starting);
        }
        Ok(())
    }

    fn config_dump(&self) -> String {
        let Ok(snap) = self.current.lock() else {
            return "{}".into();
        };
        let facts = Facts {
            identity: self.tls.identity.to_string(),
            not_after: self.tls.not_after,
            ktls: self.tls.ktls.as_ref().map(|k| format!("{k:?}")),
            shards: self.workers,
            info: self.info(),
            config: self
                .dump_config
                .lock()
                .map(|c| c.clone())
                .unwrap_or_default(),
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
    put("dnsProxy", json!(false));
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
    put(
        "ipv6Enabled",
        json!(opts.inbound.iter().any(|a| a.is_ipv6())),
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
    use crate::tls::CertPaths;
    use ringtun_hbone::Identity;

    fn tls() -> Arc<TlsMaterial> {
        let dir =
            std::env::temp_dir().join(format!("ringtun-control-state-{}", std::process::id()));
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

    #[test]
    fn ready_only_between_listening_and_draining() {
        let snap = Snapshot::new(Default::default(), 1);
        let state = ControlState::new(Vec::new(), snap, tls(), IoDriver::Legacy, 1);
        assert_eq!(
            state.ready(),
            Err(NotReady::Starting),
            "before the shards listen"
        );
        state.set_ready();
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
            tls(),
            IoDriver::Legacy,
            1,
        );
        state.set_ready();
        state.set_draining();
        assert_eq!(state.ready(), Err(NotReady::Draining), "after a signal");
        assert!(!state.quit_requested());
    }
}
