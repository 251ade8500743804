//! What the xDS client has seen, for `/config_dump` and `/metrics`: the stream's state, and per
//! type the resources held, the last version ACKed, the last NACK and the message counts. The
//! client's thread writes it on each event and the admin endpoints read a copy on a scrape, so
//! the data path never sees it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::exposition::{counter_header, gauge_header};

/// The status shared between the client's thread and the control thread.
pub type SharedXdsStatus = Arc<Mutex<XdsStatus>>;

/// Why a stream ended, as ztunnel's `istio_xds_connection_terminations` `reason` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Termination {
    /// The connection or the stream could not be opened.
    ConnectionError,
    /// The established stream failed.
    Error,
    /// The stream ended routinely (istiod's connection age, a cancelled stream): reconnect.
    Reconnect,
    /// istiod closed the stream.
    Complete,
}

impl Termination {
    /// ztunnel's label value.
    pub fn label(self) -> &'static str {
        match self {
            Termination::ConnectionError => "ConnectionError",
            Termination::Error => "Error",
            Termination::Reconnect => "Reconnect",
            Termination::Complete => "Complete",
        }
    }
}

/// The last response of a type that was refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LastNack {
    /// The response's nonce.
    pub nonce: String,
    /// The resources refused, by xDS name.
    pub resources: Vec<String>,
    /// The NACK's error text.
    pub error: String,
    /// When it was sent.
    pub at: Option<SystemTime>,
}

/// One xDS type's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TypeStatus {
    /// Resources held now.
    pub resources: usize,
    /// `system_version_info` of the last response ACKed.
    pub acked_version: String,
    /// Nonce of the last response ACKed.
    pub acked_nonce: String,
    /// Responses received.
    pub messages: u64,
    /// Bytes of the resources received (ztunnel counts each resource's encoded value).
    pub bytes: u64,
    /// ACKs sent.
    pub acks: u64,
    /// NACKs sent.
    pub nacks: u64,
    /// The last NACK, if any.
    pub last_nack: Option<LastNack>,
}

/// The xDS client's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XdsStatus {
    /// `XDS_ADDRESS`.
    pub address: String,
    /// Since when the stream is up (`None`: not connected).
    pub connected_since: Option<SystemTime>,
    /// Streams opened again after the first.
    pub reconnects: u64,
    /// Streams ended, by why.
    pub terminations: BTreeMap<Termination, u64>,
    /// Per type URL.
    pub types: BTreeMap<String, TypeStatus>,
    /// Whether a stream was ever established (the next one is a reconnect).
    ever_connected: bool,
}

impl XdsStatus {
    /// Not connected yet to `address`, with `types` subscribed.
    pub fn new(address: &str, types: &[&str]) -> Self {
        XdsStatus {
            address: address.to_owned(),
            types: types
                .iter()
                .map(|t| ((*t).to_owned(), TypeStatus::default()))
                .collect(),
            ..Default::default()
        }
    }

    /// A new stream is established.
    pub fn connected(&mut self, now: SystemTime) {
        if self.ever_connected {
            self.reconnects += 1;
        }
        self.ever_connected = true;
        self.connected_since = Some(now);
    }

    /// The stream ended (or never opened).
    pub fn disconnected(&mut self, why: Termination) {
        self.connected_since = None;
        *self.terminations.entry(why).or_default() += 1;
    }

    /// A response was answered: ACKed when `nack` is `None`, else NACKed with that error
    /// naming `rejected`; `resources` of its type are held after it.
    pub fn answered(&mut self, response: Answered<'_>, now: SystemTime) {
        let t = self.types.entry(response.type_url.to_owned()).or_default();
        t.messages += 1;
        t.resources = response.resources;
        match response.nack {
            None => {
                t.acks += 1;
                t.acked_version = response.version.to_owned();
                t.acked_nonce = response.nonce.to_owned();
            }
            Some(error) => {
                t.nacks += 1;
                t.last_nack = Some(LastNack {
                    nonce: response.nonce.to_owned(),
                    resources: response.rejected,
                    error: error.to_owned(),
                    at: Some(now),
                });
            }
        }
    }

    /// A response of `type_url` carried `bytes` of resources (before it is answered).
    pub fn received(&mut self, type_url: &str, bytes: u64) {
        self.types.entry(type_url.to_owned()).or_default().bytes += bytes;
    }

    /// Whether the stream is up.
    pub fn is_connected(&self) -> bool {
        self.connected_since.is_some()
    }

