//! Password login and the current user: `POST /token` (the OAuth2 password
//! form of the reference's FastAPI service, answering
//! `{access_token, token_type, expires_in}`), `POST /register` (open
//! self-registration, only when the config switch is on), and
//! `GET /users/me`, which any member hub answers from the token's claims and
//! the replicated node identity ([`super::nodes::node_of`]: namespace
//! `node`, owner index term), without the home hub's account data.

use std::time::Duration;

use axum::extract::{Form, FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::accounts::Account;
use super::{FedError, authenticate_headers};
use crate::error::{ApiError, ApiJson};
use crate::facade::AppState;

/// The family's error body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DetailBody {
    /// What went wrong.
    pub detail: String,
}

/// `POST /token` form (`application/x-www-form-urlencoded`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TokenForm {
    /// `password` when present.
    pub grant_type: Option<String>,
    /// Username.
    pub username: String,
    /// Password.
    pub password: String,
    /// Ignored.
    pub scope: Option<String>,
    /// Ignored.
    pub client_id: Option<String>,
    /// Ignored.
    pub client_secret: Option<String>,
}

/// A JWT for the user.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    /// EdDSA JWT, `iss` = this hub's PeerId.
    pub access_token: String,
    /// `bearer`.
    pub token_type: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// `POST /register` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct SelfRegisterRequest {
    /// 1-64 of `[A-Za-z0-9._-]`, starting with a letter or digit.
    pub username: String,
    /// 8-1024 bytes.
    pub password: String,
}

/// `POST /register` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SelfRegisterResponse {
    /// The new account.
    pub username: String,
    /// Home hub (PeerId).
    pub home_hub: String,
}

/// `GET /users/me` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserMe {
    /// Username on the home hub.
    pub username: String,
    /// Home hub (PeerId) that issued the token.
    pub home_hub: String,
    /// Admin on the home hub.
    pub is_admin: bool,
    /// The user's registered node id, if any (replicated identity).
    pub node_id: Option<String>,
    /// Whether a verified node identity is registered.
    pub node_id_verified: bool,
    /// Token expiry, RFC 3339.
    pub token_expires_at: String,
}

/// A form whose rejection is the family's error (413 too large, else 422).
#[derive(Debug, Clone, Copy, Default)]
pub struct FedForm<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for FedForm<T> {
    type Rejection = FedError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Form::<T>::from_request(req, state).await {
            Ok(Form(v)) => Ok(FedForm(v)),
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(FedError(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "request body too large",
            ))),
            Err(r) => Err(FedError(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                format!(
                    "expected an application/x-www-form-urlencoded form: {}",
                    r.body_text()
                ),
            ))),
        }
    }
}

/// A JSON body whose rejection is the family's error.
#[derive(Debug, Clone, Copy, Default)]
pub struct FedJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for FedJson<T> {
    type Rejection = FedError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(FedJson(v)),
            Err(r) => Err(FedError(r.into())),
        }
    }
}

/// Issues a user token for `account` (this hub's).
pub fn issue(state: &AppState, account: &Account) -> Result<TokenResponse, ApiError> {
    let ttl: Duration = state.federation.config.token_ttl;
    let (token, _) = state
        .tokens
        .issue_user(&account.username, account.admin, ttl)?;
    metrics::counter!("hubmesh_federation_tokens_issued_total").increment(1);
    Ok(TokenResponse {
        access_token: token,
        token_type: "bearer".into(),
        expires_in: ttl.as_secs(),
    })
}

/// Exchanges username + password for a JWT.
#[utoipa::path(
    post, path = "/token", tag = "federation",
    request_body(content = TokenForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "a JWT valid on every hub of the federation", body = TokenResponse),
        (status = 401, description = "Incorrect username or password", body = DetailBody),
        (status = 413, description = "body too large", body = DetailBody),
        (status = 422, description = "not a form, a missing field, or grant_type other than password", body = DetailBody),
        (status = 429, description = "rate limited (5/min login, 60/min general), with Retry-After", body = DetailBody),
    )
)]
pub async fn token(
    State(state): State<AppState>,
    FedForm(form): FedForm<TokenForm>,
) -> Result<ApiJson<TokenResponse>, FedError> {
    if form.grant_type.as_deref().is_some_and(|g| g != "password") {
        return Err(ApiError::invalid_field("grant_type", "must be \"password\"").into());
    }
    let account = state
        .federation
        .accounts
        .verify_password(&form.username, &form.password)
        .await
        .map_err(ApiError::from)?;
    let Some(account) = account else {
        metrics::counter!("hubmesh_federation_logins_total", "outcome" => "refused").increment(1);
        return Err(
            ApiError::unauthorized("bad_credentials", "Incorrect username or password").into(),
        );
    };
    metrics::counter!("hubmesh_federation_logins_total", "outcome" => "ok").increment(1);
    Ok(ApiJson(issue(&state, &account)?))
}

/// Creates an account (open self-registration).
#[utoipa::path(
    post, path = "/register", tag = "federation",
    request_body = SelfRegisterRequest,
    responses(
        (status = 201, description = "created on this hub", body = SelfRegisterResponse),
        (status = 403, description = "self-registration is disabled", body = DetailBody),
        (status = 409, description = "username taken", body = DetailBody),
        (status = 422, description = "invalid username or password, or malformed body", body = DetailBody),
        (status = 429, description = "rate limited, with Retry-After", body = DetailBody),
        (status = 507, description = "the hub's account limit is reached", body = DetailBody),
    )
)]
pub async fn register(
    State(state): State<AppState>,
    FedJson(req): FedJson<SelfRegisterRequest>,
) -> Result<Response, FedError> {
    if !state.federation.config.self_registration {
        return Err(ApiError::forbidden("self-registration is disabled on this hub").into());
    }
    let account = state
        .federation
        .accounts
        .create(&req.username, Some(&req.password), false)
        .await
        .map_err(ApiError::from)?;
    tracing::info!(user = %account.username, "self-registered");
    Ok((
        StatusCode::CREATED,
        ApiJson(SelfRegisterResponse {
            username: account.username,
            home_hub: state.peer_id.clone(),
        }),
    )
        .into_response())
}

/// The current user, on any hub of the federation.
#[utoipa::path(
    get, path = "/users/me", tag = "federation",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "the token's user", body = UserMe),
        (status = 401, description = "missing, invalid, expired, foreign or revoked token", body = DetailBody),
        (status = 429, description = "rate limited, with Retry-After", body = DetailBody),
    )
)]
pub async fn me(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<ApiJson<UserMe>, FedError> {
    let claims = authenticate_headers(&state, &headers)?;
    let node = super::nodes::node_of(&state, &claims)?;
    Ok(ApiJson(UserMe {
        username: claims.sub.clone(),
        home_hub: claims.iss.clone(),
        is_admin: claims.admin,
        node_id_verified: node.is_some(),
        node_id: node.map(|r| r.key),
        token_expires_at: crate::discovery::rfc3339(claims.exp.saturating_mul(1000)),
    }))
}
