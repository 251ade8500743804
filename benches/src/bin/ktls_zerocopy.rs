//! ktls_zerocopy: with kernel TLS (kTLS) doing the encryption, does any zero-copy way of
//! handing bytes to the socket beat a plain write?
//!
//! Every run is a fresh loopback TCP connection on which rustls does a real TLS 1.3 handshake
//! (AES-128-GCM, certificates made in-process with rcgen, mutual auth as between two ringtuns),
//! after which `tls_kernel_offload::offload` hands both directions to the kernel. The client
//! end sends `--mib` MiB through its kTLS socket, in writes of `--sizes` bytes; the server end
//! reads with `recv_data` (kTLS RX) and compares every byte with the generated stream, so a
//! variant that drops, duplicates or garbles bytes fails the whole benchmark instead of
//! looking fast.
//!
//! Two shapes, each with its own baseline:
//!
//! - `buf` (bytes already in a user buffer, which is where h2 leaves a DATA frame):
//!   - `uring-send` — io_uring `IORING_OP_SEND` with `MSG_NOSIGNAL`, one op in flight: what
//!     monoio's `TcpStream::write` submits. **Baseline.**
//!   - `write` — blocking `send(2)`.
//!   - `uring-send-zc` — io_uring `IORING_OP_SEND_ZC` (kernel ≥ 6.0), waiting for the
//!     buffer-release notification of every send.
//!   - `msg-zerocopy` — `SO_ZEROCOPY` + `send(MSG_ZEROCOPY)`, completions read from the
//!     socket's error queue.
//!   - `sendfile` — `sendfile(2)` from a memfd holding the stream (page-cache pages go
//!     into the record without a user-space copy).
//!   - `sendfile-ro` — the same after `setsockopt(SOL_TLS, TLS_TX_ZEROCOPY_RO, 1)`.
//! - `sock` (bytes arriving on a plaintext TCP socket and leaving on the kTLS one: the shape
//!   of ringtun's outbound path, app socket in, HBONE socket out). A feeder thread writes the
//!   stream into a second loopback connection; a relay thread moves it to the kTLS socket:
//!   - `uring-recv-send` — io_uring `RECV` into a buffer of `size`, then `SEND`s of what
//!     arrived. **Baseline.**
//!   - `read-write` — the same with blocking `recv(2)` / `send(2)`.
//!   - `splice` — `splice(2)` socket → pipe → kTLS socket, pipe sized to `size`.
//!   - `uring-splice` — the same two splices as io_uring `IORING_OP_SPLICE` ops.
//!
//! Measured per run: throughput (first byte sent to last byte verified), CPU time of the
//! sending (or relaying) thread (`getrusage(RUSAGE_THREAD)`), and CPU time of the whole
//! machine (busy jiffies of `/proc/stat`: this catches work the kernel does elsewhere, e.g.
//! io_uring's io-wq workers, which run `IORING_OP_SPLICE`, and softirqs). The receiver's
//! decryption and comparison are in the machine figure for every variant alike. Variants
//! alternate run by run so drift hits all of them; the table gives medians.
//!
//! A variant the kernel refuses (an errno on the first send) is reported as such and not
//! retried. Needs a kernel with kTLS (`tls` module); the dev hosts have none, so run it in
//! the VM: `deploy/vm/bench-ktls-zerocopy.sh`. `--plain` skips TLS altogether (plain TCP) to
//! check the harness itself on any kernel; its numbers say nothing about kTLS.
//!
//! ```text
//! ktls_zerocopy [--sizes 16384,65536,262144] [--mib 32] [--reps 5] [--variants a,b,..]
//!               [--cipher aes128|aes256|chacha20] [--json FILE] [--plain]
//! ```

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use io_uring::{cqueue, opcode, types, IoUring};
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use serde::Serialize;
use tls_kernel_offload::{offload, probe, send_close_notify, Cipher, Corked, KtlsStream};

