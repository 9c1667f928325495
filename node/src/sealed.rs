//! The sealed envelope for signal payloads (`specs/sealed.md`): a client
//! seals a payload to the recipient's x25519 public key (published in its
//! profile as `x25519_public_key`), hubs relay the envelope as an opaque
//! string, and only the recipient opens it. One fresh ephemeral x25519 key
//! per envelope; HKDF-SHA256 over the shared secret derives the
//! ChaCha20-Poly1305 key and nonce; the version byte and the ephemeral key
//! are authenticated, so tampering with any byte makes [`open`] fail.
//!
//! ```
//! use hubmesh_node::sealed;
//! let (secret, public) = sealed::generate_keypair();
//! let text = sealed::seal_text(&public, b"v=0 offer").unwrap();
//! assert_eq!(sealed::open_text(&secret, &text).unwrap(), b"v=0 offer");
//! ```

use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
pub use x25519_dalek::{PublicKey, StaticSecret};

/// The envelope format version (the first byte).
pub const VERSION: u8 = 1;
/// HKDF `info` of version 1.
pub const INFO: &[u8] = b"hubmesh sealed signal v1";
/// Largest plaintext: its text form (~4/3 of it) plus the frame around it
/// must fit the default 16 KiB WebSocket frame limit of `/ws/signal`.
pub const MAX_PLAINTEXT: usize = 8 * 1024;
/// Bytes an envelope adds to its plaintext: version, ephemeral key, tag.
pub const OVERHEAD: usize = 1 + 32 + 16;

/// Why sealing or opening failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The plaintext exceeds [`MAX_PLAINTEXT`].
    #[error("plaintext of {0} bytes exceeds the limit of {MAX_PLAINTEXT}")]
    TooLarge(usize),
    /// Not an envelope: too short, unknown version, or bad text encoding.
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    /// The recipient key is a low-order point (the shared secret would be
    /// all zeroes, known to anyone).
    #[error("the public key is not usable (low-order point)")]
    WeakKey,
    /// Authentication failed: tampered, truncated, or sealed to another key.
    #[error("the envelope does not open with this key (tampered or not for this key)")]
    Open,
    /// A key string is not base64 of 32 bytes.
    #[error("a key must be base64 of 32 bytes")]
    BadKey,
}

/// A fresh x25519 key pair from the OS RNG.
pub fn generate_keypair() -> (StaticSecret, PublicKey) {
    let secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
    let public = PublicKey::from(&secret);
    (secret, public)
}

/// Parses standard or URL-safe base64 (padded or not) of a 32-byte key.
pub fn key_bytes_from_b64(s: &str) -> Result<[u8; 32], SealError> {
    let s = s.trim();
    let raw = B64
        .decode(s)
        .or_else(|_| B64URL.decode(s.trim_end_matches('=')))
        .map_err(|_| SealError::BadKey)?;
    raw.try_into().map_err(|_| SealError::BadKey)
}

/// A public key from its base64 text (as published in a profile).
pub fn public_key_from_b64(s: &str) -> Result<PublicKey, SealError> {
    key_bytes_from_b64(s).map(PublicKey::from)
}

/// A secret key from its base64 text (as `hubmesh seal --keygen` writes it).
pub fn secret_key_from_b64(s: &str) -> Result<StaticSecret, SealError> {
    key_bytes_from_b64(s).map(StaticSecret::from)
}

/// Standard padded base64 of a key (the profile's text form).
pub fn key_to_b64(bytes: &[u8; 32]) -> String {
    B64.encode(bytes)
}

/// Key and nonce for one envelope: HKDF-SHA256(ikm = shared secret,
/// salt = ephemeral public || recipient public, info = [`INFO`]) → 44 bytes.
fn derive(shared: &[u8; 32], eph: &[u8; 32], recipient: &[u8; 32]) -> (Key, Nonce) {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(eph);
    salt[32..].copy_from_slice(recipient);
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut okm = [0u8; 44];
    // 44 bytes is far below HKDF-SHA256's 255 × 32 output limit.
    hk.expand(INFO, &mut okm)
        .expect("44 bytes is a valid HKDF-SHA256 output length");
    (
        *Key::from_slice(&okm[..32]),
        *Nonce::from_slice(&okm[32..44]),
    )
}

/// Seals `plaintext` to `recipient` with a fresh ephemeral key.
pub fn seal(recipient: &PublicKey, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    seal_with_ephemeral(
        StaticSecret::random_from_rng(rand::rngs::OsRng),
        recipient,
        plaintext,
    )
}

