//! The Discovery API family (compat §A, reference `discovery-server.md`):
//! HMAC-authenticated register, heartbeat, federation-wide cluster lookup and
//! delete, admin listing. A registration is a replicated record in namespace
//! [`NS`] keyed `"<clusterId>/<serverId>"`: a write is validated here, signed
//! and made durable by `Mesh::write`, acknowledged, then gossiped; records
//! from other hubs land in the shared store, so reads see them directly.
//! The wire details (HMAC message, token claims, error codes) are in
//! `specs/facade.md`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use hubmesh_store::{Draft, Record};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{ServerClaims, TokenError, bearer};
use crate::config::DiscoveryConfig;
use crate::error::{ApiError, ApiJson};
use crate::facade::AppState;
use crate::now_ms;

/// Namespace of discovery registrations.
pub const NS: &str = "server";
/// Heartbeat period announced to servers.
pub const NEXT_HEARTBEAT_SECS: u64 = 120;
/// Longest cluster id.
pub const MAX_CLUSTER_ID: usize = 64;
/// Longest public URL.
pub const MAX_URL: usize = 2048;
/// Longest version string.
pub const MAX_VERSION: usize = 64;
/// Most servers one cluster lookup returns.
pub const MAX_LISTED: usize = 10_000;
/// Replay cache entries kept (per hub).
const REPLAY_CACHE: u64 = 200_000;
/// Bytes of cluster lookup answers kept (per hub).
const LOOKUP_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// `POST /api/v1/servers/register` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    /// Server id, a UUID.
    pub server_id: String,
    /// Cluster id, 1-64 chars of `[A-Za-z0-9._-]`.
    pub cluster_id: String,
    /// The server's public http(s) URL.
    pub public_url: String,
    /// The server's version, 1-64 printable chars.
    pub version: String,
    /// Base64 (standard, padded) of the server's 32-byte x25519 public key.
    pub public_key: String,
    /// RFC 3339 UTC timestamp, within 5 minutes of the hub's clock.
    pub timestamp: String,
    /// `base64(HMAC-SHA256(cluster secret, serverId\nclusterId\npublicUrl\npublicKey\ntimestamp))`.
    pub cluster_secret_hmac: String,
}

/// `POST /api/v1/servers/register` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
    /// Server JWT (EdDSA, 24 h), for heartbeat, lookup and delete at any hub.
    pub token: String,
    /// Token lifetime, seconds (86400).
    pub expires_in: u64,
    /// The server id (canonical lower-case UUID).
    pub server_id: String,
    /// The cluster id.
    pub cluster_id: String,
}

/// `POST /api/v1/servers/heartbeat` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatResponse {
    /// Always `ok`.
    pub status: String,
    /// Seconds until the next expected heartbeat (120).
    pub next_heartbeat_sec: u64,
}

/// One server of a cluster.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerView {
    /// Server id.
    pub server_id: String,
    /// Public URL.
    pub public_url: String,
    /// Base64 x25519 public key.
    pub public_key: String,
    /// Version.
    pub version: String,
    /// Last register or heartbeat, RFC 3339 UTC.
    pub last_seen: String,
    /// PeerId of the hub the server last registered or heartbeated at.
    pub hub: String,
}

/// `GET /api/v1/cluster/{cluster_id}` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterResponse {
    /// The cluster id.
    pub cluster_id: String,
    /// Its active servers, across the whole federation.
    pub servers: Vec<ServerView>,
}

/// `DELETE /api/v1/servers/{server_id}` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeleteResponse {
    /// Always `deleted`.
    pub status: String,
    /// The server id.
    pub server_id: String,
    /// Its cluster id.
    pub cluster_id: String,
}

/// The compat error body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable code.
    pub error: String,
    /// Human-readable detail.
    pub message: String,
}

/// One cluster in the admin listing.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSummary {
    /// Cluster id.
    pub cluster_id: String,
    /// Registrations held (active or not).
    pub servers: u64,
    /// Active registrations.
    pub active: u64,
}

