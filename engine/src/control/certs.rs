//! Where the proxy's certificates come from, so that start-up (the proxy's own identity) and
//! in-pod mode (each pod's identity) ask one place: mounted files (`--cert-chain`, `--key`,
//! `--roots`), with in-pod mode's local signer (`--ca-cert`, `--ca-key`) beside them, or
//! istiod's CA (`CA_ADDRESS`: `ca.rs`, which also renews and tells the shards).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringtun_hbone::Identity;

use super::ca::CaSource;
use super::process;
use super::source::Update;
use crate::config::{Change, EntryKey, Protocol, Workload};
use crate::options::RunOptions;
use crate::shard::ShardTx;
use crate::tls::{CertReport, Signer, TlsMaterial};
use crate::EngineError;

/// How long a pod's add waits for its certificate from the CA.
const POD_WAIT: Duration = Duration::from_secs(10);

/// The source of every identity's TLS settings.
pub(super) enum Certificates {
    /// Mounted files: the proxy's own, and the in-pod signer's per pod when given.
    Files {
        /// The mounted certificate's settings.
        own: Arc<TlsMaterial>,
        /// In-pod mode's local CA.
        signer: Option<Box<Mutex<Signer>>>,
    },
    /// istiod's CA.
    Ca {
        /// The CA thread and its book.
        source: CaSource,
        /// The proxy's own identity.
        own: Identity,
        /// Shared mode with `NODE_NAME`: this node's workloads, whose certificates are
        /// fetched before their pods arrive.
        local: Option<Box<Mutex<LocalWorkloads>>>,
    },
}

/// The workloads of this node that ztunnel prefetches a certificate for (its
/// `should_prefetch_certificate`: shared mode, the workload's `node` is `NODE_NAME`, HBONE or
/// a native tunnel), by config entry, and how many have each identity.
pub(super) struct LocalWorkloads {
    node: String,
    trust_domain: String,
    by_entry: HashMap<EntryKey, Identity>,
    count: HashMap<Identity, usize>,
}

/// What a config change means for the prefetched certificates.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Wanted {
    /// Identities a workload of this node has now and none had before.
    pub fetch: Vec<Identity>,
    /// Identities no workload of this node has any more.
    pub release: Vec<Identity>,
}

impl LocalWorkloads {
    /// None yet, for `node`; identities in `trust_domain` unless a workload names its own.
    pub(super) fn new(node: &str, trust_domain: &str) -> Self {
        LocalWorkloads {
            node: node.to_owned(),
            trust_domain: trust_domain.to_owned(),
            by_entry: HashMap::new(),
            count: HashMap::new(),
        }
    }

    fn identity(&self, w: &Workload) -> Option<Identity> {
        let served = w.node == self.node && (w.protocol == Protocol::Hbone || w.native_tunnel);
        served.then(|| {
            let td = w.trust_domain.as_deref().filter(|t| !t.is_empty());
            Identity::new(
                td.unwrap_or(&self.trust_domain),
                &w.namespace,
                &w.service_account,
            )
        })
    }

    /// Takes a config change in: every workload put or removed, or (`whole`) the whole list
    /// that replaces what was known.
    pub(super) fn apply(&mut self, update: &Update) -> Wanted {
        let before: Vec<Identity> = self.count.keys().cloned().collect();
        match update {
            Update::Full(config) => {
                self.by_entry.clear();
                self.count.clear();
                for (i, w) in config.workloads.iter().enumerate() {
                    self.put(EntryKey::Position(i), Some(w));
                }
            }
            Update::Delta(delta) => {
                for (key, w) in &delta.workloads as &Vec<Change<Workload>> {
                    self.put(key.clone(), w.as_deref());
                }
            }
        }
        let mut fetch: Vec<Identity> = self
            .count
            .keys()
            .filter(|id| !before.contains(id))
            .cloned()
            .collect();
        let mut release: Vec<Identity> = before
            .into_iter()
            .filter(|id| !self.count.contains_key(id))
            .collect();
        fetch.sort_by_key(|i| i.to_string());
        release.sort_by_key(|i| i.to_string());
        Wanted { fetch, release }
    }

