//! OAuth 2.0 authorization-code login (with PKCE, via the `oauth2` crate):
//! `GET /login/{provider}` redirects to the provider with a fresh CSRF
//! `state` and PKCE challenge, remembered server-side in a bounded TTL cache;
//! `GET /auth/{provider}/callback` takes the state back (single use, same
//! provider, within 10 minutes), exchanges the code with the PKCE verifier,
//! reads the provider's userinfo, finds or creates the linked account
//! (`provider:login`) and answers a JWT like `POST /token`. Providers are the
//! Google and GitHub presets or any provider given by its URLs
//! ([`crate::config::OAuthProviderConfig`]); client secrets come from env or
//! files and never appear in logs or records.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use oauth2::basic::BasicClient;
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, Scope, TokenResponse as _, TokenUrl,
};
use serde::Deserialize;

use super::FedError;
use super::accounts::OAuthIdentity;
use super::login::{TokenResponse, issue};
use crate::config::OAuthProviderConfig;
use crate::error::{ApiError, ApiJson, NodeError};
use crate::facade::AppState;

/// Authorizations waiting for their callback, at most.
pub const MAX_PENDING: u64 = 10_000;
/// How long a user has to come back from the provider.
pub const PENDING_TTL: Duration = Duration::from_secs(600);
/// Largest userinfo answer read.
const MAX_USERINFO_BYTES: usize = 64 * 1024;
/// Timeout of each call to the provider.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct Pending {
    provider: String,
    verifier: String,
    redirect: String,
}

/// Configured providers and pending authorizations.
pub struct OAuth {
    providers: BTreeMap<String, OAuthProviderConfig>,
    pending: moka::sync::Cache<String, Pending>,
    http: reqwest::Client,
}

impl std::fmt::Debug for OAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth")
            .field("providers", &self.providers.keys().collect::<Vec<_>>())
            .field("pending", &self.pending.entry_count())
            .finish()
    }
}

impl OAuth {
    /// The providers of the config.
    pub fn new(providers: &[OAuthProviderConfig]) -> Result<OAuth, NodeError> {
        let http = reqwest::Client::builder()
            // The oauth2 crate's advice: no redirects (SSRF).
            .redirect(reqwest::redirect::Policy::none())
            .timeout(PROVIDER_TIMEOUT)
            .user_agent(concat!("hubmesh/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| NodeError::Config(format!("OAuth HTTP client: {e}")))?;
        Ok(OAuth {
            providers: providers
                .iter()
                .map(|p| (p.name.clone(), p.clone()))
                .collect(),
            pending: moka::sync::Cache::builder()
                .max_capacity(MAX_PENDING)
                .time_to_live(PENDING_TTL)
                .build(),
            http,
        })
    }

    /// The configured provider names.
    pub fn provider_names(&self) -> Vec<String> {
        self.providers.keys().cloned().collect()
    }

    fn provider(&self, name: &str) -> Result<&OAuthProviderConfig, ApiError> {
        self.providers
            .get(name)
            .ok_or_else(|| ApiError::not_found(format!("Unknown OAuth provider {name:?}")))
    }
}

fn bad_state() -> ApiError {
    ApiError::bad_request("bad_state", "Invalid or expired OAuth state")
}

fn provider_failed(what: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %what, "OAuth provider call failed");
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "oauth_provider",
        format!("OAuth provider error: {what}"),
    )
}

/// The callback URL of `provider`: the configured public URL, else the
/// request's Host, else the bound address.
fn redirect_uri(state: &AppState, headers: &HeaderMap, provider: &str) -> String {
    let base = match &state.federation.config.public_url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => {
            let scheme = if state.config.tls == crate::config::TlsMode::None {
                "http"
            } else {
                "https"
            };
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .filter(|h| h.parse::<axum::http::uri::Authority>().is_ok())
                .map(str::to_owned)
                .or_else(|| state.status.http_addr.get().map(|a| a.to_string()))
                .unwrap_or_else(|| state.config.http.to_string());
            format!("{scheme}://{host}")
        }
    };
    format!("{base}/auth/{provider}/callback")
}

type Client = BasicClient<
    oauth2::EndpointSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointSet,
>;

fn client(p: &OAuthProviderConfig, redirect: &str) -> Result<Client, ApiError> {
    let mut c = BasicClient::new(ClientId::new(p.client_id.clone()))
        .set_auth_uri(AuthUrl::new(p.auth_url.clone()).map_err(ApiError::internal)?)
        .set_token_uri(TokenUrl::new(p.token_url.clone()).map_err(ApiError::internal)?)
        .set_redirect_uri(RedirectUrl::new(redirect.to_owned()).map_err(ApiError::internal)?);
    if let Some(s) = &p.client_secret {
        c = c.set_client_secret(ClientSecret::new(s.clone()));
    }
    Ok(c)
}

