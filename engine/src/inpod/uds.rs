//! The ZDS client socket: a blocking `SOCK_SEQPACKET` unix socket to istio-cni's node agent.
//!
//! One packet is one protobuf message; an `add` carries the pod's netns fd as SCM_RIGHTS. The
//! control thread connects ([`ZdsClient::connect`], which sends the hello), then calls
//! [`ZdsClient::handle_next`] in a loop with its [`Session`]; when the agent goes away it
//! reconnects after [`Backoff::next_delay`] and calls [`Session::reconnected`]. Messages are
//! bounded ([`MAX_MESSAGE`]) and every received fd is owned at once, so none leaks whatever the
//! agent sends.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

use super::session::{Action, Attached, Packet, Reply, Session, Step};
use super::zds::ZdsHello;
use super::NetnsFd;

/// The longest message accepted; longer ones are refused (a real one is under 1 KiB: a uid and
/// three Kubernetes names).
pub const MAX_MESSAGE: usize = 16 * 1024;

/// Fds one packet may bring and still be reported as such; more are closed by the kernel and the
/// packet is refused as control-truncated.
const MAX_FDS: usize = 8;

/// Bound on connecting and sending, so a stuck agent cannot stall the control thread.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Why talking to the node agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    /// The agent is not there (yet) or refused the connection.
    #[error("cannot connect to the node agent at {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// The connection failed while in use.
    #[error("node agent connection: {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// OS error.
        source: io::Error,
    },
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> ZdsError {
    move |source| ZdsError::Io { op, source }
}

/// What one receive brought.
#[derive(Debug)]
pub enum Received<'a> {
    /// A packet, with its fds.
    Packet(Packet<'a>),
    /// The agent closed the connection.
    Closed,
    /// Nothing arrived within the timeout.
    Timeout,
}

/// What [`ZdsClient::handle_next`] did.
#[derive(Debug)]
pub enum Handled {
    /// A request arrived and was answered with this.
    Answered(Reply),
    /// Nothing arrived within the timeout.
    Idle,
    /// The agent closed the connection: reconnect.
    Closed,
}

/// A connection to the node agent.
#[derive(Debug)]
pub struct ZdsClient {
    sock: Socket,
    buf: Vec<u8>,
    /// Control-message buffer, u64 elements so that `cmsghdr`s in it are aligned.
    cmsg: Vec<u64>,
}

impl ZdsClient {
    /// Connects to the agent's socket and announces ZDS version 1, as ztunnel does.
    pub fn connect(path: &Path) -> Result<ZdsClient, ZdsError> {
        let connect_err = |source| ZdsError::Connect {
            path: path.to_owned(),
            source,
        };
        // socket2 opens it close-on-exec.
        let sock = Socket::new(Domain::UNIX, Type::SEQPACKET, None).map_err(connect_err)?;
        // Also bounds connect(2) on a unix socket whose listener's backlog is full.
        sock.set_write_timeout(Some(IO_TIMEOUT))
            .map_err(connect_err)?;
        let addr = SockAddr::unix(path).map_err(connect_err)?;
        sock.connect(&addr).map_err(connect_err)?;
        // SAFETY: CMSG_SPACE only computes a size.
        let cmsg_bytes =
            unsafe { libc::CMSG_SPACE((MAX_FDS * mem::size_of::<libc::c_int>()) as u32) };
        let mut client = ZdsClient {
            sock,
            buf: vec![0; MAX_MESSAGE],
            cmsg: vec![0; (cmsg_bytes as usize).div_ceil(mem::size_of::<u64>())],
        };
        client.send_bytes(&ZdsHello::v1().encode(), "sending hello")?;
        Ok(client)
    }

