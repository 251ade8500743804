//! In-pod mode on the control side: a thread that talks ZDS to istio-cni's node agent
//! (`inpod::uds` and `inpod::session`), makes each pod's listeners inside the pod's network
//! namespace and hands every shard its SO_REUSEPORT copies, and removes pods.
//!
//! Readiness stays false until the agent's first snapshot is acknowledged, and while a pod's
//! listeners could not be made: such a pod is pending (an error ack) and retried every
//! [`RETRY`], as ztunnel does. When the agent goes away the thread reconnects with backoff;
//! the pods keep being served meanwhile, and the next snapshot removes those the agent no
//! longer announces.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ringtun_hbone::Identity;

use super::certs::Certificates;
use super::state::ControlState;
use crate::inpod::manager::{PodInfo, WorkloadManager};
use crate::inpod::session::{Action, Reply, Session};
use crate::inpod::uds::{Backoff, Handled, ZdsClient};
use crate::inpod::zds::WorkloadInfo;
use crate::inpod::NetnsFd;
use crate::net;
use crate::options::{InpodOptions, ListenerKind, RunOptions};
use crate::shard::pod::Pod;
use crate::shard::{ShardMsg, ShardTx};
use crate::EngineError;

/// How long the thread waits for the agent before looking at its stop flag again.
const POLL: Duration = Duration::from_millis(200);

/// How long the shards may take to accept a pod's listeners.
const SHARD_REPLY: Duration = Duration::from_secs(5);

/// How often pods whose listeners could not be made are tried again (ztunnel's
/// `RETRY_DURATION`).
const RETRY: Duration = Duration::from_secs(5);

/// The running ZDS thread.
pub(super) struct PodsThread {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<()>,
}

impl PodsThread {
    /// Stops the thread (within [`POLL`]) and waits for it.
    pub(super) fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
    }
}

/// Starts the ZDS thread: it connects to the agent at `inpod.uds` and serves pods on the
/// shards of `senders`.
pub(super) fn spawn(
    inpod: &InpodOptions,
    opts: Arc<RunOptions>,
    certs: Arc<Certificates>,
    senders: Vec<ShardTx>,
    state: Arc<ControlState>,
) -> Result<PodsThread, EngineError> {
    let stop = Arc::new(AtomicBool::new(false));
    let manager = state.expect_pods();
    let mut pods = Pods {
        opts,
        certs,
        senders,
        state,
        manager,
        served: HashMap::new(),
        pending: HashMap::new(),
        next_retry: None,
        agent_synced: false,
    };
    let uds = inpod.uds.clone();
    let flag = stop.clone();
    let handle = thread::Builder::new()
        .name("ringtun-zds".into())
        .spawn(move || pods.run(&uds, &flag))
        .map_err(EngineError::Thread)?;
    Ok(PodsThread { stop, handle })
}

/// The pods the control side serves, and what it needs to make more.
struct Pods {
    opts: Arc<RunOptions>,
    /// Each pod's certificate: the in-pod signer's, istiod's CA's, or the mounted one.
    certs: Arc<Certificates>,
    senders: Vec<ShardTx>,
    state: Arc<ControlState>,
    /// The pods' states and metrics as ztunnel's workload manager shows them.
    manager: Arc<WorkloadManager>,
    /// Pods the shards serve, by uid.
    served: HashMap<String, Arc<Pod>>,
    /// Pods whose listeners could not be made, kept to be tried again.
    pending: HashMap<String, (WorkloadInfo, NetnsFd)>,
    /// When the pending pods are tried next.
    next_retry: Option<Instant>,
    /// The agent's first snapshot was acknowledged.
    agent_synced: bool,
}

