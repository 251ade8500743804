//! [`ChunkMap`]: a hash map split into buckets that snapshots share copy-on-write, and
//! [`Claims`]: the entries that claim one lookup key (a VIP, an IP, a name), in config order.
//!
//! A snapshot of a mesh of 50,000 workloads must be derived from the previous one without
//! copying it: cloning a `ChunkMap` is one reference count, and changing one entry copies the
//! bucket table (pointers only) and that one bucket, never the other entries.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;

use super::delta::EntryKey;

/// Entries per bucket before the table doubles: a change copies about this many.
const LOAD: usize = 64;
/// The smallest table.
const MIN_BUCKETS: usize = 16;
/// The table halves (at least) once fewer than `1/SHRINK` of `LOAD` entries per bucket are
/// left: well below the load that grows it, so a map at a threshold does not flap.
const SHRINK: usize = 8;

/// rustc's Fx hash: the keys come from the control plane, not from connections, so a keyed
/// hash would buy nothing and cost on every lookup.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Fx(u64);

impl Fx {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.add(u64::from_le_bytes(w.try_into().unwrap_or_default()));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(i.into());
    }
    fn write_u16(&mut self, i: u16) {
        self.add(i.into());
    }
    fn write_u32(&mut self, i: u32) {
        self.add(i.into());
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FxBuild = BuildHasherDefault<Fx>;

type Bucket<K, V> = Arc<HashMap<K, V, FxBuild>>;

/// A hash map in copy-on-write buckets (see the module docs).
#[derive(Debug)]
pub(super) struct ChunkMap<K, V> {
    // A slice, not a Vec: one pointer less to chase on every lookup.
    buckets: Arc<[Bucket<K, V>]>,
    len: usize,
}

impl<K, V> Clone for ChunkMap<K, V> {
    fn clone(&self) -> Self {
        ChunkMap {
            buckets: self.buckets.clone(),
            len: self.len,
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Default for ChunkMap<K, V> {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

/// The bucket of a key: the same hash as inside the bucket, mixed again so that the bucket
/// does not follow the bits the bucket's own map uses.
fn slot<Q: Hash + ?Sized>(q: &Q, buckets: usize) -> usize {
    let h = FxBuild::default().hash_one(q);
    let h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    (h ^ (h >> 33)) as usize & (buckets - 1)
}

impl<K: Hash + Eq + Clone, V: Clone> ChunkMap<K, V> {
    /// An empty map sized for about `n` entries.
    pub(super) fn with_capacity(n: usize) -> Self {
        let count = (n / LOAD).next_power_of_two().max(MIN_BUCKETS);
        let empty = Arc::new(HashMap::default());
        ChunkMap {
            buckets: vec![empty; count].into(),
            len: 0,
        }
    }

    /// Number of entries.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The value under `q`.
    pub(super) fn get<Q>(&self, q: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.buckets[slot(q, self.buckets.len())].get(q)
    }

    /// Every entry, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&K, &V)> + '_ {
        self.buckets.iter().flat_map(|b| b.iter())
    }

    /// The bucket at `i`, made this map's own.
    fn bucket_mut(&mut self, i: usize) -> &mut HashMap<K, V, FxBuild> {
        Arc::make_mut(&mut Arc::make_mut(&mut self.buckets)[i])
    }

    /// The value under `q`, to change in place (its bucket is copied if shared).
    pub(super) fn get_mut<Q>(&mut self, q: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = slot(q, self.buckets.len());
        if !self.buckets[i].contains_key(q) {
            return None;
        }
        self.bucket_mut(i).get_mut(q)
    }

    /// Sets `k` to `v`; the value it replaces.
    pub(super) fn insert(&mut self, k: K, v: V) -> Option<V> {
        let i = slot(&k, self.buckets.len());
        let old = self.bucket_mut(i).insert(k, v);
        if old.is_none() {
            self.len += 1;
            if self.len > self.buckets.len() * LOAD {
                self.grow();
            }
        }
        old
    }

    /// Removes `q`; its value.
    pub(super) fn remove<Q>(&mut self, q: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = slot(q, self.buckets.len());
        if !self.buckets[i].contains_key(q) {
            return None;
        }
        let old = self.bucket_mut(i).remove(q);
        self.len -= usize::from(old.is_some());
        if self.buckets.len() > MIN_BUCKETS && self.len * SHRINK < self.buckets.len() * LOAD {
            self.shrink();
        }
        old
    }

    /// Makes room for `more` entries at once (a first push), instead of doubling step by step.
    pub(super) fn reserve(&mut self, more: usize) {
        let want = (self.len + more) / LOAD;
        if want > self.buckets.len() {
            self.regrow(want.next_power_of_two());
        }
    }

    /// Doubles the table: a copy of every entry, once per doubling of the map.
    fn grow(&mut self) {
        self.regrow(self.buckets.len() * 2);
    }

    /// After a mass removal (a cluster scaled down, a stream resynchronised with less): the
    /// entries spread over a table sized for them, at half load, so that the emptied buckets
    /// and the spare capacity of each bucket's map (a `HashMap` never gives it back) go.
    /// Copies every entry left, which are fewer than the removals since the table last
    /// changed size.
    fn shrink(&mut self) {
        let count = (self.len * 2 / LOAD).next_power_of_two().max(MIN_BUCKETS);
        if count < self.buckets.len() {
            self.regrow(count);
        }
    }

    /// Spreads every entry over `count` buckets.
    fn regrow(&mut self, count: usize) {
        let mut fresh: Vec<HashMap<K, V, FxBuild>> = (0..count)
            .map(|_| HashMap::with_capacity_and_hasher(LOAD / 2, FxBuild::default()))
            .collect();
        for (k, v) in self.iter() {
            fresh[slot(k, count)].insert(k.clone(), v.clone());
        }
        self.buckets = fresh.into_iter().map(Arc::new).collect();
    }
}

/// The entries claiming one lookup key, sorted by [`EntryKey`] (config order); the lookup
/// picks among them by its own rule (the last, the first, ztunnel's preference), so that
/// removing the winner brings back the one it shadowed.
#[derive(Clone, Debug)]
pub(super) enum Claims<V> {
    /// The common case: one claimant, no allocation beside the map's.
    One(EntryKey, V),
    /// Several, in config order.
    Many(Vec<(EntryKey, V)>),
}

impl<V: Clone> Claims<V> {
    /// The claimants, in config order.
    pub(super) fn iter(&self) -> impl DoubleEndedIterator<Item = (&EntryKey, &V)> + Clone + '_ {
        let (one, many) = match self {
            Claims::One(k, v) => (Some((k, v)), &[][..]),
            Claims::Many(m) => (None, &m[..]),
        };
        one.into_iter().chain(many.iter().map(|(k, v)| (k, v)))
    }

    /// The last claimant in config order.
    pub(super) fn last(&self) -> Option<&V> {
        self.iter().next_back().map(|(_, v)| v)
    }

    /// The claimant `rank`ing highest, the later in config order among equals (a lone
    /// claimant is not ranked).
    pub(super) fn best_by<R: Ord>(&self, rank: impl Fn(&V) -> R) -> Option<&V> {
        match self {
            Claims::One(_, v) => Some(v),
            Claims::Many(m) => m.iter().map(|(_, v)| v).max_by_key(|v| rank(v)),
        }
    }

    /// The first claimant in config order.
    pub(super) fn first(&self) -> Option<&V> {
        self.iter().next().map(|(_, v)| v)
    }

    fn add(&mut self, key: &EntryKey, v: &V) {
        if let Claims::One(k, old) = self {
            if k == key {
                *old = v.clone();
                return;
            }
        }
        let mut all = match std::mem::replace(self, Claims::Many(Vec::new())) {
            Claims::One(k, old) => vec![(k, old)],
            Claims::Many(m) => m,
        };
        match all.binary_search_by(|(k, _)| k.cmp(key)) {
            Ok(i) => all[i].1 = v.clone(),
            Err(i) => all.insert(i, (key.clone(), v.clone())),
        }
        *self = Claims::Many(all);
    }

    /// Drops `key`'s claim; whether none is left.
    fn drop_claim(&mut self, key: &EntryKey) -> bool {
        match self {
            Claims::One(k, _) => k == key,
            Claims::Many(m) => {
                m.retain(|(k, _)| k != key);
                if m.len() == 1 {
                    if let Some((k, v)) = m.pop() {
                        *self = Claims::One(k, v);
                    }
                    return false;
                }
                m.is_empty()
            }
        }
    }
}

/// Files `v`, the entry `key`, as a claimant of `at`.
pub(super) fn claim<K, V>(map: &mut ChunkMap<K, Claims<V>>, at: K, key: &EntryKey, v: &V)
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    match map.get_mut(&at) {
        Some(c) => c.add(key, v),
        None => {
            map.insert(at, Claims::One(key.clone(), v.clone()));
        }
    }
}

/// Replaces the value the entry `key` claims `at` with (the claim must exist).
pub(super) fn reclaim<K, Q, V>(map: &mut ChunkMap<K, Claims<V>>, at: &Q, key: &EntryKey, v: &V)
where
    K: Hash + Eq + Clone + Borrow<Q>,
    Q: Hash + Eq + ?Sized,
    V: Clone,
{
    if let Some(c) = map.get_mut(at) {
        c.add(key, v);
    }
}

/// Withdraws the entry `key`'s claim on `at`.
pub(super) fn unclaim<K, Q, V>(map: &mut ChunkMap<K, Claims<V>>, at: &Q, key: &EntryKey)
where
    K: Hash + Eq + Clone + Borrow<Q>,
    Q: Hash + Eq + ?Sized,
    V: Clone,
{
    if map.get_mut(at).is_some_and(|c| c.drop_claim(key)) {
        map.remove(at);
    }
}

/// A `namespace` + `name` key, looked up without building it: `&("ns", "name") as &dyn Pair`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct NsName {
    ns: Arc<str>,
    name: Arc<str>,
}

impl NsName {
    pub(super) fn new(ns: &str, name: &str) -> Self {
        NsName {
            ns: ns.into(),
            name: name.into(),
        }
    }
}

/// Two strings, owned or borrowed, hashed and compared alike.
pub(super) trait Pair {
    /// The namespace and the name.
    fn parts(&self) -> (&str, &str);
}

impl Pair for NsName {
    fn parts(&self) -> (&str, &str) {
        (&self.ns, &self.name)
    }
}

impl Pair for (&str, &str) {
    fn parts(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

impl Hash for dyn Pair + '_ {
    fn hash<H: Hasher>(&self, h: &mut H) {
        let (a, b) = self.parts();
        a.hash(h);
        b.hash(h);
    }
}

impl PartialEq for dyn Pair + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn Pair + '_ {}

impl Hash for NsName {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self as &dyn Pair).hash(h);
    }
}

