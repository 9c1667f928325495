//! D-PC node identities (compat §E, `POST /register-node-id`): the checks of
//! the reference (certificate parses, is within its validity window and is
//! self-signed by its key; that key equals `public_key`; `node_id` is
//! `"dpc-node-"` + the first 16 hex digits of SHA-256 of the key's
//! SubjectPublicKeyInfo DER; the certificate CN equals `node_id`; the id is
//! not registered to another account anywhere in the federation), then a
//! replicated record in namespace [`NS`] keyed by node id, indexed by its
//! owner (`owner:<iss>/<sub>`), which every hub re-verifies on arrival.
//! Errors use the family's FastAPI shape ([`FedError`]).

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use hubmesh_store::{Draft, Record};
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use rsa::traits::PublicKeyParts;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::{FedError, Limit, authenticate_headers};
use crate::auth::UserClaims;
use crate::error::{ApiError, ApiJson};
use crate::facade::AppState;
use crate::now_ms;

/// Namespace of node identity records.
pub const NS: &str = "node";
/// Prefix of every node id.
pub const NODE_ID_PREFIX: &str = "dpc-node-";
/// Smallest accepted RSA modulus.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest accepted RSA modulus.
pub const MAX_RSA_BITS: usize = 4096;
/// Longest accepted PEM text (a 4096-bit certificate is about 2 KB).
pub const MAX_PEM_BYTES: usize = 16 * 1024;
/// Clock skew tolerated on a certificate's `notBefore`.
pub const NOT_BEFORE_SKEW: Duration = Duration::from_secs(300);
/// Longest an identity (or profile) record lives without being refreshed:
/// below the mesh's 30-day expiry limit. A node refreshes it by connecting
/// to `/ws/signal` or updating its profile.
pub const RECORD_TTL: Duration = Duration::from_secs(29 * 24 * 3600);
/// When less than this is left, a connection or profile update rewrites the record.
pub const REFRESH_BELOW: Duration = Duration::from_secs(22 * 24 * 3600);

pub use super::login::DetailBody;

/// `POST /register-node-id` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RegisterNodeRequest {
    /// `dpc-node-` + 16 lower-case hex digits.
    pub node_id: String,
    /// The RSA public key (PEM, `PUBLIC KEY` or `RSA PUBLIC KEY`), 2048–4096 bits.
    pub public_key: String,
    /// Self-signed X.509 certificate (PEM) of that key with CN = node_id.
    pub certificate: String,
}

/// `POST /register-node-id` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RegisterNodeResponse {
    /// The node id.
    pub node_id: String,
    /// Always true (a failed check is an error).
    pub verified: bool,
    /// Human-readable outcome.
    pub message: String,
}

/// The replicated body of an identity (CBOR).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeBody {
    /// The node id (also the record key).
    pub node_id: String,
    /// The public key PEM as registered.
    pub public_key: String,
    /// The certificate PEM as registered.
    pub certificate: String,
    /// Home hub (PeerId) of the owning account.
    pub owner_iss: String,
    /// Username of the owning account on its home hub.
    pub owner_sub: String,
    /// First registration, ms since the epoch.
    pub registered_ms: u64,
    /// PeerId of the hub that wrote this version.
    pub hub: String,
}

/// Why an identity was refused (each a 400 with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// `node_id` is not `dpc-node-` + 16 lower-case hex digits.
    #[error("node_id must be \"dpc-node-\" followed by 16 lower-case hex digits")]
    NodeIdFormat,
    /// The public key is not a PEM RSA public key.
    #[error("public_key is not a PEM RSA public key: {0}")]
    PublicKey(String),
    /// The key size is outside 2048–4096 bits.
    #[error("RSA key of {0} bits; accepted: 2048 to 4096")]
    KeySize(usize),
    /// The certificate does not parse.
    #[error("certificate is not a PEM X.509 certificate: {0}")]
    Certificate(String),
    /// Before `notBefore`.
    #[error("certificate is not valid yet")]
    NotYetValid,
    /// After `notAfter`.
    #[error("certificate has expired")]
    Expired,
    /// The self-signature does not verify with the certificate's key.
    #[error("certificate signature does not verify with its own key")]
    Signature,
    /// The certificate's key differs from `public_key`.
    #[error("the certificate's public key does not match public_key")]
    KeyMismatch,
    /// `node_id` is not derived from the key.
    #[error("node_id does not match the public key (expected {0})")]
    NodeIdMismatch(String),
    /// CN differs from `node_id`.
    #[error("certificate CN does not match node_id")]
    CommonName,
}

