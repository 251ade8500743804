//! Queries the mesh does not answer go to the upstream resolvers (ztunnel's `SystemForwarder`:
//! the nameservers of ringtun's own `/etc/resolv.conf`, or `--dns-upstream`): the client's
//! message as it came, over UDP, again over TCP when the answer comes back truncated, and the
//! answer relayed as it came (same id). Each attempt has a timeout; servers are tried in order.
//!
//! In in-pod mode the upstream sockets are made inside the pod's network namespace and carry
//! the proxy's mark, as ztunnel's in-pod socket factory makes them: the query leaves from the
//! pod, and the pod's DNS capture rule lets it through.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::wire::{header_id, FLAG_QR, FLAG_TC, MAX_MESSAGE};
use crate::net;

/// A network namespace the proxy holds on to (a pod's), to forward that pod's queries from.
pub type NetnsRef = std::sync::Arc<dyn AsFd + Send + Sync>;

/// The nameservers of a resolv.conf text (`nameserver ADDR` lines, port 53), in order. A
/// link-local IPv6 address with a `%zone` is skipped: ringtun cannot tell which interface.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next()?;
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// Why no upstream answer came.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No upstream resolver is configured.
    #[error("no upstream resolver")]
    NoUpstream,
    /// Every upstream timed out or failed; the last error.
    #[error("upstream {server}: {error}")]
    Failed {
        /// The last server tried.
        server: SocketAddr,
        /// What went wrong with it.
        error: io::Error,
    },
}

/// Where upstream queries go and how they are sent.
#[derive(Clone, Debug)]
pub struct Forwarder {
    /// The resolvers, tried in order.
    pub servers: Vec<SocketAddr>,
    /// Each attempt's limit (UDP, and TCP after a truncated answer).
    pub timeout: Duration,
    /// SO_MARK on upstream sockets (0: none).
    pub mark: u32,
}

impl Forwarder {
    /// Sends `query` upstream and returns the first answer. `udp_limit`: the largest answer
    /// the client takes over UDP (`None` for a TCP client); a truncated UDP answer is asked
    /// again over TCP, and relayed truncated only if the full one would not fit the client.
    pub async fn forward(
        &self,
        netns: Option<&NetnsRef>,
        query: &[u8],
        udp_limit: Option<usize>,
    ) -> Result<Vec<u8>, ForwardError> {
        let mut last = None;
        for &server in &self.servers {
            match self.ask(netns, server, query, udp_limit).await {
                Ok(answer) => return Ok(answer),
                Err(error) => {
                    tracing::debug!(%server, %error, "upstream DNS query failed");
                    last = Some(ForwardError::Failed { server, error });
                }
            }
        }
        Err(last.unwrap_or(ForwardError::NoUpstream))
    }

    async fn ask(
        &self,
        netns: Option<&NetnsRef>,
        server: SocketAddr,
        query: &[u8],
        udp_limit: Option<usize>,
    ) -> io::Result<Vec<u8>> {
        let id = header_id(query).ok_or_else(|| io::Error::other("query without a header"))?;
        let answer = tokio::time::timeout(self.timeout, self.udp(netns, server, query, id))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no UDP answer in time"))??;
        if !is_truncated(&answer) {
            return Ok(answer);
        }
        let full = tokio::time::timeout(self.timeout, self.tcp(netns, server, query, id))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no TCP answer in time"))??;
        match udp_limit {
            Some(limit) if full.len() > limit => Ok(answer),
            _ => Ok(full),
        }
    }

    fn socket(&self, netns: Option<&NetnsRef>, server: SocketAddr, ty: Type) -> io::Result<Socket> {
        let proto = if ty == Type::DGRAM {
            Protocol::UDP
        } else {
            Protocol::TCP
        };
        let open = || Socket::new(Domain::for_address(server), ty, Some(proto));
        let s = match netns {
            None => open()?,
            Some(ns) => net::in_netns(ns.as_fd(), open)??,
        };
        if self.mark != 0 {
            s.set_mark(self.mark)?;
        }
        s.set_nonblocking(true)?;
        Ok(s)
    }

