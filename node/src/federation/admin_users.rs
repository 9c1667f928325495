//! The operator's account endpoints (`/admin/users…`, loopback or admin
//! token like the rest of `/admin`): list, create, remove, set password.
//! `hubmesh user …` uses them while the hub runs (the store is locked then).
//! Operator errors keep the operator API's `{"error", "message"}` shape.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::{Deserialize, Serialize};

use super::accounts::{Account, MAX_PAGE};
use crate::error::{ApiError, ApiJson};
use crate::facade::AppState;

/// One account as the operator sees it (never the hash).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserView {
    /// Username.
    pub username: String,
    /// Hub admin.
    pub admin: bool,
    /// Whether a password is set (else OAuth only).
    pub has_password: bool,
    /// The OAuth provider it was created for.
    pub oauth_provider: Option<String>,
    /// Creation time, RFC 3339.
    pub created: String,
}

impl From<&Account> for UserView {
    fn from(a: &Account) -> Self {
        UserView {
            username: a.username.clone(),
            admin: a.admin,
            has_password: a.password_hash.is_some(),
            oauth_provider: a.oauth.as_ref().map(|o| o.provider.clone()),
            created: crate::discovery::rfc3339(a.created_ms),
        }
    }
}

/// `GET /admin/users` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserList {
    /// One page, in name order.
    pub users: Vec<UserView>,
    /// Pass as `after` for the next page; absent on the last.
    pub next: Option<String>,
}

/// `GET /admin/users` query.
#[derive(Debug, Clone, Deserialize)]
pub struct ListQuery {
    /// Start after this username.
    pub after: Option<String>,
    /// Page size (≤ 1000). Default 1000.
    pub limit: Option<usize>,
}

/// `POST /admin/users` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateUser {
    /// Username.
    pub username: String,
    /// Password (absent: no password login).
    pub password: Option<String>,
    /// Hub admin.
    #[serde(default)]
    pub admin: bool,
}

/// `PUT /admin/users/{name}/password` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetPassword {
    /// New password.
    pub password: String,
}

async fn list(
    State(s): State<AppState>,
    ConnectInfo(p): ConnectInfo<SocketAddr>,
    h: HeaderMap,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<ApiJson<UserList>, ApiError> {
    s.admin.check(p, &h)?;
    let Query(q) = q.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let limit = q.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let page = s.federation.accounts.list(q.after.as_deref(), limit)?;
    let next = (page.len() == limit)
        .then(|| page.last().map(|a| a.username.clone()))
        .flatten();
    Ok(ApiJson(UserList {
        users: page.iter().map(UserView::from).collect(),
        next,
    }))
}

async fn create(
    State(s): State<AppState>,
    ConnectInfo(p): ConnectInfo<SocketAddr>,
    h: HeaderMap,
    ApiJson(req): ApiJson<CreateUser>,
) -> Result<Response, ApiError> {
    s.admin.check(p, &h)?;
    let a = s
        .federation
        .accounts
        .create(&req.username, req.password.as_deref(), req.admin)
        .await?;
    tracing::info!(user = %a.username, admin = a.admin, "account created by the operator");
    Ok((StatusCode::CREATED, ApiJson(UserView::from(&a))).into_response())
}

async fn remove(
    State(s): State<AppState>,
    ConnectInfo(p): ConnectInfo<SocketAddr>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<ApiJson<serde_json::Value>, ApiError> {
    s.admin.check(p, &h)?;
    s.federation.accounts.remove(&name).await?;
    tracing::info!(user = %name, "account removed by the operator");
    Ok(ApiJson(serde_json::json!({ "removed": name })))
}

async fn passwd(
    State(s): State<AppState>,
    ConnectInfo(p): ConnectInfo<SocketAddr>,
    h: HeaderMap,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<SetPassword>,
) -> Result<ApiJson<serde_json::Value>, ApiError> {
    s.admin.check(p, &h)?;
    s.federation
        .accounts
        .set_password(&name, &req.password)
        .await?;
    tracing::info!(user = %name, "password set by the operator");
    Ok(ApiJson(serde_json::json!({ "updated": name })))
}

/// The routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/users", get(list).post(create))
        .route("/admin/users/{name}", axum::routing::delete(remove))
        .route("/admin/users/{name}/password", put(passwd))
}
