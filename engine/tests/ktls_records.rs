//! What an offloaded ringtun does with the records a peer sends around and after the switch
//! to kTLS, driven by a hand-made HBONE client that is itself offloaded (so it can send any
//! record through its kernel): the client's Finished and its first application data record
//! split across TCP segments (the record the handshake left half-read must be finished before
//! the kernel takes over), the first data arriving with the Finished (decrypted by rustls,
//! drained and served first), a NewSessionTicket (skipped), a KeyUpdate (followed where the
//! kernel can take new keys, Linux 6.14+, the client then rekeying as a TLS 1.3 peer does;
//! before that, that connection closed with a log line saying why), a fatal alert (connection
//! error naming the alert) and close_notify (clean end both ways).
//!
//! The client speaks just enough HTTP/2 to see ringtun answer: the connection preface,
//! SETTINGS, and PING → PING ACK.
//!
//! Needs kTLS in the kernel the test runs on, for both ringtun and the client: on a host
//! without it the tests say so and pass without checking anything, unless
//! `RINGTUN_EXPECT_KTLS=1` (set in the kTLS VM by `deploy/vm/test-ktls.sh`), where a missing
//! kTLS fails them. Each ringtun runs in a network namespace of its own (its readiness port,
//! 15021, is what the test waits on), serving HBONE on 127.0.0.1:15008 there.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ringtun_testbed::Netns;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tls_kernel_offload as ktls;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_SETTINGS: u8 = 4;
const FRAME_PING: u8 = 6;
const FLAG_ACK: u8 = 1;
const WAIT: Duration = Duration::from_secs(60);

/// Whether kTLS can be tested here; prints why not when it cannot.
fn ktls_here(test: &str) -> bool {
    let cap = ktls::probe();
    if cap.is_available() {
        return true;
    }
    assert!(
        !std::env::var("RINGTUN_EXPECT_KTLS").is_ok_and(|v| v == "1"),
        "RINGTUN_EXPECT_KTLS=1 but {cap}"
    );
    eprintln!("{test}: nothing checked, this kernel cannot offload TLS ({cap}); deploy/vm/test-ktls.sh runs it");
    false
}

/// Where the server ringtun listens for HBONE, inside its namespace.
const HBONE: &str = "127.0.0.1:15008";

/// A ringtun serving HBONE on 127.0.0.1 in a namespace of its own, with kTLS required; killed
/// on drop (its log is printed when the test fails).
struct Server {
    ringtun: Ringtun,
    ns: Netns,
    dir: TempDir,
}

impl Server {
    fn start(tag: &'static str) -> Server {
        let (ns, dir) = one_node(tag, &["default/client", "default/server"]);
        let ringtun = Ringtun::start(
            &ns,
            "server",
            dir.path(),
            RingtunArgs {
                config: &dir.join("config.yaml"),
                certs: dir.path(),
                identity: "default/server",
                workload: "default/server",
                extra: ["--workers", "1", "--mark", "0", "--ktls", "on"]
                    .into_iter()
                    .chain(["--outbound-listen", "127.0.0.1:0"])
                    .chain(["--inbound-listen", HBONE])
                    .chain(["--inbound-plaintext-listen", "127.0.0.1:0"])
                    .map(String::from)
                    .collect(),
                log_filter: Some("info,ringtun::stream=debug"),
            },
        );
        Server { ringtun, ns, dir }
    }

    fn text(&self) -> String {
        self.ringtun.log()
    }

    /// Waits until the log has a line containing all of `needles`; returns it.
    fn wait_line(&self, needles: &[&str]) -> String {
        self.ringtun.wait_line(needles, WAIT)
    }
}

/// The client's rustls config; its first traffic secrets go to `secrets`.
fn client_config(dir: &TempDir, secrets: Arc<ktls::SecretLog>) -> Arc<rustls::ClientConfig> {
    let (chain, key) = cert_paths(dir.path(), "default/client");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&chain)
        .expect("chain")
        .collect::<Result<_, _>>()
        .expect("chain PEM");
    let key = PrivateKeyDer::from_pem_file(&key).expect("key PEM");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca.pem")).expect("roots") {
        roots.add(c.expect("root PEM")).expect("root");
    }
    let mut cfg = ringtun_hbone::verify::client_config(
        chain,
        key,
        Arc::new(roots),
        ringtun_hbone::verify::CipherPreference::default(),
    )
    .expect("client config");
    cfg.enable_secret_extraction = true;
    cfg.key_log = secrets;
    Arc::new(cfg)
}