impl<'a> Borrow<dyn Pair + 'a> for NsName {
    fn borrow(&self) -> &(dyn Pair + 'a) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_copies_one_bucket_and_clones_share_the_rest() {
        let mut a: ChunkMap<u32, u32> = ChunkMap::with_capacity(10_000);
        for i in 0..10_000 {
            a.insert(i, i);
        }
        let mut b = a.clone();
        b.insert(7, 70);
        assert_eq!(a.get(&7), Some(&7));
        assert_eq!(b.get(&7), Some(&70));
        let shared = a
            .buckets
            .iter()
            .zip(b.buckets.iter())
            .filter(|(x, y)| Arc::ptr_eq(x, y))
            .count();
        assert_eq!(shared, a.buckets.len() - 1);
        assert_eq!(b.remove(&7), Some(70));
        assert_eq!((a.len(), b.len()), (10_000, 9_999));
    }

    #[test]
    fn grows_and_keeps_every_entry() {
        let mut m: ChunkMap<u32, u32> = ChunkMap::default();
        for i in 0..5_000 {
            m.insert(i, i * 2);
        }
        assert!(m.buckets.len() > MIN_BUCKETS);
        assert!((0..5_000).all(|i| m.get(&i) == Some(&(i * 2))));
        assert_eq!(m.iter().count(), 5_000);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Removing most keys keeps exactly the others, shrinks the table to what they need,
        /// and leaves a snapshot taken before the removals whole.
        #[test]
        fn mass_removal_keeps_the_rest_and_shrinks(
            n in 1_000u32..12_000,
            keep_one_in in 2u32..50,
            seed in proptest::prelude::any::<u32>(),
        ) {
            let mut m: ChunkMap<u32, u32> = ChunkMap::default();
            let key = |i: u32| i.wrapping_mul(2_654_435_761) ^ seed;
            for i in 0..n {
                m.insert(key(i), i);
            }
            let before = m.clone();
            let full = m.buckets.len();
            let mut model = std::collections::HashMap::new();
            for i in 0..n {
                if i % keep_one_in == 0 {
                    model.insert(key(i), i);
                } else {
                    proptest::prop_assert_eq!(m.remove(&key(i)), Some(i));
                }
            }
            proptest::prop_assert_eq!(m.len(), model.len());
            proptest::prop_assert_eq!(m.iter().count(), model.len());
            for (k, v) in &model {
                proptest::prop_assert_eq!(m.get(k), Some(v));
            }
            for i in (0..n).filter(|i| i % keep_one_in != 0) {
                proptest::prop_assert_eq!(m.get(&key(i)), None);
            }
            let buckets = m.buckets.len();
            proptest::prop_assert!(
                buckets == MIN_BUCKETS || m.len() * SHRINK >= buckets * LOAD,
                "{} entries in {} buckets", m.len(), buckets
            );
            if full > MIN_BUCKETS && model.len() * SHRINK < full * LOAD {
                proptest::prop_assert!(buckets < full, "{full} -> {buckets}");
            }
            proptest::prop_assert_eq!(before.len(), n as usize);
            proptest::prop_assert!((0..n).all(|i| before.get(&key(i)) == Some(&i)));
            // It grows again as before.
            for i in n..n + 5_000 {
                m.insert(key(i), i);
            }
            proptest::prop_assert!((n..n + 5_000).all(|i| m.get(&key(i)) == Some(&i)));
            proptest::prop_assert_eq!(m.len(), model.len() + 5_000);
        }
    }

    #[test]
    fn pairs_are_found_by_borrowed_strings() {
        let mut m: ChunkMap<NsName, u8> = ChunkMap::default();
        m.insert(NsName::new("ns", "a"), 1);
        assert_eq!(m.get(&("ns", "a") as &dyn Pair), Some(&1));
        assert_eq!(m.get(&("ns/", "a") as &dyn Pair), None);
        assert_eq!(m.get(&("n", "sa") as &dyn Pair), None);
    }

    #[test]
    fn claims_keep_config_order_and_fall_back() {
        let k = |i| EntryKey::Position(i);
        let mut m: ChunkMap<u8, Claims<&str>> = ChunkMap::default();
        claim(&mut m, 1, &k(5), &"five");
        claim(&mut m, 1, &k(2), &"two");
        claim(&mut m, 1, &k(9), &"nine");
        let c = m.get(&1).unwrap();
        assert_eq!((c.first(), c.last()), (Some(&"two"), Some(&"nine")));
        unclaim(&mut m, &1, &k(9));
        unclaim(&mut m, &1, &k(2));
        assert!(matches!(m.get(&1), Some(Claims::One(_, "five"))));
        unclaim(&mut m, &1, &k(5));
        assert!(m.get(&1).is_none());
    }
}