/// `GET /api/v1/admin/clusters` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdminClusters {
    /// Clusters.
    pub clusters: Vec<ClusterSummary>,
    /// Registrations held.
    pub total_servers: u64,
    /// Active registrations.
    pub active_servers: u64,
}

/// An admin view of one registration.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdminServer {
    /// Cluster id.
    pub cluster_id: String,
    /// Whether it heartbeated within the inactivity window.
    pub active: bool,
    /// The server.
    #[serde(flatten)]
    pub server: ServerView,
}

/// `GET /api/v1/admin/servers` query.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
pub struct AdminServersQuery {
    /// Only this cluster.
    pub cluster: Option<String>,
}

/// The replicated body of a registration (CBOR).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerBody {
    /// Canonical server id.
    pub server_id: String,
    /// Cluster id.
    pub cluster_id: String,
    /// Public URL.
    pub public_url: String,
    /// Base64 x25519 key.
    pub public_key: String,
    /// Version.
    pub version: String,
    /// Last register or heartbeat, ms since the epoch.
    pub last_seen_ms: u64,
    /// PeerId of the hub that wrote this version.
    pub hub: String,
    /// SHA-256 of `serverId\ntimestamp\nhmac` of the registration (replay check).
    #[serde(with = "serde_bytes")]
    pub reg_digest: Vec<u8>,
}

/// Discovery state of one hub.
pub struct Discovery {
    config: DiscoveryConfig,
    replay: moka::sync::Cache<[u8; 32], ()>,
    /// Serialized lookup answers by cluster id. An answer is served again
    /// while the cluster's store change stamp is the one taken before it was
    /// built and no server in it has gone inactive or expired since, so a
    /// cached answer is exactly what a fresh read would give.
    lookups: moka::sync::Cache<String, Arc<CachedLookup>>,
}

struct CachedLookup {
    stamp: u64,
    /// The first instant (ms) at which a listed server goes inactive or its
    /// record expires.
    valid_until_ms: u64,
    json: Bytes,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Discovery {
    /// Discovery with `config`.
    pub fn new(config: DiscoveryConfig) -> Self {
        let ttl = config.timestamp_window * 2 + Duration::from_secs(60);
        Discovery {
            config,
            replay: moka::sync::Cache::builder()
                .max_capacity(REPLAY_CACHE)
                .time_to_live(ttl)
                .build(),
            lookups: moka::sync::Cache::builder()
                .max_capacity(LOOKUP_CACHE_BYTES)
                .weigher(|k: &String, v: &Arc<CachedLookup>| {
                    u32::try_from(k.len() + v.json.len()).unwrap_or(u32::MAX)
                })
                .build(),
        }
    }

    /// Its config.
    pub fn config(&self) -> &DiscoveryConfig {
        &self.config
    }
}

/// The HMAC message of a registration: the five fields joined by `\n`.
pub fn hmac_message(
    server_id: &str,
    cluster_id: &str,
    public_url: &str,
    public_key: &str,
    timestamp: &str,
) -> String {
    format!("{server_id}\n{cluster_id}\n{public_url}\n{public_key}\n{timestamp}")
}

/// `base64(HMAC-SHA256(secret, message))` (what a server sends as `clusterSecretHmac`).
pub fn sign_registration(secret: &[u8], message: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .expect("HMAC-SHA256 accepts keys of any length");
    mac.update(message.as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

/// RFC 3339 UTC of `ms`.
pub fn rfc3339(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Checks a cluster id.
pub fn check_cluster_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_CLUSTER_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            "clusterId",
            "must be 1-64 chars of [A-Za-z0-9._-]",
        ))
    }
}

/// Parses a server id (a UUID) into its canonical form.
pub fn canonical_server_id(id: &str) -> Result<String, ApiError> {
    if id.len() > 36 {
        return Err(ApiError::invalid_field("serverId", "must be a UUID"));
    }
    uuid::Uuid::try_parse(id)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| ApiError::invalid_field("serverId", "must be a UUID"))
}

