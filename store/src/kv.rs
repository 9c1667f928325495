//! The storage engine behind the store's own API: sled on disk, or an ordered
//! map in memory for tests. Nothing outside this module names sled, so the
//! engine can be swapped (garage had to replace sled; we keep that door open).

use std::collections::BTreeMap;
use std::ops::{Bound, Deref};
use std::path::Path;
use std::sync::{Arc, RwLock};

use crate::error::{Result, StoreError};

/// An open database: a set of named trees plus a flush.
#[derive(Clone)]
pub(crate) enum Kv {
    Sled(sled::Db),
    Mem(Arc<RwLock<BTreeMap<String, MemTree>>>),
}

type MemTree = Arc<RwLock<BTreeMap<Vec<u8>, Vec<u8>>>>;

/// One ordered key space.
#[derive(Clone)]
pub(crate) enum Tree {
    Sled(sled::Tree),
    Mem(MemTree),
}

/// A value read from a tree, borrowed from the engine where it can be.
pub(crate) enum Value {
    Sled(sled::IVec),
    Mem(Vec<u8>),
}

impl Deref for Value {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Value::Sled(v) => v,
            Value::Mem(v) => v,
        }
    }
}

/// Writes to one tree, applied in order. Not atomic on disk: a crash may
/// keep a prefix of them (never a later write without the earlier ones, see
/// [`Tree::apply`]), so callers order them such that every prefix is a
/// consistent state.
#[derive(Default)]
pub(crate) struct Batch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub(crate) fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push((key, Some(value)));
    }
    pub(crate) fn remove(&mut self, key: Vec<u8>) {
        self.ops.push((key, None));
    }
    /// The value this batch last wrote for `key` (a rare path: linear).
    pub(crate) fn find(&self, key: &[u8]) -> Option<&[u8]> {
        self.ops
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The keys written or removed, in order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.ops.iter().map(|(k, _)| k.as_slice())
    }
}

fn poisoned() -> StoreError {
    StoreError::Backend("in-memory tree lock poisoned by a panicked writer".into())
}

impl Kv {
    pub(crate) fn open_sled(path: &Path, cache_bytes: u64) -> Result<Kv> {
        let config = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            // We flush ourselves (group commit); sled's timer flush is only a backstop.
            .flush_every_ms(Some(1000));
        // A handle closed a moment ago (a restart in the same process) may
        // still hold the file lock while sled's background thread winds
        // down: retry briefly before reporting the directory as in use.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            match config.open() {
                Ok(db) => return Ok(Kv::Sled(db)),
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(crate) fn memory() -> Kv {
        Kv::Mem(Arc::default())
    }

    pub(crate) fn tree(&self, name: &str) -> Result<Tree> {
        match self {
            Kv::Sled(db) => Ok(Tree::Sled(db.open_tree(name)?)),
            Kv::Mem(trees) => {
                let mut trees = trees.write().map_err(|_| poisoned())?;
                Ok(Tree::Mem(trees.entry(name.to_owned()).or_default().clone()))
            }
        }
    }

    /// Makes every write applied so far durable (see `specs/store.md` for what
    /// sled's flush does and does not promise). The memory engine has nothing to do.
    pub(crate) fn flush(&self) -> Result<()> {
        match self {
            Kv::Sled(db) => {
                db.flush()?;
                Ok(())
            }
            Kv::Mem(_) => Ok(()),
        }
    }

    pub(crate) fn size_on_disk(&self) -> Result<u64> {
        match self {
            Kv::Sled(db) => Ok(db.size_on_disk()?),
            Kv::Mem(_) => Ok(0),
        }
    }
}

impl Tree {
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Value>> {
        match self {
            Tree::Sled(t) => Ok(t.get(key)?.map(Value::Sled)),
            Tree::Mem(t) => Ok(t
                .read()
                .map_err(|_| poisoned())?
                .get(key)
                .map(|v| Value::Mem(v.clone()))),
        }
    }

    pub(crate) fn apply(&self, batch: Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        match self {
            // One write at a time, in order, not `apply_batch`: sled 0.34's
            // batches take a global write lock and a log manifest each, and
            // under 64 concurrent writers that capped durable writes at
            // 5.5-6.9k/s, against 17-24k/s one key at a time
            // (`HUBMESH_BENCH_ONLY=durable cargo bench -p hubmesh-store`). sled
            // recovers a prefix of its log in LSN order, and each write here
            // takes a later LSN than the one before, so a crash keeps a
            // prefix of the batch.
            Tree::Sled(t) => {
                for (k, v) in batch.ops {
                    match v {
                        Some(v) => {
                            t.insert(k, v)?;
                        }
                        None => {
                            t.remove(k)?;
                        }
                    }
                }
            }
            Tree::Mem(t) => {
                let mut t = t.write().map_err(|_| poisoned())?;
                for (k, v) in batch.ops {
                    match v {
                        Some(v) => t.insert(k, v),
                        None => t.remove(&k),
                    };
                }
            }
        }
        Ok(())
    }

    /// Inserts `value` only if `key` is absent. Returns whether it was inserted.
    pub(crate) fn insert_if_absent(&self, key: &[u8], value: Vec<u8>) -> Result<bool> {
        match self {
            Tree::Sled(t) => Ok(t.compare_and_swap(key, None::<&[u8]>, Some(value))?.is_ok()),
            Tree::Mem(t) => {
                let mut t = t.write().map_err(|_| poisoned())?;
                if t.contains_key(key) {
                    Ok(false)
                } else {
                    t.insert(key.to_vec(), value);
                    Ok(true)
                }
            }
        }
    }

    /// Up to `limit` entries with keys in `[from, to)`, in key order.
    pub(crate) fn range(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Value)>> {
        let upper = match to {
            Some(t) => Bound::Excluded(t.to_vec()),
            None => Bound::Unbounded,
        };
        let lower = Bound::Included(from.to_vec());
        let mut out = Vec::new();
        match self {
            Tree::Sled(t) => {
                for item in t.range::<Vec<u8>, _>((lower, upper)).take(limit) {
                    let (k, v) = item?;
                    out.push((k.to_vec(), Value::Sled(v)));
                }
            }
            Tree::Mem(t) => {
                let t = t.read().map_err(|_| poisoned())?;
                for (k, v) in t.range::<Vec<u8>, _>((lower, upper)).take(limit) {
                    out.push((k.clone(), Value::Mem(v.clone())));
                }
            }
        }
        Ok(out)
    }

    /// Up to `limit` entries whose key starts with `prefix`, starting at `from`
    /// (which must itself start with `prefix`).
    pub(crate) fn prefix_from(
        &self,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Value)>> {
        let end = prefix_end(prefix);
        self.range(from, end.as_deref(), limit)
    }

    pub(crate) fn remove(&self, key: &[u8]) -> Result<bool> {
        match self {
            Tree::Sled(t) => Ok(t.remove(key)?.is_some()),
            Tree::Mem(t) => Ok(t.write().map_err(|_| poisoned())?.remove(key).is_some()),
        }
    }

    pub(crate) fn len(&self) -> Result<usize> {
        match self {
            Tree::Sled(t) => Ok(t.len()),
            Tree::Mem(t) => Ok(t.read().map_err(|_| poisoned())?.len()),
        }
    }
}

/// The smallest key greater than every key starting with `prefix`, or `None`
/// when the prefix is all `0xff`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_is_exclusive_upper_bound() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }
}
