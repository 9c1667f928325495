//! The HTTP facade: the shared [`AppState`], [`router`] (every API family
//! plus `/`, `/health`, `/healthz`, `/metrics` and the operator API, wrapped
//! in body limits, timeouts, CORS, request logs and metrics), and [`serve`],
//! the accept loop (plain or TLS) with a connection limit and graceful drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hubmesh_mesh::Mesh;
use hubmesh_store::Store;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::admin;
use crate::auth::{AdminGuard, TokenService};
use crate::config::Config;
use crate::discovery::{self, Discovery};
use crate::error::ApiError;
use crate::federation::{self, Federation};
use crate::limits::{self, FamilyLimiter};
use crate::metrics;

/// Everything a handler may need: one shared [`HubState`]. Cloning is one
/// reference count (axum clones the state for every extractor and layer of
/// every request).
#[derive(Clone)]
pub struct AppState(Arc<HubState>);

impl AppState {
    /// Shares `state` with the handlers.
    pub fn new(state: HubState) -> Self {
        AppState(Arc::new(state))
    }
}

impl std::ops::Deref for AppState {
    type Target = HubState;
    fn deref(&self) -> &HubState {
        &self.0
    }
}

/// The hub's state, as handlers see it (through [`AppState`]).
pub struct HubState {
    /// The hub's store (shared with the mesh).
    pub store: Store,
    /// The mesh handle.
    pub mesh: Mesh,
    /// This hub's PeerId, as a string.
    pub peer_id: String,
    /// The token service.
    pub tokens: TokenService,
    /// Operator check.
    pub admin: AdminGuard,
    /// Discovery state.
    pub discovery: Arc<Discovery>,
    /// The resolved config.
    pub config: Arc<Config>,
    /// Discovery rate limiter.
    pub discovery_limiter: FamilyLimiter,
    /// Federation-hub family state (accounts, OAuth, limits).
    pub federation: Arc<Federation>,
    /// Signaling sessions (`/ws/signal`) and the node/profile write limits.
    pub signaling: Arc<crate::federation::signal::Signaling>,
    /// Operator-visible hub state (sync rounds, facade address).
    pub status: Arc<admin::HubStatus>,
    /// Start time.
    pub started: Instant,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Debug for HubState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubState")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Root {
    service: &'static str,
    version: &'static str,
    peer: String,
    federation: String,
    families: Vec<&'static str>,
}

async fn root(State(s): State<AppState>) -> axum::Json<Root> {
    let mut families = Vec::new();
    if s.config.discovery.enabled {
        families.push("discovery");
    }
    if s.config.federation_hub.enabled {
        families.push("federation");
    }
    axum::Json(Root {
        service: "hubmesh",
        version: env!("CARGO_PKG_VERSION"),
        peer: s.peer_id.clone(),
        federation: s.config.federation.clone(),
        families,
    })
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    store: &'static str,
    mesh_peers: usize,
    websocket_sessions: usize,
    uptime_secs: u64,
}

async fn health(State(s): State<AppState>) -> Response {
    let store_ok = s.store.namespace_counts().is_ok();
    let peers = s.mesh.peers().await;
    let ok = store_ok && peers.is_ok();
    let body = Health {
        status: if ok { "ok" } else { "degraded" },
        store: if store_ok { "ok" } else { "error" },
        mesh_peers: peers.map(|p| p.len()).unwrap_or(0),
        websocket_sessions: s.signaling.len(),
        uptime_secs: s.started.elapsed().as_secs(),
    };
    let status = if ok {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

async fn timeout_mw(State(d): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(d, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "the request timed out",
        )
        .into_response(),
    }
}

/// One structured log event per request (JSON when `log_format = json`).
async fn log_mw(ConnectInfo(peer): ConnectInfo<SocketAddr>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    tracing::info!(
        target: "hubmesh::http",
        %method,
        path = %path,
        status = resp.status().as_u16(),
        micros = start.elapsed().as_micros() as u64,
        peer = %peer,
        "request"
    );
    resp
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::PATCH,
            ])
            .allow_headers([
                axum::http::header::AUTHORIZATION,
                axum::http::header::CONTENT_TYPE,
            ]),
    )
}

/// The facade's router. Tests drive it with `oneshot` (add
/// `MockConnectInfo`); [`serve`] serves it.
pub fn router(state: AppState) -> Router {
    let mut app = Router::new()
        .route("/", get(root))
        .route("/health", get(health))
        .route("/healthz", get(health))
        .route("/metrics", get(metrics::render))
        .merge(admin::routes())
        .merge(federation::routes(&state));
    if state.config.discovery.enabled {
        app = app.merge(discovery::routes().layer(middleware::from_fn_with_state(
            state.discovery_limiter.clone(),
            limits::rate_limit,
        )));
    }
    let mut app = app
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.config.request_timeout,
            timeout_mw,
        ))
        .layer(middleware::from_fn(metrics::track_http));
    if let Some(c) = cors(&state.config.cors_origins) {
        app = app.layer(c);
    }
    app.layer(middleware::from_fn(log_mw)).with_state(state)
}

/// Serves `app` on `listener` until `cancel` fires, then stops accepting and
/// gives open connections `grace` to finish their requests. With `tls`, each
/// connection is a TLS handshake (10 s limit) first.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    max_connections: usize,
    cancel: CancellationToken,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(max_connections));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; dropping connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    app.clone().oneshot(req.map(axum::body::Body::new))
                },
            );
            let builder = auto::Builder::new(TokioExecutor::new());
            let result = match acceptor {
                None => {
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(
                        Duration::from_secs(10),
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period");
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
}
