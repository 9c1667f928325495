//! The event loop: the one task that owns the `Swarm`. It executes the
//! handle's commands, reacts to swarm events (gossip, DHT, sync, identify,
//! connections), runs anti-entropy sessions, redials known peers and feeds
//! this hub's records into the DHT. Heavy store work (building and merging
//! sync pages) runs on the blocking pool and reports back over a bounded
//! channel, so the swarm is never stalled by it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use hubmesh_store::{MergeOutcome, OriginId, Record, Store, codec};
use libp2p::core::ConnectedPoint;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::kad::{self, GetRecordOk, QueryId, QueryResult, Quorum, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, ping};
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::behaviour::{Behaviour, BehaviourEvent, DHT_REPLICATION};
use crate::error::MeshError;
use crate::events::{EventSink, MeshEvent};
use crate::kad_store::to_kad_record;
use crate::peers::PeerBook;
use crate::protocol::{
    GOSSIP_ENTRY_OVERHEAD, MAX_GOSSIP_BATCH, MAX_GOSSIP_BATCH_BYTES, MAX_PAGE_BYTES,
    MAX_PAGE_RECORDS, MAX_SYNC_ORIGINS, Names, SyncRequest, SyncResponse,
};
use crate::validate::{Validator, dht_key, held_exactly, split_dht_key};

/// What one connected hub looks like to the owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The hub.
    pub peer: PeerId,
    /// Its addresses: listen addresses it announced, else the connection's.
    pub addrs: Vec<Multiaddr>,
    /// The last ping round trip, if one completed.
    pub rtt: Option<Duration>,
}

/// A request from the handle. Every variant carries its reply channel.
#[derive(Debug)]
pub(crate) enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Publish {
        records: Vec<Record>,
        gossip: bool,
        dht: bool,
        reply: Option<oneshot::Sender<()>>,
    },
    Lookup {
        ns: String,
        key: String,
        reply: oneshot::Sender<Result<Option<Record>, MeshError>>,
    },
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    SyncNow(oneshot::Sender<()>),
    /// Find a hub's addresses through the DHT; `true` if it was found.
    FindPeer {
        peer: PeerId,
        reply: oneshot::Sender<bool>,
    },
    /// Test hook: publishes raw bytes as a gossip message.
    GossipRaw {
        data: Vec<u8>,
        reply: oneshot::Sender<()>,
    },
    /// Test hook: DHT put to named peers, bypassing the local store.
    DhtPutTo {
        records: Vec<Record>,
        peers: Vec<PeerId>,
        reply: oneshot::Sender<()>,
    },
    SetBlocked {
        peers: BTreeSet<PeerId>,
        reply: oneshot::Sender<()>,
    },
}

/// Results of work done off the event loop.
#[derive(Debug)]
enum Job {
    /// A sync page we pulled was validated and merged.
    PageMerged {
        peer: PeerId,
        origin: OriginId,
        applied: usize,
        invalid: usize,
        next_after: Option<u64>,
        watermark: u64,
    },
    /// A page a peer asked for is ready to send.
    PageBuilt {
        channel: ResponseChannel<SyncResponse>,
        response: SyncResponse,
    },
}

/// An anti-entropy round with one peer: the origins it has more of, pulled
/// one after the other, page by page.
#[derive(Debug, Default)]
struct SyncSession {
    queue: VecDeque<(OriginId, u64)>,
    /// The origin being pulled.
    current: Option<Pulling>,
    pulled: usize,
    /// Another round was asked for while this one ran.
    again: bool,
    /// A request of this session is in flight (or a page is being merged).
    busy: bool,
}

/// The origin a sync session is pulling.
#[derive(Debug, Clone)]
struct Pulling {
    origin: OriginId,
    /// `after` of the request in flight.
    after: u64,
    /// A page held invalid records: the watermark is then not advanced.
    tainted: bool,
}

#[derive(Debug)]
struct Conn {
    id: ConnectionId,
    remote: Multiaddr,
    dialer_is_me: bool,
    established: Instant,
}

/// An inbound connection from a peer arriving within this time of our own
/// dial to it may be a simultaneous dial (both sides dialled before either
/// saw the other's connection); later, it means the peer lost our connection.
const SIMULTANEOUS_DIAL_WINDOW: Duration = Duration::from_secs(3);

/// A DHT lookup awaiting its result: namespace, key and the caller's reply.
type PendingLookup = (
    String,
    String,
    oneshot::Sender<Result<Option<Record>, MeshError>>,
);

/// Invalid records from one peer before it is disconnected and banned.
const STRIKE_LIMIT: u32 = 10;
/// How long a peer that sent too many invalid records is refused.
const BAN_TIME: Duration = Duration::from_secs(600);
/// Most DHT put queries in flight; further records wait in a bounded queue.
const MAX_DHT_PUTS_IN_FLIGHT: usize = 8;
/// Most records waiting for a DHT put (beyond: dropped, anti-entropy covers).
const MAX_DHT_PUT_QUEUE: usize = 16 * 1024;
/// Most DHT lookups in flight.
const MAX_LOOKUPS: usize = 256;
/// Most dials awaiting a reply.
const MAX_PENDING_DIALS: usize = 256;
/// Most store jobs on the blocking pool at once (sync pages).
const MAX_JOBS: usize = 16;
/// Swarm events handled before pending merges are flushed.
const MAX_EVENT_BATCH: usize = 256;
/// Commands handled before queued gossip is flushed.
const MAX_COMMAND_BATCH: usize = 256;
/// Sync retries after a failed request while the peer stays connected.
const MAX_SYNC_RETRIES: u8 = 3;

