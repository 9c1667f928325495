//! The registry: merge, reads, indexes, expiry and anti-entropy bookkeeping,
//! all in one tree of the engine so that a record and its index entries change
//! in one atomic batch.
//!
//! Key layout of the `registry` tree (`ns` and `key` never contain NUL):
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `r` | ns `\0` key | encoded [`Record`] |
//! | `o` | len(origin) origin seq(be64) ns `\0` key | — |
//! | `x` | expires(be64) ns `\0` key | — |
//! | `t` | ns `\0` term `\0` key | — |
//! | `w` | origin | watermark (be64) |
//! | `m` | name | meta value |

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::codec::{self, FORMAT_VERSION};
use crate::commit::{Committer, DurableTicket};
use crate::error::{Result, StoreError};
use crate::kv::{Batch, Kv, Tree};
use crate::local::{LocalTree, SealKey, SealedTree};
use crate::record::{Draft, OriginId, Record, Signer, Version, check_ns};

const META_FORMAT: &[u8] = b"mformat";
const META_HLC: &[u8] = b"mhlc";

/// Where "now" comes from. Tests drive a manual clock to exercise expiry.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The system's wall clock.
    #[default]
    System,
    /// A clock that only moves when told to (milliseconds since the epoch).
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// A manual clock starting at `ms`.
    pub fn manual(ms: u64) -> Clock {
        Clock::Manual(Arc::new(AtomicU64::new(ms)))
    }
    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            Clock::Manual(ms) => ms.load(Ordering::Acquire),
        }
    }
    /// Moves a manual clock forward (no effect on the system clock).
    pub fn advance(&self, by: Duration) {
        if let Clock::Manual(ms) = self {
            ms.fetch_add(by.as_millis() as u64, Ordering::AcqRel);
        }
    }
}

/// How to open a store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Data directory; `None` opens the in-memory engine.
    pub path: Option<PathBuf>,
    /// Engine page cache, bytes.
    pub cache_bytes: u64,
    /// Source of time.
    pub clock: Clock,
    /// How long the flusher waits for more writers to join a group commit
    /// before flushing (adds at most this much to an acknowledged write).
    pub commit_delay: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: None,
            cache_bytes: 256 * 1024 * 1024,
            clock: Clock::System,
            commit_delay: Duration::from_micros(500),
        }
    }
}

/// What happened to one record offered to [`Store::merge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeOutcome {
    /// It won and is now the held version of its key.
    Applied,
    /// The exact record was already held.
    Duplicate,
    /// A newer (or equal-ranked) record for its key is held.
    Stale,
    /// It had already expired.
    Expired,
    /// Its shape or size broke the record model; the reason.
    Rejected(String),
}

/// The result of one merge batch.
#[derive(Debug)]
pub struct MergeReport {
    /// One outcome per offered record, in order.
    pub outcomes: Vec<MergeOutcome>,
    /// Wait on this with [`Store::durable`] to know the batch is on disk.
    pub ticket: DurableTicket,
}

impl MergeReport {
    /// How many records were applied.
    pub fn applied(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| **o == MergeOutcome::Applied)
            .count()
    }
}

/// One page of an origin's records for anti-entropy.
#[derive(Debug, Clone)]
pub struct SyncPage {
    /// Held, unexpired records of the origin with `seq > after`, ascending by seq.
    pub records: Vec<Record>,
    /// Where the next page starts (`after` for the next call), if there is more.
    pub next_after: Option<u64>,
    /// This store's watermark for the origin: once every page has been read,
    /// the reader holds everything of the origin up to here (or newer versions).
    pub watermark: u64,
}

/// The hub's embedded registry. Cheap to clone; all clones share one database.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use hubmesh_store::{Draft, OriginId, Signer, Store};
/// struct Unsigned;
/// impl Signer for Unsigned {
///     fn origin(&self) -> OriginId { OriginId::new(*b"hub-a") }
///     fn sign(&self, _msg: &[u8]) -> Vec<u8> { Vec::new() }
/// }
/// let store = Store::memory();
/// let draft = Draft { ns: "server".into(), key: "acme/1".into(), body: vec![0xa0],
///     expires_ms: u64::MAX, deleted: false, terms: vec![] };
/// store.originate(vec![draft], &Unsigned).await.unwrap();
/// assert!(store.get("server", "acme/1").unwrap().is_some());
/// # });
/// ```
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

