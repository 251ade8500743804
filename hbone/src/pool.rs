//! Which pooled HBONE connection a new stream rides on.
//!
//! A pool belongs to one shard, so it is plain data: no locks, no atomics. Connections are keyed
//! like ztunnel's: the same source identity, the same set of acceptable destination identities,
//! the same HBONE address and the same source IP may share an HTTP/2 connection. Time is passed
//! in, so eviction is testable without a clock.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
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
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Per-shard HBONE connection pool.
pub struct Pool<C> {
    limits: PoolLimits,
    next_id: u64,
    conns: HashMap<PoolKey, Vec<Entry<C>>>,
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
            conns: HashMap::new(),
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