pub(crate) struct EventLoop {
    pub(crate) swarm: Swarm<Behaviour>,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) sink: EventSink,
    pub(crate) store: Store,
    pub(crate) validator: Validator,
    pub(crate) names: Names,
    pub(crate) topic: IdentTopic,
    pub(crate) local: PeerId,
    pub(crate) book: PeerBook,
    pub(crate) sync_interval: Duration,
    pub(crate) cancel: CancellationToken,
    pub(crate) signals: std::sync::Arc<crate::signal::SignalRelay>,
    conns: HashMap<PeerId, Vec<Conn>>,
    listen_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    rtts: HashMap<PeerId, Duration>,
    sessions: HashMap<PeerId, SyncSession>,
    sync_requests: HashMap<OutboundRequestId, PeerId>,
    sync_retries: HashMap<PeerId, u8>,
    jobs_tx: mpsc::Sender<Job>,
    jobs_rx: mpsc::Receiver<Job>,
    jobs_in_flight: usize,
    lookups: HashMap<QueryId, PendingLookup>,
    find_peers: HashMap<QueryId, (PeerId, oneshot::Sender<bool>)>,
    pending_dials: HashMap<ConnectionId, oneshot::Sender<Result<(), MeshError>>>,
    strikes: HashMap<PeerId, u32>,
    pending_merge: Vec<Record>,
    /// Encoded records waiting to go out as one gossip message, and their
    /// size in the message.
    pending_gossip: Vec<ByteBuf>,
    pending_gossip_bytes: usize,
    dht_queue: VecDeque<Record>,
    dht_puts: std::collections::HashSet<QueryId>,
    /// Cursor over own records still to re-put into the DHT after a start.
    republish: Option<u64>,
    republish_started: bool,
}