struct Inner {
    kv: Kv,
    reg: Tree,
    clock: Clock,
    path: Option<PathBuf>,
    seal_key: SealKey,
    /// One writer at a time: merge is read-compare-write and must not interleave.
    write: Mutex<WriteState>,
    // Declared last: dropped after the trees, it flushes what they hold.
    committer: Committer,
}

struct WriteState {
    hlc: Version,
    watermarks: HashMap<OriginId, u64>,
    /// Next sequence number per origin this hub signs as (usually one).
    own_next: HashMap<OriginId, u64>,
}

impl Store {
    /// Opens (or creates) the on-disk store in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store> {
        Store::open_with(StoreConfig {
            path: Some(dir.as_ref().to_path_buf()),
            ..StoreConfig::default()
        })
    }

    /// A fresh in-memory store.
    pub fn memory() -> Store {
        Store::open_with(StoreConfig::default())
            .expect("opening the in-memory engine has no failure path")
    }

    /// Opens a store as configured.
    pub fn open_with(config: StoreConfig) -> Result<Store> {
        let (kv, seal_key) = match &config.path {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                let kv = Kv::open_sled(&dir.join("db"), config.cache_bytes)?;
                (kv, SealKey::load_or_create(&dir.join("store.key"))?)
            }
            None => (Kv::memory(), SealKey::random()),
        };
        let reg = kv.tree("registry")?;
        match reg.get(META_FORMAT)? {
            None => {
                let mut b = Batch::default();
                b.insert(META_FORMAT.to_vec(), vec![FORMAT_VERSION]);
                reg.apply(b)?;
            }
            Some(v) if v.len() == 1 && v[0] <= FORMAT_VERSION => {}
            Some(v) => {
                return Err(StoreError::UnknownFormat {
                    found: v.first().copied().unwrap_or(0),
                    supported: FORMAT_VERSION,
                });
            }
        }
        let hlc = match reg.get(META_HLC)? {
            Some(v) => codec::decode_value(&v, "meta hlc")?,
            None => Version::default(),
        };
        let mut watermarks = HashMap::new();
        for (k, v) in reg.prefix_from(b"w", b"w", usize::MAX)? {
            watermarks.insert(OriginId::new(&k[1..]), be64(&v, "watermark")?);
        }
        let committer = Committer::start(kv.clone(), config.commit_delay)?;
        Ok(Store {
            inner: Arc::new(Inner {
                kv,
                reg,
                clock: config.clock,
                path: config.path,
                seal_key,
                write: Mutex::new(WriteState {
                    hlc,
                    watermarks,
                    own_next: HashMap::new(),
                }),
                committer,
            }),
        })
    }

    /// The store's clock.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// The data directory, for an on-disk store.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    fn lock(&self) -> Result<MutexGuard<'_, WriteState>> {
        self.inner
            .write
            .lock()
            .map_err(|_| StoreError::Backend("writer lock poisoned by a panicked writer".into()))
    }

    /// Merges records from anywhere (gossip, DHT, sync, local) by
    /// last-writer-wins on `(version, origin)`. The batch is applied atomically
    /// and visible on return; wait on `report.ticket` for durability.
    /// Signatures are *not* checked here: the mesh checks them first.
    pub fn merge(&self, records: Vec<Record>) -> Result<MergeReport> {
        let now = self.inner.clock.now_ms();
        let mut st = self.lock()?;
        let mut w = BatchWriter::new(&self.inner.reg);
        let mut outcomes = Vec::with_capacity(records.len());
        for rec in records {
            outcomes.push(w.merge_one(&mut st, rec, now)?);
        }
        w.finish(&mut st)?;
        let ticket = self.inner.committer.applied();
        Ok(MergeReport { outcomes, ticket })
    }

    /// [`Store::merge`], then wait until the batch is on disk.
    pub async fn merge_durable(&self, records: Vec<Record>) -> Result<MergeReport> {
        let report = self.merge(records)?;
        self.durable(report.ticket).await?;
        Ok(report)
    }

    /// Creates, signs and applies records this hub originates. Each gets the
    /// next sequence number of `signer.origin()` and an HLC version above both
    /// this hub's clock and whatever it holds for the key, so a local write
    /// always supersedes what the hub could see when it was made.
    pub fn originate_nowait(
        &self,
        drafts: Vec<Draft>,
        signer: &dyn Signer,
    ) -> Result<(Vec<Record>, DurableTicket)> {
        let now = self.inner.clock.now_ms();
        let origin = signer.origin();
        let mut st = self.lock()?;
        let mut w = BatchWriter::new(&self.inner.reg);
        let mut out = Vec::with_capacity(drafts.len());
        for d in drafts {
            check_ns(&d.ns)?;
            let mut version = tick(st.hlc, now);
            if let Some(held) = w.current(&d.ns, &d.key)? {
                if held.version >= version {
                    version = tick(held.version, held.version.wall_ms);
                }
            }
            st.hlc = version;
            let seq = self.next_own_seq(&mut st, &origin)?;
            let mut rec = Record {
                ns: d.ns,
                key: d.key,
                body: d.body,
                origin: origin.clone(),
                version,
                seq,
                expires_ms: d.expires_ms,
                deleted: d.deleted,
                terms: d.terms,
                sig: Vec::new(),
            };
            rec.check_shape()?;
            rec.sig = signer.sign(&codec::signing_bytes(&rec));
            codec::encode_record(&rec)?;
            match w.merge_one(&mut st, rec.clone(), now)? {
                MergeOutcome::Applied | MergeOutcome::Expired => {}
                MergeOutcome::Rejected(reason) => {
                    return Err(StoreError::Corrupt {
                        context: "originate".into(),
                        reason,
                    });
                }
                other => {
                    return Err(StoreError::Backend(format!(
                        "own write did not apply: {other:?}"
                    )));
                }
            }
            out.push(rec);
        }
        w.meta_hlc = Some(st.hlc);
        w.finish(&mut st)?;
        Ok((out, self.inner.committer.applied()))
    }

    /// [`Store::originate_nowait`], then wait until the records are on disk:
    /// when this returns `Ok`, the write may be acknowledged.
    pub async fn originate(&self, drafts: Vec<Draft>, signer: &dyn Signer) -> Result<Vec<Record>> {
        let (records, ticket) = self.originate_nowait(drafts, signer)?;
        self.durable(ticket).await?;
        Ok(records)
    }

    fn next_own_seq(&self, st: &mut WriteState, origin: &OriginId) -> Result<u64> {
        let next = match st.own_next.get(origin) {
            Some(n) => *n,
            None => {
                // Never reuse a sequence number: start above both the watermark
                // and the highest seq of this origin held (a copy of our own
                // records may have come back from peers after a data loss).
                let wm = st.watermarks.get(origin).copied().unwrap_or(0);
                let prefix = origin_prefix(origin);
                let held = match self.inner.reg.last_in_prefix(&prefix)? {
                    Some(k) => seq_of(&k, prefix.len())?,
                    None => 0,
                };
                wm.max(held) + 1
            }
        };
        st.own_next.insert(origin.clone(), next + 1);
        Ok(next)
    }

    /// Waits until every write covered by `ticket` is on disk (group commit).
    pub async fn durable(&self, ticket: DurableTicket) -> Result<()> {
        self.inner.committer.wait(ticket).await
    }

    /// Flushes everything applied so far to disk, synchronously.
    pub fn flush_now(&self) -> Result<()> {
        self.inner.kv.flush()
    }

    /// The live record for `(ns, key)`: not expired, not deleted.
    pub fn get(&self, ns: &str, key: &str) -> Result<Option<Record>> {
        Ok(self.get_any(ns, key)?.filter(|r| !r.deleted))
    }

    /// The held record for `(ns, key)` if not expired, tombstones included
    /// (what the mesh serves to peers, so deletes travel too).
    pub fn get_any(&self, ns: &str, key: &str) -> Result<Option<Record>> {
        let now = self.inner.clock.now_ms();
        match self.inner.reg.get(&rec_key(ns, key))? {
            Some(v) => {
                let r = codec::decode_record(&v)?;
                Ok((!r.is_expired(now)).then_some(r))
            }
            None => Ok(None),
        }
    }

    /// The encoded bytes of the held record for `(ns, key)` (tombstones
    /// included, expired excluded), exactly as stored and signed.
    pub fn get_raw(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let now = self.inner.clock.now_ms();
        match self.inner.reg.get(&rec_key(ns, key))? {
            Some(v) => {
                let r = codec::decode_record(&v)?;
                Ok((!r.is_expired(now)).then(|| v.to_vec()))
            }
            None => Ok(None),
        }
    }

    /// Live records of `ns` whose key starts with `key_prefix`, in key order,
    /// starting after `after` (a key from a previous page), at most `limit`.
    pub fn scan_prefix(
        &self,
        ns: &str,
        key_prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Record>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = self.inner.clock.now_ms();
        let prefix = rec_key(ns, key_prefix);
        let mut from = match after {
            Some(a) => {
                let mut k = rec_key(ns, a);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        // Expired or deleted entries are skipped, so read in chunks until the page is full.
        loop {
            let chunk = self.inner.reg.prefix_from(&prefix, &from, limit.max(16))?;
            let exhausted = chunk.len() < limit.max(16);
            for (k, v) in &chunk {
                let r = codec::decode_record(v)?;
                if !r.deleted && !r.is_expired(now) {
                    out.push(r);
                    if out.len() == limit {
                        return Ok(out);
                    }
                }
                from = k.clone();
                from.push(0);
            }
            if exhausted {
                return Ok(out);
            }
        }
    }

    /// Live records of `ns` that declare index term `term`, at most `limit`.
    pub fn by_term(&self, ns: &str, term: &str, limit: usize) -> Result<Vec<Record>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut prefix = vec![b't'];
        prefix.extend_from_slice(ns.as_bytes());
        prefix.push(0);
        prefix.extend_from_slice(term.as_bytes());
        prefix.push(0);
        let mut out = Vec::new();
        let mut from = prefix.clone();
        loop {
            let chunk = self.inner.reg.prefix_from(&prefix, &from, 256)?;
            let exhausted = chunk.len() < 256;
            for (k, _) in &chunk {
                let key =
                    std::str::from_utf8(&k[prefix.len()..]).map_err(|e| StoreError::Corrupt {
                        context: "term index".into(),
                        reason: e.to_string(),
                    })?;
                if let Some(r) = self.get(ns, key)? {
                    out.push(r);
                    if out.len() == limit {
                        return Ok(out);
                    }
                }
                from = k.clone();
                from.push(0);
            }
            if exhausted {
                return Ok(out);
            }
        }
    }

    /// Records of `origin` with `seq > after`, ascending, at most `limit`:
    /// how the mesh answers an anti-entropy pull without scanning everything.
    pub fn records_since(&self, origin: &OriginId, after: u64, limit: usize) -> Result<SyncPage> {
        let now = self.inner.clock.now_ms();
        let watermark = self.watermark(origin)?;
        let prefix = origin_prefix(origin);
        let mut from = prefix.clone();
        from.extend_from_slice(&after.saturating_add(1).to_be_bytes());
        if after == u64::MAX {
            return Ok(SyncPage {
                records: Vec::new(),
                next_after: None,
                watermark,
            });
        }
        let limit = limit.max(1);
        let mut records = Vec::new();
        let mut last_seq = after;
        let mut more = false;
        loop {
            let chunk = self
                .inner
                .reg
                .prefix_from(&prefix, &from, limit.saturating_add(1))?;
            let exhausted = chunk.len() <= limit;
            for (k, _) in chunk {
                if records.len() == limit {
                    more = true;
                    break;
                }
                let seq = seq_of(&k, prefix.len())?;
                last_seq = seq;
                let (ns, key) = split_ns_key(&k[prefix.len() + 8..])?;
                if let Some(raw) = self.inner.reg.get(&rec_key(ns, key))? {
                    let r = codec::decode_record(&raw)?;
                    if r.origin == *origin && r.seq == seq && !r.is_expired(now) {
                        records.push(r);
                    }
                }
                from = k;
                from.push(0);
            }
            if more || exhausted {
                break;
            }
        }
        Ok(SyncPage {
            records,
            next_after: more.then_some(last_seq),
            watermark,
        })
    }

    /// This store's watermark for `origin`: it holds every record of the
    /// origin up to this sequence number, or a newer version of its key.
    pub fn watermark(&self, origin: &OriginId) -> Result<u64> {
        Ok(self.lock()?.watermarks.get(origin).copied().unwrap_or(0))
    }

    /// Every origin's watermark.
    pub fn watermarks(&self) -> Result<Vec<(OriginId, u64)>> {
        let st = self.lock()?;
        let mut v: Vec<_> = st.watermarks.iter().map(|(o, s)| (o.clone(), *s)).collect();
        v.sort();
        Ok(v)
    }

    /// Raises the watermark of `origin` to `seq` after an anti-entropy pull
    /// that read every page a peer had up to its watermark `seq`.
    pub fn advance_watermark(&self, origin: &OriginId, seq: u64) -> Result<()> {
        let mut st = self.lock()?;
        let cur = st.watermarks.get(origin).copied().unwrap_or(0);
        if seq > cur {
            let mut b = Batch::default();
            b.insert(wm_key(origin), seq.to_be_bytes().to_vec());
            self.inner.reg.apply(b)?;
            st.watermarks.insert(origin.clone(), seq);
        }
        Ok(())
    }

    /// Removes up to `limit` expired records (and their index entries); returns
    /// how many were removed. Tombstones go too, once they expire.
    pub fn sweep_expired(&self, limit: usize) -> Result<usize> {
        let now = self.inner.clock.now_ms();
        let mut upper = vec![b'x'];
        upper.extend_from_slice(&now.saturating_add(1).to_be_bytes());
        let due = self.inner.reg.range(b"x", Some(&upper), limit)?;
        if due.is_empty() {
            return Ok(0);
        }
        let _st = self.lock()?;
        let mut b = Batch::default();
        let mut removed = 0;
        for (k, _) in due {
            let (ns, key) = split_ns_key(&k[9..])?;
            let rk = rec_key(ns, key);
            if let Some(raw) = self.inner.reg.get(&rk)? {
                match codec::decode_record(&raw) {
                    Ok(r) if r.is_expired(now) => {
                        remove_indexes(&mut b, &r);
                        b.remove(rk);
                        removed += 1;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "sweeping an undecodable record");
                        b.remove(rk);
                    }
                }
            }
            b.remove(k);
        }
        self.inner.reg.apply(b)?;
        let _ = self.inner.committer.applied();
        Ok(removed)
    }

    /// Sweeps expired records every `period`, forever; run it as a task and
    /// drop (abort) it on shutdown.
    pub async fn run_sweeper(self, period: Duration) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            loop {
                match self.sweep_expired(10_000) {
                    Ok(n) if n == 10_000 => tokio::task::yield_now().await,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "expiry sweep failed");
                        break;
                    }
                }
            }
        }
    }

    /// Number of live (unexpired, undeleted) records per namespace. Scans the
    /// registry: for operator views, not hot paths.
    pub fn namespace_counts(&self) -> Result<Vec<(String, u64)>> {
        let now = self.inner.clock.now_ms();
        let mut counts: Vec<(String, u64)> = Vec::new();
        let mut from = b"r".to_vec();
        loop {
            let chunk = self.inner.reg.prefix_from(b"r", &from, 1024)?;
            let exhausted = chunk.len() < 1024;
            for (k, v) in &chunk {
                let r = codec::decode_record(v)?;
                if !r.deleted && !r.is_expired(now) {
                    match counts.last_mut() {
                        Some((ns, n)) if *ns == r.ns => *n += 1,
                        _ => counts.push((r.ns, 1)),
                    }
                }
                from = k.clone();
                from.push(0);
            }
            if exhausted {
                return Ok(counts);
            }
        }
    }

    /// Group-commit flushes performed since open.
    pub fn flush_count(&self) -> u64 {
        self.inner.committer.flushes()
    }

    /// Bytes the engine occupies on disk (0 for the memory engine).
    pub fn size_on_disk(&self) -> Result<u64> {
        self.inner.kv.size_on_disk()
    }

    /// A typed tree of local-only data (accounts, sessions) that never replicates.
    pub fn local<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<LocalTree<T>> {
        check_ns(name)?;
        let tree = self.inner.kv.tree(&format!("local/{name}"))?;
        Ok(LocalTree::new(name, tree, self.clone()))
    }

    /// A typed tree of local-only secrets, sealed at rest with
    /// XChaCha20-Poly1305 under the key in the data dir's `store.key`.
    pub fn sealed<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<SealedTree<T>> {
        check_ns(name)?;
        let tree = self.inner.kv.tree(&format!("sealed/{name}"))?;
        Ok(SealedTree::new(
            name,
            tree,
            self.inner.seal_key.clone(),
            self.clone(),
        ))
    }

    pub(crate) fn note_local_write(&self) -> DurableTicket {
        self.inner.committer.applied()
    }

    /// Test hook: writes raw bytes under a record's key, bypassing every check,
    /// to simulate corruption or a value from a foreign build.
    #[doc(hidden)]
    pub fn debug_put_raw(&self, ns: &str, key: &str, bytes: Vec<u8>) -> Result<()> {
        let mut b = Batch::default();
        b.insert(rec_key(ns, key), bytes);
        self.inner.reg.apply(b)
    }
}

