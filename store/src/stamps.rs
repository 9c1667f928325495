//! Change stamps: a cheap way for a reader to learn that a group of records
//! may have changed since it last looked, so it can keep what it derived from
//! them (the discovery lookup keeps a cluster's JSON answer).
//!
//! A record's group is its namespace plus the first segment of its key (the
//! part before the first `/`, or the whole key when it has none). The groups
//! share a fixed array of counters by hash: a write bumps its group's counter
//! after the engine applied it, so two equal stamps of a group, the first
//! taken before a read, prove that no write to the group landed after that
//! read began. Groups that share a counter only cost each other spurious
//! changes, never a missed one.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by all groups: fixed memory whatever the registry holds.
const SLOTS: usize = 4096;

pub(crate) struct ChangeStamps {
    slots: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
}

impl ChangeStamps {
    pub(crate) fn new() -> Self {
        ChangeStamps {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The slot of the group of `ns \0 key` (the engine's record key without
    /// its tree prefix).
    pub(crate) fn slot_of_ns_key(&self, nk: &[u8]) -> usize {
        let ns_end = nk.iter().position(|b| *b == 0).unwrap_or(nk.len());
        let key = nk.get(ns_end + 1..).unwrap_or_default();
        let segment_end = key.iter().position(|b| *b == b'/').unwrap_or(key.len());
        self.slot(&nk[..ns_end], &key[..segment_end])
    }

    fn slot(&self, ns: &[u8], segment: &[u8]) -> usize {
        let mut h = self.hasher.build_hasher();
        ns.hash(&mut h);
        segment.hash(&mut h);
        (h.finish() % SLOTS as u64) as usize
    }

    /// The current stamp of group (`ns`, `segment`).
    pub(crate) fn get(&self, ns: &str, segment: &str) -> u64 {
        self.slots[self.slot(ns.as_bytes(), segment.as_bytes())].load(Ordering::Acquire)
    }

    /// The current stamp of the group of `ns \0 key`.
    pub(crate) fn get_for_ns_key(&self, nk: &[u8]) -> u64 {
        self.slots[self.slot_of_ns_key(nk)].load(Ordering::Acquire)
    }

    /// Marks a write to the groups in `slots` as landed.
    pub(crate) fn bump(&self, slots: impl IntoIterator<Item = usize>) {
        for s in slots {
            self.slots[s].fetch_add(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::ns_key;

    #[test]
    fn a_group_is_the_namespace_and_the_first_key_segment() {
        let s = ChangeStamps::new();
        let a = s.slot_of_ns_key(&ns_key("server", "acme/1"));
        assert_eq!(a, s.slot_of_ns_key(&ns_key("server", "acme/2")));
        assert_eq!(a, s.slot(b"server", b"acme"));
        assert_eq!(
            s.slot_of_ns_key(&ns_key("profile", "node-1")),
            s.slot(b"profile", b"node-1")
        );
        let before = s.get("server", "acme");
        s.bump([a]);
        assert_ne!(s.get("server", "acme"), before);
    }
}
