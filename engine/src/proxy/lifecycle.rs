//! One connection lifecycle for every proxy path: a connection's [`Record`] is created when it
//! arrives, filled in as the decisions about it are made, and written exactly once, when it
//! is dropped: after the path finished or refused the connection, or when its task went away
//! mid-way (cancelled, or unwinding from a panic), as ztunnel's `ConnectionResult` does.
//!
//! Refusing a connection happens here too, one way per carrier: [`refuse_tcp`] closes a
//! captured connection, [`refuse_stream`] answers a CONNECT stream; both count the failure
//! and record the [`Refusal`].

use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use h2::server::SendResponse;
use http::Response;
use monoio::net::TcpStream;

use super::access::{AccessLog, Direction, Outcome, Transferred};
use super::copy::End;
use crate::config::{Service, Workload};
use crate::decide::{Admission, Arrival, Grant, Refusal};
use crate::metrics::Series;
use crate::shard::live::{self, Meter};
use crate::shard::pod::PodShard;
use crate::shard::{Shard, Tally};

/// The `reason` of a connection whose task ended before its path did.
pub(crate) const DROPPED: &str = "the connection's task ended before the connection did";

/// A connection's access record and its end in the metrics, written once, on drop.
///
/// Boxed, so a connection's task holds two pointers for it while it copies; `X` is what else
/// the path keeps until the connection ends (the outbound pool slot), released after the
/// record is written.
pub(crate) struct Record<X = ()> {
    entry: Box<Entry<X>>,
    tally: Rc<Tally>,
}

struct Entry<X> {
    log: AccessLog,
    /// The connection's byte counts, once it carries bytes.
    meter: Option<Meter>,
    /// Written already: the path said how it ended. Otherwise the task was dropped, and the
    /// drop writes it.
    settled: bool,
    held: X,
}

impl<X: Default> Record<X> {
    /// A record for a connection from `src` arriving now on `shard`.
    pub(crate) fn new(shard: &Shard, direction: Direction, src: SocketAddr) -> Self {
        Self::with_tally(shard.tally().clone(), shard.id, direction, src)
    }

    /// A record written to `tally`, for shard number `shard`.
    pub(super) fn with_tally(
        tally: Rc<Tally>,
        shard: usize,
        direction: Direction,
        src: SocketAddr,
    ) -> Self {
        Record {
            entry: Box::new(Entry {
                log: AccessLog::new(direction, src, shard),
                meter: None,
                settled: false,
                held: X::default(),
            }),
            tally,
        }
    }
}

impl<X> Record<X> {
    /// The access-log fields, to fill in as the connection's decisions are made.
    pub(crate) fn log(&mut self) -> &mut AccessLog {
        &mut self.entry.log
    }

    /// What the path keeps until the connection ends.
    pub(crate) fn held(&mut self) -> &mut X {
        &mut self.entry.held
    }

    /// Notes an inbound admission: the workloads it names, and what dry-run policies would
    /// have done (logged, never enforced).
    pub(crate) fn admitted(&mut self, a: &Admission<'_>, arrival: &Arrival<'_>) {
        for (name, would) in &a.dry_run {
            tracing::info!(policy = %name, decision = %would, src = %arrival.src_ip, dst = %arrival.dst.ip(), "authorization dry run");
        }
        // A source known only from its baggage was noted already; the config's entry wins.
        if a.src_workload.is_some() {
            self.source(a.src_workload);
        }
        self.destination(a.dst_workload);
        if a.outcome.as_ref().err().is_none_or(|r| !early(r)) {
            self.opening();
        }
    }

    /// The destination is chosen: ztunnel's `connection opened` (debug), written where ztunnel
    /// starts its record, before policy and the upstream connect, so a connection then refused
    /// by either was opened first.
    pub(crate) fn opening(&self) {
        self.entry.log.opening();
    }

    /// Notes the source workload (the labels and access fields that name it).
    pub(crate) fn source(&mut self, w: Option<&Workload>) {
        self.entry.log.src_workload = w.map(|w| self.tally.metrics.party(w));
    }

    /// Notes the destination workload.
    pub(crate) fn destination(&mut self, w: Option<&Workload>) {
        self.entry.log.dst_workload = w.map(|w| self.tally.metrics.party(w));
    }

    /// Notes the service dialled.
    pub(crate) fn service(&mut self, s: Option<&Service>) {
        self.entry.log.dst_service = s.map(|s| self.tally.metrics.service(s));
    }