/// How the client's Finished and its first data record travel.
#[derive(Clone, Copy, PartialEq)]
enum FirstFlight {
    /// One write: ringtun's handshake likely reads (and rustls decrypts) the data record too.
    Together,
    /// The data record split 10 bytes in, the rest 300 ms later: ringtun's handshake ends
    /// inside that record.
    Split,
}

/// An offloaded HBONE client connection to ringtun, after the HTTP/2 preface and SETTINGS
/// went out in the first flight.
struct Client {
    stream: ktls::KtlsStream<TcpStream>,
    /// Frames read but not consumed yet.
    buf: Vec<u8>,
    /// The traffic secrets, to rekey as a TLS 1.3 peer does where the kernel can.
    rekey: ktls::Rekey,
    /// ringtun's KeyUpdates followed so far.
    followed: u64,
}

impl Client {
    fn connect(server: &Server, flight: FirstFlight) -> Client {
        let tcp = connect_in(&server.ns, HBONE).expect("connect");
        tcp.set_read_timeout(Some(WAIT)).expect("timeout");
        tcp.set_write_timeout(Some(WAIT)).expect("timeout");
        tcp.set_nodelay(true).expect("nodelay");
        let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let secrets = Arc::new(ktls::SecretLog::default());
        let mut conn =
            rustls::ClientConnection::new(client_config(&server.dir, secrets.clone()), name)
                .expect("client");
        // The ClientHello goes out on its own: its random names this handshake's secrets.
        let mut hello = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut hello).expect("ClientHello");
        }
        (&tcp).write_all(&hello).expect("send ClientHello");
        let random = ktls::client_random(&hello).expect("the first flight is a ClientHello");
        // Handshake with reads that stop at record boundaries, and without sending the
        // Finished: it goes out below together with the first data.
        let mut corked = ktls::Corked::new(&tcp);
        while conn.is_handshaking() {
            if conn.wants_write() {
                conn.write_tls(&mut corked).expect("write handshake");
                continue;
            }
            let n = conn.read_tls(&mut corked).expect("read handshake");
            assert!(n > 0, "ringtun closed during the handshake");
            conn.process_new_packets().expect("TLS handshake");
        }
        let mut first = PREFACE.to_vec();
        first.extend_from_slice(&frame(FRAME_SETTINGS, 0, &[]));
        conn.writer().write_all(&first).expect("buffer preface");
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).expect("collect TLS output");
        }
        let last = last_record_start(&out);
        let mut w = &tcp;
        match flight {
            FirstFlight::Together => w.write_all(&out).expect("write first flight"),
            FirstFlight::Split => {
                w.write_all(&out[..last + 10]).expect("write first part");
                std::thread::sleep(Duration::from_millis(300));
                w.write_all(&out[last + 10..]).expect("write the rest");
            }
        }
        let mut tcp = tcp;
        let (off, early) = ktls::offload(conn, &mut tcp).expect("client offload");
        assert!(off.tx && off.rx);
        let rekey = secrets
            .take(&random, off.cipher, true)
            .expect("the handshake logged its traffic secrets");
        Client {
            stream: ktls::KtlsStream::new(tcp, early),
            buf: Vec::new(),
            rekey,
            followed: 0,
        }
    }

    fn fd(&self) -> i32 {
        self.stream.as_raw_fd()
    }

    /// Next frame (type, flags, payload); None at end of stream.
    fn frame(&mut self) -> Option<(u8, u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 9 {
                let len = usize::from(self.buf[0]) << 16
                    | usize::from(self.buf[1]) << 8
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let f: Vec<u8> = self.buf.drain(..9 + len).collect();
                    return Some((f[3], f[4], f[9..].to_vec()));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => match e
                    .get_ref()
                    .and_then(|e| e.downcast_ref::<ktls::KtlsError>())
                {
                    // ringtun's KeyUpdate: what follows it comes under its next key.
                    Some(&ktls::KtlsError::KeyUpdate { update_requested }) => {
                        let fd = self.fd();
                        ktls::follow_key_update(fd, &mut self.rekey, update_requested)
                            .expect("installing ringtun's next key");
                        self.followed += 1;
                    }
                    _ => panic!("reading from ringtun: {e}"),
                },
            }
        }
    }

    /// KeyUpdate with update_requested, then our next TX key (RFC 8446 section 4.6.3): what
    /// a TLS 1.3 peer such as ztunnel's rustls does when its key is worn.
    fn key_update(&mut self) {
        let fd = self.fd();
        ktls::send_key_update(fd, &mut self.rekey, true).expect("our KeyUpdate");
    }

    /// Reads frames until one of `ty` with `flags`; fails at end of stream.
    fn expect_frame(&mut self, ty: u8, flags: u8) -> Vec<u8> {
        loop {
            match self.frame() {
                Some((t, f, p)) if t == ty && f & FLAG_ACK == flags & FLAG_ACK => return p,
                Some(_) => {}
                None => panic!("ringtun ended the stream before frame type {ty}"),
            }
        }
    }

    /// PING with `payload`, then waits for its ACK: proof the connection still works.
    fn ping(&mut self, payload: [u8; 8]) {
        self.stream
            .write_all(&frame(FRAME_PING, 0, &payload))
            .expect("send PING");
        let back = self.expect_frame(FRAME_PING, FLAG_ACK);
        assert_eq!(back, payload, "PING ACK carries the PING's payload");
    }

    /// Reads until ringtun ends the connection (EOF or reset); fails if it does not.
    fn expect_closed(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
            assert!(
                Instant::now() < deadline,
                "ringtun kept the connection open"
            );
        }
    }
}

