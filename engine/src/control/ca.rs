//! Certificates from istiod's CA, per identity, on a thread of their own (its own small tokio
//! runtime, never a shard): fetched on first use, cached, renewed at half their life (ztunnel's
//! rule), retried with backoff on failure while the held one stays valid. A renewal, or a new
//! trust bundle, reaches every shard as `ShardMsg::Certificate`.
//!
//! The book (what is held, who waits) is behind a mutex shared by this thread and the callers
//! of [`CaSource::material`] (the control thread at start, the ZDS thread per pod): control
//! traffic, never on a connection's path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crossbeam_channel::Sender;
use ringtun_hbone::verify::CipherPreference;
use ringtun_hbone::Identity;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;

use crate::shard::{ShardMsg, ShardTx};
use crate::tls::{CertReport, CertState, CertStatus, TlsMaterial};
use crate::xds::ca::{CaBackoff, CaClient, CaOptions, IssuedCertificate};
use crate::xds::XdsError;

/// What a caller waiting for a certificate gets: the TLS settings, or why there are none.
pub(super) type Outcome = Result<Arc<TlsMaterial>, String>;

/// The CA client on its thread, and the certificates it holds.
pub(super) struct CaSource {
    shared: Arc<Shared>,
    /// Identities to keep, each with its entry's epoch.
    wants: mpsc::UnboundedSender<(Identity, u64)>,
}

struct Shared {
    client: CaClient,
    trust_domain: String,
    cipher: CipherPreference,
    ktls: Option<tls_kernel_offload::Capability>,
    book: Mutex<Book>,
    fetches: AtomicU64,
    failures: AtomicU64,
}

#[derive(Default)]
struct Book {
    entries: HashMap<Identity, Entry>,
    /// The trust bundle of the CA's last answer.
    roots: Vec<CertificateDer<'static>>,
    /// Where renewals go; empty until the shards run.
    shards: Vec<ShardTx>,
    /// The last entry epoch given out.
    epochs: u64,
}

#[derive(Default)]
struct Entry {
    /// Which keeping task owns the entry: a forgotten identity asked for again gets a new
    /// entry and a new task, and the old task ends.
    epoch: u64,
    held: Option<Held>,
    /// Why the last fetch failed, until one succeeds.
    error: Option<String>,
    /// Callers waiting for the next outcome.
    waiters: Vec<Sender<Outcome>>,
    /// Asked for by a caller (the proxy itself, a pod) that has not let it go.
    used: bool,
    /// Prefetched for a workload of this node (see [`CaSource::prefetch`]), still there.
    local: bool,
}

struct Held {
    chain: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivatePkcs8KeyDer<'static>,
    not_after: SystemTime,
    material: Arc<TlsMaterial>,
}

impl Held {
    fn valid(&self) -> bool {
        self.not_after > SystemTime::now()
    }
}

impl CaSource {
    /// Starts the CA thread.
    pub(super) fn spawn(
        opts: &CaOptions,
        trust_domain: &str,
        cipher: CipherPreference,
        ktls: Option<tls_kernel_offload::Capability>,
    ) -> Result<CaSource, XdsError> {
        let shared = Arc::new(Shared {
            client: CaClient::from_options(opts),
            trust_domain: trust_domain.to_owned(),
            cipher,
            ktls,
            book: Mutex::new(Book::default()),
            fetches: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        });
        let (wants, mut rx) = mpsc::unbounded_channel::<(Identity, u64)>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(XdsError::Thread)?;
        let s = shared.clone();
        std::thread::Builder::new()
            .name("ringtun-ca".into())
            .spawn(move || {
                runtime.block_on(async move {
                    // One task per identity until it is forgotten; they end with this runtime
                    // when the source is dropped (its sender with it).
                    while let Some((id, epoch)) = rx.recv().await {
                        tokio::spawn(keep(s.clone(), id, epoch));
                    }
                })
            })
            .map_err(XdsError::Thread)?;
        tracing::info!(address = %shared.client.address(), ttl = ?opts.ttl, identity = %opts.identity, "certificates come from the control plane's CA");
        Ok(CaSource { shared, wants })
    }

    /// Renewals go to these shards from now on; what is held now is sent at once, so a renewal
    /// made before they ran is not missed.
    pub(super) fn attach(&self, shards: Vec<ShardTx>) {
        let Ok(mut book) = self.shared.book.lock() else {
            return;
        };
        for (id, e) in &book.entries {
            if let Some(h) = &e.held {
                send(&shards, id, &h.material);
            }
        }
        book.shards = shards;
    }