impl EventLoop {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        sink: EventSink,
        store: Store,
        validator: Validator,
        names: Names,
        book: PeerBook,
        sync_interval: Duration,
        cancel: CancellationToken,
        signals: std::sync::Arc<crate::signal::SignalRelay>,
    ) -> Self {
        let (jobs_tx, jobs_rx) = mpsc::channel(MAX_JOBS * 2);
        let local = *swarm.local_peer_id();
        let topic = IdentTopic::new(names.topic.clone());
        EventLoop {
            swarm,
            commands,
            sink,
            store,
            validator,
            names,
            topic,
            local,
            book,
            sync_interval,
            cancel,
            signals,
            conns: HashMap::new(),
            listen_addrs: HashMap::new(),
            rtts: HashMap::new(),
            sessions: HashMap::new(),
            sync_requests: HashMap::new(),
            sync_retries: HashMap::new(),
            jobs_tx,
            jobs_rx,
            jobs_in_flight: 0,
            lookups: HashMap::new(),
            find_peers: HashMap::new(),
            pending_dials: HashMap::new(),
            strikes: HashMap::new(),
            pending_merge: Vec::new(),
            pending_gossip: Vec::new(),
            pending_gossip_bytes: 0,
            dht_queue: VecDeque::new(),
            dht_puts: Default::default(),
            republish: None,
            republish_started: false,
        }
    }

    /// Runs until cancelled or every handle is dropped.
    pub(crate) async fn run(mut self) {
        let mut sync_tick =
            tokio::time::interval(self.sync_interval.max(Duration::from_millis(100)));
        sync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        sync_tick.tick().await; // the first tick is immediate; connections trigger their own sync
        let mut maintenance = tokio::time::interval(Duration::from_millis(500));
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => break,
                event = self.swarm.select_next_some() => {
                    self.on_swarm_event(event);
                    // Drain whatever else is ready, then merge it as one batch.
                    for _ in 1..MAX_EVENT_BATCH {
                        match self.swarm.select_next_some().now_or_never() {
                            Some(event) => self.on_swarm_event(event),
                            None => break,
                        }
                    }
                    self.flush_merges();
                }
                Some(job) = self.jobs_rx.recv() => {
                    self.jobs_in_flight = self.jobs_in_flight.saturating_sub(1);
                    self.on_job(job);
                }
                command = self.commands.recv() => match command {
                    Some(command) => {
                        let publish = matches!(command, Command::Publish { gossip: true, .. });
                        self.on_command(command);
                        if publish {
                            // Writers acknowledged by one store group commit
                            // wake together: let them queue their publications
                            // so that they leave as one gossip message.
                            tokio::task::yield_now().await;
                        }
                        for _ in 1..MAX_COMMAND_BATCH {
                            match self.commands.try_recv() {
                                Ok(command) => self.on_command(command),
                                Err(_) => break,
                            }
                        }
                        self.flush_gossip();
                    }
                    None => break,
                },
                _ = sync_tick.tick() => {
                    let peers: Vec<PeerId> = self.conns.keys().copied().collect();
                    for peer in peers {
                        self.start_sync(peer);
                    }
                }
                _ = maintenance.tick() => self.maintain(),
            }
        }
        self.close().await;
    }

    /// Closes every connection and lets the close frames go out.
    async fn close(&mut self) {
        if let Err(e) = self.book.save_if_dirty() {
            tracing::warn!(error = %e, "cannot save the peer book");
        }
        let peers: Vec<PeerId> = self.conns.keys().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while !self.conns.is_empty() {
            match tokio::time::timeout_at(deadline, self.swarm.select_next_some()).await {
                Ok(SwarmEvent::ConnectionClosed {
                    peer_id,
                    connection_id,
                    ..
                }) => self.forget_connection(peer_id, connection_id),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        for (_, (_, _, reply)) in self.lookups.drain() {
            let _ = reply.send(Err(MeshError::Closed));
        }
    }

    fn forget_connection(&mut self, peer: PeerId, id: ConnectionId) {
        if let Some(list) = self.conns.get_mut(&peer) {
            list.retain(|c| c.id != id);
            if list.is_empty() {
                self.conns.remove(&peer);
            }
        }
    }

    // ----- commands -------------------------------------------------------

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Publish {
                records,
                gossip,
                dht,
                reply,
            } => {
                for record in records {
                    if gossip {
                        self.queue_gossip(&record);
                    }
                    if dht {
                        self.queue_dht_put(record);
                    }
                }
                self.pump_dht_puts();
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
            }
            Command::Lookup { ns, key, reply } => {
                if self.lookups.len() >= MAX_LOOKUPS {
                    let _ = reply.send(Err(MeshError::Dht("too many lookups in flight".into())));
                    return;
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_record(RecordKey::new(&dht_key(&ns, &key)));
                self.lookups.insert(id, (ns, key, reply));
            }
            Command::Peers(reply) => {
                let peers = self
                    .conns
                    .iter()
                    .map(|(peer, conns)| PeerInfo {
                        peer: *peer,
                        addrs: match self.listen_addrs.get(peer) {
                            Some(a) if !a.is_empty() => a.clone(),
                            _ => conns.iter().map(|c| c.remote.clone()).collect(),
                        },
                        rtt: self.rtts.get(peer).copied(),
                    })
                    .collect();
                let _ = reply.send(peers);
            }
            Command::Dial { addr, reply } => self.dial_addr(addr, Some(reply)),
            Command::SyncNow(reply) => {
                let peers: Vec<PeerId> = self.conns.keys().copied().collect();
                for peer in peers {
                    self.start_sync(peer);
                }
                let _ = reply.send(());
            }
            Command::FindPeer { peer, reply } => {
                if self.conns.contains_key(&peer) {
                    let _ = reply.send(true);
                } else if self.find_peers.len() >= MAX_LOOKUPS {
                    let _ = reply.send(false);
                } else {
                    let id = self.swarm.behaviour_mut().kad.get_closest_peers(peer);
                    self.find_peers.insert(id, (peer, reply));
                }
            }
            Command::GossipRaw { data, reply } => {
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .gossip
                    .publish(self.topic.clone(), data)
                {
                    tracing::debug!(error = %e, "raw gossip publish failed");
                }
                let _ = reply.send(());
            }
            Command::DhtPutTo {
                records,
                peers,
                reply,
            } => {
                let now = self.store.clock().now_ms();
                for record in records {
                    let Ok(bytes) = codec::encode_record(&record) else {
                        continue;
                    };
                    let key = RecordKey::new(&dht_key(&record.ns, &record.key));
                    if let Some(r) = to_kad_record(key, bytes, now) {
                        self.swarm.behaviour_mut().kad.put_record_to(
                            r,
                            peers.clone().into_iter(),
                            Quorum::One,
                        );
                    }
                }
                let _ = reply.send(());
            }
            Command::SetBlocked { peers, reply } => {
                let heal = peers.is_empty();
                for peer in &peers {
                    if self.conns.contains_key(peer) {
                        let _ = self.swarm.disconnect_peer_id(*peer);
                    }
                    self.signals.forget(peer);
                }
                self.swarm.behaviour_mut().gate.set_blocked(peers);
                if heal {
                    self.book.reset_backoff();
                    self.maintain();
                }
                let _ = reply.send(());
            }
        }
    }

    /// Dials `addr` unless its peer is already connected (or being dialled).
    pub(crate) fn dial_addr(
        &mut self,
        addr: Multiaddr,
        reply: Option<oneshot::Sender<Result<(), MeshError>>>,
    ) {
        let peer = match addr.iter().last() {
            Some(Protocol::P2p(peer)) => Some(peer),
            _ => None,
        };
        let opts = match peer {
            Some(peer) => {
                if self.conns.contains_key(&peer) {
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(()));
                    }
                    return;
                }
                let mut plain = addr.clone();
                plain.pop();
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, plain.clone());
                DialOpts::peer_id(peer)
                    .addresses(vec![plain])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build()
            }
            None => DialOpts::unknown_peer_id().address(addr).build(),
        };
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                if let Some(reply) = reply {
                    if self.pending_dials.len() >= MAX_PENDING_DIALS {
                        let _ = reply.send(Err(MeshError::Dial("too many dials in flight".into())));
                    } else {
                        self.pending_dials.insert(id, reply);
                    }
                }
            }
            Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {
                if let Some(reply) = reply {
                    // Already dialling: report success optimistically; the
                    // connection events tell the rest.
                    let _ = reply.send(Ok(()));
                }
            }
            Err(e) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(MeshError::Dial(e.to_string())));
                }
            }
        }
    }

    // ----- publishing -----------------------------------------------------

    /// Queues a record for the next gossip message; a full message is sent
    /// at once, the rest by [`EventLoop::flush_gossip`].
    fn queue_gossip(&mut self, record: &Record) {
        let bytes = match codec::encode_record(record) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "not publishing an unencodable record");
                return;
            }
        };
        let size = bytes.len() + GOSSIP_ENTRY_OVERHEAD;
        if self.pending_gossip.len() >= MAX_GOSSIP_BATCH
            || self.pending_gossip_bytes + size > MAX_GOSSIP_BATCH_BYTES
        {
            self.flush_gossip();
        }
        self.pending_gossip.push(ByteBuf::from(bytes));
        self.pending_gossip_bytes += size;
    }

    /// Publishes the queued records as one gossip message.
    fn flush_gossip(&mut self) {
        if self.pending_gossip.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.pending_gossip);
        self.pending_gossip_bytes = 0;
        let message = match codec::encode_value(&batch) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a gossip message");
                return;
            }
        };
        match self
            .swarm
            .behaviour_mut()
            .gossip
            .publish(self.topic.clone(), message)
        {
            Ok(_) => {}
            Err(gossipsub::PublishError::Duplicate)
            | Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
            Err(e) => {
                tracing::debug!(error = %e, "gossip publish failed (anti-entropy will cover)")
            }
        }
    }

    fn queue_dht_put(&mut self, record: Record) {
        if self.dht_queue.len() >= MAX_DHT_PUT_QUEUE {
            tracing::debug!("DHT put queue full; anti-entropy will cover");
            return;
        }
        self.dht_queue.push_back(record);
    }

    fn pump_dht_puts(&mut self) {
        if self.dht_queue.is_empty() || self.dht_puts.len() >= MAX_DHT_PUTS_IN_FLIGHT {
            return;
        }
        // While the routing table holds no more hubs than the replication
        // factor, the closest hubs to any key are all of them: put to them
        // directly instead of running a closest-peers query per record (a
        // FIND_NODE round trip, and a scan of the routing table on both
        // sides, which profiles showed as the costliest part of a write).
        let kad = &mut self.swarm.behaviour_mut().kad;
        let known: usize = kad.kbuckets().map(|b| b.num_entries()).sum();
        if known == 0 {
            // Nobody to put to yet: keep the queue (bounded) until a hub
            // joins the routing table; `maintain` pumps again every period.
            return;
        }
        let direct: Option<Vec<PeerId>> = (known <= DHT_REPLICATION).then(|| {
            kad.kbuckets()
                .flat_map(|b| b.iter().map(|e| *e.node.key.preimage()).collect::<Vec<_>>())
                .collect()
        });
        while self.dht_puts.len() < MAX_DHT_PUTS_IN_FLIGHT {
            let Some(record) = self.dht_queue.pop_front() else {
                break;
            };
            let bytes = match codec::encode_record(&record) {
                Ok(b) => b,
                Err(_) => continue,
            };
            let key = RecordKey::new(&dht_key(&record.ns, &record.key));
            let Some(kad_record) = to_kad_record(key, bytes, self.store.clock().now_ms()) else {
                continue;
            };
            let kad = &mut self.swarm.behaviour_mut().kad;
            let put = match &direct {
                Some(peers) => {
                    Ok(kad.put_record_to(kad_record, peers.iter().copied(), Quorum::One))
                }
                None => kad.put_record(kad_record, Quorum::One),
            };
            match put {
                Ok(id) => {
                    self.dht_puts.insert(id);
                }
                Err(e) => tracing::debug!(error = %e, "DHT put refused locally"),
            }
        }
    }

    // ----- periodic work --------------------------------------------------

    fn maintain(&mut self) {
        // Redial known peers that are not connected (with backoff).
        let due = self
            .book
            .due(Instant::now(), |p| self.conns.contains_key(p));
        for (peer, addrs) in due {
            if !self.swarm.behaviour().gate.allows(&peer) {
                continue;
            }
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            let _ = self.swarm.dial(opts);
        }
        if let Err(e) = self.book.save_if_dirty() {
            tracing::warn!(error = %e, "cannot save the peer book");
        }
        // Re-put own records after a start, a page at a time.
        if let Some(after) = self.republish
            && self.dht_queue.len() < MAX_PAGE_RECORDS
        {
            let own = OriginId::new(self.local.to_bytes());
            match self.store.records_since(&own, after, 64) {
                Ok(page) => {
                    for r in page.records {
                        self.queue_dht_put(r);
                    }
                    self.republish = page.next_after;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read own records to re-put");
                    self.republish = None;
                }
            }
        }
        self.pump_dht_puts();
    }

    // ----- swarm events ---------------------------------------------------

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(e)) => self.on_gossip(e),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.on_kad(e),
            SwarmEvent::Behaviour(BehaviourEvent::Sync(e)) => self.on_sync(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => self.on_identify(e),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) if self.conns.contains_key(&peer) => {
                self.rtts.insert(peer, rtt);
            }
            SwarmEvent::Behaviour(_) => {}
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let (remote, dialer_is_me) = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => (address.clone(), true),
                    ConnectedPoint::Listener { send_back_addr, .. } => {
                        (send_back_addr.clone(), false)
                    }
                };
                if dialer_is_me {
                    let mut plain = remote.clone();
                    if matches!(plain.iter().last(), Some(Protocol::P2p(_))) {
                        plain.pop();
                    }
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, plain);
                }
                self.conns.entry(peer_id).or_default().push(Conn {
                    id: connection_id,
                    remote,
                    dialer_is_me,
                    established: Instant::now(),
                });
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(()));
                }
                if num_established.get() == 1 {
                    tracing::debug!(local = %self.local, peer = %peer_id, "peer joined");
                    self.sink.emit(MeshEvent::PeerJoined(peer_id));
                } else {
                    self.dedupe_connections(peer_id);
                }
                // Sync on every new connection, not only the first: a peer
                // that crashed and restarted reconnects while its dead
                // connection still looks open here (until the QUIC idle
                // timeout), and it may hold writes we never received.
                self.start_sync(peer_id);
                if !self.republish_started {
                    self.republish_started = true;
                    self.republish = Some(0);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.forget_connection(peer_id, connection_id);
                if num_established == 0 {
                    tracing::debug!(local = %self.local, peer = %peer_id, "peer left");
                    self.conns.remove(&peer_id);
                    self.rtts.remove(&peer_id);
                    self.listen_addrs.remove(&peer_id);
                    self.sessions.remove(&peer_id);
                    self.signals.forget(&peer_id);
                    self.sink.emit(MeshEvent::PeerLeft(peer_id));
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(MeshError::Dial(error.to_string())));
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::debug!(%address, "listening");
            }
            _ => {}
        }
    }

    /// Two connections to one peer: close all but one, chosen so that both
    /// ends keep the same one.
    ///
    /// - A peer dials us only while it holds no connection to us and dials
    ///   none (every dial by peer id is conditioned on that). So a new inbound
    ///   connection means the peer lost the others, unless one of them is our
    ///   own dial made within [`SIMULTANEOUS_DIAL_WINDOW`] (both sides dialled
    ///   at once). The peer restarted (its old connection is dead but not yet
    ///   timed out here) or its side timed out first: keep the new one, which
    ///   is the only one the peer holds.
    /// - Otherwise it is a simultaneous dial: keep the connections dialled by
    ///   the smaller PeerId (both ends agree on them), the first of them, so
    ///   a redundant second dial never breaks streams already open on the
    ///   first. Two inbound connections from different source addresses are
    ///   again a restarted peer: keep the newest then.
    fn dedupe_connections(&mut self, peer: PeerId) {
        let Some(conns) = self.conns.get(&peer) else {
            return;
        };
        let Some((newest, older)) = conns.split_last() else {
            return;
        };
        if older.is_empty() {
            return;
        }
        let keep = if !newest.dialer_is_me
            && older
                .iter()
                .all(|c| !c.dialer_is_me || c.established.elapsed() > SIMULTANEOUS_DIAL_WINDOW)
        {
            tracing::debug!(%peer, "peer reconnected while an old connection looked open; keeping the new one");
            newest.id
        } else {
            let want_mine = self.local < peer;
            let mut pool: Vec<&Conn> = conns
                .iter()
                .filter(|c| c.dialer_is_me == want_mine)
                .collect();
            if pool.is_empty() {
                pool = conns.iter().collect();
            }
            let Some(first) = pool.first().copied() else {
                return;
            };
            if first.dialer_is_me {
                first.id
            } else {
                pool.iter()
                    .rev()
                    .find(|c| c.remote != first.remote)
                    .unwrap_or(&first)
                    .id
            }
        };
        let close: Vec<ConnectionId> = conns
            .iter()
            .filter(|c| c.id != keep)
            .map(|c| c.id)
            .collect();
        for id in close {
            self.swarm.close_connection(id);
        }
    }

    fn on_identify(&mut self, event: identify::Event) {
        if let identify::Event::Received { peer_id, info, .. } = event {
            if info.protocol_version != self.names.identify {
                tracing::info!(peer = %peer_id, version = %info.protocol_version, "peer of another federation; disconnecting");
                let _ = self.swarm.disconnect_peer_id(peer_id);
                return;
            }
            let addrs: Vec<Multiaddr> = info
                .listen_addrs
                .into_iter()
                .take(crate::peers::MAX_ADDRS)
                .collect();
            for a in &addrs {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer_id, a.clone());
            }
            self.book
                .note(peer_id, addrs.clone(), self.store.clock().now_ms());
            self.listen_addrs.insert(peer_id, addrs);
        }
    }

    /// Counts invalid records against `peer`; past the limit it is
    /// disconnected and refused for a while.
    fn strike(&mut self, peer: PeerId, n: u32) {
        if peer == self.local || n == 0 {
            return;
        }
        let count = self.strikes.entry(peer).or_default();
        *count += n;
        if *count >= STRIKE_LIMIT {
            self.strikes.remove(&peer);
            tracing::warn!(%peer, "too many invalid records; banning the peer");
            self.swarm
                .behaviour_mut()
                .gate
                .ban(peer, Instant::now() + BAN_TIME);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        if self.strikes.len() > 4096 {
            self.strikes.clear();
        }
    }

    // ----- gossip ---------------------------------------------------------

    fn on_gossip(&mut self, event: gossipsub::Event) {
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = event
        else {
            return;
        };
        let acceptance = if message.topic != self.topic.hash() {
            MessageAcceptance::Ignore
        } else {
            let (records, invalid) = self.check_gossip(&message.data);
            self.pending_merge.extend(records);
            if invalid == 0 {
                MessageAcceptance::Accept
            } else {
                // Not forwarded: its valid records reach other hubs from
                // their origin's own publication or by anti-entropy.
                self.strike(propagation_source, invalid);
                MessageAcceptance::Reject
            }
        };
        self.swarm
            .behaviour_mut()
            .gossip
            .report_message_validation_result(&message_id, &propagation_source, acceptance);
    }

    /// The records of a gossip message to merge, and how many were invalid
    /// (a message that is not a batch of records counts as one). A record
    /// already held byte-for-byte (validated when stored) is skipped without
    /// a signature check; the rest are validated as one batch.
    fn check_gossip(&self, data: &[u8]) -> (Vec<Record>, u32) {
        let batch: Vec<ByteBuf> = match codec::decode_value(data, "gossip message") {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "malformed gossip message");
                return (Vec::new(), 1);
            }
        };
        if batch.is_empty() || batch.len() > MAX_GOSSIP_BATCH {
            tracing::debug!(
                records = batch.len(),
                "gossip message with a bad record count"
            );
            return (Vec::new(), 1);
        }
        screen_records(&self.store, &self.validator, &batch, None, "gossip message")
    }

    fn flush_merges(&mut self) {
        if self.pending_merge.is_empty() {
            return;
        }
        let records = std::mem::take(&mut self.pending_merge);
        merge_and_report(&self.store, &self.sink, records);
    }

    // ----- DHT ------------------------------------------------------------

    fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(record),
                        ..
                    },
            } => {
                // Usually gossip got here first: the exact record is held
                // (validated when stored), so it costs no signature check.
                if let Some((ns, key)) = split_dht_key(record.key.as_ref())
                    && held_exactly(&self.store, ns, key, &record.value)
                {
                    return;
                }
                match self
                    .validator
                    .validate_dht(record.key.as_ref(), &record.value)
                {
                    Ok(r) => self.pending_merge.push(r),
                    Err(e) => {
                        tracing::debug!(peer = %source, error = %e, "rejecting DHT put");
                        self.strike(source, 1);
                    }
                }
            }
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                QueryResult::GetRecord(Ok(GetRecordOk::FoundRecord(found))) => {
                    self.on_found_record(id, found);
                    if step.last {
                        self.finish_lookup(id);
                    }
                }
                QueryResult::GetRecord(_) => self.finish_lookup(id),
                QueryResult::GetClosestPeers(result) => {
                    if let Some((peer, reply)) = self.find_peers.remove(&id) {
                        let found = match result {
                            Ok(ok) => ok.peers,
                            Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                        };
                        let mut known = false;
                        for info in found.into_iter().filter(|i| i.peer_id == peer) {
                            for addr in info.addrs {
                                self.swarm.behaviour_mut().kad.add_address(&peer, addr);
                                known = true;
                            }
                        }
                        let _ = reply.send(known);
                    }
                }
                QueryResult::PutRecord(result) => {
                    self.dht_puts.remove(&id);
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "DHT put did not reach a quorum");
                    }
                    self.pump_dht_puts();
                }
                _ => {}
            },
            _ => {}
        }
    }

    fn on_found_record(&mut self, id: QueryId, found: kad::PeerRecord) {
        let Some((ns, key, _)) = self.lookups.get(&id) else {
            return;
        };
        let wanted = dht_key(ns, key);
        if found.record.key.as_ref() != wanted.as_slice() {
            return;
        }
        match self.validator.validate_dht(&wanted, &found.record.value) {
            Ok(record) => {
                merge_and_report(&self.store, &self.sink, vec![record]);
                if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                    q.finish();
                }
                self.finish_lookup(id);
            }
            Err(e) => {
                tracing::debug!(peer = ?found.peer, error = %e, "invalid DHT lookup result");
                if let Some(peer) = found.peer {
                    self.strike(peer, 1);
                }
            }
        }
    }

    fn finish_lookup(&mut self, id: QueryId) {
        if let Some((ns, key, reply)) = self.lookups.remove(&id) {
            let _ = reply.send(self.store.get(&ns, &key).map_err(MeshError::from));
        }
    }

    // ----- anti-entropy ---------------------------------------------------

    fn start_sync(&mut self, peer: PeerId) {
        if !self.conns.contains_key(&peer) {
            return;
        }
        if let Some(s) = self.sessions.get_mut(&peer) {
            s.again = true;
            return;
        }
        let mut marks = match self.store.watermarks() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read watermarks");
                return;
            }
        };
        marks.truncate(MAX_SYNC_ORIGINS);
        let id = self
            .swarm
            .behaviour_mut()
            .sync
            .send_request(&peer, SyncRequest::Watermarks(marks));
        self.sync_requests.insert(id, peer);
        self.sessions.insert(
            peer,
            SyncSession {
                busy: true,
                ..SyncSession::default()
            },
        );
    }

    fn on_sync(&mut self, event: request_response::Event<SyncRequest, SyncResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.on_sync_request(peer, request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if self.sync_requests.remove(&request_id).is_some() {
                        self.on_sync_response(peer, response);
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if self.sync_requests.remove(&request_id).is_some() {
                    tracing::debug!(%peer, %error, "sync request failed");
                    self.sessions.remove(&peer);
                    let retries = self.sync_retries.entry(peer).or_default();
                    if *retries < MAX_SYNC_RETRIES {
                        *retries += 1;
                        self.start_sync(peer);
                    }
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound sync request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_sync_request(
        &mut self,
        peer: PeerId,
        request: SyncRequest,
        channel: ResponseChannel<SyncResponse>,
    ) {
        match request {
            SyncRequest::Watermarks(theirs) => {
                let response = match behind(&self.store, theirs) {
                    Ok(list) => SyncResponse::Behind(list),
                    Err(e) => SyncResponse::Refused(e.to_string()),
                };
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .sync
                    .send_response(channel, response);
            }
            SyncRequest::Pull { origin, after } => {
                if self.jobs_in_flight >= MAX_JOBS {
                    tracing::debug!(%peer, "busy; refusing a sync pull");
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .sync
                        .send_response(channel, SyncResponse::Refused("busy".into()));
                    return;
                }
                self.jobs_in_flight += 1;
                let store = self.store.clone();
                let tx = self.jobs_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let response = build_page(&store, &origin, after);
                    let _ = tx.blocking_send(Job::PageBuilt { channel, response });
                });
            }
        }
    }

    fn on_sync_response(&mut self, peer: PeerId, response: SyncResponse) {
        match response {
            SyncResponse::Behind(list) => {
                if let Some(s) = self.sessions.get_mut(&peer) {
                    s.queue = list.into_iter().take(MAX_SYNC_ORIGINS).collect();
                    s.busy = false;
                }
                self.pull_next(peer);
            }
            SyncResponse::Page {
                records,
                next_after,
                watermark,
            } => {
                let Some(s) = self.sessions.get(&peer) else {
                    return;
                };
                let Some(origin) = s.current.as_ref().map(|c| c.origin.clone()) else {
                    return;
                };
                self.jobs_in_flight += 1;
                let store = self.store.clone();
                let validator = self.validator.clone();
                let sink = self.sink.clone();
                let tx = self.jobs_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let (applied, invalid) =
                        merge_page(&store, &validator, &sink, &origin, records);
                    let _ = tx.blocking_send(Job::PageMerged {
                        peer,
                        origin,
                        applied,
                        invalid,
                        next_after,
                        watermark,
                    });
                });
            }
            SyncResponse::Refused(reason) => {
                tracing::debug!(%peer, %reason, "peer refused a sync request");
                self.sessions.remove(&peer);
            }
        }
    }

    fn on_job(&mut self, job: Job) {
        match job {
            Job::PageBuilt { channel, response } => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .sync
                    .send_response(channel, response);
            }
            Job::PageMerged {
                peer,
                origin,
                applied,
                invalid,
                next_after,
                watermark,
            } => {
                if invalid > 0 {
                    self.strike(peer, invalid as u32);
                }
                let connected = self.conns.contains_key(&peer);
                let Some(s) = self.sessions.get_mut(&peer) else {
                    return;
                };
                let Some(cur) = s.current.as_mut() else {
                    return;
                };
                if cur.origin != origin {
                    return;
                }
                s.pulled += applied;
                cur.tainted |= invalid > 0;
                match next_after {
                    // A next page must make progress, or the peer is looping us.
                    Some(next) if next > cur.after && connected => {
                        cur.after = next;
                        let id = self.swarm.behaviour_mut().sync.send_request(
                            &peer,
                            SyncRequest::Pull {
                                origin,
                                after: next,
                            },
                        );
                        self.sync_requests.insert(id, peer);
                    }
                    _ => {
                        if !cur.tainted && next_after.is_none() {
                            // Every page read: we now hold what the peer held.
                            if let Err(e) = self.store.advance_watermark(&origin, watermark) {
                                tracing::warn!(error = %e, "cannot advance a watermark");
                            }
                        }
                        s.current = None;
                        s.busy = false;
                        self.pull_next(peer);
                    }
                }
            }
        }
    }

    fn pull_next(&mut self, peer: PeerId) {
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        if s.busy {
            return;
        }
        match s.queue.pop_front() {
            Some((origin, _theirs)) => {
                let after = self.store.watermark(&origin).unwrap_or(0);
                s.current = Some(Pulling {
                    origin: origin.clone(),
                    after,
                    tainted: false,
                });
                s.busy = true;
                let id = self
                    .swarm
                    .behaviour_mut()
                    .sync
                    .send_request(&peer, SyncRequest::Pull { origin, after });
                self.sync_requests.insert(id, peer);
            }
            None => {
                let again = s.again;
                let pulled = s.pulled;
                self.sessions.remove(&peer);
                self.sync_retries.remove(&peer);
                tracing::debug!(local = %self.local, %peer, pulled, "sync finished");
                self.sink.emit(MeshEvent::SyncFinished { peer, pulled });
                if again {
                    self.start_sync(peer);
                }
            }
        }
    }
}

