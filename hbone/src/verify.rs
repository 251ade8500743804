//! Certificate verification for HBONE's mutual TLS, and the TLS configurations that use it.
//!
//! Both sides verify the peer's chain against the mesh roots (webpki) and require a SPIFFE
//! identity. Server names play no part: HBONE dials an IP, and what matters is the identity in the
//! certificate, which the caller checks against what the destination is allowed to be
//! ([`expect_identity`]) once the handshake is done. That keeps one TLS configuration per shard
//! instead of one per destination. A chain a shard verified once is not validated again while
//! it stays valid (`seen`); the peer's handshake signature is checked every time.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, OtherError,
    RootCertStore, SignatureScheme,
};

use crate::seen::Seen;
use crate::{cert, HboneError, Identity};

fn refuse(e: HboneError) -> TlsError {
    TlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Which of HBONE's two AES-GCM suites a connection prefers. Both are always offered and
/// accepted, as ztunnel does, so either preference meshes with any peer; the preference only
/// decides what two peers that both offer both agree on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CipherPreference {
    /// `TLS13_AES_128_GCM_SHA256` first: 10 AES rounds instead of 14, so about a quarter less
    /// cipher work per byte on the bulk path, at a security margin TLS 1.3 mandates anyway.
    #[default]
    Aes128,
    /// `TLS13_AES_256_GCM_SHA384` first (ztunnel's own order).
    Aes256,
}

/// The crypto provider HBONE uses: aws-lc-rs, TLS 1.3 suites AES-128-GCM and AES-256-GCM only
/// (as ztunnel offers them), in the order `pref` says.
pub fn provider(pref: CipherPreference) -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256 as AES128, TLS13_AES_256_GCM_SHA384 as AES256,
    };
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = match pref {
        CipherPreference::Aes128 => vec![AES128, AES256],
        CipherPreference::Aes256 => vec![AES256, AES128],
    };
    Arc::new(p)
}

/// Verifies clients on 15008: chain to the mesh roots, and a SPIFFE identity in our trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    seen: Seen,
}

