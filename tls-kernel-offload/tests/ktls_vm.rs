//! End-to-end kTLS tests over loopback TCP with real rustls handshakes.
//!
//! They need a kernel with kTLS (the `tls` module). Without it they print why and pass,
//! unless `RINGTUN_EXPECT_KTLS=1` is set, in which case a missing kTLS is a failure: CI
//! runs them inside the VM (`deploy/vm/test-ktls.sh`) with that variable set, so "kTLS
//! silently unavailable" can never turn into a green run.
//!
//! All tests take one global lock: they assert on the per-namespace `/proc/net/tls_stat`
//! counters, and on a 2-vCPU TCG guest running them side by side buys nothing.
#![cfg(target_os = "linux")]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
    SupportedCipherSuite,
};
use sha2::{Digest, Sha256};
use tls_kernel_offload::{
    client_random, follow_key_update, get_tls_tx_rx, offload, parse_handshake, probe, recv_data,
    recv_record, send_alert, send_close_notify, send_key_update, send_record, Cipher, Corked,
    Direction, HandshakeMsg, KtlsError, KtlsStream, Record, Rekey, SecretLog, ALERT_LEVEL_FATAL,
    CONTENT_HANDSHAKE, MAX_RECORD_PLAINTEXT,
};

const MIB: usize = 1024 * 1024;
/// Per-socket-operation limit: a stuck peer turns into EAGAIN, not a hung test.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// Whole-test limit (bulk transfers under TCG emulation are slow, but not this slow).
const TEST_TIMEOUT: Duration = Duration::from_secs(300);

// ------------------------------------------------------------------ harness

fn lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A failed test poisons the lock; the next test is still meaningful.
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// True when kTLS can be exercised. Without kTLS: skip (print why), or fail when the
/// environment says kTLS is expected.
fn require_ktls() -> bool {
    let cap = probe();
    let expect = std::env::var("RINGTUN_EXPECT_KTLS").is_ok_and(|v| v == "1");
    if cap.can_offload(Cipher::Aes128Gcm) {
        eprintln!("{cap}");
        return true;
    }
    if expect {
        panic!("RINGTUN_EXPECT_KTLS=1 but {cap}");
    }
    eprintln!("skipping (set RINGTUN_EXPECT_KTLS=1 to make this fail): {cap}");
    false
}

/// Runs `f` on its own thread and fails the test if it does not finish in time.
fn with_timeout<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test did not finish within {limit:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("thread ended without a result"),
        },
    }
}

fn tls_stat() -> HashMap<String, i64> {
    let text = std::fs::read_to_string("/proc/net/tls_stat").expect("/proc/net/tls_stat");
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

// ------------------------------------------------------------------ PKI and configs

struct Pki {
    roots: RootCertStore,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: Vec<u8>,
    client_chain: Vec<CertificateDer<'static>>,
    client_key: Vec<u8>,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf = |name: &str, eku: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
            p.extended_key_usages = vec![eku];
            let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
            (
                vec![cert.der().clone(), ca.der().clone()],
                key.serialize_der(),
            )
        };
        let (server_chain, server_key) = leaf("server.test", ExtendedKeyUsagePurpose::ServerAuth);
        let (client_chain, client_key) = leaf("client.test", ExtendedKeyUsagePurpose::ClientAuth);
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        Pki {
            roots,
            server_chain,
            server_key,
            client_chain,
            client_key,
        }
    })
}

fn provider(suite: SupportedCipherSuite) -> Arc<CryptoProvider> {
    let mut p = aws_lc_rs::default_provider();
    p.cipher_suites = vec![suite];
    Arc::new(p)
}

fn suite_for(c: Cipher) -> SupportedCipherSuite {
    match c {
        Cipher::Aes128Gcm => aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        Cipher::Aes256Gcm => aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        Cipher::Chacha20Poly1305 => aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        _ => panic!("no suite for {c}"),
    }
}

fn server_config(c: Cipher, tickets: usize) -> Arc<ServerConfig> {
    let pki = pki();
    let p = provider(suite_for(c));
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(pki.roots.clone()),
        p.clone(),
    )
    .build()
    .unwrap();
    let mut cfg = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            pki.server_chain.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.server_key.clone())),
        )
        .unwrap();
    cfg.enable_secret_extraction = true;
    cfg.send_tls13_tickets = tickets;
    Arc::new(cfg)
}

fn client_config(c: Cipher) -> Arc<ClientConfig> {
    let pki = pki();
    let mut cfg = ClientConfig::builder_with_provider(provider(suite_for(c)))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(pki.roots.clone())
        .with_client_auth_cert(
            pki.client_chain.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.client_key.clone())),
        )
        .unwrap();
    cfg.enable_secret_extraction = true;
    Arc::new(cfg)
}

