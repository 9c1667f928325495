//! Public expertise profiles and search (compat §E): `GET/PUT/DELETE
//! /profile`, `GET /profile/{node_id}`, `GET /discovery/search`. A profile
//! is a replicated record in namespace [`NS`] keyed by node id; it declares
//! one index term `w:<word>` per distinct word of its expertise topics, so a
//! search on any hub is a handful of term lookups over every hub's profiles
//! (no scan), bounded per query word. Each result carries the node's online
//! state from the replicated presence records. `DELETE /profile` deletes the
//! account (reference): profile and identity federation-wide, and the
//! account itself when this hub is its home hub.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::get;
use hubmesh_store::{Draft, Record};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::nodes::{self, DetailBody, NodeBody, RECORD_TTL, REFRESH_BELOW, tombstone};
use super::{FedError, Limit, authenticate_headers};
use crate::auth::UserClaims;
use crate::error::{ApiError, ApiJson};
use crate::facade::AppState;
use crate::now_ms;

/// Namespace of profiles.
pub const NS: &str = "profile";
/// Longest display name, in characters.
pub const MAX_NAME: usize = 100;
/// Longest description, in characters.
pub const MAX_DESCRIPTION: usize = 2000;
/// Most expertise entries.
pub const MAX_EXPERTISE: usize = 16;
/// Longest topic, in characters.
pub const MAX_TOPIC: usize = 64;
/// Most distinct indexed words (the store allows 32 terms per record).
pub const MAX_WORDS: usize = 30;
/// Longest indexed word, in bytes (longer words are cut on a char boundary).
pub const MAX_WORD_BYTES: usize = 48;
/// Most words of a query that are looked up.
pub const MAX_QUERY_WORDS: usize = 8;
/// Longest query, in bytes.
pub const MAX_QUERY: usize = 256;
/// Most profiles read per query word.
pub const PER_WORD_CAP: usize = 1000;
/// Default and largest result count.
pub const DEFAULT_LIMIT: usize = 50;
/// Largest `limit`.
pub const MAX_LIMIT: usize = 200;

/// One expertise entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Expertise {
    /// Topic, 1–64 characters.
    pub topic: String,
    /// Proficiency 1–5.
    pub level: u8,
}

/// `PUT /profile` body: fields present replace the stored ones, absent
/// fields are kept.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileUpdate {
    /// Display name, at most 100 characters.
    pub name: Option<String>,
    /// Free text, at most 2000 characters.
    pub description: Option<String>,
    /// At most 16 entries.
    pub expertise: Option<Vec<Expertise>>,
    /// The node's x25519 public key for sealed signals (base64 of 32 bytes),
    /// or an empty string to remove it.
    pub x25519_public_key: Option<String>,
}

/// A profile as answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProfileView {
    /// Node id.
    pub node_id: String,
    /// Display name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Expertise.
    pub expertise: Vec<Expertise>,
    /// Base64 x25519 public key for sealed signals, if published.
    pub x25519_public_key: Option<String>,
    /// Last update, RFC 3339 UTC (absent before the first update).
    pub updated_at: Option<String>,
    /// Whether the node is connected to some hub's `/ws/signal` now.
    pub online: bool,
}

/// One search hit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SearchResult {
    /// The profile (with online state).
    #[serde(flatten)]
    pub profile: ProfileView,
    /// Topics that matched the query (with level ≥ `min_level`).
    pub matched_topics: Vec<String>,
}

/// `GET /discovery/search` query.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
pub struct SearchQuery {
    /// Words to find in expertise topics (case-insensitive, whole words; any word matches).
    pub q: Option<String>,
    /// Minimum level of a matching topic, 1–5 (default 1).
    pub min_level: Option<u8>,
    /// Most results, 1–200 (default 50).
    pub limit: Option<usize>,
}

/// `DELETE /profile` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeleteAccountResponse {
    /// Always `deleted`.
    pub status: String,
    /// The node id whose identity and profile were removed, if any.
    pub node_id: Option<String>,
    /// Whether the account itself was removed (only on its home hub).
    pub account_removed: bool,
}

