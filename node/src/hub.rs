//! The hub: [`Hub::spawn`] opens the store, starts the mesh, binds the facade
//! and starts the background tasks, all under one cancellation token and one
//! task tracker; [`Hub::shutdown`] / [`Hub::join`] tear down in order: stop
//! accepting → drain in-flight requests (grace period) → close WebSockets
//! (1001) → stop the mesh → stop the background tasks → flush the store.
//! The event task turns what the mesh reports into local state.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hubmesh_mesh::{Membership, Mesh, MeshConfig, MeshEvent, Multiaddr, PeerId};
use hubmesh_store::{Store, StoreConfig};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::HubStatus;
use crate::auth::{AdminGuard, Members, TokenService};
use crate::config::Config;
use crate::discovery::Discovery;
use crate::error::NodeError;
use crate::facade::{self, AppState, HubState};
use crate::limits::{self, FamilyLimiter};
use crate::now_ms;
use crate::tls;

/// Re-exported for `hubmesh init`.
pub use hubmesh_mesh::load_or_create_identity;

/// File in the data dir naming the running facade's URL (`http://127.0.0.1:8080`).
pub const FACADE_ADDR_FILE: &str = "facade.addr";

/// How often expired records are swept.
const SWEEP_PERIOD: Duration = Duration::from_secs(5);

/// A running hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    cancel: CancellationToken,
    tracker: TaskTracker,
    mesh: Mesh,
    store: Store,
    state: AppState,
    http_addr: std::net::SocketAddr,
    mesh_addrs: Vec<Multiaddr>,
    server: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("peer", &self.peer_id())
            .field("http", &self.inner.http_addr)
            .finish_non_exhaustive()
    }
}

/// Turns transparent huge pages off for this process (Linux; a no-op
/// elsewhere). A hub's heap is mostly small long-lived allocations (one
/// signaling session is a few KiB, an index entry a few hundred bytes)
/// scattered over the allocator's arenas; with THP a touched 4 KiB page can
/// make a 2 MiB page resident. The signal bench's idle-connection figure
/// measured 20.8 KB of RSS per connection with THP and 14.8 KB without
/// (`cargo bench -p hubmesh-node --bench signal`, `MIMALLOC_ALLOW_THP=1`/`0`).
/// Databases commonly ask for THP off for the same reason. Failure (an old
/// kernel) only costs memory, so it is logged, not fatal.
pub fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::debug!(error = %e, "could not turn transparent huge pages off");
    }
}

impl Hub {
    /// Starts a hub. Returns once the facade is bound and the mesh listens.
    ///
    /// On Linux this also turns transparent huge pages off for the whole
    /// process (see [`disable_transparent_huge_pages`]).
    pub async fn spawn(mut config: Config) -> Result<Hub, NodeError> {
        disable_transparent_huge_pages();
        config.resolve_secrets()?;
        std::fs::create_dir_all(&config.data_dir)?;
        let _ = crate::metrics::handle();
        let tls = tls::server_config(&config.tls, &config.data_dir)?;
        let store = {
            let store_config = StoreConfig {
                path: Some(config.data_dir.join("store")),
                cache_bytes: config.store_cache_bytes,
                record_cache_bytes: config.record_cache_bytes,
                ..StoreConfig::default()
            };
            tokio::task::spawn_blocking(move || Store::open_with(store_config))
                .await
                .map_err(|e| NodeError::Config(format!("opening the store: {e}")))??
        };
        let mut mc = MeshConfig::new(config.federation.clone(), config.data_dir.join("mesh"));
        mc.listen = config.mesh_listen.clone();
        mc.bootstrap = config.bootstrap.clone();
        mc.sync_interval = config.sync_interval;
        mc.membership = if config.allowlist.is_empty() {
            Membership::Open
        } else {
            Membership::Allowlist(config.allowlist.iter().copied().collect())
        };
        mc.validator = Some(Arc::new(crate::records::validate_record));
        let (mesh, events) = Mesh::start(mc, store.clone()).await?;
        match Self::finish_spawn(config, tls, store, mesh.clone(), events).await {
            Ok(hub) => Ok(hub),
            Err(e) => {
                mesh.shutdown().await;
                Err(e)
            }
        }
    }

