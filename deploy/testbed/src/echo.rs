//! Sockets inside a namespace: listeners and connections made from a thread that joined it,
//! and an echo server that records what it saw.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::netns::Netns;

/// Socket timeouts of clients and servers made here: a hang fails the caller instead of
/// stalling it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds a listener inside `ns` (the socket stays in the namespace afterwards).
pub fn bind_in(ns: &Netns, addr: &str) -> Result<TcpListener> {
    ns.enter(|| TcpListener::bind(addr))?
        .map_err(Error::io(format!("binding {addr} in {}", ns.name())))
}

/// Connects to `dst` from inside `ns`, with a timeout, and sets [`IO_TIMEOUT`] on the socket.
pub fn connect_in(ns: &Netns, dst: &str) -> std::io::Result<TcpStream> {
    let dst = dst.to_owned();
    ns.enter(move || {
        let addr = dst
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("no address in {dst}")))?;
        let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        with_timeouts(s)
    })
    .map_err(std::io::Error::other)?
}

/// What an echo through `dst` from `ns` gives back for one small write: 0 when the connection
/// was refused, reset or closed without an echo (what a test expects of a connection that
/// must not be carried), else the bytes echoed. Waits at most 10 s for the answer.
pub fn echoed_bytes(ns: &Netns, dst: &str) -> usize {
    use std::io::{Read, Write};
    let Ok(mut s) = connect_in(ns, dst) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let _ = s.write_all(b"hello");
    let mut buf = [0u8; 16];
    s.read(&mut buf).unwrap_or(0)
}

/// Connects to `dst` from inside `ns` with SO_MARK `mark` set before connecting: with the
/// ringtun mark this bypasses the namespace's outbound capture, like a client outside the mesh.
pub fn connect_marked_in(ns: &Netns, dst: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    ns.enter(move || {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(dst),
            socket2::Type::STREAM,
            None,
        )?;
        s.set_mark(mark)?;
        s.connect(&dst.into())?;
        with_timeouts(s.into())
    })
    .map_err(std::io::Error::other)?
}

fn with_timeouts(s: TcpStream) -> std::io::Result<TcpStream> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// What an echo server saw on one connection.
#[derive(Clone, Debug)]
pub struct EchoRecord {
    /// The client address as the server saw it.
    pub peer: SocketAddr,
    /// The address the client reached.
    pub local: SocketAddr,
    /// Bytes received (and echoed).
    pub bytes: u64,
    /// SHA-256 of the bytes received, hex (empty for a [`EchoServer::start_unhashed`] one).
    pub sha256: String,
    /// The error that ended the connection, if it did not end with EOF.
    pub error: Option<ErrorKind>,
}

/// Records shared between an echo server's threads and its owner.
#[derive(Default)]
pub struct Records {
    list: Mutex<Vec<EchoRecord>>,
    changed: Condvar,
}

impl Records {
    fn push(&self, r: EchoRecord) {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).push(r);
        self.changed.notify_all();
    }

    /// All records so far.
    pub fn all(&self) -> Vec<EchoRecord> {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until there are at least `n` records; returns how many there are.
    pub fn wait_count(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        while list.len() < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            list = self
                .changed
                .wait_timeout(list, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        list.len()
    }

    /// Waits until some record satisfies `pred` (which must not touch these records: the lock
    /// is held while it runs).
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&EchoRecord) -> bool,
    ) -> Option<EchoRecord> {
        let deadline = Instant::now() + timeout;
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = list.iter().find(|r| pred(r)) {
                return Some(r.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            list = self
                .changed
                .wait_timeout(list, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A TCP echo server running in a namespace: it echoes every byte, half-closes after the
/// client's EOF and records what it saw. Its threads live until the process exits.
pub struct EchoServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// Per-connection records, added when a connection ends.
    pub records: Arc<Records>,
}

impl EchoServer {
    /// Binds `addr` inside `ns` and starts serving; every record carries the SHA-256 of what
    /// the connection carried.
    pub fn start(ns: &Netns, addr: &str) -> Result<EchoServer> {
        Self::serve(ns, addr, true)
    }

    /// [`EchoServer::start`] without hashing, for throughput measurements where the echo
    /// server's CPU should not limit the tunnel.
    pub fn start_unhashed(ns: &Netns, addr: &str) -> Result<EchoServer> {
        Self::serve(ns, addr, false)
    }

    fn serve(ns: &Netns, addr: &str, hash: bool) -> Result<EchoServer> {
        let records = Arc::new(Records::default());
        let recs = records.clone();
        let addr = serve_in(ns, addr, move |conn| echo_one(conn, &recs, hash))?;
        Ok(EchoServer { addr, records })
    }
}

/// Serves `addr` inside `ns`: every accepted connection goes to `handle` on a thread of its
/// own. The threads live until the process exits. Returns the bound address.
pub fn serve_in(
    ns: &Netns,
    addr: &str,
    handle: impl Fn(TcpStream) + Send + Sync + 'static,
) -> Result<SocketAddr> {
    let listener = bind_in(ns, addr)?;
    let bound = listener
        .local_addr()
        .map_err(Error::io(format!("address of the listener on {addr}")))?;
    let handle = Arc::new(handle);
    std::thread::Builder::new()
        .name(format!("serve {bound}"))
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let handle = handle.clone();
                std::thread::spawn(move || handle(conn));
            }
        })
        .map_err(Error::io(format!("spawning the server on {bound}")))?;
    Ok(bound)
}

fn echo_one(mut conn: TcpStream, recs: &Records, hash: bool) {
    let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
    let peer = conn.peer_addr().unwrap_or(unspecified);
    let local = conn.local_addr().unwrap_or(unspecified);
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let error = loop {
        match conn.read(&mut buf) {
            Ok(0) => break None,
            Ok(k) => {
                if hash {
                    h.update(&buf[..k]);
                }
                n += k as u64;
                if let Err(e) = conn.write_all(&buf[..k]) {
                    break Some(e.kind());
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => break Some(e.kind()),
        }
    };
    if error.is_none() {
        let _ = conn.shutdown(Shutdown::Write);
    }
    recs.push(EchoRecord {
        peer,
        local,
        bytes: n,
        sha256: if hash {
            hex::encode(h.finalize())
        } else {
            String::new()
        },
        error,
    });
}
