//! Hub configuration: the [`RunArgs`] flags (each also a `HUBMESH_*` env var),
//! the TOML [`FileConfig`], and the resolved [`Config`]. Precedence is
//! flag > env > file > default; [`Config::default`] is a working local dev hub.
//! Secrets (admin token, cluster secrets) come from env or files, never only
//! from the config file. Every option and its default is listed in
//! `specs/config.md`; [`CONFIG_TEMPLATE`] is what `hubmesh init` writes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hubmesh_mesh::{Multiaddr, PeerId};
use serde::Deserialize;

use crate::error::NodeError;

/// Default facade address.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8080";
/// Default mesh (QUIC) listen address: UDP 4001, the customary libp2p port.
pub const DEFAULT_MESH: &str = "/ip4/127.0.0.1/udp/4001/quic-v1";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./hubmesh-data";
/// Default federation name.
pub const DEFAULT_FEDERATION: &str = "hubmesh-dev";

/// Flags of `hubmesh run`. Every flag is also read from the `HUBMESH_*`
/// variable named beside it; unset values fall back to the config file, then
/// to the defaults of [`Config::default`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// TOML config file.
    #[arg(long, env = "HUBMESH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory (store, identity, TLS material, admin token). Default ./hubmesh-data.
    #[arg(long, env = "HUBMESH_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Facade address. Default 127.0.0.1:8080.
    #[arg(long, env = "HUBMESH_HTTP", value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// Mesh QUIC listen multiaddr (repeatable). Default /ip4/127.0.0.1/udp/4001/quic-v1.
    #[arg(
        long,
        env = "HUBMESH_MESH",
        value_name = "MULTIADDR",
        value_delimiter = ','
    )]
    pub mesh: Vec<Multiaddr>,
    /// Hub to dial at start, ending in /p2p/PEERID (repeatable).
    #[arg(
        long,
        env = "HUBMESH_BOOTSTRAP",
        value_name = "MULTIADDR",
        value_delimiter = ','
    )]
    pub bootstrap: Vec<Multiaddr>,
    /// Federation name ([a-z0-9._-], 1-64). Default hubmesh-dev.
    #[arg(long, env = "HUBMESH_FEDERATION", value_name = "NAME")]
    pub federation: Option<String>,
    /// Allowlist membership: only these hubs (PeerIds) may join. Default: open.
    #[arg(
        long,
        env = "HUBMESH_ALLOWLIST",
        value_name = "PEERID",
        value_delimiter = ','
    )]
    pub allowlist: Vec<PeerId>,
    /// Facade TLS: none | self-signed | files (acme is reserved). Default none.
    #[arg(long, env = "HUBMESH_TLS", value_name = "MODE")]
    pub tls: Option<String>,
    /// PEM certificate chain for --tls files.
    #[arg(long, env = "HUBMESH_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls files.
    #[arg(long, env = "HUBMESH_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// File holding the admin token (else HUBMESH_ADMIN_TOKEN, else DATA_DIR/admin.token, generated).
    #[arg(long, env = "HUBMESH_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Per-IP rate limits: on | off. Default on.
    #[arg(long, env = "HUBMESH_RATE_LIMITS", value_name = "on|off")]
    pub rate_limits: Option<String>,
    /// Reverse proxy whose X-Forwarded-For is trusted (repeatable).
    #[arg(
        long,
        env = "HUBMESH_TRUSTED_PROXIES",
        value_name = "IP",
        value_delimiter = ','
    )]
    pub trusted_proxy: Vec<IpAddr>,
    /// Allowed CORS origin (repeatable, `*` for any). Default: none (CORS off).
    #[arg(
        long,
        env = "HUBMESH_CORS_ORIGINS",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    pub cors_origin: Vec<String>,
    /// Log format on stderr: text | json. Default text.
    #[arg(long, env = "HUBMESH_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Discovery: seconds without heartbeat before a server is inactive. Default 300.
    #[arg(
        long,
        env = "HUBMESH_DISCOVERY_INACTIVE_AFTER_SECS",
        value_name = "SECS"
    )]
    pub discovery_inactive_after_secs: Option<u64>,
    /// Discovery: seconds without heartbeat before a registration is deleted. Default 86400.
    #[arg(long, env = "HUBMESH_DISCOVERY_GONE_AFTER_SECS", value_name = "SECS")]
    pub discovery_gone_after_secs: Option<u64>,
    /// Anti-entropy period with every peer, seconds. Default 30.
    #[arg(long, env = "HUBMESH_SYNC_INTERVAL_SECS", value_name = "SECS")]
    pub sync_interval_secs: Option<u64>,
    /// Dev mode: every API family on, open self-registration on (unless set explicitly).
    #[arg(long, env = "HUBMESH_DEV", value_name = "on|off", num_args = 0..=1, default_missing_value = "on")]
    pub dev: Option<String>,
    /// Federation hub: open self-registration (`POST /register`): on | off. Default off (on in dev mode).
    #[arg(long, env = "HUBMESH_SELF_REGISTRATION", value_name = "on|off")]
    pub self_registration: Option<String>,
    /// Public base URL of this hub's facade (OAuth redirect URIs). Default: the bound address.
    #[arg(long, env = "HUBMESH_PUBLIC_URL", value_name = "URL")]
    pub public_url: Option<String>,
    /// Signaling settings: `--signal-*` / `HUBMESH_SIGNAL_*`, over `[signal]` of the file.
    #[command(flatten)]
    pub signal: crate::federation::signal::FileSignal,
}

/// The TOML config file. Every field is optional; see [`CONFIG_TEMPLATE`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`RunArgs::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`RunArgs::http`].
    pub http: Option<SocketAddr>,
    /// See [`RunArgs::mesh`].
    pub mesh: Option<Vec<Multiaddr>>,
    /// See [`RunArgs::bootstrap`].
    pub bootstrap: Option<Vec<Multiaddr>>,
    /// See [`RunArgs::federation`].
    pub federation: Option<String>,
    /// See [`RunArgs::allowlist`].
    pub allowlist: Option<Vec<String>>,
    /// See [`RunArgs::sync_interval_secs`].
    pub sync_interval_secs: Option<u64>,
    /// Seconds in-flight requests get to finish at shutdown. Default 10.
    pub shutdown_grace_secs: Option<u64>,
    /// Facade settings.
    #[serde(default)]
    pub facade: FileFacade,
    /// Discovery family settings.
    #[serde(default)]
    pub discovery: FileDiscovery,
    /// See [`RunArgs::dev`].
    pub dev: Option<bool>,
    /// Federation-hub family settings.
    #[serde(default)]
    pub federation_hub: FileFederationHub,
    /// Signaling settings (`[signal]`).
    #[serde(default)]
    pub signal: crate::federation::signal::FileSignal,
    /// Store memory (`[store]`).
    #[serde(default)]
    pub store: FileStore,
}