    fn put(&mut self, key: EntryKey, w: Option<&Workload>) {
        let old = match w.and_then(|w| self.identity(w)) {
            Some(id) => {
                *self.count.entry(id.clone()).or_default() += 1;
                self.by_entry.insert(key, id)
            }
            None => self.by_entry.remove(&key),
        };
        if let Some(old) = old {
            if let Some(n) = self.count.get_mut(&old) {
                *n -= 1;
                if *n == 0 {
                    self.count.remove(&old);
                }
            }
        }
    }
}

impl Certificates {
    /// Opens the source `opts` names; the files are read (and checked) now.
    pub(super) fn open(
        opts: &RunOptions,
        ktls: Option<tls_kernel_offload::Capability>,
    ) -> Result<Certificates, EngineError> {
        let cipher = opts.tls_cipher.into();
        match (&opts.certs, &opts.ca) {
            (Some(paths), _) => {
                let own = TlsMaterial::load(paths, &opts.trust_domain, cipher)?
                    .with_kernel_offload(ktls.clone());
                let signer = match opts.inpod.as_ref().and_then(|i| i.signer.as_ref()) {
                    None => None,
                    Some(s) => Some(Box::new(Mutex::new(Signer::load(
                        &s.cert,
                        &s.key,
                        &paths.roots,
                        &opts.trust_domain,
                        cipher,
                        ktls,
                    )?))),
                };
                Ok(Certificates::Files {
                    own: Arc::new(own),
                    signer,
                })
            }
            (None, Some(ca)) => Ok(Certificates::Ca {
                source: CaSource::spawn(ca, &opts.trust_domain, cipher, ktls)
                    .map_err(EngineError::Xds)?,
                own: ca.identity.clone(),
                local: match (&opts.inpod, opts.node.as_deref()) {
                    (Some(_), Some(node)) if !node.is_empty() => Some(Box::new(Mutex::new(
                        LocalWorkloads::new(node, &opts.trust_domain),
                    ))),
                    _ => None,
                },
            }),
            (None, None) => Err(EngineError::Usage(
                "no certificate source: give certificate files or a CA".into(),
            )),
        }
    }

    /// The proxy's own TLS settings. From the CA this waits for the first certificate,
    /// retrying with backoff (logged), until it comes or SIGTERM/SIGINT arrives.
    pub(super) fn own(&self) -> Result<Arc<TlsMaterial>, EngineError> {
        match self {
            Certificates::Files { own, .. } => Ok(own.clone()),
            Certificates::Ca { source, own, .. } => {
                let started = Instant::now();
                loop {
                    match source.material(own, Duration::from_millis(200)) {
                        Ok(m) => {
                            tracing::info!(identity = %own, took = ?started.elapsed(), "certificate issued by the control plane's CA");
                            return Ok(m);
                        }
                        // Failures are logged by the CA thread, which retries with backoff.
                        Err(e) => {
                            if let Some(sig) = process::wait_signal(Duration::ZERO) {
                                return Err(EngineError::NoCertificate(format!(
                                    "{sig} before the control plane's CA issued {own}'s certificate (last: {e})"
                                )));
                            }
                        }
                    }
                }
            }
        }
    }

    /// The proxy's own identity.
    pub(super) fn own_identity(&self) -> Identity {
        match self {
            Certificates::Files { own, .. } => own.identity.clone(),
            Certificates::Ca { own, .. } => own.clone(),
        }
    }

    /// The TLS settings of `id` (in-pod mode: a pod's identity): the signer's or the CA's,
    /// else the mounted certificate (every pod presents it, as before signers existed).
    pub(super) fn material(&self, id: &Identity) -> Result<Arc<TlsMaterial>, String> {
        match self {
            Certificates::Files { own, signer: None } => Ok(own.clone()),
            Certificates::Files {
                signer: Some(s), ..
            } => s
                .lock()
                .map_err(|_| "signer poisoned".to_owned())?
                .material(id)
                .map_err(|e| e.to_string()),
            Certificates::Ca { source, .. } => source.material(id, POD_WAIT),
        }
    }

    /// `id` is no longer needed (its last pod left): the CA stops renewing it. The proxy's own
    /// is always kept; files and the local signer cost nothing to keep.
    pub(super) fn forget(&self, id: &Identity) {
        if let Certificates::Ca { source, own, .. } = self {
            if id != own {
                source.forget(id);
            }
        }
    }

