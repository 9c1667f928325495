//! The one validation function every inbound record goes through, whatever
//! the path (gossip, DHT put, sync page, DHT lookup result): shape and size,
//! expiry and clock sanity, membership, signature, then the node's
//! namespace-specific checks. Cheap checks run first so that junk costs no
//! signature verification.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use hubmesh_store::{Clock, OriginId, Record, Store, codec};
use libp2p::PeerId;

use crate::config::{Membership, RecordValidator};
use crate::error::ValidationError;
use crate::identity::origin_key;

/// How far ahead of our clock a record's version may be: a peer's clock may
/// be skewed, but not by more than this.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Validates inbound records for one hub. Cheap to clone.
#[derive(Clone)]
pub struct Validator {
    local: PeerId,
    membership: Membership,
    max_expiry_ahead_ms: u64,
    clock: Clock,
    custom: Option<RecordValidator>,
    /// Decoded origin keys: decoding an ed25519 key (point decompression)
    /// costs about a third of a signature check, and origins are few.
    keys: Arc<Mutex<HashMap<OriginId, VerifyingKey>>>,
}

/// Most origin keys cached; the cache is emptied when full.
const MAX_CACHED_KEYS: usize = 4096;

impl fmt::Debug for Validator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Validator")
            .field("local", &self.local)
            .field("membership", &self.membership)
            .field("max_expiry_ahead_ms", &self.max_expiry_ahead_ms)
            .finish_non_exhaustive()
    }
}