/// An HTTP/2 frame on stream 0.
fn frame(ty: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        ty,
        flags,
        0,
        0,
        0,
        0,
    ];
    f.extend_from_slice(payload);
    f
}

/// Offset of the last TLS record in a run of whole records.
fn last_record_start(tls: &[u8]) -> usize {
    let mut at = 0;
    let mut last = 0;
    while at + 5 <= tls.len() {
        last = at;
        at += 5 + usize::from(u16::from_be_bytes([tls[at + 3], tls[at + 4]]));
    }
    assert_eq!(at, tls.len(), "not whole records");
    last
}

#[test]
fn first_data_split_across_the_switch() {
    if !ktls_here("first_data_split_across_the_switch") {
        return;
    }
    let server = Server::start("krec-split");
    for flight in [FirstFlight::Split, FirstFlight::Together] {
        let mut c = Client::connect(&server, flight);
        // ringtun answers the preface: its SETTINGS, and the ACK of ours, which it could
        // only have read if no byte of the first data record was lost at the switch.
        c.expect_frame(FRAME_SETTINGS, 0);
        c.expect_frame(FRAME_SETTINGS, FLAG_ACK);
        c.ping(*b"switched");
    }
    let line = server.wait_line(&["kTLS: HBONE connection offloaded"]);
    assert!(line.contains("early="), "{line}");
    for l in server.text().lines().filter(|l| l.contains("kTLS")) {
        eprintln!("{l}");
    }
    // The split flight makes ringtun finish a half-read record before the kernel takes over.
    server.wait_line(&["finishing a record the handshake left half-read"]);
}

#[test]
fn session_ticket_is_skipped_and_close_notify_ends_cleanly() {
    if !ktls_here("session_ticket_is_skipped_and_close_notify_ends_cleanly") {
        return;
    }
    let server = Server::start("krec-ticket");
    let mut c = Client::connect(&server, FirstFlight::Together);
    c.expect_frame(FRAME_SETTINGS, 0);
    // A NewSessionTicket (handshake type 4): lifetime, age_add, nonce, ticket, extensions.
    let body = [0, 0, 0, 60, 1, 2, 3, 4, 1, 9, 0, 3, 7, 7, 7, 0, 0];
    let mut msg = vec![4, 0, 0, body.len() as u8];
    msg.extend_from_slice(&body);
    ktls::send_record(c.fd(), ktls::CONTENT_HANDSHAKE, &msg).expect("send ticket");
    c.ping(*b"tickets!");
    // close_notify: ringtun sees end of stream, closes its side with close_notify too.
    ktls::send_close_notify(c.fd()).expect("send close_notify");
    c.expect_closed();
    server.wait_line(&["kTLS: close_notify or FIN from the peer"]);
    let text = server.text();
    assert!(!text.contains("HBONE connection failed"), "{text}");
}

