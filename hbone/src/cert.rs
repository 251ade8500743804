//! Reading SPIFFE identities out of X.509 certificates.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{HboneError, Identity};

/// All SPIFFE identities in a DER certificate's URI subject alternative names, in order.
///
/// Non-SPIFFE URIs are skipped, and so is a `spiffe://` URI without Istio's
/// `spiffe://<td>/ns/<ns>/sa/<sa>` shape, as ztunnel's `identities` does: a certificate is judged
/// by the identities it does carry, and one with none is refused by the callers
/// ([`HboneError::NoIdentity`]), never read as anonymous.
pub fn spiffe_identities(der: &[u8]) -> Result<Vec<Identity>, HboneError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| HboneError::BadCertificate(e.to_string()))?;
    let mut out = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| HboneError::BadCertificate(e.to_string()))?;
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with("spiffe://") {
                    if let Ok(id) = Identity::parse(uri) {
                        out.push(id);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The identity of a leaf certificate: its first well-formed SPIFFE URI SAN (Istio issues
/// exactly one per workload; ztunnel takes the first too).
pub fn leaf_identity(der: &[u8]) -> Result<Identity, HboneError> {
    spiffe_identities(der)?
        .into_iter()
        .next()
        .ok_or(HboneError::NoIdentity)
}

/// Seconds since the Unix epoch after which the certificate is no longer valid.
pub fn not_after_unix(der: &[u8]) -> Result<i64, HboneError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| HboneError::BadCertificate(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with_sans(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_spiffe_uri_and_skips_others() {
        let der = cert_with_sans(vec![
            rcgen::SanType::DnsName("x.example".try_into().unwrap()),
            rcgen::SanType::URI("https://example.com/".try_into().unwrap()),
            rcgen::SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap()),
        ]);
        assert_eq!(
            leaf_identity(&der).unwrap(),
            Identity::new("cluster.local", "a", "b")
        );
    }

    #[test]
    fn malformed_spiffe_uris_are_skipped_and_every_good_one_kept() {
        let der = cert_with_sans(vec![
            rcgen::SanType::URI("spiffe://td/workload/x".try_into().unwrap()),
            rcgen::SanType::URI("spiffe://other.td/ns/a/sa/b".try_into().unwrap()),
            rcgen::SanType::URI("spiffe://cluster.local/ns/c/sa/d".try_into().unwrap()),
        ]);
        assert_eq!(
            spiffe_identities(&der).unwrap(),
            vec![
                Identity::new("other.td", "a", "b"),
                Identity::new("cluster.local", "c", "d")
            ]
        );
        assert_eq!(
            leaf_identity(&der).unwrap(),
            Identity::new("other.td", "a", "b")
        );
    }

    #[test]
    fn no_identity_and_only_malformed_identities_are_errors() {
        let none = cert_with_sans(vec![rcgen::SanType::DnsName("x".try_into().unwrap())]);
        assert!(matches!(leaf_identity(&none), Err(HboneError::NoIdentity)));
        let bad = cert_with_sans(vec![rcgen::SanType::URI(
            "spiffe://td/workload/x".try_into().unwrap(),
        )]);
        assert!(matches!(leaf_identity(&bad), Err(HboneError::NoIdentity)));
        assert!(matches!(
            leaf_identity(b"not a certificate"),
            Err(HboneError::BadCertificate(_))
        ));
    }
}
