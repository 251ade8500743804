//! A small certificate authority for the demo and the tests: a root and SPIFFE workload
//! certificates shaped like Istio's (URI SAN, serverAuth + clientAuth).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use ringtun_hbone::Identity;

/// What went wrong generating certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// rcgen refused the parameters or an existing CA file.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn write(path: PathBuf, contents: &str) -> Result<(), PkiError> {
    fs::write(&path, contents).map_err(|source| PkiError::Io { path, source })
}

/// A CA kept in a directory as `ca.pem` and `ca.key`.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: PathBuf,
}

/// Files written for one workload identity.
#[derive(Clone, Debug)]
pub struct IssuedPaths {
    /// Leaf certificate (PEM).
    pub chain: PathBuf,
    /// Its private key (PKCS#8 PEM).
    pub key: PathBuf,
    /// The CA certificate to trust (PEM).
    pub roots: PathBuf,
}

impl Ca {
    /// Opens the CA in `dir`, creating the directory and a new CA if none is there.
    pub fn open_or_create(dir: &Path) -> Result<Ca, PkiError> {
        fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "ringtun demo root CA");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "ringtun");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        if key_path.exists() && cert_path.exists() {
            let read = |p: &Path| {
                fs::read_to_string(p).map_err(|source| PkiError::Io {
                    path: p.to_owned(),
                    source,
                })
            };
            let key = KeyPair::from_pem(&read(&key_path)?)?;
            let params = CertificateParams::from_ca_cert_pem(&read(&cert_path)?)?;
            let cert = params.self_signed(&key)?;
            return Ok(Ca {
                cert,
                key,
                dir: dir.to_owned(),
            });
        }
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        write(cert_path, &cert.pem())?;
        write(key_path, &key.serialize_pem())?;
        Ok(Ca {
            cert,
            key,
            dir: dir.to_owned(),
        })
    }

    /// Issues a workload certificate for `id` and writes `<ns>.<sa>.pem` / `.key` in the CA dir.
    pub fn issue(&self, id: &Identity) -> Result<IssuedPaths, PkiError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
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
        let base = format!("{}.{}", id.namespace, id.service_account);
        let chain = self.dir.join(format!("{base}.pem"));
        let key_path = self.dir.join(format!("{base}.key"));
        write(chain.clone(), &cert.pem())?;
        write(key_path.clone(), &key.serialize_pem())?;
        Ok(IssuedPaths {
            chain,
            key: key_path,
            roots: self.dir.join("ca.pem"),
        })
    }
}