/// A peer's KeyUpdate, on each kind of kernel: where it can take new keys (Linux 6.14+,
/// `probe().rekey`) the client rekeys as a TLS 1.3 peer does, twice, and the same connection
/// goes on carrying traffic under the new keys both ways; before 6.14 that connection (only
/// that one) is closed with a log line naming the kernel's limit.
#[test]
fn key_update_is_followed_where_the_kernel_can_else_closes_only_that_connection() {
    if !ktls_here("key_update_is_followed_where_the_kernel_can_else_closes_only_that_connection") {
        return;
    }
    let server = Server::start("krec-ku");
    // Another offloaded connection on the same shard, open across the first one's KeyUpdate.
    let mut other = Client::connect(&server, FirstFlight::Together);
    other.expect_frame(FRAME_SETTINGS, 0);
    other.ping(*b"other!!!");
    let mut c = Client::connect(&server, FirstFlight::Together);
    c.expect_frame(FRAME_SETTINGS, 0);
    c.ping(*b"before!!");
    let cap = ktls::probe();
    if cap.rekey {
        for round in 1..=2u64 {
            c.key_update();
            // Our PING goes under our next key: ringtun must have installed our next key to
            // read it. Its ACK comes after ringtun's own KeyUpdate (the answer
            // update_requested asks for), under its next key, which the client reads only
            // with that key installed.
            c.ping(*b"rekeyed!");
            assert_eq!(
                c.followed, round,
                "ringtun answered each KeyUpdate with its own"
            );
            // Full-size records under the new keys: 16 KiB frames of a type HTTP/2 says to
            // ignore, then PINGs (each its own record) answered one by one.
            let big = frame(0xfa, 0, &vec![round as u8; 16_000]);
            for _ in 0..4 {
                c.stream.write_all(&big).expect("send a full record");
            }
            for i in 0..32u8 {
                c.ping([round as u8, i, 0, 0, 0, 0, 0, 1]);
            }
            // SETTINGS and its ACK, another frame type both ways.
            c.stream
                .write_all(&frame(FRAME_SETTINGS, 0, &[]))
                .expect("send SETTINGS");
            c.expect_frame(FRAME_SETTINGS, FLAG_ACK);
            let line = server.wait_line(&[
                "kTLS: followed the peer's TLS KeyUpdate",
                &format!("updates={round}"),
            ]);
            assert!(
                line.contains("update_requested=true") && line.contains("new TX key"),
                "{line}"
            );
        }
        assert_eq!(c.followed, 2);
        let text = server.text();
        assert!(
            !text.contains("peer sent a TLS KeyUpdate")
                && !text.contains("HBONE connection failed"),
            "{text}"
        );
    } else {
        // KeyUpdate (handshake type 24), update_requested, as a raw record: the client's
        // kernel cannot take a new key either. ringtun must stop at the KeyUpdate itself,
        // not at the records after it.
        ktls::send_record(
            c.fd(),
            ktls::CONTENT_HANDSHAKE,
            &ktls::key_update_message(true),
        )
        .expect("send");
        c.expect_closed();
        // What a kernel before 6.14 allows: the clear reason, naming the kernel's limit.
        let line = server.wait_line(&["peer sent a TLS KeyUpdate", "closed"]);
        assert!(line.contains("Linux 6.14"), "{line}");
        // The shard goes on: a new connection works.
        let mut c = Client::connect(&server, FirstFlight::Together);
        c.expect_frame(FRAME_SETTINGS, 0);
        c.ping(*b"after!!!");
    }
    // The other connection never noticed: same keys, still answering.
    other.ping(*b"still!!!");
    assert_eq!(other.followed, 0);
}

#[test]
fn fatal_alert_is_a_connection_error_naming_the_alert() {
    if !ktls_here("fatal_alert_is_a_connection_error_naming_the_alert") {
        return;
    }
    let server = Server::start("krec-alert");
    let mut c = Client::connect(&server, FirstFlight::Together);
    c.expect_frame(FRAME_SETTINGS, 0);
    ktls::send_alert(c.fd(), ktls::ALERT_LEVEL_FATAL, 80).expect("send alert");
    c.expect_closed();
    server.wait_line(&["HBONE connection failed", "internal_error"]);
}
