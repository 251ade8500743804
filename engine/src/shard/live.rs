//! The shard's live connections: idle limits, idle read buffers, and re-authorization when
//! policies change, without a timer or a task per connection.
//!
//! A monoio `Sleep` is 640 bytes, cache-line aligned, and would sit in every connection's
//! future for its whole life. Instead each connection registers a small record with its
//! thread's sweeper (a shard is one thread, so the registry is the shard's), one task per
//! shard that looks every `SCAN` while any connection is registered: it expires connections
//! quiet for their `--idle-timeout-ms` (so a timeout fires at most one scan late), and tells
//! readers that hold a buffer on a connection quiet for `QUIET` to let it go.
//!
//! A connection admitted by authorization policy also carries its [`Grant`], what the policy
//! looked at. When a new config generation whose policies changed arrives, the shard calls
//! [`recheck`] with it ([`recheck_after`]: a generation that only moved workloads or services
//! asks nothing), and every connection the new policies deny is cut, as ztunnel's
//! `PolicyWatcher` does (`src/proxy/connection_manager.rs`, woken by policy changes only): the
//! copy loop ends with [`Cut::Revoked`] and resets both sides; the others keep running
//! untouched.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::config::Snapshot;
use crate::decide::Grant;
use crate::metrics::Series;

/// How often the sweeper looks.
pub(crate) const SCAN: Duration = Duration::from_millis(250);
/// How long a read may hold its buffer on a connection that moves no bytes.
pub(crate) const QUIET: Duration = Duration::from_secs(1);

/// Why the shard ended a connection that was still moving (or able to move) bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Quiet for its idle limit (`--idle-timeout-ms`).
    Idle(Duration),
    /// A policy change denies it now.
    Revoked,
}

struct Record {
    active: Cell<quanta::Instant>,
    /// Zero: no idle limit.
    idle: Duration,
    expired: Cell<bool>,
    revoked: Cell<bool>,
    /// Readers holding a buffer in a read.
    holding: Cell<u8>,
    quiet: Cell<bool>,
    /// The connection's task (both copy directions and the watchdog run in it).
    waker: Cell<Option<Waker>>,
    /// Boxed: plaintext passthrough and outbound connections have none.
    grant: Option<Box<Grant>>,
    /// Bytes moved by the copy loop, `[first side → other, other → first side]` (the first
    /// side is the copy's TCP socket).
    moved: [Cell<u64>; 2],
    /// Of those, what the shard's metrics already count (see [`flush_bytes`]).
    reported: [Cell<u64>; 2],
    /// The metric series the bytes count in, and whether the first side is the destination
    /// (then its direction 0 is the response direction).
    series: RefCell<Option<(Rc<Series>, bool)>>,
}

impl Record {
    /// `(a, b)` in the copy's orientation as (request, response): client → destination and
    /// back.
    fn oriented(&self, (a, b): (u64, u64)) -> (u64, u64) {
        match &*self.series.borrow() {
            Some((_, true)) => (b, a),
            _ => (a, b),
        }
    }

    /// Bytes moved since the last report, as (received, sent): client → destination and back.
    fn take_unreported(&self) -> (u64, u64) {
        let d = |i: usize| {
            let m = self.moved[i].get();
            let r = self.reported[i].replace(m);
            m - r
        };
        self.oriented((d(0), d(1)))
    }
}

impl Record {
    fn register(&self, cx: &Context<'_>) {
        let w = self.waker.take();
        self.waker.set(match w {
            Some(w) if w.will_wake(cx.waker()) => Some(w),
            _ => Some(cx.waker().clone()),
        });
    }

    /// Cuts a connection that policy no longer allows (`why`), saying so in the log.
    fn revoke(&self, why: &str) {
        if let Some(g) = self.grant.as_deref() {
            tracing::info!(
                src = %g.src_ip,
                dst = %std::net::SocketAddr::new(g.dst_ip, g.dst_port),
                src_identity = g.src_identity.as_deref().map(tracing::field::display),
                reason = %why,
                "connection closed: no longer allowed after a policy update"
            );
        }
        self.revoked.set(true);
        self.wake();
    }

