//! What ztunnel's in-pod workload manager shows operators, kept the way it keeps it: each
//! pod's proxy state for `/config_dump`'s `workloadState` (`src/inpod/admin.rs`) and the
//! `workload_manager_*` metrics (`src/inpod/metrics.rs`).
//!
//! Lifetimes are ztunnel's: a pod is `Pending` from the moment its listeners are asked for
//! until they accept (and stays so while a failed setup is retried), `Up` once they do, and
//! its entry leaves only when its last connection has ended, not when the agent deletes it.
//! The gauges count the pods served and the pods pending now; the counters count proxies
//! started and proxies ended (after their connections drained).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use crate::exposition::{counter_header, gauge_header};

/// A pod as `workloadState` shows it: the agent's `WorkloadInfo` and its network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Its service account.
    pub service_account: String,
    /// `net:[inode]` of its network namespace.
    pub netns: String,
}

/// A pod's proxy, as ztunnel names its states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyState {
    /// Its listeners are being made, or failed and are retried.
    Pending,
    /// Its listeners accept (or it was deleted and its connections still run).
    Up,
}

impl ProxyState {
    fn name(self) -> &'static str {
        match self {
            ProxyState::Pending => "Pending",
            ProxyState::Up => "Up",
        }
    }
}

#[derive(Debug)]
struct Entry {
    state: ProxyState,
    info: PodInfo,
    /// Proxies of this uid started and not yet ended: a pod re-added in a new namespace has
    /// two while the old one drains (ztunnel's count, for the same race).
    live: usize,
}

/// The workload manager's four metrics, as read at a scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManagerMetrics {
    /// Pods whose listeners accept now.
    pub active: usize,
    /// Pods whose listeners could not be made yet (retried).
    pub pending: usize,
    /// Proxies started since ringtun began.
    pub started: u64,
    /// Proxies ended (deleted and drained) since ringtun began.
    pub stopped: u64,
}

impl ManagerMetrics {
    /// The families as ztunnel's registry writes them (`workload_manager_` prefix, no labels).
    pub fn prometheus(&self, openmetrics: bool) -> String {
        let mut out = String::new();
        let gauges = [
            (
                "workload_manager_active_proxy_count",
                "The total number current workloads with active proxies (unstable)",
                self.active,
            ),
            (
                "workload_manager_pending_proxy_count",
                "The total number current workloads with pending proxies (unstable)",
                self.pending,
            ),
        ];
        for (name, help, v) in gauges {
            gauge_header(&mut out, name, help);
            let _ = writeln!(out, "{name} {v}");
        }
        let counters = [
            (
                "workload_manager_proxies_started",
                "The total number of proxies that were started (unstable)",
                self.started,
            ),
            (
                "workload_manager_proxies_stopped",
                "The total number of proxies that were stopped (unstable)",
                self.stopped,
            ),
        ];
        for (name, help, v) in counters {
            counter_header(&mut out, name, help, openmetrics);
            let _ = writeln!(out, "{name}_total {v}");
        }
        out
    }
}

#[derive(Debug, Default)]
struct Inner {
    pods: BTreeMap<String, Entry>,
    metrics: ManagerMetrics,
}

/// The pods' proxy states and the manager's metrics, shared by the ZDS thread (which changes
/// them), the shards (a pod's last reference ends its proxy) and the endpoints (which read).
#[derive(Debug, Default)]
pub struct WorkloadManager {
    inner: Mutex<Inner>,
}

impl WorkloadManager {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> Option<R> {
        self.inner.lock().ok().map(|mut i| f(&mut i))
    }

    /// A pod's listeners are asked for (ztunnel's `proxy_pending`).
    pub fn pending(&self, uid: &str, info: &PodInfo) {
        self.with(|i| {
            i.pods
                .entry(uid.to_owned())
                .and_modify(|e| e.state = ProxyState::Pending)
                .or_insert_with(|| Entry {
                    state: ProxyState::Pending,
                    info: info.clone(),
                    live: 0,
                });
        });
    }

    /// A pod's listeners accept on every shard (ztunnel's `proxy_up` and `proxies_started`).
    pub fn up(&self, uid: &str, info: &PodInfo) {
        self.with(|i| {
            let e = i.pods.entry(uid.to_owned()).or_insert_with(|| Entry {
                state: ProxyState::Up,
                info: info.clone(),
                live: 0,
            });
            e.state = ProxyState::Up;
            e.info = info.clone();
            e.live += 1;
            i.metrics.started += 1;
        });
    }

