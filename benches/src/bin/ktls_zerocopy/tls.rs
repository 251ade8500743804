//! TLS set-up: rcgen certificates made in-process, rustls configs for one cipher suite, and
//! connected socket pairs, plain or offloaded to kTLS after a real handshake.

use std::fmt;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, OnceLock};
use std::thread;

use rustls::crypto::aws_lc_rs;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use tls_kernel_offload::{offload, Cipher, Corked};

pub struct Pki {
    pub roots: RootCertStore,
    pub server: (Vec<CertificateDer<'static>>, Vec<u8>),
    pub client: (Vec<CertificateDer<'static>>, Vec<u8>),
}

pub fn pki() -> io::Result<&'static Pki> {
    static PKI: OnceLock<Pki> = OnceLock::new();
    if let Some(p) = PKI.get() {
        return Ok(p);
    }
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let e = |e: rcgen::Error| io::Error::other(format!("rcgen: {e}"));
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).map_err(e)?;
    let leaf = |name: &str, eku| -> io::Result<(Vec<CertificateDer<'static>>, Vec<u8>)> {
        let key = KeyPair::generate().map_err(e)?;
        let mut p = CertificateParams::new(vec![name.to_string()]).map_err(e)?;
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, &ca, &ca_key).map_err(e)?;
        Ok((
            vec![cert.der().clone(), ca.der().clone()],
            key.serialize_der(),
        ))
    };
    let server = leaf("server.test", ExtendedKeyUsagePurpose::ServerAuth)?;
    let client = leaf("client.test", ExtendedKeyUsagePurpose::ClientAuth)?;
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.der().clone())
        .map_err(|e| io::Error::other(format!("root store: {e}")))?;
    Ok(PKI.get_or_init(|| Pki {
        roots,
        server,
        client,
    }))
}

pub fn tls_err(e: impl fmt::Display) -> io::Error {
    io::Error::other(format!("TLS set-up: {e}"))
}

pub fn configs(cipher: Cipher) -> io::Result<(Arc<ServerConfig>, Arc<ClientConfig>)> {
    let pki = pki()?;
    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites = vec![suite(cipher)];
    let provider = Arc::new(provider);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(pki.roots.clone()),
        provider.clone(),
    )
    .build()
    .map_err(tls_err)?;
    let key = |k: &Vec<u8>| PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.clone()));
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server.0.clone(), key(&pki.server.1))
        .map_err(tls_err)?;
    server.enable_secret_extraction = true;
    // No tickets: the sending (client) end never reads, and nothing else should be queued.
    server.send_tls13_tickets = 0;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(pki.roots.clone())
        .with_client_auth_cert(pki.client.0.clone(), key(&pki.client.1))
        .map_err(tls_err)?;
    client.enable_secret_extraction = true;
    Ok((Arc::new(server), Arc::new(client)))
}

pub fn tcp_pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(listener.local_addr()?)?;
    let (b, _) = listener.accept()?;
    for s in [&a, &b] {
        s.set_nodelay(true)?;
    }
    Ok((a, b))
}

/// A loopback connection with kTLS installed on both ends (or plain TCP without `tls`):
/// `(sender, receiver, plaintext the receiver already holds)`.
pub fn ktls_pair(tls: Option<Cipher>) -> io::Result<(TcpStream, TcpStream, Vec<u8>)> {
    let (mut ctcp, stcp) = tcp_pair()?;
    let Some(cipher) = tls else {
        return Ok((ctcp, stcp, Vec::new()));
    };
    let (scfg, ccfg) = configs(cipher)?;
    let server = thread::spawn(move || -> io::Result<(TcpStream, Vec<u8>)> {
        let mut stcp = stcp;
        let mut conn = ServerConnection::new(scfg).map_err(tls_err)?;
        {
            let mut io = Corked::new(&stcp);
            while conn.is_handshaking() {
                conn.complete_io(&mut io)?;
            }
        }
        let (_, early) = offload(conn, &mut stcp).map_err(tls_err)?;
        Ok((stcp, early))
    });
    let name = ServerName::try_from("server.test").map_err(tls_err)?;
    let mut conn = ClientConnection::new(ccfg, name).map_err(tls_err)?;
    {
        let mut io = Corked::new(&ctcp);
        while conn.is_handshaking() {
            conn.complete_io(&mut io)?;
        }
        while conn.wants_write() {
            conn.write_tls(&mut io)?;
        }
    }
    let (off, _) = offload(conn, &mut ctcp).map_err(tls_err)?;
    if !off.tx {
        return Err(io::Error::other("kTLS TX was not installed on the sender"));
    }
    let (stcp, early) = server
        .join()
        .map_err(|_| io::Error::other("server handshake thread panicked"))??;
    Ok((ctcp, stcp, early))
}

/// rustls's TLS 1.3 suite for `c`.
pub fn suite(c: Cipher) -> rustls::SupportedCipherSuite {
    match c {
        Cipher::Aes256Gcm => aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        Cipher::Chacha20Poly1305 => aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        _ => aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
    }
}