    /// The connection is established: counted as opened now (as closed when the record is
    /// written), and registered with the shard's live connections, whose handle the copy loop
    /// takes. `reversed`: the copy's TCP side is the destination.
    /// `pod`: the pod it serves in in-pod mode.
    pub(crate) fn carry(
        &mut self,
        shard: &Shard,
        pod: Option<&PodShard>,
        grant: Option<Grant>,
        reversed: bool,
    ) -> live::Conn {
        self.carry_with(reversed, |series| shard.track(pod, grant, series))
    }

    /// [`Record::carry`], registering through `track` (given the metric series and
    /// `reversed`).
    pub(super) fn carry_with(
        &mut self,
        reversed: bool,
        track: impl FnOnce(Option<(Rc<Series>, bool)>) -> live::Conn,
    ) -> live::Conn {
        let log = &mut self.entry.log;
        log.established(&self.tally.metrics);
        let conn = track(log.series.clone().map(|s| (s, reversed)));
        self.entry.meter = Some(conn.meter());
        conn
    }

    /// Records how the connection ended after carrying bytes.
    pub(crate) fn finish(mut self, end: End) {
        if matches!(end, End::Revoked(_)) {
            self.log().response_flags = Some("DENY");
        }
        self.write(end);
    }

    /// Records a refusal, counted as a failed connection (the caller answers it).
    pub(super) fn refuse(mut self, refusal: &Refusal) {
        Tally::bump(&self.tally.counters.failed);
        let log = self.log();
        log.response_flags = refusal.response_flags();
        log.early = early(refusal);
        self.write(End::Error(refusal.to_string()));
    }

    /// Writes the access line and counts the end in the metrics, once.
    fn write(&mut self, end: End) {
        let e = &mut *self.entry;
        if std::mem::replace(&mut e.settled, true) {
            return;
        }
        let (bytes, unreported) = match &e.meter {
            Some(m) => {
                let (request, response) = m.moved();
                let bytes = Transferred { request, response };
                let (request, response) = m.take_unreported();
                (bytes, Transferred { request, response })
            }
            None => Default::default(),
        };
        let outcome = Outcome {
            end,
            bytes,
            unreported,
        };
        e.log.finish(&self.tally.metrics, &outcome);
    }
}

/// Whether ztunnel refuses this before it has chosen a destination and started its record
/// (its `log_early_deny`: a `connection failed` line, no metric), rather than after.
fn early(refusal: &Refusal) -> bool {
    match refusal {
        Refusal::NotRedirected
        | Refusal::NoEndpoint { .. }
        | Refusal::NotConnect { .. }
        | Refusal::BadAuthority { .. }
        | Refusal::IpMismatch { .. }
        | Refusal::OwnPort
        | Refusal::NoHostname { .. }
        | Refusal::NoServicePort { .. }
        | Refusal::NotServed { .. } => true,
        Refusal::Unreachable { .. }
        | Refusal::Tunnel(_)
        | Refusal::PeerStatus(_)
        | Refusal::Denied { .. }
        | Refusal::DestinationUnreachable { .. }
        | Refusal::Lost(_) => false,
    }
}

impl<X> Drop for Record<X> {
    fn drop(&mut self) {
        if !self.entry.settled {
            self.write(End::Error(DROPPED.into()));
        }
    }
}

/// Refuses a captured TCP connection by closing it, as ztunnel drops the socket of every
/// outbound and inbound-plaintext refusal: the client reads end of file when it has sent
/// nothing yet, and the kernel answers with a reset when the client's bytes are left unread.
pub(crate) fn refuse_tcp<X>(record: Record<X>, client: TcpStream, refusal: Refusal) {
    drop(client);
    record.refuse(&refusal);
}

/// Refuses a CONNECT stream with the refusal's status; its connection and sibling streams are
/// untouched.
pub(crate) fn refuse_stream<X>(
    record: Record<X>,
    mut respond: SendResponse<Bytes>,
    refusal: Refusal,
) {
    if let Some(status) = refusal.status() {
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        let _ = respond.send_response(resp, true);
    }
    record.refuse(&refusal);
}

/// The size of a record's box, which every live connection keeps.
#[cfg(test)]
pub(super) fn entry_size<X>() -> usize {
    std::mem::size_of::<Entry<X>>()
}