/// Checks a public URL: http(s), with a host, at most 2048 bytes.
pub fn check_public_url(u: &str) -> Result<(), ApiError> {
    if u.len() > MAX_URL {
        return Err(ApiError::invalid_field("publicUrl", "too long"));
    }
    let url = url::Url::parse(u).map_err(|e| ApiError::invalid_field("publicUrl", e))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(ApiError::invalid_field(
            "publicUrl",
            "must be an http or https URL with a host",
        ));
    }
    Ok(())
}

/// Checks an x25519 public key: standard base64 of exactly 32 bytes.
pub fn check_public_key(k: &str) -> Result<(), ApiError> {
    match B64.decode(k) {
        Ok(b) if b.len() == 32 => Ok(()),
        Ok(b) => Err(ApiError::invalid_field(
            "publicKey",
            format!("must be 32 bytes, got {}", b.len()),
        )),
        Err(_) => Err(ApiError::invalid_field(
            "publicKey",
            "must be standard base64",
        )),
    }
}

fn check_version(v: &str) -> Result<(), ApiError> {
    if v.is_empty() || v.len() > MAX_VERSION || v.chars().any(|c| c.is_control()) {
        return Err(ApiError::invalid_field(
            "version",
            "must be 1-64 printable chars",
        ));
    }
    Ok(())
}

/// Validates a replicated registration record (run on every inbound record
/// of namespace [`NS`]).
pub fn validate_record(r: &Record) -> Result<(), String> {
    if r.ns != NS {
        return Ok(());
    }
    if r.deleted {
        return Ok(());
    }
    let body: ServerBody =
        serde_cbor::from_slice(&r.body).map_err(|e| format!("server body: {e}"))?;
    check_cluster_id(&body.cluster_id).map_err(|e| e.message)?;
    let sid = canonical_server_id(&body.server_id).map_err(|e| e.message)?;
    if sid != body.server_id || r.key != format!("{}/{}", body.cluster_id, body.server_id) {
        return Err("server record key does not match its body".into());
    }
    check_public_url(&body.public_url).map_err(|e| e.message)?;
    check_public_key(&body.public_key).map_err(|e| e.message)?;
    check_version(&body.version).map_err(|e| e.message)?;
    Ok(())
}

fn decode_body(r: &Record) -> Option<ServerBody> {
    serde_cbor::from_slice(&r.body).ok()
}

fn view(b: &ServerBody) -> ServerView {
    ServerView {
        server_id: b.server_id.clone(),
        public_url: b.public_url.clone(),
        public_key: b.public_key.clone(),
        version: b.version.clone(),
        last_seen: rfc3339(b.last_seen_ms),
        hub: b.hub.clone(),
    }
}

fn server_claims(state: &AppState, headers: &HeaderMap) -> Result<Arc<ServerClaims>, ApiError> {
    let token = bearer(headers).ok_or(TokenError::Missing)?;
    Ok(state.tokens.verify_server(token)?)
}

fn counter(op: &'static str, outcome: &'static str) {
    metrics::counter!("hubmesh_discovery_total", "op" => op, "outcome" => outcome).increment(1);
}

fn draft_for(body: &ServerBody, gone_after: Duration) -> Result<Draft, ApiError> {
    let bytes = serde_cbor::to_vec(body).map_err(ApiError::internal)?;
    Ok(Draft {
        ns: NS.into(),
        key: format!("{}/{}", body.cluster_id, body.server_id),
        body: bytes,
        expires_ms: body.last_seen_ms + gone_after.as_millis() as u64,
        deleted: false,
        terms: vec![format!("sid:{}", body.server_id)],
    })
}