fn tick(last: Version, now: u64) -> Version {
    if now > last.wall_ms {
        Version {
            wall_ms: now,
            counter: 0,
        }
    } else if last.counter == u32::MAX {
        Version {
            wall_ms: last.wall_ms + 1,
            counter: 0,
        }
    } else {
        Version {
            wall_ms: last.wall_ms,
            counter: last.counter + 1,
        }
    }
}

/// Accumulates one atomic batch; remembers what the batch itself changed so
/// that two records for one key in the same batch merge correctly.
struct BatchWriter<'a> {
    reg: &'a Tree,
    batch: Batch,
    overlay: HashMap<Vec<u8>, Option<Record>>,
    seen: HashMap<OriginId, BTreeSet<u64>>,
    meta_hlc: Option<Version>,
}

impl<'a> BatchWriter<'a> {
    fn new(reg: &'a Tree) -> Self {
        BatchWriter {
            reg,
            batch: Batch::default(),
            overlay: HashMap::new(),
            seen: HashMap::new(),
            meta_hlc: None,
        }
    }

    /// The record currently held for a key, as this batch would leave it
    /// (expired ones included: the caller decides).
    fn current(&mut self, ns: &str, key: &str) -> Result<Option<Record>> {
        let rk = rec_key(ns, key);
        if let Some(r) = self.overlay.get(&rk) {
            return Ok(r.clone());
        }
        match self.reg.get(&rk)? {
            None => Ok(None),
            Some(v) => match codec::decode_record(&v) {
                Ok(r) => Ok(Some(r)),
                Err(e) => {
                    // A corrupt stored value cannot be ranked; a valid record
                    // for the key replaces it (its stale index entries expire
                    // harmlessly: every index read re-checks the record).
                    tracing::warn!(ns, key, error = %e, "replacing an undecodable stored record");
                    Ok(None)
                }
            },
        }
    }

