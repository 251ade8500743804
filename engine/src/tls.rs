//! Certificates and keys from PEM files, turned into the TLS settings every shard shares.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ringtun_hbone::{cert, verify, Identity};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

use crate::exposition::rfc3339;

/// What went wrong loading certificates, and where.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A PEM file could not be read or held nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        what: String,
    },
    /// The certificate has no usable SPIFFE identity.
    #[error("{path}: {source}")]
    Identity {
        /// The certificate chain file.
        path: PathBuf,
        /// Why the identity could not be read.
        source: ringtun_hbone::HboneError,
    },
    /// The certificate's identity is not in the trust domain ringtun was told to serve.
    #[error("{path}: certificate identity {identity} is not in trust domain {trust_domain:?}; pass --trust-domain {actual:?} or use a certificate from this mesh")]
    TrustDomain {
        /// The certificate chain file.
        path: PathBuf,
        /// Identity in the certificate.
        identity: Box<Identity>,
        /// Configured trust domain.
        trust_domain: String,
        /// Trust domain found in the certificate.
        actual: String,
    },
    /// rustls refused the material (key does not match the certificate, etc.).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Paths of the PEM files ringtun presents and trusts.
#[derive(Clone, Debug)]
pub struct CertPaths {
    /// Leaf certificate followed by its intermediates.
    pub chain: PathBuf,
    /// Private key of the leaf (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Mesh root certificates.
    pub roots: PathBuf,
}

/// TLS material shared read-only by all shards.
pub struct TlsMaterial {
    /// Our SPIFFE identity, from the leaf certificate.
    pub identity: Identity,
    /// Server side of HBONE (port 15008).
    pub server: Arc<rustls::ServerConfig>,
    /// Client side of HBONE (outbound).
    pub client: Arc<rustls::ClientConfig>,
    /// Unix time after which our certificate expires.
    pub not_after: i64,
    /// What the kernel can offload, when HBONE connections should try kTLS (`--ktls auto` on
    /// a capable kernel, or `on`); `None` keeps every connection on userspace rustls.
    pub ktls: Option<tls_kernel_offload::Capability>,
    /// The chain presented, for `/config_dump`.
    pub chain_info: Vec<CertDetail>,
    /// The roots peers are checked against, for `/config_dump` (empty where not known).
    pub roots_info: Vec<CertDetail>,
}

fn pem_err(path: &Path, what: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::Pem {
        path: path.to_owned(),
        what: what.to_string(),
    }
}

/// The roots in a PEM file, as rustls takes them and as `/config_dump` shows them.
fn root_store(path: &Path) -> Result<(Arc<RootCertStore>, Vec<CertDetail>), TlsSetupError> {
    let mut store = RootCertStore::empty();
    let mut info = Vec::new();
    for root in read_certs(path)? {
        info.extend(CertDetail::of(&root));
        store
            .add(root)
            .map_err(|e| pem_err(path, format!("not a usable root: {e}")))?;
    }
    Ok((Arc::new(store), info))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

impl TlsMaterial {
    /// Loads the chain, key and roots and builds both TLS configurations.
    pub fn load(
        paths: &CertPaths,
        trust_domain: &str,
        cipher: verify::CipherPreference,
    ) -> Result<Self, TlsSetupError> {
        let chain = read_certs(&paths.chain)?;
        let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| pem_err(&paths.key, e))?;
        let (roots, roots_info) = root_store(&paths.roots)?;
        let mut m = Self::from_parts(chain, key, roots, trust_domain, cipher, &paths.chain)?;
        m.roots_info = roots_info;
        Ok(m)
    }

    /// The identity's certificate as `/config_dump` shows it.
    pub fn status(&self) -> CertStatus {
        CertStatus {
            identity: self.identity.clone(),
            state: CertState::Available,
            chain: self.chain_info.clone(),
            roots: self.roots_info.clone(),
            error: None,
        }
    }

    /// Builds both TLS configurations from a chain (leaf first), its key and the roots;
    /// `origin` names where the chain came from, for errors.
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Arc<RootCertStore>,
        trust_domain: &str,
        cipher: verify::CipherPreference,
        origin: &Path,
    ) -> Result<Self, TlsSetupError> {
        let Some(leaf) = chain.first() else {
            return Err(pem_err(origin, "empty certificate chain"));
        };
        let identity = cert::leaf_identity(leaf).map_err(|source| TlsSetupError::Identity {
            path: origin.to_owned(),
            source,
        })?;
        if identity.trust_domain != trust_domain {
            return Err(TlsSetupError::TrustDomain {
                path: origin.to_owned(),
                actual: identity.trust_domain.clone(),
                identity: Box::new(identity),
                trust_domain: trust_domain.to_owned(),
            });
        }
        let not_after = cert::not_after_unix(leaf).map_err(|source| TlsSetupError::Identity {
            path: origin.to_owned(),
            source,
        })?;
        let server = verify::server_config(
            chain.clone(),
            key.clone_key(),
            roots.clone(),
            trust_domain,
            cipher,
        )?;
        let chain_info = chain.iter().filter_map(|c| CertDetail::of(c)).collect();
        let client = verify::client_config(chain, key, roots, cipher)?;
        Ok(TlsMaterial {
            identity,
            server: Arc::new(server),
            client: Arc::new(client),
            not_after,
            ktls: None,
            chain_info,
            roots_info: Vec::new(),
        })
    }

    /// Records what the kTLS probe found. Either way rustls keeps the traffic secrets after
    /// the handshake and logs them: the kernel's record layer or ringtun's own userspace one
    /// (`--tls-records own`) takes the connection over with its keys, and following a peer's
    /// KeyUpdate needs the traffic secrets themselves (not only the keys rustls extracts),
    /// which rustls hands out only through a key log. A connection that stays on rustls'
    /// records forgets them.
    pub fn with_kernel_offload(mut self, cap: Option<tls_kernel_offload::Capability>) -> Self {
        let log = tls_kernel_offload::SecretLog::global();
        // Still the only owner here, so make_mut does not copy.
        let server = Arc::make_mut(&mut self.server);
        server.enable_secret_extraction = true;
        server.key_log = log.clone();
        let client = Arc::make_mut(&mut self.client);
        client.enable_secret_extraction = true;
        client.key_log = log;
        self.ktls = cap;
        self
    }
}

