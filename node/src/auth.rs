//! Authentication shared by every API family: the hub's one [`TokenService`]
//! (EdDSA JWTs signed with the hub's ed25519 key, `iss` = its PeerId, so any
//! member hub verifies any member's token without shared secrets), the
//! [`Members`] view used to refuse tokens of non-member issuers, bearer
//! extraction, and the admin check (admin token, or a direct loopback client).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::HeaderMap;
use base64::Engine;
use hubmesh_mesh::{Keypair, PeerId};
use hubmesh_store::{LocalTree, Store};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, NodeError};

/// Audience of server tokens of the Discovery family.
pub const DISCOVERY_AUDIENCE: &str = "hubmesh:discovery";
/// Clock leeway when checking `exp`.
const LEEWAY_SECS: u64 = 30;
/// Verified tokens kept in memory (verification is an ed25519 check).
const TOKEN_CACHE: u64 = 100_000;

/// Audience of user tokens of the federation-hub family (`POST /token`,
/// OAuth login): the bearer of `/users/me`, `/profile`, `/ws/signal`.
pub const USER_AUDIENCE: &str = "hubmesh:user";

/// Claims of a user token (federation-hub family). The user lives on its home
/// hub (`iss`); every member hub verifies the token with `iss`'s public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserClaims {
    /// Home hub (PeerId) that issued the token and holds the account.
    pub iss: String,
    /// Username on the home hub.
    pub sub: String,
    /// Audience: [`USER_AUDIENCE`].
    pub aud: String,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Unique token id (the handle a logout revokes).
    pub jti: String,
    /// Whether the account is a hub admin on its home hub.
    #[serde(default)]
    pub admin: bool,
}

/// Claims of a Discovery server token (`specs/facade.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerClaims {
    /// Issuing hub (PeerId).
    pub iss: String,
    /// The server id.
    pub sub: String,
    /// The server's cluster id.
    pub cid: String,
    /// Audience: [`DISCOVERY_AUDIENCE`].
    pub aud: String,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Unique token id.
    pub jti: String,
}

/// Which hubs are federation members, for refusing foreign tokens. In
/// allowlist mode: this hub and the allowlist. In open mode: this hub and
/// every hub it has seen (connected to, or received records from), persisted
/// in the local tree `hubs_seen`.
#[derive(Clone)]
pub struct Members {
    me: PeerId,
    allowlist: Option<Arc<HashSet<PeerId>>>,
    seen: Arc<RwLock<HashSet<PeerId>>>,
    tree: LocalTree<u64>,
}

impl std::fmt::Debug for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Members")
            .field("me", &self.me)
            .field("allowlist", &self.allowlist.as_ref().map(|a| a.len()))
            .finish_non_exhaustive()
    }
}

/// Most hubs remembered as seen (open mode).
const MAX_SEEN: usize = 10_000;

impl Members {
    /// Loads the seen hubs from the store.
    pub fn load(me: PeerId, allowlist: &[PeerId], store: &Store) -> Result<Members, NodeError> {
        let tree = store.local::<u64>("hubs_seen")?;
        let mut seen = HashSet::new();
        for (k, _) in tree.scan("", None, MAX_SEEN)? {
            if let Ok(p) = PeerId::from_str(&k) {
                seen.insert(p);
            }
        }
        Ok(Members {
            me,
            allowlist: (!allowlist.is_empty())
                .then(|| Arc::new(allowlist.iter().copied().collect())),
            seen: Arc::new(RwLock::new(seen)),
            tree,
        })
    }

    /// Records that `peer` was seen (a connection or a record from it).
    pub fn saw(&self, peer: PeerId, now_ms: u64) {
        let known = self.seen.read().map(|s| s.contains(&peer)).unwrap_or(true);
        if known {
            return;
        }
        if let Ok(mut s) = self.seen.write() {
            if s.len() >= MAX_SEEN {
                return;
            }
            s.insert(peer);
        }
        if let Err(e) = self.tree.put(&peer.to_string(), &now_ms) {
            tracing::warn!(error = %e, "could not persist a seen hub");
        }
    }