const MIB: usize = 1024 * 1024;
/// The stream repeats with this period. Not a power of two and not a multiple of any write
/// size, so a chunk delivered twice or skipped lands at an offset whose expected bytes differ.
const PERIOD: usize = 4 * MIB + 4093;
/// The pattern buffer is the period plus this much of its own start, so any slice of up to
/// this length at any offset is contiguous (no write is split at the wrap-around).
const TAIL: usize = MIB;
/// Receiver's read buffer.
const RECV_BUF: usize = 256 * 1024;
/// A run that takes longer than this is reported as hung and ends the benchmark.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// `IORING_CQE_F_NOTIF`: the CQE that says a SEND_ZC buffer may be reused (io-uring 0.6 has
/// the constant but no public helper for it).
const CQE_F_NOTIF: u32 = 8;
/// `TLS_TX_ZEROCOPY_RO` (linux/tls.h, since 5.19): "the pages given to sendfile are not
/// modified while in flight", which lets the kernel skip a copy. Missing from libc 0.2.
const TLS_TX_ZEROCOPY_RO: libc::c_int = 3;
/// `SO_EE_ORIGIN_ZEROCOPY` and `SO_EE_CODE_ZEROCOPY_COPIED` (linux/errqueue.h).
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

#[derive(Parser, Debug)]
#[command(about = "kTLS TX: plain writes against SEND_ZC, MSG_ZEROCOPY, sendfile and splice")]
struct Args {
    /// Bytes per write / splice / sendfile call.
    #[arg(long, value_delimiter = ',', default_value = "16384,65536,262144")]
    sizes: Vec<usize>,
    /// MiB sent per run.
    #[arg(long, default_value_t = 32)]
    mib: usize,
    /// Runs per variant and size.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Variants to run (default: all).
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// Write every run as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No TLS at all: plain TCP. Checks the harness on kernels without kTLS, and shows
    /// what the copies cost where no encryption hides them.
    #[arg(long)]
    plain: bool,
    /// TLS 1.3 cipher suite: aes128 (TLS13_AES_128_GCM_SHA256), aes256, chacha20.
    #[arg(long, default_value = "aes128", value_parser = parse_cipher)]
    cipher: Cipher,
}

fn parse_cipher(s: &str) -> Result<Cipher, String> {
    match s {
        "aes128" => Ok(Cipher::Aes128Gcm),
        "aes256" => Ok(Cipher::Aes256Gcm),
        "chacha20" => Ok(Cipher::Chacha20Poly1305),
        _ => Err(format!("unknown cipher {s:?} (aes128, aes256, chacha20)")),
    }
}

fn suite(c: Cipher) -> rustls::SupportedCipherSuite {
    match c {
        Cipher::Aes256Gcm => aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        Cipher::Chacha20Poly1305 => aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        _ => aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
    }
}

// ------------------------------------------------------------------ variants

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    UringSend,
    Write,
    UringSendZc,
    MsgZerocopy,
    Sendfile,
    SendfileRo,
    UringRecvSend,
    ReadWrite,
    Splice,
    UringSplice,
}

const ALL: [Variant; 10] = [
    Variant::UringSend,
    Variant::Write,
    Variant::UringSendZc,
    Variant::MsgZerocopy,
    Variant::Sendfile,
    Variant::SendfileRo,
    Variant::UringRecvSend,
    Variant::ReadWrite,
    Variant::Splice,
    Variant::UringSplice,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::UringSend => "uring-send",
            Variant::Write => "write",
            Variant::UringSendZc => "uring-send-zc",
            Variant::MsgZerocopy => "msg-zerocopy",
            Variant::Sendfile => "sendfile",
            Variant::SendfileRo => "sendfile-ro",
            Variant::UringRecvSend => "uring-recv-send",
            Variant::ReadWrite => "read-write",
            Variant::Splice => "splice",
            Variant::UringSplice => "uring-splice",
        }
    }

    /// Whether the bytes come from a plaintext socket (relay) rather than a buffer.
    fn relays(self) -> bool {
        matches!(
            self,
            Variant::UringRecvSend | Variant::ReadWrite | Variant::Splice | Variant::UringSplice
        )
    }

    /// The variant the ratios in the table are relative to.
    fn baseline(self) -> Variant {
        if self.relays() {
            Variant::UringRecvSend
        } else {
            Variant::UringSend
        }
    }

    fn parse(s: &str) -> Option<Variant> {
        ALL.iter().copied().find(|v| v.name() == s)
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ------------------------------------------------------------------ the stream

/// The bytes every run sends: xorshift output, repeating every [`PERIOD`] bytes.
struct Pattern {
    bytes: Vec<u8>,
}

impl Pattern {
    fn get() -> &'static Pattern {
        static P: OnceLock<Pattern> = OnceLock::new();
        P.get_or_init(|| {
            let mut bytes = ringtun_testbed::pattern(PERIOD);
            bytes.reserve(TAIL);
            bytes.extend_from_within(..TAIL);
            Pattern { bytes }
        })
    }

    /// The `len` stream bytes starting at stream offset `off` (`len` ≤ [`TAIL`]).
    fn at(&self, off: usize, len: usize) -> &[u8] {
        let start = off % PERIOD;
        &self.bytes[start..start + len]
    }
}

