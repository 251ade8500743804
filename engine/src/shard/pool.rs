//! The shard's HBONE connection pool: pooled h2 connections, and the guards that keep its
//! books right however a stream's task ends (finished, failed, or dropped mid-way).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use h2::client::SendRequest;
use ringtun_hbone::pool::{AttemptId, ConnId, Pool, PoolKey, PoolLimits, Pooled};
use ringtun_hbone::Identity;

use super::pod::PodShard;
use crate::stream::{KeyBudget, TlsPath};

/// A pooled HBONE connection: a handle to send requests on, and whether its driver task still
/// runs (it stops when the peer sends GOAWAY or the connection fails).
pub struct PooledH2 {
    send: SendRequest<Bytes>,
    /// The key it is pooled under, shared by the slot of every stream on it: one per
    /// connection, not a copy per stream (a key holds identities and their strings).
    key: Rc<PoolKey>,
    alive: Rc<Cell<bool>>,
    peer: Rc<Identity>,
    /// How its records are carried, for the access log of every stream on it.
    tls: TlsPath,
    /// Offloaded connections retire (take no new streams) before their TX key wears out.
    budget: Option<Rc<KeyBudget>>,
    /// In-pod mode: the pod it was opened for; it takes no new streams once the pod is gone.
    pod: Option<Rc<PodShard>>,
}

impl PooledH2 {
    /// A connection pooled under `key` whose driver clears `alive` when it stops; `peer` is
    /// the identity it presented, `budget` its TX key's (kTLS only).
    pub fn new(
        send: SendRequest<Bytes>,
        key: Rc<PoolKey>,
        alive: Rc<Cell<bool>>,
        peer: Rc<Identity>,
        tls: TlsPath,
        budget: Option<Rc<KeyBudget>>,
    ) -> Self {
        PooledH2 {
            send,
            key,
            alive,
            peer,
            tls,
            budget,
            pod: None,
        }
    }

    /// The connection belongs to `pod` (its socket lives in the pod's namespace): unusable once
    /// the pod is removed.
    pub fn for_pod(mut self, pod: Option<Rc<PodShard>>) -> Self {
        self.pod = pod;
        self
    }

    /// A handle to send requests on.
    pub fn sender(&self) -> SendRequest<Bytes> {
        self.send.clone()
    }

    /// How its records are carried.
    pub fn tls(&self) -> TlsPath {
        self.tls
    }

    /// What the connection lends one stream.
    pub fn lend(&self, id: ConnId) -> Lent {
        Lent {
            id,
            key: self.key.clone(),
            send: self.send.clone(),
            alive: self.alive.clone(),
            peer: self.peer.clone(),
            tls: self.tls,
        }
    }
}

impl Pooled for PooledH2 {
    fn is_usable(&self) -> bool {
        self.alive.get()
            && !self.budget.as_ref().is_some_and(|b| b.is_retired())
            && !self.pod.as_ref().is_some_and(|p| p.drain().is_fired())
    }
}

/// What a pooled connection lends one stream: handles that outlive the pool borrow.
pub struct Lent {
    /// The connection's id in the pool.
    pub id: ConnId,
    /// The key it is pooled under (for the stream's [`Slot`]).
    pub key: Rc<PoolKey>,
    /// Where to send the CONNECT.
    pub send: SendRequest<Bytes>,
    /// Cleared to mark the connection dead (its driver does the same when it stops).
    pub alive: Rc<Cell<bool>>,
    /// The identity the peer presented.
    pub peer: Rc<Identity>,
    /// How its records are carried.
    pub tls: TlsPath,
}

/// A shard's HBONE pool (one thread: a `RefCell`, never borrowed across an await).
pub struct HbonePool {
    pool: RefCell<Pool<PooledH2>>,
    limits: PoolLimits,
}

impl HbonePool {
    /// An empty pool with these limits.
    pub fn new(limits: PoolLimits) -> Self {
        HbonePool {
            pool: RefCell::new(Pool::new(limits)),
            limits,
        }
    }

    /// A stream on a pooled connection for `key` that has room, if any.
    pub fn checkout(&self, key: &PoolKey) -> Option<Lent> {
        self.pool
            .borrow_mut()
            .checkout(key)
            .map(|(id, c)| c.lend(id))
    }

    /// A stream promised on a connection being opened for `key` by another stream, if one
    /// still has room; see [`Attempt::joined`].
    pub fn join<'a>(&'a self, key: &'a PoolKey) -> Option<Attempt<'a>> {
        let id = self.pool.borrow_mut().join(key)?;
        Some(Attempt::new(self, key, id, Role::Waiting))
    }

    /// Starts opening a connection for `key`, carrying the caller's stream; see
    /// [`Attempt::finish`].
    pub fn begin<'a>(&'a self, key: &'a PoolKey) -> Attempt<'a> {
        let id = self.pool.borrow_mut().begin(key);
        Attempt::new(self, key, id, Role::Opening)
    }

    /// A stream's place on connection `id` for `key`, given back when the slot drops.
    pub fn slot(self: &Rc<Self>, key: Rc<PoolKey>, id: ConnId) -> Slot {
        Slot {
            pool: self.clone(),
            key,
            id,
        }
    }