    async fn finish_spawn(
        config: Config,
        tls: Option<Arc<rustls::ServerConfig>>,
        store: Store,
        mesh: Mesh,
        events: mpsc::Receiver<MeshEvent>,
    ) -> Result<Hub, NodeError> {
        let peer_id = mesh.peer_id();
        let members = Members::load(peer_id, &config.allowlist, &store)?;
        let tokens = TokenService::new(mesh.keypair(), members.clone())?;
        let listener = TcpListener::bind(config.http)
            .await
            .map_err(|source| NodeError::Bind {
                addr: config.http.to_string(),
                source,
            })?;
        let http_addr = listener.local_addr()?;
        let mesh_addrs = mesh.listen_addrs().await?;
        let status = Arc::new(HubStatus::default());
        let _ = status.http_addr.set(http_addr);
        // Where `hubmesh user …` finds the running hub's operator API.
        let scheme = if config.tls == crate::config::TlsMode::None {
            "http"
        } else {
            "https"
        };
        if let Err(e) = std::fs::write(
            config.data_dir.join(FACADE_ADDR_FILE),
            format!("{scheme}://{http_addr}\n"),
        ) {
            tracing::warn!(error = %e, "could not write {FACADE_ADDR_FILE}");
        }
        let config = Arc::new(config);
        let state = AppState::new(HubState {
            store: store.clone(),
            mesh: mesh.clone(),
            peer_id: peer_id.to_string(),
            tokens,
            admin: AdminGuard::new(
                config.admin_token.as_deref(),
                config.admin_from_loopback,
                config.rate_limits.trusted_proxies.clone(),
            ),
            discovery: Arc::new(Discovery::new(config.discovery.clone())),
            federation: Arc::new(crate::federation::Federation::new(&config, &store)?),
            signaling: Arc::new(crate::federation::signal::Signaling::new(
                config.signal.clone(),
                peer_id.to_string(),
                crate::federation::Limit::new(
                    "federation_register",
                    config.signal.register_per_minute,
                    &config,
                ),
                crate::federation::Limit::new(
                    "federation_profile",
                    config.signal.profile_per_minute,
                    &config,
                ),
            )),
            discovery_limiter: FamilyLimiter::new(
                "discovery",
                config.rate_limits.discovery_per_minute,
                &config.rate_limits,
            ),
            config: config.clone(),
            status: status.clone(),
            started: Instant::now(),
        });
        {
            // Inbound relay frames go straight to the sessions from the
            // signal stream's reader (no event-channel hop); the
            // `MeshEvent::Signal` arm below only sees frames read before this.
            let signaling = state.signaling.clone();
            mesh.set_signal_handler(move |from, bytes| signaling.on_mesh_signal(from, bytes));
        }
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(consume_events(
            events,
            members,
            status,
            state.signaling.clone(),
            cancel.clone(),
        ));
        tracker.spawn(crate::federation::presence::refresh_loop(
            state.clone(),
            cancel.clone(),
        ));
        tracker.spawn(
            state
                .signaling
                .clone()
                .run_replies(mesh.clone(), cancel.clone()),
        );
        {
            let (store, cancel) = (store.clone(), cancel.clone());
            tracker.spawn(async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = store.run_sweeper(SWEEP_PERIOD) => {}
                }
            });
        }
        {
            let (limiter, cancel) = (state.discovery_limiter.clone(), cancel.clone());
            let federation = state.federation.clone();
            let signaling = state.signaling.clone();
            // One task forgets idle clients of every per-IP limiter.
            tracker.spawn(async move {
                let mut tick = tokio::time::interval(limits::CLEANUP_PERIOD);
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        _ = tick.tick() => {
                            limiter.cleanup();
                            federation.cleanup();
                            signaling.cleanup_limiters();
                        }
                    }
                }
            });
        }
        let server = tokio::spawn(facade::serve(
            listener,
            facade::router(state.clone()),
            tls,
            config.max_connections,
            cancel.clone(),
            config.shutdown_grace,
        ));
        tracing::info!(peer = %peer_id, http = %http_addr, "hub started");
        Ok(Hub {
            inner: Arc::new(Inner {
                cancel,
                tracker,
                mesh,
                store,
                state,
                http_addr,
                mesh_addrs,
                server: tokio::sync::Mutex::new(Some(server)),
            }),
        })
    }

    /// This hub's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.inner.mesh.peer_id()
    }

    /// The bound facade address.
    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.inner.http_addr
    }

    /// The mesh listen addresses (without `/p2p/`).
    pub fn mesh_addrs(&self) -> &[Multiaddr] {
        &self.inner.mesh_addrs
    }

    /// The mesh address others dial: the first listen address + `/p2p/PEERID`.
    pub fn dial_addr(&self) -> String {
        match self.inner.mesh_addrs.first() {
            Some(a) => format!("{a}/p2p/{}", self.peer_id()),
            None => format!("/p2p/{}", self.peer_id()),
        }
    }

    /// The line `hubmesh run` prints once serving (the CLI contract).
    pub fn ready_line(&self) -> String {
        format!(
            "hubmesh ready http={} mesh={} peer={}",
            self.http_addr(),
            self.dial_addr(),
            self.peer_id()
        )
    }

    /// The facade state (tests build routers from it).
    pub fn state(&self) -> &AppState {
        &self.inner.state
    }

    /// The mesh handle.
    pub fn mesh(&self) -> &Mesh {
        &self.inner.mesh
    }

    /// The hub's cancellation token: cancelling it starts the shutdown.
    pub fn cancel_token(&self) -> CancellationToken {
        self.inner.cancel.clone()
    }

    /// Starts the shutdown and waits for it.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.join().await;
    }

    /// Waits until the hub has been told to stop, then completes the
    /// teardown (idempotent).
    pub async fn join(&self) {
        self.inner.cancel.cancelled().await;
        let mut server = self.inner.server.lock().await;
        let Some(task) = server.take() else {
            return;
        };
        // 1-2: the server stops accepting and drains within the grace period.
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "the facade task ended abnormally");
        }
        // 3: WebSockets: presence tombstones, then a close frame on every socket.
        self.inner.state.signaling.shutdown(&self.inner.mesh).await;
        // 4: the mesh.
        self.inner.mesh.shutdown().await;
        // Background tasks watch the token.
        self.inner.tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within 5 s");
        }
        // 5: the store.
        let store = self.inner.store.clone();
        match tokio::task::spawn_blocking(move || store.flush_now()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "final store flush failed"),
            Err(e) => tracing::error!(error = %e, "final store flush panicked"),
        }
        let _ = std::fs::remove_file(self.inner.state.config.data_dir.join(FACADE_ADDR_FILE));
        tracing::info!("hub stopped");
    }
}