const MIB: u64 = 1024 * 1024;
/// Largest store cache setting, MiB (1 TiB).
const MAX_CACHE_MIB: u64 = 1024 * 1024;

/// A `[store]` cache size given in MiB, as bytes: `default` when unset, else
/// checked to be `min..=MAX_CACHE_MIB`.
fn cache_bytes(key: &str, mib: Option<u64>, min: u64, default: u64) -> Result<u64, NodeError> {
    match mib {
        None => Ok(default),
        Some(m) if (min..=MAX_CACHE_MIB).contains(&m) => Ok(m * MIB),
        Some(m) => Err(NodeError::Config(format!(
            "{key} must be {min}..={MAX_CACHE_MIB}, not {m}"
        ))),
    }
}

/// `[store]` table: the store's memory budget.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStore {
    /// sled's page cache, MiB (1..=1048576). Default 256.
    pub cache_mib: Option<u64>,
    /// Decoded records kept for point reads, MiB (0 = off, ..=1048576). Default 64.
    pub record_cache_mib: Option<u64>,
}

/// `[federation_hub]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileFederationHub {
    /// Serve the family. Default true.
    pub enabled: Option<bool>,
    /// See [`RunArgs::self_registration`].
    pub self_registration: Option<bool>,
    /// Lifetime of a user token, seconds (60..=86400). Default 1800.
    pub token_ttl_secs: Option<u64>,
    /// Most accounts on this hub. Default 100000.
    pub max_accounts: Option<usize>,
    /// See [`RunArgs::public_url`].
    pub public_url: Option<String>,
    /// General requests per minute per client IP on this family. Default 60.
    pub general_per_minute: Option<u32>,
    /// Login requests (`/token`, `/login/…`, `/register`) per minute per client IP. Default 5.
    pub login_per_minute: Option<u32>,
    /// OAuth providers by name (`[federation_hub.oauth.github]`).
    #[serde(default)]
    pub oauth: BTreeMap<String, FileOAuthProvider>,
}

/// `[federation_hub.oauth.NAME]` table. Secrets never go here: the client
/// secret comes from `HUBMESH_OAUTH_<NAME>_CLIENT_SECRET` or `client_secret_file`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOAuthProvider {
    /// `google`, `github` or `generic` (default: the name if it is a preset, else generic).
    pub preset: Option<String>,
    /// Client id.
    pub client_id: Option<String>,
    /// File holding the client secret (mode 0600).
    pub client_secret_file: Option<PathBuf>,
    /// Authorization endpoint (generic; overrides a preset).
    pub auth_url: Option<String>,
    /// Token endpoint.
    pub token_url: Option<String>,
    /// Userinfo endpoint (GET with the access token as bearer, answers JSON).
    pub userinfo_url: Option<String>,
    /// Scopes requested.
    pub scopes: Option<Vec<String>>,
    /// Userinfo field with the stable subject id. Default `sub`.
    pub subject_field: Option<String>,
    /// Userinfo field naming the account (`<provider>:<value>`). Default `preferred_username`.
    pub name_field: Option<String>,
}

/// `[facade]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileFacade {
    /// See [`RunArgs::tls`].
    pub tls: Option<String>,
    /// See [`RunArgs::tls_cert`].
    pub tls_cert: Option<PathBuf>,
    /// See [`RunArgs::tls_key`].
    pub tls_key: Option<PathBuf>,
    /// Extra names for the self-signed certificate. Default ["localhost", "127.0.0.1"].
    pub tls_names: Option<Vec<String>>,
    /// See [`RunArgs::admin_token_file`].
    pub admin_token_file: Option<PathBuf>,
    /// Whether requests arriving directly from loopback are admin. Default true.
    pub admin_from_loopback: Option<bool>,
    /// See [`RunArgs::rate_limits`].
    pub rate_limits: Option<String>,
    /// See [`RunArgs::trusted_proxy`].
    pub trusted_proxies: Option<Vec<IpAddr>>,
    /// See [`RunArgs::cors_origin`].
    pub cors_origins: Option<Vec<String>>,
    /// Per-request timeout, seconds. Default 30.
    pub request_timeout_secs: Option<u64>,
    /// Largest request body, bytes. Default 65536.
    pub max_body_bytes: Option<usize>,
    /// Most concurrent connections. Default 10000.
    pub max_connections: Option<usize>,
    /// See [`RunArgs::log_format`].
    pub log_format: Option<String>,
}

/// `[discovery]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDiscovery {
    /// Serve the Discovery family. Default true.
    pub enabled: Option<bool>,
    /// See [`RunArgs::discovery_inactive_after_secs`].
    pub inactive_after_secs: Option<u64>,
    /// See [`RunArgs::discovery_gone_after_secs`].
    pub gone_after_secs: Option<u64>,
    /// Requests per minute per client IP on this family. Default 60.
    pub rate_per_minute: Option<u32>,
    /// A TOML file of `cluster-id = "secret"` lines (keep it mode 0600).
    pub cluster_secrets_file: Option<PathBuf>,
}

/// One OAuth 2.0 provider (authorization code + PKCE).
#[derive(Clone, PartialEq, Eq)]
pub struct OAuthProviderConfig {
    /// Name in the URLs (`/login/{name}`), `[a-z0-9_-]`.
    pub name: String,
    /// Client id.
    pub client_id: String,
    /// Client secret (never logged, never replicated).
    pub client_secret: Option<String>,
    /// Authorization endpoint.
    pub auth_url: String,
    /// Token endpoint.
    pub token_url: String,
    /// Userinfo endpoint.
    pub userinfo_url: String,
    /// Scopes requested.
    pub scopes: Vec<String>,
    /// Userinfo field with the stable subject id.
    pub subject_field: String,
    /// Userinfo field naming the account.
    pub name_field: String,
}

impl std::fmt::Debug for OAuthProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthProviderConfig")
            .field("name", &self.name)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<set>"),
            )
            .field("auth_url", &self.auth_url)
            .field("token_url", &self.token_url)
            .field("userinfo_url", &self.userinfo_url)
            .finish_non_exhaustive()
    }
}

