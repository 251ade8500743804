//! In-pod mode on a shard: the pods whose listeners it accepts on, each with what its
//! connections need (the pod's workload as a [`Scope`], its identity and TLS settings, its
//! network namespace), and their removal: listeners shut, connections drained, then cut.
//!
//! The control thread makes a pod's listeners inside the pod's namespace and sends every shard
//! its own SO_REUSEPORT copies with the [`Pod`]; a connection accepted on them carries its
//! shard's [`PodShard`] for its whole life.

use std::cell::{Cell, RefCell};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;

use ringtun_hbone::Identity;

use super::drain::DrainSignal;
use super::live;
use super::tls::TlsSlot;
use crate::decide::Scope;
use crate::tls::TlsMaterial;

/// A pod handed over by the node agent, as every shard shares it (read-only).
pub struct Pod {
    /// Kubernetes pod uid, as the agent names it.
    pub uid: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod name (the workload's name in the config).
    pub name: String,
    /// Its service account: with namespace and name, what finds its workload in the config.
    pub service_account: String,
    /// Its SPIFFE identity.
    pub identity: Identity,
    /// Its certificate and the TLS settings made of it.
    pub tls: Arc<TlsMaterial>,
    /// The pod's network namespace: its upstream sockets are created in it.
    pub netns: OwnedFd,
    /// `net:[inode]` of that namespace, for the log.
    pub netns_name: String,
    /// Called once the pod is gone from every shard: removed, its listeners closed and its
    /// last connection ended (what ends its proxy in ztunnel's workload manager).
    pub on_gone: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        let gone = self.on_gone.get_mut().ok().and_then(Option::take);
        if let Some(f) = gone {
            f();
        }
    }
}

/// The pod's network namespace: the DNS proxy forwards the pod's queries from it.
impl std::os::fd::AsFd for Pod {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.netns.as_fd()
    }
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("uid", &self.uid)
            .field(
                "workload",
                &format_args!("{}/{}", self.namespace, self.name),
            )
            .field("identity", &format_args!("{}", self.identity))
            .field("netns", &self.netns_name)
            .finish()
    }
}

/// One pod as one shard serves it.
pub struct PodShard {
    /// The pod.
    pub pod: Arc<Pod>,
    /// The pod's workload: decisions for its connections are a dedicated proxy's for it.
    pub scope: Scope,
    /// The pod's identity, shared by its connections' access records.
    pub identity: Rc<Identity>,
    /// The TLS settings of the pod's handshakes (its 15008, its outbound HBONE), replaced
    /// when its certificate is renewed.
    pub tls: TlsSlot,
    /// Fired when the pod is removed (or the shard drains).
    drain: DrainSignal,
    listener_fds: RefCell<Vec<RawFd>>,
    /// The pod's connections that carry bytes, to cut what is left at the deadline.
    conns: RefCell<Vec<live::Cutter>>,
    /// The deadline passed: a connection that was still opening then is cut as it starts.
    cut: Cell<bool>,
}

impl std::fmt::Debug for PodShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.pod.fmt(f)
    }
}

impl PodShard {
    /// The pod as served next to `base` (the shard's scope: trust domain, own ports).
    pub fn new(pod: Arc<Pod>, base: &Scope) -> Self {
        let scope = Scope {
            workload: Some((pod.namespace.clone(), pod.name.clone())),
            service_account: Some(pod.service_account.clone()),
            node: base.node.clone().filter(|n| !n.is_empty()),
            identity: pod.identity.clone(),
            trust_domain: base.trust_domain.clone(),
            own_ports: base.own_ports.clone(),
        };
        PodShard {
            identity: Rc::new(pod.identity.clone()),
            tls: TlsSlot::new(pod.tls.clone()),
            scope,
            pod,
            drain: DrainSignal::default(),
            listener_fds: RefCell::new(Vec::new()),
            conns: RefCell::new(Vec::new()),
            cut: Cell::new(false),
        }
    }

    /// The pod's network namespace.
    pub fn netns(&self) -> BorrowedFd<'_> {
        self.pod.netns.as_fd()
    }

    /// Fired when the pod's listeners close: inbound connections send GOAWAY.
    pub fn drain(&self) -> &DrainSignal {
        &self.drain
    }

    /// Keeps a listening socket's fd, to shut it when the pod goes.
    pub fn add_listener(&self, fd: RawFd) {
        self.listener_fds.borrow_mut().push(fd);
    }

    /// Keeps a handle on one of the pod's connections, to cut it at the removal deadline.
    pub fn track(&self, conn: &live::Conn) {
        let mut conns = self.conns.borrow_mut();
        // Pruned as it grows, so a long-lived pod keeps only its live connections' handles.
        if conns.len() >= 64 && conns.len().is_power_of_two() {
            conns.retain(live::Cutter::is_live);
        }
        let cutter = conn.cutter();
        if self.cut.get() {
            cutter.cut();
            return;
        }
        conns.push(cutter);
    }

    /// Stops accepting and tells the pod's connections to finish: its listeners are shut
    /// (the kernel refuses new connections once every shard's copy is), inbound HBONE
    /// connections get GOAWAY.
    pub fn stop(&self) {
        for fd in self.listener_fds.borrow_mut().drain(..) {
            // SAFETY: the fd belongs to a listener this shard owns and has not closed (its
            // accept loop closes it after the shutdown wakes it).
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        self.drain.fire();
    }

    /// Cuts whatever of the pod's connections still runs; returns how many were.
    pub fn cut(&self) -> usize {
        self.cut.set(true);
        let conns = std::mem::take(&mut *self.conns.borrow_mut());
        conns.iter().filter(|c| c.cut()).count()
    }

    /// How many of the pod's connections still run.
    pub fn live(&self) -> usize {
        self.conns.borrow().iter().filter(|c| c.is_live()).count()
    }
}
