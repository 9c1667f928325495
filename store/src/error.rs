//! The store's one error type.

use std::fmt;

/// Everything that can go wrong in the store. Bad bytes on disk or on the wire
/// always surface as one of these, never as a panic.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage engine failed (I/O error, engine corruption report).
    #[error("storage backend: {0}")]
    Backend(String),
    /// A filesystem operation of the store itself failed (data dir, key file).
    #[error("store I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A stored or received value is not a valid encoding.
    #[error("corrupt value ({context}): {reason}")]
    Corrupt {
        /// Where the value came from (tree and key, or "wire").
        context: String,
        /// What the decoder reported.
        reason: String,
    },
    /// A value carries a format version this build does not know.
    #[error("unknown format version {found} (this build reads up to {supported})")]
    UnknownFormat {
        /// The version byte found.
        found: u8,
        /// The newest version this build reads.
        supported: u8,
    },
    /// A record (or one of its parts) exceeds a size limit.
    #[error("{what} too large: {size} bytes, limit {max}")]
    TooLarge {
        /// Which part is too large.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A record field breaks a rule of the record model.
    #[error("invalid record: {0}")]
    Invalid(InvalidRecord),
    /// Waiting for durability failed: the flush to disk reported an error.
    #[error("flush to disk failed: {0}")]
    Flush(String),
    /// A sealed value did not authenticate under the hub's store key.
    #[error("sealed value in {tree} failed authentication")]
    Unseal {
        /// The local tree holding it.
        tree: String,
    },
    /// The key file in the data dir is not a valid store key.
    #[error("store key file {path}: {reason}")]
    KeyFile {
        /// Its path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why a record is refused by the record model's shape rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidRecord {
    /// Namespace empty, too long or outside `[a-z0-9_-]`.
    Namespace(String),
    /// Key empty, too long, or containing a NUL byte.
    Key,
    /// Origin id empty or too long.
    Origin,
    /// An index term is empty, too long or contains a NUL byte, or there are too many.
    Terms,
    /// Sequence number zero (sequences start at 1).
    Seq,
}

impl fmt::Display for InvalidRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidRecord::Namespace(ns) => {
                write!(f, "namespace {ns:?} must be 1-32 chars of [a-z0-9_-]")
            }
            InvalidRecord::Key => f.write_str("key must be 1-512 bytes without NUL"),
            InvalidRecord::Origin => f.write_str("origin id must be 1-64 bytes"),
            InvalidRecord::Terms => {
                f.write_str("at most 32 index terms of 1-128 bytes without NUL")
            }
            InvalidRecord::Seq => f.write_str("sequence numbers start at 1"),
        }
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) => StoreError::Io(io),
            other => StoreError::Backend(other.to_string()),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
