//! Mesh configuration: federation, data dir, addresses, membership policy and
//! the knobs of anti-entropy, validation and event buffering.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hubmesh_store::Record;
use libp2p::{Multiaddr, PeerId};

/// A namespace-specific check the node runs on every inbound record after the
/// generic ones (signature, membership, size, expiry). `Err` carries the reason.
pub type RecordValidator = Arc<dyn Fn(&Record) -> Result<(), String> + Send + Sync>;

/// Who may join the federation.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Membership {
    /// Any hub that speaks the federation's protocols.
    #[default]
    Open,
    /// Only the listed hubs (this hub is always a member of its own federation):
    /// connections from or to other peers are refused when established, and
    /// records they originate are rejected.
    Allowlist(BTreeSet<PeerId>),
}

impl Membership {
    /// Whether `peer` may connect and originate records.
    pub fn admits(&self, peer: &PeerId) -> bool {
        match self {
            Membership::Open => true,
            Membership::Allowlist(set) => set.contains(peer),
        }
    }
}

/// How to start a [`crate::Mesh`]. Build with [`MeshConfig::new`] and adjust fields.
#[derive(Clone)]
pub struct MeshConfig {
    /// Federation name, 1-64 chars of `[a-z0-9._-]`. Topic and protocol names
    /// derive from it (`specs/mesh.md`), so federations never mix.
    pub federation: String,
    /// Holds `identity.key` (the hub's ed25519 keypair, created if absent) and
    /// `peers.cbor` (peers met, re-dialled after a restart).
    pub data_dir: PathBuf,
    /// Addresses to listen on. Default: `/ip4/127.0.0.1/udp/0/quic-v1`.
    pub listen: Vec<Multiaddr>,
    /// Hubs to dial at start, each ending in `/p2p/<peer id>`. Default: none.
    pub bootstrap: Vec<Multiaddr>,
    /// Membership policy. Default: open.
    pub membership: Membership,
    /// Period of anti-entropy with every connected peer (it also runs on every
    /// new connection). Default: 30 s.
    pub sync_interval: Duration,
    /// Namespace-specific validation, run after the generic checks. Default: none.
    pub validator: Option<RecordValidator>,
    /// Capacity of the [`crate::MeshEvent`] channel. Default: 1024.
    pub event_buffer: usize,
    /// Latest acceptable record expiry, relative to now. Default: 30 days.
    pub max_expiry_ahead: Duration,
    /// Most established connections (all peers together). Default: 256.
    pub max_connections: u32,
}

impl MeshConfig {
    /// A config with sensible defaults: open membership, listening on an
    /// ephemeral loopback QUIC port, sync every 30 s.
    pub fn new(federation: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        MeshConfig {
            federation: federation.into(),
            data_dir: data_dir.into(),
            listen: vec![
                "/ip4/127.0.0.1/udp/0/quic-v1"
                    .parse()
                    .expect("a constant, valid multiaddr"),
            ],
            bootstrap: Vec::new(),
            membership: Membership::Open,
            sync_interval: Duration::from_secs(30),
            validator: None,
            event_buffer: 1024,
            max_expiry_ahead: Duration::from_secs(30 * 24 * 3600),
            max_connections: 256,
        }
    }
}

impl fmt::Debug for MeshConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshConfig")
            .field("federation", &self.federation)
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("bootstrap", &self.bootstrap)
            .field("membership", &self.membership)
            .field("sync_interval", &self.sync_interval)
            .field("validator", &self.validator.as_ref().map(|_| "custom"))
            .field("event_buffer", &self.event_buffer)
            .field("max_expiry_ahead", &self.max_expiry_ahead)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// Checks a federation name: 1-64 chars of `[a-z0-9._-]`.
pub(crate) fn check_federation(name: &str) -> Result<(), crate::MeshError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(crate::MeshError::Config(format!(
            "federation name {name:?} must be 1-64 chars of [a-z0-9._-]"
        )))
    }
}
