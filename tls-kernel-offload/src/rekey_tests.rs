//! The derivation checked against rustls itself: two in-memory rustls connections, the
//! secrets taken from [`SecretLog`], and rustls' own keys after its KeyUpdates
//! (`refresh_traffic_keys`, then `dangerous_extract_secrets` of the side that received it).

use std::sync::Arc;

use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, ConnectionTrafficSecrets, RootCertStore, ServerConfig,
    ServerConnection, SupportedCipherSuite,
};

use super::*;

fn suite_for(c: Cipher) -> SupportedCipherSuite {
    match c {
        Cipher::Aes128Gcm => aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        Cipher::Aes256Gcm => aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        Cipher::Chacha20Poly1305 => aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    }
}

/// Client and server configs for `c`, both logging into `log`.
fn configs(c: Cipher, log: &Arc<SecretLog>) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["server.test".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let mut roots = RootCertStore::empty();
    roots.add(cert.der().clone()).expect("root");
    let mut p = aws_lc_rs::default_provider();
    p.cipher_suites = vec![suite_for(c)];
    let p: Arc<CryptoProvider> = Arc::new(p);
    let mut client = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = true;
    client.key_log = log.clone();
    let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
    let mut server = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_no_client_auth()
        .with_single_cert(
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("server config");
    server.enable_secret_extraction = true;
    server.send_tls13_tickets = 0;
    server.key_log = log.clone();
    (Arc::new(client), Arc::new(server))
}

/// Moves everything `from` wants to write into `to`, and has `to` process it.
fn pass(from: &mut rustls::Connection, to: &mut rustls::Connection) -> Vec<u8> {
    let mut bytes = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut bytes).expect("write_tls");
    }
    let mut rd = &bytes[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).expect("read_tls");
        to.process_new_packets().expect("process");
    }
    bytes
}

/// A finished handshake, and the ClientHello's random read off the wire.
pub(crate) fn handshake(
    c: Cipher,
    log: &Arc<SecretLog>,
) -> (rustls::Connection, rustls::Connection, [u8; 32]) {
    let (cc, sc) = configs(c, log);
    let name = ServerName::try_from("server.test").expect("name");
    let mut client: rustls::Connection = ClientConnection::new(cc, name).expect("client").into();
    let mut server: rustls::Connection = ServerConnection::new(sc).expect("server").into();
    let hello = pass(&mut client, &mut server);
    let random = client_random(&hello).expect("a ClientHello");
    while client.is_handshaking() || server.is_handshaking() {
        pass(&mut server, &mut client);
        pass(&mut client, &mut server);
    }
    (client, server, random)
}

fn keys_of(s: &ConnectionTrafficSecrets) -> (Vec<u8>, Vec<u8>) {
    match s {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (key.as_ref().to_vec(), iv.as_ref().to_vec())
        }
        _ => panic!("unexpected AEAD"),
    }
}

fn ours(s: &TrafficSecret) -> (Vec<u8>, Vec<u8>) {
    let (key, iv) = s.crypto_keys();
    (key, iv.to_vec())
}

#[test]
fn first_keys_from_the_logged_secrets_are_rustls_keys() {
    for c in Cipher::ALL {
        let log = Arc::new(SecretLog::default());
        let (client, server, random) = handshake(c, &log);
        let rekey = log.take(&random, c, true).expect("secrets logged");
        assert!(log.take(&random, c, true).is_none(), "taken once");
        let x = client.dangerous_extract_secrets().expect("extract");
        assert_eq!(x.rx.0, 0, "{c}: nothing received yet");
        assert_eq!(
            ours(rekey.rx()),
            keys_of(&x.rx.1),
            "{c}: client RX = server's secret"
        );
        assert_eq!(
            ours(rekey.tx()),
            keys_of(&x.tx.1),
            "{c}: client TX = client's secret"
        );
        assert_eq!(
            rekey.rx().as_bytes().len(),
            if c == Cipher::Aes256Gcm { 48 } else { 32 }
        );
        drop(server);
    }
}