    /// Receives one request, waiting at most `timeout` (`None`: forever).
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Received<'_>, ZdsError> {
        if !self.wait_readable(timeout)? {
            return Ok(Received::Timeout);
        }
        let fd = self.sock.as_raw_fd();
        let mut iov = libc::iovec {
            iov_base: self.buf.as_mut_ptr().cast(),
            iov_len: self.buf.len(),
        };
        // SAFETY: msghdr is plain data; every pointer set below outlives the recvmsg call.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = self.cmsg.as_mut_ptr().cast();
        msg.msg_controllen = self.cmsg.len() * mem::size_of::<u64>();
        // SAFETY: `msg` describes buffers we own, of the sizes given; the kernel writes within.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                // Readiness was spurious, or a signal came: the caller simply asks again.
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(Received::Timeout),
                io::ErrorKind::ConnectionReset => Ok(Received::Closed),
                _ => Err(ZdsError::Io {
                    op: "receiving",
                    source: e,
                }),
            };
        }
        // Owned before anything else, so that every fd is closed on every path from here.
        // SAFETY: recvmsg succeeded, so the control data it reports is initialised and ours.
        let fds = unsafe { take_fds(&msg) };
        // n >= 0 here.
        let len = (n as usize).min(self.buf.len());
        // A zero-length read is both "empty packet" and end of stream; only the latter hangs up.
        if len == 0 && fds.is_empty() && self.peer_closed()? {
            return Ok(Received::Closed);
        }
        Ok(Received::Packet(Packet {
            bytes: &self.buf[..len],
            attached: classify(fds),
            truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
            control_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        }))
    }

    /// Sends the answer to one request.
    pub fn send(&mut self, reply: &Reply) -> Result<(), ZdsError> {
        self.send_bytes(&reply.encode(), "sending ack")
    }

    /// Receives one request, lets `session` judge it, has `perform` carry out the resulting
    /// action (its return value is the answer) and sends the answer.
    pub fn handle_next<F>(
        &mut self,
        session: &mut Session,
        timeout: Option<Duration>,
        perform: F,
    ) -> Result<Handled, ZdsError>
    where
        F: FnOnce(Action) -> Reply,
    {
        let step = match self.recv(timeout)? {
            Received::Timeout => return Ok(Handled::Idle),
            Received::Closed => return Ok(Handled::Closed),
            Received::Packet(p) => session.on_packet(p),
        };
        let reply = match step {
            Step::Reply(r) => r,
            Step::Act(action) => perform(action),
        };
        self.send(&reply)?;
        Ok(Handled::Answered(reply))
    }

    fn send_bytes(&mut self, bytes: &[u8], op: &'static str) -> Result<(), ZdsError> {
        // MSG_NOSIGNAL: an agent gone away is an error here, not a SIGPIPE for the process.
        let n = self
            .sock
            .send_with_flags(bytes, libc::MSG_NOSIGNAL)
            .map_err(io_err(op))?;
        if n != bytes.len() {
            // SEQPACKET sends whole messages; a short count would be a kernel surprise.
            return Err(ZdsError::Io {
                op,
                source: io::Error::new(io::ErrorKind::WriteZero, "short send"),
            });
        }
        Ok(())
    }

    fn poll(
        &self,
        events: libc::c_short,
        timeout_ms: libc::c_int,
    ) -> Result<libc::c_short, ZdsError> {
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(ZdsError::Io {
                op: "waiting for the node agent",
                source: e,
            });
        }
        Ok(pfd.revents)
    }

    fn wait_readable(&self, timeout: Option<Duration>) -> Result<bool, ZdsError> {
        let ms = match timeout {
            None => -1,
            // Rounded up, so that a sub-millisecond timeout still waits instead of spinning.
            Some(d) => d.as_micros().div_ceil(1000).min(libc::c_int::MAX as u128) as libc::c_int,
        };
        let revents = self.poll(libc::POLLIN, ms)?;
        // Hang-up and errors are readable too: recvmsg then reports them.
        Ok(revents != 0)
    }

    fn peer_closed(&self) -> Result<bool, ZdsError> {
        let revents = self.poll(libc::POLLRDHUP, 0)?;
        Ok(revents & (libc::POLLRDHUP | libc::POLLHUP) != 0)
    }
}

/// Takes ownership of every fd in the SCM_RIGHTS messages of `msg`.
///
/// # Safety
/// `msg` must have been filled by a successful `recvmsg`, and its fds not yet taken.
unsafe fn take_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    let header = libc::CMSG_LEN(0) as usize;
    let mut c = libc::CMSG_FIRSTHDR(msg);
    while !c.is_null() {
        // The kernel aligns each header within our u64-aligned buffer.
        let h = &*c;
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            let data = libc::CMSG_DATA(c);
            let count =
                (h.cmsg_len as usize).saturating_sub(header) / mem::size_of::<libc::c_int>();
            for i in 0..count {
                let raw = std::ptr::read_unaligned(
                    data.add(i * mem::size_of::<libc::c_int>())
                        .cast::<libc::c_int>(),
                );
                fds.push(OwnedFd::from_raw_fd(raw));
            }
        }
        c = libc::CMSG_NXTHDR(msg, c);
    }
    fds
}

/// Checks what came: one netns, one other fd, or several (all closed on the spot).
fn classify(mut fds: Vec<OwnedFd>) -> Attached {
    match (fds.pop(), fds.len()) {
        (None, _) => Attached::None,
        (Some(fd), 0) => match NetnsFd::check(fd) {
            Ok(netns) => Attached::Netns(netns),
            Err(e) => Attached::NotNetns(e),
        },
        (Some(_), rest) => Attached::Several(rest + 1),
    }
}