    /// `id`'s entry, made and its keeping task started if there was none.
    fn entry<'b>(&self, book: &'b mut Book, id: &Identity) -> Result<&'b mut Entry, String> {
        let fresh = (!book.entries.contains_key(id)).then(|| {
            book.epochs += 1;
            book.epochs
        });
        let entry = book.entries.entry(id.clone()).or_default();
        if let Some(epoch) = fresh {
            entry.epoch = epoch;
            if self.wants.send((id.clone(), epoch)).is_err() {
                return Err("the CA thread has stopped".into());
            }
        }
        Ok(entry)
    }

    /// The TLS settings of `id`: the held certificate when valid, else the outcome of the
    /// fetch this asks for (or joins), within `wait`.
    pub(super) fn material(&self, id: &Identity, wait: Duration) -> Outcome {
        let rx = {
            let mut book = self.shared.book.lock().map_err(|_| "CA book poisoned")?;
            let entry = self.entry(&mut book, id)?;
            entry.used = true;
            if let Some(h) = entry.held.as_ref().filter(|h| h.valid()) {
                return Ok(h.material.clone());
            }
            let (tx, rx) = crossbeam_channel::bounded(1);
            entry.waiters.push(tx);
            rx
        };
        rx.recv_timeout(wait).map_err(|_| {
            format!("no answer from the control plane's CA for {id} within {wait:?}")
        })?
    }

    /// Fetches `id`'s certificate ahead of its first use, without waiting (ztunnel's
    /// `prefetch_cert`, for a workload of this node pushed before its pod arrives): the pod's
    /// add then finds it held, or joins the fetch under way. Kept and renewed like any other
    /// until [`CaSource::release`] and no caller uses it.
    pub(super) fn prefetch(&self, id: &Identity) {
        let Ok(mut book) = self.shared.book.lock() else {
            return;
        };
        match self.entry(&mut book, id) {
            Ok(entry) => {
                if !entry.local && entry.held.is_none() {
                    tracing::debug!(identity = %id, "certificate prefetched for a workload of this node");
                }
                entry.local = true;
            }
            Err(e) => tracing::warn!(identity = %id, error = %e, "certificate prefetch failed"),
        }
    }

    /// No workload of this node has `id` any more: it is forgotten unless a caller still
    /// uses it.
    pub(super) fn release(&self, id: &Identity) {
        if let Ok(mut book) = self.shared.book.lock() {
            if let Some(e) = book.entries.get_mut(id) {
                e.local = false;
                if !e.used {
                    book.entries.remove(id);
                    tracing::debug!(identity = %id, "prefetched certificate forgotten");
                }
            }
        }
    }

    /// Stops keeping `id`'s certificate (no pod here has it any more, as ztunnel forgets
    /// it), unless a workload of this node still has it (prefetched); asked for again, it is
    /// fetched anew.
    pub(super) fn forget(&self, id: &Identity) {
        if let Ok(mut book) = self.shared.book.lock() {
            if let Some(e) = book.entries.get_mut(id) {
                e.used = false;
                if !e.local {
                    book.entries.remove(id);
                    tracing::debug!(identity = %id, "certificate forgotten");
                }
            }
        }
    }

    /// Every identity's certificate and the fetch counters.
    pub(super) fn report(&self) -> CertReport {
        let certificates = match self.shared.book.lock() {
            Ok(book) => {
                let mut v: Vec<CertStatus> =
                    book.entries.iter().map(|(id, e)| status(id, e)).collect();
                v.sort_by_key(|c| c.identity.to_string());
                v
            }
            Err(_) => Vec::new(),
        };
        CertReport {
            certificates,
            fetches: self.shared.fetches.load(Ordering::Relaxed),
            failures: self.shared.failures.load(Ordering::Relaxed),
        }
    }
}

fn status(id: &Identity, e: &Entry) -> CertStatus {
    match e.held.as_ref().filter(|h| h.valid()) {
        Some(h) => CertStatus {
            error: e.error.clone(),
            ..h.material.status()
        },
        None => CertStatus {
            identity: id.clone(),
            state: if e.error.is_some() {
                CertState::Failed
            } else {
                CertState::Pending
            },
            chain: Vec::new(),
            roots: Vec::new(),
            error: e.error.clone(),
        },
    }
}

/// Whether `book` keeps `id` for the task of `epoch`.
fn owned(book: &Book, id: &Identity, epoch: u64) -> bool {
    book.entries.get(id).is_some_and(|e| e.epoch == epoch)
}

fn send(shards: &[ShardTx], id: &Identity, tls: &Arc<TlsMaterial>) {
    for tx in shards {
        let _ = tx.send(ShardMsg::Certificate {
            identity: id.clone(),
            tls: tls.clone(),
        });
    }
}

