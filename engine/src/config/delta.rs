//! [`Delta`]: changes to a config (workloads, services, policies put or removed), what
//! [`Snapshot::apply`](super::Snapshot::apply) turns into the next snapshot without rebuilding
//! the whole index; and [`EntryKey`], what each entry is known by and ordered by.

use std::sync::Arc;

use super::model::{LocalConfig, Policy, Service, Workload};

/// What an entry of a config is known by, and its place in config order: its position in the
/// local file, or its xDS resource name (istiod's entries are ordered by name). Where entries
/// conflict (two services with one VIP, ...), the rules that name "the later one" mean this
/// order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntryKey {
    /// Position in the file's list.
    Position(usize),
    /// xDS resource name.
    Name(Arc<str>),
}

impl From<&str> for EntryKey {
    fn from(name: &str) -> Self {
        EntryKey::Name(name.into())
    }
}

/// One change: the entry's new value, or `None` to remove it.
pub type Change<T> = (EntryKey, Option<Arc<T>>);

/// Changes to a config, each list applied in order (a key put twice keeps the later value).
#[derive(Clone, Debug, Default)]
pub struct Delta {
    /// Workloads put or removed.
    pub workloads: Vec<Change<Workload>>,
    /// Services put or removed.
    pub services: Vec<Change<Service>>,
    /// Authorization policies put or removed.
    pub policies: Vec<Change<Policy>>,
}

impl Delta {
    /// The whole of `config` as puts, keyed by position.
    pub fn from_config(config: LocalConfig) -> Delta {
        fn puts<T>(v: Vec<T>) -> Vec<Change<T>> {
            v.into_iter()
                .enumerate()
                .map(|(i, x)| (EntryKey::Position(i), Some(Arc::new(x))))
                .collect()
        }
        Delta {
            workloads: puts(config.workloads),
            services: puts(config.services),
            policies: puts(config.policies),
        }
    }

    /// True when it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty() && self.services.is_empty() && self.policies.is_empty()
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.workloads.len() + self.services.len() + self.policies.len()
    }

    /// `later`'s changes after these.
    pub fn append(&mut self, later: Delta) {
        self.workloads.extend(later.workloads);
        self.services.extend(later.services);
        self.policies.extend(later.policies);
    }
}
