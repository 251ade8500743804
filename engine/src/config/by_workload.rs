//! What a shard derives from a workload entry once, for every connection of that workload
//! (its metric labels, the `baggage` headers a CONNECT and its answer carry): kept by the
//! entry's [`Stamp`], so a config update that replaces the entry is noticed by one comparison.
//!
//! [`Stamp`]: crate::config::Stamp

use std::cell::RefCell;

use foldhash::HashMap;

use super::Workload;

/// Past this many workloads the memo starts again (a node serves far fewer; a config that
/// churns through uids must not grow it without bound).
const MAX: usize = 4096;

/// One value per workload uid, remade when the workload entry is a different copy.
pub struct ByWorkload<T> {
    map: RefCell<HashMap<String, (u64, T)>>,
}

impl<T> Default for ByWorkload<T> {
    fn default() -> Self {
        ByWorkload {
            map: RefCell::default(),
        }
    }
}

impl<T: Clone> ByWorkload<T> {
    /// The value made from `w`, by `make` the first time this copy of `w` is seen.
    pub fn get(&self, w: &Workload, make: impl FnOnce(&Workload) -> T) -> T {
        self.get_keeping(w, |_, _| false, make)
    }

    /// As [`ByWorkload::get`], but a value made from an earlier copy of `w` is kept (and
    /// vouched for this copy) where `still(value, w)` says it still describes `w`: a copy
    /// whose fields did not change keeps sharing the same value.
    pub fn get_keeping(
        &self,
        w: &Workload,
        still: impl FnOnce(&T, &Workload) -> bool,
        make: impl FnOnce(&Workload) -> T,
    ) -> T {
        let mut map = self.map.borrow_mut();
        let stamp = w.stamp.get();
        if let Some((seen, v)) = map.get_mut(&w.uid) {
            if *seen != stamp {
                if !still(v, w) {
                    *v = make(w);
                }
                *seen = stamp;
            }
            return v.clone();
        }
        if map.len() >= MAX {
            map.clear();
        }
        let v = make(w);
        map.insert(w.uid.clone(), (stamp, v.clone()));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(uid: &str, namespace: &str) -> Workload {
        super::super::test_workload(&format!("uid: {uid}, name: a, namespace: {namespace}"))
    }

    #[test]
    fn a_value_is_made_once_per_copy_of_a_workload() {
        let memo = ByWorkload::default();
        let made = std::cell::Cell::new(0);
        let make = |w: &Workload| {
            made.set(made.get() + 1);
            w.namespace.clone()
        };
        let w = workload("a", "one");
        assert_eq!(memo.get(&w, make), "one");
        assert_eq!(memo.get(&w, make), "one");
        assert_eq!(made.get(), 1);
        // A config update brings a new copy under the same uid: made again, from it.
        let updated = workload("a", "two");
        assert_eq!(memo.get(&updated, make), "two");
        assert_eq!(made.get(), 2);
        // A clone is a new copy too (the config never edits an indexed entry in place).
        assert_eq!(memo.get(&updated.clone(), make), "two");
        assert_eq!(made.get(), 3);
        assert_eq!(memo.get(&workload("b", "three"), make), "three");
    }

    #[test]
    fn it_starts_again_rather_than_grow_without_bound() {
        let memo = ByWorkload::default();
        for i in 0..MAX + 10 {
            memo.get(&workload(&i.to_string(), "ns"), |w| w.uid.clone());
        }
        assert!(memo.map.borrow().len() <= MAX);
    }
}