// ------------------------------------------------------------------ TLS set-up

struct Pki {
    roots: RootCertStore,
    server: (Vec<CertificateDer<'static>>, Vec<u8>),
    client: (Vec<CertificateDer<'static>>, Vec<u8>),
}

fn pki() -> io::Result<&'static Pki> {
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

fn tls_err(e: impl fmt::Display) -> io::Error {
    io::Error::other(format!("TLS set-up: {e}"))
}

fn configs(cipher: Cipher) -> io::Result<(Arc<ServerConfig>, Arc<ClientConfig>)> {
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

fn tcp_pair() -> io::Result<(TcpStream, TcpStream)> {
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
fn ktls_pair(tls: Option<Cipher>) -> io::Result<(TcpStream, TcpStream, Vec<u8>)> {
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

// ------------------------------------------------------------------ CPU accounting

fn thread_cpu() -> Duration {
    rusage(libc::RUSAGE_THREAD)
}

fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: getrusage fills the struct it is given; zeroed is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a live rusage.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Busy time of all CPUs so far (user, nice, system, irq, softirq, steal of `/proc/stat`).
fn machine_busy() -> io::Result<Duration> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let line = text
        .lines()
        .next()
        .filter(|l| l.starts_with("cpu "))
        .ok_or_else(|| io::Error::other("/proc/stat: no cpu line"))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let ticks = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

// ------------------------------------------------------------------ syscall helpers

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn send_nosig(fd: RawFd, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for its length.
        let r = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                flags | libc::MSG_NOSIGNAL,
            )
        };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn send_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = send_nosig(fd, buf, 0)?;
        buf = &buf[n..];
    }
    Ok(())
}

fn pipe(size: usize) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are fresh descriptors we own.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The pipe holds what one splice moves; the kernel rounds up to a power of two of pages.
    // SAFETY: plain fcntl on a descriptor we own.
    if unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r, w))
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: no offsets (both ends are sockets or pipes).
        let r = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// A memfd holding the pattern, for sendfile.