/// Where the certificates for `/config_dump` and the errors of material from the control plane's
/// CA say it came from.
pub const CA_ORIGIN: &str = "the control plane's CA";

impl TlsMaterial {
    /// The TLS settings of a certificate the control plane's CA issued: `chain` (leaf first)
    /// and its key, peers checked against `roots` (the CA's trust bundle), kTLS as `ktls`.
    pub fn from_issued(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: &[CertificateDer<'static>],
        trust_domain: &str,
        cipher: verify::CipherPreference,
        ktls: Option<tls_kernel_offload::Capability>,
    ) -> Result<Self, TlsSetupError> {
        let origin = Path::new(CA_ORIGIN);
        let mut store = RootCertStore::empty();
        for root in roots {
            store
                .add(root.clone())
                .map_err(|e| pem_err(origin, format!("not a usable root: {e}")))?;
        }
        let mut m = Self::from_parts(chain, key, Arc::new(store), trust_domain, cipher, origin)?
            .with_kernel_offload(ktls);
        m.roots_info = roots.iter().filter_map(|c| CertDetail::of(c)).collect();
        Ok(m)
    }
}

/// Where an identity's certificate stands (ztunnel's `/config_dump` states).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertState {
    /// Issued and in use.
    Available,
    /// Asked for, no answer yet.
    Pending,
    /// The last fetch failed and no valid certificate is held.
    Failed,
}

impl CertState {
    /// ztunnel's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CertState::Available => "Available",
            CertState::Pending => "Initializing",
            CertState::Failed => "Unavailable",
        }
    }
}

/// One certificate of a chain or bundle, as `/config_dump` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertDetail {
    /// The certificate, DER: `/config_dump` shows it as ztunnel does (base64 of its PEM),
    /// encoded when asked for, not kept encoded for every identity.
    pub der: Box<[u8]>,
    /// Serial number, decimal (ztunnel's `serialNumber`).
    pub serial: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

impl CertDetail {
    /// Reads a DER certificate; `None` if it does not parse.
    pub fn of(der: &[u8]) -> Option<CertDetail> {
        let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
        Some(CertDetail {
            der: der.into(),
            serial: crate::exposition::decimal(c.raw_serial()),
            not_before: c.validity().not_before.timestamp(),
            not_after: c.validity().not_after.timestamp(),
        })
    }
}

/// One identity's certificate as the control side holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertStatus {
    /// The identity.
    pub identity: Identity,
    /// Where it stands.
    pub state: CertState,
    /// The leaf, then intermediates (empty while none was issued).
    pub chain: Vec<CertDetail>,
    /// The roots peers are checked against.
    pub roots: Vec<CertDetail>,
    /// Why the last fetch failed, if it did.
    pub error: Option<String>,
}

