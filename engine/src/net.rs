//! Socket plumbing: listeners with SO_REUSEPORT, original destinations after REDIRECT, marked
//! outgoing connections, and aborting connections with RST.

use std::cell::OnceCell;
use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Backlog for every listener: large enough that a burst of new connections is not dropped
/// while a shard is busy moving bytes.
const BACKLOG: i32 = 4096;

/// Binds one listening socket with SO_REUSEPORT so every shard can bind its own on the same
/// address and the kernel spreads new connections across them. An IPv6 wildcard is dual-stack.
pub fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Whether this host (network namespace) can open IPv6 sockets at all; used to fall back from
/// the dual-stack default to IPv4 where IPv6 is disabled.
pub fn ipv6_available() -> bool {
    Socket::new(Domain::IPV6, Type::STREAM, None).is_ok()
        && std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

/// The destination a connection had before an nftables/iptables REDIRECT sent it to us.
///
/// IPv4 connections (including v4-mapped ones on a dual-stack socket) are asked with
/// SO_ORIGINAL_DST, IPv6 ones with IP6T_SO_ORIGINAL_DST. Without a NAT entry the kernel answers
/// ENOENT: the connection was not redirected.
pub fn original_dst(fd: RawFd, local: SocketAddr) -> io::Result<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    if v4 {
        // SAFETY: sockaddr_in is plain old data; the kernel fills at most `len` bytes.
        let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                (&mut sa as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
        Ok(SocketAddr::new(IpAddr::V4(ip), u16::from_be(sa.sin_port)))
    } else {
        // SAFETY: as above, for sockaddr_in6.
        let mut sa: libc::sockaddr_in6 = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                IP6T_SO_ORIGINAL_DST,
                (&mut sa as *mut libc::sockaddr_in6).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
        Ok(SocketAddr::new(IpAddr::V6(ip), u16::from_be(sa.sin6_port)))
    }
}

/// Undoes the v4-mapped form a dual-stack listener reports, so addresses compare with config.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Opens a TCP connection whose packets carry `mark` (SO_MARK), so capture rules can let
/// ringtun's own traffic through. Mark 0 means "don't mark".
pub async fn connect_marked(
    dst: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> io::Result<monoio::net::TcpStream> {
    connect_marked_in(None, dst, mark, timeout).await
}

/// [`connect_marked`] from inside the network namespace `netns` (a pod's, in in-pod mode), so
/// the connection leaves with the pod's addresses and routes; `None`: this thread's namespace.
pub async fn connect_marked_in(
    netns: Option<BorrowedFd<'_>>,
    dst: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> io::Result<monoio::net::TcpStream> {
    // Non-blocking from the start (SOCK_NONBLOCK): no fcntl pair per connection.
    let open = || {
        Socket::new(
            Domain::for_address(dst),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )
    };
    let socket = match netns {
        None => open()?,
        Some(ns) => in_netns(ns, open)??,
    };
    if mark != 0 {
        socket.set_mark(mark)?;
    }
    socket.set_nodelay(true)?;
    match socket.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let std_stream: std::net::TcpStream = socket.into();
    let stream = monoio::net::TcpStream::from_std(std_stream)?;
    match monoio::time::timeout(timeout, stream.writable(false)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} timed out after {timeout:?}"),
            ))
        }
    }
    // SAFETY: the fd is owned by `stream`, which outlives this borrow.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    if let Some(e) = SockRef::from(&fd).take_error()? {
        return Err(e);
    }
    Ok(stream)
}

thread_local! {
    /// The namespace this thread runs in when it is not visiting a pod's: opened on the first
    /// visit (the thread is home then), to come back to after each.
    static HOME_NETNS: OnceCell<OwnedFd> = const { OnceCell::new() };
}

/// Runs `f` on this thread inside the network namespace `netns`, then returns the thread to
/// its own namespace. A socket belongs to the namespace it was created in for good, so only
/// its creation needs the visit: two `setns` calls per socket, no thread hop. Measured here
/// (2 cores, debug build, 20 000 sockets): 5.3 µs for `socket()` + `close()` at home, 6.0 µs
/// with the visit, so about 0.35 µs per `setns`; pooled HBONE connections pay it once.
///
/// Fails (without running `f`) when a namespace cannot be entered. Should the way back fail,
/// the process aborts: a thread left in a pod's namespace would serve every later connection
/// from the wrong place.
pub fn in_netns<R>(netns: BorrowedFd<'_>, f: impl FnOnce() -> R) -> io::Result<R> {
    HOME_NETNS.with(|home| {
        let home = match home.get() {
            Some(h) => h,
            None => {
                let own = std::fs::File::open("/proc/thread-self/ns/net")?;
                home.get_or_init(|| own.into())
            }
        };
        setns_net(netns)?;
        let out = f();
        if let Err(e) = setns_net(home.as_fd()) {
            tracing::error!(error = %e, "cannot return to the proxy's own network namespace");
            std::process::abort();
        }
        Ok(out)
    })
}

