//! `hubmesh`: the command-line front end of a hubmesh hub. Thin: it parses,
//! calls into `hubmesh-node`, and prints. `run` starts a hub and prints the
//! `hubmesh ready …` line on stdout once serving; `status`, `peers` and
//! `lookup` talk to a running hub's operator API; `discovery …` helps a
//! server register (computing the HMAC) and look up its cluster.

mod seal;
mod testnet;
mod user;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use clap::{Parser, Subcommand};
use hubmesh_node::config::{self, CONFIG_TEMPLATE, cluster_secret_var};
use hubmesh_node::discovery::{hmac_message, sign_registration};
use hubmesh_node::{Config, Hub, RunArgs};

/// mimalloc, the allocator the store and facade benchmarks run with, so the
/// daemon behaves as measured.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A peer-to-peer federation of hub daemons.
#[derive(Debug, Parser)]
#[command(name = "hubmesh", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a hub identity and a commented config file.
    Init {
        /// Data directory.
        #[arg(long, env = "HUBMESH_DATA_DIR", default_value = config::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Config file to write (default DATA_DIR/hubmesh.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overwrite an existing config file.
        #[arg(long)]
        force: bool,
    },
    /// Run a hub.
    Run(Box<RunArgs>),
    /// Show a running hub's identity, addresses, peers, records and sync state.
    Status(HubArgs),
    /// List a running hub's mesh peers with latency.
    Peers(HubArgs),
    /// Look up a record (locally, else in the DHT) through a running hub.
    Lookup {
        #[command(flatten)]
        hub: HubArgs,
        /// Namespace (e.g. server).
        ns: String,
        /// Key (e.g. acme-corp/6f1c…).
        key: String,
    },
    /// Discovery API helpers (what a server does).
    #[command(subcommand)]
    Discovery(DiscoveryCmd),
    /// Manage the hub's accounts (works with the hub stopped or running).
    #[command(subcommand)]
    User(user::UserCmd),
    /// Seal stdin to a node's x25519 key (specs/sealed.md); prints the envelope.
    Seal(seal::SealArgs),
    /// Open a sealed envelope read on stdin with a secret key file.
    Open(seal::OpenArgs),
    /// Generate an x25519 key pair for sealed signals (prints the public key).
    SealKeygen(seal::KeygenArgs),
    /// A local federation in one command, with faults and benchmarks.
    #[command(subcommand)]
    Testnet(testnet::TestnetCmd),
}

#[derive(Debug, Clone, clap::Args)]
struct HubArgs {
    /// Hub facade URL.
    #[arg(long, env = "HUBMESH_HUB", default_value = "http://127.0.0.1:8080")]
    hub: String,
    /// Admin token (needed unless talking to the hub over loopback).
    #[arg(long, env = "HUBMESH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// File holding the admin token (e.g. DATA_DIR/admin.token), so the
    /// token stays out of the process list and shell history.
    #[arg(long, env = "HUBMESH_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    admin_token_file: Option<PathBuf>,
    /// Accept an invalid TLS certificate (self-signed hubs).
    #[arg(long)]
    insecure: bool,
}

impl HubArgs {
    /// The admin token: `--admin-token`, else the first line of
    /// `--admin-token-file` (an unreadable or empty file is an error, not a
    /// silent fall back to no token).
    fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(t) = &self.admin_token {
            return Ok(Some(t.clone()));
        }
        let Some(path) = &self.admin_token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the admin token file {}", path.display()))?;
        let token = text.lines().next().unwrap_or("").trim();
        if token.is_empty() {
            bail!("the admin token file {} is empty", path.display());
        }
        Ok(Some(token.to_owned()))
    }
}

#[derive(Debug, Subcommand)]
enum DiscoveryCmd {
    /// Register a server; the cluster secret is read from CLUSTER_SECRET_<ID>.
    Register {
        #[command(flatten)]
        hub: HubArgs,
        /// Cluster id.
        #[arg(long)]
        cluster: String,
        /// Server id (UUID); random if absent.
        #[arg(long)]
        server_id: Option<String>,
        /// The server's public URL.
        #[arg(long)]
        public_url: String,
        /// Base64 x25519 public key; random if absent.
        #[arg(long)]
        public_key: Option<String>,
        /// Server version.
        #[arg(long, default_value = "0.1.0")]
        version: String,
    },
    /// List the active servers of a cluster.
    Lookup {
        #[command(flatten)]
        hub: HubArgs,
        /// Cluster id.
        #[arg(long)]
        cluster: String,
        /// Server token from register.
        #[arg(long, env = "HUBMESH_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Send a heartbeat.
    Heartbeat {
        #[command(flatten)]
        hub: HubArgs,
        /// Server token from register.
        #[arg(long, env = "HUBMESH_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Delete a registration (federation-wide).
    Delete {
        #[command(flatten)]
        hub: HubArgs,
        /// Server id.
        #[arg(long)]
        server_id: String,
        /// Server token from register.
        #[arg(long, env = "HUBMESH_TOKEN", hide_env_values = true)]
        token: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Init {
                data_dir,
                config,
                force,
            } => init(data_dir, config, force),
            Command::Run(args) => run(*args).await,
            Command::Status(hub) => print_get(&hub, "/admin/status").await,
            Command::Peers(hub) => print_get(&hub, "/admin/peers").await,
            Command::Lookup { hub, ns, key } => {
                print_get(&hub, &format!("/admin/lookup/{ns}/{key}")).await
            }
            Command::Discovery(cmd) => discovery(cmd).await,
            Command::User(cmd) => user::run(cmd).await,
            Command::Seal(args) => seal::seal(args).await,
            Command::Open(args) => seal::open(args),
            Command::SealKeygen(args) => seal::keygen(args),
            Command::Testnet(cmd) => testnet::run(cmd).await,
        }
    })
}

