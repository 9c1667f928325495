//! Shared harness for the mesh integration tests: hubs on 127.0.0.1 QUIC
//! port 0, each with its own temporary data dir, and deadline-bounded polling.
#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hubmesh_mesh::{Mesh, MeshConfig, MeshEvent, Multiaddr, PeerId};
use hubmesh_store::{Draft, Store};
use libp2p::multiaddr::Protocol;
use tokio::sync::mpsc::Receiver;

pub const FED: &str = "test-fed";

pub struct Hub {
    pub mesh: Mesh,
    pub events: Receiver<MeshEvent>,
    pub store: Store,
    pub dir: PathBuf,
    pub addr: Multiaddr,
}

impl Hub {
    pub fn id(&self) -> PeerId {
        self.mesh.peer_id()
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub fn draft(key: &str, body: &[u8]) -> Draft {
    Draft {
        ns: "server".into(),
        key: key.into(),
        body: body.to_vec(),
        expires_ms: now_ms() + 3_600_000,
        deleted: false,
        terms: vec![],
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Starts a hub in `dir` (its store on disk under `dir/store` when `disk`).
pub async fn start_hub_with(
    dir: &Path,
    disk: bool,
    bootstrap: Vec<Multiaddr>,
    tweak: impl FnOnce(&mut MeshConfig),
) -> Hub {
    let store = if disk {
        Store::open(dir.join("store")).unwrap()
    } else {
        Store::memory()
    };
    let mut config = MeshConfig::new(FED, dir.join("mesh"));
    config.bootstrap = bootstrap;
    tweak(&mut config);
    let (mesh, events) =
        tokio::time::timeout(Duration::from_secs(10), Mesh::start(config, store.clone()))
            .await
            .expect("start in time")
            .expect("start");
    let listen = mesh.listen_addrs().await.unwrap();
    let addr = listen[0].clone().with(Protocol::P2p(mesh.peer_id()));
    Hub {
        mesh,
        events,
        store,
        dir: dir.to_path_buf(),
        addr,
    }
}

pub async fn start_hub(dir: &Path, bootstrap: Vec<Multiaddr>) -> Hub {
    start_hub_with(dir, false, bootstrap, |_| {}).await
}

/// Polls `cond` every 10 ms until it holds or `limit` passes (then panics with `what`).
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every hub sees at least `n` connected peers.
pub async fn wait_connected(hubs: &[&Hub], n: usize) {
    for h in hubs {
        let mesh = h.mesh.clone();
        eventually(Duration::from_secs(15), "hubs connected", || {
            let mesh = mesh.clone();
            async move { mesh.peers().await.map(|p| p.len() >= n).unwrap_or(false) }
        })
        .await;
    }
}

/// Waits for an event matching `pred`, skipping others.
pub async fn wait_event(
    events: &mut Receiver<MeshEvent>,
    limit: Duration,
    mut pred: impl FnMut(&MeshEvent) -> bool,
) -> MeshEvent {
    tokio::time::timeout(limit, async {
        loop {
            let ev = events.recv().await.expect("event channel open");
            if pred(&ev) {
                return ev;
            }
        }
    })
    .await
    .expect("event in time")
}

/// Drains pending events without waiting (keeps channels from filling).
pub fn drain(events: &mut Receiver<MeshEvent>) -> Vec<MeshEvent> {
    let mut out = Vec::new();
    while let Ok(ev) = events.try_recv() {
        out.push(ev);
    }
    out
}
