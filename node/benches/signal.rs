//! Signaling benchmark (`cargo bench -p hubmesh-node --bench signal`),
//! loopback only, bounded in count and time:
//!
//! 1. round trip X→Y→X over `/ws/signal`, Y on another hub vs on the same
//!    hub, samples interleaved in one run (p50/p99; target cross ≤ 1.5× same);
//! 2. relayed messages/s through one hub with P connected pairs (target ≥ 20k/s);
//! 3. idle WebSocket memory: the hub's RSS delta per connection with N idle
//!    sessions (target ≤ 16 KB).
//!
//! Scenarios 2 and 3 run the hub in a child process (this binary re-executed
//! with `HUBMESH_BENCH_CHILD=1`) so its RSS and CPU are the hub's alone.
//! Their node identities are written straight into the hub's store (no
//! certificate: generating thousands of RSA keys would dominate the run and
//! identity checks are not on the signaling path); scenario 1 registers real
//! RSA identities through `POST /register-node-id`.
//!
//! Knobs: `BENCH_RTT_SAMPLES` (2000), `BENCH_PAIRS` (1000), `BENCH_SECS` (5),
//! `BENCH_IDLE_CONNS` (10000), `BENCH_ONLY` (`rtt`, `throughput`, `idle`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)] // benchmark driver

/// The allocator the `hubmesh` binary ships with, so the hub measured here
/// allocates as a deployed one does.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{SinkExt, StreamExt};
use hubmesh_node::federation::nodes::{NodeBody, identity_draft, node_id_of};
use hubmesh_node::now_ms;
use hubmesh_node::{Config, Hub};
use rand::SeedableRng;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.data_dir = dir.to_path_buf();
    c.http = "127.0.0.1:0".parse().unwrap();
    c.mesh_listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    c.admin_token = Some("bench".into());
    c.rate_limits.enabled = false;
    c.max_connections = 30_000;
    c.signal.max_sessions = 30_000;
    c.signal.outbound_queue = 256;
    c
}

/// An account (no password: token-only) and a token for it.
async fn account(hub: &Hub, name: &str) -> String {
    let s = hub.state();
    s.federation
        .accounts
        .create(name, None, false)
        .await
        .unwrap();
    s.tokens
        .issue_user(name, false, Duration::from_secs(3600))
        .unwrap()
        .0
}

async fn ws(addr: &str, token: &str) -> Result<(Ws, String)> {
    let u = format!("ws://{addr}/ws/signal?token={token}");
    let (mut s, _) =
        tokio::time::timeout(Duration::from_secs(30), tokio_tungstenite::connect_async(u))
            .await??;
    let hello = next(&mut s).await?;
    if hello["type"] != "auth_ok" {
        bail!("no auth_ok: {hello}");
    }
    Ok((s, hello["node_id"].as_str().unwrap_or_default().to_owned()))
}

async fn next(s: &mut Ws) -> Result<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), s.next()).await? {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t)?),
            Some(Ok(Message::Close(c))) => bail!("closed {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("{e}"),
            None => bail!("ended"),
        }
    }
}

fn frame(target: &str, n: u64) -> Message {
    Message::text(
        json!({"type": "signal", "target_node_id": target, "payload": {"n": n}}).to_string(),
    )
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

// ---- scenario 1: round trip, same hub vs cross hub ----

async fn register_real(hub: &Hub, name: &str, seed: u64) -> String {
    let token = account(hub, name).await;
    let k = rsa::RsaPrivateKey::new(&mut rand::rngs::StdRng::seed_from_u64(seed), 2048).unwrap();
    let public = k.to_public_key();
    let node_id = node_id_of(public.to_public_key_der().unwrap().as_bytes());
    let kp = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(
        &k.to_pkcs8_pem(LineEnding::LF).unwrap(),
        &rcgen::PKCS_RSA_SHA256,
    )
    .unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, node_id.clone());
    let body = json!({"node_id": node_id, "public_key": public.to_public_key_pem(LineEnding::LF).unwrap(), "certificate": p.self_signed(&kp).unwrap().pem()});
    let r = reqwest::Client::new()
        .post(format!("http://{}/register-node-id", hub.http_addr()))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    token
}

