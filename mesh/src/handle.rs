//! The cloneable [`Mesh`] handle: starting the mesh, and every operation the
//! node performs on it. Operations are commands sent over a bounded channel
//! to the event loop, answered on a oneshot; writes and signals take shorter
//! paths that do not involve the loop (the writer thread, which originates
//! into the store, and the signal streams).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use hubmesh_store::{Draft, DurableTicket, Record, Store};
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::behaviour::build_swarm;
use crate::config::{MeshConfig, check_federation};
use crate::error::{MeshError, SignalError};
use crate::event_loop::{Command, EventLoop, PeerInfo};
use crate::events::{EventSink, MeshEvent};
use crate::gate::Gate;
use crate::identity::{HubSigner, load_or_create_identity};
use crate::kad_store::KadStore;
use crate::peers::PeerBook;
use crate::protocol::Names;
use crate::signal::{SignalRelay, SignalSink, run_inbound};
use crate::validate::Validator;

/// Capacity of the command channel: callers wait (backpressure) beyond it.
const COMMAND_BUFFER: usize = 256;
/// Capacity of the writer's queue: writers wait (backpressure) beyond it.
const WRITE_BUFFER: usize = 1024;
/// How long `start` waits for the listeners to come up.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A handle on a running mesh. Cheap to clone; every clone drives the same
/// event loop. See the crate docs for an example.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

struct Inner {
    peer_id: PeerId,
    keypair: Keypair,
    store: Store,
    writes: mpsc::Sender<WriteJob>,
    commands: mpsc::Sender<Command>,
    signals: Arc<SignalRelay>,
    cancel: CancellationToken,
    tasks: tokio::sync::Mutex<Vec<JoinHandle<()>>>,
}

/// Work for the writer thread.
enum WriteJob {
    Originate {
        drafts: Vec<Draft>,
        reply: oneshot::Sender<hubmesh_store::Result<(Vec<Record>, DurableTicket)>>,
    },
    Stop,
}

/// The writer: originates every local write, in arrival order, on one
/// thread of its own. The store signs and applies under its lock, so one
/// thread loses no parallelism; it saves a blocking-pool hand-off per write
/// (a thread wake-up each way) and keeps sled's occasional log write and
/// sync off the async workers.
fn run_writer(store: Store, signer: HubSigner, mut jobs: mpsc::Receiver<WriteJob>) {
    while let Some(job) = jobs.blocking_recv() {
        match job {
            WriteJob::Originate { drafts, reply } => {
                let _ = reply.send(store.originate_nowait(drafts, &signer));
            }
            WriteJob::Stop => break,
        }
    }
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("peer_id", &self.inner.peer_id)
            .finish_non_exhaustive()
    }
}