impl Pods {
    fn run(&mut self, uds: &std::path::Path, stop: &AtomicBool) {
        let mut session = Session::new();
        let mut backoff = Backoff::new();
        let mut warned = false;
        while !stop.load(Ordering::Relaxed) {
            let mut client = match ZdsClient::connect(uds) {
                Ok(c) => c,
                Err(e) => {
                    // Said once per outage: the agent may simply not be up yet.
                    if !warned {
                        tracing::warn!(error = %e, "node agent not reachable; retrying");
                        warned = true;
                    }
                    sleep_unless(stop, backoff.next_delay());
                    continue;
                }
            };
            warned = false;
            backoff.reset();
            session.reconnected();
            tracing::info!(uds = %uds.display(), pods = self.served.len(), "connected to the node agent");
            while !stop.load(Ordering::Relaxed) {
                self.retry_due();
                match client.handle_next(&mut session, Some(POLL), |a| self.perform(a)) {
                    Ok(Handled::Idle) => {}
                    Ok(Handled::Answered(Reply::Refused(r))) => {
                        tracing::warn!(refusal = %r, "node agent request refused");
                    }
                    Ok(Handled::Answered(_)) => {}
                    Ok(Handled::Closed) => {
                        tracing::info!("node agent closed the connection; reconnecting");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "node agent connection failed; reconnecting");
                        break;
                    }
                }
            }
        }
    }

    /// Carries out one action of the session; the answer goes back to the agent.
    fn perform(&mut self, action: Action) -> Reply {
        match action {
            Action::AddPod {
                uid,
                workload,
                netns,
                replaces,
            } => {
                if replaces.is_some()
                    || self.served.contains_key(&uid)
                    || self.pending.contains_key(&uid)
                {
                    self.remove(&uid);
                }
                match self.add(&uid, workload, netns) {
                    Ok(()) => Reply::Ok,
                    Err(e) => {
                        tracing::warn!(uid, error = %e, retry = ?RETRY, "pod not served yet: pending");
                        Reply::Failed(e)
                    }
                }
            }
            // Nothing to do: a kept pod stays as it is.
            Action::KeepPod { .. } => Reply::Ok,
            Action::DelPod { uid } => {
                self.remove(&uid);
                Reply::Ok
            }
            Action::SnapshotDone { remove } => {
                for uid in &remove {
                    self.remove(uid);
                }
                let first = !self.agent_synced;
                self.agent_synced = true;
                let now_in = self.state.set_pods_in();
                if !self.pending.is_empty() {
                    tracing::info!(
                        pods = self.served.len(),
                        pending = self.pending.len(),
                        "node agent snapshot complete; not ready while pods are pending"
                    );
                } else if now_in {
                    tracing::info!(
                        pods = self.served.len(),
                        "node agent snapshot complete: ringtun ready"
                    );
                } else if first && !self.state.is_ready() {
                    tracing::info!(
                        pods = self.served.len(),
                        "node agent snapshot complete; ready once the control plane's first config is in force"
                    );
                }
                Reply::Ok
            }
        }
    }

    /// Serves a pod: its identity's certificate, its listeners in its namespace, one copy per
    /// shard. On failure no shard keeps any of it and the pod is pending, tried again later.
    fn add(&mut self, uid: &str, w: WorkloadInfo, netns: NetnsFd) -> Result<(), String> {
        let info = PodInfo {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            netns: netns.id.to_string(),
        };
        self.manager.pending(uid, &info);
        let result = self.try_add(uid, &w, &info, netns);
        let failed = match result {
            Ok(()) => {
                self.pending.remove(uid);
                Ok(())
            }
            Err((e, Some(netns))) => {
                self.pending.insert(uid.to_owned(), (w, netns));
                self.next_retry
                    .get_or_insert_with(|| Instant::now() + RETRY);
                Err(e)
            }
            // Nothing to try again with (no fd left to keep its namespace): not pending.
            Err((e, None)) => {
                self.pending.remove(uid);
                self.manager.forget_pending(uid);
                Err(e)
            }
        };
        self.counts();
        failed
    }

    /// [`Pods::add`]'s work; on failure the pod's namespace comes back, to try again with.
    fn try_add(
        &mut self,
        uid: &str,
        w: &WorkloadInfo,
        info: &PodInfo,
        netns: NetnsFd,
    ) -> Result<(), (String, Option<NetnsFd>)> {
        let identity = Identity::new(&self.opts.trust_domain, &w.namespace, &w.service_account);
        let tls = match self.certs.material(&identity) {
            Ok(tls) => tls,
            Err(e) => return Err((format!("certificate for {identity}: {e}"), Some(netns))),
        };
        let started = Instant::now();
        let listeners = match bind_in_netns(netns.fd.as_fd(), &self.opts, self.senders.len()) {
            Ok(l) => l,
            Err(e) => return Err((e, Some(netns))),
        };
        // Kept to try again with if a shard refuses: the pod below owns the namespace.
        let again = netns
            .fd
            .try_clone()
            .ok()
            .map(|fd| NetnsFd { fd, id: netns.id });
        let pod = Arc::new(Pod {
            uid: uid.to_owned(),
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            service_account: w.service_account.clone(),
            identity: tls.identity.clone(),
            tls,
            netns_name: netns.id.to_string(),
            netns: netns.fd,
            on_gone: Default::default(),
        });
        let (reply_tx, reply_rx) = crossbeam_channel::bounded(self.senders.len());
        let mut asked = 0;
        for (tx, socks) in self.senders.iter().zip(listeners) {
            let msg = ShardMsg::AddPod {
                pod: pod.clone(),
                listeners: socks,
                reply: reply_tx.clone(),
            };
            if tx.send(msg).is_ok() {
                asked += 1;
            }
        }
        let mut failure = (asked < self.senders.len()).then(|| "a shard has stopped".to_owned());
        for _ in 0..asked {
            match reply_rx.recv_timeout(SHARD_REPLY) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = Some(e),
                Err(_) => failure = Some("a shard did not take the pod's listeners".into()),
            }
        }
        if let Some(e) = failure {
            self.del_on_shards(uid, Duration::ZERO);
            return Err((e, again));
        }
        // The pod's proxy ends when the last shard lets go of it: its connections are over.
        let manager = self.manager.clone();
        let gone_uid = uid.to_owned();
        if let Ok(mut slot) = pod.on_gone.lock() {
            *slot = Some(Box::new(move || manager.down(&gone_uid)));
        }
        // DNS hook: the pod's DNS listeners (ztunnel's 15053 in the pod) when DNS capture is on.
        if let Some(dns) = self.state.dns() {
            if let Err(e) = dns.add_pod(uid, &w.namespace, &w.name, pod.clone()) {
                self.del_on_shards(uid, Duration::ZERO);
                return Err((e.to_string(), again));
            }
        }
        // A renewal sent to the shards before they had the pod missed it: hand it over now.
        if let Ok(now) = self.certs.material(&identity) {
            if !Arc::ptr_eq(&now, &pod.tls) {
                for tx in &self.senders {
                    let _ = tx.send(ShardMsg::Certificate {
                        identity: identity.clone(),
                        tls: now.clone(),
                    });
                }
            }
        }
        tracing::info!(
            uid,
            workload = %format_args!("{}/{}", pod.namespace, pod.name),
            identity = %pod.identity,
            netns = %pod.netns_name,
            shards = self.senders.len(),
            took = ?started.elapsed(),
            "pod served: listeners in its network namespace"
        );
        self.manager.up(uid, info);
        self.served.insert(uid.to_owned(), pod);
        Ok(())
    }

    /// Tries the pending pods again once [`RETRY`] has passed (ztunnel's `retry_pending`).
    fn retry_due(&mut self) {
        if self.next_retry.is_none_or(|at| Instant::now() < at) {
            return;
        }
        self.next_retry = None;
        let uids: Vec<String> = self.pending.keys().cloned().collect();
        for uid in uids {
            let Some((w, netns)) = self.pending.remove(&uid) else {
                continue;
            };
            tracing::info!(uid, "retrying a pending pod");
            match self.add(&uid, w, netns) {
                Ok(()) => {
                    if self.agent_synced && self.state.is_ready() && self.pending.is_empty() {
                        tracing::info!(uid, "pending pod served: ringtun ready");
                    }
                }
                Err(e) => tracing::info!(uid, error = %e, "retrying a pending pod failed"),
            }
        }
    }

    /// The manager's gauges: pods served, pods pending.
    fn counts(&self) {
        self.manager
            .set_counts(self.served.len(), self.pending.len());
    }

    /// Stops serving a pod: its listeners close on every shard, its connections drain.
    fn remove(&mut self, uid: &str) {
        if self.pending.remove(uid).is_some() {
            tracing::info!(uid, "pending pod removed");
            self.manager.forget_pending(uid);
        }
        if let Some(pod) = self.served.remove(uid) {
            tracing::info!(uid, netns = %pod.netns_name, "pod removed: listeners closed, connections draining");
            if !self.served.values().any(|p| p.identity == pod.identity) {
                self.certs.forget(&pod.identity);
            }
        }
        self.counts();
        if let Some(dns) = self.state.dns() {
            dns.remove_pod(uid);
        }
        self.del_on_shards(uid, self.opts.drain_timeout);
    }

    fn del_on_shards(&self, uid: &str, deadline: Duration) {
        for tx in &self.senders {
            let _ = tx.send(ShardMsg::DelPod {
                uid: uid.to_owned(),
                deadline,
            });
        }
    }
}