    /// A config change is about to be applied: the certificates of this node's new workloads
    /// are fetched now, ahead of their pods (ztunnel's prefetch); those no workload of this
    /// node has any more are let go unless a pod still uses them.
    pub(super) fn track(&self, update: &Update) {
        let Certificates::Ca {
            source,
            own,
            local: Some(local),
        } = self
        else {
            return;
        };
        let Ok(wanted) = local.lock().map(|mut l| l.apply(update)) else {
            return;
        };
        for id in &wanted.fetch {
            source.prefetch(id);
        }
        for id in wanted.release.iter().filter(|id| *id != own) {
            source.release(id);
        }
    }

    /// Renewals (CA only) go to these shards from now on.
    pub(super) fn attach(&self, shards: Vec<ShardTx>) {
        if let Certificates::Ca { source, .. } = self {
            source.attach(shards);
        }
    }

    /// What is held, for `/config_dump` and `/metrics`.
    pub(super) fn report(&self) -> CertReport {
        match self {
            Certificates::Files { own, signer } => {
                let mut certificates = vec![own.status()];
                if let Some(s) = signer.as_ref().and_then(|s| s.lock().ok()) {
                    certificates.extend(s.statuses());
                }
                CertReport {
                    certificates,
                    ..CertReport::default()
                }
            }
            Certificates::Ca { source, .. } => source.report(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::{Delta, LocalConfig};

    fn workload(name: &str, sa: &str, node: &str, protocol: Protocol) -> Workload {
        let protocol = match protocol {
            Protocol::Hbone => "HBONE",
            Protocol::Tcp => "TCP",
        };
        let text = format!(
            "workloads:\n- {{uid: \"c//Pod/default/{name}\", name: {name}, namespace: default, serviceAccount: {sa}, node: {node}, protocol: {protocol}, workloadIps: [10.0.0.1], services: {{}}}}\n"
        );
        let mut config = crate::config::parse(std::path::Path::new("t.yaml"), &text)
            .expect("workload")
            .config;
        config.workloads.remove(0)
    }

    fn delta(changes: Vec<(&str, Option<Workload>)>) -> Update {
        Update::Delta(Delta {
            workloads: changes
                .into_iter()
                .map(|(k, w)| (EntryKey::from(k), w.map(Arc::new)))
                .collect(),
            ..Default::default()
        })
    }

    fn ids(v: &[Identity]) -> Vec<String> {
        v.iter().map(|i| i.to_string()).collect()
    }

    /// ztunnel's rule: HBONE workloads of this node only; an identity is fetched once however
    /// many local workloads have it, and let go when the last one leaves.
    #[test]
    fn this_nodes_hbone_workloads_are_prefetched_once_and_released_with_the_last() {
        let mut l = LocalWorkloads::new("node-a", "cluster.local");
        let a = "spiffe://cluster.local/ns/default/sa/a";
        let w = l.apply(&delta(vec![
            ("a1", Some(workload("a1", "a", "node-a", Protocol::Hbone))),
            ("a2", Some(workload("a2", "a", "node-a", Protocol::Hbone))),
            (
                "far",
                Some(workload("far", "far", "node-b", Protocol::Hbone)),
            ),
            ("tcp", Some(workload("tcp", "tcp", "node-a", Protocol::Tcp))),
        ]));
        assert_eq!(ids(&w.fetch), vec![a]);
        assert!(w.release.is_empty());
        // One of two leaves: still wanted. The other moves to another node: released.
        assert_eq!(l.apply(&delta(vec![("a1", None)])), Wanted::default());
        let w = l.apply(&delta(vec![(
            "a2",
            Some(workload("a2", "a", "node-b", Protocol::Hbone)),
        )]));
        assert_eq!(
            (ids(&w.fetch), ids(&w.release)),
            (vec![], vec![a.to_owned()])
        );
        // A whole config replaces what was known.
        let mut td = workload("t", "t", "node-a", Protocol::Tcp);
        td.native_tunnel = true;
        td.trust_domain = Some("other.td".into());
        let w = l.apply(&Update::Full(LocalConfig {
            workloads: vec![td],
            ..Default::default()
        }));
        assert_eq!(ids(&w.fetch), vec!["spiffe://other.td/ns/default/sa/t"]);
    }
}