    fn wake(&self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// The shard's registered connections: slots reused through a free list.
#[derive(Default)]
struct Watched {
    slots: Vec<Option<Rc<Record>>>,
    free: Vec<usize>,
    sweeping: bool,
}

impl Watched {
    fn insert(&mut self, r: Rc<Record>) -> usize {
        match self.free.pop() {
            Some(k) => {
                self.slots[k] = Some(r);
                k
            }
            None => {
                self.slots.push(Some(r));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, key: usize) {
        if let Some(slot) = self.slots.get_mut(key) {
            if slot.take().is_some() {
                self.free.push(key);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.free.len() == self.slots.len()
    }
}

thread_local! {
    static WATCHED: RefCell<Watched> = RefCell::default();
}

/// One connection's registration; removed when dropped.
pub struct Conn {
    record: Rc<Record>,
    key: usize,
}

/// A handle on one connection's byte counts that outlives its registration: what its access
/// record reads when the connection ends, however it ends.
pub struct Meter(Rc<Record>);

impl Meter {
    /// Bytes moved in total, as (request, response): client → destination and back.
    pub fn moved(&self) -> (u64, u64) {
        let r = &self.0;
        r.oriented((r.moved[0].get(), r.moved[1].get()))
    }

    /// The bytes not yet in the metrics, as (received, sent), now marked counted: what the
    /// connection's close adds.
    pub fn take_unreported(&self) -> (u64, u64) {
        self.0.take_unreported()
    }
}

/// A reader holding a buffer in a read (see [`Conn::hold`]).
pub(crate) struct Holding<'a>(&'a Record);

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        let h = self.0.holding.get().saturating_sub(1);
        self.0.holding.set(h);
        if h == 0 {
            self.0.quiet.set(false);
        }
    }
}

impl Conn {
    /// Registers a connection with an idle limit (zero: none) and, when policy admitted it,
    /// what it was admitted on.
    pub fn new(idle: Duration, grant: Option<Grant>) -> Self {
        let record = Rc::new(Record {
            active: Cell::new(quanta::Instant::now()),
            idle,
            expired: Cell::new(false),
            revoked: Cell::new(false),
            holding: Cell::new(0),
            quiet: Cell::new(false),
            waker: Cell::new(None),
            grant: grant.map(Box::new),
            moved: Default::default(),
            reported: Default::default(),
            series: RefCell::new(None),
        });
        let (key, start) = WATCHED.with(|w| {
            let mut w = w.borrow_mut();
            let key = w.insert(record.clone());
            let start = !w.sweeping;
            w.sweeping = true;
            (key, start)
        });
        if start {
            monoio::spawn(sweep());
        }
        Conn { record, key }
    }

    /// Counts the connection's bytes in `series` while it lives (see [`flush_bytes`]);
    /// `reversed`: the copy's TCP side is the destination.
    pub fn count_in(&self, series: Rc<Series>, reversed: bool) {
        *self.record.series.borrow_mut() = Some((series, reversed));
    }

    /// `n` bytes moved in `direction` (0: from the copy's TCP side, 1: towards it).
    pub(crate) fn moved(&self, direction: usize, n: u64) {
        let c = &self.record.moved[direction];
        c.set(c.get() + n);
    }

    /// A handle on the connection's byte counts.
    pub fn meter(&self) -> Meter {
        Meter(self.record.clone())
    }

    /// What admitted this connection, if policy did.
    pub fn grant(&self) -> Option<&Grant> {
        self.record.grant.as_deref()
    }

    /// Cuts the connection as denied by policy (`why`; see [`recheck`]).
    pub fn revoke(&self, why: &str) {
        self.record.revoke(why);
    }

    /// A handle that can cut this connection later without keeping it registered.
    pub fn cutter(&self) -> Cutter {
        Cutter(Rc::downgrade(&self.record))
    }

    /// Bytes moved.
    pub(crate) fn touch(&self) {
        self.record.active.set(quanta::Instant::now());
        self.record.quiet.set(false);
    }

    /// Ready once the shard has cut the connection: quiet for its idle limit, or revoked.
    pub(crate) fn cut(&self) -> impl Future<Output = Cut> + '_ {
        poll_fn(|cx| {
            if self.record.revoked.get() {
                return Poll::Ready(Cut::Revoked);
            }
            if self.record.expired.get() {
                return Poll::Ready(Cut::Idle(self.record.idle));
            }
            self.record.register(cx);
            Poll::Pending
        })
    }

    /// Marks a reader as holding a buffer until the guard drops.
    pub(crate) fn hold(&self) -> Holding<'_> {
        self.record.holding.set(self.record.holding.get() + 1);
        Holding(&self.record)
    }

    /// Ready once a held buffer should be let go.
    pub(crate) fn quiet(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(|cx| {
            if self.record.quiet.get() {
                return Poll::Ready(());
            }
            self.record.register(cx);
            Poll::Pending
        })
    }
}

/// A handle that cuts one connection from outside its task (a removed pod's connections, at
/// their deadline); it does not keep the connection's record alive.
pub struct Cutter(Weak<Record>);

impl Cutter {
    /// Whether the connection still runs.
    pub fn is_live(&self) -> bool {
        self.0.strong_count() > 0
    }