/// A finished mutual-TLS handshake over loopback: both rustls connections and sockets.
/// Each side read the handshake through `Corked`, so nothing past the handshake is
/// buffered inside rustls.
struct Pair {
    client: ClientConnection,
    client_tcp: TcpStream,
    server: ServerConnection,
    server_tcp: TcpStream,
}

fn handshake(c: Cipher, tickets: usize) -> Pair {
    handshake_with(c, tickets, client_config(c), &mut Vec::new())
}

/// [`handshake`] with the client's traffic secrets logged (`SecretLog`): the pair, and what
/// the client needs to follow or start a KeyUpdate.
fn handshake_logged(c: Cipher) -> (Pair, Rekey) {
    let log = Arc::new(SecretLog::default());
    let mut ccfg = (*client_config(c)).clone();
    ccfg.key_log = log.clone();
    let mut hello = Vec::new();
    let p = handshake_with(c, 0, Arc::new(ccfg), &mut hello);
    let random = client_random(&hello).expect("the client's first bytes are its ClientHello");
    let rekey = log.take(&random, c, true).expect("traffic secrets logged");
    (p, rekey)
}

/// Forwards to the socket and keeps the first bytes written (the ClientHello).
struct Sniff<'a> {
    tcp: &'a TcpStream,
    first: &'a mut Vec<u8>,
}

impl Read for Sniff<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tcp.read(buf)
    }
}

impl Write for Sniff<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tcp.write(buf)?;
        if self.first.len() < 64 {
            self.first.extend_from_slice(&buf[..n.min(64)]);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// [`handshake`] with the client's config given; the client's first bytes go to `hello`.
fn handshake_with(c: Cipher, tickets: usize, ccfg: Arc<ClientConfig>, hello: &mut Vec<u8>) -> Pair {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let scfg = server_config(c, tickets);
    let server = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        set_timeouts(&tcp);
        let mut conn = ServerConnection::new(scfg).unwrap();
        let mut io = Corked::new(&tcp);
        while conn.is_handshaking() {
            conn.complete_io(&mut io).unwrap();
        }
        assert!(io.at_boundary());
        (conn, tcp)
    });
    let tcp = TcpStream::connect(addr).unwrap();
    set_timeouts(&tcp);
    let name = ServerName::try_from("server.test").unwrap();
    let mut conn = ClientConnection::new(ccfg, name).unwrap();
    {
        let mut io = Corked::new(Sniff {
            tcp: &tcp,
            first: hello,
        });
        while conn.is_handshaking() {
            conn.complete_io(&mut io).unwrap();
        }
        // The client Finished may still be queued.
        while conn.wants_write() {
            conn.write_tls(&mut io).unwrap();
        }
        assert!(io.at_boundary());
    }
    let (server, server_tcp) = server.join().unwrap();
    assert_eq!(
        conn.negotiated_cipher_suite().map(|s| s.suite()),
        Some(suite_for(c).suite())
    );
    Pair {
        client: conn,
        client_tcp: tcp,
        server,
        server_tcp,
    }
}

fn set_timeouts(tcp: &TcpStream) {
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp.set_nodelay(true).unwrap();
}

// ------------------------------------------------------------------ bulk data

/// Deterministic test payload: 64 KiB chunks taken at varying offsets of a 1 MiB random
/// block, so reordered, dropped or duplicated chunks change the checksum, without
/// generating every byte in (unoptimised) test code.
struct Payload {
    block: Vec<u8>,
}

const CHUNK: usize = 64 * 1024;

impl Payload {
    fn new(seed: u64) -> Self {
        let mut x = seed | 1;
        let block = (0..MIB + CHUNK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        Payload { block }
    }

    fn chunk(&self, i: usize) -> &[u8] {
        let off = (i * 7919) % MIB;
        &self.block[off..off + CHUNK]
    }

    /// Writes `total` bytes and returns their SHA-256.
    fn send(&self, w: &mut impl Write, total: usize) -> io::Result<[u8; 32]> {
        let mut h = Sha256::new();
        let mut sent = 0;
        let mut i = 0;
        while sent < total {
            let c = &self.chunk(i)[..CHUNK.min(total - sent)];
            w.write_all(c)?;
            h.update(c);
            sent += c.len();
            i += 1;
        }
        w.flush()?;
        Ok(h.finalize().into())
    }
}

/// Reads to EOF; returns (bytes, SHA-256).
fn recv_all(r: &mut impl Read) -> io::Result<(usize, [u8; 32])> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0;
    loop {
        match r.read(&mut buf)? {
            0 => return Ok((n, h.finalize().into())),
            k => {
                h.update(&buf[..k]);
                n += k;
            }
        }
    }
}

