//! Presence: where a node is connected. While a node holds a `/ws/signal`
//! session, its hub keeps a short-TTL record in namespace [`NS`] keyed by
//! node id naming the hub (its PeerId) and the session; the hub rewrites it
//! every TTL/3 ([`refresh_loop`]), tombstones it when the session ends, and
//! if the hub dies the record simply expires. A newer presence record (the
//! node reconnected here or elsewhere) takes over: the hub holding the
//! older session learns it from the record (or, if that event was lost, at
//! its next refresh pass) and closes the stale socket with a close frame.

use std::time::Duration;

use hubmesh_mesh::PeerId;
use hubmesh_store::{Draft, Record};
use serde::{Deserialize, Serialize};

use super::nodes;
use super::signal::{Close, Signaling};
use crate::facade::AppState;
use crate::now_ms;

/// Namespace of presence records.
pub const NS: &str = "presence";
/// Longest accepted presence TTL (inbound records expiring later are refused).
pub const MAX_TTL: Duration = Duration::from_secs(600);
/// Presence records written per batch by the refresh pass.
const BATCH: usize = 256;

/// The replicated body of a presence record (CBOR).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceBody {
    /// The node id (the record key).
    pub node_id: String,
    /// PeerId of the hub holding the session: always the record's origin.
    pub hub: String,
    /// The session id on that hub.
    pub session: u64,
    /// When the session started, ms since the epoch.
    pub since_ms: u64,
}

/// Validates an inbound presence record: a hub may only claim sessions on
/// itself, and presence is short-lived.
pub fn validate_record(r: &Record) -> Result<(), String> {
    if r.expires_ms > now_ms() + MAX_TTL.as_millis() as u64 + 60_000 {
        return Err("presence record lives too long".into());
    }
    if r.deleted {
        return Ok(());
    }
    let b: PresenceBody =
        serde_cbor::from_slice(&r.body).map_err(|e| format!("presence body: {e}"))?;
    if r.key != b.node_id || !nodes::is_node_id(&b.node_id) {
        return Err("presence record key does not match its body".into());
    }
    let hub: PeerId = b.hub.parse().map_err(|_| "presence hub is not a PeerId")?;
    if hub.to_bytes() != r.origin.as_bytes() {
        return Err("presence names a hub other than its origin".into());
    }
    if !r.terms.is_empty() {
        return Err("presence records declare no terms".into());
    }
    Ok(())
}

/// Decodes a presence body.
pub fn decode_body(r: &Record) -> Option<PresenceBody> {
    serde_cbor::from_slice(&r.body).ok()
}

/// Where `node_id` is connected now, by the replicated presence record.
pub fn locate(state: &AppState, node_id: &str) -> Option<PresenceBody> {
    match state.store.get(NS, node_id) {
        Ok(r) => r.as_ref().and_then(decode_body),
        Err(e) => {
            tracing::warn!(error = %e, "presence read failed");
            None
        }
    }
}

/// Whether `node_id` holds a session on some hub.
pub fn is_online(state: &AppState, node_id: &str) -> bool {
    state.signaling.is_local(node_id) || locate(state, node_id).is_some()
}

/// The presence draft of a session.
pub fn draft(hub: &str, node_id: &str, session: u64, since_ms: u64, ttl: Duration) -> Draft {
    let body = PresenceBody {
        node_id: node_id.to_owned(),
        hub: hub.to_owned(),
        session,
        since_ms,
    };
    Draft {
        ns: NS.into(),
        key: node_id.to_owned(),
        // A three-string, two-integer struct always encodes.
        body: serde_cbor::to_vec(&body).unwrap_or_default(),
        expires_ms: now_ms() + ttl.as_millis() as u64,
        deleted: false,
        terms: Vec::new(),
    }
}

/// The tombstone ending a session's presence: it outlives the record it
/// deletes (which expires at most one TTL from now).
pub fn tombstone(node_id: &str, ttl: Duration) -> Draft {
    Draft {
        ns: NS.into(),
        key: node_id.to_owned(),
        body: Vec::new(),
        expires_ms: now_ms() + ttl.as_millis() as u64 + 1000,
        deleted: true,
        terms: Vec::new(),
    }
}

/// Whether the held presence of `node_id` names this hub's session `session`.
pub fn is_current(state: &AppState, node_id: &str, session: u64) -> bool {
    locate(state, node_id).is_some_and(|p| p.hub == state.peer_id && p.session == session)
}

/// A remote presence record arrived: a session of ours it supersedes is stale.
pub fn on_record(sig: &Signaling, r: &Record) {
    if r.ns != NS {
        return;
    }
    sig.forget_route(&r.key);
    if r.deleted {
        return;
    }
    let Some(b) = decode_body(r) else { return };
    // Only a session that started later takes over: a stale session's own
    // refresh (written before it learnt it was superseded) must not close
    // the newer one.
    if b.hub != sig.peer_id() {
        sig.kill_if_older(&b.node_id, b.since_ms, Close::TakenOver);
    }
}

/// Every TTL/3: rewrites the presence of every local session (batched),
/// closes sessions whose presence another session took over (in case the
/// record event was lost), sessions whose token expired or was revoked, and
/// refreshes long-lived identity and profile records of connected nodes.
pub async fn refresh_loop(state: AppState, cancel: tokio_util::sync::CancellationToken) {
    let sig = state.signaling.clone();
    let period = (sig.config().presence_ttl / 3).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => refresh_once(&state).await,
        }
    }
}

/// One refresh pass (see [`refresh_loop`]).
pub async fn refresh_once(state: &AppState) {
    let sig = &state.signaling;
    let ttl = sig.config().presence_ttl;
    let now_s = now_ms() / 1000;
    let mut drafts = Vec::new();
    for s in sig.snapshot() {
        if let Some(p) = locate(state, &s.node_id)
            && !(p.hub == state.peer_id && p.session == s.session)
            && p.since_ms > s.since_ms
        {
            sig.kill_if_older(&s.node_id, p.since_ms, Close::TakenOver);
            continue;
        }
        if s.exp <= now_s {
            sig.kill_session(&s.node_id, s.session, Close::TokenExpired);
            continue;
        }
        if super::revocation::is_revoked(&state.store, &s.jti).unwrap_or(false) {
            sig.kill_session(&s.node_id, s.session, Close::TokenRevoked);
            continue;
        }
        drafts.push(draft(
            &state.peer_id,
            &s.node_id,
            s.session,
            s.since_ms,
            ttl,
        ));
    }
    for chunk in drafts.chunks(BATCH) {
        if let Err(e) = state.mesh.write(chunk.to_vec()).await {
            tracing::warn!(error = %e, "presence refresh failed");
            return;
        }
    }
}