impl CertStatus {
    /// An identity's held certificate, `Available`.
    pub fn available(
        identity: Identity,
        chain: &[CertificateDer<'_>],
        roots: &[CertificateDer<'_>],
    ) -> Self {
        CertStatus {
            identity,
            state: CertState::Available,
            chain: chain.iter().filter_map(|c| CertDetail::of(c)).collect(),
            roots: roots.iter().filter_map(|c| CertDetail::of(c)).collect(),
            error: None,
        }
    }

    /// End of the leaf's validity, Unix seconds.
    pub fn not_after(&self) -> Option<i64> {
        self.chain.first().map(|c| c.not_after)
    }

    /// `/config_dump`'s entry, in ztunnel's field names.
    pub fn to_json(&self) -> serde_json::Value {
        let detail = |d: &CertDetail| {
            serde_json::json!({
                "pem": crate::exposition::pem_base64(&d.der),
                "serialNumber": d.serial,
                "validFrom": rfc3339(d.not_before),
                "expirationTime": rfc3339(d.not_after),
            })
        };
        serde_json::json!({
            "identity": self.identity.to_string(),
            "state": self.state.as_str(),
            "certChain": self.chain.iter().map(detail).collect::<Vec<_>>(),
            "rootCerts": self.roots.iter().map(detail).collect::<Vec<_>>(),
            // ztunnel's keys above; ringtun's own apart, so tools reading ztunnel's see theirs.
            "ringtun": {"notAfterUnix": self.not_after(), "error": self.error},
        })
    }
}

/// The certificates the proxy holds and what fetching them cost, for `/config_dump` and
/// `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct CertReport {
    /// Every identity's certificate.
    pub certificates: Vec<CertStatus>,
    /// CreateCertificate calls made (0 without the control plane's CA).
    pub fetches: u64,
    /// Of those, the ones that failed.
    pub failures: u64,
}

impl CertReport {
    /// Prometheus text (or OpenMetrics) of the fetch counters, and ztunnel's
    /// `istio_cert_expiry_seconds` per identity.
    pub fn prometheus(&self, openmetrics: bool) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        if self.certificates.is_empty() && self.fetches == 0 {
            return out;
        }
        for (name, help, v) in [
            (
                "ringtun_certificate_fetches",
                "Certificates asked of the control plane's CA",
                self.fetches,
            ),
            (
                "ringtun_certificate_fetch_failures",
                "Certificate requests the control plane's CA failed or refused",
                self.failures,
            ),
        ] {
            let family = if openmetrics {
                name.to_owned()
            } else {
                format!("{name}_total")
            };
            let _ = writeln!(
                out,
                "# HELP {family} {help}\n# TYPE {family} counter\n{name}_total {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP istio_cert_expiry_seconds Unix timestamp when the workload certificate expires\n# TYPE istio_cert_expiry_seconds gauge"
        );
        for c in &self.certificates {
            if let Some(t) = c.not_after() {
                let _ = writeln!(
                    out,
                    "istio_cert_expiry_seconds{{identity=\"{}\"}} {t}",
                    c.identity
                );
            }
        }
        out
    }
}

/// Issues workload certificates from a CA certificate and key given by the operator (in-pod
/// mode's `--ca-cert`/`--ca-key`: ztunnel's FAKE_CA, with the operator's key), and builds the
/// TLS settings of each identity, once: later asks for the same identity share them.
pub struct Signer {
    issuer: rcgen::Certificate,
    key: rcgen::KeyPair,
    ca_path: PathBuf,
    roots: Arc<RootCertStore>,
    roots_info: Vec<CertDetail>,
    trust_domain: String,
    cipher: verify::CipherPreference,
    ktls: Option<tls_kernel_offload::Capability>,
    issued: HashMap<Identity, Arc<TlsMaterial>>,
}

impl Signer {
    /// Reads the CA; peers' chains are checked against `roots` (which should hold the CA).
    pub fn load(
        cert: &Path,
        key: &Path,
        roots: &Path,
        trust_domain: &str,
        cipher: verify::CipherPreference,
        ktls: Option<tls_kernel_offload::Capability>,
    ) -> Result<Signer, TlsSetupError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| pem_err(p, e));
        let key_pair = rcgen::KeyPair::from_pem(&read(key)?).map_err(|e| pem_err(key, e))?;
        let params = rcgen::CertificateParams::from_ca_cert_pem(&read(cert)?)
            .map_err(|e| pem_err(cert, e))?;
        // Re-signed here only to have rcgen's issuer: the subject and key are the CA's, which is
        // all a leaf's chain is checked against.
        let issuer = params
            .self_signed(&key_pair)
            .map_err(|e| pem_err(cert, e))?;
        let (store, roots_info) = root_store(roots)?;
        Ok(Signer {
            issuer,
            key: key_pair,
            ca_path: cert.to_owned(),
            roots: store,
            roots_info,
            trust_domain: trust_domain.to_owned(),
            cipher,
            ktls,
            issued: HashMap::new(),
        })
    }

    /// The TLS settings of `id`: issued now on first use, the same ones after.
    pub fn material(&mut self, id: &Identity) -> Result<Arc<TlsMaterial>, TlsSetupError> {
        if let Some(m) = self.issued.get(id) {
            return Ok(m.clone());
        }
        let (chain, key) = self.issue(id)?;
        let mut material = TlsMaterial::from_parts(
            chain,
            key,
            self.roots.clone(),
            &self.trust_domain,
            self.cipher,
            &self.ca_path,
        )?
        .with_kernel_offload(self.ktls.clone());
        material.roots_info = self.roots_info.clone();
        let material = Arc::new(material);
        self.issued.insert(id.clone(), material.clone());
        Ok(material)
    }

    /// Identities issued so far.
    pub fn issued(&self) -> usize {
        self.issued.len()
    }

    /// Every identity issued so far, for `/config_dump`.
    pub fn statuses(&self) -> Vec<CertStatus> {
        self.issued.values().map(|m| m.status()).collect()
    }

    fn issue(
        &self,
        id: &Identity,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsSetupError> {
        use rcgen::{
            CertificateParams, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType,
        };
        let err = |e: rcgen::Error| pem_err(&self.ca_path, format!("issuing {id}: {e}"));
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(err)?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().map_err(err)?;
        let leaf = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(err)?;
        let key_der = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| pem_err(&self.ca_path, format!("issuing {id}: {e}")))?;
        Ok((vec![leaf.der().clone()], key_der))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signer_issues_each_identity_once_in_the_trust_domain() {
        let dir = std::env::temp_dir().join(format!("ringtun-signer-{}", std::process::id()));
        let ca = crate::pki::Ca::open_or_create(&dir).expect("CA");
        drop(ca);
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
        let mut signer = Signer::load(
            &cert,
            &key,
            &cert,
            "cluster.local",
            verify::CipherPreference::Aes128,
            None,
        )
        .expect("signer");
        let client = Identity::new("cluster.local", "default", "client");
        let a = signer.material(&client).expect("issue");
        assert_eq!(a.identity, client);
        let again = signer.material(&client).expect("cached");
        assert!(Arc::ptr_eq(&a, &again), "issued once, then shared");
        let server = Identity::new("cluster.local", "default", "server");
        assert_eq!(signer.material(&server).expect("issue").identity, server);
        assert_eq!(signer.issued(), 2);
        let foreign = Identity::new("other.domain", "default", "client");
        assert!(
            matches!(
                signer.material(&foreign),
                Err(TlsSetupError::TrustDomain { .. })
            ),
            "an identity outside the trust domain is refused"
        );
        let missing = Signer::load(
            &dir.join("nope.pem"),
            &key,
            &cert,
            "cluster.local",
            verify::CipherPreference::Aes128,
            None,
        );
        assert!(matches!(missing, Err(TlsSetupError::Pem { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn certificates_are_reported_in_ztunnels_names() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
        let status = CertStatus {
            identity: Identity::new("cluster.local", "default", "client"),
            state: CertState::Available,
            chain: vec![CertDetail {
                der: Box::new([1, 2, 3]),
                serial: "2587".into(),
                not_before: 0,
                not_after: 86_400,
            }],
            roots: Vec::new(),
            error: None,
        };
        let j = status.to_json();
        assert_eq!(j["state"], "Available");
        assert_eq!(j["certChain"][0]["expirationTime"], "1970-01-02T00:00:00Z");
        assert_eq!(j["certChain"][0]["serialNumber"], "2587");
        assert_eq!(
            j["certChain"][0]["pem"],
            crate::exposition::pem_base64(&[1, 2, 3])
        );
        let report = CertReport {
            certificates: vec![status],
            fetches: 3,
            failures: 1,
        };
        let text = report.prometheus(false);
        assert!(
            text.contains("ringtun_certificate_fetches_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("ringtun_certificate_fetch_failures_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("istio_cert_expiry_seconds{identity=\"spiffe://cluster.local/ns/default/sa/client\"} 86400"),
            "{text}"
        );
        assert!(report
            .prometheus(true)
            .contains("# TYPE ringtun_certificate_fetches counter"));
        assert_eq!(
            CertReport::default().prometheus(false),
            "",
            "nothing without certificates"
        );
    }
}
