//! The composed `NetworkBehaviour` and the swarm built around it: QUIC,
//! the connection gate, connection limits, identify, ping, Kademlia,
//! gossipsub, the sync request-response protocol and the signal streams.

use std::num::NonZeroUsize;
use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{Swarm, connection_limits, gossipsub, identify, kad, ping};
use sha2::{Digest, Sha256};

use crate::error::MeshError;
use crate::gate::Gate;
use crate::kad_store::KadStore;
use crate::protocol::{MAX_GOSSIP_BYTES, MAX_KAD_PACKET_BYTES, Names, SyncCodec};

/// Everything the hub's swarm runs. The gate comes first so that a refused
/// peer is turned away before any other behaviour sets up a handler.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) gate: Gate,
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) kad: kad::Behaviour<KadStore>,
    pub(crate) gossip: gossipsub::Behaviour,
    pub(crate) sync: request_response::Behaviour<SyncCodec>,
    pub(crate) stream: libp2p_stream::Behaviour,
}

/// How long a sync request may take end to end.
pub(crate) const SYNC_REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// The gossipsub configuration, tuned for a federation of a few to a few tens
/// of hubs on low-latency links.
fn gossip_config(names: &Names) -> Result<gossipsub::Config, MeshError> {
    gossipsub::ConfigBuilder::default()
        // Federation-scoped protocol ids: hubs of another federation never
        // even exchange gossip with us.
        .protocol_id_prefix(names.gossip_prefix.clone())
        // Records carry their own hub signature. Gossipsub's per-message
        // signatures would be a second ed25519 check per copy (Strict mode
        // even checks duplicates before dropping them: at 20 hubs that alone
        // saturated two cores), so messages are anonymous and ...
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        // ... identified by their content, so duplicates are dropped by id
        // before any signature work, and the same record republished later is
        // recognised as the same message.
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::from(&Sha256::digest(&m.data)[..20])
        })
        // The event loop validates each unique record (signature, membership,
        // expiry…) and reports Accept/Reject; only accepted records are
        // forwarded and rejections count against the sending peer.
        .validate_messages()
        // The first heartbeat builds the mesh: 5 s by default, which would
        // leave a freshly started hub without mesh peers for seconds. 100 ms
        // gets it into the mesh as soon as its connections are up.
        .heartbeat_initial_delay(Duration::from_millis(100))
        // A 500 ms heartbeat (default 1 s) repairs the mesh quickly after a
        // hub joins, leaves or a partition heals; at tens of peers the extra
        // control traffic is negligible.
        .heartbeat_interval(Duration::from_millis(500))
        // Mesh degree sized for tens of hubs. The origin floods its writes to
        // every subscribed peer (below), so the mesh only repairs what the
        // flood missed; each mesh link forwards a copy that is usually a
        // duplicate. D = 4 (default 6) keeps any hub within three hops of any
        // other at 30 hubs while cutting those duplicate copies by a third
        // (measured: p99 write-to-held-by-all at 10 hubs 12 ms vs 13-17 ms
        // with D = 6). D_low = 3 and D_high = 8 leave room for churn.
        .mesh_n(4)
        .mesh_n_low(3)
        .mesh_n_high(8)
        .mesh_outbound_min(1)
        // Gossip IHAVE to 6 non-mesh peers per heartbeat: with tens of hubs
        // that reaches most of them, so a dropped copy is recovered within
        // one heartbeat.
        .gossip_lazy(6)
        // The origin floods its own writes to every subscribed peer, not only
        // its mesh: at this scale that is one hop to everyone (the write
        // latency target), and mesh forwarding plus IHAVE gossip cover the
        // peers the flood missed.
        .flood_publish(true)
        // Remember message ids for 2 minutes so late duplicates are dropped.
        .duplicate_cache_time(Duration::from_secs(120))
        // One record per message, bounded by the record size limit.
        .max_transmit_size(MAX_GOSSIP_BYTES)
        .build()
        .map_err(|e| MeshError::Config(format!("gossipsub: {e}")))
}

/// Kademlia's replication factor: how many hubs hold each DHT record.
pub(crate) const DHT_REPLICATION: usize = 4;

fn kad_config(names: &Names) -> kad::Config {
    let mut cfg = kad::Config::new(names.kad.clone());
    cfg.set_record_filtering(kad::StoreInserts::FilterBoth)
        // Anti-entropy replicates and own records are re-put after a restart:
        // Kademlia's own jobs would load every record into memory each period.
        .set_replication_interval(None)
        .set_publication_interval(None)
        .set_provider_publication_interval(None)
        .set_record_ttl(None)
        .set_max_packet_size(MAX_KAD_PACKET_BYTES)
        .set_query_timeout(Duration::from_secs(10))
        // Gossip and anti-entropy already give every hub every record; the
        // DHT copy serves lookups by hubs that missed both, so a few replicas
        // suffice and each write costs only a handful of extra puts.
        .set_replication_factor(NonZeroUsize::new(DHT_REPLICATION).expect("DHT_REPLICATION > 0"))
        .set_caching(kad::Caching::Disabled);
    cfg
}

/// Builds the swarm (not yet listening).
pub(crate) fn build_swarm(
    keypair: Keypair,
    names: &Names,
    gate: Gate,
    store: KadStore,
    max_connections: u32,
) -> Result<Swarm<Behaviour>, MeshError> {
    let gossip = gossip_config(names)?;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic()
        .with_behaviour(|key| {
            let local = key.public().to_peer_id();
            let mut kad = kad::Behaviour::with_config(local, store, kad_config(names));
            // Hubs are servers: answer DHT queries even before an external
            // address is confirmed (loopback and LAN deployments never get one).
            kad.set_mode(Some(kad::Mode::Server));
            let gossip =
                gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, gossip)
                    .map_err(|e| MeshError::Config(format!("gossipsub: {e}")))?;
            Ok(Behaviour {
                gate,
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_established(Some(max_connections))
                        // Two: a simultaneous dial briefly yields a pair, the
                        // event loop then closes one (see `dedupe_connections`).
                        .with_max_established_per_peer(Some(2))
                        .with_max_pending_incoming(Some(64))
                        .with_max_pending_outgoing(Some(64)),
                ),
                identify: identify::Behaviour::new(
                    identify::Config::new(names.identify.clone(), key.public())
                        .with_agent_version(format!("hubmesh/{}", env!("CARGO_PKG_VERSION")))
                        .with_push_listen_addr_updates(true),
                ),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(15)),
                ),
                kad,
                gossip,
                sync: request_response::Behaviour::with_codec(
                    SyncCodec,
                    [(names.sync.clone(), ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(SYNC_REQUEST_TIMEOUT)
                        .with_max_concurrent_streams(32),
                ),
                stream: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| MeshError::Config(format!("behaviour: {e}")))?
        // Hub-to-hub connections are long-lived; gossipsub keeps them busy.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build();
    Ok(swarm)
}