/// Registers (or re-registers) a server.
#[utoipa::path(
    post, path = "/api/v1/servers/register", tag = "discovery",
    request_body = RegisterRequest,
    responses(
        (status = 200, description = "registered; durable on this hub", body = RegisterResponse),
        (status = 400, description = "malformed JSON (`malformed_json`)", body = ErrorBody),
        (status = 401, description = "bad HMAC or unknown cluster (`bad_hmac`), timestamp outside ±5 min (`stale_timestamp`)", body = ErrorBody),
        (status = 409, description = "replayed request (`replay`)", body = ErrorBody),
        (status = 413, description = "body too large (`too_large`)", body = ErrorBody),
        (status = 422, description = "invalid or missing field (`invalid_field`)", body = ErrorBody),
        (status = 429, description = "rate limited (`rate_limited`), with Retry-After", body = ErrorBody),
    )
)]
pub async fn register(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<ApiJson<RegisterResponse>, ApiError> {
    let result = register_inner(&state, req).await;
    counter("register", if result.is_ok() { "ok" } else { "error" });
    result.map(ApiJson)
}

async fn register_inner(
    state: &AppState,
    req: RegisterRequest,
) -> Result<RegisterResponse, ApiError> {
    let d = &state.discovery;
    let server_id = canonical_server_id(&req.server_id)?;
    check_cluster_id(&req.cluster_id)?;
    check_public_url(&req.public_url)?;
    check_version(&req.version)?;
    check_public_key(&req.public_key)?;
    let ts = time::OffsetDateTime::parse(
        &req.timestamp,
        &time::format_description::well_known::Rfc3339,
    )
    .map_err(|_| ApiError::invalid_field("timestamp", "must be RFC 3339"))?;
    let ts_ms = (ts.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
    let now = now_ms();
    if ts_ms.abs_diff(now) > d.config.timestamp_window.as_millis() as u64 {
        return Err(ApiError::unauthorized(
            "stale_timestamp",
            "timestamp is more than 5 minutes from the hub's clock",
        ));
    }
    let given = B64
        .decode(req.cluster_secret_hmac.as_bytes())
        .ok()
        .filter(|b| b.len() == 32);
    let secret = d.config.secret_for(&req.cluster_id);
    let ok = match (secret, &given) {
        (Some(secret), Some(given)) => {
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
                .expect("HMAC-SHA256 accepts keys of any length");
            mac.update(
                hmac_message(
                    &req.server_id,
                    &req.cluster_id,
                    &req.public_url,
                    &req.public_key,
                    &req.timestamp,
                )
                .as_bytes(),
            );
            mac.verify_slice(given).is_ok()
        }
        _ => false,
    };
    if !ok {
        tracing::debug!(cluster = %req.cluster_id, known = secret.is_some(), "register: bad HMAC");
        return Err(ApiError::unauthorized(
            "bad_hmac",
            "clusterSecretHmac does not verify (unknown cluster or wrong secret)",
        ));
    }
    let digest: [u8; 32] = Sha256::digest(
        format!(
            "{server_id}\n{}\n{}",
            req.timestamp, req.cluster_secret_hmac
        )
        .as_bytes(),
    )
    .into();
    let key = format!("{}/{}", req.cluster_id, server_id);
    let replayed_here = d.replay.contains_key(&digest);
    let replayed_federation = state
        .store
        .get(NS, &key)?
        .and_then(|r| decode_body(&r))
        .is_some_and(|b| b.reg_digest == digest);
    if replayed_here || replayed_federation {
        return Err(ApiError::conflict(
            "replay",
            "this registration request was already used",
        ));
    }
    d.replay.insert(digest, ());
    let body = ServerBody {
        server_id: server_id.clone(),
        cluster_id: req.cluster_id.clone(),
        public_url: req.public_url,
        public_key: req.public_key,
        version: req.version,
        last_seen_ms: now,
        hub: state.peer_id.clone(),
        reg_digest: digest.to_vec(),
    };
    state
        .mesh
        .write(vec![draft_for(&body, d.config.gone_after)?])
        .await?;
    let token = state
        .tokens
        .issue_server(&server_id, &req.cluster_id, d.config.token_ttl)?;
    Ok(RegisterResponse {
        token,
        expires_in: d.config.token_ttl.as_secs(),
        server_id,
        cluster_id: req.cluster_id,
    })
}

/// Marks the token's server alive.
#[utoipa::path(
    post, path = "/api/v1/servers/heartbeat", tag = "discovery",
    security(("bearer" = [])),
    responses(
        (status = 200, body = HeartbeatResponse),
        (status = 401, description = "missing, invalid, expired or foreign token", body = ErrorBody),
        (status = 404, description = "registration unknown or deleted", body = ErrorBody),
        (status = 429, body = ErrorBody),
    )
)]
pub async fn heartbeat(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<ApiJson<HeartbeatResponse>, ApiError> {
    let claims = server_claims(&state, &headers)?;
    let key = format!("{}/{}", claims.cid, claims.sub);
    let held = match state.store.get(NS, &key)? {
        Some(r) => Some(r),
        None => state.mesh.lookup(NS, &key).await?,
    };
    let mut body = held
        .as_ref()
        .and_then(decode_body)
        .ok_or_else(|| ApiError::not_found("no registration for this token's server"))?;
    body.last_seen_ms = now_ms();
    body.hub = state.peer_id.clone();
    state
        .mesh
        .write(vec![draft_for(&body, state.discovery.config.gone_after)?])
        .await?;
    counter("heartbeat", "ok");
    Ok(ApiJson(HeartbeatResponse {
        status: "ok".into(),
        next_heartbeat_sec: NEXT_HEARTBEAT_SECS,
    }))
}

/// Lists the active servers of a cluster, registered at any hub.
#[utoipa::path(
    get, path = "/api/v1/cluster/{cluster_id}", tag = "discovery",
    security(("bearer" = [])),
    params(("cluster_id" = String, Path, description = "Cluster id")),
    responses(
        (status = 200, body = ClusterResponse),
        (status = 401, body = ErrorBody),
        (status = 403, description = "token of another cluster", body = ErrorBody),
        (status = 429, body = ErrorBody),
    )
)]
pub async fn lookup_cluster(
    State(state): State<AppState>,
    Path(cluster_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let claims = server_claims(&state, &headers)?;
    if claims.cid != cluster_id {
        return Err(ApiError::forbidden("the token belongs to another cluster"));
    }
    let now = now_ms();
    // Taken before the read, so a write landing during it invalidates the answer.
    let stamp = state.store.change_stamp(NS, &cluster_id);
    let cache = &state.discovery.lookups;
    if let Some(hit) = cache.get(&cluster_id)
        && hit.stamp == stamp
        && now < hit.valid_until_ms
    {
        counter("lookup", "ok");
        metrics::counter!("hubmesh_discovery_lookup_cache_total", "outcome" => "hit").increment(1);
        return Ok(json_response(hit.json.clone()));
    }
    let inactive = state.discovery.config.inactive_after.as_millis() as u64;
    let mut valid_until_ms = u64::MAX;
    let servers = scan(&state, &format!("{cluster_id}/"), MAX_LISTED)?
        .into_iter()
        .filter_map(|r| {
            let b = decode_body(&r)?;
            let inactive_at = b.last_seen_ms.saturating_add(inactive);
            (now < inactive_at).then(|| {
                valid_until_ms = valid_until_ms.min(inactive_at).min(r.expires_ms);
                view(&b)
            })
        })
        .collect();
    let json = Bytes::from(
        serde_json::to_vec(&ClusterResponse {
            cluster_id: cluster_id.clone(),
            servers,
        })
        .map_err(|e| ApiError::internal(format!("encoding the lookup answer: {e}")))?,
    );
    cache.insert(
        cluster_id,
        Arc::new(CachedLookup {
            stamp,
            valid_until_ms,
            json: json.clone(),
        }),
    );
    counter("lookup", "ok");
    metrics::counter!("hubmesh_discovery_lookup_cache_total", "outcome" => "miss").increment(1);
    Ok(json_response(json))
}

fn json_response(json: Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        json,
    )
        .into_response()
}