    /// Ends the connection's copy loop (as [`Cut::Revoked`]: both sides are reset); returns
    /// whether it was still running.
    pub fn cut(&self) -> bool {
        let Some(r) = self.0.upgrade() else {
            return false;
        };
        r.revoked.set(true);
        r.wake();
        true
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // At thread exit the registry may already be gone; nothing is left to sweep then.
        let _ = WATCHED.try_with(|w| w.borrow_mut().remove(self.key));
    }
}

/// [`recheck`] when `snap`, taken in place of generation `before`, may answer a policy
/// question differently (its policies changed since: see
/// [`Snapshot::policies_changed_since`]); a change of workloads or services alone re-checks
/// nothing, as ztunnel's `PolicyWatcher` wakes on policy changes only. Returns how many were
/// cut.
pub fn recheck_after(
    snap: &Snapshot,
    before: u64,
    denied: impl FnMut(&Grant) -> Option<String>,
) -> usize {
    if snap.policies_changed_since(before) {
        recheck(denied)
    } else {
        0
    }
}

/// Re-authorizes every live connection of this shard that policy admitted: `denied` says why
/// a grant is no longer allowed (`None`: still allowed). Each denied one is cut; returns how
/// many were.
pub fn recheck(mut denied: impl FnMut(&Grant) -> Option<String>) -> usize {
    // The records are collected first: cutting wakes tasks, and a callback must not run while
    // the registry is borrowed.
    let granted: Vec<Rc<Record>> = WATCHED.with(|w| {
        w.borrow()
            .slots
            .iter()
            .flatten()
            .filter(|r| r.grant.is_some() && !r.revoked.get())
            .cloned()
            .collect()
    });
    let mut cut = 0;
    for r in granted {
        let Some(g) = r.grant.as_deref() else {
            continue;
        };
        if let Some(why) = denied(g) {
            r.revoke(&why);
            cut += 1;
        }
    }
    cut
}

/// Hands every live connection's bytes since the last call to `sink(series, received, sent)`,
/// so the byte counters of a long transfer grow while it runs (the scrape calls it), as
/// ztunnel's do.
pub fn flush_bytes(mut sink: impl FnMut(&Series, u64, u64)) {
    WATCHED.with(|w| {
        for r in w.borrow().slots.iter().flatten() {
            let (received, sent) = r.take_unreported();
            if received == 0 && sent == 0 {
                continue;
            }
            if let Some((series, _)) = &*r.series.borrow() {
                sink(series, received, sent);
            } else {
                // No series (the relay bench, tests): nothing to report to.
            }
        }
    });
}

/// Live connections that count in a metric series, as (reported by the source, by the
/// destination): `istio_tcp_sockets_open`.
pub fn open_by_reporter() -> [u64; 2] {
    let mut n = [0u64; 2];
    WATCHED.with(|w| {
        for r in w.borrow().slots.iter().flatten() {
            if let Some((series, _)) = &*r.series.borrow() {
                match series.labels().reporter {
                    Some(crate::metrics::Reporter::Source) => n[0] += 1,
                    Some(crate::metrics::Reporter::Destination) => n[1] += 1,
                    None => {}
                }
            }
        }
    });
    n
}

async fn sweep() {
    // Buffers were let go of in the last sweep: by now their reads have been cancelled
    // and the memory freed.
    let mut released = false;
    loop {
        monoio::time::sleep(SCAN).await;
        let now = quanta::Instant::now();
        if std::mem::take(&mut released) {
            crate::stream::pump::drop_spare_read_buffers();
            crate::alloc::collect_freed();
        }
        let done = WATCHED.with(|w| {
            let mut w = w.borrow_mut();
            for r in w.slots.iter().flatten() {
                let quiet_for = now.duration_since(r.active.get());
                let mut wake = false;
                if !r.idle.is_zero() && !r.expired.get() && quiet_for >= r.idle {
                    r.expired.set(true);
                    wake = true;
                }
                if r.holding.get() > 0 && !r.quiet.get() && quiet_for >= QUIET {
                    r.quiet.set(true);
                    wake = true;
                    released = true;
                }
                if wake {
                    r.wake();
                }
            }
            if w.is_empty() {
                // Give the slots' memory back once a burst of connections is gone.
                *w = Watched::default();
                true
            } else {
                false
            }
        });
        if done {
            // No connection left to watch: nothing on this shard is reading now, so the
            // spare read buffers would only wait for the next burst.
            crate::stream::pump::drop_spare_read_buffers();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::config::{parse, Delta, EntryKey};

    const CONFIG: &str = r#"
workloads:
- {uid: "c//Pod/default/server", name: server, namespace: default, serviceAccount: server, protocol: HBONE, workloadIps: [10.0.0.2], services: {}}
- {uid: "c//Pod/default/other", name: other, namespace: default, serviceAccount: other, protocol: HBONE, workloadIps: [10.0.0.3], services: {}}
policies:
- {name: deny-80, namespace: default, scope: Namespace, action: Deny, dryRun: false, rules: [[[{destinationPorts: [80]}]]]}
"#;

    fn grant(generation: u64) -> Grant {
        Grant {
            src_identity: None,
            src_ip: "10.0.0.1".parse().expect("ip"),
            dst_ip: "10.0.0.2".parse().expect("ip"),
            dst_port: 80,
            generation,
        }
    }

    /// A generation that changes workloads only re-checks nothing, even where the policies in
    /// force would now deny (as ztunnel's `PolicyWatcher`, which wakes on policy changes); one
    /// that changes a policy re-checks and cuts, also when the shard skipped generations.
    #[test]
    fn live_connections_are_rechecked_only_when_the_policies_changed() {
        let full = parse(Path::new("t.yaml"), CONFIG).expect("config").config;
        let deny = Arc::new(full.policies[0].clone());
        let mut without = full.clone();
        without.policies.clear();
        let g1 = Snapshot::new(without, 1);
        let workloads_only = |snap: &Snapshot, generation| {
            let mut d = Delta::default();
            d.workloads.push((
                EntryKey::Position(1),
                Some(Arc::new(full.workloads[1].clone())),
            ));
            snap.apply(d, generation)
        };
        let with_policy = |snap: &Snapshot, generation| {
            let mut d = Delta::default();
            d.policies
                .push((EntryKey::from("deny-80"), Some(deny.clone())));
            snap.apply(d, generation)
        };
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
            .block_on(async {
                let conn = Conn::new(Duration::ZERO, Some(grant(1)));
                let asked = Cell::new(0);
                let decide = |snap: &Snapshot| {
                    let snap = snap.clone();
                    let asked = &asked;
                    move |g: &Grant| {
                        asked.set(asked.get() + 1);
                        crate::decide::revoked(&snap, g)
                    }
                };
                let g2 = workloads_only(&g1, 2);
                assert!(!g2.policies_changed_since(1));
                assert_eq!(recheck_after(&g2, 1, decide(&g2)), 0);
                assert_eq!(asked.get(), 0, "a workload change asks nothing");
                // The policy arrives in generation 3, the shard then gets 4 (workloads only)
                // having last seen 2: the policy change in between still counts.
                let g3 = with_policy(&g2, 3);
                let g4 = workloads_only(&g3, 4);
                assert!(g4.policies_changed_since(2) && !g4.policies_changed_since(3));
                assert_eq!(recheck_after(&g4, 2, decide(&g4)), 1, "denied: cut");
                assert_eq!(asked.get(), 1);
                assert!(conn.record.revoked.get());
                // A whole config (a file reload) may change anything.
                let reloaded = Snapshot::new(full.clone(), 5);
                assert!(reloaded.policies_changed_since(4));
            });
    }
}
