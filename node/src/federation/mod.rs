//! The federation-hub API family (compat §E, reference `federation-hub.md`):
//! the family's shared state ([`Federation`]), its router ([`routes`]) with
//! the per-IP limits (60/min general over every route of the family, 5/min
//! on logins), its FastAPI error shape ([`FedError`], `{"detail": …}`), and
//! [`authenticate`], the one user-token check every handler of the family
//! uses (signature, expiry, member issuer, revocation, home-hub account).
//!
//! Accounts live on their home hub only ([`accounts`]); tokens are EdDSA JWTs
//! any member hub verifies ([`crate::auth`]); logouts replicate as
//! revocation records ([`revocation`]); OAuth logins are in [`oauth`]; the
//! operator's account endpoints are in [`admin_users`].

pub mod accounts;
pub mod admin_users;
pub mod login;
pub mod nodes;
pub mod oauth;
pub mod presence;
pub mod profile;
pub mod revocation;
pub mod signal;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hubmesh_store::Store;

use crate::auth::{TokenError, UserClaims, bearer};
use crate::config::{Config, FederationHubConfig};
use crate::error::{ApiError, NodeError};
use crate::facade::AppState;
use crate::limits::{FamilyLimiter, client_ip};

/// The family's state, shared by its handlers (one per hub).
#[derive(Debug)]
pub struct Federation {
    /// The family's settings.
    pub config: FederationHubConfig,
    /// The accounts of this hub (local, never replicated).
    pub accounts: accounts::Accounts,
    /// OAuth providers and pending authorizations.
    pub oauth: oauth::OAuth,
    /// 60/min per client IP over every route of the family.
    pub general_limit: Limit,
    /// 5/min per client IP on `/token`, `/register`, `/login/{provider}`.
    pub login_limit: Limit,
}

impl Federation {
    /// The family's state for a hub with `config` and `store`.
    pub fn new(config: &Config, store: &Store) -> Result<Federation, NodeError> {
        let fc = config.federation_hub.clone();
        let accounts = accounts::Accounts::open(store, fc.max_accounts)
            .map_err(|e| NodeError::Config(format!("accounts: {e}")))?;
        let oauth = oauth::OAuth::new(&fc.oauth)?;
        Ok(Federation {
            general_limit: Limit::new("federation", fc.general_per_minute, config),
            login_limit: Limit::new("federation_login", fc.login_per_minute, config),
            config: fc,
            accounts,
            oauth,
        })
    }

    /// Forgets idle clients of every limiter of the family; run periodically.
    pub fn cleanup(&self) {
        self.general_limit.limiter.cleanup();
        self.login_limit.limiter.cleanup();
    }
}

/// A [`FamilyLimiter`] with its quota, for the family's 429 message.
#[derive(Debug, Clone)]
pub struct Limit {
    /// The limiter.
    pub limiter: FamilyLimiter,
    /// Requests per minute per client IP.
    pub per_minute: u32,
}

impl Limit {
    /// `per_minute` per client IP (a no-op when rate limits are off).
    pub fn new(name: &'static str, per_minute: u32, config: &Config) -> Limit {
        Limit {
            limiter: FamilyLimiter::new(name, per_minute, &config.rate_limits),
            per_minute,
        }
    }
}

/// Middleware: `middleware::from_fn_with_state(limit, federation::rate_limit)`;
/// answers 429 with `Retry-After` and the family's error shape.
pub async fn rate_limit(
    State(limit): State<Limit>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let ip = client_ip(peer, req.headers(), limit.limiter.trusted());
    match limit.limiter.check(ip) {
        Ok(()) => next.run(req).await,
        Err(secs) => {
            metrics::counter!("hubmesh_rate_limited_total", "family" => "federation").increment(1);
            let mut e = ApiError::rate_limited(secs);
            e.message = format!("Rate limit exceeded: {} per 1 minute", limit.per_minute);
            FedError(e).into_response()
        }
    }
}

/// An error of this family: an [`ApiError`] answered in the FastAPI shape
/// of the reference service, `{"detail": "<message>"}`, with the same
/// status (and `Retry-After` on 429, `WWW-Authenticate: Bearer` on 401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FedError(pub ApiError);

impl From<ApiError> for FedError {
    fn from(e: ApiError) -> Self {
        FedError(e)
    }
}

impl From<TokenError> for FedError {
    fn from(e: TokenError) -> Self {
        FedError(e.into())
    }
}

impl From<hubmesh_store::StoreError> for FedError {
    fn from(e: hubmesh_store::StoreError) -> Self {
        FedError(e.into())
    }
}

impl From<hubmesh_mesh::MeshError> for FedError {
    fn from(e: hubmesh_mesh::MeshError) -> Self {
        FedError(e.into())
    }
}

impl std::fmt::Display for FedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for FedError {}

impl IntoResponse for FedError {
    fn into_response(self) -> Response {
        let e = self.0;
        let body = serde_json::json!({ "detail": e.message });
        let mut resp = (e.status, axum::Json(body)).into_response();
        let h = resp.headers_mut();
        if let Some(secs) = e.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if e.status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if e.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The unread rest of the body makes the server drop the connection.
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// Checks a user token for this family: signature by a member hub, expiry,
/// audience ([`crate::auth::TokenService::verify_user`]), then that it was
/// not revoked anywhere in the federation ([`revocation::is_revoked`]) and,
/// for tokens this hub issued, that the account still exists.
pub fn authenticate(state: &AppState, token: &str) -> Result<Arc<UserClaims>, ApiError> {
    let claims = state.tokens.verify_user(token)?;
    if revocation::is_revoked(&state.store, &claims.jti)? {
        return Err(ApiError::unauthorized(
            "token_revoked",
            "token has been revoked",
        ));
    }
    if claims.iss == state.peer_id && !state.federation.accounts.exists(&claims.sub)? {
        return Err(ApiError::unauthorized(
            "unknown_user",
            "the token's account no longer exists",
        ));
    }
    Ok(claims)
}

/// [`authenticate`] on the request's `Authorization: Bearer` token.
pub fn authenticate_headers(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Arc<UserClaims>, ApiError> {
    let token = bearer(headers).ok_or(TokenError::Missing)?;
    authenticate(state, token)
}

/// The family's routes (when enabled) and the operator's account endpoints
/// (always: accounts serve every family that has users).
pub fn routes(state: &AppState) -> Router<AppState> {
    let mut r = admin_users::routes();
    if state.config.federation_hub.enabled {
        r = r.merge(family(state));
    }
    r
}

fn family(state: &AppState) -> Router<AppState> {
    let fed = &state.federation;
    let logins = Router::new()
        .route("/token", post(login::token))
        .route("/register", post(login::register))
        .route("/login/{provider}", get(oauth::login))
        .layer(middleware::from_fn_with_state(
            fed.login_limit.clone(),
            rate_limit,
        ));
    Router::new()
        .route("/logout", post(revocation::logout))
        .route("/users/me", get(login::me))
        .route("/auth/{provider}/callback", get(oauth::callback))
        .merge(logins)
        .merge(nodes::routes(state.signaling.register_limit.clone()))
        .merge(profile::routes(state.signaling.profile_limit.clone()))
        .merge(signal::routes())
        .layer(middleware::from_fn_with_state(
            fed.general_limit.clone(),
            rate_limit,
        ))
}