fn scan(state: &AppState, prefix: &str, cap: usize) -> Result<Vec<Record>, ApiError> {
    const PAGE: usize = 512;
    let mut out: Vec<Record> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = state
            .store
            .scan_prefix(NS, prefix, after.as_deref(), PAGE)?;
        let n = page.len();
        after = page.last().map(|r| r.key.clone());
        out.extend(page);
        if n < PAGE || out.len() >= cap {
            out.truncate(cap);
            return Ok(out);
        }
    }
}

/// Deletes a registration federation-wide (tombstone).
#[utoipa::path(
    delete, path = "/api/v1/servers/{server_id}", tag = "discovery",
    security(("bearer" = [])),
    params(("server_id" = String, Path, description = "Server id (UUID)")),
    responses(
        (status = 200, body = DeleteResponse),
        (status = 401, body = ErrorBody),
        (status = 403, description = "another server's token", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 429, body = ErrorBody),
    )
)]
pub async fn delete_server(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(server_id): Path<String>,
    headers: HeaderMap,
) -> Result<ApiJson<DeleteResponse>, ApiError> {
    let server_id = canonical_server_id(&server_id)?;
    let record = if state.admin.is_admin(peer, &headers)
        && bearer(&headers).is_none_or(|t| state.tokens.verify_server(t).is_err())
    {
        state
            .store
            .by_term(NS, &format!("sid:{server_id}"), 1)?
            .into_iter()
            .next()
    } else {
        let claims = server_claims(&state, &headers)?;
        if claims.sub != server_id {
            return Err(ApiError::forbidden("the token belongs to another server"));
        }
        let key = format!("{}/{}", claims.cid, server_id);
        match state.store.get(NS, &key)? {
            Some(r) => Some(r),
            None => state.mesh.lookup(NS, &key).await?,
        }
    };
    let record = record.ok_or_else(|| ApiError::not_found("no such registration"))?;
    let body =
        decode_body(&record).ok_or_else(|| ApiError::internal("undecodable server record"))?;
    // The tombstone must outlive what it deletes, or a late copy could return.
    let expires_ms = record
        .expires_ms
        .max(now_ms() + state.discovery.config.gone_after.as_millis() as u64);
    state
        .mesh
        .write(vec![Draft {
            ns: NS.into(),
            key: record.key.clone(),
            body: Vec::new(),
            expires_ms,
            deleted: true,
            terms: Vec::new(),
        }])
        .await?;
    counter("delete", "ok");
    Ok(ApiJson(DeleteResponse {
        status: "deleted".into(),
        server_id,
        cluster_id: body.cluster_id,
    }))
}

