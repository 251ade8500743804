//! Two namespaces ("client node" and "server node") joined by a veth pair: the topology of the
//! demo, the end-to-end tests and the benchmarks.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::error::{Error, Result};
use crate::netns::{run_args, Netns, MAX_NAME_LEN};

/// Addresses and names of a [`TwoNodes`] topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwoNodesConfig {
    /// Client side IPv4 address (default 10.77.0.1).
    pub client_ip: Ipv4Addr,
    /// Server side IPv4 address (default 10.77.0.2).
    pub server_ip: Ipv4Addr,
    /// IPv4 prefix length of the link (default 24).
    pub prefix_len: u8,
    /// Client side IPv6 address (default fd77::1).
    pub client_ip6: Ipv6Addr,
    /// Server side IPv6 address (default fd77::2).
    pub server_ip6: Ipv6Addr,
    /// IPv6 prefix length of the link (default 64).
    pub prefix6_len: u8,
    /// Name of the veth end in each namespace (default `eth0`; the ends are created directly
    /// inside their namespaces, so the name never clashes with the host's interfaces).
    pub ifname: String,
}

impl Default for TwoNodesConfig {
    fn default() -> Self {
        TwoNodesConfig {
            client_ip: Ipv4Addr::new(10, 77, 0, 1),
            server_ip: Ipv4Addr::new(10, 77, 0, 2),
            prefix_len: 24,
            client_ip6: "fd77::1".parse().unwrap_or(Ipv6Addr::LOCALHOST),
            server_ip6: "fd77::2".parse().unwrap_or(Ipv6Addr::LOCALHOST),
            prefix6_len: 64,
            ifname: "eth0".into(),
        }
    }
}

/// Two namespaces ("client node" and "server node") joined by a veth pair, each with a default
/// route through the other so that service VIPs (10.96.0.10…) are routable and can be captured.
#[derive(Debug)]
pub struct TwoNodes {
    /// The client side namespace.
    pub client: Netns,
    /// The server side namespace.
    pub server: Netns,
    /// The addresses in use.
    pub config: TwoNodesConfig,
}

impl TwoNodes {
    /// Builds the default topology (10.77.0.1/24 ↔ 10.77.0.2/24, fd77::1/64 ↔ fd77::2/64).
    /// `prefix` names both namespaces (`{prefix}c…`, `{prefix}s…`); keep it to ~4 chars.
    pub fn new(prefix: &str) -> Result<Self> {
        Self::with_config(prefix, TwoNodesConfig::default())
    }

    /// Builds the topology with the given addresses.
    pub fn with_config(prefix: &str, config: TwoNodesConfig) -> Result<Self> {
        if config.ifname.is_empty() || config.ifname.len() > MAX_NAME_LEN {
            return Err(Error::Invalid(format!(
                "interface name {:?} must have 1..={MAX_NAME_LEN} chars",
                config.ifname
            )));
        }
        let client = Netns::new(&format!("{prefix}c"))?;
        let server = Netns::new(&format!("{prefix}s"))?;
        let dev = config.ifname.as_str();
        // Creating both ends straight inside their namespaces avoids a temporary interface in
        // the host namespace, whose name could clash with a parallel test's.
        run_args(
            "ip",
            [
                "link",
                "add",
                dev,
                "netns",
                client.name(),
                "type",
                "veth",
                "peer",
                "name",
                dev,
                "netns",
                server.name(),
            ],
        )?;
        let sides = [
            (
                &client,
                config.client_ip,
                config.server_ip,
                config.client_ip6,
                config.server_ip6,
            ),
            (
                &server,
                config.server_ip,
                config.client_ip,
                config.server_ip6,
                config.client_ip6,
            ),
        ];
        for (ns, ip, peer, ip6, peer6) in sides {
            // DAD would keep IPv6 addresses "tentative" (unusable) for a second or two.
            ns.sysctl(&[
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ])?;
            ns.add_address(dev, &format!("{ip}/{}", config.prefix_len))?;
            ns.add_address(dev, &format!("{ip6}/{}", config.prefix6_len))?;
            ns.ip(["link", "set", dev, "up"])?;
            ns.ip([
                "route",
                "add",
                "default",
                "via",
                &peer.to_string(),
                "dev",
                dev,
            ])?;
            ns.ip([
                "-6",
                "route",
                "add",
                "default",
                "via",
                &peer6.to_string(),
                "dev",
                dev,
            ])?;
        }
        Ok(TwoNodes {
            client,
            server,
            config,
        })
    }

