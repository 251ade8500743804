//! The Istio CA client: `CreateCertificate` for a fresh P-256 key, as ztunnel asks it. The key
//! lives in memory only; the answer is checked (a leaf for the identity asked, a root after it)
//! before it is handed out.
//!
//! Who asks, caches and renews per identity is `control::ca` (a thread of its own); this hands
//! out the chain, the roots and the key of one answer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use ringtun_hbone::Identity;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tonic::codec::ProstCodec;

use super::channel::Endpoint;
use super::error::XdsError;
use super::proto::{
    string_value, IstioCertificateRequest, IstioCertificateResponse, Struct,
    CREATE_CERTIFICATE_PATH,
};

/// ztunnel's `SECRET_TTL` default: 24 hours.
pub const DEFAULT_SECRET_TTL: Duration = Duration::from_secs(24 * 3600);

/// A certificate the CA issued, with its key.
pub struct IssuedCertificate {
    /// The identity it was asked for and names.
    pub identity: Identity,
    /// The leaf, then any intermediates (no root).
    pub chain: Vec<CertificateDer<'static>>,
    /// The roots the CA sent last (peers' chains must end there).
    pub roots: Vec<CertificateDer<'static>>,
    /// The private key (PKCS#8); never written to disk.
    pub key: PrivatePkcs8KeyDer<'static>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("IssuedCertificate")
            .field("identity", &self.identity.to_string())
            .field("chain", &self.chain.len())
            .field("roots", &self.roots.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl IssuedCertificate {
    /// When to fetch the next one: half-way through its life, as ztunnel.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

/// What `ringtun run` needs to take its certificates from istiod's CA.
#[derive(Clone, Debug)]
pub struct CaOptions {
    /// `CA_ADDRESS` and how to reach it (`CA_ROOT_CA`, the token, `CLUSTER_ID`).
    pub endpoint: Endpoint,
    /// `SECRET_TTL`: the lifetime asked for.
    pub ttl: Duration,
    /// The proxy's own identity: the workload's in dedicated mode, the node proxy's service
    /// account in shared mode.
    pub identity: Identity,
    /// Shared (node) mode: certificates of other identities are asked for on their behalf
    /// (`ImpersonatedIdentity`), as ztunnel does.
    pub impersonate: bool,
}

/// Asks istiod's CA (`CA_ADDRESS`) for workload certificates.
#[derive(Clone, Debug)]
pub struct CaClient {
    endpoint: Endpoint,
    ttl: Duration,
    impersonate: bool,
    own: Option<Identity>,
}

impl CaClient {
    /// A client asking for `ttl`-long certificates; `impersonate` (node mode) names the
    /// identity in `ImpersonatedIdentity` metadata, since the token is the node proxy's own.
    pub fn new(endpoint: Endpoint, ttl: Duration, impersonate: bool) -> Self {
        CaClient {
            endpoint,
            ttl,
            impersonate,
            own: None,
        }
    }

    /// The client of `ringtun run`: `own` (the token's identity) is asked for without
    /// `ImpersonatedIdentity`, every other identity with it in node mode.
    pub fn from_options(o: &CaOptions) -> Self {
        CaClient {
            own: Some(o.identity.clone()),
            ..CaClient::new(o.endpoint.clone(), o.ttl, o.impersonate)
        }
    }

    /// `CA_ADDRESS`, for the log.
    pub fn address(&self) -> &str {
        &self.endpoint.url
    }

    /// Fetches a certificate for `identity` on the caller's tokio runtime.
    pub async fn fetch(&self, identity: &Identity) -> Result<IssuedCertificate, XdsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| XdsError::Csr(e.to_string()))?;
        let uri = identity.to_string();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            uri.clone()
                .try_into()
                .map_err(|e| XdsError::Csr(format!("{uri}: {e}")))?,
        )];
        let csr = params
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| XdsError::Csr(e.to_string()))?;
        let impersonate = self.impersonate && self.own.as_ref() != Some(identity);
        let metadata = impersonate.then(|| Struct {
            fields: [("ImpersonatedIdentity".to_owned(), string_value(uri.clone()))].into(),
        });
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        self.endpoint.authorize(&mut request)?;
        let channel = self.endpoint.connect().await?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| XdsError::Connect(super::channel::error_chain(&e)))?;
        let codec = ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
        let path = http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE_PATH);
        let response = grpc.unary(request, path, codec).await?.into_inner();
        let der = PrivatePkcs8KeyDer::from(key.serialize_der());
        let issued = check_response(identity, response.cert_chain, der)?;
        tracing::info!(
            identity = %identity,
            expires = ?issued.not_after,
            "certificate issued by the control plane"
        );
        Ok(issued)
    }

    /// [`CaClient::fetch`] on a runtime of its own, for callers without one.
    pub fn fetch_blocking(&self, identity: &Identity) -> Result<IssuedCertificate, XdsError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(XdsError::Thread)?
            .block_on(self.fetch(identity))
    }
}

