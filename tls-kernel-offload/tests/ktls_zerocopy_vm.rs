//! What the kernel does with zero-copy sends on a kTLS TX socket: the facts behind
//! ARCHITECTURE.md "Zero copy with kTLS (measured)" and `benches/src/bin/ktls_zerocopy/`.
//!
//! - `send(MSG_ZEROCOPY)` and io_uring `SEND_ZC` are refused with `EOPNOTSUPP` (software
//!   kTLS accepts only `MSG_MORE | MSG_DONTWAIT | MSG_NOSIGNAL` and internal flags), and the
//!   refusal leaves the connection usable: a plain write afterwards arrives intact.
//! - `splice` from a pipe and `sendfile` from a memfd into the kTLS socket work, and the
//!   receiver (kTLS RX) gets exactly the bytes.
//!
//! If a kernel ever accepts the zero-copy flags, these tests fail on purpose: re-run
//! `deploy/vm/bench-ktls-zerocopy.sh` and revisit the decision. Like `ktls_vm.rs` they skip
//! without kTLS unless `RINGTUN_EXPECT_KTLS=1` (set by `deploy/vm/test-ktls.sh`).
#![cfg(target_os = "linux")]

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use rustls::crypto::aws_lc_rs;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use sha2::{Digest, Sha256};
use tls_kernel_offload::{
    get_tls_tx_rx, offload, probe, send_close_notify, Cipher, Corked, KtlsStream,
};

const IO_TIMEOUT: Duration = Duration::from_secs(120);

fn require_ktls() -> bool {
    let cap = probe();
    if cap.can_offload(Cipher::Aes128Gcm) {
        return true;
    }
    if std::env::var("RINGTUN_EXPECT_KTLS").is_ok_and(|v| v == "1") {
        panic!("RINGTUN_EXPECT_KTLS=1 but {cap}");
    }
    eprintln!("skipping (set RINGTUN_EXPECT_KTLS=1 to make this fail): {cap}");
    false
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

struct Pki {
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["server.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        Pki {
            roots,
            chain: vec![cert.der().clone()],
            key: key.serialize_der(),
        }
    })
}

/// A loopback TCP pair after a TLS 1.3 AES-128-GCM handshake, both ends offloaded:
/// (sender, receiver as a `KtlsStream`).
fn offloaded_pair() -> (TcpStream, KtlsStream<TcpStream>) {
    let pki = pki();
    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites = vec![aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256];
    let provider = Arc::new(provider);
    let mut scfg = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            pki.chain.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key.clone())),
        )
        .unwrap();
    scfg.enable_secret_extraction = true;
    scfg.send_tls13_tickets = 0;
    let mut ccfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(pki.roots.clone())
        .with_no_client_auth();
    ccfg.enable_secret_extraction = true;

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let scfg = Arc::new(scfg);
    let server = thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut conn = ServerConnection::new(scfg).unwrap();
        let mut io = Corked::new(&tcp);
        while conn.is_handshaking() {
            conn.complete_io(&mut io).unwrap();
        }
        let (_, early) = offload(conn, &mut tcp).unwrap();
        KtlsStream::new(tcp, early)
    });
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let name = ServerName::try_from("server.test").unwrap();
    let mut conn = ClientConnection::new(Arc::new(ccfg), name).unwrap();
    {
        let mut io = Corked::new(&tcp);
        while conn.is_handshaking() {
            conn.complete_io(&mut io).unwrap();
        }
        while conn.wants_write() {
            conn.write_tls(&mut io).unwrap();
        }
    }
    let (off, _) = offload(conn, &mut tcp).unwrap();
    assert!(off.tx && off.rx, "offload: {off:?}");
    let (tx, _) = get_tls_tx_rx(tcp.as_raw_fd()).unwrap();
    assert_eq!(
        tx.cipher,
        Some(Cipher::Aes128Gcm),
        "TLS_TX on the sender: {tx:?}"
    );
    (tcp, server.join().unwrap())
}

fn payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Ends the TLS stream and the sending direction.
fn finish(sender: &TcpStream) {
    send_close_notify(sender.as_raw_fd()).unwrap();
    sender.shutdown(Shutdown::Write).unwrap();
}