/// The replicated body of a profile (CBOR).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileBody {
    /// Node id (the record key).
    pub node_id: String,
    /// Owner's home hub.
    pub owner_iss: String,
    /// Owner's username.
    pub owner_sub: String,
    /// Display name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// `(topic, level)` pairs.
    pub expertise: Vec<(String, u8)>,
    /// Base64 x25519 key.
    pub x25519: Option<String>,
    /// Last update, ms since the epoch.
    pub updated_ms: u64,
}

/// Lower-cased words of `text` (split on anything not alphanumeric), each
/// cut to [`MAX_WORD_BYTES`].
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut w = w.to_lowercase();
            if w.len() > MAX_WORD_BYTES {
                let mut cut = MAX_WORD_BYTES;
                while !w.is_char_boundary(cut) {
                    cut -= 1;
                }
                w.truncate(cut);
            }
            w
        })
        .collect()
}

fn word_term(w: &str) -> String {
    format!("w:{w}")
}

/// Index terms of a body: one per distinct topic word.
pub fn terms_of(body: &ProfileBody) -> Vec<String> {
    let mut set = std::collections::BTreeSet::new();
    for (t, _) in &body.expertise {
        set.extend(words(t));
    }
    set.iter().map(|w| word_term(w)).collect()
}

fn check_text(field: &str, v: &str, max: usize) -> Result<(), ApiError> {
    if v.chars().count() > max {
        return Err(ApiError::invalid_field(
            field,
            format!("at most {max} characters"),
        ));
    }
    if v.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(ApiError::invalid_field(
            field,
            "control characters are not allowed",
        ));
    }
    Ok(())
}

/// Checks every field of a body (on write and on every inbound record).
pub fn check_body(b: &ProfileBody) -> Result<(), ApiError> {
    if !nodes::is_node_id(&b.node_id) {
        return Err(ApiError::invalid_field("node_id", "not a node id"));
    }
    check_text("name", &b.name, MAX_NAME)?;
    check_text("description", &b.description, MAX_DESCRIPTION)?;
    if b.expertise.len() > MAX_EXPERTISE {
        return Err(ApiError::invalid_field(
            "expertise",
            format!("at most {MAX_EXPERTISE} entries"),
        ));
    }
    for (t, l) in &b.expertise {
        if t.trim().is_empty() || words(t).is_empty() {
            return Err(ApiError::invalid_field(
                "expertise.topic",
                "must contain a word",
            ));
        }
        check_text("expertise.topic", t, MAX_TOPIC)?;
        if !(1..=5).contains(l) {
            return Err(ApiError::invalid_field("expertise.level", "must be 1 to 5"));
        }
    }
    if terms_of(b).len() > MAX_WORDS {
        return Err(ApiError::invalid_field(
            "expertise",
            format!("topics hold more than {MAX_WORDS} distinct words"),
        ));
    }
    if let Some(k) = &b.x25519 {
        crate::sealed::public_key_from_b64(k).map_err(|_| {
            ApiError::invalid_field("x25519_public_key", "must be base64 of 32 bytes")
        })?;
    }
    Ok(())
}

/// Validates an inbound profile record.
pub fn validate_record(r: &Record) -> Result<(), String> {
    if r.deleted {
        return Ok(());
    }
    let b: ProfileBody =
        serde_cbor::from_slice(&r.body).map_err(|e| format!("profile body: {e}"))?;
    check_body(&b).map_err(|e| e.message)?;
    if r.key != b.node_id {
        return Err("profile record key does not match its body".into());
    }
    if r.terms != terms_of(&b) {
        return Err("profile record terms do not match its topics".into());
    }
    Ok(())
}

/// Decodes a profile body.
pub fn decode_body(r: &Record) -> Option<ProfileBody> {
    serde_cbor::from_slice(&r.body).ok()
}

