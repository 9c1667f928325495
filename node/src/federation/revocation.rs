//! Logout everywhere: `POST /logout` writes a replicated `revocation`
//! record (key = the token's `jti`, body `{jti, iss, sub, exp}`, expiring
//! with the token plus the verification leeway), and every hub refuses a
//! token whose `jti` it holds a live revocation for ([`is_revoked`]). The
//! check is a point lookup in the store, which holds both local writes and
//! records accepted from the mesh, so one path serves both; revocations
//! expire with their token and the store's sweeper drops them.

use std::str::FromStr;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use hubmesh_mesh::PeerId;
use hubmesh_store::{Draft, Record, Store, StoreError};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{FedError, authenticate_headers};
use crate::auth::UserClaims;
use crate::config::MAX_USER_TOKEN_TTL;
use crate::error::{ApiError, ApiJson};
use crate::facade::AppState;
use crate::now_ms;

/// The record namespace.
pub const NS: &str = "revocation";
/// How long after `exp` a token still verifies (the token service's leeway):
/// the revocation outlives the token by this much.
pub const SLACK: Duration = Duration::from_secs(30);
/// Clock skew between hubs a revocation's expiry may carry.
const SKEW: Duration = Duration::from_secs(300);
/// Longest `jti` accepted.
const MAX_JTI: usize = 64;

/// The body of a revocation record (CBOR).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationBody {
    /// The revoked token's id.
    pub jti: String,
    /// Its issuer (home hub PeerId).
    pub iss: String,
    /// Its subject (username on the issuer).
    pub sub: String,
    /// Its expiry, seconds since the epoch.
    pub exp: u64,
}

/// `POST /logout` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogoutResponse {
    /// `Successfully logged out`.
    pub message: String,
}

fn check_jti(jti: &str) -> Result<(), String> {
    if jti.is_empty()
        || jti.len() > MAX_JTI
        || !jti.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err("jti must be 1-64 of [A-Za-z0-9-]".into());
    }
    Ok(())
}

/// Validates an inbound revocation record: body shape, key = jti, issuer a
/// PeerId, and an expiry that matches the token's and is not absurdly far
/// ahead (at most now + the longest token lifetime + leeway + skew).
pub fn validate_record(r: &Record) -> Result<(), String> {
    check_jti(&r.key)?;
    if r.deleted {
        return Ok(());
    }
    let b: RevocationBody =
        serde_cbor::from_slice(&r.body).map_err(|e| format!("revocation body: {e}"))?;
    if b.jti != r.key {
        return Err("revocation key does not match its jti".into());
    }
    PeerId::from_str(&b.iss).map_err(|_| "revocation iss is not a PeerId".to_string())?;
    super::accounts::check_any_username(&b.sub).map_err(|e| e.to_string())?;
    let exp_ms = b.exp.saturating_mul(1000);
    if r.expires_ms < exp_ms || r.expires_ms > exp_ms + SLACK.as_millis() as u64 {
        return Err("revocation expiry does not match the token's".into());
    }
    let horizon = now_ms() + (MAX_USER_TOKEN_TTL + SLACK + SKEW).as_millis() as u64;
    if r.expires_ms > horizon {
        return Err("revocation expires too far ahead".into());
    }
    Ok(())
}

/// Whether a live revocation of `jti` is held (one store point lookup).
pub fn is_revoked(store: &Store, jti: &str) -> Result<bool, StoreError> {
    if check_jti(jti).is_err() {
        // Never stored: the validator refuses such keys.
        return Ok(false);
    }
    Ok(store.get(NS, jti)?.is_some())
}

/// Revokes the token with `claims` federation-wide: durable here, then
/// published (gossip, DHT, anti-entropy).
pub async fn revoke(state: &AppState, claims: &UserClaims) -> Result<(), ApiError> {
    let body = RevocationBody {
        jti: claims.jti.clone(),
        iss: claims.iss.clone(),
        sub: claims.sub.clone(),
        exp: claims.exp,
    };
    let draft = Draft {
        ns: NS.into(),
        key: claims.jti.clone(),
        body: serde_cbor::to_vec(&body).map_err(ApiError::internal)?,
        expires_ms: claims.exp.saturating_mul(1000) + SLACK.as_millis() as u64,
        deleted: false,
        terms: Vec::new(),
    };
    state.mesh.write(vec![draft]).await?;
    metrics::counter!("hubmesh_federation_logouts_total").increment(1);
    Ok(())
}

/// Logs out: revokes the bearer token on every hub until it expires.
#[utoipa::path(
    post, path = "/logout", tag = "federation",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "revoked; durable on this hub, replicating to every hub", body = LogoutResponse),
        (status = 401, description = "missing, invalid, expired, foreign or already revoked token", body = super::login::DetailBody),
        (status = 429, description = "rate limited, with Retry-After", body = super::login::DetailBody),
    )
)]
pub async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<ApiJson<LogoutResponse>, FedError> {
    let claims = authenticate_headers(&state, &headers)?;
    revoke(&state, &claims).await?;
    tracing::info!(user = %claims.sub, iss = %claims.iss, jti = %claims.jti, "logout");
    Ok(ApiJson(LogoutResponse {
        message: "Successfully logged out".into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubmesh_store::{OriginId, Version};

    fn record(body: &RevocationBody, key: &str, expires_ms: u64) -> Record {
        Record {
            ns: NS.into(),
            key: key.into(),
            body: serde_cbor::to_vec(body).unwrap(),
            origin: OriginId::new(vec![1; 38]),
            version: Version {
                wall_ms: 1,
                counter: 0,
            },
            seq: 1,
            expires_ms,
            deleted: false,
            terms: Vec::new(),
            sig: Vec::new(),
        }
    }

    #[test]
    fn validation() {
        let exp = now_ms() / 1000 + 600;
        let b = RevocationBody {
            jti: "0b3c-9".into(),
            iss: PeerId::random().to_string(),
            sub: "alice".into(),
            exp,
        };
        assert!(validate_record(&record(&b, "0b3c-9", exp * 1000 + 30_000)).is_ok());
        assert!(validate_record(&record(&b, "other", exp * 1000)).is_err());
        assert!(validate_record(&record(&b, "0b3c-9", exp * 1000 + 31_000)).is_err());
        let far = RevocationBody {
            exp: exp + 10 * 86_400,
            ..b.clone()
        };
        assert!(validate_record(&record(&far, "0b3c-9", far.exp * 1000)).is_err());
        let bad_iss = RevocationBody {
            iss: "nope".into(),
            ..b.clone()
        };
        assert!(validate_record(&record(&bad_iss, "0b3c-9", exp * 1000)).is_err());
        let mut garbage = record(&b, "0b3c-9", exp * 1000);
        garbage.body = vec![0xff, 0x00];
        assert!(validate_record(&garbage).is_err());
        assert!(validate_record(&record(&b, "bad key!", exp * 1000)).is_err());
    }
}
