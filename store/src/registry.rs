//! The registry: merge, reads, expiry and anti-entropy bookkeeping.
//!
//! On disk (one tree of the engine, `ns` and `key` never contain NUL):
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `r` | ns `\0` key | encoded [`Record`] |
//! | `w` | origin | watermark (be64) |
//! | `m` | `format` | format version byte |
//! | `m` | `seq` origin | own sequence numbers reserved up to (be64) |
//!
//! The secondary indexes (by origin and seq, by expiry, by term) live in
//! memory ([`crate::index`]) and are rebuilt from the records at open, so a
//! merge costs one engine write per record plus one per origin per batch.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::codec::{self, FORMAT_VERSION};
use crate::commit::{Committer, DurableTicket};
use crate::error::{Result, StoreError};
use crate::index::{Index, NsKey, ns_key, ns_of, term_key};
use crate::kv::{Batch, Kv, Tree};
use crate::local::{LocalTree, SealKey, SealedTree};
use crate::record::{Draft, OriginId, Record, Signer, Version, check_ns};
use crate::stamps::ChangeStamps;

const META_FORMAT: &[u8] = b"mformat";
const META_SEQ: &[u8] = b"mseq";
/// Own sequence numbers are reserved on disk in blocks, so an originated
/// write costs no extra engine write; a crash skips at most one block.
const SEQ_BLOCK: u64 = 1024;

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
    /// Decoded records kept for point reads, bytes (approximate: encoded
    /// size plus a fixed overhead per entry); 0 turns the cache off.
    pub record_cache_bytes: u64,
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
            record_cache_bytes: 64 * 1024 * 1024,
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
    /// Bumped after every registry write, per record group.
    stamps: ChangeStamps,
    /// Point reads by engine key, each with the group's change stamp taken
    /// before the engine read: served only while that stamp is current.
    /// quick_cache, not moka (the node's TTL caches): no TTL is needed here,
    /// and with moka in its place (a variant not kept) the same bench,
    /// `HUBMESH_BENCH_ONLY=gets cargo bench -p hubmesh-store`, gave 378k
    /// gets/s against 606k.
    /// Keyed by a hash of `ns \0 key` (a hit compares the record's own ns and
    /// key, so a collision is a miss): the table then holds no pointer to
    /// chase before the record itself, which matters when reads are random.
    records: Option<quick_cache::sync::Cache<u64, CachedRecord, RecordWeight>>,
    /// Hashes engine keys for the record cache.
    record_hasher: std::collections::hash_map::RandomState,
    // Declared last: dropped after the trees, it flushes what they hold.
    committer: Committer,
}

#[derive(Clone)]
struct CachedRecord {
    stamp: u64,
    record: Record,
}

/// What a cached record is charged beyond its fields' bytes.
const CACHED_RECORD_OVERHEAD: u64 = 160;

/// Charges a cached record about the memory it holds.
#[derive(Clone)]
struct RecordWeight;

impl quick_cache::Weighter<u64, CachedRecord> for RecordWeight {
    fn weight(&self, _key: &u64, v: &CachedRecord) -> u64 {
        let r = &v.record;
        let bytes = r.ns.len()
            + r.key.len()
            + r.body.len()
            + r.origin.as_bytes().len()
            + r.sig.len()
            + r.terms.iter().map(String::len).sum::<usize>();
        bytes as u64 + CACHED_RECORD_OVERHEAD
    }
}

struct WriteState {
    hlc: Version,
    index: Index,
    watermarks: HashMap<OriginId, u64>,
    /// Next sequence number per origin this hub signs as (usually one).
    own_next: HashMap<OriginId, u64>,
    /// Own sequence numbers reserved on disk, per origin.
    own_reserved: HashMap<OriginId, u64>,
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