fn view(state: &AppState, node_id: &str, b: Option<&ProfileBody>) -> ProfileView {
    let online = super::presence::is_online(state, node_id);
    match b {
        Some(b) => ProfileView {
            node_id: node_id.to_owned(),
            name: b.name.clone(),
            description: b.description.clone(),
            expertise: b
                .expertise
                .iter()
                .map(|(topic, level)| Expertise {
                    topic: topic.clone(),
                    level: *level,
                })
                .collect(),
            x25519_public_key: b.x25519.clone(),
            updated_at: Some(crate::discovery::rfc3339(b.updated_ms)),
            online,
        },
        None => ProfileView {
            node_id: node_id.to_owned(),
            name: String::new(),
            description: String::new(),
            expertise: Vec::new(),
            x25519_public_key: None,
            updated_at: None,
            online,
        },
    }
}

fn draft(b: &ProfileBody) -> Result<Draft, ApiError> {
    Ok(Draft {
        ns: NS.into(),
        key: b.node_id.clone(),
        body: serde_cbor::to_vec(b).map_err(ApiError::internal)?,
        expires_ms: b.updated_ms + RECORD_TTL.as_millis() as u64,
        deleted: false,
        terms: terms_of(b),
    })
}

fn own_node(state: &AppState, claims: &UserClaims) -> Result<(Record, NodeBody), ApiError> {
    let r = nodes::node_of(state, claims)?.ok_or_else(|| {
        ApiError::not_found(
            "No node identity registered for this account (POST /register-node-id first)",
        )
    })?;
    let b = nodes::decode_body(&r).ok_or_else(|| ApiError::internal("undecodable node record"))?;
    Ok((r, b))
}

/// Rewrites a profile whose expiry is near (a connected node stays listed).
pub async fn refresh_if_due(state: &AppState, node_id: &str) -> Result<(), ApiError> {
    let now = now_ms();
    let Some(r) = state.store.get(NS, node_id)? else {
        return Ok(());
    };
    if r.expires_ms > now + REFRESH_BELOW.as_millis() as u64 {
        return Ok(());
    }
    if let Some(mut b) = decode_body(&r) {
        b.updated_ms = now;
        state.mesh.write(vec![draft(&b)?]).await?;
    }
    Ok(())
}

/// The caller's own profile.
#[utoipa::path(
    get, path = "/profile", tag = "federation", security(("bearer" = [])),
    responses(
        (status = 200, description = "the profile (empty fields before the first update)", body = ProfileView),
        (status = 401, body = DetailBody),
        (status = 404, description = "no node identity registered", body = DetailBody),
    )
)]
pub async fn get_own(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<ApiJson<ProfileView>, FedError> {
    let claims = authenticate_headers(&state, &headers)?;
    let (node, _) = own_node(&state, &claims)?;
    let body = state
        .store
        .get(NS, &node.key)?
        .and_then(|r| decode_body(&r));
    Ok(ApiJson(view(&state, &node.key, body.as_ref())))
}

/// Updates the caller's profile (20/min per client IP).
#[utoipa::path(
    put, path = "/profile", tag = "federation", security(("bearer" = [])),
    request_body = ProfileUpdate,
    responses(
        (status = 200, description = "updated; durable on this hub", body = ProfileView),
        (status = 400, description = "malformed JSON", body = DetailBody),
        (status = 401, body = DetailBody),
        (status = 404, description = "no node identity registered", body = DetailBody),
        (status = 422, description = "invalid field", body = DetailBody),
        (status = 429, description = "rate limited", body = DetailBody),
    )
)]
pub async fn put_own(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<ProfileUpdate>, ApiError>,
) -> Result<ApiJson<ProfileView>, FedError> {
    let claims = authenticate_headers(&state, &headers)?;
    let ApiJson(up) = body?;
    let (node, nb) = own_node(&state, &claims)?;
    let now = now_ms();
    let mut b = state
        .store
        .get(NS, &node.key)?
        .and_then(|r| decode_body(&r))
        .unwrap_or_else(|| ProfileBody {
            node_id: node.key.clone(),
            owner_iss: nb.owner_iss.clone(),
            owner_sub: nb.owner_sub.clone(),
            name: String::new(),
            description: String::new(),
            expertise: Vec::new(),
            x25519: None,
            updated_ms: now,
        });
    if let Some(n) = up.name {
        b.name = n;
    }
    if let Some(d) = up.description {
        b.description = d;
    }
    if let Some(e) = up.expertise {
        b.expertise = e
            .into_iter()
            .map(|e| (e.topic.trim().to_owned(), e.level))
            .collect();
    }
    if let Some(k) = up.x25519_public_key {
        b.x25519 = (!k.is_empty()).then_some(k);
    }
    b.updated_ms = now;
    check_body(&b)?;
    let mut drafts = vec![draft(&b)?];
    if node.expires_ms <= now + REFRESH_BELOW.as_millis() as u64
        && let Ok(v) = nodes::verify_identity(&nb.node_id, &nb.public_key, &nb.certificate, now)
    {
        drafts.push(nodes::identity_draft(&nb, v.not_after_ms, now)?);
    }
    state.mesh.write(drafts).await?;
    Ok(ApiJson(view(&state, &node.key, Some(&b))))
}