    /// Whether tokens issued by `peer` are accepted.
    pub fn admits(&self, peer: &PeerId) -> bool {
        if *peer == self.me {
            return true;
        }
        match &self.allowlist {
            Some(list) => list.contains(peer),
            None => self.seen.read().map(|s| s.contains(peer)).unwrap_or(false),
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token")]
    Missing,
    /// Expired.
    #[error("token expired")]
    Expired,
    /// Unparseable, bad signature, wrong audience or algorithm.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Issued by a hub that is not a federation member.
    #[error("token issuer {0} is not a member of this federation")]
    ForeignIssuer(String),
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        let code = match e {
            TokenError::Missing => "missing_token",
            TokenError::Expired => "token_expired",
            TokenError::Invalid(_) => "invalid_token",
            TokenError::ForeignIssuer(_) => "foreign_token",
        };
        ApiError::unauthorized(code, e.to_string())
    }
}

/// Issues and verifies the hub's JWTs.
#[derive(Clone)]
pub struct TokenService {
    me: PeerId,
    encoding: Arc<EncodingKey>,
    members: Members,
    cache: moka::sync::Cache<String, Arc<ServerClaims>>,
    user_cache: moka::sync::Cache<String, Arc<UserClaims>>,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("issuer", &self.me)
            .finish_non_exhaustive()
    }
}

/// PKCS#8 v1 DER of an ed25519 key (RFC 8410 §7): a fixed 16-byte prefix,
/// then the 32-byte seed. (aws-lc refuses the v2 form with the public key.)
fn ed25519_pkcs8(seed: &[u8]) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(seed);
    der
}

/// The raw ed25519 public key a PeerId embeds (identity multihash).
pub fn peer_public_key(peer: &PeerId) -> Option<[u8; 32]> {
    let mh: &libp2p::multihash::Multihash<64> = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    let key = libp2p::identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    Some(key.try_into_ed25519().ok()?.to_bytes())
}

fn now_secs() -> u64 {
    crate::now_ms() / 1000
}

impl TokenService {
    /// A token service signing with `keypair` (the hub identity, ed25519).
    pub fn new(keypair: &Keypair, members: Members) -> Result<TokenService, NodeError> {
        let ed = keypair
            .clone()
            .try_into_ed25519()
            .map_err(|_| NodeError::Config("the hub identity is not an ed25519 key".into()))?;
        let der = ed25519_pkcs8(ed.secret().as_ref());
        crate::jwt_keys::install();
        Ok(TokenService {
            me: keypair.public().to_peer_id(),
            encoding: Arc::new(EncodingKey::from_ed_der(&der)),
            members,
            cache: moka::sync::Cache::builder()
                .max_capacity(TOKEN_CACHE)
                .time_to_live(Duration::from_secs(3600))
                .build(),
            user_cache: moka::sync::Cache::builder()
                .max_capacity(TOKEN_CACHE)
                .time_to_live(Duration::from_secs(3600))
                .build(),
        })
    }

    /// The member view.
    pub fn members(&self) -> &Members {
        &self.members
    }