/// Seals with a given ephemeral secret. Only for test vectors: reusing an
/// ephemeral secret for two plaintexts to one recipient reuses the nonce.
pub fn seal_with_ephemeral(
    ephemeral: StaticSecret,
    recipient: &PublicKey,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(SealError::TooLarge(plaintext.len()));
    }
    let eph_pub = PublicKey::from(&ephemeral);
    let shared = ephemeral.diffie_hellman(recipient);
    if !shared.was_contributory() {
        return Err(SealError::WeakKey);
    }
    let (key, nonce) = derive(shared.as_bytes(), eph_pub.as_bytes(), recipient.as_bytes());
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    out.push(VERSION);
    out.extend_from_slice(eph_pub.as_bytes());
    let ct = ChaCha20Poly1305::new(&key)
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad: &out,
            },
        )
        .map_err(|_| SealError::TooLarge(plaintext.len()))?;
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens an envelope with the recipient's secret key.
pub fn open(secret: &StaticSecret, envelope: &[u8]) -> Result<Vec<u8>, SealError> {
    if envelope.len() < OVERHEAD {
        return Err(SealError::Malformed("shorter than the envelope overhead"));
    }
    if envelope[0] != VERSION {
        return Err(SealError::Malformed("unknown version"));
    }
    if envelope.len() > OVERHEAD + MAX_PLAINTEXT {
        return Err(SealError::Malformed("longer than the largest envelope"));
    }
    let mut eph = [0u8; 32];
    eph.copy_from_slice(&envelope[1..33]);
    let eph_pub = PublicKey::from(eph);
    let shared = secret.diffie_hellman(&eph_pub);
    if !shared.was_contributory() {
        return Err(SealError::Open);
    }
    let recipient = PublicKey::from(secret);
    let (key, nonce) = derive(shared.as_bytes(), &eph, recipient.as_bytes());
    ChaCha20Poly1305::new(&key)
        .decrypt(
            &nonce,
            Payload {
                msg: &envelope[33..],
                aad: &envelope[..33],
            },
        )
        .map_err(|_| SealError::Open)
}

/// [`seal`] in the text form: unpadded base64url of the envelope.
pub fn seal_text(recipient: &PublicKey, plaintext: &[u8]) -> Result<String, SealError> {
    seal(recipient, plaintext).map(|b| B64URL.encode(b))
}

/// [`open`] of the text form.
pub fn open_text(secret: &StaticSecret, text: &str) -> Result<Vec<u8>, SealError> {
    if text.len() > (OVERHEAD + MAX_PLAINTEXT) * 4 / 3 + 4 {
        return Err(SealError::Malformed("longer than the largest envelope"));
    }
    let raw = B64URL
        .decode(text.trim())
        .map_err(|_| SealError::Malformed("not unpadded base64url"))?;
    open(secret, &raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The vector of `specs/sealed.md`, computed independently (Python
    /// `cryptography`: X25519, HKDF-SHA256, ChaCha20Poly1305).
    #[test]
    fn spec_test_vector() {
        let recipient_secret = StaticSecret::from([0x11u8; 32]);
        let ephemeral = StaticSecret::from([0x22u8; 32]);
        let recipient = PublicKey::from(&recipient_secret);
        let env = seal_with_ephemeral(ephemeral, &recipient, b"hello hubmesh").unwrap();
        assert_eq!(hex(&env), include_str!("../../specs/sealed.vector").trim());
        assert_eq!(open(&recipient_secret, &env).unwrap(), b"hello hubmesh");
    }

    #[test]
    fn round_trip_and_tamper() {
        let (s, p) = generate_keypair();
        let env = seal(&p, b"payload").unwrap();
        assert_eq!(env.len(), OVERHEAD + 7);
        assert_eq!(open(&s, &env).unwrap(), b"payload");
        for i in 0..env.len() {
            let mut t = env.clone();
            t[i] ^= 0x01;
            assert!(open(&s, &t).is_err(), "flipping byte {i} went unnoticed");
        }
        assert!(open(&s, &env[..env.len() - 1]).is_err());
        let (other, _) = generate_keypair();
        assert_eq!(open(&other, &env), Err(SealError::Open));
        assert!(matches!(
            seal(&p, &vec![0; MAX_PLAINTEXT + 1]),
            Err(SealError::TooLarge(_))
        ));
        assert_eq!(
            seal(&PublicKey::from([0u8; 32]), b"x"),
            Err(SealError::WeakKey)
        );
        let text = seal_text(&p, b"").unwrap();
        assert_eq!(open_text(&s, &text).unwrap(), b"");
        assert!(open_text(&s, "!!!").is_err());
        let b = key_to_b64(p.as_bytes());
        assert_eq!(public_key_from_b64(&b).unwrap(), p);
        assert_eq!(key_bytes_from_b64("AAAA"), Err(SealError::BadKey));
    }
}
