//! `hubmesh user add|list|remove|passwd`: the operator's account commands.
//! With the hub stopped they open its store directly; while it runs (its
//! store is locked) they go through its operator API (`/admin/users…`),
//! found with `--hub` or the `facade.addr` file the hub writes in its data
//! dir. Passwords come from a prompt, or, when stdin is not a terminal,
//! twice on stdin (two lines that must match).

use std::io::{BufRead, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use hubmesh_node::config::DEFAULT_DATA_DIR;
use hubmesh_node::federation::accounts::{Account, Accounts};
use hubmesh_node::federation::admin_users::{UserList, UserView};
use hubmesh_node::hub::FACADE_ADDR_FILE;
use hubmesh_store::Store;

/// Account commands.
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Create an account (password from a prompt, or twice on stdin).
    Add {
        /// Username: 1-64 of [A-Za-z0-9._-].
        name: String,
        /// Make the account a hub admin.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        target: Target,
    },
    /// List the accounts.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Remove an account.
    Remove {
        /// Username.
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Set an account's password (from a prompt, or twice on stdin).
    Passwd {
        /// Username.
        name: String,
        #[command(flatten)]
        target: Target,
    },
}

/// Which hub.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The hub's data directory.
    #[arg(long, env = "HUBMESH_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// A running hub's facade URL (default: from DATA_DIR/facade.addr while it runs).
    #[arg(long)]
    hub: Option<String>,
    /// Admin token (default: HUBMESH_ADMIN_TOKEN, else DATA_DIR/admin.token; loopback needs none).
    #[arg(long, env = "HUBMESH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Accept an invalid TLS certificate (self-signed hubs).
    #[arg(long)]
    insecure: bool,
}

/// Longest password line read from stdin.
const MAX_LINE: u64 = 4096;

/// Runs one account command.
pub async fn run(cmd: UserCmd) -> anyhow::Result<()> {
    let target = match &cmd {
        UserCmd::Add { target, .. }
        | UserCmd::List { target }
        | UserCmd::Remove { target, .. }
        | UserCmd::Passwd { target, .. } => target.clone(),
    };
    match connect(&target).await? {
        Via::Api(api) => via_api(&api, cmd).await,
        Via::Store(accounts) => via_store(&accounts, cmd).await,
    }
}

struct Api {
    base: String,
    client: reqwest::Client,
    token: Option<String>,
}

enum Via {
    Api(Api),
    Store(Accounts),
}

async fn connect(t: &Target) -> anyhow::Result<Via> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .danger_accept_invalid_certs(t.insecure)
        .build()
        .context("building the HTTP client")?;
    let token = t.admin_token.clone().or_else(|| {
        std::fs::read_to_string(t.data_dir.join("admin.token"))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    });
    if let Some(hub) = &t.hub {
        return Ok(Via::Api(Api {
            base: hub.trim_end_matches('/').to_owned(),
            client,
            token,
        }));
    }
    if !t.data_dir.is_dir() {
        bail!(
            "no hub data directory {} (run `hubmesh init` or pass --data-dir)",
            t.data_dir.display()
        );
    }
    if let Some(base) = running_hub(&client, &t.data_dir, token.as_deref()).await {
        return Ok(Via::Api(Api {
            base,
            client,
            token,
        }));
    }
    let dir = t.data_dir.join("store");
    let store = tokio::task::spawn_blocking(move || Store::open(dir))
        .await
        .context("opening the store")?
        .map_err(|e| {
            anyhow::anyhow!("opening the hub's store: {e} (if the hub is running, pass --hub URL)")
        })?;
    Ok(Via::Store(
        Accounts::open(&store, usize::MAX).context("opening the accounts")?,
    ))
}

/// The facade URL of the hub running on `data_dir`, if one answers there
/// as that hub (same PeerId as the data dir's identity).
async fn running_hub(
    client: &reqwest::Client,
    data_dir: &Path,
    token: Option<&str>,
) -> Option<String> {
    let base = std::fs::read_to_string(data_dir.join(FACADE_ADDR_FILE)).ok()?;
    let base = base.trim().trim_end_matches('/').to_owned();
    let key = data_dir.join("mesh").join("identity.key");
    let me = key
        .exists()
        .then(|| hubmesh_node::hub::load_or_create_identity(&key).ok())
        .flatten()?
        .public()
        .to_peer_id()
        .to_string();
    let mut req = client
        .get(format!("{base}/admin/identity"))
        .timeout(Duration::from_secs(3));
    if let Some(t) = token {
        req = req.header("X-Admin-Token", t);
    }
    let v: serde_json::Value = req.send().await.ok()?.json().await.ok()?;
    (v.get("peerId").and_then(|p| p.as_str()) == Some(me.as_str())).then_some(base)
}