impl Mesh {
    /// Starts the mesh: loads (or creates) the hub identity, listens, dials
    /// the bootstrap hubs and the peers met before, and spawns the event loop.
    /// Returns once every listen address is bound.
    pub async fn start(
        config: MeshConfig,
        store: Store,
    ) -> Result<(Mesh, mpsc::Receiver<MeshEvent>), MeshError> {
        check_federation(&config.federation)?;
        if config.listen.is_empty() {
            return Err(MeshError::Config("no listen address".into()));
        }
        std::fs::create_dir_all(&config.data_dir)?;
        let keypair = load_or_create_identity(&config.data_dir.join("identity.key"))?;
        let peer_id = keypair.public().to_peer_id();
        let names = Names::new(&config.federation)?;
        let validator = Validator::new(
            peer_id,
            config.membership.clone(),
            config.max_expiry_ahead,
            store.clock().clone(),
            config.validator.clone(),
        );
        let gate = Gate::new(peer_id, config.membership.clone());
        let kad_store = KadStore::new(peer_id, store.clone(), validator.clone());
        let mut swarm = build_swarm(
            keypair.clone(),
            &names,
            gate,
            kad_store,
            config.max_connections,
        )?;

        let mut listeners = Vec::new();
        for addr in &config.listen {
            let id = swarm
                .listen_on(addr.clone())
                .map_err(|e| MeshError::Listen {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?;
            listeners.push(id);
        }
        // "Listening when it returns": wait for each listener's first address.
        let deadline = tokio::time::Instant::now() + LISTEN_TIMEOUT;
        while !listeners.is_empty() {
            let event =
                tokio::time::timeout_at(deadline, futures::StreamExt::select_next_some(&mut swarm))
                    .await
                    .map_err(|_| MeshError::Listen {
                        addr: format!("{:?}", config.listen),
                        reason: "timed out waiting for the listener".into(),
                    })?;
            match event {
                SwarmEvent::NewListenAddr { listener_id, .. } => {
                    listeners.retain(|l| *l != listener_id);
                }
                SwarmEvent::ListenerError { error, .. } => {
                    return Err(MeshError::Listen {
                        addr: format!("{:?}", config.listen),
                        reason: error.to_string(),
                    });
                }
                SwarmEvent::ListenerClosed {
                    reason: Err(error), ..
                } => {
                    return Err(MeshError::Listen {
                        addr: format!("{:?}", config.listen),
                        reason: error.to_string(),
                    });
                }
                _ => {}
            }
        }

        let topic = libp2p::gossipsub::IdentTopic::new(names.topic.clone());
        swarm
            .behaviour_mut()
            .gossip
            .subscribe(&topic)
            .map_err(|e| MeshError::Config(format!("gossip subscribe: {e}")))?;

        let (sink, events) = EventSink::new(config.event_buffer);
        let cancel = CancellationToken::new();
        let mut control = swarm.behaviour().stream.new_control();
        let incoming = control
            .accept(names.signal.clone())
            .map_err(|e| MeshError::Config(format!("signal protocol: {e}")))?;
        let (commands, command_rx) = mpsc::channel(COMMAND_BUFFER);
        let signal_sink = SignalSink::new(sink.clone());
        let signals = Arc::new(SignalRelay::new(
            peer_id,
            control,
            names.signal.clone(),
            signal_sink.clone(),
            commands.clone(),
        ));
        let signal_task = tokio::spawn(run_inbound(incoming, signal_sink, cancel.clone()));

        let book = PeerBook::load(&config.data_dir.join("peers.cbor"));
        let mut event_loop = EventLoop::new(
            swarm,
            command_rx,
            sink,
            store.clone(),
            validator,
            names,
            book,
            config.sync_interval,
            cancel.clone(),
            signals.clone(),
        );
        for addr in config.bootstrap {
            event_loop.dial_addr(addr, None);
        }
        let loop_task = tokio::spawn(event_loop.run());

        let (writes, write_rx) = mpsc::channel(WRITE_BUFFER);
        let (writer_done, writer_exit) = oneshot::channel::<()>();
        let (writer_store, signer) = (store.clone(), HubSigner(keypair.clone()));
        std::thread::Builder::new()
            .name("hubmesh-writer".into())
            .spawn(move || {
                run_writer(writer_store, signer, write_rx);
                let _ = writer_done.send(());
            })?;
        // Completes when the writer thread has let go of the store.
        let writer_task = tokio::spawn(async move {
            let _ = writer_exit.await;
        });

        let mesh = Mesh {
            inner: Arc::new(Inner {
                peer_id,
                keypair,
                store,
                writes,
                commands,
                signals,
                cancel,
                tasks: tokio::sync::Mutex::new(vec![loop_task, signal_task, writer_task]),
            }),
        };
        Ok((mesh, events))
    }

    /// This hub's id.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// This hub's keypair (the node also signs tokens with it).
    pub fn keypair(&self) -> &Keypair {
        &self.inner.keypair
    }

    /// The store the mesh replicates into.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .commands
            .send(make(tx))
            .await
            .map_err(|_| MeshError::Closed)?;
        rx.await.map_err(|_| MeshError::Closed)
    }

    /// The addresses the hub listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, MeshError> {
        self.ask(Command::ListenAddrs).await
    }

    /// Originates records: signs them with the hub key and stores them
    /// durably, then publishes them (gossip and DHT) in the background.
    /// Returns once they are durable: publishing is best effort, anti-entropy
    /// covers whatever it misses.
    pub async fn write(&self, drafts: Vec<Draft>) -> Result<Vec<Record>, MeshError> {
        // The store write runs on the writer thread (see `run_writer`).
        let (reply, answer) = oneshot::channel();
        self.inner
            .writes
            .send(WriteJob::Originate { drafts, reply })
            .await
            .map_err(|_| MeshError::Closed)?;
        let (records, ticket) = answer.await.map_err(|_| MeshError::Closed)??;
        self.inner.store.durable(ticket).await?;
        let command = Command::Publish {
            records: records.clone(),
            gossip: true,
            dht: true,
            reply: None,
        };
        if self.inner.commands.send(command).await.is_err() {
            tracing::debug!("mesh stopped; written records will be published by anti-entropy");
        }
        Ok(records)
    }