    /// Issues a server token for `(server_id, cluster_id)` valid for `ttl`.
    pub fn issue_server(
        &self,
        server_id: &str,
        cluster_id: &str,
        ttl: Duration,
    ) -> Result<String, ApiError> {
        let iat = now_secs();
        let claims = ServerClaims {
            iss: self.me.to_string(),
            sub: server_id.to_owned(),
            cid: cluster_id.to_owned(),
            aud: DISCOVERY_AUDIENCE.to_owned(),
            iat,
            exp: iat + ttl.as_secs(),
            jti: uuid::Uuid::new_v4().to_string(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.encoding)
            .map_err(ApiError::internal)
    }

    /// Verifies a server token issued by any member hub.
    pub fn verify_server(&self, token: &str) -> Result<Arc<ServerClaims>, TokenError> {
        if token.len() > 4096 {
            return Err(TokenError::Invalid("too long".into()));
        }
        if let Some(c) = self.cache.get(token) {
            if c.exp + LEEWAY_SECS <= now_secs() {
                self.cache.invalidate(token);
                return Err(TokenError::Expired);
            }
            return Ok(c);
        }
        let claims = Arc::new(self.verify_uncached::<ServerClaims>(token, DISCOVERY_AUDIENCE)?);
        self.cache.insert(token.to_owned(), claims.clone());
        Ok(claims)
    }

    /// Issues a user token for `username` (an account of this hub) valid for
    /// `ttl`.
    pub fn issue_user(
        &self,
        username: &str,
        admin: bool,
        ttl: Duration,
    ) -> Result<(String, UserClaims), ApiError> {
        let iat = now_secs();
        let claims = UserClaims {
            iss: self.me.to_string(),
            sub: username.to_owned(),
            aud: USER_AUDIENCE.to_owned(),
            iat,
            exp: iat + ttl.as_secs(),
            jti: uuid::Uuid::new_v4().to_string(),
            admin,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.encoding)
            .map_err(ApiError::internal)?;
        Ok((token, claims))
    }

    /// Verifies a user token issued by any member hub (signature, expiry,
    /// audience, member issuer). Revocation is checked by the caller's
    /// revocation view, not here.
    pub fn verify_user(&self, token: &str) -> Result<Arc<UserClaims>, TokenError> {
        if token.len() > 4096 {
            return Err(TokenError::Invalid("too long".into()));
        }
        if let Some(c) = self.user_cache.get(token) {
            if c.exp + LEEWAY_SECS <= now_secs() {
                self.user_cache.invalidate(token);
                return Err(TokenError::Expired);
            }
            return Ok(c);
        }
        let claims = Arc::new(self.verify_uncached::<UserClaims>(token, USER_AUDIENCE)?);
        self.user_cache.insert(token.to_owned(), claims.clone());
        Ok(claims)
    }

    fn verify_uncached<C: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<C, TokenError> {
        #[derive(Deserialize)]
        struct Iss {
            iss: String,
        }
        let payload = token
            .split('.')
            .nth(1)
            .ok_or_else(|| TokenError::Invalid("not a JWT".into()))?;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Invalid("payload is not base64url".into()))?;
        let Iss { iss } = serde_json::from_slice(&raw)
            .map_err(|_| TokenError::Invalid("payload has no iss".into()))?;
        let issuer = PeerId::from_str(&iss)
            .map_err(|_| TokenError::Invalid("iss is not a PeerId".into()))?;
        if !self.members.admits(&issuer) {
            return Err(TokenError::ForeignIssuer(iss));
        }
        let public = peer_public_key(&issuer)
            .ok_or_else(|| TokenError::Invalid("iss does not embed an ed25519 key".into()))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = LEEWAY_SECS;
        validation.set_audience(&[audience]);
        validation.set_issuer(&[iss.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        let data =
            jsonwebtoken::decode::<C>(token, &DecodingKey::from_ed_der(&public), &validation)
                .map_err(|e| match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                    _ => TokenError::Invalid(e.to_string()),
                })?;
        Ok(data.claims)
    }
}

/// The bearer token of a request.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

/// Decides who is an operator: a request carrying the admin token (as
/// `Authorization: Bearer` or `X-Admin-Token`), or, when allowed, one that
/// arrives straight from a loopback address (not relayed by a trusted proxy).
#[derive(Clone)]
pub struct AdminGuard {
    token_digest: Option<[u8; 32]>,
    from_loopback: bool,
    trusted_proxies: Arc<Vec<IpAddr>>,
}

impl std::fmt::Debug for AdminGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminGuard")
            .field("token", &self.token_digest.map(|_| "<set>"))
            .field("from_loopback", &self.from_loopback)
            .finish()
    }
}

impl AdminGuard {
    /// A guard for `token` (None: token auth off).
    pub fn new(token: Option<&str>, from_loopback: bool, trusted_proxies: Vec<IpAddr>) -> Self {
        AdminGuard {
            token_digest: token.map(|t| Sha256::digest(t.as_bytes()).into()),
            from_loopback,
            trusted_proxies: Arc::new(trusted_proxies),
        }
    }