/// Result of one side of a bulk exchange.
struct Pumped {
    sent: [u8; 32],
    received: usize,
    received_hash: [u8; 32],
}

/// Offloaded endpoint: a writer thread sends `total` bytes then close_notify and FIN; this
/// thread reads until the peer's close_notify.
fn ktls_pump(tcp: TcpStream, early: Vec<u8>, total: usize, seed: u64) -> Pumped {
    let wtcp = tcp.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let mut w = wtcp;
        let hash = Payload::new(seed).send(&mut w, total).unwrap();
        send_close_notify(w.as_raw_fd()).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
        hash
    });
    let mut r = KtlsStream::new(tcp, early);
    let (received, received_hash) = recv_all(&mut r).unwrap();
    Pumped {
        sent: writer.join().unwrap(),
        received,
        received_hash,
    }
}

fn expected_hash(total: usize, seed: u64) -> [u8; 32] {
    Payload::new(seed).send(&mut io::sink(), total).unwrap()
}

// ------------------------------------------------------------------ tests

fn bulk_both_offloaded(c: Cipher, mib: usize) {
    if !require_ktls() {
        return;
    }
    with_timeout(TEST_TIMEOUT, move || {
        let before = tls_stat();
        let p = handshake(c, 2);
        let mut ctcp = p.client_tcp;
        let mut stcp = p.server_tcp;
        let (coff, cearly) = offload(p.client, &mut ctcp).unwrap();
        let (soff, searly) = offload(p.server, &mut stcp).unwrap();
        assert!(coff.tx && coff.rx && soff.tx && soff.rx);
        assert_eq!((coff.cipher, soff.cipher), (c, c));
        assert!(cearly.is_empty() && searly.is_empty());

        // getsockopt proves the kernel holds the keys, and reports where it counts from:
        // the server sent its session tickets from userspace (rustls puts both in one
        // record), so its TX starts past them, while the client never read them in
        // userspace and its kernel RX starts at record 0, where they will arrive.
        let (ctx, crx) = get_tls_tx_rx(ctcp.as_raw_fd()).unwrap();
        let (stx, srx) = get_tls_tx_rx(stcp.as_raw_fd()).unwrap();
        for s in [ctx, crx, stx, srx] {
            assert_eq!(s.version, 0x0304);
            assert_eq!(s.cipher, Some(c));
        }
        assert_eq!((ctx.rec_seq, srx.rec_seq, crx.rec_seq), (0, 0, 0));
        assert!(
            stx.rec_seq >= 1,
            "server TX seq {} must count the tickets",
            stx.rec_seq
        );

        let after = tls_stat();
        eprintln!("tls_stat before {before:?}\ntls_stat after  {after:?}");
        for k in ["TlsCurrTxSw", "TlsCurrRxSw", "TlsTxSw", "TlsRxSw"] {
            assert_eq!(after[k] - before[k], 2, "{k}: both ends must count");
        }

        let total = mib * MIB;
        let t0 = Instant::now();
        let server = thread::spawn(move || ktls_pump(stcp, searly, total, 2));
        let client = ktls_pump(ctcp, cearly, total, 1);
        let server = server.join().unwrap();
        let dt = t0.elapsed();
        eprintln!(
            "{c}: {mib} MiB each way in {dt:.2?} ({:.1} MiB/s aggregate)",
            (2 * mib) as f64 / dt.as_secs_f64()
        );
        assert_eq!(client.received, total);
        assert_eq!(server.received, total);
        assert_eq!(
            client.received_hash, server.sent,
            "server->client stream corrupted"
        );
        assert_eq!(
            server.received_hash, client.sent,
            "client->server stream corrupted"
        );
        assert_eq!(client.sent, expected_hash(total, 1));

        let end = tls_stat();
        assert_eq!(end["TlsDecryptError"], before["TlsDecryptError"]);
    });
}