/// Federation-hub family settings (compat §E).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationHubConfig {
    /// Serve the family.
    pub enabled: bool,
    /// Open self-registration (`POST /register`).
    pub self_registration: bool,
    /// Lifetime of a user token.
    pub token_ttl: Duration,
    /// Most accounts on this hub.
    pub max_accounts: usize,
    /// Public base URL (OAuth redirect URIs); `None`: the bound address.
    pub public_url: Option<String>,
    /// General requests per minute per client IP.
    pub general_per_minute: u32,
    /// Login requests per minute per client IP.
    pub login_per_minute: u32,
    /// OAuth providers.
    pub oauth: Vec<OAuthProviderConfig>,
}

/// Longest user-token lifetime a hub issues; the revocation validator relies on it.
pub const MAX_USER_TOKEN_TTL: Duration = Duration::from_secs(86_400);

/// Facade TLS mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain HTTP.
    None,
    /// A self-signed certificate generated on first run and persisted in
    /// `DATA_DIR/tls/`.
    SelfSigned {
        /// Subject alternative names.
        names: Vec<String>,
    },
    /// PEM files.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

/// Per-family rate limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Off for loopback benchmarks (`HUBMESH_RATE_LIMITS=off`).
    pub enabled: bool,
    /// Discovery family, requests per minute per client IP.
    pub discovery_per_minute: u32,
    /// Proxies whose `X-Forwarded-For` is honoured.
    pub trusted_proxies: Vec<IpAddr>,
}

/// Discovery family settings.
#[derive(Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// Serve the family.
    pub enabled: bool,
    /// Without heartbeat for this long, a server is not listed.
    pub inactive_after: Duration,
    /// Without heartbeat for this long, the registration expires everywhere.
    pub gone_after: Duration,
    /// Accepted distance of a register timestamp from now.
    pub timestamp_window: Duration,
    /// Lifetime of a server token.
    pub token_ttl: Duration,
    /// Cluster secrets by normalized cluster id (upper-case, `-` → `_`).
    pub cluster_secrets: BTreeMap<String, String>,
}

impl std::fmt::Debug for DiscoveryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscoveryConfig")
            .field("enabled", &self.enabled)
            .field("inactive_after", &self.inactive_after)
            .field("gone_after", &self.gone_after)
            .field("timestamp_window", &self.timestamp_window)
            .field("token_ttl", &self.token_ttl)
            .field("clusters_with_secrets", &self.cluster_secrets.len())
            .finish()
    }
}

impl DiscoveryConfig {
    /// The secret of `cluster_id`, if configured.
    pub fn secret_for(&self, cluster_id: &str) -> Option<&str> {
        self.cluster_secrets
            .get(&normalize_cluster_id(cluster_id))
            .map(String::as_str)
    }
}

/// The env-var spelling of a cluster id: upper-cased, `-` → `_`.
pub fn normalize_cluster_id(id: &str) -> String {
    id.to_ascii_uppercase().replace('-', "_")
}

/// The env var holding a cluster's secret.
pub fn cluster_secret_var(id: &str) -> String {
    format!("CLUSTER_SECRET_{}", normalize_cluster_id(id))
}

/// A resolved hub configuration.
#[derive(Clone)]
pub struct Config {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Facade address (port 0 picks one).
    pub http: SocketAddr,
    /// Mesh listen addresses.
    pub mesh_listen: Vec<Multiaddr>,
    /// Hubs dialled at start.
    pub bootstrap: Vec<Multiaddr>,
    /// Federation name.
    pub federation: String,
    /// Allowlist (empty: open membership).
    pub allowlist: Vec<PeerId>,
    /// Anti-entropy period.
    pub sync_interval: Duration,
    /// Facade TLS.
    pub tls: TlsMode,
    /// Admin token (resolved secret); `None` until [`Config::resolve_secrets`].
    pub admin_token: Option<String>,
    /// Explicit admin token file.
    pub admin_token_file: Option<PathBuf>,
    /// Requests arriving directly from loopback are admin.
    pub admin_from_loopback: bool,
    /// Rate limits.
    pub rate_limits: RateLimitConfig,
    /// CORS origins (empty: no CORS headers).
    pub cors_origins: Vec<String>,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Most concurrent facade connections.
    pub max_connections: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// Discovery family.
    pub discovery: DiscoveryConfig,
    /// Time in-flight requests get at shutdown.
    pub shutdown_grace: Duration,
    /// Dev mode (every family on, open self-registration unless set).
    pub dev: bool,
    /// Federation-hub family.
    pub federation_hub: FederationHubConfig,
    /// Signaling (`/ws/signal`, presence) and node/profile write limits.
    pub signal: crate::federation::signal::SignalConfig,
    /// The store's page cache (sled), bytes.
    pub store_cache_bytes: u64,
    /// The store's record cache for point reads, bytes (0 = off).
    pub record_cache_bytes: u64,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("http", &self.http)
            .field("mesh_listen", &self.mesh_listen)
            .field("bootstrap", &self.bootstrap)
            .field("federation", &self.federation)
            .field("allowlist", &self.allowlist)
            .field("tls", &self.tls)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .field("rate_limits", &self.rate_limits)
            .field("discovery", &self.discovery)
            .finish_non_exhaustive()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            http: DEFAULT_HTTP.parse().expect("a constant, valid address"),
            mesh_listen: vec![DEFAULT_MESH.parse().expect("a constant, valid multiaddr")],
            bootstrap: Vec::new(),
            federation: DEFAULT_FEDERATION.into(),
            allowlist: Vec::new(),
            sync_interval: Duration::from_secs(30),
            tls: TlsMode::None,
            admin_token: None,
            admin_token_file: None,
            admin_from_loopback: true,
            rate_limits: RateLimitConfig {
                enabled: true,
                discovery_per_minute: 60,
                trusted_proxies: Vec::new(),
            },
            cors_origins: Vec::new(),
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 64 * 1024,
            max_connections: 10_000,
            log_format: LogFormat::Text,
            discovery: DiscoveryConfig {
                enabled: true,
                inactive_after: Duration::from_secs(300),
                gone_after: Duration::from_secs(86_400),
                timestamp_window: Duration::from_secs(300),
                token_ttl: Duration::from_secs(86_400),
                cluster_secrets: BTreeMap::new(),
            },
            shutdown_grace: Duration::from_secs(10),
            dev: false,
            federation_hub: FederationHubConfig {
                enabled: true,
                self_registration: false,
                token_ttl: Duration::from_secs(1800),
                max_accounts: 100_000,
                public_url: None,
                general_per_minute: 60,
                login_per_minute: 5,
                oauth: Vec::new(),
            },
            signal: Default::default(),
            store_cache_bytes: 256 * MIB,
            record_cache_bytes: 64 * MIB,
        }
    }
}