    /// Whether the request is an operator's.
    pub fn is_admin(&self, peer: SocketAddr, headers: &HeaderMap) -> bool {
        if let Some(want) = &self.token_digest {
            let given = bearer(headers).or_else(|| {
                headers
                    .get("x-admin-token")
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
            });
            // Comparing digests: the timing of a mismatch says nothing about the token.
            if let Some(given) = given
                && <[u8; 32]>::from(Sha256::digest(given.as_bytes())) == *want
            {
                return true;
            }
        }
        self.from_loopback
            && peer.ip().is_loopback()
            && !(self.trusted_proxies.contains(&peer.ip())
                && headers.contains_key("x-forwarded-for"))
    }

    /// `Ok` for operators, else 401.
    pub fn check(&self, peer: SocketAddr, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.is_admin(peer, headers) {
            Ok(())
        } else {
            Err(ApiError::unauthorized(
                "admin_required",
                "operator endpoint: send the admin token or connect from loopback",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(kp: &Keypair, allow: &[PeerId]) -> TokenService {
        let store = Store::memory();
        let members = Members::load(kp.public().to_peer_id(), allow, &store).unwrap();
        TokenService::new(kp, members).unwrap()
    }

    #[test]
    fn round_trip_and_membership() {
        let a = Keypair::generate_ed25519();
        let b = Keypair::generate_ed25519();
        let sa = service(&a, &[]);
        let tok = sa
            .issue_server("s1", "c1", Duration::from_secs(60))
            .unwrap();
        let c = sa.verify_server(&tok).unwrap();
        assert_eq!((c.sub.as_str(), c.cid.as_str()), ("s1", "c1"));
        // b has never seen a: foreign.
        let sb = service(&b, &[]);
        assert!(matches!(
            sb.verify_server(&tok),
            Err(TokenError::ForeignIssuer(_))
        ));
        sb.members().saw(a.public().to_peer_id(), 1);
        assert!(sb.verify_server(&tok).is_ok());
        // allowlist mode without a: refused.
        let sc = service(&b, &[PeerId::random()]);
        sc.members().saw(a.public().to_peer_id(), 1);
        assert!(matches!(
            sc.verify_server(&tok),
            Err(TokenError::ForeignIssuer(_))
        ));
        // tampered payload
        let mut parts: Vec<&str> = tok.split('.').collect();
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            format!(
                r#"{{"iss":"{}","sub":"s2","cid":"c1","aud":"{DISCOVERY_AUDIENCE}","iat":1,"exp":99999999999,"jti":"x"}}"#,
                a.public().to_peer_id()
            ),
        );
        parts[1] = &forged;
        assert!(matches!(
            sa.verify_server(&parts.join(".")),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn expired_tokens_are_refused() {
        let a = Keypair::generate_ed25519();
        let sa = service(&a, &[]);
        let claims = ServerClaims {
            iss: a.public().to_peer_id().to_string(),
            sub: "s".into(),
            cid: "c".into(),
            aud: DISCOVERY_AUDIENCE.into(),
            iat: 1,
            exp: 2,
            jti: "j".into(),
        };
        let tok =
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &sa.encoding).unwrap();
        assert_eq!(sa.verify_server(&tok), Err(TokenError::Expired));
    }

    #[test]
    fn admin_guard() {
        let g = AdminGuard::new(Some("sekrit"), true, vec!["127.0.0.1".parse().unwrap()]);
        let lo: SocketAddr = "127.0.0.1:5".parse().unwrap();
        let far: SocketAddr = "10.1.2.3:5".parse().unwrap();
        let mut h = HeaderMap::new();
        assert!(g.is_admin(lo, &h));
        assert!(!g.is_admin(far, &h));
        h.insert("x-forwarded-for", "10.9.9.9".parse().unwrap());
        assert!(!g.is_admin(lo, &h), "proxied requests are not local");
        h.insert("authorization", "Bearer sekrit".parse().unwrap());
        assert!(g.is_admin(far, &h));
    }
}