    /// Opens a store as configured: reads every record once to rebuild the
    /// in-memory indexes.
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
        let mut watermarks = HashMap::new();
        for (k, v) in reg.prefix_from(b"w", b"w", usize::MAX)? {
            watermarks.insert(OriginId::new(&k[1..]), be64(&v, "watermark")?);
        }
        let mut own_reserved = HashMap::new();
        for (k, v) in reg.prefix_from(META_SEQ, META_SEQ, usize::MAX)? {
            own_reserved.insert(
                OriginId::new(&k[META_SEQ.len()..]),
                be64(&v, "sequence reservation")?,
            );
        }
        let (index, hlc) = build_index(&reg)?;
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
                    index,
                    watermarks,
                    own_next: HashMap::new(),
                    own_reserved,
                }),
                stamps: ChangeStamps::new(),
                record_hasher: std::collections::hash_map::RandomState::new(),
                records: (config.record_cache_bytes > 0).then(|| {
                    quick_cache::sync::Cache::with_weighter(
                        (config.record_cache_bytes / 512) as usize,
                        config.record_cache_bytes,
                        RecordWeight,
                    )
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

    /// Applies a batch built under the writer lock. If the engine refuses it,
    /// the in-memory index (already updated) is rebuilt from disk so that it
    /// never describes writes that did not happen.
    fn apply_locked(&self, st: &mut WriteState, w: BatchWriter) -> Result<()> {
        let BatchWriter { batch, new_wms, .. } = w;
        let changed = self.changed_slots(&batch);
        match self.inner.reg.apply(batch) {
            Ok(()) => {
                for (o, wm) in new_wms {
                    st.watermarks.insert(o, wm);
                }
                self.inner.stamps.bump(changed);
                Ok(())
            }
            Err(e) => {
                // Part of the batch may have landed.
                self.inner.stamps.bump(changed);
                tracing::error!(error = %e, "registry write failed; rebuilding the index");
                let (index, hlc) = build_index(&self.inner.reg)?;
                st.index = index;
                st.hlc = st.hlc.max(hlc);
                st.own_next.clear();
                Err(e)
            }
        }
    }

    /// The change-stamp slots of the records a batch writes or removes.
    fn changed_slots(&self, batch: &Batch) -> Vec<usize> {
        let mut slots: Vec<usize> = batch
            .keys()
            .filter_map(|k| k.strip_prefix(b"r"))
            .map(|nk| self.inner.stamps.slot_of_ns_key(nk))
            .collect();
        slots.sort_unstable();
        slots.dedup();
        slots
    }

    /// A stamp of the records of `ns` whose key's first segment (before the
    /// first `/`, or the whole key) is `segment`: it changes after every
    /// write or removal of such a record. Take it *before* reading: if it is
    /// unchanged later, nothing read has changed since, except by expiry
    /// (which the reader accounts for from the records' `expires_ms`). It may
    /// also change when nothing of the group did (groups share counters).
    pub fn change_stamp(&self, ns: &str, segment: &str) -> u64 {
        self.inner.stamps.get(ns, segment)
    }

    /// Merges records from anywhere (gossip, DHT, sync, local) by
    /// last-writer-wins on `(version, origin)`. The batch is applied under
    /// the writer lock and visible on return; wait on `report.ticket` for
    /// durability. A crash before that may keep any prefix of it: records are
    /// written first and watermarks last, so a watermark never claims a
    /// record the store lost.
    /// Signatures are *not* checked here: the mesh checks them first.
    pub fn merge(&self, records: Vec<Record>) -> Result<MergeReport> {
        let now = self.inner.clock.now_ms();
        let mut st = self.lock()?;
        let mut w = BatchWriter::default();
        let mut outcomes = Vec::with_capacity(records.len());
        for rec in records {
            let outcome = match codec::encode_record(&rec) {
                Ok(bytes) => w.merge_one(&self.inner.reg, &mut st, rec, bytes, now)?,
                Err(e) => MergeOutcome::Rejected(e.to_string()),
            };
            outcomes.push(outcome);
        }
        w.advance_watermarks(&st);
        self.apply_locked(&mut st, w)?;
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
        let mut w = BatchWriter::default();
        let mut out = Vec::with_capacity(drafts.len());
        for d in drafts {
            check_ns(&d.ns)?;
            let mut version = tick(st.hlc, now);
            let nk = ns_key(&d.ns, &d.key);
            if let Some(held) = st.index.held.get(nk.as_slice())
                && held.version >= version
            {
                version = tick(held.version, held.version.wall_ms);
            }
            st.hlc = version;
            let seq = self.next_own_seq(&mut st, &mut w, &origin);
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
            let bytes = codec::encode_record(&rec)?;
            match w.merge_one(&self.inner.reg, &mut st, rec.clone(), bytes, now)? {
                MergeOutcome::Applied | MergeOutcome::Expired => {}
                other => {
                    return Err(StoreError::Backend(format!(
                        "own write did not apply: {other:?}"
                    )));
                }
            }
            out.push(rec);
        }
        // Everything this hub originated is held (or superseded by newer
        // versions): its own watermark is its last sequence number.
        if let Some(last) = out.last() {
            let cur = st.watermarks.get(&origin).copied().unwrap_or(0);
            if last.seq > cur {
                w.batch
                    .insert(wm_key(&origin), last.seq.to_be_bytes().to_vec());
                w.new_wms.push((origin.clone(), last.seq));
            }
        }
        w.advance_watermarks(&st);
        self.apply_locked(&mut st, w)?;
        Ok((out, self.inner.committer.applied()))
    }

    /// [`Store::originate_nowait`], then wait until the records are on disk:
    /// when this returns `Ok`, the write may be acknowledged.
    pub async fn originate(&self, drafts: Vec<Draft>, signer: &dyn Signer) -> Result<Vec<Record>> {
        let (records, ticket) = self.originate_nowait(drafts, signer)?;
        self.durable(ticket).await?;
        Ok(records)
    }

    fn next_own_seq(&self, st: &mut WriteState, w: &mut BatchWriter, origin: &OriginId) -> u64 {
        let reserved = st.own_reserved.get(origin).copied().unwrap_or(0);
        let next = match st.own_next.get(origin) {
            Some(n) => *n,
            None => {
                // Never reuse a sequence number: start above the watermark,
                // the highest seq of this origin held (a copy of our own
                // records may have come back from peers after a data loss),
                // and every number reserved before a restart.
                let wm = st.watermarks.get(origin).copied().unwrap_or(0);
                let held = st
                    .index
                    .known_origin(origin)
                    .map(|id| st.index.max_seq(id))
                    .unwrap_or(0);
                wm.max(held).max(reserved) + 1
            }
        };
        if next > reserved {
            let upto = next + SEQ_BLOCK - 1;
            let mut k = META_SEQ.to_vec();
            k.extend_from_slice(origin.as_bytes());
            w.batch.insert(k, upto.to_be_bytes().to_vec());
            st.own_reserved.insert(origin.clone(), upto);
        }
        st.own_next.insert(origin.clone(), next + 1);
        next
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
        let Some(cache) = &self.inner.records else {
            return Ok(self.held(ns, key)?.map(|(r, _)| r));
        };
        let rk = rec_key(ns, key);
        // Taken before the engine read: a write landing after it changes it.
        let stamp = self.inner.stamps.get_for_ns_key(&rk[1..]);
        let hash = std::hash::BuildHasher::hash_one(&self.inner.record_hasher, &rk);
        if let Some(hit) = cache.get(&hash)
            && hit.stamp == stamp
            && hit.record.ns == ns
            && hit.record.key == key
        {
            let now = self.inner.clock.now_ms();
            return Ok((!hit.record.is_expired(now)).then_some(hit.record));
        }
        let held = self.held(ns, key)?.map(|(r, _)| r);
        if let Some(record) = &held {
            cache.insert(
                hash,
                CachedRecord {
                    stamp,
                    record: record.clone(),
                },
            );
        }
        Ok(held)
    }

    /// The encoded bytes of the held record for `(ns, key)` (tombstones
    /// included, expired excluded), exactly as stored and signed.
    pub fn get_raw(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.held(ns, key)?.map(|(_, raw)| raw.to_vec()))
    }

    /// The unexpired held record for a key, decoded and as stored.
    fn held(&self, ns: &str, key: &str) -> Result<Option<(Record, crate::kv::Value)>> {
        let now = self.inner.clock.now_ms();
        match self.inner.reg.get(&rec_key(ns, key))? {
            Some(v) => {
                let r = codec::decode_record(&v)?;
                Ok((!r.is_expired(now)).then_some((r, v)))
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
        let chunk_len = limit.clamp(16, 1024);
        let mut out = Vec::new();
        // Expired or deleted entries are skipped, so read in chunks until the page is full.
        loop {
            let chunk = self.inner.reg.prefix_from(&prefix, &from, chunk_len)?;
            let exhausted = chunk.len() < chunk_len;
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
        use std::ops::Bound;
        let prefix = term_key(ns, term, "");
        let mut cursor = Bound::Included(prefix.clone());
        let mut out = Vec::new();
        loop {
            let keys: Vec<Vec<u8>> = {
                let st = self.lock()?;
                st.index
                    .by_term
                    .range((cursor.clone(), Bound::Unbounded))
                    .take_while(|k| k.starts_with(&prefix))
                    .take(256)
                    .cloned()
                    .collect()
            };
            for k in &keys {
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
            }
            match keys.last() {
                Some(last) if keys.len() == 256 => cursor = Bound::Excluded(last.clone()),
                _ => return Ok(out),
            }
        }
    }

    /// Records of `origin` with `seq > after`, ascending, at most `limit`:
    /// how the mesh answers an anti-entropy pull without scanning everything.
    pub fn records_since(&self, origin: &OriginId, after: u64, limit: usize) -> Result<SyncPage> {
        let now = self.inner.clock.now_ms();
        let limit = limit.max(1);
        let (watermark, entries) = {
            let st = self.lock()?;
            let watermark = st.watermarks.get(origin).copied().unwrap_or(0);
            let entries: Vec<(u64, NsKey)> = match st.index.known_origin(origin) {
                Some(id) if after < u64::MAX => {
                    let empty: NsKey = Arc::from(&[][..]);
                    st.index.by_origin[id as usize]
                        .range((after + 1, empty)..)
                        .take(limit.saturating_add(1))
                        .cloned()
                        .collect()
                }
                _ => Vec::new(),
            };
            (watermark, entries)
        };
        let more = entries.len() > limit;
        let mut records = Vec::with_capacity(entries.len().min(limit));
        let mut last_seq = after;
        for (seq, nk) in entries.into_iter().take(limit) {
            last_seq = seq;
            let mut rk = vec![b'r'];
            rk.extend_from_slice(&nk);
            if let Some(raw) = self.inner.reg.get(&rk)? {
                let r = codec::decode_record(&raw)?;
                if r.origin == *origin && r.seq == seq && !r.is_expired(now) {
                    records.push(r);
                }
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

    /// Removes up to `limit` expired records; returns how many were removed.
    /// Tombstones go too, once they expire.
    pub fn sweep_expired(&self, limit: usize) -> Result<usize> {
        let now = self.inner.clock.now_ms();
        let mut st = self.lock()?;
        let due: Vec<(u64, NsKey)> = st
            .index
            .by_expiry
            .iter()
            .take_while(|(exp, _)| *exp <= now)
            .take(limit)
            .cloned()
            .collect();
        if due.is_empty() {
            return Ok(0);
        }
        let mut w = BatchWriter::default();
        for (_, nk) in &due {
            st.index.remove(nk);
            let mut rk = vec![b'r'];
            rk.extend_from_slice(nk);
            w.batch.remove(rk);
        }
        self.apply_locked(&mut st, w)?;
        let _ = self.inner.committer.applied();
        Ok(due.len())
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
                    Ok(10_000) => tokio::task::yield_now().await,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "expiry sweep failed");
                        break;
                    }
                }
            }
        }
    }

    /// Number of live (unexpired, undeleted) records per namespace, from the
    /// in-memory index.
    pub fn namespace_counts(&self) -> Result<Vec<(String, u64)>> {
        let now = self.inner.clock.now_ms();
        let st = self.lock()?;
        let mut counts: std::collections::BTreeMap<&[u8], u64> = Default::default();
        for (nk, head) in &st.index.held {
            if !head.deleted && head.expires_ms > now {
                *counts.entry(ns_of(nk)).or_default() += 1;
            }
        }
        Ok(counts
            .into_iter()
            .map(|(ns, n)| (String::from_utf8_lossy(ns).into_owned(), n))
            .collect())
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
        let changed = self.changed_slots(&b);
        let applied = self.inner.reg.apply(b);
        self.inner.stamps.bump(changed);
        applied
    }
}

/// Reads every record once: the in-memory index and the highest version seen.
/// Undecodable values are skipped (reads of them report the error; a valid
/// record for the key replaces them).
fn build_index(reg: &Tree) -> Result<(Index, Version)> {
    let mut index = Index::default();
    let mut hlc = Version::default();
    let mut from = b"r".to_vec();
    loop {
        let chunk = reg.prefix_from(b"r", &from, 4096)?;
        let exhausted = chunk.len() < 4096;
        for (k, v) in &chunk {
            match codec::decode_record(v) {
                Ok(r) => {
                    hlc = hlc.max(r.version);
                    index.insert(Arc::from(&k[1..]), &r);
                }
                Err(e) => tracing::warn!(error = %e, "skipping an undecodable record at open"),
            }
            from = k.clone();
            from.push(0);
        }
        if exhausted {
            return Ok((index, hlc));
        }
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

/// Accumulates one batch while the writer lock is held, in the order a crash
/// may cut it (sequence reservations, then records, then watermarks). The index is
/// updated as records are merged, so later records of the same batch see
/// earlier ones.
#[derive(Default)]
struct BatchWriter {
    batch: Batch,
    seen: HashMap<OriginId, BTreeSet<u64>>,
    new_wms: Vec<(OriginId, u64)>,
}

impl BatchWriter {
    /// The stored bytes of the held version of `nk` (this batch's included).
    fn held_bytes(&self, reg: &Tree, nk: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut rk = vec![b'r'];
        rk.extend_from_slice(nk);
        if let Some(b) = self.batch.find(&rk) {
            return Ok(Some(b.to_vec()));
        }
        Ok(reg.get(&rk)?.map(|v| v.to_vec()))
    }

    fn merge_one(
        &mut self,
        reg: &Tree,
        st: &mut WriteState,
        rec: Record,
        bytes: Vec<u8>,
        now: u64,
    ) -> Result<MergeOutcome> {
        self.seen
            .entry(rec.origin.clone())
            .or_default()
            .insert(rec.seq);
        // A copy of our own record from before a data loss: never reuse its seq.
        if let Some(next) = st.own_next.get_mut(&rec.origin)
            && *next <= rec.seq
        {
            *next = rec.seq + 1;
        }
        if rec.version > st.hlc {
            st.hlc = rec.version;
        }
        if rec.is_expired(now) {
            return Ok(MergeOutcome::Expired);
        }
        let nk: NsKey = Arc::from(ns_key(&rec.ns, &rec.key));
        if let Some(h) = st.index.held.get(&nk) {
            if h.expires_ms > now {
                let held_rank = (h.version, st.index.origin(h.origin));
                match (rec.version, &rec.origin).cmp(&held_rank) {
                    std::cmp::Ordering::Less => return Ok(MergeOutcome::Stale),
                    std::cmp::Ordering::Greater => {}
                    std::cmp::Ordering::Equal => {
                        // Same (version, origin): the same write, or a
                        // misbehaving origin; the bytes decide, identically everywhere.
                        match self.held_bytes(reg, &nk)? {
                            Some(held) if held == bytes => return Ok(MergeOutcome::Duplicate),
                            Some(held) if held > bytes => return Ok(MergeOutcome::Stale),
                            _ => {}
                        }
                    }
                }
            }
            st.index.remove(&nk);
        }
        let mut rk = vec![b'r'];
        rk.extend_from_slice(&nk);
        self.batch.insert(rk, bytes);
        st.index.insert(nk, &rec);
        Ok(MergeOutcome::Applied)
    }

    /// Advances the watermark of every origin seen over its contiguous run.
    fn advance_watermarks(&mut self, st: &WriteState) {
        for (origin, seqs) in &self.seen {
            let start = self
                .new_wms
                .iter()
                .find(|(o, _)| o == origin)
                .map(|(_, w)| *w)
                .or_else(|| st.watermarks.get(origin).copied())
                .unwrap_or(0);
            let id = st.index.known_origin(origin);
            let mut wm = start;
            loop {
                let next = wm + 1;
                let held =
                    seqs.contains(&next) || id.is_some_and(|id| st.index.holds_seq(id, next));
                if !held {
                    break;
                }
                wm = next;
            }
            if wm > start {
                self.batch.insert(wm_key(origin), wm.to_be_bytes().to_vec());
                self.new_wms.retain(|(o, _)| o != origin);
                self.new_wms.push((origin.clone(), wm));
            }
        }
    }
}

fn rec_key(ns: &str, key: &str) -> Vec<u8> {
    let mut k = vec![b'r'];
    k.extend_from_slice(&ns_key(ns, key));
    k
}

fn wm_key(origin: &OriginId) -> Vec<u8> {
    let mut k = vec![b'w'];
    k.extend_from_slice(&origin.0);
    k
}

fn be64(v: &[u8], context: &str) -> Result<u64> {
    let arr: [u8; 8] = v.try_into().map_err(|_| StoreError::Corrupt {
        context: context.into(),
        reason: format!("expected 8 bytes, found {}", v.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}