/// Admin: clusters and counts.
#[utoipa::path(
    get, path = "/api/v1/admin/clusters", tag = "discovery-admin",
    security(("admin" = [])),
    responses((status = 200, body = AdminClusters), (status = 401, body = ErrorBody))
)]
pub async fn admin_clusters(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
) -> Result<ApiJson<AdminClusters>, ApiError> {
    state.admin.check(peer, &headers)?;
    let now = now_ms();
    let inactive = state.discovery.config.inactive_after.as_millis() as u64;
    let mut map: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for b in scan(&state, "", 1_000_000)?.iter().filter_map(decode_body) {
        let e = map.entry(b.cluster_id.clone()).or_default();
        e.0 += 1;
        if now.saturating_sub(b.last_seen_ms) < inactive {
            e.1 += 1;
        }
    }
    let clusters: Vec<ClusterSummary> = map
        .into_iter()
        .map(|(cluster_id, (servers, active))| ClusterSummary {
            cluster_id,
            servers,
            active,
        })
        .collect();
    Ok(ApiJson(AdminClusters {
        total_servers: clusters.iter().map(|c| c.servers).sum(),
        active_servers: clusters.iter().map(|c| c.active).sum(),
        clusters,
    }))
}

/// Admin: every registration (active or not), optionally of one cluster.
#[utoipa::path(
    get, path = "/api/v1/admin/servers", tag = "discovery-admin",
    security(("admin" = [])),
    params(AdminServersQuery),
    responses((status = 200, body = Vec<AdminServer>), (status = 401, body = ErrorBody))
)]
pub async fn admin_servers(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Query(q): Query<AdminServersQuery>,
    headers: HeaderMap,
) -> Result<ApiJson<Vec<AdminServer>>, ApiError> {
    state.admin.check(peer, &headers)?;
    let prefix = match &q.cluster {
        Some(c) => {
            check_cluster_id(c)?;
            format!("{c}/")
        }
        None => String::new(),
    };
    let now = now_ms();
    let inactive = state.discovery.config.inactive_after.as_millis() as u64;
    Ok(ApiJson(
        scan(&state, &prefix, MAX_LISTED)?
            .iter()
            .filter_map(decode_body)
            .map(|b| AdminServer {
                cluster_id: b.cluster_id.clone(),
                active: now.saturating_sub(b.last_seen_ms) < inactive,
                server: view(&b),
            })
            .collect(),
    ))
}

