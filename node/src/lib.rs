//! `hubmesh-node` owns the hub daemon: configuration ([`config`]), the Axum
//! facade ([`facade`]) with one module per API family ([`discovery`]; the
//! operator API in [`admin`]), authentication ([`auth`]), per-IP rate limits
//! ([`limits`]), TLS ([`tls`]), metrics ([`metrics`]), and [`Hub`], which
//! composes `hubmesh-store` and `hubmesh-mesh`: a local write is validated,
//! signed, stored durably, acknowledged, then published; records accepted
//! from the mesh land in the shared store, where reads see them.
//!
//! ```no_run
//! # async fn demo() -> Result<(), hubmesh_node::NodeError> {
//! use hubmesh_node::{Config, Hub};
//! let mut config = Config::default();
//! config.http = "127.0.0.1:0".parse().unwrap();
//! config.mesh_listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
//! let hub = Hub::spawn(config).await?;
//! println!("{}", hub.ready_line());
//! hub.shutdown().await;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod auth;
pub mod config;
pub mod discovery;
pub mod error;
pub mod facade;
pub mod federation;
pub mod hub;
mod jwt_keys;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod records;
pub mod sealed;
pub mod tls;

pub use config::{Config, RunArgs};
pub use error::{ApiError, NodeError};
pub use hub::Hub;

/// Wall-clock milliseconds since the Unix epoch (0 for a clock set before
/// it): the one "now" of record expiries, timestamps and token checks.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Installs the global tracing subscriber on stderr (stdout is reserved for
/// the `hubmesh ready` line): `RUST_LOG` filters (default `info`), text or
/// JSON lines. Safe to call twice (the second call does nothing).
pub fn init_tracing(format: config::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        config::LogFormat::Json => builder.json().try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
}
