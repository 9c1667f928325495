//! `hubmesh-testnet` owns running a federation on one machine: N hubs on
//! loopback as real `hubmesh run` processes or in-process hubs ([`Testnet`]),
//! fault injection (stop, `kill -9`, restart, partition, heal), the exact
//! convergence check, the `hubmesh testnet up` orchestration ([`up`]), the
//! chaos scenarios ([`chaos`]) and the benchmark scenarios with their report
//! ([`bench`]). Normative description: `specs/testnet.md`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), hubmesh_testnet::TestnetError> {
//! use std::time::Duration;
//! use hubmesh_testnet::{Options, Testnet};
//! let opts = Options::processes("target/debug/hubmesh", "/tmp/testnet");
//! let mut net = Testnet::start(3, opts).await?;
//! net.partition(&[vec![0], vec![1, 2]]).await?;
//! net.heal().await?;
//! net.wait_converged(Duration::from_secs(30)).await?;
//! net.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod bench;
pub mod chaos;
pub mod client;
pub mod error;
pub mod net;
pub mod process;
pub mod up;

pub use client::{HubClient, Registration, RegistryState, ServerEntry};
pub use error::TestnetError;
pub use net::{MAX_HUBS, Mode, Options, Testnet};
pub use process::{HubInfo, PARENT_PID_VAR, exit_with_parent, rss_bytes};

/// The Discovery cluster every testnet hub accepts registrations for.
pub const CLUSTER: &str = "testnet";

/// Its cluster secret (a testnet is loopback-only; this is not a secret).
pub const CLUSTER_SECRET: &str = "testnet-secret";
