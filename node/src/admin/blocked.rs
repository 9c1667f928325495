//! `PUT /admin/blocked`: fault injection for operators and the testnet. The
//! body is the complete list of PeerIds this hub must refuse and disconnect
//! ([`hubmesh_mesh::Mesh::set_blocked`]); an empty list heals. A partition of
//! real hub processes is made by giving each side the other side's PeerIds.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::routing::put;
use hubmesh_mesh::PeerId;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiJson};
use crate::facade::AppState;

/// Most PeerIds one request may block (the mesh's peer book holds 1024).
pub const MAX_BLOCKED: usize = 1024;

/// `PUT /admin/blocked` answer: the set now blocked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Blocked {
    /// PeerIds refused and disconnected, sorted.
    pub blocked: Vec<String>,
}

async fn put_blocked(
    State(s): State<AppState>,
    ConnectInfo(p): ConnectInfo<SocketAddr>,
    h: HeaderMap,
    ApiJson(list): ApiJson<Vec<String>>,
) -> Result<ApiJson<Blocked>, ApiError> {
    s.admin.check(p, &h)?;
    if list.len() > MAX_BLOCKED {
        return Err(ApiError::invalid_field(
            "blocked",
            format!("at most {MAX_BLOCKED} PeerIds"),
        ));
    }
    let mut peers = BTreeSet::new();
    for (i, text) in list.iter().enumerate() {
        let peer: PeerId = text
            .parse()
            .map_err(|e| ApiError::invalid_field(&format!("[{i}]"), format!("{text:?}: {e}")))?;
        if peer.to_string() == s.peer_id {
            return Err(ApiError::invalid_field(
                &format!("[{i}]"),
                "a hub cannot block itself",
            ));
        }
        peers.insert(peer);
    }
    let blocked = peers.iter().map(ToString::to_string).collect();
    s.mesh.set_blocked(peers).await?;
    tracing::info!(?blocked, "operator set the blocked peers");
    Ok(ApiJson(Blocked { blocked }))
}

/// The route, merged into the operator routes.
pub fn routes() -> Router<AppState> {
    Router::new().route("/admin/blocked", put(put_blocked))
}