/// Deletes the caller's account: identity and profile federation-wide,
/// the account on its home hub (see `specs/federation.md` for roaming tokens).
#[utoipa::path(
    delete, path = "/profile", tag = "federation", security(("bearer" = [])),
    responses(
        (status = 200, body = DeleteAccountResponse),
        (status = 401, body = DetailBody),
        (status = 429, description = "rate limited", body = DetailBody),
    )
)]
pub async fn delete_own(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<ApiJson<DeleteAccountResponse>, FedError> {
    let claims = authenticate_headers(&state, &headers)?;
    let now = now_ms();
    let node = nodes::node_of(&state, &claims)?;
    let mut drafts = Vec::new();
    if let Some(n) = &node {
        drafts.push(tombstone(n, now));
        if let Some(p) = state.store.get(NS, &n.key)? {
            drafts.push(tombstone(&p, now));
        }
        state
            .signaling
            .kill_node(&n.key, super::signal::Close::AccountDeleted);
    }
    if !drafts.is_empty() {
        state.mesh.write(drafts).await?;
    }
    let mut account_removed = false;
    if claims.iss == state.peer_id {
        match state.federation.accounts.remove(&claims.sub).await {
            Ok(()) => account_removed = true,
            Err(e) => tracing::warn!(user = %claims.sub, error = %e, "account removal failed"),
        }
        // The token must not outlive the account anywhere.
        super::revocation::revoke(&state, &claims).await?;
    }
    Ok(ApiJson(DeleteAccountResponse {
        status: "deleted".into(),
        node_id: node.map(|n| n.key),
        account_removed,
    }))
}

/// Any node's public profile, from this hub's store or the DHT.
#[utoipa::path(
    get, path = "/profile/{node_id}", tag = "federation",
    params(("node_id" = String, Path, description = "Node id")),
    responses(
        (status = 200, body = ProfileView),
        (status = 404, description = "no such profile", body = DetailBody),
        (status = 422, description = "not a node id", body = DetailBody),
    )
)]
pub async fn get_other(
    State(state): State<AppState>,
    Path(node_id): Path<String>,
) -> Result<ApiJson<ProfileView>, FedError> {
    if !nodes::is_node_id(&node_id) {
        return Err(ApiError::invalid_field("node_id", "not a node id").into());
    }
    let r = match state.store.get(NS, &node_id)? {
        Some(r) => Some(r),
        None => state.mesh.lookup(NS, &node_id).await?,
    };
    let b = r
        .as_ref()
        .and_then(decode_body)
        .ok_or_else(|| ApiError::not_found("Profile not found"))?;
    Ok(ApiJson(view(&state, &node_id, Some(&b))))
}

