//! The DNS thread: one tokio current-thread runtime serving every DNS listener (ringtun's own,
//! or each pod's), answering from the mesh or forwarding, and counting.
//!
//! A query: parse ([`super::wire`]) → refuse what is not a standard query with one question
//! (FORMERR, NOTIMP, as ztunnel's handler) → find the client in the snapshot (unknown:
//! SERVFAIL, as ztunnel) → [`super::resolve`] → an authoritative answer, or the query relayed
//! upstream ([`super::forward`]; none answered: SERVFAIL). Bounded: UDP queries in flight and
//! TCP connections per listener are capped, a TCP client has [`TCP_IDLE`] per request, a UDP
//! query is at most [`UDP_QUERY_MAX`] bytes and any message 65 535, an upstream attempt has
//! its timeout.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch, Semaphore};

use super::forward::{read_framed, Forwarder, NetnsRef};
use super::metrics::{DnsLabels, DnsMetrics};
use super::resolve::{resolve, Client, MeshIndex, Policy, Resolution, TTL};
use super::wire::{
    header_id, rcode, Edns, Message, Question, RData, Record, WireError, CLASSIC_UDP, FLAG_AA,
    FLAG_CD, FLAG_QR, FLAG_RA, FLAG_RD, FLAG_TC, TYPE_OPT,
};
use crate::config::Snapshot;

/// How long a TCP client may take to send its next query (ztunnel's
/// `DEFAULT_TCP_REQUEST_TIMEOUT`).
pub const TCP_IDLE: Duration = Duration::from_secs(5);
/// UDP queries one listener works on at once; more are dropped (the client retries).
pub const UDP_IN_FLIGHT: usize = 256;
/// TCP connections one listener serves at once; more are closed at accept.
pub const TCP_CONNECTIONS: usize = 64;
/// The largest UDP query read (hickory's UDP buffer too): queries are a few dozen bytes, and
/// each pod's listener keeps this buffer while idle. A longer datagram arrives cut and gets
/// FORMERR.
pub const UDP_QUERY_MAX: usize = 4096;

/// Who asks on a listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    /// Dedicated mode: always this workload (`namespace`, `name`).
    Workload(String, String),
    /// Node mode: the workload whose IP the query comes from.
    BySource,
    /// A pod (in-pod mode): its workload by namespace and name, else by source IP.
    Pod {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
    },
}

/// A listener's sockets: bound already (in a pod's namespace, say), non-blocking or not.
pub struct Sockets {
    /// UDP sockets.
    pub udp: Vec<std::net::UdpSocket>,
    /// TCP listeners.
    pub tcp: Vec<std::net::TcpListener>,
}

/// What the control side asks of the DNS thread.
pub enum Command {
    /// Serve these sockets for `who`; queries forwarded from inside `netns` when given.
    Serve {
        /// Key to stop them by (a pod's uid; `""` for ringtun's own).
        key: String,
        /// Who asks on them.
        who: Who,
        /// The sockets.
        sockets: Sockets,
        /// The namespace upstream queries leave from (a pod's), or ringtun's own.
        netns: Option<NetnsRef>,
    },
    /// Stop serving the sockets of `key`.
    Stop(String),
    /// Stop everything and end the thread.
    Shutdown,
}

/// What every listener shares: the config, the settings, the counters.
pub struct Shared {
    /// The latest snapshot from the control thread.
    pub snapshot: Mutex<Option<Snapshot>>,
    /// Resolution settings.
    pub policy: Policy,
    /// Upstream resolvers.
    pub forwarder: Forwarder,
    /// Counters.
    pub metrics: DnsMetrics,
}

/// The thread's state: the index of the snapshot last used, rebuilt when the generation moves.
struct Local {
    shared: Arc<Shared>,
    index: std::cell::RefCell<Option<(Snapshot, Rc<MeshIndex>)>>,
}