async fn consume_events(
    mut events: mpsc::Receiver<MeshEvent>,
    members: Members,
    status: Arc<HubStatus>,
    signaling: Arc<crate::federation::signal::Signaling>,
    cancel: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => break,
            e = events.recv() => match e {
                Some(e) => e,
                None => break,
            },
        };
        match event {
            MeshEvent::RecordAccepted(r) => {
                status.accepted.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("hubmesh_mesh_records_accepted_total").increment(1);
                crate::federation::presence::on_record(&signaling, &r);
                if let Ok(p) = PeerId::from_bytes(r.origin.as_bytes()) {
                    members.saw(p, now_ms());
                }
            }
            MeshEvent::PeerJoined(p) => {
                members.saw(p, now_ms());
                tracing::info!(peer = %p, "mesh peer joined");
            }
            MeshEvent::PeerLeft(p) => tracing::info!(peer = %p, "mesh peer left"),
            MeshEvent::SyncFinished { peer, pulled } => status.synced(peer, pulled, now_ms()),
            MeshEvent::Lagged { dropped } => {
                status.lagged.fetch_add(dropped, Ordering::Relaxed);
                // Lost events may include presence changes.
                signaling.forget_routes();
                tracing::warn!(dropped, "mesh events dropped: the hub lagged");
            }
            MeshEvent::Signal { from, payload } => signaling.on_mesh_signal(from, &payload),
        }
    }
}
