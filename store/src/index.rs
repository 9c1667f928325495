//! The registry's secondary indexes, held in memory and rebuilt from the
//! records at open: which version of each key is held, each origin's records
//! by sequence number, records by expiry, and declared index terms.
//!
//! Deriving them instead of persisting them keeps one engine write per
//! record: raw sled does 65-77k inserts/s here (`HUBMESH_BENCH_ONLY=engine
//! cargo bench -p hubmesh-store`), and four writes per record capped merges
//! near 20k/s (the same bench at commit 9f54c94). It also makes index/record
//! divergence after a crash impossible. The cost is memory (~250 bytes per
//! record, estimated from the structures, not measured) and an open that
//! reads every record once.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::record::{OriginId, Record, Version};

/// `ns \0 key`, shared between the index structures.
pub(crate) type NsKey = Arc<[u8]>;

/// What the index keeps of the held version of a key.
#[derive(Clone, Debug)]
pub(crate) struct Head {
    pub version: Version,
    pub origin: u32,
    pub seq: u64,
    pub expires_ms: u64,
    pub deleted: bool,
    pub terms: Vec<String>,
}

#[derive(Default)]
pub(crate) struct Index {
    pub held: HashMap<NsKey, Head>,
    pub by_origin: Vec<BTreeSet<(u64, NsKey)>>,
    pub by_expiry: BTreeSet<(u64, NsKey)>,
    /// `ns \0 term \0 key`.
    pub by_term: BTreeSet<Vec<u8>>,
    origins: Vec<OriginId>,
    origin_ids: HashMap<OriginId, u32>,
}

pub(crate) fn ns_key(ns: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(ns.len() + key.len() + 1);
    k.extend_from_slice(ns.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

pub(crate) fn term_key(ns: &str, term: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(ns.len() + term.len() + key.len() + 2);
    k.extend_from_slice(ns.as_bytes());
    k.push(0);
    k.extend_from_slice(term.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

/// The namespace part of `ns \0 key`.
pub(crate) fn ns_of(nk: &[u8]) -> &[u8] {
    let end = nk.iter().position(|b| *b == 0).unwrap_or(nk.len());
    &nk[..end]
}

impl Index {
    pub fn origin_id(&mut self, origin: &OriginId) -> u32 {
        if let Some(id) = self.origin_ids.get(origin) {
            return *id;
        }
        let id = self.origins.len() as u32;
        self.origins.push(origin.clone());
        self.origin_ids.insert(origin.clone(), id);
        self.by_origin.push(BTreeSet::new());
        id
    }

    pub fn known_origin(&self, origin: &OriginId) -> Option<u32> {
        self.origin_ids.get(origin).copied()
    }

    pub fn origin(&self, id: u32) -> &OriginId {
        &self.origins[id as usize]
    }

    /// Whether any record of `origin` with sequence number `seq` is held.
    pub fn holds_seq(&self, origin: u32, seq: u64) -> bool {
        let empty: NsKey = Arc::from(&[][..]);
        self.by_origin[origin as usize]
            .range((seq, empty)..)
            .next()
            .is_some_and(|(s, _)| *s == seq)
    }

    pub fn max_seq(&self, origin: u32) -> u64 {
        self.by_origin[origin as usize]
            .last()
            .map(|(s, _)| *s)
            .unwrap_or(0)
    }

    pub fn insert(&mut self, nk: NsKey, r: &Record) {
        let origin = self.origin_id(&r.origin);
        self.by_origin[origin as usize].insert((r.seq, nk.clone()));
        self.by_expiry.insert((r.expires_ms, nk.clone()));
        let terms = if r.deleted {
            Vec::new()
        } else {
            r.terms.clone()
        };
        for t in &terms {
            self.by_term.insert(term_key(&r.ns, t, &r.key));
        }
        self.held.insert(
            nk,
            Head {
                version: r.version,
                origin,
                seq: r.seq,
                expires_ms: r.expires_ms,
                deleted: r.deleted,
                terms,
            },
        );
    }

    pub fn remove(&mut self, nk: &[u8]) -> Option<Head> {
        let (nk, head) = self.held.remove_entry(nk)?;
        self.by_origin[head.origin as usize].remove(&(head.seq, nk.clone()));
        self.by_expiry.remove(&(head.expires_ms, nk.clone()));
        if !head.terms.is_empty() {
            let ns = ns_of(&nk);
            let key = &nk[ns.len() + 1..];
            for t in &head.terms {
                let mut k = Vec::with_capacity(ns.len() + t.len() + key.len() + 2);
                k.extend_from_slice(ns);
                k.push(0);
                k.extend_from_slice(t.as_bytes());
                k.push(0);
                k.extend_from_slice(key);
                self.by_term.remove(&k);
            }
        }
        Some(head)
    }
}