fn read_to_end(mut r: KtlsStream<TcpStream>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).unwrap() {
            0 => return out,
            n => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: valid pointer and length for an int option.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[test]
fn msg_zerocopy_is_refused_and_the_connection_survives() {
    if !require_ktls() {
        return;
    }
    let (mut sender, receiver) = offloaded_pair();
    let rx = thread::spawn(move || read_to_end(receiver));
    let fd = sender.as_raw_fd();
    // SO_ZEROCOPY is a socket-level flag: the TLS ULP does not intercept it.
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ZEROCOPY, 1).unwrap();
    let data = payload(256 * 1024);
    // SAFETY: data is valid for its length.
    let r = unsafe {
        libc::send(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_ZEROCOPY | libc::MSG_NOSIGNAL,
        )
    };
    let err = io::Error::last_os_error();
    assert!(
        r < 0 && err.raw_os_error() == Some(libc::EOPNOTSUPP),
        "kernel {} answered send(MSG_ZEROCOPY) on a kTLS socket with {r} ({err}); \
         expected EOPNOTSUPP: re-measure with deploy/vm/bench-ktls-zerocopy.sh",
        kernel()
    );
    sender.write_all(&data).unwrap();
    finish(&sender);
    let got = rx.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert_eq!(sha(&got), sha(&data));
}

#[test]
fn io_uring_send_zc_is_refused_and_the_connection_survives() {
    if !require_ktls() {
        return;
    }
    let (mut sender, receiver) = offloaded_pair();
    let rx = thread::spawn(move || read_to_end(receiver));
    let data = payload(256 * 1024);
    let mut ring = io_uring::IoUring::new(4).unwrap();
    let sqe = io_uring::opcode::SendZc::new(
        io_uring::types::Fd(sender.as_raw_fd()),
        data.as_ptr(),
        data.len() as u32,
    )
    .flags(libc::MSG_NOSIGNAL)
    .build();
    // SAFETY: `data` outlives the op: we wait for its completion (and any notification).
    unsafe { ring.submission().push(&sqe).unwrap() };
    let mut result = None;
    let mut notif_due = false;
    while result.is_none() || notif_due {
        ring.submit_and_wait(1).unwrap();
        for cqe in ring.completion() {
            // IORING_CQE_F_NOTIF
            if cqe.flags() & 8 != 0 {
                notif_due = false;
            } else {
                result = Some(cqe.result());
                notif_due = io_uring::cqueue::more(cqe.flags());
            }
        }
    }
    let res = result.unwrap_or(0);
    assert_eq!(
        res,
        -libc::EOPNOTSUPP,
        "kernel {} answered IORING_OP_SEND_ZC on a kTLS socket with {res}; expected \
         -EOPNOTSUPP: re-measure with deploy/vm/bench-ktls-zerocopy.sh",
        kernel()
    );
    sender.write_all(&data).unwrap();
    finish(&sender);
    let got = rx.join().unwrap();
    assert_eq!(sha(&got), sha(&data));
}

#[test]
fn splice_and_sendfile_into_ktls_deliver_intact() {
    if !require_ktls() {
        return;
    }
    let (sender, receiver) = offloaded_pair();
    let rx = thread::spawn(move || read_to_end(receiver));
    let fd = sender.as_raw_fd();
    let spliced = payload(300_000);

    // pipe → kTLS socket: a writer thread fills the pipe while this one splices it out.
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors from pipe2, owned from here on.
    let (pr, pw) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let src = spliced.clone();
    let writer = thread::spawn(move || {
        let mut w = std::fs::File::from(pw);
        w.write_all(&src).unwrap();
    });
    let mut moved = 0;
    while moved < spliced.len() {
        // SAFETY: no offsets; both descriptors are open.
        let n = unsafe {
            libc::splice(
                pr.as_raw_fd(),
                std::ptr::null_mut(),
                fd,
                std::ptr::null_mut(),
                spliced.len() - moved,
                libc::SPLICE_F_MOVE,
            )
        };
        assert!(n > 0, "splice into kTLS: {}", io::Error::last_os_error());
        moved += n as usize;
    }
    writer.join().unwrap();

    // memfd → kTLS socket with sendfile.
    let filed = payload(200_000);
    // SAFETY: NUL-terminated name.
    let mfd = unsafe { libc::memfd_create(c"ktls-zc-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(mfd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: fresh descriptor from memfd_create.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(mfd) });
    file.write_all(&filed).unwrap();
    let mut off: libc::off_t = 0;
    while (off as usize) < filed.len() {
        // SAFETY: both descriptors are open; off is a valid in/out offset.
        let n =
            unsafe { libc::sendfile(fd, file.as_raw_fd(), &mut off, filed.len() - off as usize) };
        assert!(n > 0, "sendfile into kTLS: {}", io::Error::last_os_error());
    }
    finish(&sender);

    let got = rx.join().unwrap();
    let want = [spliced, filed].concat();
    assert_eq!(got.len(), want.len());
    assert_eq!(sha(&got), sha(&want));
}