fn parse_on_off(what: &str, v: &str) -> Result<bool, NodeError> {
    match v.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(NodeError::Config(format!(
            "{what}: expected on|off, got {v:?}"
        ))),
    }
}

fn nonempty<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

impl Config {
    /// Resolves flags and env (already merged by clap), the config file, and
    /// the defaults, in that order of precedence. Reads `CLUSTER_SECRET_*`
    /// from the process environment. Does not touch the data dir.
    pub fn load(args: &RunArgs) -> Result<Config, NodeError> {
        let file = match &args.config {
            Some(path) => Self::read_file(path)?,
            None => FileConfig::default(),
        };
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::merge(args, file, &env)
    }

    /// Parses a config file.
    pub fn read_file(path: &Path) -> Result<FileConfig, NodeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))
    }

    /// The merge behind [`Config::load`], with the environment passed in (tests).
    pub fn merge(
        args: &RunArgs,
        file: FileConfig,
        env: &[(String, String)],
    ) -> Result<Config, NodeError> {
        let d = Config::default();
        let ff = file.facade;
        let fd = file.discovery;
        let dev = match &args.dev {
            Some(v) => parse_on_off("dev", v)?,
            None => file.dev.unwrap_or(false),
        };
        let federation_hub = federation_hub_config(args, file.federation_hub, env, dev)?;
        let allowlist = match nonempty(args.allowlist.clone()) {
            Some(v) => v,
            None => file
                .allowlist
                .unwrap_or_default()
                .iter()
                .map(|s| {
                    s.parse::<PeerId>()
                        .map_err(|e| NodeError::Config(format!("allowlist entry {s:?}: {e}")))
                })
                .collect::<Result<_, _>>()?,
        };
        let tls_mode = args.tls.clone().or(ff.tls).unwrap_or_else(|| "none".into());
        let tls = match tls_mode.as_str() {
            "none" => TlsMode::None,
            "self-signed" => TlsMode::SelfSigned {
                names: ff
                    .tls_names
                    .unwrap_or_else(|| vec!["localhost".into(), "127.0.0.1".into()]),
            },
            "files" => TlsMode::Files {
                cert: args.tls_cert.clone().or(ff.tls_cert).ok_or_else(|| {
                    NodeError::Config("tls = files needs tls_cert (--tls-cert)".into())
                })?,
                key: args.tls_key.clone().or(ff.tls_key).ok_or_else(|| {
                    NodeError::Config("tls = files needs tls_key (--tls-key)".into())
                })?,
            },
            "acme" => {
                return Err(NodeError::Config(
                    "tls = acme is reserved and not implemented yet; use self-signed or files"
                        .into(),
                ));
            }
            other => {
                return Err(NodeError::Config(format!(
                    "tls: expected none | self-signed | files, got {other:?}"
                )));
            }
        };
        let rate_enabled = match args.rate_limits.clone().or(ff.rate_limits) {
            Some(v) => parse_on_off("rate_limits", &v)?,
            None => d.rate_limits.enabled,
        };
        let log_format = match args
            .log_format
            .clone()
            .or(ff.log_format)
            .as_deref()
            .unwrap_or("text")
        {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(NodeError::Config(format!(
                    "log_format: expected text | json, got {other:?}"
                )));
            }
        };
        let secs = Duration::from_secs;
        let inactive_after = args
            .discovery_inactive_after_secs
            .or(fd.inactive_after_secs)
            .map(secs)
            .unwrap_or(d.discovery.inactive_after);
        let gone_after = args
            .discovery_gone_after_secs
            .or(fd.gone_after_secs)
            .map(secs)
            .unwrap_or(d.discovery.gone_after);
        if inactive_after.is_zero() || gone_after < inactive_after {
            return Err(NodeError::Config(
                "discovery: need 0 < inactive_after <= gone_after".into(),
            ));
        }
        // Cluster secrets: the file first, then env (env wins).
        let mut cluster_secrets = BTreeMap::new();
        if let Some(path) = &fd.cluster_secrets_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
            let table: BTreeMap<String, String> = toml::from_str(&text)
                .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
            for (id, secret) in table {
                cluster_secrets.insert(normalize_cluster_id(&id), secret);
            }
        }
        for (k, v) in env {
            if let Some(id) = k.strip_prefix("CLUSTER_SECRET_")
                && !id.is_empty()
                && !v.is_empty()
            {
                cluster_secrets.insert(normalize_cluster_id(id), v.clone());
            }
        }
        let admin_token = env
            .iter()
            .find(|(k, _)| k == "HUBMESH_ADMIN_TOKEN")
            .map(|(_, v)| v.trim().to_owned())
            .filter(|v| !v.is_empty());
        let per_minute = fd
            .rate_per_minute
            .unwrap_or(d.rate_limits.discovery_per_minute);
        if per_minute == 0 {
            return Err(NodeError::Config(
                "discovery.rate_per_minute must be > 0".into(),
            ));
        }
        let store_cache_bytes = cache_bytes(
            "store.cache_mib",
            file.store.cache_mib,
            1,
            d.store_cache_bytes,
        )?;
        let record_cache_bytes = cache_bytes(
            "store.record_cache_mib",
            file.store.record_cache_mib,
            0,
            d.record_cache_bytes,
        )?;
        let max_body_bytes = ff.max_body_bytes.unwrap_or(d.max_body_bytes);
        if max_body_bytes < 1024 {
            return Err(NodeError::Config(
                "facade.max_body_bytes must be >= 1024".into(),
            ));
        }
        Ok(Config {
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or(d.data_dir),
            http: args.http.or(file.http).unwrap_or(d.http),
            mesh_listen: nonempty(args.mesh.clone())
                .or(file.mesh)
                .unwrap_or(d.mesh_listen),
            bootstrap: nonempty(args.bootstrap.clone())
                .or(file.bootstrap)
                .unwrap_or_default(),
            federation: args
                .federation
                .clone()
                .or(file.federation)
                .unwrap_or(d.federation),
            allowlist,
            sync_interval: args
                .sync_interval_secs
                .or(file.sync_interval_secs)
                .map(secs)
                .unwrap_or(d.sync_interval),
            tls,
            admin_token,
            admin_token_file: args.admin_token_file.clone().or(ff.admin_token_file),
            admin_from_loopback: ff.admin_from_loopback.unwrap_or(true),
            rate_limits: RateLimitConfig {
                enabled: rate_enabled,
                discovery_per_minute: per_minute,
                trusted_proxies: nonempty(args.trusted_proxy.clone())
                    .or(ff.trusted_proxies)
                    .unwrap_or_default(),
            },
            cors_origins: nonempty(args.cors_origin.clone())
                .or(ff.cors_origins)
                .unwrap_or_default(),
            request_timeout: ff
                .request_timeout_secs
                .map(secs)
                .unwrap_or(d.request_timeout),
            max_body_bytes,
            max_connections: ff.max_connections.unwrap_or(d.max_connections).max(1),
            log_format,
            discovery: DiscoveryConfig {
                enabled: dev || fd.enabled.unwrap_or(true),
                inactive_after,
                gone_after,
                cluster_secrets,
                ..d.discovery
            },
            shutdown_grace: file
                .shutdown_grace_secs
                .map(secs)
                .unwrap_or(d.shutdown_grace),
            dev,
            federation_hub,
            signal: args.signal.clone().or(file.signal).resolve()?,
            store_cache_bytes,
            record_cache_bytes,
        })
    }

    /// Resolves the admin token: `HUBMESH_ADMIN_TOKEN`, else the configured
    /// token file, else `DATA_DIR/admin.token`, generated (mode 0600) on
    /// first run.
    pub fn resolve_secrets(&mut self) -> Result<(), NodeError> {
        if self.admin_token.is_some() {
            return Ok(());
        }
        let (path, generate) = match &self.admin_token_file {
            Some(p) => (p.clone(), false),
            None => (self.data_dir.join("admin.token"), true),
        };
        match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => {
                self.admin_token = Some(s.trim().to_owned());
                Ok(())
            }
            Ok(_) => Err(NodeError::Config(format!(
                "{}: empty admin token",
                path.display()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && generate => {
                use rand::RngCore;
                let mut b = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut b);
                let token = b.iter().map(|x| format!("{x:02x}")).collect::<String>();
                std::fs::create_dir_all(&self.data_dir)?;
                hubmesh_store::write_private(&path, token.as_bytes())?;
                self.admin_token = Some(token);
                Ok(())
            }
            Err(e) => Err(NodeError::Config(format!("{}: {e}", path.display()))),
        }
    }
}