/// Keeps `id`'s certificate until it is forgotten (its entry gone, or another `epoch`'s):
/// fetch, install, sleep until half its life, again; a failure is retried with ztunnel's
/// backoff, sooner if the held one expires first.
async fn keep(shared: Arc<Shared>, id: Identity, epoch: u64) {
    let mut backoff = CaBackoff::default();
    while shared.owns(&id, epoch) {
        shared.fetches.fetch_add(1, Ordering::Relaxed);
        let outcome = match shared.client.fetch(&id).await {
            Ok(issued) => {
                let refresh = issued.refresh_at();
                shared.install(&id, epoch, issued).map(|()| refresh)
            }
            Err(e) => Err(e.to_string()),
        };
        let wait = match outcome {
            Ok(refresh) => {
                backoff.reset();
                // A certificate already past half its life (a skewed clock) is not a reason to
                // ask again in a tight loop.
                refresh
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .max(Duration::from_millis(500))
            }
            Err(e) => {
                shared.failures.fetch_add(1, Ordering::Relaxed);
                shared.failed(&id, epoch, e, backoff.next_delay())
            }
        };
        tokio::time::sleep(wait).await;
    }
}

impl Shared {
    /// Whether `id` is still kept by the task of `epoch`.
    fn owns(&self, id: &Identity, epoch: u64) -> bool {
        self.book.lock().is_ok_and(|b| owned(&b, id, epoch))
    }

    /// Makes `issued` what `id` presents, on every shard; a new trust bundle rebuilds every
    /// identity's settings with it, so peers are checked against the CA's current roots.
    fn install(&self, id: &Identity, epoch: u64, issued: IssuedCertificate) -> Result<(), String> {
        let IssuedCertificate {
            chain,
            roots,
            key,
            not_after,
            ..
        } = issued;
        let mut book = self.book.lock().map_err(|_| "CA book poisoned")?;
        if !owned(&book, id, epoch) {
            // Forgotten while the CA answered.
            return Ok(());
        }
        let material = Arc::new(
            self.build(&chain, &key, &roots)
                .map_err(|e| format!("certificate for {id}: {e}"))?,
        );
        if book.roots != roots {
            if !book.roots.is_empty() {
                tracing::info!(
                    roots = roots.len(),
                    "the CA's trust bundle changed: peers are checked against the new roots"
                );
                let Book {
                    entries, shards, ..
                } = &mut *book;
                for (other, e) in entries.iter_mut().filter(|(o, _)| *o != id) {
                    let Some(h) = e.held.as_mut() else { continue };
                    match self.build(&h.chain, &h.key, &roots) {
                        Ok(m) => {
                            h.material = Arc::new(m);
                            send(shards, other, &h.material);
                        }
                        Err(e) => {
                            tracing::warn!(identity = %other, error = %e, "certificate kept with the previous roots")
                        }
                    }
                }
            }
            book.roots = roots;
        }
        send(&book.shards, id, &material);
        let Some(entry) = book.entries.get_mut(id) else {
            return Ok(());
        };
        let renewed = entry.held.is_some();
        entry.held = Some(Held {
            chain,
            key,
            not_after,
            material: material.clone(),
        });
        entry.error = None;
        for w in entry.waiters.drain(..) {
            let _ = w.send(Ok(material.clone()));
        }
        if renewed {
            tracing::info!(identity = %id, expires = ?not_after, "certificate renewed; new connections present it");
        }
        Ok(())
    }