    fn merge_one(&mut self, st: &mut WriteState, rec: Record, now: u64) -> Result<MergeOutcome> {
        let bytes = match codec::encode_record(&rec) {
            Ok(b) => b,
            Err(e) => return Ok(MergeOutcome::Rejected(e.to_string())),
        };
        self.seen
            .entry(rec.origin.clone())
            .or_default()
            .insert(rec.seq);
        // A copy of our own record from before a data loss: never reuse its seq.
        if let Some(next) = st.own_next.get_mut(&rec.origin) {
            if *next <= rec.seq {
                *next = rec.seq + 1;
            }
        }
        if rec.version > st.hlc {
            st.hlc = rec.version;
        }
        if rec.is_expired(now) {
            return Ok(MergeOutcome::Expired);
        }
        let held = self.current(&rec.ns, &rec.key)?;
        if let Some(h) = &held {
            if !h.is_expired(now) {
                if *h == rec {
                    return Ok(MergeOutcome::Duplicate);
                }
                if !rec.outranks(h) {
                    return Ok(MergeOutcome::Stale);
                }
            }
            remove_indexes(&mut self.batch, h);
        }
        let rk = rec_key(&rec.ns, &rec.key);
        let nk = ns_key(&rec.ns, &rec.key);
        self.batch
            .insert(origin_key(&rec.origin, rec.seq, &nk), Vec::new());
        self.batch.insert(exp_key(rec.expires_ms, &nk), Vec::new());
        if !rec.deleted {
            for t in &rec.terms {
                self.batch
                    .insert(term_key(&rec.ns, t, &rec.key), Vec::new());
            }
        }
        self.batch.insert(rk.clone(), bytes);
        self.overlay.insert(rk, Some(rec));
        Ok(MergeOutcome::Applied)
    }