fn bulk_mib() -> usize {
    std::env::var("RINGTUN_KTLS_BULK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

#[test]
fn aes128gcm_both_sides_offloaded_64mib_each_way() {
    let _g = lock();
    bulk_both_offloaded(Cipher::Aes128Gcm, bulk_mib());
}

#[test]
fn aes256gcm_both_sides_offloaded() {
    let _g = lock();
    bulk_both_offloaded(Cipher::Aes256Gcm, 8);
}

#[test]
fn chacha20poly1305_both_sides_offloaded() {
    let _g = lock();
    bulk_both_offloaded(Cipher::Chacha20Poly1305, 8);
}

#[test]
fn probe_accepts_all_tls13_ciphers() {
    let _g = lock();
    if !require_ktls() {
        return;
    }
    let cap = probe();
    for c in Cipher::ALL {
        assert!(cap.can_offload(c), "{cap}");
    }
}

/// Offloaded server, userspace rustls client: the kernel's records must be ordinary TLS
/// to rustls and the other way round.
#[test]
fn ktls_server_interoperates_with_userspace_client() {
    let _g = lock();
    if !require_ktls() {
        return;
    }
    // A quarter of the main bulk size: the userspace side runs its directions one after
    // the other, and interop bugs show in the first records, not the 64th MiB.
    let mib = bulk_mib().div_ceil(4);
    with_timeout(TEST_TIMEOUT, move || {
        let p = handshake(Cipher::Aes128Gcm, 2);
        let mut stcp = p.server_tcp;
        let (_, searly) = offload(p.server, &mut stcp).unwrap();
        let total = mib * MIB;
        let server = thread::spawn(move || ktls_pump(stcp, searly, total, 20));

        // Userspace side, one thread: read to close_notify, then send (TLS 1.3 allows the
        // other direction to keep going after a close_notify).
        let mut s = rustls::StreamOwned::new(p.client, p.client_tcp);
        let (received, received_hash) = recv_all(&mut s).unwrap();
        let sent = Payload::new(21).send(&mut s, total).unwrap();
        s.conn.send_close_notify();
        s.flush().unwrap();
        s.sock.shutdown(Shutdown::Write).unwrap();

        let server = server.join().unwrap();
        assert_eq!(received, total);
        assert_eq!(received_hash, server.sent);
        assert_eq!(server.received, total);
        assert_eq!(server.received_hash, sent);
    });
}

/// Userspace rustls server that sends session tickets after the handshake; the offloaded
/// client gets them as handshake records, skips them, and the data is intact.
#[test]
fn ktls_client_ignores_session_tickets() {
    let _g = lock();
    if !require_ktls() {
        return;
    }
    with_timeout(TEST_TIMEOUT, || {
        let tickets = 4;
        let p = handshake(Cipher::Aes128Gcm, tickets);
        let mut ctcp = p.client_tcp;
        let (_, early) = offload(p.client, &mut ctcp).unwrap();
        assert!(early.is_empty());

        let total = 4 * MIB;
        let (server, server_tcp) = (p.server, p.server_tcp);
        let sender = thread::spawn(move || {
            let mut s = rustls::StreamOwned::new(server, server_tcp);
            let sent = Payload::new(30).send(&mut s, total).unwrap();
            s.conn.send_close_notify();
            s.flush().unwrap();
            // Keep the socket open until the reader is done: EOF must come from the alert.
            (sent, s)
        });

        // Raw records first, to see the tickets arrive in the kernel...
        let fd = ctcp.as_raw_fd();
        let mut buf = vec![0u8; MAX_RECORD_PLAINTEXT];
        let mut seen_tickets = 0;
        let mut h = Sha256::new();
        let mut n = 0;
        loop {
            match recv_record(fd, &mut buf).unwrap() {
                Record::Handshake(b) => {
                    for m in parse_handshake(&b).unwrap() {
                        assert_eq!(m, HandshakeMsg::NewSessionTicket);
                        seen_tickets += 1;
                    }
                }
                Record::Data(k) => {
                    h.update(&buf[..k]);
                    n += k;
                    // ...then hand the rest to the high-level reader.
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            seen_tickets, tickets,
            "tickets must reach the kernel, not rustls"
        );
        let mut rest = KtlsStream::new(ctcp, Vec::new());
        let (k, _) = {
            let mut tail = Vec::new();
            rest.read_to_end(&mut tail).unwrap();
            h.update(&tail);
            (tail.len(), ())
        };
        n += k;
        assert_eq!(n, total);
        let got: [u8; 32] = h.finalize().into();
        let (sent, _server) = sender.join().unwrap();
        assert_eq!(got, sent);
    });
}

/// A small-buffer reader must still see whole tickets (the rest of a record arrives with
/// the next recvmsg) and skip them.
#[test]
fn recv_data_with_tiny_buffer_skips_tickets() {
    let _g = lock();
    if !require_ktls() {
        return;
    }
    with_timeout(TEST_TIMEOUT, || {
        let p = handshake(Cipher::Aes256Gcm, 3);
        let mut ctcp = p.client_tcp;
        let (_, early) = offload(p.client, &mut ctcp).unwrap();
        let mut s = rustls::StreamOwned::new(p.server, p.server_tcp);
        s.write_all(b"hello through tickets").unwrap();
        s.conn.send_close_notify();
        s.flush().unwrap();
        let mut r = KtlsStream::new(ctcp, early);
        let mut out = Vec::new();
        let mut b = [0u8; 3];
        loop {
            match r.read(&mut b).unwrap() {
                0 => break,
                k => out.extend_from_slice(&b[..k]),
            }
        }
        assert_eq!(out, b"hello through tickets");
    });
}

/// close_notify from the peer is a clean EOF: rustls peer and kernel peer.
#[test]
fn close_notify_is_clean_eof() {
    let _g = lock();
    if !require_ktls() {
        return;
    }
    with_timeout(TEST_TIMEOUT, || {
        // rustls peer -> offloaded client.
        let p = handshake(Cipher::Aes128Gcm, 0);
        let mut ctcp = p.client_tcp;
        let (_, early) = offload(p.client, &mut ctcp).unwrap();
        let mut s = rustls::StreamOwned::new(p.server, p.server_tcp);
        s.write_all(b"bye").unwrap();
        s.conn.send_close_notify();
        s.flush().unwrap();
        let fd = ctcp.as_raw_fd();
        let mut buf = vec![0u8; MAX_RECORD_PLAINTEXT];
        assert!(early.is_empty());
        assert_eq!(recv_record(fd, &mut buf).unwrap(), Record::Data(3));
        assert_eq!(&buf[..3], b"bye");
        assert_eq!(
            recv_record(fd, &mut buf).unwrap(),
            Record::Alert {
                level: 1,
                description: 0
            }
        );
        // The peer keeps its socket open: EOF comes from the alert, not from TCP.
        drop(s);

        // Offloaded peer -> offloaded peer through recv_data, socket left open.
        let p = handshake(Cipher::Chacha20Poly1305, 0);
        let (mut ctcp, mut stcp) = (p.client_tcp, p.server_tcp);
        offload(p.client, &mut ctcp).unwrap();
        offload(p.server, &mut stcp).unwrap();
        stcp.write_all(b"last words").unwrap();
        send_close_notify(stcp.as_raw_fd()).unwrap();
        let mut buf = [0u8; 64];
        let n = recv_data(ctcp.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"last words");
        assert_eq!(recv_data(ctcp.as_raw_fd(), &mut buf).unwrap(), 0);

        // And the rustls side understands the kernel's close_notify.
        let p = handshake(Cipher::Aes128Gcm, 0);
        let mut ctcp = p.client_tcp;
        offload(p.client, &mut ctcp).unwrap();
        ctcp.write_all(b"from kernel").unwrap();
        send_close_notify(ctcp.as_raw_fd()).unwrap();
        let mut s = rustls::StreamOwned::new(p.server, p.server_tcp);
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"from kernel");
    });
}

/// A fatal alert from the peer is an error naming the alert, not EOF or data.
#[test]
fn fatal_alert_is_an_error() {
    let _g = lock();
    if !require_ktls() {
        return;
    }
    with_timeout(TEST_TIMEOUT, || {
        // Kernel peer sends internal_error.
        let p = handshake(Cipher::Aes128Gcm, 0);
        let (mut ctcp, mut stcp) = (p.client_tcp, p.server_tcp);
        offload(p.client, &mut ctcp).unwrap();
        offload(p.server, &mut stcp).unwrap();
        send_alert(stcp.as_raw_fd(), ALERT_LEVEL_FATAL, 80).unwrap();
        let mut buf = [0u8; 64];
        let e = recv_data(ctcp.as_raw_fd(), &mut buf).unwrap_err();
        assert!(
            matches!(
                e,
                KtlsError::PeerAlert {
                    level: 2,
                    description: 80
                }
            ),
            "{e}"
        );
        eprintln!("kernel peer alert: {e}");

        // rustls peer rejects a bogus post-handshake message from the kernel side and
        // answers with its own fatal alert.
        let p = handshake(Cipher::Aes128Gcm, 0);
        let mut ctcp = p.client_tcp;
        offload(p.client, &mut ctcp).unwrap();
        // Handshake message type 99 does not exist.
        send_record(ctcp.as_raw_fd(), CONTENT_HANDSHAKE, &[99, 0, 0, 0]).unwrap();
        let mut s = rustls::StreamOwned::new(p.server, p.server_tcp);
        let mut b = [0u8; 16];
        let err = s.read(&mut b).unwrap_err();
        eprintln!("rustls rejected the bogus message: {err}");
        s.flush().ok(); // the alert rustls queued
        let e = recv_data(ctcp.as_raw_fd(), &mut buf).unwrap_err();
        assert!(matches!(e, KtlsError::PeerAlert { level: 2, .. }), "{e}");
        eprintln!("rustls peer alert: {e}");
    });
}

/// A rustls peer's KeyUpdate (with update_requested) on an offloaded client that has the
/// handshake's traffic secrets (`SecretLog`): where the kernel can rekey (Linux 6.14+,
/// `probe().rekey`), `follow_key_update` installs the peer's next key and data after the
/// KeyUpdate reads intact, and our own KeyUpdate and next TX key reach the peer, whose
/// rustls reads what we send next; on older kernels (the VM's 6.1) it fails cleanly: the
/// kernel refuses a second RX key (`CryptoRejected`, EBUSY), which is the caller's cue to
/// close the connection. Only one of the two branches runs on a given kernel.
#[test]
fn peer_key_update_is_followed_where_the_kernel_can() {
    let _g = lock();
    if !require_ktls() {
        return;
    }
    with_timeout(TEST_TIMEOUT, || {
        let c = Cipher::Aes128Gcm;
        let (p, mut rekey) = handshake_logged(c);
        let mut ctcp = p.client_tcp;
        offload(p.client, &mut ctcp).unwrap();
        let mut s = rustls::StreamOwned::new(p.server, p.server_tcp);
        s.write_all(b"before").unwrap();
        s.flush().unwrap();
        s.conn.refresh_traffic_keys().unwrap();
        s.write_all(b"after the key update").unwrap();
        s.flush().unwrap();
        let fd = ctcp.as_raw_fd();
        let mut buf = [0u8; 64];
        let n = recv_data(fd, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"before");
        match recv_data(fd, &mut buf) {
            Err(KtlsError::KeyUpdate { update_requested }) => assert!(update_requested),
            other => panic!("expected the KeyUpdate, got {other:?}"),
        }
        let cap = probe();
        match follow_key_update(fd, &mut rekey, true) {
            Ok(tx) => {
                assert!(cap.rekey, "{cap}: the kernel took a second RX key");
                assert!(tx, "update_requested: our TX key moved too");
                let n = recv_data(fd, &mut buf).unwrap();
                assert_eq!(&buf[..n], b"after the key update");
                (&ctcp).write_all(b"under our next key").unwrap();
                let mut got = [0u8; 18];
                s.read_exact(&mut got).unwrap();
                assert_eq!(&got, b"under our next key");
                eprintln!("kernel rekey: followed the peer's KeyUpdate both ways");
            }
            Err(e) => {
                eprintln!("no kernel rekey: {e}");
                assert!(!cap.rekey, "{cap}: follow_key_update failed: {e}");
                match &e {
                    KtlsError::CryptoRejected {
                        direction: Direction::Rx,
                        source,
                        ..
                    } => assert_eq!(source.raw_os_error(), Some(libc::EBUSY), "{e}"),
                    other => panic!("expected the kernel to refuse a second RX key: {other}"),
                }
            }
        }
    });
}

/// Our own KeyUpdate on an offloaded socket (`send_key_update`), to a rustls peer: on a
/// kernel that can rekey the peer reads what we send under our next key, answers the
/// update_requested with its own KeyUpdate, and what it sends after it reads back under its
/// next key (`follow_key_update`). Before 6.14 the kernel refuses the second TX key.
#[test]
fn own_key_update_is_sent_and_answered_where_the_kernel_can() {
    let _g = lock();
    if !require_ktls() {
        return;
    }
    with_timeout(TEST_TIMEOUT, || {
        let c = Cipher::Aes256Gcm;
        let (p, mut rekey) = handshake_logged(c);
        let mut ctcp = p.client_tcp;
        offload(p.client, &mut ctcp).unwrap();
        let fd = ctcp.as_raw_fd();
        let mut s = rustls::StreamOwned::new(p.server, p.server_tcp);
        (&ctcp).write_all(b"under our first key").unwrap();
        let mut got = [0u8; 19];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"under our first key");
        let cap = probe();
        match send_key_update(fd, &mut rekey, true) {
            Ok(()) => assert!(cap.rekey, "{cap}: the kernel took a second TX key"),
            Err(e) => {
                eprintln!("no kernel rekey: {e}");
                assert!(!cap.rekey, "{cap}: send_key_update failed: {e}");
                match &e {
                    KtlsError::CryptoRejected {
                        direction: Direction::Tx,
                        source,
                        ..
                    } => assert_eq!(source.raw_os_error(), Some(libc::EBUSY), "{e}"),
                    other => panic!("expected the kernel to refuse a second TX key: {other}"),
                }
                return;
            }
        }
        (&ctcp).write_all(b"under our next key").unwrap();
        let mut got = [0u8; 18];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"under our next key");
        // rustls answered the update_requested with its KeyUpdate before this.
        s.write_all(b"under the peer's next key").unwrap();
        s.flush().unwrap();
        let mut buf = [0u8; 64];
        match recv_data(fd, &mut buf) {
            Err(KtlsError::KeyUpdate { update_requested }) => assert!(!update_requested),
            other => panic!("expected the peer's KeyUpdate, got {other:?}"),
        }
        assert!(
            !follow_key_update(fd, &mut rekey, false).unwrap(),
            "no reply asked for"
        );
        let n = recv_data(fd, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"under the peer's next key");
        eprintln!("kernel rekey: our KeyUpdate sent and the peer's followed");
    });
}

/// TLS 1.3 KeyUpdate from a rustls peer (`refresh_traffic_keys`). Data before it arrives
/// intact; the KeyUpdate is reported as such; what follows (encrypted under the new key)
/// is an error, never garbage: EBADMSG on Linux < 6.14 (the kernel keeps decrypting with
/// the old key), EKEYEXPIRED on >= 6.14 (decryption paused until new keys are set). The
/// probe's `rekey` says which of the two this kernel is.
#[test]
fn peer_key_update_is_reported_not_garbage() {
    let _g = lock();
    if !require_ktls() {
        return;
    }
    with_timeout(TEST_TIMEOUT, || {
        // High level: recv_data.
        let p = handshake(Cipher::Aes128Gcm, 0);
        let mut ctcp = p.client_tcp;
        offload(p.client, &mut ctcp).unwrap();
        let mut s = rustls::StreamOwned::new(p.server, p.server_tcp);
        s.write_all(b"before").unwrap();
        s.flush().unwrap();
        s.conn.refresh_traffic_keys().unwrap();
        s.write_all(b"after the key update").unwrap();
        s.flush().unwrap();
        let mut r = KtlsStream::new(ctcp, Vec::new());
        let mut buf = [0u8; 64];
        let n = r.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"before");
        let e = recv_data(r.as_raw_fd(), &mut buf).unwrap_err();
        assert!(matches!(e, KtlsError::KeyUpdate { .. }), "{e}");
        eprintln!("recv_data after peer KeyUpdate: {e}");

        // Raw records: what the kernel itself does with the record after the KeyUpdate.
        let p = handshake(Cipher::Aes128Gcm, 0);
        let mut ctcp = p.client_tcp;
        offload(p.client, &mut ctcp).unwrap();
        let before = tls_stat();
        let mut s = rustls::StreamOwned::new(p.server, p.server_tcp);
        s.conn.refresh_traffic_keys().unwrap();
        s.write_all(b"secret after rekey").unwrap();
        s.flush().unwrap();
        let fd = ctcp.as_raw_fd();
        let mut big = vec![0u8; MAX_RECORD_PLAINTEXT];
        match recv_record(fd, &mut big).unwrap() {
            Record::Handshake(b) => assert!(matches!(
                parse_handshake(&b).unwrap()[..],
                [HandshakeMsg::KeyUpdate { .. }]
            )),
            other => panic!("expected the KeyUpdate record, got {other:?}"),
        }
        let e = recv_record(fd, &mut big).expect_err("record under the new key must not decrypt");
        let errno = e.raw_os_error();
        eprintln!(
            "kernel {} after a peer KeyUpdate: recvmsg -> {e} (errno {errno:?})",
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        );
        assert!(
            errno == Some(libc::EBADMSG) || errno == Some(libc::EKEYEXPIRED),
            "unexpected error {e}"
        );
        let cap = probe();
        assert_eq!(
            cap.rekey,
            errno == Some(libc::EKEYEXPIRED),
            "the probe's rekey answer disagrees with what the kernel did: {cap}"
        );
        if errno == Some(libc::EBADMSG) {
            let after = tls_stat();
            assert!(after["TlsDecryptError"] > before["TlsDecryptError"]);
            // The error is sticky: the socket is dead.
            let e2 = recv_record(fd, &mut big).unwrap_err();
            assert_eq!(e2.raw_os_error(), Some(libc::EBADMSG));
            // And new RX keys cannot be installed: these kernels accept crypto info once
            // per direction ("set crypto info more than one time" is EBUSY).
            let mut info = [0u8; 40]; // tls12_crypto_info_aes_gcm_128, contents irrelevant
            info[..2].copy_from_slice(&0x0304u16.to_ne_bytes());
            info[2..4].copy_from_slice(&51u16.to_ne_bytes());
            // SAFETY: `info` is a live 40-byte buffer the kernel only reads.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_TLS,
                    libc::TLS_RX,
                    info.as_ptr().cast(),
                    info.len() as libc::socklen_t,
                )
            };
            let rekey = io::Error::last_os_error();
            eprintln!("setsockopt(TLS_RX) again -> rc {rc}, {rekey}");
            assert_eq!((rc, rekey.raw_os_error()), (-1, Some(libc::EBUSY)));
        }
    });
}