/// Starts an OAuth login: redirects (302) to the provider.
#[utoipa::path(
    get, path = "/login/{provider}", tag = "federation",
    params(("provider" = String, Path, description = "configured provider: google, github, or a generic one")),
    responses(
        (status = 302, description = "to the provider's authorization endpoint (Location)"),
        (status = 404, description = "unknown provider", body = super::login::DetailBody),
        (status = 429, description = "rate limited (5/min login), with Retry-After", body = super::login::DetailBody),
    )
)]
pub async fn login(
    State(state): State<AppState>,
    Path(provider): Path<String>,
    headers: HeaderMap,
) -> Result<Response, FedError> {
    let oauth = &state.federation.oauth;
    let p = oauth.provider(&provider)?;
    let redirect = redirect_uri(&state, &headers, &provider);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, csrf) = client(p, &redirect)?
        .authorize_url(CsrfToken::new_random)
        .add_scopes(p.scopes.iter().map(|s| Scope::new(s.clone())))
        .set_pkce_challenge(challenge)
        .url();
    oauth.pending.insert(
        csrf.secret().clone(),
        Pending {
            provider: provider.clone(),
            verifier: verifier.secret().clone(),
            redirect,
        },
    );
    Ok((StatusCode::FOUND, [(header::LOCATION, url.to_string())]).into_response())
}

/// The provider's redirect back.
#[derive(Debug, Deserialize)]
pub struct CallbackParams {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// Finishes an OAuth login: checks the state, exchanges the code, reads the
/// userinfo, finds or creates the linked account, answers a JWT.
#[utoipa::path(
    get, path = "/auth/{provider}/callback", tag = "federation",
    params(
        ("provider" = String, Path, description = "the provider of /login/{provider}"),
        ("code" = Option<String>, Query, description = "authorization code"),
        ("state" = Option<String>, Query, description = "the state /login/{provider} sent"),
        ("error" = Option<String>, Query, description = "the provider's error"),
    ),
    responses(
        (status = 200, description = "a JWT for the linked account", body = TokenResponse),
        (status = 400, description = "invalid, expired, reused or foreign state; missing code; the provider reported an error", body = super::login::DetailBody),
        (status = 404, description = "unknown provider", body = super::login::DetailBody),
        (status = 502, description = "the token exchange or the userinfo call failed", body = super::login::DetailBody),
    )
)]
pub async fn callback(
    State(state): State<AppState>,
    Path(provider): Path<String>,
    params: Result<Query<CallbackParams>, QueryRejection>,
) -> Result<ApiJson<TokenResponse>, FedError> {
    let oauth = &state.federation.oauth;
    let p = oauth.provider(&provider)?;
    let Query(params) = params.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    // The state is single use whatever happens next.
    let pending = params
        .state
        .as_deref()
        .filter(|s| !s.is_empty() && s.len() <= 256)
        .and_then(|s| oauth.pending.remove(s));
    if let Some(err) = params.error {
        let desc = params.error_description.unwrap_or_default();
        let mut msg: String = format!("{err} {desc}").trim().chars().take(200).collect();
        msg.retain(|c| !c.is_control());
        return Err(
            ApiError::bad_request("oauth_denied", format!("OAuth provider error: {msg}")).into(),
        );
    }
    let pending = pending.ok_or_else(bad_state)?;
    if pending.provider != provider {
        return Err(bad_state().into());
    }
    let code = params
        .code
        .filter(|c| !c.is_empty() && c.len() <= 2048)
        .ok_or_else(|| ApiError::bad_request("missing_code", "missing authorization code"))?;
    let token = client(p, &pending.redirect)?
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(PkceCodeVerifier::new(pending.verifier))
        .request_async(&oauth.http)
        .await
        .map_err(|e| provider_failed(format!("token exchange: {e}")))?;
    let info = userinfo(&oauth.http, &p.userinfo_url, token.access_token().secret()).await?;
    let field = |name: &str| -> Option<String> {
        match info.get(name)? {
            serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let subject = field(&p.subject_field)
        .filter(|s| s.len() <= 128)
        .ok_or_else(|| provider_failed(format!("userinfo has no {:?}", p.subject_field)))?;
    let login = field(&p.name_field);
    let email = field("email");
    let id = OAuthIdentity {
        provider: provider.clone(),
        subject,
    };
    let account = state
        .federation
        .accounts
        .login_oauth(&id, login.as_deref(), email.as_deref())
        .await
        .map_err(ApiError::from)?;
    tracing::info!(user = %account.username, %provider, "OAuth login");
    metrics::counter!("hubmesh_federation_logins_total", "outcome" => "oauth").increment(1);
    Ok(ApiJson(issue(&state, &account)?))
}

async fn userinfo(
    http: &reqwest::Client,
    url: &str,
    access_token: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let mut resp = http
        .get(url)
        .bearer_auth(access_token)
        .header(header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| provider_failed(format!("userinfo: {e}")))?;
    if !resp.status().is_success() {
        return Err(provider_failed(format!(
            "userinfo answered {}",
            resp.status()
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| provider_failed(format!("userinfo: {e}")))?
    {
        if body.len() + chunk.len() > MAX_USERINFO_BYTES {
            return Err(provider_failed("userinfo answer too large"));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|_| provider_failed("userinfo is not a JSON object"))
}