    /// The metrics text: ztunnel's `istio_xds_connection_terminations`, `istio_xds_message`
    /// and `istio_xds_message_bytes` (names, labels and types as ztunnel's), and ringtun's
    /// connection, ACK, NACK and resource figures.
    pub fn prometheus(&self, openmetrics: bool) -> String {
        let mut out = String::new();
        gauge_header(
            &mut out,
            "ringtun_xds_connected",
            "1 while the xDS stream to the control plane is up",
        );
        let _ = writeln!(
            out,
            "ringtun_xds_connected {}",
            u8::from(self.is_connected())
        );
        counter_header(
            &mut out,
            "ringtun_xds_reconnects",
            "xDS streams opened again after the first",
            openmetrics,
        );
        let _ = writeln!(out, "ringtun_xds_reconnects_total {}", self.reconnects);
        counter_header(
            &mut out,
            "istio_xds_connection_terminations",
            "The total number of completed connections to xds server (unstable)",
            openmetrics,
        );
        for (why, n) in &self.terminations {
            let _ = writeln!(
                out,
                "istio_xds_connection_terminations_total{{reason=\"{}\"}} {n}",
                why.label()
            );
        }
        type Field = fn(&TypeStatus) -> u64;
        let per_type: [(&str, &str, Field); 3] = [
            (
                "istio_xds_message",
                "Total number of messages received (unstable)",
                |t| t.messages,
            ),
            ("ringtun_xds_acks", "xDS responses ACKed", |t| t.acks),
            ("ringtun_xds_nacks", "xDS responses refused (NACK)", |t| {
                t.nacks
            }),
        ];
        for (name, help, field) in per_type {
            counter_header(&mut out, name, help, openmetrics);
            for (url, t) in &self.types {
                let _ = writeln!(out, "{name}_total{{url=\"{url}\"}} {}", field(t));
            }
        }
        // ztunnel registers this one with a unit, which OpenMetrics states.
        let bytes = "istio_xds_message_bytes";
        counter_header(
            &mut out,
            bytes,
            "Total number of bytes received (unstable)",
            openmetrics,
        );
        if openmetrics {
            let _ = writeln!(out, "# UNIT {bytes} bytes");
        }
        for (url, t) in &self.types {
            let _ = writeln!(out, "{bytes}_total{{url=\"{url}\"}} {}", t.bytes);
        }
        gauge_header(
            &mut out,
            "ringtun_xds_resources",
            "xDS resources held, by type",
        );
        for (url, t) in &self.types {
            let _ = writeln!(
                out,
                "ringtun_xds_resources{{url=\"{url}\"}} {}",
                t.resources
            );
        }
        out
    }
}

/// One answered response, for [`XdsStatus::answered`].
pub struct Answered<'a> {
    /// Its type URL.
    pub type_url: &'a str,
    /// Its `system_version_info`.
    pub version: &'a str,
    /// Its nonce.
    pub nonce: &'a str,
    /// Resources of its type held after it.
    pub resources: usize,
    /// The resources refused (empty on an ACK).
    pub rejected: Vec<String>,
    /// The NACK's error, if refused.
    pub nack: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::session::{ADDRESS_TYPE, AUTHORIZATION_TYPE, TYPES};
    use std::time::Duration;

    fn ack<'a>(type_url: &'a str, version: &'a str, nonce: &'a str, n: usize) -> Answered<'a> {
        Answered {
            type_url,
            version,
            nonce,
            resources: n,
            rejected: Vec::new(),
            nack: None,
        }
    }

    #[test]
    fn status_counts_acks_nacks_and_reconnects_and_keeps_the_last_good_version() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = XdsStatus::new("https://istiod:15012", &TYPES);
        assert!(!s.is_connected());
        s.connected(t0);
        assert_eq!((s.connected_since, s.reconnects), (Some(t0), 0));
        s.received(ADDRESS_TYPE, 100);
        s.answered(ack(ADDRESS_TYPE, "v1", "n1", 3), t0);
        s.received(ADDRESS_TYPE, 7);
        s.answered(ack(AUTHORIZATION_TYPE, "v1", "n2", 1), t0);
        s.answered(
            Answered {
                type_url: ADDRESS_TYPE,
                version: "v2",
                nonce: "n3",
                resources: 3,
                rejected: vec!["bad-address".into()],
                nack: Some("bad-address: decode"),
            },
            t0,
        );
        let a = &s.types[ADDRESS_TYPE];
        assert_eq!((a.messages, a.acks, a.nacks, a.resources), (2, 1, 1, 3));
        assert_eq!(
            (a.acked_version.as_str(), a.acked_nonce.as_str()),
            ("v1", "n1")
        );
        let nack = a.last_nack.as_ref().expect("the NACK is kept");
        assert_eq!(nack.nonce, "n3");
        assert_eq!(nack.resources, vec!["bad-address".to_owned()]);
        assert_eq!(nack.error, "bad-address: decode");
        s.disconnected(Termination::Error);
        assert!(!s.is_connected());
        s.disconnected(Termination::ConnectionError);
        s.connected(t0);
        assert_eq!(s.reconnects, 1);
        let text = s.prometheus(false);
        for line in [
            "ringtun_xds_connected 1",
            "ringtun_xds_reconnects_total 1",
            "istio_xds_connection_terminations_total{reason=\"Error\"} 1",
            "istio_xds_connection_terminations_total{reason=\"ConnectionError\"} 1",
            "istio_xds_message_total{url=\"type.googleapis.com/istio.workload.Address\"} 2",
            "istio_xds_message_bytes_total{url=\"type.googleapis.com/istio.workload.Address\"} 107",
            "# TYPE istio_xds_message_bytes_total counter",
            "ringtun_xds_acks_total{url=\"type.googleapis.com/istio.workload.Address\"} 1",
            "ringtun_xds_nacks_total{url=\"type.googleapis.com/istio.workload.Address\"} 1",
            "ringtun_xds_nacks_total{url=\"type.googleapis.com/istio.security.Authorization\"} 0",
            "ringtun_xds_resources{url=\"type.googleapis.com/istio.workload.Address\"} 3",
            "# TYPE ringtun_xds_nacks_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        let open = s.prometheus(true);
        assert!(open.contains("# TYPE ringtun_xds_nacks counter"));
        assert!(open.contains(
            "# TYPE istio_xds_message_bytes counter\n# UNIT istio_xds_message_bytes bytes\n"
        ));
    }
}
