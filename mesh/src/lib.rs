//! `hubmesh-mesh` owns the hub's libp2p layer (architecture §4-§6): the QUIC
//! swarm, identify, Kademlia over a `hubmesh-store`-backed record store,
//! gossipsub on the federation topic, anti-entropy sync, signal relay, ping,
//! connection limits and the membership policy. It knows nothing of HTTP.
//!
//! A cloneable [`Mesh`] handle sends commands to an event loop task that
//! alone owns the `Swarm`, and a bounded stream of [`MeshEvent`]s reports
//! what arrived. Every inbound record, whatever its path, goes through one
//! [`Validator`]. The wire protocols are specified in `specs/mesh.md`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), hubmesh_mesh::MeshError> {
//! use hubmesh_mesh::{Mesh, MeshConfig, MeshEvent};
//! use hubmesh_store::{Draft, Store};
//!
//! let config = MeshConfig::new("acme", "/var/lib/hubmesh/mesh");
//! let (mesh, mut events) = Mesh::start(config, Store::memory()).await?;
//! mesh.write(vec![Draft {
//!     ns: "server".into(),
//!     key: "acme/1".into(),
//!     body: vec![0xa0],
//!     expires_ms: 1_900_000_000_000,
//!     deleted: false,
//!     terms: vec![],
//! }])
//! .await?;
//! while let Some(event) = events.recv().await {
//!     if let MeshEvent::RecordAccepted(record) = event {
//!         println!("{}/{} from the federation", record.ns, record.key);
//!     }
//! }
//! mesh.shutdown().await;
//! # Ok(()) }
//! ```

mod behaviour;
mod config;
mod error;
mod event_loop;
mod events;
mod gate;
mod handle;
mod identity;
mod kad_store;
mod peers;
pub mod protocol;
mod signal;
mod validate;

pub use config::{Membership, MeshConfig, RecordValidator};
pub use error::{MeshError, SignalError, ValidationError};
pub use event_loop::PeerInfo;
pub use events::MeshEvent;
pub use handle::Mesh;
pub use identity::{HubSigner, load_or_create_identity, verify_record};
pub use libp2p::identity::Keypair;
pub use libp2p::{Multiaddr, PeerId};
pub use protocol::MAX_SIGNAL_BYTES;
pub use validate::{MAX_CLOCK_SKEW, Validator, dht_key};