    /// Advances contiguous watermarks, then applies everything atomically.
    fn finish(mut self, st: &mut WriteState) -> Result<()> {
        let mut new_wms = Vec::new();
        for (origin, seqs) in &self.seen {
            let start = st.watermarks.get(origin).copied().unwrap_or(0);
            let mut wm = start;
            let prefix = origin_prefix(origin);
            loop {
                let next = wm + 1;
                let held = seqs.contains(&next) || {
                    let mut k = prefix.clone();
                    k.extend_from_slice(&next.to_be_bytes());
                    !self.reg.prefix_from(&k, &k, 1)?.is_empty()
                };
                if !held {
                    break;
                }
                wm = next;
            }
            if wm > start {
                self.batch.insert(wm_key(origin), wm.to_be_bytes().to_vec());
                new_wms.push((origin.clone(), wm));
            }
        }
        if let Some(hlc) = self.meta_hlc {
            self.batch
                .insert(META_HLC.to_vec(), codec::encode_value(&hlc)?);
        }
        self.reg.apply(self.batch)?;
        for (o, wm) in new_wms {
            st.watermarks.insert(o, wm);
        }
        Ok(())
    }
}

fn remove_indexes(b: &mut Batch, r: &Record) {
    let nk = ns_key(&r.ns, &r.key);
    b.remove(origin_key(&r.origin, r.seq, &nk));
    b.remove(exp_key(r.expires_ms, &nk));
    for t in &r.terms {
        b.remove(term_key(&r.ns, t, &r.key));
    }
}

