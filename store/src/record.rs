//! The replicated record of architecture §3, its version clock and its limits.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{InvalidRecord, Result, StoreError};

/// Largest encoded record (all fields, signature included) the store accepts.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Largest body.
pub const MAX_BODY_BYTES: usize = 60 * 1024;
/// Longest key.
pub const MAX_KEY_BYTES: usize = 512;
/// Longest namespace.
pub const MAX_NS_BYTES: usize = 32;
/// Longest origin id (a libp2p PeerId of an ed25519 key is 38 bytes).
pub const MAX_ORIGIN_BYTES: usize = 64;
/// Most index terms one record may declare.
pub const MAX_TERMS: usize = 32;
/// Longest index term.
pub const MAX_TERM_BYTES: usize = 128;
/// Longest signature.
pub const MAX_SIG_BYTES: usize = 128;

/// The id of the hub that originated a record: the bytes of its libp2p PeerId.
/// The store treats it as opaque.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OriginId(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl OriginId {
    /// Wraps raw id bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        OriginId(bytes.into())
    }
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for OriginId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OriginId({self})")
    }
}

impl fmt::Display for OriginId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A hybrid-logical-clock timestamp: wall-clock milliseconds plus a counter that
/// orders events within one millisecond (and events "from the future" of a
/// skewed peer). Ordered by `(wall_ms, counter)`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Version {
    /// Milliseconds since the Unix epoch.
    pub wall_ms: u64,
    /// Tie-breaker within one millisecond.
    pub counter: u32,
}

/// One replicated record. `sig` is the origin hub's signature over
/// [`crate::codec::signing_bytes`]; the store keeps it but does not check it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Namespace: which API family's data this is (`server`, `presence`, …).
    pub ns: String,
    /// Key, unique within the namespace.
    pub key: String,
    /// The namespace's CBOR payload.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Hub that accepted the write.
    pub origin: OriginId,
    /// HLC version assigned by the origin.
    pub version: Version,
    /// Origin's per-hub sequence number, from 1, one per originated record.
    pub seq: u64,
    /// Absolute expiry, ms since the Unix epoch. Reads never return a record at
    /// or after this instant.
    pub expires_ms: u64,
    /// Tombstone: the key was deleted at `version`.
    pub deleted: bool,
    /// Index terms the record declares (e.g. expertise topics), searchable with
    /// [`crate::Store::by_term`].
    pub terms: Vec<String>,
    /// Origin's signature.
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("ns", &self.ns)
            .field("key", &self.key)
            .field("body_len", &self.body.len())
            .field("origin", &self.origin)
            .field("version", &self.version)
            .field("seq", &self.seq)
            .field("expires_ms", &self.expires_ms)
            .field("deleted", &self.deleted)
            .field("terms", &self.terms)
            .finish_non_exhaustive()
    }
}

impl Record {
    /// The last-writer-wins rank: higher wins. Ties on `(version, origin)` can
    /// only come from a misbehaving origin; they are broken by the encoded
    /// bytes so that every hub still picks the same winner.
    pub fn outranks(&self, other: &Record) -> bool {
        match (self.version, &self.origin).cmp(&(other.version, &other.origin)) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => {
                crate::codec::encode_record_unchecked(self)
                    > crate::codec::encode_record_unchecked(other)
            }
        }
    }

    /// Whether the record is expired at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_ms <= now_ms
    }

    /// Checks the shape rules: namespace charset, key, origin, terms, sizes.
    pub fn check_shape(&self) -> Result<()> {
        check_ns(&self.ns)?;
        if self.key.is_empty() || self.key.len() > MAX_KEY_BYTES || self.key.contains('\0') {
            return Err(StoreError::Invalid(InvalidRecord::Key));
        }
        if self.origin.0.is_empty() || self.origin.0.len() > MAX_ORIGIN_BYTES {
            return Err(StoreError::Invalid(InvalidRecord::Origin));
        }
        if self.terms.len() > MAX_TERMS
            || self
                .terms
                .iter()
                .any(|t| t.is_empty() || t.len() > MAX_TERM_BYTES || t.contains('\0'))
        {
            return Err(StoreError::Invalid(InvalidRecord::Terms));
        }
        if self.seq == 0 {
            return Err(StoreError::Invalid(InvalidRecord::Seq));
        }
        if self.body.len() > MAX_BODY_BYTES {
            return Err(StoreError::TooLarge {
                what: "body",
                size: self.body.len(),
                max: MAX_BODY_BYTES,
            });
        }
        if self.sig.len() > MAX_SIG_BYTES {
            return Err(StoreError::TooLarge {
                what: "signature",
                size: self.sig.len(),
                max: MAX_SIG_BYTES,
            });
        }
        Ok(())
    }
}

pub(crate) fn check_ns(ns: &str) -> Result<()> {
    let ok = !ns.is_empty()
        && ns.len() <= MAX_NS_BYTES
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(InvalidRecord::Namespace(ns.to_owned())))
    }
}

/// A write this hub originates: the store assigns origin, version and sequence
/// number, then the [`Signer`] signs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draft {
    /// Namespace.
    pub ns: String,
    /// Key.
    pub key: String,
    /// CBOR body (empty for a tombstone).
    pub body: Vec<u8>,
    /// Absolute expiry, ms since the Unix epoch.
    pub expires_ms: u64,
    /// Tombstone. A delete must expire no earlier than what it deletes, or a
    /// late copy of the deleted record could come back once the tombstone is gone.
    pub deleted: bool,
    /// Index terms.
    pub terms: Vec<String>,
}

/// Signs the canonical encoding of records this hub originates.
pub trait Signer: Send + Sync {
    /// The origin id records are signed as.
    fn origin(&self) -> OriginId;
    /// Signs `msg` (the output of [`crate::codec::signing_bytes`]).
    fn sign(&self, msg: &[u8]) -> Vec<u8>;
}
