//! Where the proxy's certificates come from, so that start-up (the proxy's own identity) and
//! in-pod mode (each pod's identity) ask one place: mounted files (`--cert-chain`, `--key`,
//! `--roots`), with in-pod mode's local signer (`--ca-cert`, `--ca-key`) beside them, or
//! istiod's CA (`CA_ADDRESS`: `ca.rs`, which also renews and tells the shards).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringtun_hbone::Identity;

use super::ca::CaSource;
use super::process;
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
    },
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
            Certificates::Ca { source, own } => {
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
        if let Certificates::Ca { source, own } = self {
            if id != own {
                source.forget(id);
            }
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