impl Local {
    fn current(&self) -> Option<(Snapshot, Rc<MeshIndex>)> {
        let snap = self.shared.snapshot.lock().ok()?.clone()?;
        let mut cached = self.index.borrow_mut();
        match &*cached {
            Some((s, i)) if s.generation == snap.generation => Some((s.clone(), i.clone())),
            _ => {
                let suffix = self.shared.policy.domains.cluster_local_suffix();
                let index = Rc::new(MeshIndex::build(&snap, &suffix));
                *cached = Some((snap.clone(), index.clone()));
                Some((snap, index))
            }
        }
    }
}

/// Runs the DNS thread's loop until the command channel closes.
pub fn run(shared: Arc<Shared>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "DNS proxy: cannot start its runtime; DNS is not served");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    let state = Rc::new(Local {
        shared,
        index: std::cell::RefCell::new(None),
    });
    local.block_on(&rt, async move {
        let mut served: HashMap<String, watch::Sender<bool>> = HashMap::new();
        while let Some(cmd) = commands.recv().await {
            match cmd {
                Command::Serve {
                    key,
                    who,
                    sockets,
                    netns,
                } => {
                    let (stop_tx, stop_rx) = watch::channel(false);
                    let ctx = Rc::new(Ctx {
                        state: state.clone(),
                        who,
                        netns,
                    });
                    for udp in sockets.udp {
                        spawn_udp(ctx.clone(), udp, stop_rx.clone());
                    }
                    for tcp in sockets.tcp {
                        spawn_tcp(ctx.clone(), tcp, stop_rx.clone());
                    }
                    if let Some(old) = served.insert(key, stop_tx) {
                        let _ = old.send(true);
                    }
                }
                Command::Stop(key) => {
                    if let Some(s) = served.remove(&key) {
                        let _ = s.send(true);
                    }
                }
                Command::Shutdown => break,
            }
        }
        for s in served.values() {
            let _ = s.send(true);
        }
    });
}

/// One listener's context.
struct Ctx {
    state: Rc<Local>,
    who: Who,
    netns: Option<NetnsRef>,
}

fn spawn_udp(ctx: Rc<Ctx>, sock: std::net::UdpSocket, mut stop: watch::Receiver<bool>) {
    tokio::task::spawn_local(async move {
        let sock = match sock
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UdpSocket::from_std(sock))
        {
            Ok(s) => Rc::new(s),
            Err(e) => {
                tracing::warn!(error = %e, "DNS proxy: unusable UDP socket");
                return;
            }
        };
        let room = Arc::new(Semaphore::new(UDP_IN_FLIGHT));
        let mut buf = vec![0u8; UDP_QUERY_MAX];
        loop {
            let (n, src) = tokio::select! {
                r = sock.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(error = %e, "DNS proxy: UDP receive failed");
                        // A socket error that repeats must not spin the thread.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            let Ok(permit) = room.clone().try_acquire_owned() else {
                continue;
            };
            let query = buf[..n].to_vec();
            let (ctx, sock) = (ctx.clone(), sock.clone());
            tokio::task::spawn_local(async move {
                if let Some(answer) = ctx.handle(&query, src, "udp").await {
                    let _ = sock.send_to(&answer, src).await;
                }
                drop(permit);
            });
        }
    });
}