/// Plaintext rustls decrypted before the switch (here: because the server read one
/// record too many) comes back from offload and precedes the kernel's data.
#[test]
fn already_decrypted_plaintext_is_returned() {
    let _g = lock();
    if !require_ktls() {
        return;
    }
    with_timeout(TEST_TIMEOUT, || {
        let p = handshake(Cipher::Aes128Gcm, 0);
        let mut c = rustls::StreamOwned::new(p.client, p.client_tcp);
        c.write_all(b"early bytes|").unwrap();
        c.flush().unwrap();
        let mut server = p.server;
        let mut stcp = p.server_tcp;
        {
            // Pull the client's first data record into rustls before offloading.
            let mut io = Corked::new(&stcp);
            while server.read_tls(&mut io).unwrap() > 0 && !io.at_boundary() {}
            server.process_new_packets().unwrap();
        }
        let (_, early) = offload(server, &mut stcp).unwrap();
        assert_eq!(early, b"early bytes|");
        c.write_all(b"late bytes").unwrap();
        c.conn.send_close_notify();
        c.flush().unwrap();
        let mut r = KtlsStream::new(stcp, early);
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"early bytes|late bytes");
    });
}

/// TCP FIN without close_notify reads as EOF (truncation is the application's call).
#[test]
fn tcp_eof_without_close_notify() {
    let _g = lock();
    if !require_ktls() {
        return;
    }
    with_timeout(TEST_TIMEOUT, || {
        let p = handshake(Cipher::Aes128Gcm, 0);
        let mut ctcp = p.client_tcp;
        offload(p.client, &mut ctcp).unwrap();
        p.server_tcp.shutdown(Shutdown::Both).unwrap();
        let mut buf = vec![0u8; MAX_RECORD_PLAINTEXT];
        assert_eq!(
            recv_record(ctcp.as_raw_fd(), &mut buf).unwrap(),
            Record::Eof
        );
    });
}