/// ztunnel's retry delays for a failed certificate fetch, per identity: about 1 s, doubling,
/// ±20 %, at most 150 s.
#[derive(Debug)]
pub struct CaBackoff {
    next: Duration,
}

/// ztunnel's longest wait between two attempts for one identity.
pub const CA_MAX_BACKOFF: Duration = Duration::from_secs(150);

impl Default for CaBackoff {
    fn default() -> Self {
        CaBackoff {
            next: Duration::from_secs(1),
        }
    }
}

impl CaBackoff {
    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(CA_MAX_BACKOFF);
        // Spread retries of many identities (and many nodes) apart; the clock's nanoseconds are
        // random enough for that.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let factor = 0.8 + 0.4 * (f64::from(nanos % 1000) / 1000.0);
        base.mul_f64(factor).min(CA_MAX_BACKOFF)
    }

    /// After a success: the next failure starts over.
    pub fn reset(&mut self) {
        *self = CaBackoff::default();
    }
}

/// Splits and checks the CA's answer: `[leaf, intermediates…, roots]`, the leaf naming
/// `identity`.
fn check_response(
    identity: &Identity,
    mut pems: Vec<String>,
    key: PrivatePkcs8KeyDer<'static>,
) -> Result<IssuedCertificate, XdsError> {
    let bad = |m: String| XdsError::Certificate(m);
    if pems.len() < 2 {
        return Err(bad(format!(
            "{} certificate(s) for {identity}: a leaf and a root are needed",
            pems.len()
        )));
    }
    let roots_pem = pems.pop().unwrap_or_default();
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(roots_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("roots: {e}")))?;
    if roots.is_empty() {
        return Err(bad("no root certificate after the chain".into()));
    }
    let chain: Vec<CertificateDer<'static>> = pems
        .iter()
        .map(|p| CertificateDer::from_pem_slice(p.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("chain: {e}")))?;
    let leaf = &chain[0];
    let got = ringtun_hbone::cert::leaf_identity(leaf).map_err(|e| bad(format!("leaf: {e}")))?;
    if &got != identity {
        return Err(bad(format!("asked for {identity}, the leaf names {got}")));
    }
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(format!("leaf: {e}")))?;
    let at = |t: x509_parser::time::ASN1Time| {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or_default())
    };
    Ok(IssuedCertificate {
        identity: identity.clone(),
        not_before: at(cert.validity().not_before),
        not_after: at(cert.validity().not_after),
        chain,
        roots,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(id: &str, ca: &rcgen::Certificate, ca_key: &KeyPair) -> String {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.try_into().expect("uri"))];
        p.signed_by(&key, ca, ca_key).expect("sign").pem()
    }

    fn key() -> PrivatePkcs8KeyDer<'static> {
        PrivatePkcs8KeyDer::from(KeyPair::generate().expect("key").serialize_der())
    }

    fn ca() -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (p.self_signed(&key).expect("ca"), key)
    }

    #[test]
    fn a_response_is_a_leaf_for_the_identity_and_roots() {
        let (ca, ca_key) = ca();
        let id = Identity::new("cluster.local", "default", "client");
        let issued = check_response(
            &id,
            vec![leaf(&id.to_string(), &ca, &ca_key), ca.pem()],
            key(),
        )
        .expect("accepted");
        assert_eq!(issued.chain.len(), 1);
        assert_eq!(issued.roots.len(), 1);
        assert_eq!(
            issued.roots[0].as_ref(),
            ca.der().as_ref(),
            "the root as sent"
        );
        assert!(issued.refresh_at() > issued.not_before);
        assert!(issued.refresh_at() < issued.not_after);

        let other = Identity::new("cluster.local", "default", "server");
        let err = check_response(
            &id,
            vec![leaf(&other.to_string(), &ca, &ca_key), ca.pem()],
            key(),
        )
        .expect_err("another identity");
        assert!(err.to_string().contains("the leaf names"), "{err}");
        let err = check_response(&id, vec![leaf(&id.to_string(), &ca, &ca_key)], key())
            .expect_err("no root");
        assert!(err.to_string().contains("a leaf and a root"), "{err}");
    }

    #[test]
    fn retries_back_off_to_ztunnels_cap() {
        let mut b = CaBackoff::default();
        let first = b.next_delay();
        assert!(
            (Duration::from_millis(800)..=Duration::from_millis(1200)).contains(&first),
            "{first:?}"
        );
        let second = b.next_delay();
        assert!(second >= Duration::from_millis(1600), "{second:?}");
        for _ in 0..20 {
            assert!(b.next_delay() <= CA_MAX_BACKOFF);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(1200));
    }
}