fn spawn_tcp(ctx: Rc<Ctx>, listener: std::net::TcpListener, mut stop: watch::Receiver<bool>) {
    tokio::task::spawn_local(async move {
        let listener = match listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(listener))
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "DNS proxy: unusable TCP listener");
                return;
            }
        };
        let room = Arc::new(Semaphore::new(TCP_CONNECTIONS));
        loop {
            let (mut stream, src) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!(error = %e, "DNS proxy: TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            let Ok(permit) = room.clone().try_acquire_owned() else {
                continue;
            };
            let ctx = ctx.clone();
            let mut stop = stop.clone();
            tokio::task::spawn_local(async move {
                loop {
                    let query = tokio::select! {
                        r = tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)) => match r {
                            Ok(Ok(q)) => q,
                            _ => break,
                        },
                        _ = stop.changed() => break,
                    };
                    let Some(answer) = ctx.handle(&query, src, "tcp").await else {
                        break;
                    };
                    let Ok(len) = u16::try_from(answer.len()) else {
                        break;
                    };
                    let mut out = Vec::with_capacity(answer.len() + 2);
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(&answer);
                    if stream.write_all(&out).await.is_err() {
                        break;
                    }
                }
                drop(permit);
            });
        }
    });
}

/// The name ztunnel's labels give a query type (hickory's `RecordType`, lowercased).
pub fn type_label(t: u16) -> String {
    let known = match t {
        1 => "a",
        2 => "ns",
        5 => "cname",
        6 => "soa",
        12 => "ptr",
        13 => "hinfo",
        15 => "mx",
        16 => "txt",
        28 => "aaaa",
        33 => "srv",
        35 => "naptr",
        41 => "opt",
        43 => "ds",
        46 => "rrsig",
        47 => "nsec",
        48 => "dnskey",
        64 => "svcb",
        65 => "https",
        99 => "spf",
        252 => "axfr",
        251 => "ixfr",
        255 => "any",
        257 => "caa",
        _ => return format!("unknown({t})"),
    };
    known.to_owned()
}

impl Ctx {
    /// The client for a query from `src`.
    fn client(&self, snap: &Snapshot, src: IpAddr) -> Option<Client> {
        let w = match &self.who {
            Who::Workload(ns, name) => snap.workload_by_name(ns, name),
            Who::BySource => snap.workload_by_ip(src),
            Who::Pod { namespace, name } => snap
                .workload_by_name(namespace, name)
                .or_else(|| snap.workload_by_ip(src)),
        }?;
        Some(Client::of(w))
    }

    /// The answer to one message, or nothing for bytes too short to answer and for a
    /// response (as ztunnel, which never answers one: no reflection between two proxies).
    async fn handle(
        &self,
        bytes: &[u8],
        src: SocketAddr,
        protocol: &'static str,
    ) -> Option<Vec<u8>> {
        if bytes.get(2).is_some_and(|b| b & 0x80 != 0) {
            return None;
        }
        let msg = match Message::decode(bytes) {
            Ok(m) => m,
            Err(WireError::Short) => return None,
            Err(e) => {
                tracing::debug!(%src, error = %e, "DNS proxy: malformed query");
                return refusal_bytes(bytes, rcode::FORMERR);
            }
        };
        if msg.questions.len() != 1 {
            // ztunnel (hickory) cannot make a request of it and answers SERVFAIL.
            return error(&msg, rcode::SERVFAIL);
        }
        if msg.opcode() != 0 {
            return error(&msg, rcode::NOTIMP);
        }
        let q = &msg.questions[0];
        let mut labels = DnsLabels {
            query_type: type_label(q.qtype),
            protocol,
            ..DnsLabels::default()
        };
        let metrics = &self.state.shared.metrics;
        let current = self.state.current();
        let client = current
            .as_ref()
            .and_then(|(snap, _)| self.client(snap, net_ip(src)));
        let (Some((_, index)), Some(client)) = (current, client) else {
            tracing::debug!(%src, "DNS proxy: query from an unknown workload");
            metrics.request(&labels);
            return error(&msg, rcode::SERVFAIL);
        };
        labels.source_canonical_service = client.canonical_name.clone();
        labels.source_canonical_revision = client.canonical_revision.clone();
        metrics.request(&labels);
        let shared = &self.state.shared;
        match resolve(&index, &shared.policy, &client, &q.name, q.qtype) {
            Resolution::Answer {
                cname,
                owner,
                mut addrs,
            } => {
                // ztunnel shuffles the addresses of every answer.
                addrs.shuffle(&mut rand::thread_rng());
                let result = if addrs.is_empty() {
                    "no records"
                } else {
                    "success"
                };
                access_log(&client, q, result, addrs.len());
                let mut answers = Vec::with_capacity(addrs.len() + 1);
                if let Some(target) = cname {
                    answers.push(Record::new(q.name.clone(), TTL, RData::Cname(target)));
                }
                answers.extend(addrs.into_iter().map(|ip| {
                    let data = match ip {
                        IpAddr::V4(v4) => RData::A(v4),
                        IpAddr::V6(v6) => RData::Aaaa(v6),
                    };
                    Record::new(owner.clone(), TTL, data)
                }));
                let limit = (protocol == "udp").then(|| udp_limit(&msg));
                answer(&msg, answers, limit)
            }
            Resolution::Forward => {
                let started = Instant::now();
                let limit = (protocol == "udp").then(|| udp_limit(&msg));
                let res = shared
                    .forwarder
                    .forward(self.netns.as_ref(), bytes, limit)
                    .await;
                let took = started.elapsed();
                match res {
                    Ok(reply) => {
                        metrics.upstream(&labels, took, !has_answers(&reply));
                        access_log(&client, q, "forwarded", answer_count(&reply));
                        Some(reply)
                    }
                    Err(e) => {
                        access_log(&client, q, &format!("forwarding failed ({e})"), 0);
                        metrics.upstream(&labels, took, true);
                        error(&msg, rcode::SERVFAIL)
                    }
                }
            }
        }
    }
}