    /// Publishes already-stored records of this hub (gossip and DHT put).
    /// Returns when the publication has been handed to the swarm.
    pub async fn publish(&self, records: Vec<Record>) -> Result<(), MeshError> {
        self.publish_via(records, true, true).await
    }

    /// Test and benchmark hook: publishes over gossip only, the DHT only, or
    /// both. Not part of the stable API.
    #[doc(hidden)]
    pub async fn publish_via(
        &self,
        records: Vec<Record>,
        gossip: bool,
        dht: bool,
    ) -> Result<(), MeshError> {
        self.ask(|reply| Command::Publish {
            records,
            gossip,
            dht,
            reply: Some(reply),
        })
        .await
    }

    /// Test hook: publishes `data` as one gossip message, as is (to play a
    /// misbehaving hub). Not part of the stable API.
    #[doc(hidden)]
    pub async fn gossip_raw(&self, data: Vec<u8>) -> Result<(), MeshError> {
        self.ask(|reply| Command::GossipRaw { data, reply }).await
    }

    /// Test hook: puts records straight to the DHT stores of `peers`,
    /// without storing or validating them here (to play a misbehaving hub).
    /// Not part of the stable API.
    #[doc(hidden)]
    pub async fn dht_put_to(
        &self,
        records: Vec<Record>,
        peers: Vec<PeerId>,
    ) -> Result<(), MeshError> {
        self.ask(|reply| Command::DhtPutTo {
            records,
            peers,
            reply,
        })
        .await
    }

    /// A live record by key: from the local store, or on a local miss from
    /// the DHT (validated and merged into the store before it is returned).
    /// A locally held tombstone answers `None` without asking the DHT.
    pub async fn lookup(&self, ns: &str, key: &str) -> Result<Option<Record>, MeshError> {
        if let Some(held) = self.inner.store.get_any(ns, key)? {
            return Ok((!held.deleted).then_some(held));
        }
        let (ns, key) = (ns.to_owned(), key.to_owned());
        self.ask(|reply| Command::Lookup { ns, key, reply }).await?
    }

    /// Sends an opaque payload to hub `target`, in order with this hub's
    /// other signals to it. `Ok` means the frame was written to the QUIC
    /// stream of a live connection to the target.
    pub async fn send_signal(&self, target: PeerId, payload: Vec<u8>) -> Result<(), SignalError> {
        if self.inner.cancel.is_cancelled() {
            return Err(SignalError::Closed);
        }
        self.inner.signals.send(target, payload).await
    }

    /// Hands every inbound signal to `handler` on the stream reader's task
    /// instead of emitting [`MeshEvent::Signal`] (no copy, no task hop).
    /// `handler` must never block or wait. Signals read before this call
    /// arrive as events. Returns `false` (and keeps the first) if a handler
    /// was installed already.
    pub fn set_signal_handler(
        &self,
        handler: impl Fn(PeerId, &[u8]) + Send + Sync + 'static,
    ) -> bool {
        self.inner.signals.set_handler(Arc::new(handler))
    }

    /// The hubs connected now.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, MeshError> {
        self.ask(Command::Peers).await
    }

    /// Dials an address (ending in `/p2p/<peer>` to avoid a duplicate
    /// connection to a peer already connected). Returns once connected.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), MeshError> {
        self.ask(|reply| Command::Dial { addr, reply }).await?
    }

    /// Starts an anti-entropy round with every connected peer now.
    pub async fn sync_now(&self) -> Result<(), MeshError> {
        self.ask(Command::SyncNow).await
    }

    /// Fault injection: disconnects these peers and refuses them until the
    /// next call; an empty set heals (and redials known peers at once).
    pub async fn set_blocked(&self, peers: BTreeSet<PeerId>) -> Result<(), MeshError> {
        self.ask(|reply| Command::SetBlocked { peers, reply }).await
    }

    /// Stops the event loop and the signal readers, closes connections, and
    /// returns once the tasks have ended. Idempotent.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        // Writes already queued are stored first; later ones get `Closed`.
        let _ = self.inner.writes.send(WriteJob::Stop).await;
        let mut tasks = self.inner.tasks.lock().await;
        for task in tasks.drain(..) {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "a mesh task ended abnormally");
            }
        }
    }
}