/// Delays between reconnection attempts: 10 ms doubling to 15 s, as ztunnel does.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(15);

    /// A fresh backoff.
    pub fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    /// How long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(Self::MAX);
        d
    }

    /// After a connection that worked: start again from the shortest delay.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inpod::zds::{Ack, WorkloadInfo, WorkloadRequest};
    use std::io::Read;
    use std::os::unix::net::{UnixDatagram, UnixListener};

    /// A socketpair stands in for the agent: SEQPACKET both ends.
    fn pair() -> (ZdsClient, Socket) {
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).expect("socketpair");
        let client = ZdsClient {
            sock: a,
            buf: vec![0; MAX_MESSAGE],
            cmsg: vec![0; 32],
        };
        (client, b)
    }

    fn send_with_fds(agent: &Socket, bytes: &[u8], fds: &[libc::c_int]) {
        let mut space = vec![0u64; 16];
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        // SAFETY: test-only sendmsg with buffers that outlive the call.
        unsafe {
            let mut msg: libc::msghdr = mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if !fds.is_empty() {
                let data_len = mem::size_of_val(fds) as u32;
                msg.msg_control = space.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(data_len) as usize;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(data_len) as usize;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(c),
                    data_len as usize,
                );
            }
            assert!(libc::sendmsg(agent.as_raw_fd(), &msg, 0) >= 0, "sendmsg");
        }
    }

    /// Whether any fd of this process still refers to `path`: a marker file whose fds are
    /// sent and must all be closed again (robust against other tests opening fds meanwhile).
    fn fd_open_on(path: &Path) -> bool {
        std::fs::read_dir("/proc/self/fd")
            .map(|d| {
                d.flatten()
                    .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
            })
            .unwrap_or(false)
    }

    #[test]
    fn add_with_netns_then_bad_packets_then_close() {
        let (mut client, agent) = pair();
        let mut session = Session::new();
        let own = std::fs::File::open("/proc/self/ns/net").expect("own netns");
        let add = WorkloadRequest::Add {
            uid: "u1".into(),
            workload_info: Some(WorkloadInfo {
                name: "p".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
            }),
        };
        send_with_fds(&agent, &add.encode(), &[own.as_raw_fd()]);
        let got = client.handle_next(&mut session, Some(Duration::from_secs(5)), |a| match a {
            Action::AddPod { uid, netns, .. } => {
                assert_eq!(uid, "u1");
                assert_eq!(
                    Some(netns.id.ino),
                    std::fs::metadata("/proc/self/ns/net").ok().map(|m| {
                        use std::os::unix::fs::MetadataExt;
                        m.ino()
                    })
                );
                Reply::Ok
            }
            other => panic!("{other:?}"),
        });
        assert!(matches!(got, Ok(Handled::Answered(Reply::Ok))));
        let mut buf = [0u8; 256];
        let n = (&agent).read(&mut buf).expect("ack");
        assert_eq!(Ack::decode_response(&buf[..n]), Ok(Some(Ack::ok())));

        // Several fds on a del, an empty packet, a not-a-netns fd, an oversized message.
        let marker =
            std::env::temp_dir().join(format!("ringtun-zds-marker-{}", std::process::id()));
        let null = std::fs::File::create(&marker).expect("marker file");
        let del = WorkloadRequest::Del { uid: "u1".into() }.encode();
        send_with_fds(&agent, &del, &[null.as_raw_fd(), null.as_raw_fd()]);
        send_with_fds(&agent, &[], &[]);
        send_with_fds(&agent, &add.encode(), &[null.as_raw_fd()]);
        send_with_fds(&agent, &vec![0x48; MAX_MESSAGE + 100], &[null.as_raw_fd()]);
        drop(null);
        let mut errors = Vec::new();
        for _ in 0..4 {
            match client.handle_next(&mut session, Some(Duration::from_secs(5)), |a| {
                panic!("no action expected, got {a:?}")
            }) {
                Ok(Handled::Answered(r)) => errors.push(r.ack().error),
                other => panic!("{other:?}"),
            }
            let _ = (&agent).read(&mut buf).expect("ack");
        }
        assert!(errors[0].contains("2 fds came with the del"), "{errors:?}");
        assert!(errors[1].contains("no payload"), "{errors:?}");
        assert!(errors[2].contains("not a namespace"), "{errors:?}");
        assert!(errors[3].contains("limit"), "{errors:?}");
        assert!(!fd_open_on(&marker), "a received fd leaked");
        let _ = std::fs::remove_file(&marker);

        assert!(matches!(
            client.handle_next(&mut session, Some(Duration::from_millis(10)), |_| Reply::Ok),
            Ok(Handled::Idle)
        ));
        drop(agent);
        assert!(matches!(
            client.handle_next(&mut session, Some(Duration::from_secs(5)), |_| Reply::Ok),
            Ok(Handled::Closed)
        ));
    }

    #[test]
    fn connect_sends_hello_and_fails_cleanly_without_agent() {
        let dir = std::env::temp_dir().join(format!("ringtun-zds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("missing.sock");
        assert!(matches!(
            ZdsClient::connect(&path),
            Err(ZdsError::Connect { .. })
        ));
        // A datagram socket at the path is the wrong kind: connect must fail, not hang.
        let dgram = dir.join("dgram.sock");
        let _d = UnixDatagram::bind(&dgram).expect("bind dgram");
        assert!(ZdsClient::connect(&dgram).is_err());
        // A stream listener too (SEQPACKET cannot connect to it).
        let stream = dir.join("stream.sock");
        let _l = UnixListener::bind(&stream).expect("bind stream");
        assert!(ZdsClient::connect(&stream).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn backoff_doubles_to_fifteen_seconds() {
        let mut b = Backoff::new();
        let delays: Vec<Duration> = (0..14).map(|_| b.next_delay()).collect();
        assert_eq!(delays[0], Duration::from_millis(10));
        assert_eq!(delays[1], Duration::from_millis(20));
        assert_eq!(delays[13], Duration::from_secs(15));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
    }
}
