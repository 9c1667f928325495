//! The local operator API (compat "Local operator API"): `/admin/…` endpoints
//! with the hub's identity, listen addresses, mesh peers with latency, record
//! counts per namespace, sync state, and a record lookup. Open to requests
//! from loopback or carrying the admin token ([`crate::auth::AdminGuard`]).
//! `hubmesh status`, `hubmesh peers` and `hubmesh lookup` call it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use base64::Engine;
use hubmesh_mesh::PeerId;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiJson};
use crate::facade::AppState;

pub mod blocked;

/// Most peers whose last sync round is remembered.
const MAX_SYNC_PEERS: usize = 1024;

/// Hub state the operator API reports, filled by the hub's tasks.
#[derive(Debug, Default)]
pub struct HubStatus {
    /// The bound facade address (set once serving).
    pub http_addr: OnceLock<SocketAddr>,
    /// Last anti-entropy round per peer: (ms since epoch, records pulled).
    pub sync: Mutex<BTreeMap<String, SyncRound>>,
    /// Records accepted from the mesh since start.
    pub accepted: std::sync::atomic::AtomicU64,
    /// Mesh events dropped because the hub lagged.
    pub lagged: std::sync::atomic::AtomicU64,
}

/// One anti-entropy round.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SyncRound {
    /// When it finished, ms since the epoch.
    pub at_ms: u64,
    /// Records applied.
    pub pulled: usize,
}

impl HubStatus {
    /// Records a finished sync round with `peer`.
    pub fn synced(&self, peer: PeerId, pulled: usize, at_ms: u64) {
        if let Ok(mut m) = self.sync.lock() {
            let k = peer.to_string();
            if m.len() >= MAX_SYNC_PEERS && !m.contains_key(&k) {
                return;
            }
            m.insert(k, SyncRound { at_ms, pulled });
        }
    }
}

/// `GET /admin/identity`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// PeerId.
    pub peer_id: String,
    /// Federation name.
    pub federation: String,
    /// `open` or `allowlist`.
    pub membership: String,
    /// Software version.
    pub version: String,
    /// Seconds since start.
    pub uptime_secs: u64,
}

/// `GET /admin/listen`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listen {
    /// Facade address.
    pub http: Option<String>,
    /// Whether the facade speaks TLS.
    pub tls: bool,
    /// Mesh addresses, each ending in `/p2p/<peer>`.
    pub mesh: Vec<String>,
}

/// One mesh peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    /// PeerId.
    pub peer_id: String,
    /// Its addresses.
    pub addrs: Vec<String>,
    /// Last ping round trip, ms.
    pub rtt_ms: Option<f64>,
}

/// `GET /admin/sync`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sync {
    /// Highest sequence number held per origin hub.
    pub watermarks: BTreeMap<String, u64>,
    /// Last round per peer.
    pub rounds: BTreeMap<String, SyncRound>,
    /// Records accepted from the mesh since start.
    pub accepted: u64,
    /// Mesh events dropped because the hub lagged.
    pub lagged: u64,
}

/// `GET /admin/status`: all of the above.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// Identity.
    pub identity: Identity,
    /// Listen addresses.
    pub listen: Listen,
    /// Peers.
    pub peers: Vec<Peer>,
    /// Live records per namespace.
    pub records: BTreeMap<String, u64>,
    /// Sync state.
    pub sync: Sync,
}

/// `GET /admin/lookup/{ns}/{key}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordView {
    /// Namespace.
    pub ns: String,
    /// Key.
    pub key: String,
    /// Origin hub.
    pub origin: String,
    /// HLC version (wall ms, counter).
    pub version: (u64, u32),
    /// Origin sequence number.
    pub seq: u64,
    /// Expiry, RFC 3339.
    pub expires: String,
    /// Tombstone.
    pub deleted: bool,
    /// The body decoded from CBOR, when it decodes.
    pub body: Option<serde_json::Value>,
    /// The body, base64.
    pub body_base64: String,
}

fn guard(s: &AppState, peer: SocketAddr, h: &HeaderMap) -> Result<(), ApiError> {
    s.admin.check(peer, h)
}

fn identity(s: &AppState) -> Identity {
    Identity {
        peer_id: s.peer_id.clone(),
        federation: s.config.federation.clone(),
        membership: if s.config.allowlist.is_empty() {
            "open".into()
        } else {
            "allowlist".into()
        },
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: s.started.elapsed().as_secs(),
    }
}

async fn listen(s: &AppState) -> Result<Listen, ApiError> {
    let mesh = s
        .mesh
        .listen_addrs()
        .await?
        .into_iter()
        .map(|a| format!("{a}/p2p/{}", s.peer_id))
        .collect();
    Ok(Listen {
        http: s.status.http_addr.get().map(|a| a.to_string()),
        tls: s.config.tls != crate::config::TlsMode::None,
        mesh,
    })
}

async fn peers(s: &AppState) -> Result<Vec<Peer>, ApiError> {
    Ok(s.mesh
        .peers()
        .await?
        .into_iter()
        .map(|p| Peer {
            peer_id: p.peer.to_string(),
            addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
            rtt_ms: p.rtt.map(|d| d.as_secs_f64() * 1000.0),
        })
        .collect())
}

fn records(s: &AppState) -> Result<BTreeMap<String, u64>, ApiError> {
    Ok(s.store.namespace_counts()?.into_iter().collect())
}

