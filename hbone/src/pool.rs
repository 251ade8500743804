//! Which pooled HBONE connection a new stream rides on.
//!
//! A pool belongs to one shard, so it is plain data: no locks, no atomics. Connections are keyed
//! like ztunnel's: the same source identity, the same set of acceptable destination identities,
//! the same HBONE address and the same source IP may share an HTTP/2 connection. Time is passed
//! in, so eviction is testable without a clock.
//!
//! Connections being opened are tracked too ([`Pool::begin`], [`Pool::join`]): a stream that
//! finds no room in the pool but a handshake to its key in progress waits for that connection
//! instead of opening its own, so a burst of streams to one key opens one connection per
//! `max_streams` streams, not one per stream (each costs a TLS session and buffers on both ends).

// Seeded at random like std's SipHash, and cheaper per checkout.
use foldhash::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::Identity;

/// What must be equal for two streams to share one HBONE connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Identity our certificate presents.
    pub src_identity: Identity,
    /// Identities the destination may have, sorted and de-duplicated.
    pub dst_identities: Vec<Identity>,
    /// The HBONE address (`<workload ip>:15008`).
    pub dst: SocketAddr,
    /// Source workload IP the streams carry.
    pub src_ip: IpAddr,
}

impl PoolKey {
    /// Builds a key, normalising the identity set so order does not split the pool.
    pub fn new(
        src_identity: Identity,
        mut dst_identities: Vec<Identity>,
        dst: SocketAddr,
        src_ip: IpAddr,
    ) -> Self {
        dst_identities.sort();
        dst_identities.dedup();
        PoolKey {
            src_identity,
            dst_identities,
            dst,
            src_ip,
        }
    }
}

/// Identifies a connection inside a [`Pool`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId(u64);

/// A pooled connection: the pool asks it only whether it can still take streams.
pub trait Pooled {
    /// False once the connection is closing (GOAWAY received, I/O failed).
    fn is_usable(&self) -> bool;
}

/// Identifies a connection being opened inside a [`Pool`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttemptId(u64);

enum Outcome {
    Pending,
    /// The connection is pooled under this id, a stream slot already counted for each waiter.
    Opened(ConnId),
    Failed(String),
}

struct Attempt {
    id: AttemptId,
    /// Streams promised to the connection: the opener's and every waiter's.
    reserved: u32,
    /// Waiters that have not yet collected the outcome (or left).
    waiting: u32,
    wakers: Vec<Waker>,
    outcome: Outcome,
}

struct Entry<C> {
    id: ConnId,
    conn: C,
    active: u32,
    idle_since: Option<Instant>,
}

/// Pool limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    /// Streams one connection carries at most; beyond, a new connection is opened.
    pub max_streams: u32,
    /// A connection with no streams for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            max_streams: 100,
            // ztunnel's POOL_UNUSED_RELEASE_TIMEOUT default.
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Per-shard HBONE connection pool.
pub struct Pool<C> {
    limits: PoolLimits,
    next_id: u64,
    conns: HashMap<PoolKey, Vec<Entry<C>>>,
    opening: HashMap<PoolKey, Vec<Attempt>>,
}

impl<C: Pooled> Pool<C> {
    /// An empty pool.
    pub fn new(limits: PoolLimits) -> Self {
        Pool {
            limits: PoolLimits {
                max_streams: limits.max_streams.max(1),
                ..limits
            },
            next_id: 0,
            conns: HashMap::default(),
            opening: HashMap::default(),
        }
    }

    /// Takes a stream slot on an existing usable connection with room, preferring the busiest so
    /// that quiet connections drain and idle out.
    pub fn checkout(&mut self, key: &PoolKey) -> Option<(ConnId, &C)> {
        let max = self.limits.max_streams;
        let entries = self.conns.get_mut(key)?;
        let e = entries
            .iter_mut()
            .filter(|e| e.active < max && e.conn.is_usable())
            .max_by_key(|e| e.active)?;
        e.active += 1;
        e.idle_since = None;
        Some((e.id, &e.conn))
    }

    /// Adds a new connection that already carries one stream.
    pub fn insert(&mut self, key: PoolKey, conn: C) -> ConnId {
        self.next_id += 1;
        let id = ConnId(self.next_id);
        self.conns.entry(key).or_default().push(Entry {
            id,
            conn,
            active: 1,
            idle_since: None,
        });
        id
    }

    /// Gives a stream slot back; the connection starts its idle clock when it has none left.
    pub fn release(&mut self, key: &PoolKey, id: ConnId, now: Instant) {
        if let Some(e) = self
            .conns
            .get_mut(key)
            .and_then(|v| v.iter_mut().find(|e| e.id == id))
        {
            e.active = e.active.saturating_sub(1);
            if e.active == 0 {
                e.idle_since = Some(now);
            }
        }
    }

