//! What the operator endpoints see of the running proxy: the control thread's side of
//! [`Admin`], so `operate` never imports the control thread or the shards.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Sender;

use super::certs::Certificates;
use crate::config::Snapshot;
use crate::metrics::ShardReport;
use crate::operate::admin::{Admin, NotReady};
use crate::operate::config_dump::{self, Facts};
use crate::operate::logging::{self, LogFilterError};
use crate::operate::prometheus::ProcessInfo;
use crate::options::IoDriver;
use crate::shard::ShardMsg;

/// The running proxy as the control thread knows it, shared with the endpoints' threads.
pub(super) struct ControlState {
    senders: Vec<Sender<ShardMsg>>,
    /// Every shard listens on every listener and the first config is loaded.
    ready: AtomicBool,
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
}

impl ControlState {
    /// Not ready yet: the shards are still taking their listeners.
    pub(super) fn new(
        senders: Vec<Sender<ShardMsg>>,
        snapshot: Snapshot,
        certs: Arc<Certificates>,
        ktls: Option<tls_kernel_offload::Capability>,
        driver: IoDriver,
        workers: usize,
    ) -> Self {
        ControlState {
            senders,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            quit: AtomicBool::new(false),
            current: Mutex::new(snapshot),
            shards_running: AtomicBool::new(false),
            certs,
            ktls,
            driver,
            workers,
        }
    }

    /// The shard threads run: scrapes may ask them.
    pub(super) fn set_shards_running(&self) {
        self.shards_running.store(true, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Ca;
    use crate::tls::{CertPaths, TlsMaterial};
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
            certs(),
            None,
            IoDriver::Legacy,
            1,
        );
        state.set_ready();
        state.set_draining();
        assert_eq!(state.ready(), Err(NotReady::Draining), "after a signal");
        assert!(!state.quit_requested());
    }
}