/// The Discovery routes (rate limiting and body limits are applied by the facade).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/servers/register", post(register))
        .route("/api/v1/servers/heartbeat", post(heartbeat))
        .route("/api/v1/cluster/{cluster_id}", get(lookup_cluster))
        .route("/api/v1/servers/{server_id}", delete(delete_server))
        .route("/api/v1/admin/clusters", get(admin_clusters))
        .route("/api/v1/admin/servers", get(admin_servers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_checks() {
        assert!(check_public_key(&B64.encode([7u8; 32])).is_ok());
        assert!(check_public_key(&B64.encode([7u8; 31])).is_err());
        assert!(check_public_key("!!").is_err());
        assert!(check_public_url("https://a.example:9090/x").is_ok());
        assert!(check_public_url("ftp://a.example").is_err());
        assert!(check_public_url("not a url").is_err());
        assert!(check_cluster_id("acme-corp").is_ok());
        assert!(check_cluster_id("a/b").is_err());
        assert!(check_cluster_id(&"x".repeat(65)).is_err());
        let id = "6F1C2B3A-0000-4000-8000-000000000001";
        assert_eq!(
            canonical_server_id(id).unwrap(),
            "6f1c2b3a-0000-4000-8000-000000000001"
        );
        assert!(canonical_server_id("nope").is_err());
    }

    #[test]
    fn hmac_is_the_documented_one() {
        // HMAC-SHA256(key="k", "a\nb\nc\nd\ne"), computed independently.
        let m = hmac_message("a", "b", "c", "d", "e");
        assert_eq!(m, "a\nb\nc\nd\ne");
        let sig = sign_registration(b"k", &m);
        assert_eq!(B64.decode(&sig).unwrap().len(), 32);
        assert_ne!(sig, sign_registration(b"k2", &m));
    }

    #[test]
    fn record_validation() {
        let body = ServerBody {
            server_id: "6f1c2b3a-0000-4000-8000-000000000001".into(),
            cluster_id: "c".into(),
            public_url: "https://x.example".into(),
            public_key: B64.encode([1u8; 32]),
            version: "1".into(),
            last_seen_ms: 1,
            hub: "h".into(),
            reg_digest: vec![1, 2],
        };
        let d = draft_for(&body, Duration::from_secs(60)).unwrap();
        let mut r = Record {
            ns: d.ns,
            key: d.key,
            body: d.body,
            origin: hubmesh_store::OriginId::new(vec![1]),
            version: Default::default(),
            seq: 1,
            expires_ms: d.expires_ms,
            deleted: false,
            terms: d.terms,
            sig: vec![],
        };
        assert_eq!(validate_record(&r), Ok(()));
        assert_eq!(decode_body(&r), Some(body));
        r.key = "c/other".into();
        assert!(validate_record(&r).is_err());
        r.body = vec![0xff];
        assert!(validate_record(&r).is_err());
    }
}
