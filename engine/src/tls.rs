//! Certificates and keys from PEM files, turned into the TLS settings every shard shares.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ringtun_hbone::{cert, verify, Identity};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

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
}

fn pem_err(path: &Path, what: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::Pem {
        path: path.to_owned(),
        what: what.to_string(),
    }
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
        let mut roots = RootCertStore::empty();
        for root in read_certs(&paths.roots)? {
            roots
                .add(root)
                .map_err(|e| pem_err(&paths.roots, format!("not a usable root: {e}")))?;
        }
        Self::from_parts(
            chain,
            key,
            Arc::new(roots),
            trust_domain,
            cipher,
            &paths.chain,
        )
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
        let client = verify::client_config(chain, key, roots, cipher)?;
        Ok(TlsMaterial {
            identity,
            server: Arc::new(server),
            client: Arc::new(client),
            not_after,
            ktls: None,
        })
    }

    /// Enables kTLS for HBONE connections with what the probe found: rustls must then keep
    /// the traffic secrets so they can be handed to the kernel after the handshake. Without
    /// kTLS the configs stay as they are (rustls forgets secrets it does not need).
    pub fn with_kernel_offload(mut self, cap: Option<tls_kernel_offload::Capability>) -> Self {
        if cap.is_some() {
            // Still the only owner here, so make_mut does not copy.
            Arc::make_mut(&mut self.server).enable_secret_extraction = true;
            Arc::make_mut(&mut self.client).enable_secret_extraction = true;
        }
        self.ktls = cap;
        self
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
        let mut store = RootCertStore::empty();
        for root in read_certs(roots)? {
            store
                .add(root)
                .map_err(|e| pem_err(roots, format!("not a usable root: {e}")))?;
        }
        Ok(Signer {
            issuer,
            key: key_pair,
            ca_path: cert.to_owned(),
            roots: Arc::new(store),
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
        let material = TlsMaterial::from_parts(
            chain,
            key,
            self.roots.clone(),
            &self.trust_domain,
            self.cipher,
            &self.ca_path,
        )?
        .with_kernel_offload(self.ktls.clone());
        let material = Arc::new(material);
        self.issued.insert(id.clone(), material.clone());
        Ok(material)
    }

    /// Identities issued so far.
    pub fn issued(&self) -> usize {
        self.issued.len()
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
}
