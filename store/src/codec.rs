//! The one place where records and local values become bytes and back.
//!
//! Every stored value is `[format version byte] ++ CBOR` (packed: struct fields
//! are numbered, not named). The version byte lets the on-disk layout evolve:
//! a newer build can read older versions, an older build refuses newer ones with
//! [`StoreError::UnknownFormat`] instead of misreading them. The mesh uses the
//! same encoding on the wire, so a record is re-served byte-exact.

use serde::{Serialize, de::DeserializeOwned};

use crate::error::{Result, StoreError};
use crate::record::{MAX_RECORD_BYTES, Record};

/// The format version this build writes (and the newest it reads).
pub const FORMAT_VERSION: u8 = 1;

/// Domain separation for record signatures, so a record signature can never be
/// replayed as a signature over anything else the hub key signs.
const SIGNING_DOMAIN: &[u8] = b"hubmesh/record/v1\0";

/// Encodes a record for storage or the wire, refusing oversized or misshapen records.
pub fn encode_record(record: &Record) -> Result<Vec<u8>> {
    record.check_shape()?;
    let bytes = encode_record_unchecked(record);
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(StoreError::TooLarge {
            what: "record",
            size: bytes.len(),
            max: MAX_RECORD_BYTES,
        });
    }
    Ok(bytes)
}

pub(crate) fn encode_record_unchecked(record: &Record) -> Vec<u8> {
    encode_value(record).expect("a Record always serializes: no maps with non-string keys")
}

/// Decodes a record from storage or the wire; checks size, version and shape.
pub fn decode_record(bytes: &[u8]) -> Result<Record> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(StoreError::TooLarge {
            what: "record",
            size: bytes.len(),
            max: MAX_RECORD_BYTES,
        });
    }
    let record: Record = decode_value(bytes, "record")?;
    record.check_shape()?;
    Ok(record)
}

/// The canonical bytes an origin signs: every field but the signature, in a
/// fixed order, after a domain tag.
pub fn signing_bytes(record: &Record) -> Vec<u8> {
    let fields = (
        &record.ns,
        &record.key,
        serde_bytes::Bytes::new(&record.body),
        &record.origin,
        record.version,
        record.seq,
        record.expires_ms,
        record.deleted,
        &record.terms,
    );
    let mut out = SIGNING_DOMAIN.to_vec();
    fields
        .serialize(&mut serde_cbor::Serializer::new(&mut out).packed_format())
        .expect("a tuple of plain fields always serializes");
    out
}

/// Encodes any value with the format version byte (local trees use this).
pub fn encode_value<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let mut out = vec![FORMAT_VERSION];
    value
        .serialize(&mut serde_cbor::Serializer::new(&mut out).packed_format())
        .map_err(|e| StoreError::Corrupt {
            context: "encode".into(),
            reason: e.to_string(),
        })?;
    Ok(out)
}

/// Decodes a value written by [`encode_value`]. `context` names it in errors.
pub fn decode_value<T: DeserializeOwned>(bytes: &[u8], context: &str) -> Result<T> {
    let (&version, rest) = bytes.split_first().ok_or_else(|| StoreError::Corrupt {
        context: context.into(),
        reason: "empty value".into(),
    })?;
    match version {
        FORMAT_VERSION => serde_cbor::from_slice(rest).map_err(|e| StoreError::Corrupt {
            context: context.into(),
            reason: e.to_string(),
        }),
        found => Err(StoreError::UnknownFormat {
            found,
            supported: FORMAT_VERSION,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{OriginId, Version};

    fn sample() -> Record {
        Record {
            ns: "server".into(),
            key: "acme/1".into(),
            body: vec![1, 2, 3],
            origin: OriginId::new(vec![7; 38]),
            version: Version {
                wall_ms: 5,
                counter: 1,
            },
            seq: 3,
            expires_ms: 99,
            deleted: false,
            terms: vec!["rust".into()],
            sig: vec![9; 64],
        }
    }

    #[test]
    fn round_trip_is_byte_exact() {
        let r = sample();
        let bytes = encode_record(&r).unwrap();
        let back = decode_record(&bytes).unwrap();
        assert_eq!(back, r);
        assert_eq!(encode_record(&back).unwrap(), bytes);
    }

    #[test]
    fn signing_bytes_cover_every_field_but_sig() {
        let r = sample();
        let mut other = r.clone();
        other.sig = vec![1; 64];
        assert_eq!(signing_bytes(&r), signing_bytes(&other));
        let mut changed = r.clone();
        changed.expires_ms += 1;
        assert_ne!(signing_bytes(&r), signing_bytes(&changed));
        let mut changed = r.clone();
        changed.terms.push("x".into());
        assert_ne!(signing_bytes(&r), signing_bytes(&changed));
    }

    #[test]
    fn bad_bytes_are_typed_errors() {
        assert!(matches!(
            decode_record(&[]),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            decode_record(&[9, 1, 2]),
            Err(StoreError::UnknownFormat { found: 9, .. })
        ));
        assert!(matches!(
            decode_record(&[FORMAT_VERSION, 0xff, 0x00]),
            Err(StoreError::Corrupt { .. })
        ));
        // A foreign but well-formed CBOR value.
        let mut foreign = vec![FORMAT_VERSION];
        foreign.extend(serde_cbor::to_vec(&"hello").unwrap());
        assert!(matches!(
            decode_record(&foreign),
            Err(StoreError::Corrupt { .. })
        ));
        // A byte string header claiming 4 GiB on a tiny input must not allocate it.
        assert!(decode_record(&[FORMAT_VERSION, 0x9f, 0x5a, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(matches!(
            decode_record(&vec![FORMAT_VERSION; MAX_RECORD_BYTES + 1]),
            Err(StoreError::TooLarge { .. })
        ));
    }

    #[test]
    fn oversized_and_misshapen_records_are_refused() {
        let mut r = sample();
        r.body = vec![0; crate::record::MAX_BODY_BYTES + 1];
        assert!(matches!(
            encode_record(&r),
            Err(StoreError::TooLarge { .. })
        ));
        let mut r = sample();
        r.ns = "Bad NS".into();
        assert!(matches!(encode_record(&r), Err(StoreError::Invalid(_))));
        let mut r = sample();
        r.key = "a\0b".into();
        assert!(matches!(encode_record(&r), Err(StoreError::Invalid(_))));
        let mut r = sample();
        r.seq = 0;
        assert!(matches!(encode_record(&r), Err(StoreError::Invalid(_))));
    }
}