/// ztunnel's DNS access line (target `dns`, at DEBUG): who asked what, and what came of it.
fn access_log(client: &Client, q: &Question, result: &str, endpoints: usize) {
    tracing::event!(
        target: "dns",
        tracing::Level::DEBUG,
        src.workload = %client.name,
        src.namespace = %client.namespace,
        query = %type_label(q.qtype).to_uppercase(),
        domain = %q.name,
        result,
        endpoints,
    );
}

fn answer_count(reply: &[u8]) -> usize {
    Message::decode(reply).map_or(0, |m| m.answers.len())
}

fn net_ip(src: SocketAddr) -> IpAddr {
    src.ip().to_canonical()
}

/// ztunnel counts an upstream answer without records (NXDOMAIN, or a name without data of
/// that type) as a failure: its resolver reports both as errors.
fn has_answers(reply: &[u8]) -> bool {
    match Message::decode(reply) {
        Ok(m) => m.rcode() == rcode::NOERROR && !m.answers.is_empty(),
        Err(_) => true,
    }
}

/// The largest answer the client takes over UDP: 512, or what its EDNS says (not below 512).
pub fn udp_limit(query: &Message) -> usize {
    query
        .opt()
        .map_or(CLASSIC_UDP, |e| usize::from(e.udp_size).max(CLASSIC_UDP))
}

/// The response header flags for `query`: its id, opcode, RD and CD, with QR and RA.
fn response_flags(query: &Message, rc: u8) -> u16 {
    (query.flags & (0x7800 | FLAG_RD | FLAG_CD)) | FLAG_QR | FLAG_RA | u16::from(rc & 0xf)
}

/// EDNS in an answer, when the query had it (ztunnel's `response_edns`).
fn opt_record(e: Edns) -> Record {
    Record {
        name: super::wire::Name::root(),
        rtype: TYPE_OPT,
        class: e.udp_size.max(CLASSIC_UDP as u16),
        ttl: (u32::from(e.version) << 16) | if e.dnssec_ok { 0x8000 } else { 0 },
        data: RData::Other(Vec::new()),
    }
}

fn base(query: &Message, rc: u8) -> Message {
    Message {
        id: query.id,
        flags: response_flags(query, rc),
        questions: query.questions.clone(),
        additional: query.opt().map(opt_record).into_iter().collect(),
        ..Message::default()
    }
}