impl Validator {
    /// A validator for hub `local` under `membership`, reading time from `clock`.
    pub fn new(
        local: PeerId,
        membership: Membership,
        max_expiry_ahead: Duration,
        clock: Clock,
        custom: Option<RecordValidator>,
    ) -> Self {
        Validator {
            local,
            membership,
            max_expiry_ahead_ms: max_expiry_ahead.as_millis() as u64,
            clock,
            custom,
            keys: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Whether `peer` is a member (this hub always is).
    pub fn is_member(&self, peer: &PeerId) -> bool {
        *peer == self.local || self.membership.admits(peer)
    }

    /// Decodes wire bytes (size-bounded by the codec) and validates the record.
    pub fn validate_bytes(&self, bytes: &[u8]) -> Result<Record, ValidationError> {
        // Decoding applies the store's size and shape limits.
        let record =
            codec::decode_record(bytes).map_err(|e| ValidationError::Malformed(e.to_string()))?;
        self.validate_decoded(&record)?;
        Ok(record)
    }

    /// Validates a record from anywhere; returns its origin.
    pub fn validate(&self, record: &Record) -> Result<PeerId, ValidationError> {
        // Shape and size: encoding applies the store's limits.
        codec::encode_record(record).map_err(|e| ValidationError::Malformed(e.to_string()))?;
        self.validate_decoded(record)
    }

    /// [`Validator::validate`] for a record that came out of
    /// `codec::decode_record` (which already checked shape and size).
    pub(crate) fn validate_decoded(&self, record: &Record) -> Result<PeerId, ValidationError> {
        let mut verdicts = self.validate_decoded_many(std::slice::from_ref(record));
        verdicts.pop().unwrap_or(Err(ValidationError::Signature))
    }

    /// [`Validator::validate_decoded`] for many records at once, with the
    /// same verdicts: the signatures of the records that pass the cheap
    /// checks are verified as one batch (ed25519 batch verification costs
    /// about half a single check per signature). A failing batch is
    /// re-checked record by record, so a bad record costs only itself.
    pub(crate) fn validate_decoded_many(
        &self,
        records: &[Record],
    ) -> Vec<Result<PeerId, ValidationError>> {
        let mut verdicts = Vec::with_capacity(records.len());
        let mut batch = Vec::new();
        for (i, record) in records.iter().enumerate() {
            match self.precheck(record) {
                Ok((origin, key, sig)) => {
                    verdicts.push(Ok(origin));
                    batch.push((i, key, sig, codec::signing_bytes(record)));
                }
                Err(e) => verdicts.push(Err(e)),
            }
        }
        let batch_verified = batch.len() > 1 && {
            let messages: Vec<&[u8]> = batch.iter().map(|(_, _, _, m)| m.as_slice()).collect();
            let sigs: Vec<Signature> = batch.iter().map(|(_, _, s, _)| *s).collect();
            let keys: Vec<VerifyingKey> = batch.iter().map(|(_, k, _, _)| *k).collect();
            ed25519_dalek::verify_batch(&messages, &sigs, &keys).is_ok()
        };
        if !batch_verified {
            for (i, key, sig, message) in &batch {
                if key.verify(message, sig).is_err() {
                    verdicts[*i] = Err(ValidationError::Signature);
                }
            }
        }
        for (record, verdict) in records.iter().zip(verdicts.iter_mut()) {
            if verdict.is_ok()
                && let Err(e) = self.custom_check(record)
            {
                *verdict = Err(e);
            }
        }
        verdicts
    }

    /// Every check but the signature itself and the namespace validator:
    /// returns the origin, its key and the parsed signature.
    fn precheck(
        &self,
        record: &Record,
    ) -> Result<(PeerId, VerifyingKey, Signature), ValidationError> {
        let now_ms = self.clock.now_ms();
        if record.is_expired(now_ms) {
            return Err(ValidationError::Expired {
                expires_ms: record.expires_ms,
                now_ms,
            });
        }
        let limit_ms = now_ms.saturating_add(self.max_expiry_ahead_ms);
        if record.expires_ms > limit_ms {
            return Err(ValidationError::ExpiresTooFar {
                expires_ms: record.expires_ms,
                limit_ms,
            });
        }
        let skew_ms = now_ms.saturating_add(MAX_CLOCK_SKEW.as_millis() as u64);
        if record.version.wall_ms > skew_ms {
            return Err(ValidationError::FromTheFuture {
                wall_ms: record.version.wall_ms,
                limit_ms: skew_ms,
            });
        }
        let claimed =
            PeerId::from_bytes(record.origin.as_bytes()).map_err(|_| ValidationError::Origin)?;
        if !self.is_member(&claimed) {
            return Err(ValidationError::NotMember(claimed.to_string()));
        }
        let key = self.origin_key(record)?;
        let sig = Signature::from_slice(&record.sig).map_err(|_| ValidationError::Signature)?;
        Ok((claimed, key, sig))
    }

    fn custom_check(&self, record: &Record) -> Result<(), ValidationError> {
        match &self.custom {
            Some(custom) => custom(record).map_err(ValidationError::Refused),
            None => Ok(()),
        }
    }

    fn origin_key(&self, record: &Record) -> Result<VerifyingKey, ValidationError> {
        if let Ok(keys) = self.keys.lock()
            && let Some(k) = keys.get(&record.origin)
        {
            return Ok(*k);
        }
        let (_, key) = origin_key(&record.origin)?;
        if let Ok(mut keys) = self.keys.lock() {
            if keys.len() >= MAX_CACHED_KEYS {
                keys.clear();
            }
            keys.insert(record.origin.clone(), key);
        }
        Ok(key)
    }

    /// Validates a DHT record: the kad key must be `ns 0x00 key` of the record.
    pub fn validate_dht(&self, kad_key: &[u8], value: &[u8]) -> Result<Record, ValidationError> {
        let record = self.validate_bytes(value)?;
        if kad_key != dht_key(&record.ns, &record.key).as_slice() {
            return Err(ValidationError::KeyMismatch);
        }
        Ok(record)
    }
}

/// Whether the store holds exactly these encoded bytes for `ns`/`key`. Such
/// a record was validated when it was stored, so every inbound path accepts
/// it again without a signature check (`specs/mesh.md` §3).
pub(crate) fn held_exactly(store: &Store, ns: &str, key: &str, bytes: &[u8]) -> bool {
    matches!(store.get_raw(ns, key), Ok(Some(held)) if held[..] == bytes[..])
}

/// The Kademlia key of a record: `ns 0x00 key` (neither contains NUL).
pub fn dht_key(ns: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(ns.len() + key.len() + 1);
    k.extend_from_slice(ns.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

/// Splits a Kademlia key into `(ns, key)`.
pub(crate) fn split_dht_key(k: &[u8]) -> Option<(&str, &str)> {
    let pos = k.iter().position(|b| *b == 0)?;
    let ns = std::str::from_utf8(&k[..pos]).ok()?;
    let key = std::str::from_utf8(&k[pos + 1..]).ok()?;
    Some((ns, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::HubSigner;
    use hubmesh_store::{Draft, OriginId};
    use libp2p::identity::Keypair;
    use std::collections::BTreeSet;
    use std::sync::Arc;

    fn draft(key: &str, expires_ms: u64) -> Draft {
        Draft {
            ns: "server".into(),
            key: key.into(),
            body: vec![0xa0],
            expires_ms,
            deleted: false,
            terms: vec![],
        }
    }

    /// A manual clock at `now` and a store reading it.
    fn store_at(now: u64) -> (Clock, hubmesh_store::Store) {
        let clock = Clock::manual(now);
        let store = hubmesh_store::Store::open_with(hubmesh_store::StoreConfig {
            clock: clock.clone(),
            ..Default::default()
        })
        .unwrap();
        (clock, store)
    }

    /// A validator for `me` (expiry at most an hour ahead) whose namespace
    /// check refuses the key "refused".
    fn refusing_validator(me: &Keypair, membership: Membership, clock: &Clock) -> Validator {
        Validator::new(
            me.public().to_peer_id(),
            membership,
            Duration::from_secs(3600),
            clock.clone(),
            Some(Arc::new(|r: &Record| {
                if r.key == "refused" {
                    Err("no".into())
                } else {
                    Ok(())
                }
            })),
        )
    }

    #[tokio::test]
    async fn every_rule_is_enforced() {
        let now = 1_700_000_000_000;
        let (clock, store) = store_at(now);
        let me = Keypair::generate_ed25519();
        let stranger = Keypair::generate_ed25519();
        let members: BTreeSet<PeerId> = [me.public().to_peer_id()].into();
        let v = refusing_validator(&me, Membership::Allowlist(members), &clock);
        let mine = HubSigner(me);
        let ok = store
            .originate(vec![draft("a", now + 1000)], &mine)
            .await
            .unwrap()
            .remove(0);
        let bytes = codec::encode_record(&ok).unwrap();
        assert_eq!(v.validate_bytes(&bytes).unwrap(), ok);
        assert!(v.validate_dht(&dht_key("server", "a"), &bytes).is_ok());
        assert_eq!(
            v.validate_dht(&dht_key("server", "b"), &bytes),
            Err(ValidationError::KeyMismatch)
        );
        assert!(matches!(
            v.validate_bytes(&bytes[..bytes.len() - 3]),
            Err(ValidationError::Malformed(_))
        ));

        let far = store
            .originate(vec![draft("far", now + 7200 * 1000)], &mine)
            .await
            .unwrap()
            .remove(0);
        assert!(matches!(
            v.validate(&far),
            Err(ValidationError::ExpiresTooFar { .. })
        ));
        let refused = store
            .originate(vec![draft("refused", now + 1000)], &mine)
            .await
            .unwrap()
            .remove(0);
        assert_eq!(
            v.validate(&refused),
            Err(ValidationError::Refused("no".into()))
        );

        let other = hubmesh_store::Store::open_with(hubmesh_store::StoreConfig {
            clock: clock.clone(),
            ..Default::default()
        })
        .unwrap();
        let foreign = other
            .originate(vec![draft("x", now + 1000)], &HubSigner(stranger))
            .await
            .unwrap()
            .remove(0);
        assert!(matches!(
            v.validate(&foreign),
            Err(ValidationError::NotMember(_))
        ));
        let mut forged = ok.clone();
        forged.sig[0] ^= 1;
        assert_eq!(v.validate(&forged), Err(ValidationError::Signature));
        let mut fake_origin = ok.clone();
        fake_origin.origin = OriginId::new(PeerId::random().to_bytes());
        assert!(v.validate(&fake_origin).is_err());

        let mut future = ok.clone();
        future.version.wall_ms = now + 3600 * 1000;
        assert!(matches!(
            v.validate(&future),
            Err(ValidationError::FromTheFuture { .. })
        ));
        clock.advance(Duration::from_secs(2));
        assert!(matches!(
            v.validate(&ok),
            Err(ValidationError::Expired { .. })
        ));
        assert_eq!(split_dht_key(&dht_key("ns", "k/1")), Some(("ns", "k/1")));
        assert_eq!(split_dht_key(b"nonul"), None);
    }

    #[tokio::test]
    async fn batched_validation_gives_the_verdicts_of_one_by_one() {
        let now = 1_700_000_000_000;
        let (clock, store) = store_at(now);
        let (me, other) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let v = refusing_validator(&me, Membership::Open, &clock);
        let mut good = Vec::new();
        for (i, key) in [&me, &other].into_iter().cycle().take(20).enumerate() {
            let signer = HubSigner(key.clone());
            let d = draft(&format!("k{i}"), now + 1000);
            good.extend(store.originate(vec![d], &signer).await.unwrap());
        }
        let verdicts = v.validate_decoded_many(&good);
        assert!(verdicts.iter().all(|r| r.is_ok()), "{verdicts:?}");
        assert_eq!(v.validate_decoded_many(&[]), vec![]);

        // Bad records among good ones: each gets its own verdict, and the
        // good ones still pass when the batch check fails.
        let mine = HubSigner(me.clone());
        let mut tampered = good[3].clone();
        tampered.body = vec![0xa1, 0x00, 0x00];
        let mut bad_sig = good[7].clone();
        bad_sig.sig[5] ^= 0x40;
        let mut short_sig = good[8].clone();
        short_sig.sig.truncate(10);
        let mut expired = good[9].clone();
        expired.expires_ms = now - 1;
        let refused = store
            .originate(vec![draft("refused", now + 1000)], &mine)
            .await
            .unwrap()
            .remove(0);
        let mut mixed = good.clone();
        mixed[3] = tampered;
        mixed[7] = bad_sig;
        mixed[8] = short_sig;
        mixed[9] = expired;
        mixed.push(refused);
        let batched = v.validate_decoded_many(&mixed);
        let single: Vec<_> = mixed.iter().map(|r| v.validate_decoded(r)).collect();
        assert_eq!(batched, single);
        let failed: Vec<usize> = (0..batched.len())
            .filter(|&i| batched[i].is_err())
            .collect();
        assert_eq!(failed, vec![3, 7, 8, 9, 20]);
        assert_eq!(batched[3], Err(ValidationError::Signature));
        assert_eq!(batched[8], Err(ValidationError::Signature));
        assert!(matches!(batched[9], Err(ValidationError::Expired { .. })));
        assert_eq!(batched[20], Err(ValidationError::Refused("no".into())));
    }
}
