//! The one validation function every inbound record goes through, whatever
//! the path (gossip, DHT put, sync page, DHT lookup result): shape and size,
//! expiry and clock sanity, membership, signature, then the node's
//! namespace-specific checks. Cheap checks run first so that junk costs no
//! signature verification.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hubmesh_store::{Clock, OriginId, Record, codec};
use libp2p::PeerId;
use libp2p::identity::PublicKey;

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
    keys: Arc<Mutex<HashMap<OriginId, PublicKey>>>,
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
        if !key.verify(&codec::signing_bytes(record), &record.sig) {
            return Err(ValidationError::Signature);
        }
        let origin = claimed;
        if let Some(custom) = &self.custom {
            custom(record).map_err(ValidationError::Refused)?;
        }
        Ok(origin)
    }

    fn origin_key(&self, record: &Record) -> Result<PublicKey, ValidationError> {
        if let Ok(keys) = self.keys.lock()
            && let Some(k) = keys.get(&record.origin)
        {
            return Ok(k.clone());
        }
        let (_, key) = origin_key(&record.origin)?;
        if let Ok(mut keys) = self.keys.lock() {
            if keys.len() >= MAX_CACHED_KEYS {
                keys.clear();
            }
            keys.insert(record.origin.clone(), key.clone());
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

    #[tokio::test]
    async fn every_rule_is_enforced() {
        let now = 1_700_000_000_000;
        let clock = Clock::manual(now);
        let store = hubmesh_store::Store::open_with(hubmesh_store::StoreConfig {
            clock: clock.clone(),
            ..Default::default()
        })
        .unwrap();
        let me = Keypair::generate_ed25519();
        let stranger = Keypair::generate_ed25519();
        let members: BTreeSet<PeerId> = [me.public().to_peer_id()].into();
        let v = Validator::new(
            me.public().to_peer_id(),
            Membership::Allowlist(members),
            Duration::from_secs(3600),
            clock.clone(),
            Some(Arc::new(|r: &Record| {
                if r.key == "refused" {
                    Err("no".into())
                } else {
                    Ok(())
                }
            })),
        );
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
}