fn pattern_memfd() -> io::Result<OwnedFd> {
    // SAFETY: the name is a NUL-terminated literal.
    let fd = unsafe { libc::memfd_create(c"ktls-zerocopy".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(fd);
    f.write_all(&Pattern::get().bytes)?;
    Ok(f.into())
}

// ------------------------------------------------------------------ io_uring helpers

/// Runs one op to completion and returns its result; for SEND_ZC also waits for the
/// notification that the kernel is done with the buffer (the next send reuses the memory
/// region, and an honest comparison pays that wait).
fn uring_one(ring: &mut IoUring, sqe: io_uring::squeue::Entry) -> io::Result<i32> {
    // SAFETY: the buffers the SQE points at outlive this call, which waits for the
    // completion (and for SEND_ZC the buffer notification) before returning.
    unsafe {
        ring.submission()
            .push(&sqe)
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    }
    let mut result = None;
    let mut notif_due = false;
    loop {
        ring.submit_and_wait(1)?;
        for cqe in ring.completion() {
            if cqe.flags() & CQE_F_NOTIF != 0 {
                notif_due = false;
                continue;
            }
            result = Some(cqe.result());
            notif_due = cqueue::more(cqe.flags());
        }
        if let Some(r) = result {
            if !notif_due {
                return if r < 0 {
                    Err(io::Error::from_raw_os_error(-r))
                } else {
                    Ok(r)
                };
            }
        }
    }
}

// ------------------------------------------------------------------ senders

/// What the sending (or relaying) thread reports.
struct SendReport {
    cpu: Duration,
    /// Zero-copy completions the kernel reported as copied after all (MSG_ZEROCOPY).
    copied: u64,
    zc_done: u64,
}

fn send_buf(variant: Variant, fd: RawFd, total: usize, size: usize) -> io::Result<SendReport> {
    let pat = Pattern::get();
    let cpu0 = thread_cpu();
    let mut copied = 0;
    let mut zc_done = 0;
    match variant {
        Variant::Write => {
            let mut off = 0;
            while off < total {
                off += send_nosig(fd, pat.at(off, size.min(total - off)), 0)?;
            }
        }
        Variant::UringSend | Variant::UringSendZc => {
            let mut ring = IoUring::new(8)?;
            let mut off = 0;
            while off < total {
                let buf = pat.at(off, size.min(total - off));
                let sqe = if variant == Variant::UringSendZc {
                    opcode::SendZc::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                } else {
                    opcode::Send::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                };
                off += uring_one(&mut ring, sqe)? as usize;
            }
        }
        Variant::MsgZerocopy => {
            let one: libc::c_int = 1;
            // SAFETY: valid pointer and length for an int option.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_ZEROCOPY,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("setsockopt SO_ZEROCOPY: {e}"),
                ));
            }
            let mut off = 0;
            let mut sent_calls: u64 = 0;
            while off < total {
                match send_nosig(fd, pat.at(off, size.min(total - off)), libc::MSG_ZEROCOPY) {
                    Ok(n) => {
                        off += n;
                        sent_calls += 1;
                    }
                    // Too many sends in flight for optmem_max: wait for completions.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) && zc_done < sent_calls => {
                        reap_zerocopy(fd, true, &mut zc_done, &mut copied)?;
                    }
                    Err(e) => return Err(e),
                }
                reap_zerocopy(fd, false, &mut zc_done, &mut copied)?;
            }
            // The pattern is never modified, so waiting here is only for accounting: the
            // completions must all arrive, or the kernel would still hold the pages.
            let deadline = Instant::now() + Duration::from_secs(30);
            while zc_done < sent_calls && Instant::now() < deadline {
                reap_zerocopy(fd, true, &mut zc_done, &mut copied)?;
            }
        }
        Variant::Sendfile | Variant::SendfileRo => {
            if variant == Variant::SendfileRo {
                let one: libc::c_int = 1;
                // SAFETY: valid pointer and length for an int option.
                let r = unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_TLS,
                        TLS_TX_ZEROCOPY_RO,
                        (&one as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if r != 0 {
                    let e = io::Error::last_os_error();
                    return Err(io::Error::new(
                        e.kind(),
                        format!("setsockopt TLS_TX_ZEROCOPY_RO: {e}"),
                    ));
                }
            }
            let file = pattern_memfd()?;
            let mut off = 0;
            while off < total {
                let mut foff = (off % PERIOD) as libc::off_t;
                // SAFETY: both descriptors are open; foff is a valid in/out offset.
                let r = unsafe {
                    libc::sendfile(fd, file.as_raw_fd(), &mut foff, size.min(total - off))
                };
                match cvt(r) {
                    Ok(0) => return Err(io::Error::other("sendfile returned 0")),
                    Ok(n) => off += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        _ => {
            return Err(io::Error::other(format!(
                "{variant} is not a buffer variant"
            )))
        }
    }
    Ok(SendReport {
        cpu: thread_cpu() - cpu0,
        copied,
        zc_done,
    })
}

/// Reads MSG_ZEROCOPY completions from the error queue; `wait` polls for one first.
fn reap_zerocopy(fd: RawFd, wait: bool, done: &mut u64, copied: &mut u64) -> io::Result<()> {
    if wait {
        let mut pfd = libc::pollfd {
            fd,
            events: 0, // POLLERR is always reported
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 100) };
    }
    loop {
        let mut control = [0u64; 16];
        // SAFETY: zeroed msghdr is valid; we fill in the control buffer.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: msg points at live buffers.
        let r = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(());
            }
            return Err(e);
        }
        // SAFETY: the kernel filled msg's control buffer; CMSG_* walk it within its length.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let ee = libc::CMSG_DATA(c) as *const libc::sock_extended_err;
                let ee = std::ptr::read_unaligned(ee);
                if ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY && ee.ee_errno == 0 {
                    // [ee_info, ee_data] is an inclusive range of send calls.
                    let n = u64::from(ee.ee_data.wrapping_sub(ee.ee_info)) + 1;
                    *done += n;
                    if ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0 {
                        *copied += n;
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
    }
}

fn relay(variant: Variant, src: RawFd, dst: RawFd, size: usize) -> io::Result<SendReport> {
    let cpu0 = thread_cpu();
    match variant {
        Variant::ReadWrite => {
            let mut buf = vec![0u8; size];
            loop {
                // SAFETY: buf is valid for its length.
                let r = unsafe { libc::recv(src, buf.as_mut_ptr().cast(), buf.len(), 0) };
                match cvt(r) {
                    Ok(0) => break,
                    Ok(n) => send_all(dst, &buf[..n])?,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Variant::UringRecvSend => {
            let mut ring = IoUring::new(8)?;
            let mut buf = vec![0u8; size];
            loop {
                let sqe =
                    opcode::Recv::new(types::Fd(src), buf.as_mut_ptr(), buf.len() as u32).build();
                let n = uring_one(&mut ring, sqe)? as usize;
                if n == 0 {
                    break;
                }
                let mut done = 0;
                while done < n {
                    let part = &buf[done..n];
                    let sqe = opcode::Send::new(types::Fd(dst), part.as_ptr(), part.len() as u32)
                        .flags(libc::MSG_NOSIGNAL)
                        .build();
                    done += uring_one(&mut ring, sqe)? as usize;
                }
            }
        }
        Variant::Splice | Variant::UringSplice => {
            let (pr, pw) = pipe(size)?;
            let mut ring = if variant == Variant::UringSplice {
                Some(IoUring::new(8)?)
            } else {
                None
            };
            let mut move_bytes = |from: RawFd, to: RawFd, len: usize| -> io::Result<usize> {
                match ring.as_mut() {
                    Some(ring) => {
                        let sqe =
                            opcode::Splice::new(types::Fd(from), -1, types::Fd(to), -1, len as u32)
                                .flags(libc::SPLICE_F_MOVE)
                                .build();
                        Ok(uring_one(ring, sqe)? as usize)
                    }
                    None => splice(from, to, len),
                }
            };
            loop {
                let n = move_bytes(src, pw.as_raw_fd(), size)?;
                if n == 0 {
                    break;
                }
                let mut left = n;
                while left > 0 {
                    let m = move_bytes(pr.as_raw_fd(), dst, left)?;
                    if m == 0 {
                        return Err(io::Error::other("splice into the socket moved 0 bytes"));
                    }
                    left -= m;
                }
            }
        }
        _ => {
            return Err(io::Error::other(format!(
                "{variant} is not a relay variant"
            )))
        }
    }
    Ok(SendReport {
        cpu: thread_cpu() - cpu0,
        copied: 0,
        zc_done: 0,
    })
}

// ------------------------------------------------------------------ receiver

/// Reads until end of stream and checks every byte against the pattern. Returns the byte
/// count and the offset of the first mismatch, if any.
fn receive(sock: TcpStream, early: Vec<u8>, plain: bool) -> io::Result<(usize, Option<usize>)> {
    let pat = Pattern::get();
    let mut buf = vec![0u8; RECV_BUF];
    let mut got = 0usize;
    let mut bad = None;
    let mut check = |data: &[u8], got: &mut usize| {
        if bad.is_none() && data != pat.at(*got, data.len()) {
            let first = data
                .iter()
                .zip(pat.at(*got, data.len()))
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            bad = Some(*got + first);
        }
        *got += data.len();
    };
    if plain {
        let mut sock = sock;
        loop {
            let n = sock.read(&mut buf)?;
            if n == 0 {
                break;
            }
            check(&buf[..n], &mut got);
        }
    } else {
        let mut s = KtlsStream::new(sock, early);
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            check(&buf[..n], &mut got);
        }
    }
    Ok((got, bad))
}

// ------------------------------------------------------------------ one run

#[derive(Serialize, Clone, Debug)]
struct RunResult {
    variant: &'static str,
    size: usize,
    rep: usize,
    bytes: usize,
    /// Set when the kernel refused the variant (nothing measured).
    error: Option<String>,
    secs: f64,
    mib_per_s: f64,
    /// CPU seconds per GiB of the sending or relaying thread.
    sender_cpu_s_per_gib: f64,
    /// CPU seconds per GiB of the whole machine (all CPUs busy time).
    machine_cpu_s_per_gib: f64,
    zerocopy_completions: u64,
    zerocopy_copied: u64,
}

fn run_once(
    variant: Variant,
    size: usize,
    total: usize,
    tls: Option<Cipher>,
) -> io::Result<RunResult> {
    let plain = tls.is_none();
    let (sender, receiver, early) = ktls_pair(tls)?;
    let (rx_tx, rx_rx) = mpsc::channel();
    let rx = thread::spawn(move || {
        let r = receive(receiver, early, plain);
        let _ = rx_tx.send(Instant::now());
        r
    });
    // The plaintext source for relay variants: a feeder writing the stream into a second
    // loopback connection, at least as fast as any relay moves it.
    let source = if variant.relays() {
        let (mut feed, relay_in) = tcp_pair()?;
        let feeder = thread::spawn(move || -> io::Result<()> {
            let pat = Pattern::get();
            let mut off = 0;
            while off < total {
                let n = (256 * 1024).min(total - off);
                feed.write_all(pat.at(off, n))?;
                off += n;
            }
            feed.shutdown(Shutdown::Write)
        });
        Some((relay_in, feeder))
    } else {
        None
    };

    let busy0 = machine_busy()?;
    let t0 = Instant::now();
    let sfd = sender.as_raw_fd();
    let relay_fd = source.as_ref().map(|(s, _)| s.as_raw_fd());
    let tx = thread::spawn(move || -> io::Result<SendReport> {
        let r = match relay_fd {
            Some(src) => relay(variant, src, sfd, size),
            None => send_buf(variant, sfd, total, size),
        };
        if !plain {
            // The end of the TLS stream; the receiver's recv_data reads it as EOF.
            let _ = send_close_notify(sfd);
        }
        // SAFETY: shutdown on a descriptor the caller keeps open until this thread ends.
        unsafe { libc::shutdown(sfd, libc::SHUT_WR) };
        r
    });
    let sent = tx
        .join()
        .map_err(|_| io::Error::other("sender thread panicked"))?;
    let done_at = rx_rx
        .recv_timeout(RUN_TIMEOUT)
        .map_err(|_| io::Error::other(format!("{variant}/{size}: receiver hung")))?;
    let busy1 = machine_busy()?;
    let (got, bad) = rx
        .join()
        .map_err(|_| io::Error::other("receiver thread panicked"))??;
    if let Some((relay_in, feeder)) = source {
        drop(relay_in);
        // A refused relay variant leaves the feeder writing into a closed socket.
        let _ = feeder.join();
    }
    drop(sender);

    let secs = done_at.duration_since(t0).as_secs_f64();
    let gib = total as f64 / (1024.0 * MIB as f64);
    let mut r = RunResult {
        variant: variant.name(),
        size,
        rep: 0,
        bytes: got,
        error: None,
        secs,
        mib_per_s: total as f64 / MIB as f64 / secs,
        sender_cpu_s_per_gib: 0.0,
        machine_cpu_s_per_gib: busy1.saturating_sub(busy0).as_secs_f64() / gib,
        zerocopy_completions: 0,
        zerocopy_copied: 0,
    };
    match sent {
        Err(e) => {
            r.error = Some(e.to_string());
            return Ok(r);
        }
        Ok(s) => {
            r.sender_cpu_s_per_gib = s.cpu.as_secs_f64() / gib;
            r.zerocopy_completions = s.zc_done;
            r.zerocopy_copied = s.copied;
        }
    }
    if let Some(at) = bad {
        return Err(io::Error::other(format!(
            "{variant}/{size}: CORRUPT: byte {at} differs from what was sent"
        )));
    }
    if got != total {
        return Err(io::Error::other(format!(
            "{variant}/{size}: CORRUPT: received {got} bytes, sent {total}"
        )));
    }
    Ok(r)
}

// ------------------------------------------------------------------ report

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

struct Cell {
    mibs: f64,
    min: f64,
    max: f64,
    sender: f64,
    machine: f64,
}

fn cell(results: &[RunResult], v: Variant, size: usize) -> Option<Cell> {
    let rs: Vec<&RunResult> = results
        .iter()
        .filter(|r| r.variant == v.name() && r.size == size && r.error.is_none())
        .collect();
    if rs.is_empty() {
        return None;
    }
    let tp: Vec<f64> = rs.iter().map(|r| r.mib_per_s).collect();
    Some(Cell {
        min: tp.iter().copied().fold(f64::INFINITY, f64::min),
        max: tp.iter().copied().fold(0.0, f64::max),
        mibs: median(tp),
        sender: median(rs.iter().map(|r| r.sender_cpu_s_per_gib).collect()),
        machine: median(rs.iter().map(|r| r.machine_cpu_s_per_gib).collect()),
    })
}

fn print_table(results: &[RunResult], variants: &[Variant], sizes: &[usize]) {
    println!();
    println!("| size | variant | MiB/s median (min..max) | × baseline | sender CPU s/GiB | × baseline | machine CPU s/GiB | × baseline |");
    println!("|---|---|---|---|---|---|---|---|");
    for &size in sizes {
        for &v in variants {
            let label = if v == v.baseline() {
                format!("**{v}** (baseline)")
            } else {
                v.to_string()
            };
            let Some(c) = cell(results, v, size) else {
                let why = results
                    .iter()
                    .find(|r| r.variant == v.name() && r.size == size)
                    .and_then(|r| r.error.clone())
                    .unwrap_or_else(|| "not run".into());
                println!(
                    "| {} KiB | {label} | refused: {why} | | | | | |",
                    size / 1024
                );
                continue;
            };
            let base = cell(results, v.baseline(), size);
            let ratio = |x: f64, b: Option<f64>| match b {
                Some(b) if b > 0.0 => format!("{:.2}", x / b),
                _ => "–".into(),
            };
            println!(
                "| {} KiB | {label} | {:.1} ({:.1}..{:.1}) | {} | {:.2} | {} | {:.2} | {} |",
                size / 1024,
                c.mibs,
                c.min,
                c.max,
                ratio(c.mibs, base.as_ref().map(|b| b.mibs)),
                c.sender,
                ratio(c.sender, base.as_ref().map(|b| b.sender)),
                c.machine,
                ratio(c.machine, base.as_ref().map(|b| b.machine)),
            );
        }
    }
}

// ------------------------------------------------------------------ main

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("ktls_zerocopy: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> io::Result<()> {
    let variants: Vec<Variant> = if args.variants.is_empty() {
        ALL.to_vec()
    } else {
        args.variants
            .iter()
            .map(|s| {
                Variant::parse(s).ok_or_else(|| {
                    let names: Vec<&str> = ALL.iter().map(|v| v.name()).collect();
                    io::Error::other(format!("unknown variant {s:?}; known: {}", names.join(",")))
                })
            })
            .collect::<io::Result<_>>()?
    };
    if let Some(&s) = args.sizes.iter().find(|&&s| s == 0 || s > TAIL) {
        return Err(io::Error::other(format!(
            "size {s} out of range (1..={TAIL})"
        )));
    }
    let tls = (!args.plain).then_some(args.cipher);
    // TLS_TX_ZEROCOPY_RO is a SOL_TLS option: plain TCP has none.
    let variants: Vec<Variant> = variants
        .into_iter()
        .filter(|&v| tls.is_some() || v != Variant::SendfileRo)
        .collect();
    if let Some(cipher) = tls {
        let cap = probe();
        if !cap.can_offload(cipher) {
            return Err(io::Error::other(format!(
                "needs kTLS with {cipher} ({cap}); run it in the VM: deploy/vm/bench-ktls-zerocopy.sh (or --plain to check the harness)"
            )));
        }
        println!("{cap}");
    }
    let total = args.mib * MIB;
    println!(
        "kernel {}, {} MiB per run, {} reps, sizes {:?}{}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        args.mib,
        args.reps,
        args.sizes,
        match tls {
            Some(c) => format!(", kTLS {c}"),
            None => ", PLAIN TCP (no TLS)".into(),
        }
    );
    // Warm-up: module loading, crypto tfm allocation, page cache of the binary.
    run_once(Variant::Write, 64 * 1024, 4 * MIB, tls)?;

    let mut results: Vec<RunResult> = Vec::new();
    let mut refused: Vec<(Variant, usize)> = Vec::new();
    for rep in 0..args.reps {
        for &size in &args.sizes {
            for &v in &variants {
                if refused.contains(&(v, size)) {
                    continue;
                }
                let mut r = run_once(v, size, total, tls)?;
                r.rep = rep;
                match &r.error {
                    Some(e) => {
                        println!("{v:>16} {:>4} KiB  refused: {e}", size / 1024);
                        refused.push((v, size));
                    }
                    None => println!(
                        "{v:>16} {:>4} KiB  rep {rep}  {:8.1} MiB/s  sender {:6.2} s/GiB  machine {:6.2} s/GiB{}",
                        size / 1024,
                        r.mib_per_s,
                        r.sender_cpu_s_per_gib,
                        r.machine_cpu_s_per_gib,
                        if r.zerocopy_completions > 0 {
                            format!(
                                "  zerocopy completions {} (copied {})",
                                r.zerocopy_completions, r.zerocopy_copied
                            )
                        } else {
                            String::new()
                        }
                    ),
                }
                results.push(r);
            }
        }
    }
    print_table(&results, &variants, &args.sizes);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&results).map_err(io::Error::other)?;
        std::fs::write(path, text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant moves a stream intact over plain TCP on any kernel, and the receiver
    /// catches a stream that is not the pattern.
    #[test]
    fn every_variant_delivers_intact_over_plain_tcp() {
        // TLS_TX_ZEROCOPY_RO is a SOL_TLS option: plain TCP has none.
        for v in ALL.into_iter().filter(|&v| v != Variant::SendfileRo) {
            let r = run_once(v, 64 * 1024, 3 * MIB + 17, None).expect("run");
            assert!(r.error.is_none(), "{v}: {:?}", r.error);
            assert_eq!(r.bytes, 3 * MIB + 17, "{v}");
        }
    }

    #[test]
    fn receiver_detects_corruption() {
        let (mut a, b) = tcp_pair().expect("pair");
        let rx = thread::spawn(move || receive(b, Vec::new(), true));
        let mut data = Pattern::get().at(0, 100_000).to_vec();
        data[77_777] ^= 1;
        a.write_all(&data).expect("write");
        drop(a);
        let (got, bad) = rx.join().expect("join").expect("receive");
        assert_eq!(got, 100_000);
        assert_eq!(bad, Some(77_777));
    }

    #[test]
    fn pattern_slices_are_contiguous_across_the_period() {
        let p = Pattern::get();
        assert_eq!(
            p.at(PERIOD - 3, 6),
            &[p.at(PERIOD - 3, 3), p.at(0, 3)].concat()[..]
        );
    }
}