/// What a successful check establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedIdentity {
    /// The node id.
    pub node_id: String,
    /// `notAfter`, ms since the epoch.
    pub not_after_ms: u64,
}

/// Whether `id` has the node-id shape.
pub fn is_node_id(id: &str) -> bool {
    id.len() == NODE_ID_PREFIX.len() + 16
        && id.starts_with(NODE_ID_PREFIX)
        && id[NODE_ID_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The node id of an RSA public key: `dpc-node-` + first 16 hex digits of
/// SHA-256 of its SubjectPublicKeyInfo DER.
pub fn node_id_of(spki_der: &[u8]) -> String {
    let digest = Sha256::digest(spki_der);
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{NODE_ID_PREFIX}{hex}")
}

fn parse_public_key(pem: &str) -> Result<rsa::RsaPublicKey, IdentityError> {
    let pem = pem.trim();
    if pem.contains("BEGIN RSA PUBLIC KEY") {
        rsa::RsaPublicKey::from_pkcs1_pem(pem).map_err(|e| IdentityError::PublicKey(e.to_string()))
    } else {
        rsa::RsaPublicKey::from_public_key_pem(pem)
            .map_err(|e| IdentityError::PublicKey(e.to_string()))
    }
}

/// Runs every identity check of the reference at time `now_ms`.
pub fn verify_identity(
    node_id: &str,
    public_key_pem: &str,
    certificate_pem: &str,
    now_ms: u64,
) -> Result<VerifiedIdentity, IdentityError> {
    if !is_node_id(node_id) {
        return Err(IdentityError::NodeIdFormat);
    }
    let key = parse_public_key(public_key_pem)?;
    let bits = key.n().bits();
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        return Err(IdentityError::KeySize(bits));
    }
    let (_, pem) = x509_parser::pem::parse_x509_pem(certificate_pem.trim().as_bytes())
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    if pem.label != "CERTIFICATE" {
        return Err(IdentityError::Certificate(format!(
            "PEM label is {:?}",
            pem.label
        )));
    }
    let cert = pem
        .parse_x509()
        .map_err(|e| IdentityError::Certificate(e.to_string()))?;
    let now_s = (now_ms / 1000) as i64;
    let validity = cert.validity();
    if validity.not_before.timestamp() > now_s + NOT_BEFORE_SKEW.as_secs() as i64 {
        return Err(IdentityError::NotYetValid);
    }
    if validity.not_after.timestamp() < now_s {
        return Err(IdentityError::Expired);
    }
    let cert_key = rsa::RsaPublicKey::from_public_key_der(cert.public_key().raw)
        .map_err(|_| IdentityError::KeyMismatch)?;
    if cert_key != key {
        return Err(IdentityError::KeyMismatch);
    }
    // Proof of possession: only the key's holder can self-sign a certificate
    // naming this key, so nobody registers someone else's public key.
    cert.verify_signature(None)
        .map_err(|_| IdentityError::Signature)?;
    let der = key
        .to_public_key_der()
        .map_err(|e| IdentityError::PublicKey(e.to_string()))?;
    let expected = node_id_of(der.as_bytes());
    if expected != node_id {
        return Err(IdentityError::NodeIdMismatch(expected));
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok());
    if cn != Some(node_id) {
        return Err(IdentityError::CommonName);
    }
    Ok(VerifiedIdentity {
        node_id: expected,
        not_after_ms: (validity.not_after.timestamp().max(0) as u64) * 1000,
    })
}

/// The index term naming an identity's owner: `owner:<iss>/<sub>`, or,
/// when that exceeds the store's 128-byte term limit (long OAuth names),
/// `owner:<iss>/#` + the first 32 hex digits of SHA-256(sub).
pub fn owner_term(iss: &str, sub: &str) -> String {
    let plain = format!("owner:{iss}/{sub}");
    if plain.len() <= hubmesh_store::MAX_TERM_BYTES {
        return plain;
    }
    let hex: String = Sha256::digest(sub.as_bytes())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("owner:{iss}/#{hex}")
}

/// Decodes an identity body.
pub fn decode_body(r: &Record) -> Option<NodeBody> {
    serde_cbor::from_slice(&r.body).ok()
}

/// Validates an inbound identity record: the certificate is verified again,
/// the key and index term must match the body, and the record must not
/// outlive the certificate.
pub fn validate_record(r: &Record) -> Result<(), String> {
    if r.deleted {
        return Ok(());
    }
    let body: NodeBody = serde_cbor::from_slice(&r.body).map_err(|e| format!("node body: {e}"))?;
    if body.public_key.len() > MAX_PEM_BYTES || body.certificate.len() > MAX_PEM_BYTES {
        return Err("node body: PEM too long".into());
    }
    let v = verify_identity(&body.node_id, &body.public_key, &body.certificate, now_ms())
        .map_err(|e| e.to_string())?;
    if r.key != body.node_id {
        return Err("node record key does not match its body".into());
    }
    if r.terms != [owner_term(&body.owner_iss, &body.owner_sub)] {
        return Err("node record terms do not name its owner".into());
    }
    if r.expires_ms > v.not_after_ms {
        return Err("node record outlives its certificate".into());
    }
    Ok(())
}

/// The identity registered to a user (at most one per account).
pub fn node_of(state: &AppState, claims: &UserClaims) -> Result<Option<Record>, ApiError> {
    let mut found = state
        .store
        .by_term(NS, &owner_term(&claims.iss, &claims.sub), 4)?;
    // Two hubs may have raced (see specs/federation.md): the newest wins.
    found.sort_by(|a, b| (b.version, &b.origin).cmp(&(a.version, &a.origin)));
    Ok(found.into_iter().next())
}

/// The draft of an identity record.
pub fn identity_draft(body: &NodeBody, not_after_ms: u64, now: u64) -> Result<Draft, ApiError> {
    Ok(Draft {
        ns: NS.into(),
        key: body.node_id.clone(),
        body: serde_cbor::to_vec(body).map_err(ApiError::internal)?,
        expires_ms: not_after_ms.min(now + RECORD_TTL.as_millis() as u64),
        deleted: false,
        terms: vec![owner_term(&body.owner_iss, &body.owner_sub)],
    })
}

/// A tombstone for `r` that outlives it.
pub fn tombstone(r: &Record, now: u64) -> Draft {
    Draft {
        ns: r.ns.clone(),
        key: r.key.clone(),
        body: Vec::new(),
        expires_ms: r.expires_ms.max(now + 60_000),
        deleted: true,
        terms: Vec::new(),
    }
}

/// Rewrites an identity whose expiry is near (a connected node stays registered).
pub async fn refresh_if_due(state: &AppState, r: &Record) -> Result<(), ApiError> {
    let now = now_ms();
    if r.expires_ms > now + REFRESH_BELOW.as_millis() as u64 {
        return Ok(());
    }
    let Some(mut body) = decode_body(r) else {
        return Ok(());
    };
    let Ok(v) = verify_identity(&body.node_id, &body.public_key, &body.certificate, now) else {
        return Ok(());
    };
    body.hub = state.peer_id.clone();
    let draft = identity_draft(&body, v.not_after_ms, now)?;
    if draft.expires_ms > r.expires_ms {
        state.mesh.write(vec![draft]).await?;
    }
    Ok(())
}

fn counter(outcome: &'static str) {
    metrics::counter!("hubmesh_node_register_total", "outcome" => outcome).increment(1);
}

/// Registers the caller's node identity.
#[utoipa::path(
    post, path = "/register-node-id", tag = "federation",
    security(("bearer" = [])),
    request_body = RegisterNodeRequest,
    responses(
        (status = 200, description = "registered and verified; durable on this hub", body = RegisterNodeResponse),
        (status = 400, description = "a check failed (the detail names it)", body = DetailBody),
        (status = 401, description = "missing, invalid, expired, revoked or foreign token", body = DetailBody),
        (status = 409, description = "node id registered to another account", body = DetailBody),
        (status = 422, description = "missing field or PEM too long", body = DetailBody),
        (status = 429, description = "more than 10 registrations per minute from this IP"),
    )
)]
pub async fn register_node_id(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<RegisterNodeRequest>, ApiError>,
) -> Result<ApiJson<RegisterNodeResponse>, FedError> {
    let result = register_inner(&state, &headers, body).await;
    counter(if result.is_ok() { "ok" } else { "error" });
    result.map(ApiJson).map_err(FedError)
}

