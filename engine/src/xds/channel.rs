//! The gRPC channel to istiod (xDS and CA alike): TCP (marked with ringtun's SO_MARK, so an
//! outbound capture rule leaves it alone), TLS 1.2/1.3 verified against istiod's root for the
//! address's host (or `ALT_*_HOSTNAME`), ALPN `h2`; and the per-request headers ztunnel sends:
//! `authorization: Bearer <token>` and `clusterid`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tonic::transport::{Channel, Endpoint as TonicEndpoint, Uri};

use super::error::XdsError;

/// Where istiod's root certificate comes from (ztunnel's `XDS_ROOT_CA` / `CA_ROOT_CA`: a path
/// when it names a file, else the PEM text itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file, read at every connection (a rotated root is picked up).
    File(PathBuf),
    /// PEM text.
    Pem(String),
}

impl RootCert {
    /// ztunnel's reading of the variable: PEM text when it holds a PEM block, else a path
    /// (one that does not exist is reported as such when connecting, where ztunnel would try
    /// to read the path itself as PEM).
    pub fn from_setting(s: &str) -> RootCert {
        if s.contains("-----BEGIN") {
            RootCert::Pem(s.to_owned())
        } else {
            RootCert::File(s.into())
        }
    }

    fn load(&self) -> Result<rustls::RootCertStore, XdsError> {
        let certs: Vec<CertificateDer<'static>> = match self {
            RootCert::File(p) => CertificateDer::pem_file_iter(p)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| XdsError::Root(format!("{}: {e}", p.display())))?,
            RootCert::Pem(text) => CertificateDer::pem_slice_iter(text.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| XdsError::Root(format!("inline PEM: {e}")))?,
        };
        let mut store = rustls::RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(certs);
        if added == 0 {
            return Err(XdsError::Root(format!("{self:?}: no usable certificate")));
        }
        Ok(store)
    }
}

/// The pod's credential (ztunnel's `AUTH_TOKEN`, default `./var/run/secrets/tokens/istio-token`
/// when that file exists).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Token {
    /// No token: requests carry no `authorization` header.
    None,
    /// A file, read at every request (the kubelet rotates it).
    File(PathBuf),
    /// The token itself.
    Static(String),
}

/// ztunnel's default token path, relative to the working directory.
pub const DEFAULT_TOKEN_PATH: &str = "./var/run/secrets/tokens/istio-token";
/// ztunnel's default root path, relative to the working directory.
pub const DEFAULT_ROOT_PATH: &str = "./var/run/secrets/istio/root-cert.pem";

impl Token {
    /// ztunnel's reading of `AUTH_TOKEN`: unset → the default file if it exists; a path that
    /// exists → that file; anything else → the token itself.
    pub fn from_setting(s: Option<&str>) -> Token {
        match s {
            None if std::path::Path::new(DEFAULT_TOKEN_PATH).exists() => {
                Token::File(DEFAULT_TOKEN_PATH.into())
            }
            None => Token::None,
            Some(p) if std::path::Path::new(p).exists() => Token::File(p.into()),
            Some(t) => Token::Static(t.to_owned()),
        }
    }

    fn load(&self) -> Result<Option<String>, XdsError> {
        match self {
            Token::None => Ok(None),
            Token::Static(t) => Ok(Some(t.trim().to_owned())),
            Token::File(p) => {
                let t = std::fs::read_to_string(p)
                    .map_err(|e| XdsError::Token(format!("{}: {e}", p.display())))?;
                if t.trim().is_empty() {
                    return Err(XdsError::Token(format!("{}: empty", p.display())));
                }
                Ok(Some(t.trim().to_owned()))
            }
        }
    }
}

/// One istiod endpoint (`XDS_ADDRESS` or `CA_ADDRESS`) and how to authenticate to it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `https://host:port`.
    pub url: String,
    /// istiod's root.
    pub root: RootCert,
    /// Another name istiod's certificate may carry instead of the URL's host.
    pub alt_hostname: Option<String>,
    /// The pod's token.
    pub token: Token,
    /// Sent as the `clusterid` header.
    pub cluster_id: String,
    /// SO_MARK on the connection (0: none).
    pub mark: u32,
}

/// What `XDS_ADDRESS`/`CA_ADDRESS` must look like, for error messages.
pub const ADDRESS_FORM: &str = "https://host:port (or host:port, taken as https)";