    /// One of the pod's proxies ended: removed and its last connection gone (ztunnel's
    /// `proxy_down` and `proxies_stopped`). The entry leaves with its last proxy.
    pub fn down(&self, uid: &str) {
        self.with(|i| {
            i.metrics.stopped += 1;
            if let Some(e) = i.pods.get_mut(uid) {
                e.live = e.live.saturating_sub(1);
                if e.live == 0 && e.state == ProxyState::Up {
                    i.pods.remove(uid);
                }
            }
        });
    }

    /// A pending pod is given up (deleted, or left out of a snapshot): its entry goes unless a
    /// proxy of it still drains.
    pub fn forget_pending(&self, uid: &str) {
        self.with(|i| {
            if let Some(e) = i.pods.get_mut(uid) {
                if e.live == 0 {
                    i.pods.remove(uid);
                } else {
                    e.state = ProxyState::Up;
                }
            }
        });
    }

    /// The pods served and pending now (the two gauges).
    pub fn set_counts(&self, active: usize, pending: usize) {
        self.with(|i| {
            i.metrics.active = active;
            i.metrics.pending = pending;
        });
    }

    /// Whether some pod's listeners could not be made yet: ztunnel is not ready then.
    pub fn has_pending(&self) -> bool {
        self.with(|i| i.metrics.pending > 0).unwrap_or(false)
    }

    /// The metrics now.
    pub fn metrics(&self) -> ManagerMetrics {
        self.with(|i| i.metrics).unwrap_or_default()
    }

    /// ztunnel's `workloadState`: uid → `state` and `info` (name, namespace, serviceAccount),
    /// and ringtun's `netns`.
    pub fn workload_state(&self) -> serde_json::Value {
        let map = self
            .with(|i| {
                i.pods
                    .iter()
                    .map(|(uid, e)| {
                        let v = serde_json::json!({
                            "state": e.state.name(),
                            "info": {
                                "name": e.info.name,
                                "namespace": e.info.namespace,
                                "serviceAccount": e.info.service_account,
                            },
                            "netns": e.info.netns,
                        });
                        (uid.clone(), v)
                    })
                    .collect::<serde_json::Map<_, _>>()
            })
            .unwrap_or_default();
        serde_json::Value::Object(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> PodInfo {
        PodInfo {
            name: name.into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            netns: "net:[1]".into(),
        }
    }

    fn states(m: &WorkloadManager) -> Vec<(String, String)> {
        m.workload_state()
            .as_object()
            .expect("an object")
            .iter()
            .map(|(k, v)| (k.clone(), v["state"].as_str().unwrap_or("").to_owned()))
            .collect()
    }

    /// ztunnel's `test_proxy_state`, and a pod re-added in a new namespace while the old
    /// proxy drains: the entry lives until both proxies ended.
    #[test]
    fn states_follow_ztunnels_lifetimes() {
        let m = WorkloadManager::default();
        m.pending("uid1", &info("name"));
        assert_eq!(
            serde_json::to_string(&m.workload_state()).expect("json"),
            r#"{"uid1":{"info":{"name":"name","namespace":"ns","serviceAccount":"sa"},"netns":"net:[1]","state":"Pending"}}"#
        );
        m.up("uid1", &info("name"));
        assert_eq!(states(&m), [("uid1".into(), "Up".into())]);
        m.down("uid1");
        assert_eq!(states(&m), []);

        m.up("uid2", &info("b"));
        m.pending("uid2", &info("b"));
        m.up("uid2", &info("b"));
        m.down("uid2");
        assert_eq!(states(&m), [("uid2".into(), "Up".into())], "one still runs");
        m.down("uid2");
        assert_eq!(states(&m), []);
        assert_eq!(
            m.metrics(),
            ManagerMetrics {
                active: 0,
                pending: 0,
                started: 3,
                stopped: 3
            }
        );

        m.pending("uid3", &info("c"));
        m.forget_pending("uid3");
        assert_eq!(states(&m), [], "a pending pod deleted leaves");
    }

    #[test]
    fn metrics_are_ztunnels_families() {
        let m = ManagerMetrics {
            active: 2,
            pending: 1,
            started: 5,
            stopped: 3,
        };
        let text = m.prometheus(false);
        for line in [
            "# TYPE workload_manager_active_proxy_count gauge",
            "workload_manager_active_proxy_count 2",
            "workload_manager_pending_proxy_count 1",
            "# TYPE workload_manager_proxies_started_total counter",
            "workload_manager_proxies_started_total 5",
            "workload_manager_proxies_stopped_total 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        let om = m.prometheus(true);
        assert!(om.contains("# TYPE workload_manager_proxies_started counter\n"));
    }
}