    /// The veth interface name used in both namespaces.
    pub fn ifname(&self) -> &str {
        &self.config.ifname
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::echo::connect_marked_in;
    use crate::netns::{list_netns, DEFAULT_MARK};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn two_nodes_route_and_capture() {
        let t = TwoNodes::new("rtt").expect("two nodes");
        let names = [t.client.name().to_owned(), t.server.name().to_owned()];
        // Server listens on both families, client reaches it over the veth.
        let l4 = t
            .server
            .enter(|| TcpListener::bind("0.0.0.0:5201"))
            .expect("enter")
            .expect("bind v4");
        let l6 = t
            .server
            .enter(|| TcpListener::bind("[::]:5202"))
            .expect("enter")
            .expect("bind v6");
        let c4 = t
            .client
            .enter(|| TcpStream::connect("10.77.0.2:5201"))
            .expect("enter")
            .expect("connect v4");
        let (_, peer) = l4.accept().expect("accept v4");
        assert_eq!(peer.ip().to_string(), "10.77.0.1");
        drop(c4);
        let c6 = t
            .client
            .enter(|| TcpStream::connect("[fd77::2]:5202"))
            .expect("enter")
            .expect("connect v6");
        let (_, peer) = l6.accept().expect("accept v6");
        assert_eq!(peer.ip().to_string(), "fd77::1");
        drop(c6);

        // With outbound capture, a connection to a VIP lands on the local 15001 listener, and a
        // marked socket bypasses the capture.
        t.client
            .capture_outbound(15001, DEFAULT_MARK)
            .expect("capture outbound");
        let cap = t
            .client
            .enter(|| TcpListener::bind("[::]:15001"))
            .expect("enter")
            .expect("bind 15001");
        for dst in ["10.96.0.10:80", "[fd77::2]:5202"] {
            let _c = t
                .client
                .enter(|| TcpStream::connect(dst))
                .expect("enter")
                .unwrap_or_else(|e| panic!("connect {dst} (captured): {e}"));
            cap.accept().expect("captured connection");
        }
        let marked = connect_marked(&t.client, "10.77.0.2:5201").expect("marked connect");
        let (_, peer) = l4.accept().expect("marked connection reaches the server");
        assert_eq!(peer.ip().to_string(), "10.77.0.1");
        drop(marked);

        // Inbound capture: port 5201 is redirected to 15006, 15008 is exempt.
        t.server
            .capture_inbound(15006, &[15008, 15020, 15021])
            .expect("capture inbound");
        let inb = t
            .server
            .enter(|| TcpListener::bind("[::]:15006"))
            .expect("enter")
            .expect("bind 15006");
        let hb = t
            .server
            .enter(|| TcpListener::bind("[::]:15008"))
            .expect("enter")
            .expect("bind 15008");
        let _a = connect_marked(&t.client, "10.77.0.2:5201").expect("connect redirected");
        inb.accept().expect("inbound capture");
        let _b = connect_marked(&t.client, "10.77.0.2:15008").expect("connect 15008");
        hb.accept().expect("15008 not redirected");
        assert!(t.server.nft_ruleset().expect("ruleset").contains("15006"));

        drop(t);
        let left = list_netns().expect("list");
        for n in names {
            assert!(!left.contains(&n), "{n} left behind");
        }
    }

    /// Connects from `ns` with ringtun's mark, like the sockets ringtun originates.
    fn connect_marked(ns: &Netns, dst: &str) -> std::io::Result<TcpStream> {
        connect_marked_in(ns, dst.parse().expect("socket address"), DEFAULT_MARK)
    }
}