async fn register_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<ApiJson<RegisterNodeRequest>, ApiError>,
) -> Result<RegisterNodeResponse, ApiError> {
    let claims = authenticate_headers(state, headers)?;
    let ApiJson(req) = body?;
    if req.public_key.len() > MAX_PEM_BYTES || req.certificate.len() > MAX_PEM_BYTES {
        return Err(ApiError::invalid_field(
            "certificate",
            "PEM longer than 16 KiB",
        ));
    }
    let now = now_ms();
    let verified = verify_identity(&req.node_id, &req.public_key, &req.certificate, now)
        .map_err(|e| ApiError::bad_request("invalid_identity", e.to_string()))?;
    // Held here, or anywhere in the federation (DHT) on a local miss.
    let existing = match state.store.get(NS, &req.node_id)? {
        Some(r) => Some(r),
        None => state.mesh.lookup(NS, &req.node_id).await?,
    };
    let mut registered_ms = now;
    if let Some(r) = &existing {
        let held = decode_body(r).ok_or_else(|| ApiError::internal("undecodable node record"))?;
        if (held.owner_iss.as_str(), held.owner_sub.as_str())
            != (claims.iss.as_str(), claims.sub.as_str())
        {
            return Err(ApiError::conflict(
                "node_id_taken",
                "Node ID already registered to another account",
            ));
        }
        registered_ms = held.registered_ms;
    }
    let mut drafts = Vec::new();
    // One node per account: registering another id retires the previous one.
    if let Some(old) = node_of(state, &claims)?
        && old.key != req.node_id
    {
        drafts.push(tombstone(&old, now));
        if let Some(p) = state.store.get(super::profile::NS, &old.key)? {
            drafts.push(tombstone(&p, now));
        }
    }
    let body = NodeBody {
        node_id: verified.node_id.clone(),
        public_key: req.public_key,
        certificate: req.certificate,
        owner_iss: claims.iss.clone(),
        owner_sub: claims.sub.clone(),
        registered_ms,
        hub: state.peer_id.clone(),
    };
    drafts.push(identity_draft(&body, verified.not_after_ms, now)?);
    state.mesh.write(drafts).await?;
    tracing::info!(node = %verified.node_id, user = %claims.sub, "node identity registered");
    Ok(RegisterNodeResponse {
        node_id: verified.node_id,
        verified: true,
        message: "Node identity successfully registered and verified".into(),
    })
}

/// The identity routes: `POST /register-node-id`, limited per client IP by
/// `limiter` (10/min by default) on top of the family's general limit.
pub fn routes(limit: Limit) -> Router<AppState> {
    Router::new().route(
        "/register-node-id",
        post(register_node_id).layer(axum::middleware::from_fn_with_state(
            limit,
            super::rate_limit,
        )),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_shape() {
        assert!(is_node_id("dpc-node-8b066c7f3d7eb627"));
        assert!(!is_node_id("dpc-node-8B066C7F3D7EB627"));
        assert!(!is_node_id("dpc-node-8b066c7f3d7eb62"));
        assert!(!is_node_id("node-8b066c7f3d7eb6270"));
        assert_eq!(node_id_of(b"x").len(), 25);
    }
}