fn sync(s: &AppState) -> Result<Sync, ApiError> {
    let watermarks = s
        .store
        .watermarks()?
        .into_iter()
        .map(|(o, seq)| {
            let name = PeerId::from_bytes(o.as_bytes())
                .map(|p| p.to_string())
                .unwrap_or_else(|_| o.to_string());
            (name, seq)
        })
        .collect();
    let rounds = s.status.sync.lock().map(|m| m.clone()).unwrap_or_default();
    Ok(Sync {
        watermarks,
        rounds,
        accepted: s.status.accepted.load(std::sync::atomic::Ordering::Relaxed),
        lagged: s.status.lagged.load(std::sync::atomic::Ordering::Relaxed),
    })
}

async fn get_identity(
    State(s): State<AppState>,
    ConnectInfo(p): ConnectInfo<SocketAddr>,
    h: HeaderMap,
) -> Result<ApiJson<Identity>, ApiError> {
    guard(&s, p, &h)?;
    Ok(ApiJson(identity(&s)))
}

async fn get_listen(
    State(s): State<AppState>,
    ConnectInfo(p): ConnectInfo<SocketAddr>,
    h: HeaderMap,
) -> Result<ApiJson<Listen>, ApiError> {
    guard(&s, p, &h)?;
    Ok(ApiJson(listen(&s).await?))
}

async fn get_peers(
    State(s): State<AppState>,
    ConnectInfo(p): ConnectInfo<SocketAddr>,
    h: HeaderMap,
) -> Result<ApiJson<Vec<Peer>>, ApiError> {
    guard(&s, p, &h)?;
    Ok(ApiJson(peers(&s).await?))
}

async fn get_records(
    State(s): State<AppState>,
    ConnectInfo(p): ConnectInfo<SocketAddr>,
    h: HeaderMap,
) -> Result<ApiJson<BTreeMap<String, u64>>, ApiError> {
    guard(&s, p, &h)?;
    Ok(ApiJson(records(&s)?))
}

async fn get_sync(
    State(s): State<AppState>,
    ConnectInfo(p): ConnectInfo<SocketAddr>,
    h: HeaderMap,
) -> Result<ApiJson<Sync>, ApiError> {
    guard(&s, p, &h)?;
    Ok(ApiJson(sync(&s)?))
}

async fn get_status(
    State(s): State<AppState>,
    ConnectInfo(p): ConnectInfo<SocketAddr>,
    h: HeaderMap,
) -> Result<ApiJson<Status>, ApiError> {
    guard(&s, p, &h)?;
    Ok(ApiJson(Status {
        identity: identity(&s),
        listen: listen(&s).await?,
        peers: peers(&s).await?,
        records: records(&s)?,
        sync: sync(&s)?,
    }))
}

fn cbor_to_json(v: serde_cbor::Value) -> serde_json::Value {
    use serde_cbor::Value as C;
    use serde_json::Value as J;
    match v {
        C::Null => J::Null,
        C::Bool(b) => J::Bool(b),
        C::Integer(i) => i64::try_from(i)
            .map(J::from)
            .unwrap_or_else(|_| J::String(i.to_string())),
        C::Float(f) => serde_json::Number::from_f64(f).map_or(J::Null, J::Number),
        C::Bytes(b) => J::String(base64::engine::general_purpose::STANDARD.encode(b)),
        C::Text(t) => J::String(t),
        C::Array(a) => J::Array(a.into_iter().map(cbor_to_json).collect()),
        C::Map(m) => J::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let k = match k {
                        C::Text(t) => t,
                        other => format!("{other:?}"),
                    };
                    (k, cbor_to_json(v))
                })
                .collect(),
        ),
        C::Tag(_, inner) => cbor_to_json(*inner),
        _ => J::Null,
    }
}

async fn get_lookup(
    State(s): State<AppState>,
    ConnectInfo(p): ConnectInfo<SocketAddr>,
    Path((ns, key)): Path<(String, String)>,
    h: HeaderMap,
) -> Result<ApiJson<RecordView>, ApiError> {
    guard(&s, p, &h)?;
    let r = s
        .mesh
        .lookup(&ns, &key)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no live record {ns}/{key}")))?;
    let origin = PeerId::from_bytes(r.origin.as_bytes())
        .map(|p| p.to_string())
        .unwrap_or_else(|_| r.origin.to_string());
    Ok(ApiJson(RecordView {
        body: serde_cbor::from_slice::<serde_cbor::Value>(&r.body)
            .ok()
            .map(cbor_to_json),
        body_base64: base64::engine::general_purpose::STANDARD.encode(&r.body),
        ns: r.ns,
        key: r.key,
        origin,
        version: (r.version.wall_ms, r.version.counter),
        seq: r.seq,
        expires: crate::discovery::rfc3339(r.expires_ms),
        deleted: r.deleted,
    }))
}

/// The operator routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/identity", get(get_identity))
        .route("/admin/listen", get(get_listen))
        .route("/admin/peers", get(get_peers))
        .route("/admin/records", get(get_records))
        .route("/admin/sync", get(get_sync))
        .route("/admin/status", get(get_status))
        .route("/admin/lookup/{ns}/{*key}", get(get_lookup))
        .merge(blocked::routes())
}