    async fn udp(
        &self,
        netns: Option<&NetnsRef>,
        server: SocketAddr,
        query: &[u8],
        id: u16,
    ) -> io::Result<Vec<u8>> {
        let s = self.socket(netns, server, Type::DGRAM)?;
        let any: SocketAddr = match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        s.bind(&any.into())?;
        let sock = tokio::net::UdpSocket::from_std(s.into())?;
        // Connected: the kernel drops datagrams from anyone but the server.
        sock.connect(server).await?;
        sock.send(query).await?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let n = sock.recv(&mut buf).await?;
            // A stray or spoofed datagram with another id is not the answer: keep waiting.
            if is_answer_to(&buf[..n], id) {
                buf.truncate(n);
                return Ok(buf);
            }
        }
    }

    async fn tcp(
        &self,
        netns: Option<&NetnsRef>,
        server: SocketAddr,
        query: &[u8],
        id: u16,
    ) -> io::Result<Vec<u8>> {
        let s = self.socket(netns, server, Type::STREAM)?;
        match s.connect(&server.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let std: std::net::TcpStream = s.into();
        let mut stream = tokio::net::TcpStream::from_std(std)?;
        stream.writable().await?;
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
        let len = u16::try_from(query.len()).map_err(|_| io::Error::other("query too large"))?;
        let mut out = Vec::with_capacity(query.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(query);
        stream.write_all(&out).await?;
        let answer = read_framed(&mut stream).await?;
        if !is_answer_to(&answer, id) {
            return Err(io::Error::other("the TCP answer is not for this query"));
        }
        Ok(answer)
    }
}

/// Reads one length-prefixed message (RFC 1035 §4.2.2).
pub async fn read_framed<R: AsyncReadExt + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    r.read_exact(&mut msg).await?;
    Ok(msg)
}

fn is_answer_to(msg: &[u8], id: u16) -> bool {
    header_id(msg) == Some(id) && flags(msg) & FLAG_QR != 0
}

fn is_truncated(msg: &[u8]) -> bool {
    flags(msg) & FLAG_TC != 0
}

fn flags(msg: &[u8]) -> u16 {
    match msg {
        [_, _, a, b, ..] => u16::from_be_bytes([*a, *b]),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let text = "# a comment\nsearch svc.cluster.local cluster.local\nnameserver 10.96.0.10\nnameserver fd00::10 # v6\noptions ndots:5\n nameserver 1.1.1.1\nnameserver fe80::1%eth0\nnameserver\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "10.96.0.10:53".parse::<SocketAddr>().unwrap(),
                "[fd00::10]:53".parse().unwrap(),
                "1.1.1.1:53".parse().unwrap(),
            ]
        );
    }

    #[test]
    fn answers_are_matched_by_id_and_qr() {
        let a = [0x12, 0x34, 0x81, 0x80, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(is_answer_to(&a, 0x1234));
        assert!(!is_answer_to(&a, 0x1235));
        let q = [0x12, 0x34, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(!is_answer_to(&q, 0x1234));
        assert!(!is_truncated(&a));
        assert!(is_truncated(&[0, 0, 0x82, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
    }

    /// A UDP upstream that answers truncated, and a TCP one at the same address with the full
    /// answer: the full answer is relayed to a TCP client, the truncated one to a UDP client
    /// whose limit it exceeds; a server that never answers times out and the next one answers.
    #[test]
    fn truncation_falls_back_to_tcp_and_timeouts_move_on() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
            let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let query = vec![0xab, 0xcd, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0];
            let mut trunc = query.clone();
            trunc[2] = 0x83;
            let mut full = query.clone();
            full[2] = 0x81;
            full.extend_from_slice(&[0u8; 1000]);
            let (t, f) = (trunc.clone(), full.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                loop {
                    let (_, from) = udp.recv_from(&mut buf).await.unwrap();
                    udp.send_to(&t, from).await.unwrap();
                }
            });
            tokio::spawn(async move {
                loop {
                    let (mut s, _) = tcp.accept().await.unwrap();
                    let _ = read_framed(&mut s).await.unwrap();
                    let mut out = (f.len() as u16).to_be_bytes().to_vec();
                    out.extend_from_slice(&f);
                    s.write_all(&out).await.unwrap();
                }
            });
            let fwd = Forwarder {
                servers: vec![silent.local_addr().unwrap(), addr],
                timeout: Duration::from_millis(200),
                mark: 0,
            };
            assert_eq!(fwd.forward(None, &query, None).await.unwrap(), full);
            assert_eq!(fwd.forward(None, &query, Some(512)).await.unwrap(), trunc);
            assert_eq!(fwd.forward(None, &query, Some(4096)).await.unwrap(), full);
            let none = Forwarder {
                servers: vec![silent.local_addr().unwrap()],
                ..fwd.clone()
            };
            assert!(matches!(
                none.forward(None, &query, None).await,
                Err(ForwardError::Failed { .. })
            ));
            let empty = Forwarder {
                servers: vec![],
                ..fwd
            };
            assert!(matches!(
                empty.forward(None, &query, None).await,
                Err(ForwardError::NoUpstream)
            ));
        });
    }
}
