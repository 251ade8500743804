//! Throwaway certificates (rcgen): a CA held in memory and SPIFFE workload certificates shaped
//! like Istio's (URI SAN, serverAuth + clientAuth), written as PEM files.
//!
//! ringtun's own `gen-certs` (engine/src/pki.rs) makes the same shapes for operators and keeps
//! its CA on disk; the test bed has its own so that it does not depend on the engine it tests.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::error::{Error, Result};
use crate::ringtun::cert_paths;

/// A certificate authority that lives as long as this value.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A leaf certificate and its private key, PEM.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl Ca {
    /// A new self-signed root named `common_name`.
    pub fn new(common_name: &str) -> Result<Ca> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "ringtun");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Ca { cert, key })
    }

    /// The root certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the root certificate to `path`.
    pub fn write_pem(&self, path: &Path) -> Result<()> {
        write(path, &self.pem())
    }

    /// Issues a workload certificate for the SPIFFE id `uri` (`spiffe://td/ns/N/sa/S`).
    pub fn issue(&self, uri: &str) -> Result<Leaf> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params
            .distinguished_name
            .push(DnType::OrganizationName, "ringtun");
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl Leaf {
    /// Writes the certificate to `chain` and the key to `key`.
    pub fn write(&self, chain: &Path, key: &Path) -> Result<()> {
        write(chain, &self.cert_pem)?;
        write(key, &self.key_pem)
    }
}

/// Writes what `ringtun gen-certs --dir DIR --trust-domain TD --identity ns/sa…` writes, from a
/// new CA: `ca.pem`, and `ns.sa.pem` / `ns.sa.key` for each identity.
pub fn write_workload_certs(dir: &Path, trust_domain: &str, identities: &[&str]) -> Result<Ca> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    let ca = Ca::new("ringtun test bed root CA")?;
    ca.write_pem(&dir.join("ca.pem"))?;
    for id in identities {
        let (ns, sa) = id
            .split_once('/')
            .ok_or_else(|| Error::Invalid(format!("identity {id:?} is not ns/sa")))?;
        let (chain, key) = cert_paths(dir, id);
        ca.issue(&format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}"))?
            .write(&chain, &key)?;
    }
    Ok(ca)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(Error::io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_certificates_land_where_ringtun_run_looks() {
        let dir =
            std::env::temp_dir().join(format!("ringtun-testbed-certs-{}", std::process::id()));
        write_workload_certs(&dir, "cluster.local", &["default/client"]).expect("certs");
        let (chain, key) = cert_paths(&dir, "default/client");
        let pem = std::fs::read_to_string(&chain).expect("chain");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
        let key = std::fs::read_to_string(&key).expect("key");
        assert!(key.contains("PRIVATE KEY"), "{key}");
        assert!(dir.join("ca.pem").exists());
        assert!(write_workload_certs(&dir, "cluster.local", &["nosa"]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
