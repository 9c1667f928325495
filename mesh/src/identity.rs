//! The hub's identity: its persisted ed25519 keypair, the [`HubSigner`] that
//! signs the records it originates, the origin key a record names, and
//! [`verify_record`], a record's signature check on its own (inbound records
//! go through `Validator`, which checks the same signature, batched).

use std::path::Path;

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use hubmesh_store::{OriginId, Record, Signer, codec};
use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};

use crate::error::{MeshError, ValidationError};

/// Multihash code of the identity hash: a PeerId that embeds its public key.
const IDENTITY_MULTIHASH: u64 = 0x00;

/// Loads the hub's ed25519 keypair from `path` (protobuf-encoded, as libp2p
/// writes it), or creates one there with mode 0600 if the file is absent.
pub fn load_or_create_identity(path: &Path) -> Result<Keypair, MeshError> {
    let err = |reason: String| MeshError::Identity {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let key = Keypair::from_protobuf_encoding(&bytes).map_err(|e| err(e.to_string()))?;
            if key.key_type() != libp2p::identity::KeyType::Ed25519 {
                return Err(err(format!("{:?} key, expected ed25519", key.key_type())));
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            hubmesh_store::write_private(path, &bytes).map_err(|e| err(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// Signs records as this hub: origin = PeerId bytes, signature = ed25519 over
/// [`codec::signing_bytes`].
#[derive(Clone)]
pub struct HubSigner(pub Keypair);

impl std::fmt::Debug for HubSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HubSigner({})", self.0.public().to_peer_id())
    }
}

impl Signer for HubSigner {
    fn origin(&self) -> OriginId {
        OriginId::new(self.0.public().to_peer_id().to_bytes())
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        // Only RSA signing can fail; `load_or_create_identity` only yields ed25519.
        self.0.sign(msg).unwrap_or_default()
    }
}

/// The ed25519 public key a record's origin names, and the origin as a PeerId.
pub(crate) fn origin_key(origin: &OriginId) -> Result<(PeerId, VerifyingKey), ValidationError> {
    let peer = PeerId::from_bytes(origin.as_bytes()).map_err(|_| ValidationError::Origin)?;
    let mh: &libp2p::multihash::Multihash<64> = peer.as_ref();
    if mh.code() != IDENTITY_MULTIHASH {
        return Err(ValidationError::Origin);
    }
    let key = PublicKey::try_decode_protobuf(mh.digest())
        .ok()
        .and_then(|k| k.try_into_ed25519().ok())
        .and_then(|k| VerifyingKey::from_bytes(&k.to_bytes()).ok())
        .ok_or(ValidationError::Origin)?;
    Ok((peer, key))
}

/// Checks a record's signature: its origin must be the PeerId of an ed25519
/// key (identity multihash) and that key must verify `sig` over
/// [`codec::signing_bytes`]. Returns the origin.
pub fn verify_record(record: &Record) -> Result<PeerId, ValidationError> {
    let (peer, key) = origin_key(&record.origin)?;
    let sig = Signature::from_slice(&record.sig).map_err(|_| ValidationError::Signature)?;
    key.verify(&codec::signing_bytes(record), &sig)
        .map_err(|_| ValidationError::Signature)?;
    Ok(peer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubmesh_store::{Draft, Store};

    #[tokio::test]
    async fn signed_records_verify_and_tampering_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let key = load_or_create_identity(&path).unwrap();
        let again = load_or_create_identity(&path).unwrap();
        assert_eq!(key.public(), again.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let store = Store::memory();
        let signer = HubSigner(key.clone());
        let recs = store
            .originate(
                vec![Draft {
                    ns: "server".into(),
                    key: "k".into(),
                    body: vec![1, 2],
                    expires_ms: u64::MAX,
                    deleted: false,
                    terms: vec![],
                }],
                &signer,
            )
            .await
            .unwrap();
        assert_eq!(verify_record(&recs[0]).unwrap(), key.public().to_peer_id());
        let mut tampered = recs[0].clone();
        tampered.body.push(3);
        assert_eq!(verify_record(&tampered), Err(ValidationError::Signature));
        let mut bad_origin = recs[0].clone();
        bad_origin.origin = OriginId::new(b"nope".to_vec());
        assert_eq!(verify_record(&bad_origin), Err(ValidationError::Origin));
    }

    #[test]
    fn garbage_identity_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            load_or_create_identity(&path),
            Err(MeshError::Identity { .. })
        ));
    }
}
