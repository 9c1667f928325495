//! Real hub processes started with the CLI contract (`hubmesh run --data-dir
//! --http --mesh [--bootstrap]…`, then the `hubmesh ready …` line), driven
//! over HTTP as a Discovery client would. Every wait has a deadline.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use hubmesh_node::discovery::{hmac_message, sign_registration};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_hubmesh");
const ACME: &str = "acme-secret";
const THIRD: &str = "third-secret";
const WAIT: Duration = Duration::from_secs(20);

struct HubProc {
    child: Child,
    http: String,
    mesh: String,
    peer: String,
}

impl Drop for HubProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, bootstrap: &[&str], rate_limits: &str) -> Result<HubProc> {
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--data-dir"])
        .arg(dir)
        .args([
            "--http",
            "127.0.0.1:0",
            "--mesh",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ])
        .args(["--federation", "cli-test"])
        .env("CLUSTER_SECRET_ACME_CORP", ACME)
        .env("CLUSTER_SECRET_THIRD", THIRD)
        .env("HUBMESH_RATE_LIMITS", rate_limits)
        .env("HUBMESH_SYNC_INTERVAL_SECS", "2")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for b in bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    let mut child = cmd.spawn().context("spawning hubmesh run")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = match rx.recv_timeout(WAIT) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            bail!("no ready line within {WAIT:?}");
        }
    };
    let field = |name: &str| -> Result<String> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
            .with_context(|| format!("no {name}= in {line:?}"))
    };
    if !line.starts_with("hubmesh ready ") {
        bail!("unexpected first line {line:?}");
    }
    let (http, mesh, peer) = (field("http")?, field("mesh")?, field("peer")?);
    assert!(mesh.ends_with(&format!("/p2p/{peer}")), "{line}");
    Ok(HubProc {
        child,
        http: format!("http://{http}"),
        mesh,
        peer,
    })
}

fn ts(offset: i64) -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::seconds(offset))
        .format(&time::format_description::well_known::Rfc3339)
        .expect("formatting a timestamp")
}

fn register_body(cluster: &str, secret: &str, server_id: &str) -> Value {
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let url = format!("https://{server_id}.example:9090");
    let t = ts(0);
    json!({
        "serverId": server_id, "clusterId": cluster, "publicUrl": url, "version": "1.2.3",
        "publicKey": key, "timestamp": t,
        "clusterSecretHmac": sign_registration(secret.as_bytes(), &hmac_message(server_id, cluster, &url, &key, &t)),
    })
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("building a client")
}

async fn register(hub: &HubProc, cluster: &str, secret: &str, id: &str) -> Result<String> {
    let r = client()
        .post(format!("{}/api/v1/servers/register", hub.http))
        .json(&register_body(cluster, secret, id))
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await?;
    if status != 200 {
        bail!("register answered {status}: {v}");
    }
    Ok(v["token"].as_str().context("token")?.to_owned())
}