fn read_password() -> anyhow::Result<String> {
    let (a, b) = if std::io::stdin().is_terminal() {
        let a = rpassword::prompt_password("Password: ").context("reading the password")?;
        let b = rpassword::prompt_password("Repeat password: ").context("reading the password")?;
        (a, b)
    } else {
        let mut input = std::io::stdin().lock().take(2 * MAX_LINE);
        let mut line = |what: &str| -> anyhow::Result<String> {
            let mut s = String::new();
            let n = (&mut input)
                .take(MAX_LINE)
                .read_line(&mut s)
                .with_context(|| format!("reading the {what} from stdin"))?;
            if n == 0 {
                bail!("stdin ended before the {what} (give the password twice, one per line)");
            }
            if !s.ends_with('\n') && n as u64 == MAX_LINE {
                bail!("the {what} line is too long");
            }
            Ok(s.trim_end_matches(['\n', '\r']).to_owned())
        };
        let a = line("password")?;
        let b = line("repeated password")?;
        (a, b)
    };
    if a != b {
        bail!("the passwords do not match");
    }
    Ok(a)
}

fn print_view(v: &UserView) {
    let kind = match (&v.oauth_provider, v.has_password) {
        (Some(p), _) => format!("oauth:{p}"),
        (None, true) => "password".to_owned(),
        (None, false) => "no-login".to_owned(),
    };
    let role = if v.admin { "admin" } else { "user" };
    println!("{}\t{role}\t{kind}\t{}", v.username, v.created);
}

async fn via_store(accounts: &Accounts, cmd: UserCmd) -> anyhow::Result<()> {
    match cmd {
        UserCmd::Add { name, admin, .. } => {
            let pw = read_password()?;
            let a = accounts.create(&name, Some(&pw), admin).await?;
            println!(
                "created user {}{}",
                a.username,
                if admin { " (admin)" } else { "" }
            );
        }
        UserCmd::List { .. } => {
            let mut after: Option<String> = None;
            loop {
                let page: Vec<Account> = accounts.list(after.as_deref(), 1000)?;
                for a in &page {
                    print_view(&UserView::from(a));
                }
                match page.last() {
                    Some(last) if page.len() == 1000 => after = Some(last.username.clone()),
                    _ => break,
                }
            }
        }
        UserCmd::Remove { name, .. } => {
            accounts.remove(&name).await?;
            println!("removed user {name}");
        }
        UserCmd::Passwd { name, .. } => {
            if !accounts.exists(&name)? {
                bail!("no such user {name:?}");
            }
            let pw = read_password()?;
            accounts.set_password(&name, &pw).await?;
            println!("password updated for {name}");
        }
    }
    Ok(())
}

impl Api {
    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.header("X-Admin-Token", t);
        }
        r
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<serde_json::Value> {
        let resp = req
            .send()
            .await
            .with_context(|| format!("contacting the hub at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.context("reading the hub's answer")?;
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            let msg = v
                .get("message")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
                .unwrap_or(text);
            bail!("the hub answered {status}: {msg}");
        }
        Ok(v)
    }
}

fn path_segment(name: &str) -> String {
    url::form_urlencoded::byte_serialize(name.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

async fn via_api(api: &Api, cmd: UserCmd) -> anyhow::Result<()> {
    use reqwest::Method;
    match cmd {
        UserCmd::Add { name, admin, .. } => {
            let pw = read_password()?;
            let body = serde_json::json!({ "username": name, "password": pw, "admin": admin });
            api.send(api.req(Method::POST, "/admin/users").json(&body))
                .await?;
            println!("created user {name}{}", if admin { " (admin)" } else { "" });
        }
        UserCmd::List { .. } => {
            let mut after: Option<String> = None;
            loop {
                let mut r = api.req(Method::GET, "/admin/users");
                if let Some(a) = &after {
                    r = r.query(&[("after", a)]);
                }
                let list: UserList =
                    serde_json::from_value(api.send(r).await?).context("decoding the user list")?;
                for v in &list.users {
                    print_view(v);
                }
                match list.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
        }
        UserCmd::Remove { name, .. } => {
            api.send(api.req(
                Method::DELETE,
                &format!("/admin/users/{}", path_segment(&name)),
            ))
            .await?;
            println!("removed user {name}");
        }
        UserCmd::Passwd { name, .. } => {
            let pw = read_password()?;
            let body = serde_json::json!({ "password": pw });
            api.send(
                api.req(
                    Method::PUT,
                    &format!("/admin/users/{}/password", path_segment(&name)),
                )
                .json(&body),
            )
            .await?;
            println!("password updated for {name}");
        }
    }
    Ok(())
}
