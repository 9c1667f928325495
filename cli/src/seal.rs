//! `hubmesh seal`, `hubmesh open`, `hubmesh seal-keygen`: the sealed signal
//! envelope of `specs/sealed.md` from the shell. `seal` reads a plaintext
//! on stdin and prints the envelope text (what goes into a signal payload
//! as `{"sealed": "<text>"}`), to a recipient key given directly or read
//! from the recipient's profile on any hub; `open` reads an envelope text
//! on stdin and writes the plaintext to stdout.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use hubmesh_node::sealed;

/// `hubmesh seal`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("recipient").required(true).args(["to", "profile"])))]
pub struct SealArgs {
    /// The recipient's x25519 public key (base64 of 32 bytes).
    #[arg(long)]
    to: Option<String>,
    /// The recipient's profile URL (`http://HUB/profile/NODE_ID`): its
    /// `x25519_public_key` is used.
    #[arg(long)]
    profile: Option<String>,
    /// Accept an invalid TLS certificate (self-signed hubs).
    #[arg(long)]
    insecure: bool,
}

/// `hubmesh open`.
#[derive(Debug, clap::Args)]
pub struct OpenArgs {
    /// File holding the recipient's x25519 secret key (base64), as written
    /// by `hubmesh seal-keygen`.
    #[arg(long)]
    key: PathBuf,
}

/// `hubmesh seal-keygen`.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Where to write the secret key (mode 0600); the public key is printed.
    #[arg(long)]
    out: PathBuf,
    /// Overwrite an existing file.
    #[arg(long)]
    force: bool,
}

fn read_stdin(limit: usize) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::stdin()
        .take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .context("reading stdin")?;
    if buf.len() > limit {
        bail!("input longer than {limit} bytes");
    }
    Ok(buf)
}

async fn profile_key(url: &str, insecure: bool) -> anyhow::Result<String> {
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(insecure)
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    let resp = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.context("profile is not JSON")?;
    if !status.is_success() {
        bail!("GET {url}: {status}: {body}");
    }
    body["x25519_public_key"]
        .as_str()
        .map(str::to_owned)
        .context("the profile publishes no x25519_public_key")
}

/// Runs `hubmesh seal`.
pub async fn seal(args: SealArgs) -> anyhow::Result<()> {
    let key = match (args.to, args.profile) {
        (Some(k), _) => k,
        (None, Some(url)) => profile_key(&url, args.insecure).await?,
        (None, None) => bail!("give --to or --profile"),
    };
    let recipient = sealed::public_key_from_b64(&key).context("recipient key")?;
    let plaintext = read_stdin(sealed::MAX_PLAINTEXT)?;
    let text = sealed::seal_text(&recipient, &plaintext)?;
    println!("{text}");
    Ok(())
}

/// Runs `hubmesh open`.
pub fn open(args: OpenArgs) -> anyhow::Result<()> {
    let raw = std::fs::read_to_string(&args.key)
        .with_context(|| format!("reading {}", args.key.display()))?;
    let secret = sealed::secret_key_from_b64(&raw).context("secret key file")?;
    let input = read_stdin((sealed::OVERHEAD + sealed::MAX_PLAINTEXT) * 4 / 3 + 16)?;
    let text = std::str::from_utf8(&input).context("envelope is not text")?;
    let plaintext = sealed::open_text(&secret, text.trim())?;
    std::io::stdout().write_all(&plaintext)?;
    Ok(())
}

/// Writes `bytes` to a new file only its owner can read.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let mut f = o.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Runs `hubmesh seal-keygen`.
pub fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    if args.out.exists() && !args.force {
        bail!("{} exists (use --force to overwrite)", args.out.display());
    }
    let (secret, public) = sealed::generate_keypair();
    let line = format!("{}\n", sealed::key_to_b64(&secret.to_bytes()));
    write_private(&args.out, line.as_bytes())
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("{}", sealed::key_to_b64(public.as_bytes()));
    Ok(())
}