impl SpiffeClientVerifier {
    /// Builds a verifier for clients whose chain ends at one of `roots`.
    pub fn new(
        roots: Arc<RootCertStore>,
        trust_domain: &str,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| TlsError::General(format!("client verifier: {e}")))?;
        Ok(SpiffeClientVerifier {
            inner,
            trust_domain: trust_domain.to_owned(),
            seen: Seen::new(),
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        if let Err(key) = self.seen.check(end_entity, intermediates, now) {
            self.inner
                .verify_client_cert(end_entity, intermediates, now)?;
            self.seen.remember(key, end_entity, intermediates);
        }
        let ids = cert::spiffe_identities(end_entity).map_err(refuse)?;
        in_trust_domain(&ids, &self.trust_domain).map_err(refuse)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Verifies HBONE servers: chain to the mesh roots and a SPIFFE identity present. Which identity
/// is acceptable depends on the destination and is checked by [`expect_identity`].
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    seen: Seen,
}

impl SpiffeServerVerifier {
    /// Builds a verifier for servers whose chain ends at one of `roots`.
    pub fn new(roots: Arc<RootCertStore>, provider: &CryptoProvider) -> Self {
        SpiffeServerVerifier {
            roots,
            algs: provider.signature_verification_algorithms,
            seen: Seen::new(),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        if let Err(key) = self.seen.check(end_entity, intermediates, now) {
            let parsed = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &self.roots,
                intermediates,
                now,
                self.algs.all,
            )?;
            self.seen.remember(key, end_entity, intermediates);
        }
        if cert::spiffe_identities(end_entity)
            .map_err(refuse)?
            .is_empty()
        {
            return Err(refuse(HboneError::NoIdentity));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The first of a certificate's identities in `trust_domain` (ztunnel accepts a client when any
/// of its SPIFFE SANs is in the mesh's trust domain).
fn in_trust_domain(ids: &[Identity], trust_domain: &str) -> Result<Identity, HboneError> {
    if ids.is_empty() {
        return Err(HboneError::NoIdentity);
    }
    ids.iter()
        .find(|id| id.trust_domain == trust_domain)
        .cloned()
        .ok_or_else(|| HboneError::ForeignTrustDomain {
            actual: list(ids),
            trust_domain: trust_domain.to_owned(),
        })
}

fn list(ids: &[Identity]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn peer_identities(peer_certs: Option<&[CertificateDer<'_>]>) -> Result<Vec<Identity>, HboneError> {
    let leaf = peer_certs
        .and_then(|c| c.first())
        .ok_or(HboneError::NoPeerCertificate)?;
    cert::spiffe_identities(leaf)
}

/// The identity of a client after the handshake: the first SPIFFE SAN of its leaf certificate
/// in `trust_domain` (the verifier already refused certificates without one).
pub fn peer_identity(
    peer_certs: Option<&[CertificateDer<'_>]>,
    trust_domain: &str,
) -> Result<Identity, HboneError> {
    in_trust_domain(&peer_identities(peer_certs)?, trust_domain)
}

/// Checks that the peer is one of the identities the destination may have; returns which.
pub fn expect_identity(
    peer_certs: Option<&[CertificateDer<'_>]>,
    expected: &[Identity],
) -> Result<Identity, HboneError> {
    let actual = peer_identities(peer_certs)?;
    if actual.is_empty() {
        return Err(HboneError::NoIdentity);
    }
    // Any of the server's SANs may be the one expected, as ztunnel checks it.
    if let Some(id) = actual.iter().find(|id| expected.contains(id)) {
        Ok(id.clone())
    } else {
        Err(HboneError::IdentityMismatch {
            actual: list(&actual),
            expected: expected
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// TLS settings for the server side of HBONE (port 15008): TLS 1.3, ALPN h2, mutual TLS.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
    pref: CipherPreference,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider(pref);
    let verifier = SpiffeClientVerifier::new(roots, trust_domain, provider.clone())?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![crate::ALPN_H2.to_vec()];
    // Our preference decides, not the client's: the operator chose it (--tls-cipher).
    cfg.ignore_client_order = true;
    // HBONE connections are long-lived and pooled; tickets would only cost a write per handshake.
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// TLS settings for the client side of HBONE: TLS 1.3, ALPN h2, our certificate presented.
pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    pref: CipherPreference,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider(pref);
    let verifier = SpiffeServerVerifier::new(roots, &provider);
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![crate::ALPN_H2.to_vec()];
    // Resumption would skip the peer's certificate, and with it the identity check.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};

    /// A CA (as a root store) and a leaf it signed carrying `uris` as URI SANs.
    fn ca_and_leaf(uris: &[&str]) -> (Arc<RootCertStore>, CertificateDer<'static>) {
        ca_and_leaf_until(uris, None)
    }

    /// [`ca_and_leaf`], the leaf valid until the start of the year given.
    fn ca_and_leaf_until(
        uris: &[&str],
        until: Option<i32>,
    ) -> (Arc<RootCertStore>, CertificateDer<'static>) {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).expect("ca");
        let key = KeyPair::generate().expect("key");
        let mut leaf = CertificateParams::new(Vec::<String>::new()).expect("params");
        leaf.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().expect("uri")))
            .collect();
        if let Some(year) = until {
            leaf.not_after = rcgen::date_time_ymd(year, 1, 1);
        }
        let leaf = leaf.signed_by(&key, &ca, &ca_key).expect("leaf");
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).expect("root");
        (Arc::new(roots), leaf.der().clone())
    }

    fn client_verdict(uris: &[&str]) -> Result<(), TlsError> {
        let (roots, leaf) = ca_and_leaf(uris);
        let v = SpiffeClientVerifier::new(
            roots,
            "cluster.local",
            provider(CipherPreference::default()),
        )
        .expect("verifier");
        v.verify_client_cert(&leaf, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn a_client_is_accepted_when_any_san_is_in_the_trust_domain() {
        let sans = [
            "spiffe://td/not-istio-shaped",
            "spiffe://other.td/ns/a/sa/b",
            "spiffe://cluster.local/ns/default/sa/client",
        ];
        client_verdict(&sans).expect("the third SAN is in cluster.local");
        let (_, leaf) = ca_and_leaf(&sans);
        assert_eq!(
            peer_identity(Some(&[leaf]), "cluster.local").expect("identity"),
            Identity::new("cluster.local", "default", "client"),
            "the identity policies see is the one in our trust domain"
        );
    }

    #[test]
    fn a_client_with_no_san_in_the_trust_domain_is_refused_with_all_of_them_named() {
        let err = client_verdict(&["spiffe://other.td/ns/a/sa/b", "spiffe://x.td/ns/c/sa/d"])
            .expect_err("foreign trust domains");
        let text = err.to_string();
        assert!(
            text.contains("other.td/ns/a/sa/b") && text.contains("x.td/ns/c/sa/d"),
            "{text}"
        );
        assert!(client_verdict(&["spiffe://td/malformed"]).is_err());
    }

    #[test]
    fn a_server_matches_when_any_san_is_expected() {
        let (_, leaf) = ca_and_leaf(&[
            "spiffe://cluster.local/ns/default/sa/first",
            "spiffe://cluster.local/ns/default/sa/server",
        ]);
        let want = Identity::new("cluster.local", "default", "server");
        let certs = [leaf];
        assert_eq!(
            expect_identity(Some(&certs), std::slice::from_ref(&want)).expect("second SAN"),
            want
        );
        let other = Identity::new("cluster.local", "default", "other");
        let err = expect_identity(Some(&certs), &[other]).expect_err("no SAN expected");
        assert!(err.to_string().contains("sa/first"), "{err}");
    }

    fn at_year(year: u64) -> UnixTime {
        // Close enough to 1 January of `year` for these tests (whole years of 365.25 days).
        UnixTime::since_unix_epoch(std::time::Duration::from_secs((year - 1970) * 31_557_600))
    }

    #[test]
    fn a_chain_verified_once_is_taken_as_verified_by_that_verifier_only() {
        let id = ["spiffe://cluster.local/ns/default/sa/client"];
        let (roots, leaf) = ca_and_leaf(&id);
        let (other_roots, foreign_leaf) = ca_and_leaf(&id);
        let p = provider(CipherPreference::default());
        let ours =
            SpiffeClientVerifier::new(roots.clone(), "cluster.local", p.clone()).expect("verifier");
        let theirs =
            SpiffeClientVerifier::new(other_roots, "cluster.local", p.clone()).expect("verifier");
        let now = UnixTime::now();
        let before = crate::seen::remembered();
        ours.verify_client_cert(&leaf, &[], now)
            .expect("chains to our roots");
        assert_eq!(
            crate::seen::remembered(),
            before + 1,
            "remembered once verified"
        );
        ours.verify_client_cert(&leaf, &[], now)
            .expect("again, from memory");
        // Another verifier (other roots) does not take our memory as its own.
        theirs
            .verify_client_cert(&leaf, &[], now)
            .expect_err("not their roots");
        // A chain that failed is not remembered: it fails every time.
        for _ in 0..2 {
            ours.verify_client_cert(&foreign_leaf, &[], now)
                .expect_err("not our roots");
        }
        assert_eq!(crate::seen::remembered(), before + 1);
        // One changed byte is another chain: verified, and refused.
        let mut forged = leaf.to_vec();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        ours.verify_client_cert(&CertificateDer::from(forged), &[], now)
            .expect_err("bad signature");
        // The server side remembers the same way, in its own verifier.
        let server = SpiffeServerVerifier::new(roots, &p);
        let name = ServerName::try_from("10.0.0.1").expect("name");
        for _ in 0..2 {
            server
                .verify_server_cert(&leaf, &[], &name, &[], now)
                .expect("chains to our roots");
            server
                .verify_server_cert(&foreign_leaf, &[], &name, &[], now)
                .expect_err("not our roots");
        }
    }

    #[test]
    fn a_remembered_chain_that_expired_is_refused() {
        let id = ["spiffe://cluster.local/ns/default/sa/client"];
        let (roots, leaf) = ca_and_leaf_until(&id, Some(2040));
        let p = provider(CipherPreference::default());
        let client =
            SpiffeClientVerifier::new(roots.clone(), "cluster.local", p.clone()).expect("verifier");
        let server = SpiffeServerVerifier::new(roots, &p);
        let name = ServerName::try_from("10.0.0.1").expect("name");
        client
            .verify_client_cert(&leaf, &[], at_year(2030))
            .expect("valid in 2030");
        server
            .verify_server_cert(&leaf, &[], &name, &[], at_year(2030))
            .expect("valid in 2030");
        let err = client
            .verify_client_cert(&leaf, &[], at_year(2041))
            .expect_err("expired in 2041, remembered or not");
        assert!(err.to_string().contains("expired"), "{err}");
        server
            .verify_server_cert(&leaf, &[], &name, &[], at_year(2041))
            .expect_err("expired in 2041, remembered or not");
    }
}