async fn rtt(s: &mut Ws, peer: &mut Ws, target: &str, back: &str, n: u64) -> Result<f64> {
    let t = Instant::now();
    s.send(frame(target, n)).await?;
    let m = next(peer).await?;
    if m["payload"]["n"] != n {
        bail!("unexpected {m}");
    }
    peer.send(frame(back, n)).await?;
    let m = next(s).await?;
    if m["payload"]["n"] != n {
        bail!("unexpected {m}");
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

async fn scenario_rtt() -> Result<()> {
    let samples = env_usize("BENCH_RTT_SAMPLES", 2000);
    let (d1, d2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let h1 = Hub::spawn(config(d1.path())).await?;
    let mut c2 = config(d2.path());
    c2.bootstrap = vec![h1.dial_addr().parse()?];
    let h2 = Hub::spawn(c2).await?;
    let tx = register_real(&h1, "x", 1).await;
    let tz = register_real(&h1, "z", 2).await;
    let ty = register_real(&h2, "y", 3).await;
    let (mut x, xid) = ws(&h1.http_addr().to_string(), &tx).await?;
    let (mut z, zid) = ws(&h1.http_addr().to_string(), &tz).await?;
    let (mut y, yid) = ws(&h2.http_addr().to_string(), &ty).await?;
    // Wait until each hub routes to the other's node.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(hubmesh_node::federation::presence::is_online(h1.state(), &yid)
        && hubmesh_node::federation::presence::is_online(h2.state(), &xid))
    {
        if Instant::now() > deadline {
            bail!("presence did not replicate");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Warm-up (stream setup, caches).
    for i in 0..100 {
        rtt(&mut x, &mut y, &yid, &xid, i).await?;
        rtt(&mut x, &mut z, &zid, &xid, i).await?;
    }
    let (mut cross, mut same) = (Vec::new(), Vec::new());
    for i in 0..samples as u64 {
        cross.push(rtt(&mut x, &mut y, &yid, &xid, i).await?);
        same.push(rtt(&mut x, &mut z, &zid, &xid, i).await?);
    }
    let (c50, c99, s50, s99) = (
        pct(&mut cross, 0.5),
        pct(&mut cross, 0.99),
        pct(&mut same, 0.5),
        pct(&mut same, 0.99),
    );
    println!(
        "rtt samples={samples} same-hub p50={s50:.3}ms p99={s99:.3}ms cross-hub p50={c50:.3}ms p99={c99:.3}ms ratio_p50={:.2} (target <= 1.5)",
        c50 / s50
    );
    drop((x, y, z));
    h2.shutdown().await;
    h1.shutdown().await;
    Ok(())
}

// ---- child hub for scenarios 2 and 3 ----

/// Child role: a hub with `BENCH_NODES` token-only accounts and identity
/// records; writes `addr` then one `token` per line to `BENCH_OUT`, prints
/// `ready <pid>`, and runs until its stdin closes.
async fn child() -> Result<()> {
    let n = env_usize("BENCH_NODES", 2000);
    let dir = tempfile::tempdir()?;
    let mut c = config(dir.path());
    c.signal.presence_ttl = Duration::from_secs(env_usize("BENCH_PRESENCE_TTL", 30) as u64);
    let hub = Hub::spawn(c).await?;
    let mut tokens = Vec::with_capacity(n);
    let mut drafts = Vec::new();
    let now = now_ms();
    for i in 0..n {
        let name = format!("u{i}");
        tokens.push(account(&hub, &name).await);
        let body = NodeBody {
            node_id: format!("dpc-node-{i:016x}"),
            public_key: String::new(),
            certificate: String::new(),
            owner_iss: hub.peer_id().to_string(),
            owner_sub: name,
            registered_ms: now,
            hub: hub.peer_id().to_string(),
        };
        drafts.push(
            identity_draft(&body, now + 86_400_000, now).map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        if drafts.len() == 256 {
            hub.mesh().write(std::mem::take(&mut drafts)).await?;
        }
    }
    if !drafts.is_empty() {
        hub.mesh().write(drafts).await?;
    }
    let out = std::env::var("BENCH_OUT")?;
    let mut text = format!("{}\n", hub.http_addr());
    for t in &tokens {
        text.push_str(t);
        text.push('\n');
    }
    std::fs::write(&out, text)?;
    println!("ready {}", std::process::id());
    // Run until the parent closes stdin.
    tokio::task::spawn_blocking(|| {
        let mut s = String::new();
        while std::io::stdin()
            .read_line(&mut s)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    })
    .await?;
    hub.shutdown().await;
    Ok(())
}

struct ChildHub {
    child: std::process::Child,
    pid: u32,
    addr: String,
    tokens: Vec<String>,
    _dir: tempfile::TempDir,
}

impl ChildHub {
    fn start(nodes: usize, presence_ttl_secs: u64) -> Result<ChildHub> {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("tokens");
        let mut child = Command::new(std::env::current_exe()?)
            .env("HUBMESH_BENCH_CHILD", "1")
            .env("BENCH_NODES", nodes.to_string())
            .env("BENCH_PRESENCE_TTL", presence_ttl_secs.to_string())
            .env("BENCH_OUT", &out)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let pid: u32 = line
            .trim()
            .strip_prefix("ready ")
            .context("no ready line")?
            .parse()?;
        let text = std::fs::read_to_string(&out)?;
        let mut lines = text.lines();
        let addr = lines.next().context("addr")?.to_owned();
        Ok(ChildHub {
            child,
            pid,
            addr,
            tokens: lines.map(str::to_owned).collect(),
            _dir: dir,
        })
    }

    fn rss_kb(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    fn stop(mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.flush();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect_all(addr: &str, tokens: &[String], parallel: usize) -> Result<Vec<(Ws, String)>> {
    let mut out = Vec::with_capacity(tokens.len());
    for chunk in tokens.chunks(parallel) {
        let futs = chunk.iter().map(|t| ws(addr, t));
        for r in futures::future::join_all(futs).await {
            out.push(r?);
        }
    }
    Ok(out)
}

// ---- scenario 2: relayed messages/s through one hub ----

async fn scenario_throughput() -> Result<()> {
    let pairs = env_usize("BENCH_PAIRS", 1000);
    let secs = env_usize("BENCH_SECS", 5) as u64;
    let hub = ChildHub::start(pairs * 2, 60)?;
    let conns = connect_all(&hub.addr, &hub.tokens, 128).await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    let mut it = conns.into_iter();
    const WINDOW: u64 = 8;
    while let (Some((a, _aid)), Some((b, bid))) = (it.next(), it.next()) {
        let delivered = delivered.clone();
        tasks.push(tokio::spawn(async move {
            let (mut a_tx, mut a_rx) = a.split();
            let (_b_tx, mut b_rx) = b.split();
            let received = Arc::new(AtomicU64::new(0));
            let r2 = received.clone();
            let d2 = delivered.clone();
            let reader = tokio::spawn(async move {
                while let Some(Ok(m)) = b_rx.next().await {
                    if matches!(m, Message::Text(_)) {
                        r2.fetch_add(1, Ordering::Relaxed);
                        d2.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            // Drain anything the hub says to the sender (errors would show here).
            let errs = tokio::spawn(async move { while let Some(Ok(_)) = a_rx.next().await {} });
            let mut sent = 0u64;
            while Instant::now() < deadline {
                // Closed loop: at most WINDOW frames in flight per pair.
                if sent - received.load(Ordering::Relaxed) >= WINDOW {
                    tokio::task::yield_now().await;
                    continue;
                }
                if a_tx.send(frame(&bid, sent)).await.is_err() {
                    break;
                }
                sent += 1;
            }
            reader.abort();
            errs.abort();
        }));
    }
    let start = Instant::now();
    let before = delivered.load(Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let n = delivered.load(Ordering::Relaxed) - before;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    println!(
        "throughput pairs={pairs} secs={secs} delivered={n} rate={rate:.0} msg/s (target >= 20000)"
    );
    hub.stop();
    Ok(())
}

// ---- scenario 3: idle WebSocket memory ----

async fn scenario_idle() -> Result<()> {
    let n = env_usize("BENCH_IDLE_CONNS", 10_000);
    // A long presence TTL keeps refresh writes out of the idle measurement.
    let hub = ChildHub::start(n, 600)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = hub.rss_kb();
    let conns = connect_all(&hub.addr, &hub.tokens, 64).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = hub.rss_kb();
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    println!(
        "idle conns={n} rss_before={before}KB rss_after={after}KB per_connection={:.1}KB (target <= 16KB)",
        per / 1024.0
    );
    drop(conns);
    hub.stop();
    Ok(())
}

fn main() -> Result<()> {
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if std::env::var_os("HUBMESH_BENCH_CHILD").is_some() {
        return rt.block_on(child());
    }
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    rt.block_on(async {
        if only.is_empty() || only == "rtt" {
            scenario_rtt().await?;
        }
        if only.is_empty() || only == "throughput" {
            scenario_throughput().await?;
        }
        if only.is_empty() || only == "idle" {
            scenario_idle().await?;
        }
        Ok(())
    })
}
