//! `hubmesh-store` owns the hub's embedded registry: the replicated [`Record`]
//! (architecture §3), its last-writer-wins merge, expiry, secondary indexes
//! (key prefix, declared terms), anti-entropy bookkeeping (per-origin
//! watermarks and pages of an origin's records), durable group-committed
//! writes, and local-only typed trees (sealed at rest for secrets).
//!
//! It knows nothing of libp2p or HTTP and does not verify signatures (the mesh
//! does); it keeps them so a record is re-served byte-exact. sled is the
//! on-disk engine and an ordered map the in-memory one, both behind this
//! crate's own API. See `specs/store.md` for the on-disk format and what an
//! acknowledged write survives.
//!
//! ```
//! use hubmesh_store::{Store, codec};
//! let store = Store::memory();
//! assert!(store.get("server", "none").unwrap().is_none());
//! assert_eq!(codec::FORMAT_VERSION, 1);
//! ```

pub mod codec;
mod commit;
mod error;
mod index;
mod kv;
mod local;
mod record;
mod registry;
mod stamps;

pub use commit::DurableTicket;
pub use error::{InvalidRecord, Result, StoreError};
pub use local::{LocalTree, MAX_LOCAL_KEY_BYTES, MAX_LOCAL_VALUE_BYTES, SealedTree, write_private};
pub use record::{
    Draft, MAX_BODY_BYTES, MAX_KEY_BYTES, MAX_NS_BYTES, MAX_ORIGIN_BYTES, MAX_RECORD_BYTES,
    MAX_SIG_BYTES, MAX_TERM_BYTES, MAX_TERMS, OriginId, Record, Signer, Version,
};
pub use registry::{Clock, MergeOutcome, MergeReport, Store, StoreConfig, SyncPage};