fn init(data_dir: PathBuf, config: Option<PathBuf>, force: bool) -> anyhow::Result<()> {
    let key_path = data_dir.join("mesh").join("identity.key");
    let key = hubmesh_node::hub::load_or_create_identity(&key_path)
        .with_context(|| format!("identity {}", key_path.display()))?;
    let config_path = config.unwrap_or_else(|| data_dir.join("hubmesh.toml"));
    if config_path.exists() && !force {
        println!(
            "config {} exists (use --force to overwrite)",
            config_path.display()
        );
    } else {
        if let Some(dir) = config_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&config_path, CONFIG_TEMPLATE)
            .with_context(|| format!("writing {}", config_path.display()))?;
        println!("wrote {}", config_path.display());
    }
    println!("identity {}", key_path.display());
    println!("peer {}", key.public().to_peer_id());
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // A hub started by `hubmesh testnet` stops when the testnet process dies.
    hubmesh_testnet::exit_with_parent()?;
    let config = Config::load(&args)?;
    hubmesh_node::init_tracing(config.log_format);
    // The handlers exist before the ready line: a SIGTERM or SIGINT sent as
    // soon as a script sees the line stops the hub gracefully, never by the
    // signal's default action.
    #[cfg(unix)]
    let (mut term, mut int) = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        )
    };
    let hub = Hub::spawn(config).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", hub.ready_line())?;
        out.flush()?;
    }
    let cancel = hub.cancel_token();
    #[cfg(unix)]
    tokio::select! {
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        () = cancel.cancelled() => {}
    }
    #[cfg(not(unix))]
    tokio::select! {
        r = tokio::signal::ctrl_c() => { r.context("waiting for Ctrl-C")?; }
        () = cancel.cancelled() => {}
    }
    hub.shutdown().await;
    Ok(())
}

fn client(hub: &HubArgs) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .danger_accept_invalid_certs(hub.insecure)
        .build()
        .context("building the HTTP client")
}

fn url(hub: &HubArgs, path: &str) -> String {
    format!("{}{}", hub.hub.trim_end_matches('/'), path)
}

async fn finish(resp: reqwest::Response) -> anyhow::Result<()> {
    let status = resp.status();
    let text = resp.text().await.context("reading the answer")?;
    let pretty = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(text);
    if status.is_success() {
        println!("{pretty}");
        Ok(())
    } else {
        eprintln!("{pretty}");
        bail!("the hub answered {status}")
    }
}

async fn print_get(hub: &HubArgs, path: &str) -> anyhow::Result<()> {
    let mut req = client(hub)?.get(url(hub, path));
    if let Some(t) = hub.token()? {
        req = req.header("X-Admin-Token", t);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("contacting {}", hub.hub))?;
    finish(resp).await
}

async fn discovery(cmd: DiscoveryCmd) -> anyhow::Result<()> {
    match cmd {
        DiscoveryCmd::Register {
            hub,
            cluster,
            server_id,
            public_url,
            public_key,
            version,
        } => {
            let var = cluster_secret_var(&cluster);
            let secret =
                std::env::var(&var).with_context(|| format!("set {var} to the cluster secret"))?;
            let server_id = server_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let public_key = public_key.unwrap_or_else(|| {
                use rand::RngCore;
                let mut k = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut k);
                base64::engine::general_purpose::STANDARD.encode(k)
            });
            let timestamp = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .context("formatting the timestamp")?;
            let msg = hmac_message(&server_id, &cluster, &public_url, &public_key, &timestamp);
            let body = serde_json::json!({
                "serverId": server_id,
                "clusterId": cluster,
                "publicUrl": public_url,
                "version": version,
                "publicKey": public_key,
                "timestamp": timestamp,
                "clusterSecretHmac": sign_registration(secret.as_bytes(), &msg),
            });
            let resp = client(&hub)?
                .post(url(&hub, "/api/v1/servers/register"))
                .json(&body)
                .send()
                .await
                .with_context(|| format!("contacting {}", hub.hub))?;
            finish(resp).await
        }
        DiscoveryCmd::Lookup {
            hub,
            cluster,
            token,
        } => {
            let resp = client(&hub)?
                .get(url(&hub, &format!("/api/v1/cluster/{cluster}")))
                .bearer_auth(token)
                .send()
                .await
                .with_context(|| format!("contacting {}", hub.hub))?;
            finish(resp).await
        }
        DiscoveryCmd::Heartbeat { hub, token } => {
            let resp = client(&hub)?
                .post(url(&hub, "/api/v1/servers/heartbeat"))
                .bearer_auth(token)
                .send()
                .await
                .with_context(|| format!("contacting {}", hub.hub))?;
            finish(resp).await
        }
        DiscoveryCmd::Delete {
            hub,
            server_id,
            token,
        } => {
            let resp = client(&hub)?
                .delete(url(&hub, &format!("/api/v1/servers/{server_id}")))
                .bearer_auth(token)
                .send()
                .await
                .with_context(|| format!("contacting {}", hub.hub))?;
            finish(resp).await
        }
    }
}