/// Merges validated records and reports each applied one.
fn merge_and_report(store: &Store, sink: &EventSink, records: Vec<Record>) -> usize {
    match store.merge(records.clone()) {
        Ok(report) => {
            let mut applied = 0;
            for (outcome, record) in report.outcomes.into_iter().zip(records) {
                if outcome == MergeOutcome::Applied {
                    applied += 1;
                    sink.emit(MeshEvent::RecordAccepted(record));
                }
            }
            applied
        }
        Err(e) => {
            tracing::warn!(error = %e, "merging inbound records failed");
            0
        }
    }
}

/// The origins we hold more of than the requester: ours above theirs, or
/// records beyond their watermark even if our own watermark is not higher.
fn behind(
    store: &Store,
    theirs: Vec<(OriginId, u64)>,
) -> hubmesh_store::Result<Vec<(OriginId, u64)>> {
    let theirs: HashMap<OriginId, u64> = theirs.into_iter().collect();
    let mut out = Vec::new();
    for (origin, mine) in store.watermarks()? {
        let their = theirs.get(&origin).copied().unwrap_or(0);
        if mine > their || !store.records_since(&origin, their, 1)?.records.is_empty() {
            out.push((origin, mine));
            if out.len() == MAX_SYNC_ORIGINS {
                break;
            }
        }
    }
    Ok(out)
}

