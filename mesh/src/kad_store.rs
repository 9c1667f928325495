//! The Kademlia record store, backed by `hubmesh-store`: a DHT record is the
//! registry record itself (kad key `ns 0x00 key`, value the encoded record),
//! so records survive restarts and their expiry is the record's wall-clock
//! `expires_ms`. Provider records (unused by hubmesh) live in a bounded
//! in-memory store.
//!
//! Inbound puts never reach [`KadStore::put`]: Kademlia runs with
//! `StoreInserts::FilterBoth` and the event loop validates and merges them.
//! `put` is only called for this hub's own `put_record`, and validates anyway.
//! Kademlia's periodic replication and re-publication jobs are disabled
//! (anti-entropy replicates; own records are re-put after a restart), so
//! [`RecordStore::records`] has nothing to enumerate and yields nothing: it
//! would otherwise have to load the whole registry into memory.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use hubmesh_store::{Store, codec};
use libp2p::PeerId;
use libp2p::kad::store::{self, MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{ProviderRecord, Record as KadRecord, RecordKey};

use crate::validate::{Validator, held_exactly, split_dht_key};

/// See the module docs.
pub(crate) struct KadStore {
    store: Store,
    validator: Validator,
    providers: MemoryStore,
}

impl std::fmt::Debug for KadStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KadStore").finish_non_exhaustive()
    }
}

impl KadStore {
    pub(crate) fn new(local: PeerId, store: Store, validator: Validator) -> Self {
        KadStore {
            store,
            validator,
            providers: MemoryStore::with_config(
                local,
                MemoryStoreConfig {
                    max_records: 0,
                    max_value_bytes: 0,
                    max_providers_per_key: 20,
                    max_provided_keys: 1024,
                },
            ),
        }
    }
}

/// A kad record for an encoded registry record, its expiry turned into an
/// `Instant` of the local monotonic clock.
pub(crate) fn to_kad_record(key: RecordKey, bytes: Vec<u8>, now_ms: u64) -> Option<KadRecord> {
    let rec = codec::decode_record(&bytes).ok()?;
    let ttl = Duration::from_millis(rec.expires_ms.saturating_sub(now_ms));
    Some(KadRecord {
        key,
        value: bytes,
        publisher: None,
        expires: Instant::now().checked_add(ttl),
    })
}

impl RecordStore for KadStore {
    type RecordsIter<'a> = std::iter::Empty<Cow<'a, KadRecord>>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, KadRecord>> {
        let (ns, key) = split_dht_key(k.as_ref())?;
        let bytes = match self.store.get_raw(ns, key) {
            Ok(b) => b?,
            Err(e) => {
                tracing::warn!(error = %e, "DHT read from the store failed");
                return None;
            }
        };
        to_kad_record(k.clone(), bytes, self.store.clock().now_ms()).map(Cow::Owned)
    }

    fn put(&mut self, r: KadRecord) -> store::Result<()> {
        // This hub's own `put_record` of a record it just stored: the bytes
        // are already held (and were validated when stored), so skip the
        // decode, signature check and merge.
        if let Some((ns, key)) = split_dht_key(r.key.as_ref())
            && held_exactly(&self.store, ns, key, &r.value)
        {
            return Ok(());
        }
        let record = self
            .validator
            .validate_dht(r.key.as_ref(), &r.value)
            .map_err(|e| {
                tracing::warn!(error = %e, "refusing an invalid record put into the DHT store");
                store::Error::ValueTooLarge
            })?;
        match self.store.merge(vec![record]) {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "DHT put into the store failed");
                Err(store::Error::MaxRecords)
            }
        }
    }

    fn remove(&mut self, _k: &RecordKey) {
        // Expired records are swept by the store; `get` never returns them.
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        std::iter::empty()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        self.providers.add_provider(record)
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.providers.providers(key)
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.providers.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        self.providers.remove_provider(k, p)
    }
}