    /// Pooled connections now.
    pub fn connections(&self) -> usize {
        self.pool.borrow().connections()
    }

    /// Streams on pooled connections now.
    pub fn streams(&self) -> u64 {
        self.pool.borrow().streams()
    }

    /// Drops connections idle past the pool's idle timeout; returns how many.
    pub fn evict(&self, now: Instant) -> usize {
        self.pool.borrow_mut().evict(now)
    }

    /// Forgets every pooled handle: idle client connections close, busy ones when their last
    /// stream ends.
    pub fn clear(&self) {
        *self.pool.borrow_mut() = Pool::new(self.limits);
    }
}

/// A stream's place on a pooled connection, given back when it drops (however the stream
/// ends).
pub struct Slot {
    pool: Rc<HbonePool>,
    key: Rc<PoolKey>,
    id: ConnId,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool
            .pool
            .borrow_mut()
            .release(&self.key, self.id, Instant::now());
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// This stream opens the connection.
    Opening,
    /// This stream waits for a connection another one opens.
    Waiting,
}

/// A stream's part in a connection being opened, as its opener or as a waiter. Dropped before
/// it is settled (its task went away mid-way), it settles itself so the pool's books stay
/// right: an abandoned opening fails for every waiter instead of leaving them waiting forever,
/// and an abandoned wait gives back the stream it was promised.
pub struct Attempt<'a> {
    pool: &'a HbonePool,
    key: &'a PoolKey,
    id: AttemptId,
    role: Role,
    settled: bool,
}

impl<'a> Attempt<'a> {
    fn new(pool: &'a HbonePool, key: &'a PoolKey, id: AttemptId, role: Role) -> Self {
        Attempt {
            pool,
            key,
            id,
            role,
            settled: false,
        }
    }

    /// A waiter's outcome: a stream on the connection, or why opening it failed.
    pub async fn joined(mut self) -> Result<Lent, String> {
        let outcome = poll_fn(|cx| {
            self.pool
                .pool
                .borrow_mut()
                .poll_joined(self.key, self.id, cx)
                .map(|r| r.map(|(id, c)| c.lend(id)))
        })
        .await;
        self.settled = true;
        outcome
    }

    /// The opener's outcome, handed to every waiter: the connection is pooled (its id
    /// returned), or the failure.
    pub fn finish(mut self, result: Result<PooledH2, String>) -> Option<ConnId> {
        self.settled = true;
        self.pool
            .pool
            .borrow_mut()
            .finish(self.key, self.id, result)
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut pool = self.pool.pool.borrow_mut();
        match self.role {
            Role::Opening => {
                pool.finish(
                    self.key,
                    self.id,
                    Err("connection attempt abandoned".into()),
                );
            }
            Role::Waiting => pool.leave(self.key, self.id, Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    fn key() -> PoolKey {
        let id = Identity::new("cluster.local", "default", "client");
        PoolKey::new(
            id.clone(),
            vec![id],
            "10.0.0.2:15008".parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
        )
    }

    fn pool(max_streams: u32) -> HbonePool {
        HbonePool::new(PoolLimits {
            max_streams,
            idle_timeout: Duration::from_secs(1),
        })
    }

    #[test]
    fn an_abandoned_opening_fails_its_waiters() {
        let (pool, key) = (pool(4), key());
        let opening = pool.begin(&key);
        let waiting = pool
            .join(&key)
            .expect("room on the connection being opened");
        drop(opening);
        assert_eq!(
            pool.pool.borrow().opening(),
            1,
            "the waiter has yet to learn"
        );
        let mut joined = Box::pin(waiting.joined());
        let mut cx = Context::from_waker(Waker::noop());
        match joined.as_mut().poll(&mut cx) {
            Poll::Ready(Err(why)) => assert_eq!(why, "connection attempt abandoned"),
            Poll::Ready(Ok(_)) => panic!("no connection was opened"),
            Poll::Pending => panic!("the waiter must not wait forever"),
        }
        drop(joined);
        assert_eq!(pool.pool.borrow().opening(), 0);
    }

    #[test]
    fn an_abandoned_wait_gives_its_stream_back() {
        let (pool, key) = (pool(2), key());
        let opening = pool.begin(&key);
        let waiting = pool.join(&key).expect("one stream of room left");
        assert!(
            pool.join(&key).is_none(),
            "full: the opener's and the waiter's"
        );
        drop(waiting);
        let again = pool.join(&key).expect("the abandoned stream is free again");
        drop(again);
        assert!(opening.finish(Err("test".into())).is_none());
        assert_eq!(pool.pool.borrow().opening(), 0);
    }

    #[test]
    fn a_waiter_polled_before_the_outcome_waits() {
        let (pool, key) = (pool(4), key());
        let opening = pool.begin(&key);
        let mut joined = Box::pin(pool.join(&key).expect("room").joined());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(joined.as_mut().poll(&mut cx).is_pending());
        // Dropped while pending: it leaves, and the opener's outcome has nobody to tell.
        drop(joined);
        assert!(opening.finish(Err("test".into())).is_none());
        assert_eq!(pool.pool.borrow().opening(), 0);
    }
}