/// Sleeps `d`, waking early when `stop` is set.
fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        thread::sleep(left.min(POLL));
    }
}

/// One shard's copies of a pod's listeners.
type ShardListeners = Vec<(ListenerKind, std::net::TcpListener)>;

/// Binds the pod listeners (15001, 15006, 15008 or what `--*-listen` says), once per shard,
/// inside the network namespace `netns`: on a thread of its own that enters it and ends there,
/// so no thread of the proxy ever has to come back from a pod's namespace.
fn bind_in_netns(
    netns: BorrowedFd<'_>,
    opts: &RunOptions,
    shards: usize,
) -> Result<Vec<ShardListeners>, String> {
    let fd = netns.as_raw_fd();
    thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: the caller's fd outlives this scoped thread.
            let ns = unsafe { BorrowedFd::borrow_raw(fd) };
            net::setns_net(ns).map_err(|e| format!("entering the pod's network namespace: {e}"))?;
            bind_all(opts, shards)
        })
        .join()
        .unwrap_or_else(|_| Err("the listener thread panicked".into()))
    })
}

/// Binds every listener once per shard in this thread's namespace.
fn bind_all(opts: &RunOptions, shards: usize) -> Result<Vec<ShardListeners>, String> {
    let mut out: Vec<ShardListeners> = (0..shards).map(|_| Vec::new()).collect();
    let kinds = [
        (ListenerKind::Outbound, &opts.outbound),
        (ListenerKind::Inbound, &opts.inbound),
        (ListenerKind::InboundPlaintext, &opts.inbound_plaintext),
    ];
    for (kind, addrs) in kinds {
        for &addr in addrs.iter() {
            let mut port_addr = addr;
            for socks in out.iter_mut() {
                let socket = bind_one(port_addr)
                    .map_err(|e| format!("{kind} listener on {addr} in the pod: {e}"))?;
                if let Err(e) = net::set_keepalive(socket.as_raw_fd(), opts.tcp_keepalive) {
                    tracing::warn!(%addr, error = %e, "could not set TCP keepalive on a pod listener");
                }
                if port_addr.port() == 0 {
                    port_addr = socket.local_addr().map_err(|e| e.to_string())?;
                }
                socks.push((kind, socket));
            }
        }
    }
    Ok(out)
}

/// Binds one listener; a pod without IPv6 gets the IPv4 wildcard instead of the dual-stack one.
fn bind_one(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    match net::reuseport_listener(addr) {
        Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            net::reuseport_listener(v4).map_err(|_| e)
        }
        r => r,
    }
}