fn ns_key(ns: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(ns.len() + key.len() + 1);
    k.extend_from_slice(ns.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

fn rec_key(ns: &str, key: &str) -> Vec<u8> {
    let mut k = vec![b'r'];
    k.extend_from_slice(&ns_key(ns, key));
    k
}

fn exp_key(expires: u64, nk: &[u8]) -> Vec<u8> {
    let mut k = vec![b'x'];
    k.extend_from_slice(&expires.to_be_bytes());
    k.extend_from_slice(nk);
    k
}

fn term_key(ns: &str, term: &str, key: &str) -> Vec<u8> {
    let mut k = vec![b't'];
    k.extend_from_slice(ns.as_bytes());
    k.push(0);
    k.extend_from_slice(term.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

fn origin_prefix(origin: &OriginId) -> Vec<u8> {
    let mut k = vec![b'o', origin.0.len() as u8];
    k.extend_from_slice(&origin.0);
    k
}

/// By-origin index key. The record's key is part of it so that even a
/// misbehaving origin reusing a sequence number cannot make one entry hide another.
fn origin_key(origin: &OriginId, seq: u64, nk: &[u8]) -> Vec<u8> {
    let mut k = origin_prefix(origin);
    k.extend_from_slice(&seq.to_be_bytes());
    k.extend_from_slice(nk);
    k
}

fn wm_key(origin: &OriginId) -> Vec<u8> {
    let mut k = vec![b'w'];
    k.extend_from_slice(&origin.0);
    k
}

fn split_ns_key(v: &[u8]) -> Result<(&str, &str)> {
    let corrupt = |reason: &str| StoreError::Corrupt {
        context: "index entry".into(),
        reason: reason.into(),
    };
    let pos = v
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| corrupt("no separator"))?;
    let ns = std::str::from_utf8(&v[..pos]).map_err(|_| corrupt("namespace not UTF-8"))?;
    let key = std::str::from_utf8(&v[pos + 1..]).map_err(|_| corrupt("key not UTF-8"))?;
    Ok((ns, key))
}

fn seq_of(origin_index_key: &[u8], prefix_len: usize) -> Result<u64> {
    let end = (prefix_len + 8).min(origin_index_key.len());
    be64(&origin_index_key[prefix_len.min(end)..end], "origin index")
}

fn be64(v: &[u8], context: &str) -> Result<u64> {
    let arr: [u8; 8] = v.try_into().map_err(|_| StoreError::Corrupt {
        context: context.into(),
        reason: format!("expected 8 bytes, found {}", v.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}