/// Searches every hub's profiles by expertise words.
#[utoipa::path(
    get, path = "/discovery/search", tag = "federation",
    params(SearchQuery),
    responses(
        (status = 200, description = "best matches first", body = Vec<SearchResult>),
        (status = 422, description = "missing or invalid q, min_level or limit", body = DetailBody),
    )
)]
pub async fn search(
    State(state): State<AppState>,
    Query(q): Query<SearchQuery>,
) -> Result<ApiJson<Vec<SearchResult>>, FedError> {
    let query = q.q.unwrap_or_default();
    if query.len() > MAX_QUERY {
        return Err(ApiError::invalid_field("q", format!("at most {MAX_QUERY} bytes")).into());
    }
    let mut qwords = words(&query);
    qwords.sort();
    qwords.dedup();
    qwords.truncate(MAX_QUERY_WORDS);
    if qwords.is_empty() {
        return Err(ApiError::invalid_field("q", "must contain a word").into());
    }
    let min_level = q.min_level.unwrap_or(1);
    if !(1..=5).contains(&min_level) {
        return Err(ApiError::invalid_field("min_level", "must be 1 to 5").into());
    }
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid_field("limit", format!("must be 1 to {MAX_LIMIT}")).into());
    }
    let mut hits: BTreeMap<String, ProfileBody> = BTreeMap::new();
    for w in &qwords {
        for r in state.store.by_term(NS, &word_term(w), PER_WORD_CAP)? {
            if let Some(b) = decode_body(&r) {
                hits.entry(r.key).or_insert(b);
            }
        }
    }
    // Score: matched query words, then the best matching level.
    let mut scored: Vec<(usize, u8, SearchResult)> = Vec::new();
    for (node_id, b) in hits {
        let mut matched = Vec::new();
        let mut words_hit = std::collections::BTreeSet::new();
        let mut best = 0u8;
        for (topic, level) in &b.expertise {
            if *level < min_level {
                continue;
            }
            let tw = words(topic);
            let hit: Vec<&String> = qwords.iter().filter(|w| tw.contains(w)).collect();
            if !hit.is_empty() {
                matched.push(topic.clone());
                words_hit.extend(hit);
                best = best.max(*level);
            }
        }
        if matched.is_empty() {
            continue;
        }
        scored.push((
            words_hit.len(),
            best,
            SearchResult {
                profile: view(&state, &node_id, Some(&b)),
                matched_topics: matched,
            },
        ));
    }
    scored.sort_by(|a, b| {
        (b.0, b.1)
            .cmp(&(a.0, a.1))
            .then_with(|| a.2.profile.node_id.cmp(&b.2.profile.node_id))
    });
    scored.truncate(limit);
    Ok(ApiJson(scored.into_iter().map(|s| s.2).collect()))
}

/// The profile and search routes; updates and deletes are limited per
/// client IP by `update_limit` (20/min by default).
pub fn routes(update_limit: Limit) -> Router<AppState> {
    let limited = axum::middleware::from_fn_with_state(update_limit, super::rate_limit);
    Router::new()
        .route(
            "/profile",
            get(get_own).merge(
                axum::routing::put(put_own)
                    .delete(delete_own)
                    .layer(limited),
            ),
        )
        .route("/profile/{node_id}", get(get_other))
        .route("/discovery/search", get(search))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_terms() {
        assert_eq!(
            words("Rust, WebRTC & p2p-Networking"),
            ["rust", "webrtc", "p2p", "networking"]
        );
        let b = ProfileBody {
            node_id: "dpc-node-0123456789abcdef".into(),
            owner_iss: "i".into(),
            owner_sub: "s".into(),
            name: "n".into(),
            description: String::new(),
            expertise: vec![("Rust programming".into(), 4), ("rust".into(), 2)],
            x25519: None,
            updated_ms: 1,
        };
        assert_eq!(terms_of(&b), ["w:programming", "w:rust"]);
        assert!(check_body(&b).is_ok());
        let mut bad = b.clone();
        bad.expertise[0].1 = 6;
        assert!(check_body(&bad).is_err());
        let mut many = b;
        many.expertise = (0..16).map(|i| (format!("a{i} b{i}"), 1)).collect();
        assert!(
            check_body(&many).is_err(),
            "32 words exceed the term budget"
        );
    }
}