/// An OAuth preset's endpoints and userinfo fields.
struct OAuthPreset {
    auth: &'static str,
    token: &'static str,
    userinfo: &'static str,
    scopes: &'static [&'static str],
    subject: &'static str,
    name: &'static str,
}

fn oauth_preset(preset: &str) -> Option<OAuthPreset> {
    match preset {
        "google" => Some(OAuthPreset {
            auth: "https://accounts.google.com/o/oauth2/v2/auth",
            token: "https://oauth2.googleapis.com/token",
            userinfo: "https://openidconnect.googleapis.com/v1/userinfo",
            scopes: &["openid", "email", "profile"],
            subject: "sub",
            name: "email",
        }),
        "github" => Some(OAuthPreset {
            auth: "https://github.com/login/oauth/authorize",
            token: "https://github.com/login/oauth/access_token",
            userinfo: "https://api.github.com/user",
            scopes: &["read:user"],
            subject: "id",
            name: "login",
        }),
        _ => None,
    }
}

fn env_var<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// The `[federation_hub]` settings. OAuth providers come from the file's
/// tables, plus the reference's env variables: `GOOGLE_CLIENT_ID` /
/// `GOOGLE_CLIENT_SECRET` and `GITHUB_CLIENT_ID` / `GITHUB_CLIENT_SECRET`
/// configure the presets; `HUBMESH_OAUTH_<NAME>_CLIENT_SECRET` gives any
/// provider's secret.
fn federation_hub_config(
    args: &RunArgs,
    f: FileFederationHub,
    env: &[(String, String)],
    dev: bool,
) -> Result<FederationHubConfig, NodeError> {
    let d = Config::default().federation_hub;
    let self_registration = match &args.self_registration {
        Some(v) => parse_on_off("self_registration", v)?,
        None => f.self_registration.unwrap_or(dev),
    };
    let token_ttl = f
        .token_ttl_secs
        .map(Duration::from_secs)
        .unwrap_or(d.token_ttl);
    if token_ttl < Duration::from_secs(60) || token_ttl > MAX_USER_TOKEN_TTL {
        return Err(NodeError::Config(
            "federation_hub.token_ttl_secs must be within 60..=86400".into(),
        ));
    }
    let general_per_minute = f.general_per_minute.unwrap_or(d.general_per_minute);
    let login_per_minute = f.login_per_minute.unwrap_or(d.login_per_minute);
    if general_per_minute == 0 || login_per_minute == 0 {
        return Err(NodeError::Config(
            "federation_hub rate limits must be > 0".into(),
        ));
    }
    let public_url = args.public_url.clone().or(f.public_url);
    if let Some(u) = &public_url {
        let parsed =
            url::Url::parse(u).map_err(|e| NodeError::Config(format!("public_url {u:?}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(NodeError::Config(format!("public_url {u:?}: not http(s)")));
        }
    }
    let mut tables = f.oauth;
    for preset in ["google", "github"] {
        let upper = preset.to_ascii_uppercase();
        if let Some(id) = env_var(env, &format!("{upper}_CLIENT_ID")) {
            let t = tables.entry(preset.to_owned()).or_default();
            t.client_id = Some(id.to_owned());
        }
    }
    let mut oauth = Vec::new();
    for (name, t) in tables {
        let bad = |why: &str| NodeError::Config(format!("federation_hub.oauth.{name}: {why}"));
        if name.is_empty()
            || name.len() > 32
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(bad("provider names are 1-32 of [a-z0-9_-]"));
        }
        let preset_name = t.preset.clone().unwrap_or_else(|| name.clone());
        let preset = oauth_preset(&preset_name);
        if preset.is_none() && t.preset.as_deref().is_some_and(|p| p != "generic") {
            return Err(bad("preset must be google, github or generic"));
        }
        let upper = name.to_ascii_uppercase().replace('-', "_");
        let mut secret = env_var(env, &format!("HUBMESH_OAUTH_{upper}_CLIENT_SECRET"))
            .or_else(|| {
                preset
                    .is_some()
                    .then(|| env_var(env, &format!("{upper}_CLIENT_SECRET")))
                    .flatten()
            })
            .map(str::to_owned);
        if secret.is_none()
            && let Some(path) = &t.client_secret_file
        {
            let s = std::fs::read_to_string(path)
                .map_err(|e| bad(&format!("{}: {e}", path.display())))?;
            secret = Some(s.trim().to_owned()).filter(|s| !s.is_empty());
        }
        let pick = |v: Option<String>, p: Option<&'static str>, what: &str| {
            v.or_else(|| p.map(str::to_owned))
                .ok_or_else(|| bad(&format!("{what} is required for a generic provider")))
        };
        let auth_url = pick(t.auth_url, preset.as_ref().map(|p| p.auth), "auth_url")?;
        let token_url = pick(t.token_url, preset.as_ref().map(|p| p.token), "token_url")?;
        let userinfo_url = pick(
            t.userinfo_url,
            preset.as_ref().map(|p| p.userinfo),
            "userinfo_url",
        )?;
        for u in [&auth_url, &token_url, &userinfo_url] {
            let parsed = url::Url::parse(u).map_err(|e| bad(&format!("{u:?}: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(bad(&format!("{u:?}: not http(s)")));
            }
        }
        oauth.push(OAuthProviderConfig {
            client_id: t.client_id.ok_or_else(|| bad("client_id is required"))?,
            client_secret: secret,
            auth_url,
            token_url,
            userinfo_url,
            scopes: t.scopes.unwrap_or_else(|| {
                preset
                    .as_ref()
                    .map(|p| p.scopes.iter().map(|s| (*s).to_owned()).collect())
                    .unwrap_or_else(|| vec!["openid".into()])
            }),
            subject_field: t
                .subject_field
                .unwrap_or_else(|| preset.as_ref().map_or("sub", |p| p.subject).to_owned()),
            name_field: t.name_field.unwrap_or_else(|| {
                preset
                    .as_ref()
                    .map_or("preferred_username", |p| p.name)
                    .to_owned()
            }),
            name,
        });
    }
    Ok(FederationHubConfig {
        enabled: dev || f.enabled.unwrap_or(d.enabled),
        self_registration,
        token_ttl,
        max_accounts: f.max_accounts.unwrap_or(d.max_accounts).max(1),
        public_url,
        general_per_minute,
        login_per_minute,
        oauth,
    })
}

/// The commented config file `hubmesh init` writes. Every value shown is the default.
pub const CONFIG_TEMPLATE: &str = r#"# hubmesh hub configuration (TOML). Precedence: flag > HUBMESH_* env > this file > default.
# Every value below is the default; uncomment to change. See specs/config.md.

# data_dir = "./hubmesh-data"            # store, identity key, TLS material, admin.token
# http = "127.0.0.1:8080"                # facade address
# mesh = ["/ip4/127.0.0.1/udp/4001/quic-v1"]   # QUIC listen addresses (use 0.0.0.0 to federate over a network)
# bootstrap = []                         # e.g. ["/ip4/10.0.0.2/udp/4001/quic-v1/p2p/12D3Koo..."]
# federation = "hubmesh-dev"             # hubs only federate within the same name
# allowlist = []                         # PeerIds; empty = open membership
# sync_interval_secs = 30                # anti-entropy period
# shutdown_grace_secs = 10               # in-flight requests get this long at shutdown
# dev = false                            # dev mode: every family on, self-registration on (HUBMESH_DEV)

[facade]
# tls = "none"                           # none | self-signed | files  (acme reserved)
# tls_cert = "/etc/hubmesh/cert.pem"     # for tls = "files"
# tls_key = "/etc/hubmesh/key.pem"
# tls_names = ["localhost", "127.0.0.1"] # SANs of the self-signed certificate
# admin_token_file = "<data_dir>/admin.token"  # generated on first run; or set HUBMESH_ADMIN_TOKEN
# admin_from_loopback = true             # requests straight from 127.0.0.1/::1 are admin
# rate_limits = "on"                     # on | off (HUBMESH_RATE_LIMITS=off for loopback benchmarks)
# trusted_proxies = []                   # proxies whose X-Forwarded-For is honoured
# cors_origins = []                      # e.g. ["https://app.example"], or ["*"]
# request_timeout_secs = 30
# max_body_bytes = 65536
# max_connections = 10000
# log_format = "text"                    # text | json (RUST_LOG filters)

[discovery]
# enabled = true
# inactive_after_secs = 300              # not listed after this long without heartbeat
# gone_after_secs = 86400                # registration deleted after this long without heartbeat
# rate_per_minute = 60                   # per client IP
# cluster_secrets_file = "/etc/hubmesh/cluster-secrets.toml"   # lines: acme-corp = "secret" (mode 0600)
# Cluster secrets are better given as env vars: CLUSTER_SECRET_ACME_CORP=... for cluster "acme-corp".

[federation_hub]
# enabled = true
# self_registration = false              # POST /register; default on in dev mode
# token_ttl_secs = 1800                  # user JWT lifetime (60..=86400)
# max_accounts = 100000
# public_url = "https://hub.example"     # base of OAuth redirect URIs; default: the bound address
# general_per_minute = 60                # per client IP, every route of the family
# login_per_minute = 5                   # per client IP: /token, /login/{provider}, /register
# OAuth providers: presets google and github (GOOGLE_CLIENT_ID/_SECRET, GITHUB_CLIENT_ID/_SECRET env
# vars configure them too), or any provider by its URLs. Client secrets: HUBMESH_OAUTH_<NAME>_CLIENT_SECRET
# or client_secret_file, never this file.
# [federation_hub.oauth.github]
# client_id = "..."
# client_secret_file = "/etc/hubmesh/github.secret"
# [federation_hub.oauth.corp]
# preset = "generic"
# client_id = "hubmesh"
# auth_url = "https://sso.example/authorize"
# token_url = "https://sso.example/token"
# userinfo_url = "https://sso.example/userinfo"
# scopes = ["openid"]
# subject_field = "sub"
# name_field = "preferred_username"

[store]
# cache_mib = 256                        # sled's page cache (1..=1048576)
# record_cache_mib = 64                  # decoded records kept for point reads; 0 = off

[signal]
# Also flags --signal-<key with dashes> and env HUBMESH_SIGNAL_<KEY>, e.g. HUBMESH_SIGNAL_OUTBOUND_QUEUE.
# presence_ttl_secs = 30                 # presence record lifetime (3..=600), rewritten every third of it
# max_sessions = 50000                   # /ws/signal sessions on this hub (close 1013 beyond)
# max_message_bytes = 16384              # largest client text frame (1024..=49152)
# frames_per_second = 50                 # per connection, burst twice that; 0 = unlimited
# outbound_queue = 64                    # frames queued per socket before a slow reader is closed (4008), 1..=4096
# ping_interval_secs = 20                # keep-alive ping period
# ping_timeout_secs = 60                 # close (4000) without any client frame for this long; > ping_interval_secs
# register_per_minute = 10               # POST /register-node-id per client IP
# profile_per_minute = 20                # PUT/DELETE /profile per client IP
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_a_dev_hub() {
        let c = Config::merge(&RunArgs::default(), FileConfig::default(), &[]).unwrap();
        assert_eq!(c.http.to_string(), "127.0.0.1:8080");
        assert_eq!(c.mesh_listen[0].to_string(), DEFAULT_MESH);
        assert_eq!(c.data_dir, PathBuf::from("./hubmesh-data"));
        assert!(c.rate_limits.enabled);
        assert_eq!(c.discovery.inactive_after, Duration::from_secs(300));
    }

    #[test]
    fn template_parses_and_precedence_holds() {
        let file: FileConfig = toml::from_str(CONFIG_TEMPLATE).unwrap();
        assert!(file.http.is_none());
        let file: FileConfig = toml::from_str(
            "http = \"127.0.0.1:9000\"\nfederation = \"f1\"\n[facade]\nrate_limits = \"off\"\n",
        )
        .unwrap();
        let args = RunArgs {
            http: Some("127.0.0.1:9100".parse().unwrap()),
            ..RunArgs::default()
        };
        let env = vec![
            ("CLUSTER_SECRET_ACME_CORP".to_string(), "s3".to_string()),
            ("HUBMESH_ADMIN_TOKEN".to_string(), "tok".to_string()),
        ];
        let c = Config::merge(&args, file, &env).unwrap();
        assert_eq!(c.http.port(), 9100, "flag beats file");
        assert_eq!(c.federation, "f1", "file beats default");
        assert!(!c.rate_limits.enabled);
        assert_eq!(c.discovery.secret_for("acme-corp"), Some("s3"));
        assert_eq!(c.admin_token.as_deref(), Some("tok"));
    }

    #[test]
    fn federation_hub_oauth_and_dev_mode() {
        let file: FileConfig = toml::from_str(
            "[federation_hub]\ntoken_ttl_secs = 600\n[federation_hub.oauth.corp]\npreset = \"generic\"\nclient_id = \"hub\"\nauth_url = \"https://sso.example/a\"\ntoken_url = \"https://sso.example/t\"\nuserinfo_url = \"https://sso.example/u\"\n",
        )
        .unwrap();
        let env = vec![
            ("GITHUB_CLIENT_ID".to_string(), "gh-id".to_string()),
            ("GITHUB_CLIENT_SECRET".to_string(), "gh-secret".to_string()),
            (
                "HUBMESH_OAUTH_CORP_CLIENT_SECRET".to_string(),
                "corp-secret".to_string(),
            ),
        ];
        let c = Config::merge(&RunArgs::default(), file, &env).unwrap();
        let f = &c.federation_hub;
        assert!(!c.dev && !f.self_registration, "off by default");
        assert_eq!(f.token_ttl, Duration::from_secs(600));
        let names: Vec<&str> = f.oauth.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["corp", "github"]);
        assert_eq!(f.oauth[0].client_secret.as_deref(), Some("corp-secret"));
        assert_eq!(f.oauth[0].name_field, "preferred_username");
        assert_eq!(
            f.oauth[1].token_url,
            "https://github.com/login/oauth/access_token"
        );
        assert_eq!(f.oauth[1].subject_field, "id");
        assert!(
            !format!("{c:?}").contains("secret\""),
            "secrets are not in Debug"
        );
        assert!(!format!("{:?}", f.oauth).contains("gh-secret"));
        let dev = RunArgs {
            dev: Some("on".into()),
            ..RunArgs::default()
        };
        let file: FileConfig =
            toml::from_str("[discovery]\nenabled = false\n[federation_hub]\nenabled = false\n")
                .unwrap();
        let c = Config::merge(&dev, file, &[]).unwrap();
        assert!(c.dev && c.federation_hub.self_registration);
        assert!(
            c.discovery.enabled && c.federation_hub.enabled,
            "dev turns families on"
        );
        for bad in [
            "[federation_hub]\ntoken_ttl_secs = 10\n",
            "[federation_hub.oauth.x]\nclient_id = \"a\"\n",
            "[federation_hub.oauth.github]\n",
            "[federation_hub.oauth.github]\nclient_id = \"a\"\nauth_url = \"ftp://x\"\n",
        ] {
            let file: FileConfig = toml::from_str(bad).unwrap();
            assert!(
                Config::merge(&RunArgs::default(), file, &[]).is_err(),
                "{bad}"
            );
        }
    }

    /// `hubmesh run`'s arguments as a command of their own.
    #[derive(clap::Parser)]
    struct Run {
        #[command(flatten)]
        run: RunArgs,
    }

    /// `hubmesh run`'s flags as clap parses them (tests set no `HUBMESH_*`
    /// variable; env values reach the same fields, see the cli process tests).
    fn run_args(argv: &[&str]) -> Result<RunArgs, clap::Error> {
        use clap::Parser;
        Run::try_parse_from(std::iter::once("run").chain(argv.iter().copied())).map(|r| r.run)
    }

    /// The error of merging `args` over the config file `text`.
    fn merge_error(args: &RunArgs, text: &str) -> String {
        let file: FileConfig = toml::from_str(text).unwrap();
        Config::merge(args, file, &[]).unwrap_err().to_string()
    }

    /// The error of parsing the config file `text`.
    fn parse_error(text: &str) -> String {
        toml::from_str::<FileConfig>(text).unwrap_err().to_string()
    }

    #[test]
    fn signal_settings_flag_over_file_over_default() {
        use crate::federation::signal::SignalConfig;
        let file: FileConfig = toml::from_str(
            "[signal]\noutbound_queue = 8\nping_interval_secs = 5\nping_timeout_secs = 15\n",
        )
        .unwrap();
        let args = run_args(&[
            "--signal-outbound-queue",
            "16",
            "--signal-max-sessions",
            "3",
        ])
        .unwrap();
        let c = Config::merge(&args, file, &[]).unwrap().signal;
        assert_eq!(c.outbound_queue, 16, "flag beats file");
        assert_eq!(c.max_sessions, 3, "flag beats default");
        assert_eq!(
            c.ping_interval,
            Duration::from_secs(5),
            "file beats default"
        );
        assert_eq!(c.ping_timeout, Duration::from_secs(15));
        assert_eq!(c.presence_ttl, SignalConfig::default().presence_ttl);
        // Every setting has its flag.
        let args = run_args(&[
            "--signal-presence-ttl-secs",
            "12",
            "--signal-max-sessions",
            "7",
            "--signal-max-message-bytes",
            "2048",
            "--signal-frames-per-second",
            "0",
            "--signal-outbound-queue",
            "2",
            "--signal-ping-interval-secs",
            "3",
            "--signal-ping-timeout-secs",
            "4",
            "--signal-register-per-minute",
            "5",
            "--signal-profile-per-minute",
            "6",
        ])
        .unwrap();
        let c = Config::merge(&args, FileConfig::default(), &[])
            .unwrap()
            .signal;
        assert_eq!(
            c,
            SignalConfig {
                presence_ttl: Duration::from_secs(12),
                max_sessions: 7,
                max_message_bytes: 2048,
                frames_per_second: 0,
                outbound_queue: 2,
                ping_interval: Duration::from_secs(3),
                ping_timeout: Duration::from_secs(4),
                register_per_minute: 5,
                profile_per_minute: 6,
            }
        );
    }

    #[test]
    fn signal_flags_env_and_file_keys_match() {
        use clap::CommandFactory;
        let cmd = Run::command();
        let mut keys = Vec::new();
        for a in cmd.get_arguments() {
            let Some(long) = a.get_long().and_then(|l| l.strip_prefix("signal-")) else {
                continue;
            };
            let env = a.get_env().and_then(|e| e.to_str()).unwrap_or_default();
            let key = long.replace('-', "_");
            assert_eq!(env, format!("HUBMESH_SIGNAL_{}", key.to_ascii_uppercase()));
            assert!(
                CONFIG_TEMPLATE.contains(&format!("\n# {key} = ")),
                "{key} is in the template"
            );
            keys.push(key);
        }
        assert_eq!(keys.len(), 9, "{keys:?}");
        // Each flag's file key is a key of [signal].
        let table: String = keys.iter().map(|k| format!("{k} = 30\n")).collect();
        toml::from_str::<FileConfig>(&format!("[signal]\n{table}")).unwrap();
        // The template's [signal] values, uncommented, are the defaults.
        let signal = CONFIG_TEMPLATE.split("\n[signal]\n").nth(1).unwrap();
        let uncommented: String = signal
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.contains(" = "))
            .map(|l| format!("{}\n", l.split(" #").next().unwrap()))
            .collect();
        let file: FileConfig = toml::from_str(&format!("[signal]\n{uncommented}")).unwrap();
        assert_eq!(
            file.signal.clone().resolve().unwrap(),
            crate::federation::signal::SignalConfig::default()
        );
        assert_eq!(uncommented.lines().count(), 9, "{uncommented}");
    }

    #[test]
    fn signal_bad_values_are_clear_errors() {
        let e = run_args(&["--signal-outbound-queue", "many"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--signal-outbound-queue") && e.contains("many"),
            "{e}"
        );
        let e = run_args(&["--signal-frames-per-second=-1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--signal-frames-per-second"), "{e}");
        for (argv, file, needle) in [
            (
                &["--signal-outbound-queue", "0"][..],
                "",
                "signal.outbound_queue (--signal-outbound-queue, HUBMESH_SIGNAL_OUTBOUND_QUEUE) must be 1..=4096, got 0",
            ),
            (
                &[],
                "[signal]\noutbound_queue = 5000\n",
                "signal.outbound_queue (--signal-outbound-queue, HUBMESH_SIGNAL_OUTBOUND_QUEUE) must be 1..=4096, got 5000",
            ),
            (
                &["--signal-presence-ttl-secs", "2"],
                "",
                "must be 3..=600, got 2",
            ),
            (&["--signal-max-sessions", "0"], "", "signal.max_sessions"),
            (
                &["--signal-max-message-bytes", "100"],
                "",
                "must be 1024..=49152, got 100",
            ),
            (
                &["--signal-ping-interval-secs", "0"],
                "",
                "signal.ping_interval_secs",
            ),
            (
                &["--signal-ping-timeout-secs", "20"],
                "",
                "signal.ping_timeout_secs (--signal-ping-timeout-secs, HUBMESH_SIGNAL_PING_TIMEOUT_SECS) must be > ping_interval_secs (20), got 20",
            ),
            (
                &["--signal-register-per-minute", "0"],
                "",
                "HUBMESH_SIGNAL_REGISTER_PER_MINUTE",
            ),
            (
                &["--signal-profile-per-minute", "0"],
                "",
                "HUBMESH_SIGNAL_PROFILE_PER_MINUTE",
            ),
            // A valid flag hides a bad file value.
            (
                &["--signal-outbound-queue", "8"],
                "[signal]\nmax_sessions = 0\n",
                "signal.max_sessions",
            ),
        ] {
            let e = merge_error(&run_args(argv).unwrap(), file);
            assert!(e.contains(needle), "{argv:?}: {e}");
        }
        let file: FileConfig = toml::from_str("[signal]\noutbound_queue = 0\n").unwrap();
        let args = run_args(&["--signal-outbound-queue", "8"]).unwrap();
        assert_eq!(
            Config::merge(&args, file, &[])
                .unwrap()
                .signal
                .outbound_queue,
            8,
            "a valid flag overrides a bad file value"
        );
        let e = parse_error("[signal]\noutbound_queu = 8\n");
        assert!(e.contains("outbound_queu"), "{e}");
    }

    #[test]
    fn store_caches_come_from_the_file_and_are_bounded() {
        let c = Config::merge(&RunArgs::default(), FileConfig::default(), &[]).unwrap();
        assert_eq!(
            (c.store_cache_bytes, c.record_cache_bytes),
            (256 * MIB, 64 * MIB)
        );
        let file: FileConfig =
            toml::from_str("[store]\ncache_mib = 32\nrecord_cache_mib = 0\n").unwrap();
        let c = Config::merge(&RunArgs::default(), file, &[]).unwrap();
        assert_eq!((c.store_cache_bytes, c.record_cache_bytes), (32 * MIB, 0));
        for (text, needle) in [
            (
                "[store]\ncache_mib = 0\n",
                "store.cache_mib must be 1..=1048576, not 0",
            ),
            (
                "[store]\nrecord_cache_mib = 2000000\n",
                "store.record_cache_mib must be 0..=1048576, not 2000000",
            ),
        ] {
            let e = merge_error(&RunArgs::default(), text);
            assert!(e.contains(needle), "{text}: {e}");
        }
        let e = parse_error("[store]\ncache = 8\n");
        assert!(e.contains("cache"), "{e}");
    }

    #[test]
    fn bad_values_are_errors() {
        let args = RunArgs {
            tls: Some("acme".into()),
            ..RunArgs::default()
        };
        assert!(Config::merge(&args, FileConfig::default(), &[]).is_err());
        assert!(toml::from_str::<FileConfig>("nope = 1").is_err());
        let args = RunArgs {
            rate_limits: Some("maybe".into()),
            ..RunArgs::default()
        };
        assert!(Config::merge(&args, FileConfig::default(), &[]).is_err());
    }
}
