//! The jsonwebtoken crypto provider the hub installs: the stock aws-lc one,
//! except that parsed EdDSA signing keys are kept.
//!
//! jsonwebtoken builds a signer from the key bytes for every token it signs,
//! and aws-lc's PKCS#8 parse derives the public key again: an ed25519
//! base-point multiplication per token on top of the signature's own, about
//! a quarter of the crypto a server registration costs. Keeping the parsed
//! key pair (one per hub identity in the process) removes it.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use aws_lc_rs::signature::Ed25519KeyPair;
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, aws_lc};
use jsonwebtoken::errors::{ErrorKind, Result};
use jsonwebtoken::signature::{Error as SignatureError, Signer};
use jsonwebtoken::{Algorithm, EncodingKey};

/// Most parsed keys kept: a process runs one hub, tests a handful; past the
/// bound the cache starts again.
const MAX_KEYS: usize = 64;

/// Parsed signing keys by their PKCS#8 bytes.
static KEYS: Mutex<Vec<(Vec<u8>, Arc<Ed25519KeyPair>)>> = Mutex::new(Vec::new());

static PROVIDER: OnceLock<CryptoProvider> = OnceLock::new();

/// Installs the provider for the process. If another provider was installed
/// first, that one stays (tokens are the same; only the cost differs).
pub(crate) fn install() {
    let provider = PROVIDER.get_or_init(|| CryptoProvider {
        signer_factory: signer,
        verifier_factory: aws_lc::DEFAULT_PROVIDER.verifier_factory,
        jwk_utils: aws_lc::DEFAULT_PROVIDER.jwk_utils.clone(),
    });
    let _ = provider.install_default();
}

struct KeptEdDsa(Arc<Ed25519KeyPair>);

impl Signer<Vec<u8>> for KeptEdDsa {
    fn try_sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, SignatureError> {
        Ok(self.0.sign(msg).as_ref().to_vec())
    }
}

impl JwtSigner for KeptEdDsa {
    fn algorithm(&self) -> Algorithm {
        Algorithm::EdDSA
    }
}

fn signer(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
    if *algorithm != Algorithm::EdDSA {
        return (aws_lc::DEFAULT_PROVIDER.signer_factory)(algorithm, key);
    }
    let der = key.inner();
    let mut keys = KEYS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, pair)) = keys.iter().find(|(d, _)| d == der) {
        return Ok(Box::new(KeptEdDsa(pair.clone())));
    }
    // Same checks as the stock signer (a non-Ed key fails to parse here).
    let pair = Arc::new(Ed25519KeyPair::from_pkcs8(der).map_err(|_| ErrorKind::InvalidEddsaKey)?);
    if keys.len() >= MAX_KEYS {
        keys.clear();
    }
    keys.push((der.to_vec(), pair.clone()));
    Ok(Box::new(KeptEdDsa(pair)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::KeyPair as _;
    use jsonwebtoken::{DecodingKey, Header, Validation};

    #[test]
    fn kept_keys_sign_tokens_the_stock_verifier_accepts() {
        install();
        let seed = [7u8; 32];
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&seed);
        let public = Ed25519KeyPair::from_pkcs8(&der)
            .unwrap()
            .public_key()
            .as_ref()
            .to_vec();
        let claims = serde_json::json!({"sub": "s", "exp": u64::MAX / 2});
        let key = EncodingKey::from_ed_der(&der);
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.required_spec_claims.clear();
        for _ in 0..3 {
            // The first token parses the key, the next ones reuse it.
            let token =
                jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key).unwrap();
            let data = jsonwebtoken::decode::<serde_json::Value>(
                &token,
                &DecodingKey::from_ed_der(&public),
                &validation,
            )
            .unwrap();
            assert_eq!(data.claims["sub"], "s");
        }
        // Another key is another entry, not the first key's signer.
        let mut other = der.clone();
        other[20] ^= 1;
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::EdDSA),
            &claims,
            &EncodingKey::from_ed_der(&other),
        )
        .unwrap();
        assert!(
            jsonwebtoken::decode::<serde_json::Value>(
                &token,
                &DecodingKey::from_ed_der(&public),
                &validation
            )
            .is_err()
        );
        // Garbage is the stock error, and other algorithms still work.
        let garbage = EncodingKey::from_ed_der(b"not a key");
        assert!(jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &garbage).is_err());
        let hs = EncodingKey::from_secret(b"k");
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &hs).unwrap();
        let mut hv = Validation::new(Algorithm::HS256);
        hv.required_spec_claims.clear();
        assert!(
            jsonwebtoken::decode::<serde_json::Value>(&token, &DecodingKey::from_secret(b"k"), &hv)
                .is_ok()
        );
    }
}