    fn build(
        &self,
        chain: &[CertificateDer<'static>],
        key: &rustls::pki_types::PrivatePkcs8KeyDer<'static>,
        roots: &[CertificateDer<'static>],
    ) -> Result<TlsMaterial, crate::tls::TlsSetupError> {
        TlsMaterial::from_issued(
            chain.to_vec(),
            PrivateKeyDer::Pkcs8(key.clone_key()),
            roots,
            &self.trust_domain,
            self.cipher,
            self.ktls.clone(),
        )
    }

    /// Records a failed fetch of `id`; returns how long to wait before the next attempt:
    /// `delay`, or less if the held certificate expires before.
    fn failed(&self, id: &Identity, epoch: u64, error: String, delay: Duration) -> Duration {
        let Ok(mut book) = self.book.lock() else {
            return delay;
        };
        let Some(entry) = book.entries.get_mut(id).filter(|e| e.epoch == epoch) else {
            return delay;
        };
        for w in entry.waiters.drain(..) {
            let _ = w.send(Err(error.clone()));
        }
        entry.error = Some(error.clone());
        match entry.held.as_ref().filter(|h| h.valid()) {
            Some(h) => {
                let left = h
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tracing::warn!(identity = %id, %error, retry_in = ?delay.min(left), expires = ?h.not_after, "certificate renewal failed; the valid certificate stays in use");
                delay.min(left)
            }
            None => {
                tracing::warn!(identity = %id, %error, retry_in = ?delay, "certificate fetch failed");
                delay
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::{Endpoint, RootCert, Token};
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    use rustls::pki_types::PrivatePkcs8KeyDer;

    fn ca() -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        (p.self_signed(&key).expect("ca"), key)
    }

    fn issued(id: &Identity, ca: &(rcgen::Certificate, KeyPair)) -> IssuedCertificate {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().expect("uri"))];
        let leaf = p.signed_by(&key, &ca.0, &ca.1).expect("leaf");
        IssuedCertificate {
            identity: id.clone(),
            chain: vec![leaf.der().clone()],
            roots: vec![ca.0.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            not_before: SystemTime::now(),
            not_after: SystemTime::now() + Duration::from_secs(60),
        }
    }

    fn shared() -> Shared {
        let endpoint = Endpoint {
            url: "https://istiod:15012".into(),
            root: RootCert::Pem(String::new()),
            alt_hostname: None,
            token: Token::None,
            cluster_id: "Kubernetes".into(),
            mark: 0,
        };
        Shared {
            client: CaClient::new(endpoint, Duration::from_secs(60), false),
            trust_domain: "cluster.local".into(),
            cipher: CipherPreference::Aes128,
            ktls: None,
            book: Mutex::new(Book::default()),
            fetches: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// The identities of the certificates the shard was sent, in order.
    fn sent(rx: &crate::shard::ShardRx) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        rx.queue.drain(|m| {
            if let ShardMsg::Certificate { identity, tls } = m {
                out.push((identity.to_string(), tls.roots_info.len()));
            }
        });
        out
    }

    #[test]
    fn renewals_and_a_new_trust_bundle_reach_the_shards() {
        let s = shared();
        let (tx, rx) = crate::shard::inbox::channel().expect("channel");
        s.book.lock().expect("book").shards = vec![tx];
        let a = Identity::new("cluster.local", "default", "a");
        let b = Identity::new("cluster.local", "default", "b");
        let (old, new) = (ca(), ca());
        for id in [&a, &b] {
            s.book
                .lock()
                .expect("book")
                .entries
                .insert(id.clone(), Entry::default());
        }
        s.install(&a, 0, issued(&a, &old)).expect("a");
        s.install(&b, 0, issued(&b, &old)).expect("b");
        assert_eq!(sent(&rx), vec![(a.to_string(), 1), (b.to_string(), 1)]);

        // A renewal of `a` under a new root: `b` is rebuilt to trust it too.
        s.install(&a, 0, issued(&a, &new)).expect("a renewed");
        let msgs = sent(&rx);
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(msgs.contains(&(b.to_string(), 1)) && msgs.contains(&(a.to_string(), 1)));
        let book = s.book.lock().expect("book");
        assert_eq!(book.roots, vec![new.0.der().clone()]);
        let b_roots = &book.entries[&b]
            .held
            .as_ref()
            .expect("b held")
            .material
            .roots_info;
        assert_eq!(
            b_roots,
            &vec![crate::tls::CertDetail::of(new.0.der()).expect("root")],
            "b now trusts the new root"
        );
        drop(book);

        // A failed renewal keeps the valid certificate and retries before it expires.
        let wait = s.failed(&a, 0, "unavailable".into(), Duration::from_secs(600));
        assert!(wait <= Duration::from_secs(60), "{wait:?}");
        let report: Vec<CertStatus> = {
            let book = s.book.lock().expect("book");
            book.entries.iter().map(|(id, e)| status(id, e)).collect()
        };
        let a_status = report.iter().find(|c| c.identity == a).expect("a");
        assert_eq!(a_status.state, CertState::Available);
        assert_eq!(a_status.error.as_deref(), Some("unavailable"));
        let c = Identity::new("cluster.local", "default", "c");
        s.book
            .lock()
            .expect("book")
            .entries
            .insert(c.clone(), Entry::default());
        s.failed(&c, 0, "refused".into(), Duration::from_secs(1));
        {
            let book = s.book.lock().expect("book");
            assert_eq!(status(&c, &book.entries[&c]).state, CertState::Failed);
        }

        // Forgotten (its pod gone): its task stops, a late answer is dropped.
        s.book.lock().expect("book").entries.remove(&c);
        assert!(!s.owns(&c, 0));
        s.install(&c, 0, issued(&c, &new)).expect("dropped");
        assert!(!s.book.lock().expect("book").entries.contains_key(&c));
        assert!(s.owns(&a, 0) && !s.owns(&a, 1), "another epoch's task ends");
    }
}