    /// Drops connections idle past the timeout and unusable ones without streams; returns how
    /// many were dropped. Dropping the last handle lets h2 close the connection gracefully.
    pub fn evict(&mut self, now: Instant) -> usize {
        let timeout = self.limits.idle_timeout;
        let mut dropped = 0;
        self.conns.retain(|_, v| {
            let before = v.len();
            v.retain(|e| {
                let idle_expired = e
                    .idle_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= timeout);
                let dead = !e.conn.is_usable() && e.active == 0;
                !(idle_expired || dead)
            });
            dropped += before - v.len();
            !v.is_empty()
        });
        dropped
    }

    /// Records that the caller is opening a connection for `key`; it carries the caller's stream
    /// and up to `max_streams - 1` streams that [`join`](Self::join) it meanwhile. The caller
    /// must end it with [`finish`](Self::finish), whatever happens.
    pub fn begin(&mut self, key: &PoolKey) -> AttemptId {
        self.next_id += 1;
        let id = AttemptId(self.next_id);
        let attempt = Attempt {
            id,
            reserved: 1,
            waiting: 0,
            wakers: Vec::new(),
            outcome: Outcome::Pending,
        };
        match self.opening.get_mut(key) {
            Some(v) => v.push(attempt),
            None => {
                self.opening.insert(key.clone(), vec![attempt]);
            }
        }
        id
    }

    /// Promises the caller a stream on a connection being opened for `key`, if one still has
    /// room; the caller then polls [`poll_joined`](Self::poll_joined) until it resolves, or
    /// calls [`leave`](Self::leave).
    pub fn join(&mut self, key: &PoolKey) -> Option<AttemptId> {
        let max = self.limits.max_streams;
        let a = self
            .opening
            .get_mut(key)?
            .iter_mut()
            .find(|a| matches!(a.outcome, Outcome::Pending) && a.reserved < max)?;
        a.reserved += 1;
        a.waiting += 1;
        Some(a.id)
    }

    /// Ends an attempt: a connection is pooled carrying a stream for the opener and one for
    /// every waiter (its id returned), or the failure is handed to every waiter. Wakes them.
    pub fn finish(
        &mut self,
        key: &PoolKey,
        attempt: AttemptId,
        result: Result<C, String>,
    ) -> Option<ConnId> {
        let a = self
            .opening
            .get_mut(key)
            .and_then(|v| v.iter_mut().find(|a| a.id == attempt))?;
        if !matches!(a.outcome, Outcome::Pending) {
            return None;
        }
        let wakers = std::mem::take(&mut a.wakers);
        let opened = match result {
            Ok(conn) => {
                self.next_id += 1;
                let id = ConnId(self.next_id);
                self.conns.entry(key.clone()).or_default().push(Entry {
                    id,
                    conn,
                    active: a.reserved,
                    idle_since: None,
                });
                a.outcome = Outcome::Opened(id);
                Some(id)
            }
            Err(why) => {
                a.outcome = Outcome::Failed(why);
                None
            }
        };
        self.forget_if_done(key, attempt);
        for w in wakers {
            w.wake();
        }
        opened
    }

    /// A waiter's view of its attempt: the connection (its stream slot already counted, to be
    /// given back with [`release`](Self::release)) or why opening it failed.
    pub fn poll_joined(
        &mut self,
        key: &PoolKey,
        attempt: AttemptId,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(ConnId, &C), String>> {
        let Some(a) = self.attempt_mut(key, attempt) else {
            return Poll::Ready(Err("connection attempt vanished".into()));
        };
        let result = match &a.outcome {
            Outcome::Pending => {
                if !a.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    a.wakers.push(cx.waker().clone());
                }
                return Poll::Pending;
            }
            Outcome::Opened(id) => Ok(*id),
            Outcome::Failed(why) => Err(why.clone()),
        };
        a.waiting = a.waiting.saturating_sub(1);
        self.forget_if_done(key, attempt);
        Poll::Ready(match result {
            Ok(id) => match self.get(key, id) {
                Some(c) => Ok((id, c)),
                None => Err("connection left the pool before its stream started".into()),
            },
            Err(why) => Err(why),
        })
    }

    /// A waiter gives up before collecting the outcome: its promised stream is given back.
    pub fn leave(&mut self, key: &PoolKey, attempt: AttemptId, now: Instant) {
        let Some(a) = self.attempt_mut(key, attempt) else {
            return;
        };
        a.waiting = a.waiting.saturating_sub(1);
        let opened = match a.outcome {
            Outcome::Pending => {
                a.reserved = a.reserved.saturating_sub(1);
                None
            }
            Outcome::Opened(id) => Some(id),
            Outcome::Failed(_) => None,
        };
        self.forget_if_done(key, attempt);
        if let Some(id) = opened {
            self.release(key, id, now);
        }
    }

    /// Connections being opened, for tests and metrics.
    pub fn opening(&self) -> usize {
        self.opening.values().map(Vec::len).sum()
    }

    fn get(&self, key: &PoolKey, id: ConnId) -> Option<&C> {
        self.conns
            .get(key)?
            .iter()
            .find(|e| e.id == id)
            .map(|e| &e.conn)
    }

    fn attempt_mut(&mut self, key: &PoolKey, attempt: AttemptId) -> Option<&mut Attempt> {
        self.opening
            .get_mut(key)?
            .iter_mut()
            .find(|a| a.id == attempt)
    }

    /// Drops a finished attempt once every waiter has collected its outcome.
    fn forget_if_done(&mut self, key: &PoolKey, attempt: AttemptId) {
        let Some(v) = self.opening.get_mut(key) else {
            return;
        };
        v.retain(|a| a.id != attempt || matches!(a.outcome, Outcome::Pending) || a.waiting > 0);
        if v.is_empty() {
            self.opening.remove(key);
        }
    }

    /// Connections currently pooled.
    pub fn connections(&self) -> usize {
        self.conns.values().map(Vec::len).sum()
    }

    /// Streams currently open over pooled connections.
    pub fn streams(&self) -> u64 {
        self.conns
            .values()
            .flatten()
            .map(|e| u64::from(e.active))
            .sum()
    }

    /// The configured limits.
    pub fn limits(&self) -> PoolLimits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug)]
    struct Fake(bool);
    impl Pooled for Fake {
        fn is_usable(&self) -> bool {
            self.0
        }
    }

    fn key(n: u8) -> PoolKey {
        PoolKey::new(
            Identity::new("td", "ns", "client"),
            vec![
                Identity::new("td", "ns", "b"),
                Identity::new("td", "ns", "a"),
            ],
            SocketAddr::from(([10, 0, 0, n], 15008)),
            IpAddr::from([10, 0, 0, 1]),
        )
    }

    #[test]
    fn identity_order_does_not_split_the_pool() {
        let a = key(1);
        let mut b = key(1);
        b.dst_identities.reverse();
        let b = PoolKey::new(b.src_identity, b.dst_identities, b.dst, b.src_ip);
        assert_eq!(a, b);
    }

    #[test]
    fn reuses_until_full_then_opens_another() {
        let limits = PoolLimits {
            max_streams: 2,
            idle_timeout: Duration::from_secs(1),
        };
        let mut p = Pool::new(limits);
        assert!(p.checkout(&key(1)).is_none());
        let c1 = p.insert(key(1), Fake(true));
        assert_eq!(p.checkout(&key(1)).map(|x| x.0), Some(c1));
        assert!(p.checkout(&key(1)).is_none(), "connection is full");
        assert!(p.checkout(&key(2)).is_none(), "other key never shares");
        p.insert(key(1), Fake(true));
        assert_eq!(p.connections(), 2);
        assert_eq!(p.streams(), 3);
    }

    #[test]
    fn idle_connections_are_evicted_busy_ones_kept() {
        let t0 = Instant::now();
        let mut p = Pool::new(PoolLimits {
            max_streams: 10,
            idle_timeout: Duration::from_secs(5),
        });
        let a = p.insert(key(1), Fake(true));
        let _b = p.insert(key(2), Fake(true));
        p.release(&key(1), a, t0);
        assert_eq!(p.evict(t0 + Duration::from_secs(4)), 0);
        assert_eq!(p.evict(t0 + Duration::from_secs(5)), 1);
        assert_eq!(p.connections(), 1, "the busy connection stays");
    }

    #[test]
    fn unusable_connections_are_skipped_and_dropped_when_empty() {
        let mut p = Pool::new(PoolLimits::default());
        let a = p.insert(key(1), Fake(false));
        assert!(p.checkout(&key(1)).is_none());
        assert_eq!(p.evict(Instant::now()), 0, "still carries a stream");
        p.release(&key(1), a, Instant::now());
        assert_eq!(p.evict(Instant::now()), 1);
    }

    /// Counts wake-ups, so tests see who was woken.
    struct Count(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    fn counter() -> (std::sync::Arc<Count>, Waker) {
        let c = std::sync::Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }
    fn woken(c: &Count) -> usize {
        c.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn streams_join_a_connection_being_opened_up_to_its_capacity() {
        let mut p: Pool<Fake> = Pool::new(PoolLimits {
            max_streams: 3,
            idle_timeout: Duration::from_secs(1),
        });
        assert!(p.join(&key(1)).is_none(), "nothing being opened");
        let a = p.begin(&key(1));
        let w1 = p.join(&key(1));
        let w2 = p.join(&key(1));
        assert_eq!(w1, Some(a));
        assert_eq!(w2, Some(a));
        assert!(
            p.join(&key(1)).is_none(),
            "opener + 2 waiters fill 3 streams"
        );
        assert!(p.join(&key(2)).is_none(), "other keys never wait on it");
        let (c, waker) = counter();
        let mut cx = Context::from_waker(&waker);
        assert!(p.poll_joined(&key(1), a, &mut cx).is_pending());
        assert!(p.poll_joined(&key(1), a, &mut cx).is_pending());
        let id = p.finish(&key(1), a, Ok(Fake(true)));
        assert!(id.is_some());
        assert_eq!(woken(&c), 1, "one waker, registered once");
        assert_eq!(
            p.streams(),
            3,
            "every waiter's stream is counted on the new connection"
        );
        assert_eq!(
            p.poll_joined(&key(1), a, &mut cx).map(|r| r.map(|x| x.0)),
            Poll::Ready(Ok(id.unwrap_or(ConnId(0))))
        );
        assert_eq!(p.opening(), 1, "one waiter has not collected yet");
        p.leave(&key(1), a, Instant::now());
        assert_eq!(p.opening(), 0);
        assert_eq!(p.streams(), 2, "the waiter that left gave its stream back");
        assert_eq!(p.connections(), 1);
    }

    #[test]
    fn a_failed_attempt_hands_its_error_to_every_waiter() {
        let mut p: Pool<Fake> = Pool::new(PoolLimits::default());
        let a = p.begin(&key(1));
        let b = p.begin(&key(2));
        assert_eq!(p.join(&key(1)), Some(a));
        assert_eq!(p.join(&key(1)), Some(a));
        let (c, waker) = counter();
        let mut cx = Context::from_waker(&waker);
        assert!(p.poll_joined(&key(1), a, &mut cx).is_pending());
        assert_eq!(p.finish(&key(1), a, Err("refused".into())), None);
        assert_eq!(woken(&c), 1);
        assert!(
            p.join(&key(1)).is_none(),
            "a failed attempt takes no more waiters"
        );
        for _ in 0..2 {
            match p.poll_joined(&key(1), a, &mut cx) {
                Poll::Ready(Err(why)) => assert_eq!(why, "refused"),
                _ => panic!("waiter should see the failure"),
            }
        }
        assert_eq!(p.opening(), 1, "only key 2's attempt is left");
        assert_eq!(p.connections(), 0);
        assert!(p.finish(&key(2), b, Ok(Fake(true))).is_some());
        assert_eq!(p.opening(), 0, "no waiters: forgotten at once");
        assert_eq!(p.streams(), 1);
    }

    #[test]
    fn leaving_before_the_outcome_frees_the_promise() {
        let mut p: Pool<Fake> = Pool::new(PoolLimits {
            max_streams: 2,
            idle_timeout: Duration::from_secs(1),
        });
        let a = p.begin(&key(1));
        assert_eq!(p.join(&key(1)), Some(a));
        assert!(p.join(&key(1)).is_none());
        p.leave(&key(1), a, Instant::now());
        assert_eq!(p.join(&key(1)), Some(a), "room again");
        p.leave(&key(1), a, Instant::now());
        p.finish(&key(1), a, Ok(Fake(true)));
        assert_eq!(p.streams(), 1, "only the opener's stream");
        assert_eq!(p.opening(), 0);
    }

    proptest! {
        // Random interleavings of checkouts, releases and evictions never exceed the stream
        // limit per connection and keep the stream count consistent.
        #[test]
        fn random_interaction_respects_limits(ops in proptest::collection::vec((0u8..4, 0u8..3), 1..200)) {
            let t0 = Instant::now();
            let limits = PoolLimits { max_streams: 3, idle_timeout: Duration::from_millis(10) };
            let mut p = Pool::new(limits);
            let mut held: Vec<(PoolKey, ConnId)> = Vec::new();
            let mut clock = 0u64;
            for (op, k) in ops {
                clock += 3;
                let now = t0 + Duration::from_millis(clock);
                let k = key(k);
                match op {
                    0 | 1 => {
                        let id = match p.checkout(&k) { Some((id, _)) => id, None => p.insert(k.clone(), Fake(true)) };
                        held.push((k, id));
                    }
                    2 => if let Some((k, id)) = held.pop() { p.release(&k, id, now) },
                    _ => { p.evict(now); }
                }
                prop_assert_eq!(p.streams(), held.len() as u64);
                for v in p.conns.values() { for e in v { prop_assert!(e.active <= 3); } }
            }
        }
    }
}