/// An authoritative NOERROR answer; over UDP, one that would exceed `limit` goes out empty
/// with TC set so the client asks again over TCP.
fn answer(query: &Message, answers: Vec<Record>, limit: Option<usize>) -> Option<Vec<u8>> {
    let mut m = base(query, rcode::NOERROR);
    m.flags |= FLAG_AA;
    m.answers = answers;
    let bytes = m.encode().ok()?;
    match limit {
        Some(l) if bytes.len() > l => {
            m.answers.clear();
            m.flags |= FLAG_TC;
            m.encode().ok()
        }
        _ => Some(bytes),
    }
}

/// An error answer echoing the question (without RA, as ztunnel's error answers).
fn error(query: &Message, rc: u8) -> Option<Vec<u8>> {
    let mut m = base(query, rc);
    m.flags &= !FLAG_RA;
    m.encode().ok()
}

/// An error answer to bytes that do not parse: the header's id, no question.
fn refusal_bytes(bytes: &[u8], rc: u8) -> Option<Vec<u8>> {
    let id = header_id(bytes)?;
    let flags = u16::from_be_bytes([bytes[2], bytes[3]]);
    let m = Message {
        id,
        flags: (flags & (0x7800 | FLAG_RD)) | FLAG_QR | u16::from(rc),
        ..Message::default()
    };
    m.encode().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::wire::{Name, Question, TYPE_A};

    fn query(name: &str, edns: Option<u16>) -> Message {
        Message {
            id: 7,
            flags: FLAG_RD,
            questions: vec![Question {
                name: Name::parse(name).unwrap(),
                qtype: TYPE_A,
                qclass: 1,
            }],
            additional: edns
                .map(|s| {
                    opt_record(Edns {
                        udp_size: s,
                        version: 0,
                        dnssec_ok: true,
                    })
                })
                .into_iter()
                .collect(),
            ..Message::default()
        }
    }

    #[test]
    fn answers_echo_the_query_and_truncate_over_the_limit() {
        let q = query("a.example", Some(1232));
        let recs: Vec<Record> = (0..100u8)
            .map(|i| {
                Record::new(
                    Name::parse("a.example").unwrap(),
                    TTL,
                    RData::A([10, 0, 0, i].into()),
                )
            })
            .collect();
        let a =
            Message::decode(&answer(&q, recs[..3].to_vec(), Some(udp_limit(&q))).unwrap()).unwrap();
        assert_eq!(a.id, 7);
        assert!(a.is_response() && a.flags & FLAG_AA != 0 && a.flags & FLAG_RD != 0);
        assert_eq!(a.questions, q.questions);
        assert_eq!(a.answers.len(), 3);
        assert_eq!(a.opt().unwrap().udp_size, 1232);
        assert!(a.opt().unwrap().dnssec_ok);
        // 100 A records of a 9-byte name do not fit 512 bytes without EDNS.
        let q = query("a.example", None);
        let a = Message::decode(&answer(&q, recs.clone(), Some(udp_limit(&q))).unwrap()).unwrap();
        assert!(a.truncated() && a.answers.is_empty());
        let a = Message::decode(&answer(&q, recs, None).unwrap()).unwrap();
        assert_eq!(a.answers.len(), 100);
    }

    #[test]
    fn garbage_gets_formerr_with_its_id() {
        let r = refusal_bytes(
            &[0xbe, 0xef, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff],
            rcode::FORMERR,
        )
        .unwrap();
        let m = Message::decode(&r).unwrap();
        assert_eq!(
            (m.id, m.rcode(), m.is_response()),
            (0xbeef, rcode::FORMERR, true)
        );
        assert!(refusal_bytes(&[1, 2], rcode::FORMERR).is_none());
        assert_eq!(type_label(28), "aaaa");
        assert_eq!(type_label(4242), "unknown(4242)");
    }
}
