//! [`TestnetError`]: what can go wrong starting, driving or measuring a testnet.

use std::time::Duration;

/// An error of the testnet library.
#[derive(Debug, thiserror::Error)]
pub enum TestnetError {
    /// A filesystem or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A hub did not start or misbehaved.
    #[error("{name}: {message}")]
    Hub {
        /// The hub's name (`hub-0` …).
        name: String,
        /// What went wrong.
        message: String,
    },
    /// An HTTP request did not complete.
    #[error("{url}: {source}")]
    Http {
        /// The URL.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// A hub answered with an unexpected status.
    #[error("{url} answered {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
        /// The answer body (truncated).
        body: String,
    },
    /// A wait ran past its deadline.
    #[error("timed out after {after:?}: {what}")]
    Timeout {
        /// What was awaited, and the last state seen.
        what: String,
        /// The deadline.
        after: Duration,
    },
    /// A caller passed something unusable.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The operation needs real processes (e.g. `kill -9`).
    #[error("{0} needs process mode")]
    NeedsProcesses(&'static str),
    /// An in-process hub failed.
    #[error(transparent)]
    Node(#[from] hubmesh_node::NodeError),
    /// Sending a signal or setting the parent-death signal failed.
    #[error("signal: {0}")]
    Signal(#[from] nix::errno::Errno),
}

impl TestnetError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        TestnetError::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn hub(name: &str, message: impl Into<String>) -> Self {
        TestnetError::Hub {
            name: name.to_owned(),
            message: message.into(),
        }
    }
}