/// The kernel's RX record sequence number (`getsockopt(TLS_RX)`) counts every record it
/// decrypted, however many of them one read returned: what ringtun's RX key budget reads
/// to know how close the peer is to its rekey point.
#[test]
fn rx_rec_seq_counts_records_not_reads() {
    let _g = lock();
    if !require_ktls() {
        return;
    }
    with_timeout(TEST_TIMEOUT, || {
        // No tickets: every record after the switch is one the test writes.
        let p = handshake(Cipher::Aes256Gcm, 0);
        let mut ctcp = p.client_tcp;
        offload(p.client, &mut ctcp).unwrap();
        let start = get_tls_tx_rx(ctcp.as_raw_fd()).unwrap().1.rec_seq;
        let mut s = rustls::StreamOwned::new(p.server, p.server_tcp);
        // 100 small records and 4 full ones, all queued before the reader looks.
        for i in 0..100u8 {
            s.write_all(&[i; 10]).unwrap();
            s.flush().unwrap();
        }
        s.write_all(&vec![7u8; 4 * MAX_RECORD_PLAINTEXT]).unwrap();
        s.flush().unwrap();
        let total = 100 * 10 + 4 * MAX_RECORD_PLAINTEXT;
        let mut r = KtlsStream::new(ctcp, Vec::new());
        let mut buf = vec![0u8; 256 * 1024];
        let (mut got, mut reads) = (0, 0);
        while got < total {
            let n = r.read(&mut buf).unwrap();
            assert!(n > 0, "EOF after {got} of {total} bytes");
            got += n;
            reads += 1;
        }
        let end = get_tls_tx_rx(r.as_raw_fd()).unwrap().1.rec_seq;
        eprintln!("104 records in {reads} reads; RX rec_seq {start} -> {end}");
        assert_eq!(end - start, 104, "{reads} reads");
    });
}