async fn lookup(hub: &HubProc, cluster: &str, token: &str) -> Result<(u16, Value)> {
    let r = client()
        .get(format!("{}/api/v1/cluster/{cluster}", hub.http))
        .bearer_auth(token)
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

fn ids(v: &Value) -> Vec<String> {
    v["servers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["serverId"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `lookup` until `pred` holds on the server ids, or fails at the deadline.
async fn wait_for(
    hub: &HubProc,
    cluster: &str,
    token: &str,
    what: &str,
    pred: impl Fn(&[String]) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, v) = lookup(hub, cluster, token).await?;
        if status == 200 && pred(&ids(&v)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: still {status} {v} after {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const S1: &str = "11111111-1111-4111-8111-111111111111";
const S2: &str = "22222222-2222-4222-8222-222222222222";
const S3: &str = "33333333-3333-4333-8333-333333333333";

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temp dir")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_across_two_hub_processes() -> Result<()> {
    let (d1, d2) = (tmp(), tmp());
    let h1 = start(d1.path(), &[], "off")?;
    let h2 = start(d2.path(), &[&h1.mesh], "off")?;

    // A server registers at hub 1; another server of its cluster finds it at hub 2.
    let t1 = register(&h1, "acme-corp", ACME, S1).await?;
    let t2 = register(&h2, "acme-corp", ACME, S2).await?;
    wait_for(&h2, "acme-corp", &t2, "S1 visible at hub 2", |ids| {
        ids.contains(&S1.to_string()) && ids.contains(&S2.to_string())
    })
    .await?;
    let (_, v) = lookup(&h2, "acme-corp", &t2).await?;
    let s1 = v["servers"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["serverId"] == S1))
        .context("S1")?;
    assert_eq!(s1["hub"], h1.peer.as_str());

    // Hub 1's token works at hub 2: heartbeat there.
    let r = client()
        .post(format!("{}/api/v1/servers/heartbeat", h2.http))
        .bearer_auth(&t1)
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await?["nextHeartbeatSec"], 120);

    // A third cluster's token gets 403.
    let t3 = register(&h1, "third", THIRD, S3).await?;
    let (status, v) = {
        let deadline = Instant::now() + WAIT;
        loop {
            let (s, v) = lookup(&h2, "acme-corp", &t3).await?;
            // 401 until hub 2 has seen hub 1 (it has: it bootstrapped to it).
            if s != 401 || Instant::now() > deadline {
                break (s, v);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"], "forbidden");

    // Delete at hub 2 removes it at hub 1.
    let r = client()
        .delete(format!("{}/api/v1/servers/{S1}", h2.http))
        .bearer_auth(&t1)
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    wait_for(&h1, "acme-corp", &t1, "S1 deleted at hub 1", |ids| {
        !ids.contains(&S1.to_string()) && ids.contains(&S2.to_string())
    })
    .await?;

    // The discovery helpers of the CLI: register at hub 2, look up at hub 1.
    let out = Command::new(BIN)
        .args([
            "discovery",
            "register",
            "--hub",
            &h2.http,
            "--cluster",
            "acme-corp",
        ])
        .args(["--public-url", "https://cli.example:9090"])
        .env("CLUSTER_SECRET_ACME_CORP", ACME)
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let reg: Value = serde_json::from_slice(&out.stdout)?;
    let cli_id = reg["serverId"].as_str().context("serverId")?.to_owned();
    let cli_token = reg["token"].as_str().context("token")?.to_owned();
    wait_for(
        &h1,
        "acme-corp",
        &t1,
        "CLI-registered server at hub 1",
        |ids| ids.contains(&cli_id),
    )
    .await?;
    let out = Command::new(BIN)
        .args([
            "discovery",
            "lookup",
            "--hub",
            &h1.http,
            "--cluster",
            "acme-corp",
        ])
        .args(["--token", &cli_token])
        .output()?;
    assert!(out.status.success(), "{out:?}");
    assert!(ids(&serde_json::from_slice(&out.stdout)?).contains(&cli_id));
    let out = Command::new(BIN)
        .args([
            "discovery",
            "register",
            "--hub",
            &h2.http,
            "--cluster",
            "acme-corp",
        ])
        .args(["--public-url", "https://cli.example:9090"])
        .env("CLUSTER_SECRET_ACME_CORP", "wrong")
        .output()?;
    assert!(!out.status.success(), "a wrong secret fails");

    // The operator CLI over the same hubs.
    let out = Command::new(BIN)
        .args(["status", "--hub", &h2.http])
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let status: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(status["identity"]["peerId"], h2.peer.as_str());
    assert!(status["records"]["server"].as_u64().is_some());
    let out = Command::new(BIN)
        .args(["peers", "--hub", &h2.http])
        .output()?;
    assert!(out.status.success());
    let peers: Value = serde_json::from_slice(&out.stdout)?;
    assert!(
        peers
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x["peerId"] == h1.peer.as_str()))
    );
    let out = Command::new(BIN)
        .args([
            "lookup",
            "--hub",
            &h1.http,
            "server",
            &format!("acme-corp/{S2}"),
        ])
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let rec: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(rec["body"]["server_id"], S2);
    assert_eq!(rec["origin"], h2.peer.as_str());
    let out = Command::new(BIN)
        .args(["lookup", "--hub", &h1.http, "server", "acme-corp/none"])
        .output()?;
    assert!(!out.status.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_right_after_register_keeps_it_and_the_mesh_agrees() -> Result<()> {
    let (d1, d2) = (tmp(), tmp());
    let h2 = start(d2.path(), &[], "off")?;
    let mut h1 = start(d1.path(), &[&h2.mesh], "off")?;
    let peer1 = h1.peer.clone();
    let token = register(&h1, "acme-corp", ACME, S1).await?;
    h1.child.kill()?; // SIGKILL, right after the 2xx
    h1.child.wait()?;
    drop(h1);
    let h1 = start(d1.path(), &[&h2.mesh], "off")?;
    assert_eq!(h1.peer, peer1, "same identity after restart");
    let (status, v) = lookup(&h1, "acme-corp", &token).await?;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        ids(&v),
        vec![S1.to_string()],
        "the acknowledged write survived"
    );
    wait_for(&h2, "acme-corp", &token, "hub 2 agrees", |ids| {
        ids == [S1.to_string()]
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_rate_limit_and_sigterm() -> Result<()> {
    let d = tmp();
    let mut h = start(d.path(), &[], "on")?;
    let c = client();
    // Wrong HMAC.
    let mut b = register_body("acme-corp", "wrong", S1);
    let r = c
        .post(format!("{}/api/v1/servers/register", h.http))
        .json(&b)
        .send()
        .await?;
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await?["error"], "bad_hmac");
    // Oversized body.
    b["version"] = Value::String("v".repeat(200_000));
    let r = c
        .post(format!("{}/api/v1/servers/register", h.http))
        .json(&b)
        .send()
        .await?;
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<Value>().await?["error"], "too_large");
    // 60 per minute per IP on this family (2 used above).
    let mut limited = None;
    for i in 0..80 {
        let r = c
            .get(format!("{}/api/v1/cluster/acme-corp", h.http))
            .send()
            .await?;
        if r.status() == 429 {
            limited = Some((i, r));
            break;
        }
        assert_eq!(r.status(), 401);
    }
    let (i, r) = limited.context("never rate limited")?;
    assert_eq!(i, 58, "the 61st request of the minute is refused");
    let retry: u64 = r.headers()["retry-after"].to_str()?.parse()?;
    assert!((1..=60).contains(&retry));
    assert_eq!(r.json::<Value>().await?["error"], "rate_limited");
    // Health is not in the family.
    assert_eq!(
        c.get(format!("{}/health", h.http)).send().await?.status(),
        200
    );

    // SIGTERM: a clean exit.
    let pid = h.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()?
            .success()
    );
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = h.child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            bail!("no exit within {WAIT:?} of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    Ok(())
}

#[test]
fn init_writes_identity_and_config() -> Result<()> {
    let d = tmp();
    let data: PathBuf = d.path().join("data");
    let out = Command::new(BIN)
        .args(["init", "--data-dir"])
        .arg(&data)
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout)?;
    let peer = text
        .lines()
        .find_map(|l| l.strip_prefix("peer "))
        .context("peer line")?
        .to_owned();
    assert!(data.join("mesh/identity.key").exists());
    let cfg = std::fs::read_to_string(data.join("hubmesh.toml"))?;
    assert!(cfg.contains("# http = \"127.0.0.1:8080\""));
    // Running with that data dir keeps that identity.
    let h = start(&data, &[], "off")?;
    assert_eq!(h.peer, peer);
    Ok(())
}
