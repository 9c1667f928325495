//! The mesh's error types: [`MeshError`] for the handle's operations,
//! [`SignalError`] for signal relay, and [`ValidationError`] for why an inbound
//! record was refused.

use hubmesh_store::StoreError;

/// What can go wrong starting or driving the mesh.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The configuration is unusable (federation name, listen address…).
    #[error("invalid mesh configuration: {0}")]
    Config(String),
    /// The identity key file could not be read, parsed or written.
    #[error("identity key {path}: {reason}")]
    Identity {
        /// The key file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A filesystem operation on the data dir failed.
    #[error("mesh I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The store refused or failed an operation.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The transport could not listen on an address.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: String,
        /// The transport's reason.
        reason: String,
    },
    /// A dial failed or was refused by policy.
    #[error("dial failed: {0}")]
    Dial(String),
    /// The event loop has stopped (after [`crate::Mesh::shutdown`] or a fatal error).
    #[error("the mesh event loop has stopped")]
    Closed,
    /// A DHT query failed for a reason other than "not found".
    #[error("DHT query failed: {0}")]
    Dht(String),
}

/// Why a signal could not be handed to the target hub.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    /// No connection to the target hub could be established or kept (unknown
    /// hub, hub down, partitioned, blocked, or the stream broke mid-write).
    #[error("hub {0} is unreachable")]
    Unreachable(String),
    /// The payload exceeds [`crate::MAX_SIGNAL_BYTES`].
    #[error("signal payload of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The payload's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The mesh has been shut down.
    #[error("the mesh has been shut down")]
    Closed,
}

/// Why an inbound record was refused by [`crate::Validator`]. Refused records
/// are dropped, never stored, and count against the peer that sent them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// The bytes are not a record of this format, or the record breaks the
    /// store's shape and size rules.
    #[error("malformed record: {0}")]
    Malformed(String),
    /// The origin is not the PeerId of an ed25519 key (identity multihash).
    #[error("origin is not an ed25519 peer id")]
    Origin,
    /// The signature does not verify under the origin's key.
    #[error("bad signature")]
    Signature,
    /// The origin is not a member of the federation (allowlist policy).
    #[error("origin {0} is not a federation member")]
    NotMember(String),
    /// The record has already expired.
    #[error("record expired at {expires_ms} (now {now_ms})")]
    Expired {
        /// The record's expiry.
        expires_ms: u64,
        /// The validator's clock.
        now_ms: u64,
    },
    /// The record expires further ahead than the federation allows.
    #[error("record expires too far ahead ({expires_ms}, limit {limit_ms})")]
    ExpiresTooFar {
        /// The record's expiry.
        expires_ms: u64,
        /// The latest acceptable expiry.
        limit_ms: u64,
    },
    /// The record's version clock is too far in the future.
    #[error("record version {wall_ms} is in the future (limit {limit_ms})")]
    FromTheFuture {
        /// The record's version wall clock.
        wall_ms: u64,
        /// The latest acceptable wall clock.
        limit_ms: u64,
    },
    /// A DHT record's key does not name the record it carries.
    #[error("DHT key does not match the record's namespace and key")]
    KeyMismatch,
    /// The node's namespace-specific validator refused it.
    #[error("refused by namespace validator: {0}")]
    Refused(String),
}