#[test]
fn next_keys_after_key_updates_are_rustls_keys() {
    for c in Cipher::ALL {
        let log = Arc::new(SecretLog::default());
        let (mut client, mut server, random) = handshake(c, &log);
        // The server's view: its RX is the client's secret.
        let mut rekey = log.take(&random, c, false).expect("secrets logged");
        // The client rekeys twice (update_requested, as rustls always asks); the server's
        // rustls follows and answers with KeyUpdates of its own.
        for round in 1..=2u64 {
            client.refresh_traffic_keys().expect("refresh");
            pass(&mut client, &mut server);
            // rustls answers before its next application data, not at once.
            std::io::Write::write_all(&mut server.writer(), b"data").expect("write");
            pass(&mut server, &mut client);
            let plan = rekey.on_peer_key_update(true).expect("plan");
            assert!(plan.reply.is_some(), "update_requested is answered");
            assert_eq!(plan.reply.as_ref().map(|r| r.0), Some([24, 0, 0, 1, 0]));
            assert_eq!(rekey.updates(), round);
        }
        let x = server.dangerous_extract_secrets().expect("extract");
        assert_eq!(x.rx.0, 0, "{c}: the new RX key starts at record 0");
        assert_eq!(
            ours(rekey.rx()),
            keys_of(&x.rx.1),
            "{c}: RX after two updates"
        );
        assert_eq!(
            ours(rekey.tx()),
            keys_of(&x.tx.1),
            "{c}: TX after two answers"
        );
    }
}

#[test]
fn an_update_not_requested_moves_rx_only() {
    let log = Arc::new(SecretLog::default());
    let (_c, _s, random) = handshake(Cipher::Aes128Gcm, &log);
    let mut rekey = log.take(&random, Cipher::Aes128Gcm, true).expect("logged");
    let (rx0, tx0) = (ours(rekey.rx()), ours(rekey.tx()));
    let plan = rekey.on_peer_key_update(false).expect("plan");
    assert!(plan.reply.is_none());
    assert_ne!(ours(rekey.rx()), rx0);
    assert_eq!(ours(rekey.tx()), tx0);
}

#[test]
fn client_random_needs_a_client_hello() {
    let mut hello = vec![22, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3];
    hello.extend(1..=32u8);
    assert_eq!(client_random(&hello).map(|r| r[31]), Some(32));
    assert_eq!(client_random(&hello[..42]), None, "too short");
    let mut server_hello = hello.clone();
    server_hello[5] = 2;
    assert_eq!(client_random(&server_hello), None, "not a ClientHello");
    hello[0] = 23;
    assert_eq!(client_random(&hello), None, "not a handshake record");
}

#[test]
fn secret_lengths_are_checked_and_the_log_is_bounded() {
    assert!(TrafficSecret::new(Cipher::Aes256Gcm, &[0; 32]).is_err());
    assert!(TrafficSecret::new(Cipher::Aes128Gcm, &[0; 32]).is_ok());
    let log = SecretLog::default();
    for i in 0..SecretLog::CAPACITY as u32 + 10 {
        let mut random = [0u8; 32];
        random[..4].copy_from_slice(&i.to_be_bytes());
        rustls::KeyLog::log(&log, CLIENT_TRAFFIC_SECRET_0, &random, &[1; 32]);
        rustls::KeyLog::log(&log, SERVER_TRAFFIC_SECRET_0, &random, &[2; 32]);
    }
    let held = log.held.lock().expect("lock").0.len();
    assert_eq!(held, SecretLog::CAPACITY, "oldest forgotten");
    let mut newest = [0u8; 32];
    newest[..4].copy_from_slice(&(SecretLog::CAPACITY as u32 + 9).to_be_bytes());
    assert!(log.take(&newest, Cipher::Aes128Gcm, true).is_some());
    assert!(
        log.take(&[0; 32], Cipher::Aes128Gcm, true).is_none(),
        "the first was forgotten"
    );
    let kept = [7u8; 32];
    rustls::KeyLog::log(&log, CLIENT_TRAFFIC_SECRET_0, &kept, &[1; 32]);
    rustls::KeyLog::log(&log, SERVER_TRAFFIC_SECRET_0, &kept, &[2; 32]);
    log.forget(&kept);
    assert!(
        log.take(&kept, Cipher::Aes128Gcm, true).is_none(),
        "forgotten on request"
    );
}
