//! Two rustls connections that finished a TLS 1.3 handshake with each other in memory, for
//! the record pump's tests and its fuzz target (`fuzz/fuzz_targets/record_pump.rs` includes
//! this file, so it uses nothing from ringtun).

use std::io::{Read as _, Write as _};
use std::sync::{Arc, OnceLock};

use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};
use rustls::{ServerConnection, SupportedCipherSuite};

/// The name the server's certificate is for.
const NAME: &str = "pump.test";

/// The cipher suites ringtun may negotiate (kTLS takes all three).
pub const SUITES: [SupportedCipherSuite; 3] = [
    aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
    aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
    aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
];

/// A certificate for [`NAME`] and its key, made once per process (key generation is the
/// slow part).
fn identity() -> &'static (CertificateDer<'static>, Vec<u8>) {
    static ID: OnceLock<(CertificateDer<'static>, Vec<u8>)> = OnceLock::new();
    ID.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![NAME.into()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        (cert.der().clone(), key.serialize_der())
    })
}

fn provider(suite: SupportedCipherSuite) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: vec![suite],
        ..aws_lc_rs::default_provider()
    })
}

/// A client and a server connection with `suite`, handshake done and every handshake byte
/// (session tickets included) delivered: both have nothing to send.
pub fn handshaken(suite: SupportedCipherSuite) -> (Connection, Connection) {
    handshake(suite, None)
}

/// [`handshaken`], with both ends' secrets logged to `log`.
#[allow(dead_code)] // the fuzz target includes this file and does not log
pub fn handshaken_logged(
    suite: SupportedCipherSuite,
    log: Arc<dyn rustls::KeyLog>,
) -> (Connection, Connection) {
    handshake(suite, Some(log))
}

fn handshake(
    suite: SupportedCipherSuite,
    log: Option<Arc<dyn rustls::KeyLog>>,
) -> (Connection, Connection) {
    let (cert, key) = identity();
    let mut roots = RootCertStore::empty();
    roots.add(cert.clone()).expect("root");
    let mut client = ClientConfig::builder_with_provider(provider(suite))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.clone()));
    let mut server = ServerConfig::builder_with_provider(provider(suite))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
    // Either end's keys may go on in ringtun's own record layer.
    client.enable_secret_extraction = true;
    server.enable_secret_extraction = true;
    if let Some(log) = log {
        client.key_log = log.clone();
        server.key_log = log;
    }
    let name = ServerName::try_from(NAME).expect("name");
    let mut c: Connection = ClientConnection::new(Arc::new(client), name)
        .expect("client")
        .into();
    let mut s: Connection = ServerConnection::new(Arc::new(server))
        .expect("server")
        .into();
    while c.is_handshaking() || s.is_handshaking() || c.wants_write() || s.wants_write() {
        deliver(&mut c, &mut s);
        deliver(&mut s, &mut c);
    }
    (c, s)
}

/// Everything `from` has to send, as bytes.
pub fn take_output(from: &mut Connection) -> Vec<u8> {
    let mut out = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut out).expect("write_tls to memory");
    }
    out
}

/// Moves everything `from` has to send into `to`, and lets `to` process it.
fn deliver(from: &mut Connection, to: &mut Connection) {
    let bytes = take_output(from);
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).expect("read_tls from memory");
        to.process_new_packets().expect("handshake");
    }
}

/// Encrypts `data` as `peer` would send it, in writes of at most `piece` bytes (so as
/// several records), and returns the ciphertext.
pub fn seal(peer: &mut Connection, data: &[u8], piece: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for mut part in data.chunks(piece.max(1)) {
        while !part.is_empty() {
            // rustls takes what fits its send buffer; the rest after that is emptied.
            let n = peer.writer().write(part).expect("write to rustls");
            part = &part[n..];
            out.extend(take_output(peer));
        }
    }
    out
}

/// Hands `peer` ciphertext and returns the plaintext it decrypted, or the error it reported.
pub fn open(peer: &mut Connection, mut bytes: &[u8]) -> Result<Vec<u8>, rustls::Error> {
    let mut plain = Vec::new();
    while !bytes.is_empty() {
        if peer.read_tls(&mut bytes).expect("read_tls from memory") == 0 {
            break;
        }
        peer.process_new_packets()?;
        let _ = peer.reader().read_to_end(&mut plain);
    }
    Ok(plain)
}