/// One page of `origin`'s records after `after`, within the page limits.
fn build_page(store: &Store, origin: &OriginId, after: u64) -> SyncResponse {
    let page = match store.records_since(origin, after, MAX_PAGE_RECORDS) {
        Ok(p) => p,
        Err(e) => return SyncResponse::Refused(e.to_string()),
    };
    let mut records = Vec::with_capacity(page.records.len());
    let mut bytes = 0;
    let mut next_after = page.next_after;
    let mut last_seq = None;
    for r in &page.records {
        let Ok(enc) = codec::encode_record(r) else {
            continue;
        };
        if bytes + enc.len() > MAX_PAGE_BYTES
            && let Some(seq) = last_seq
        {
            // Byte budget spent: resume after the last record sent.
            next_after = Some(seq);
            break;
        }
        bytes += enc.len();
        last_seq = Some(r.seq);
        records.push(ByteBuf::from(enc));
    }
    SyncResponse::Page {
        records,
        next_after,
        watermark: page.watermark,
    }
}

/// The records of a gossip message or sync page that are new and valid, and
/// how many were invalid (undecodable, of another origin than `origin` when
/// one is required, or failing validation). A record already held
/// byte-for-byte (usually the other path got it first) was validated when
/// stored: it is skipped without a signature check. The rest are validated
/// together (`Validator::validate_decoded_many`).
fn screen_records(
    store: &Store,
    validator: &Validator,
    encoded: &[ByteBuf],
    origin: Option<&OriginId>,
    what: &'static str,
) -> (Vec<Record>, u32) {
    let mut invalid = 0;
    let mut fresh = Vec::with_capacity(encoded.len());
    for bytes in encoded {
        let record = match codec::decode_record(bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "malformed record in a {what}");
                invalid += 1;
                continue;
            }
        };
        if origin.is_some_and(|o| record.origin != *o) {
            invalid += 1;
            continue;
        }
        if held_exactly(store, &record.ns, &record.key, bytes) {
            continue;
        }
        fresh.push(record);
    }
    let verdicts = validator.validate_decoded_many(&fresh);
    let mut valid = Vec::with_capacity(fresh.len());
    for (record, verdict) in fresh.into_iter().zip(verdicts) {
        match verdict {
            Ok(_) => valid.push(record),
            Err(e) => {
                tracing::debug!(error = %e, key = %record.key, "invalid record in a {what}");
                invalid += 1;
            }
        }
    }
    (valid, invalid)
}

/// Validates and merges one pulled page; returns (applied, invalid).
fn merge_page(
    store: &Store,
    validator: &Validator,
    sink: &EventSink,
    origin: &OriginId,
    records: Vec<ByteBuf>,
) -> (usize, usize) {
    let (valid, invalid) = screen_records(store, validator, &records, Some(origin), "sync page");
    let invalid = invalid as usize;
    let applied = if valid.is_empty() {
        0
    } else {
        merge_and_report(store, sink, valid)
    };
    (applied, invalid)
}