/// ztunnel's reading of an address setting: one without a scheme (`istiod.istio-system.svc:15012`)
/// is taken as https, as ztunnel's `validate_uri` does; one that is not a URL at all is refused
/// here, at start, rather than at the first connection.
pub fn with_scheme(address: &str) -> Result<String, XdsError> {
    let address = address.trim();
    let url = if address.contains("://") {
        address.to_owned()
    } else {
        format!("https://{address}")
    };
    let uri: Uri = url
        .parse()
        .map_err(|e| XdsError::Address(format!("{address:?} is not a URL ({e})")))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(XdsError::Address(format!("{address:?} names no host")));
    }
    // http's Uri takes `host:notaport` and only loses the port when asked for it.
    let bad_port = uri.authority().is_some_and(|a| {
        let a = a.as_str();
        let port = a
            .rsplit_once(':')
            .filter(|_| !a.ends_with(']'))
            .map(|(_, p)| p);
        port.is_some_and(|p| p.parse::<u16>().is_err())
    });
    if bad_port {
        return Err(XdsError::Address(format!(
            "{address:?} is not a URL (invalid port)"
        )));
    }
    Ok(url)
}

impl Endpoint {
    fn host_port(&self) -> Result<(Uri, String, u16), XdsError> {
        let uri: Uri = self
            .url
            .parse()
            .map_err(|e| XdsError::Address(format!("{}: {e}", self.url)))?;
        if uri.scheme_str() != Some("https") {
            return Err(XdsError::Address(format!(
                "{}: not an https URL (istiod is reached over TLS)",
                self.url
            )));
        }
        let host = uri
            .host()
            .ok_or_else(|| XdsError::Address(format!("{}: no host", self.url)))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        Ok((uri, host, port))
    }

    /// Whether the URL is one this client can use (`https://host[:port]`).
    pub fn check(&self) -> Result<(), XdsError> {
        self.host_port().map(drop)
    }

    /// Opens the TLS channel (the connection is made now, so a refusal shows here).
    pub async fn connect(&self) -> Result<Channel, XdsError> {
        let (uri, host, port) = self.host_port()?;
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| XdsError::Address(format!("{}: {e}", self.url)))?;
        let alt = match &self.alt_hostname {
            Some(a) => Some(
                ServerName::try_from(a.clone())
                    .map_err(|e| XdsError::Address(format!("alternative name {a:?}: {e}")))?,
            ),
            None => None,
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(self.root.load()?),
            provider.clone(),
        )
        .build()
        .map_err(|e| XdsError::Root(e.to_string()))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| XdsError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AltName {
                inner: verifier,
                alt,
            }))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
        let mark = self.mark;
        let url = self.url.clone();
        let connector = tower::service_fn(move |_: Uri| {
            let (tls, host, server_name, url) =
                (tls.clone(), host.clone(), server_name.clone(), url.clone());
            async move {
                let tcp = tcp_connect(&host, port, mark, &url).await?;
                let stream = tls.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        TonicEndpoint::from(uri)
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_with_connector(connector)
            .await
            .map_err(|e| XdsError::Connect(format!("{}: {}", self.url, error_chain(&e))))
    }

    /// Adds the token and cluster headers to a request.
    pub fn authorize<T>(&self, req: &mut tonic::Request<T>) -> Result<(), XdsError> {
        if let Some(token) = self.token.load()? {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| XdsError::Token("not a valid header value".into()))?;
            req.metadata_mut().insert("authorization", value);
            if let Ok(v) = self.cluster_id.parse() {
                req.metadata_mut().insert("clusterid", v);
            }
        }
        Ok(())
    }
}

/// Connects to the first of the host's addresses that answers.
async fn tcp_connect(
    host: &str,
    port: u16,
    mark: u32,
    url: &str,
) -> std::io::Result<tokio::net::TcpStream> {
    let mut last = std::io::Error::other(format!("{url}: the host has no address"));
    for addr in tokio::net::lookup_host((host, port)).await? {
        match tcp_connect_one(addr, mark).await {
            Ok(s) => return Ok(s),
            Err(e) => last = std::io::Error::new(e.kind(), format!("{addr}: {e}")),
        }
    }
    Err(last)
}

async fn tcp_connect_one(addr: SocketAddr, mark: u32) -> std::io::Result<tokio::net::TcpStream> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if mark != 0 {
        socket2::SockRef::from(&socket).set_mark(mark)?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// An error and its sources, one line: tonic's transport errors say little at the top.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        src = s.source();
    }
    out
}

/// WebPKI verification that also accepts the alternative name, as ztunnel's `ALT_*_HOSTNAME`.
#[derive(Debug)]
struct AltName {
    inner: Arc<WebPkiServerVerifier>,
    alt: Option<ServerName<'static>>,
}

impl ServerCertVerifier for AltName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let first =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        match (&first, &self.alt) {
            (
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )),
                Some(alt),
            ) => self
                .inner
                .verify_server_cert(end_entity, intermediates, alt, ocsp, now),
            _ => first,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