/// Moves this thread into the network namespace `fd` (`setns(fd, CLONE_NEWNET)`).
pub fn setns_net(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns on an fd we borrow; it changes only this thread's network namespace.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Checks once at start-up that SO_MARK can be set, so a missing CAP_NET_ADMIN is reported
/// before the first connection instead of failing each one.
pub fn check_mark(mark: u32) -> io::Result<()> {
    if mark == 0 {
        return Ok(());
    }
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.set_mark(mark)
}

/// Makes the next close of `fd` send RST instead of FIN (SO_LINGER with zero timeout), which is
/// how a reset on one side of the tunnel is passed on to the other.
pub fn abort_on_close(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: fd is open for the duration of this call; the struct is the size we pass.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// One non-blocking `recv` into `spare` (retried on EINTR): the bytes read, 0 at end of stream,
/// `WouldBlock` when the socket is empty. The caller marks the first `n` bytes initialised.
pub fn recv_nonblocking(fd: RawFd, spare: &mut [mem::MaybeUninit<u8>]) -> io::Result<usize> {
    loop {
        // SAFETY: `spare` is writable memory of `spare.len()` bytes borrowed for this call; the
        // kernel writes at most that many bytes into it.
        let n = unsafe {
            libc::recv(
                fd,
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One non-blocking accept on `listener` (a listening socket opened non-blocking, as
/// [`reuseport_listener`] opens them), retried on EINTR: the connection and its peer, or `None`
/// when none is waiting. The new socket is blocking, as one an io_uring accept returns, and
/// close-on-exec.
pub fn accept_nonblocking(
    listener: BorrowedFd<'_>,
) -> io::Result<Option<(std::net::TcpStream, SocketAddr)>> {
    loop {
        // accept4 with SOCK_CLOEXEC: close-on-exec in the same call.
        return match SockRef::from(&listener).accept() {
            Ok((socket, peer)) => {
                let peer = peer.as_socket().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "accepted a non-IP peer address")
                })?;
                Ok(Some((socket.into(), peer)))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
    }
}

/// Probes a connection's peer with TCP keepalive after `every` without traffic, then every
/// `every`, and gives up after the kernel's count of unanswered probes (9 by default):
/// ztunnel's settings (180 s), so a peer that vanished without a FIN or RST does not pin the
/// connection's memory for ever. Zero: off.
pub fn set_keepalive(fd: RawFd, every: Duration) -> io::Result<()> {
    // SAFETY: the caller owns the open socket `fd` for the duration of this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let sock = SockRef::from(&fd);
    if every.is_zero() {
        return sock.set_keepalive(false);
    }
    // SO_KEEPALIVE, TCP_KEEPIDLE and TCP_KEEPINTVL. The probe count stays the kernel's
    // (net.ipv4.tcp_keepalive_probes, 9 by default), which is ztunnel's too.
    let secs = Duration::from_secs(every.as_secs().max(1));
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(secs)
            .with_interval(secs),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_unmaps_v4() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(
            canonical(mapped),
            "10.0.0.1:80".parse::<SocketAddr>().unwrap()
        );
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn original_dst_without_redirect_is_an_error_not_a_panic() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        assert!(original_dst(s.as_raw_fd(), s.local_addr().unwrap()).is_err());
        drop(c);
    }

    #[test]
    fn a_visit_to_a_netns_comes_back_home() {
        let home = std::fs::metadata("/proc/thread-self/ns/net").unwrap();
        let own = std::fs::File::open("/proc/self/ns/net").unwrap();
        let got = in_netns(own.as_fd(), || 7).unwrap();
        assert_eq!(got, 7);
        use std::os::unix::fs::MetadataExt;
        let after = std::fs::metadata("/proc/thread-self/ns/net").unwrap();
        assert_eq!(after.ino(), home.ino());
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(in_netns(null.as_fd(), || ()).is_err(), "not a namespace");
    }

    #[test]
    fn reuseport_allows_one_listener_per_shard() {
        let a = reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = a.local_addr().unwrap();
        let b = reuseport_listener(addr).unwrap();
        assert_eq!(b.local_addr().unwrap(), addr);
    }
}
