//! Real hub processes started with the CLI contract (`hubmesh run --data-dir
//! --http --mesh [--bootstrap]…`, then the `hubmesh ready …` line), driven
//! over HTTP as a Discovery client would. Every wait has a deadline.

mod common;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use common::{BIN, HubOptions, HubProc, WAIT, client, poll, run_with_stdin, tmp, wait_exit};
use hubmesh_node::discovery::{hmac_message, sign_registration};
use serde_json::{Value, json};

const ACME: &str = "acme-secret";
const THIRD: &str = "third-secret";

/// Runs a CLI command (stdin empty, output captured) within [`WAIT`].
fn run(cmd: &mut Command) -> Result<Output> {
    run_with_stdin(cmd, b"", WAIT)
}

/// A hub of the `cli-test` federation with both clusters' secrets and
/// `HUBMESH_RATE_LIMITS=rate_limits`.
fn hub(rate_limits: &str) -> HubOptions {
    HubOptions::new("cli-test")
        .env("CLUSTER_SECRET_ACME_CORP", ACME)
        .env("CLUSTER_SECRET_THIRD", THIRD)
        .rate_limits(rate_limits)
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
    poll(what, WAIT, Duration::from_millis(50), || async {
        let (status, v) = lookup(hub, cluster, token).await?;
        Ok(if status == 200 && pred(&ids(&v)) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(format!("{status} {v}"))
        })
    })
    .await
}

const S1: &str = "11111111-1111-4111-8111-111111111111";
const S2: &str = "22222222-2222-4222-8222-222222222222";
const S3: &str = "33333333-3333-4333-8333-333333333333";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_across_two_hub_processes() -> Result<()> {
    let (d1, d2) = (tmp(), tmp());
    let h1 = hub("off").start(d1.path())?;
    let h2 = hub("off").bootstrap(&h1.mesh).start(d2.path())?;

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
    let (status, v) = poll(
        "a third cluster's token judged at hub 2",
        WAIT,
        Duration::from_millis(50),
        || async {
            let (s, v) = lookup(&h2, "acme-corp", &t3).await?;
            // 401 until hub 2 has seen hub 1 (it has: it bootstrapped to it).
            Ok(if s != 401 {
                ControlFlow::Break((s, v))
            } else {
                ControlFlow::Continue(format!("{s} {v}"))
            })
        },
    )
    .await?;
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
    let out = run(Command::new(BIN)
        .args([
            "discovery",
            "register",
            "--hub",
            &h2.http,
            "--cluster",
            "acme-corp",
        ])
        .args(["--public-url", "https://cli.example:9090"])
        .env("CLUSTER_SECRET_ACME_CORP", ACME))?;
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
    let out = run(Command::new(BIN)
        .args([
            "discovery",
            "lookup",
            "--hub",
            &h1.http,
            "--cluster",
            "acme-corp",
        ])
        .args(["--token", &cli_token]))?;
    assert!(out.status.success(), "{out:?}");
    assert!(ids(&serde_json::from_slice(&out.stdout)?).contains(&cli_id));
    let out = run(Command::new(BIN)
        .args([
            "discovery",
            "register",
            "--hub",
            &h2.http,
            "--cluster",
            "acme-corp",
        ])
        .args(["--public-url", "https://cli.example:9090"])
        .env("CLUSTER_SECRET_ACME_CORP", "wrong"))?;
    assert!(!out.status.success(), "a wrong secret fails");

    // The operator CLI over the same hubs.
    let out = run(Command::new(BIN).args(["status", "--hub", &h2.http]))?;
    assert!(out.status.success(), "{out:?}");
    let status: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(status["identity"]["peerId"], h2.peer.as_str());
    assert!(status["records"]["server"].as_u64().is_some());
    let out = run(Command::new(BIN).args(["peers", "--hub", &h2.http]))?;
    assert!(out.status.success());
    let peers: Value = serde_json::from_slice(&out.stdout)?;
    assert!(
        peers
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x["peerId"] == h1.peer.as_str()))
    );
    let out = run(Command::new(BIN).args([
        "lookup",
        "--hub",
        &h1.http,
        "server",
        &format!("acme-corp/{S2}"),
    ]))?;
    assert!(out.status.success(), "{out:?}");
    let rec: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(rec["body"]["server_id"], S2);
    assert_eq!(rec["origin"], h2.peer.as_str());
    let out =
        run(Command::new(BIN).args(["lookup", "--hub", &h1.http, "server", "acme-corp/none"]))?;
    assert!(!out.status.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_right_after_register_keeps_it_and_the_mesh_agrees() -> Result<()> {
    let (d1, d2) = (tmp(), tmp());
    let h2 = hub("off").start(d2.path())?;
    let mut h1 = hub("off").bootstrap(&h2.mesh).start(d1.path())?;
    let peer1 = h1.peer.clone();
    let token = register(&h1, "acme-corp", ACME, S1).await?;
    h1.child.kill()?; // SIGKILL, right after the 2xx
    h1.child.wait()?;
    drop(h1);
    let h1 = hub("off").bootstrap(&h2.mesh).start(d1.path())?;
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

/// A hub killed with -9 and restarted on the same mesh address is back in
/// the mesh at once. Its peer still holds the dead connection (QUIC idle
/// timeout: 10 s) and must prefer the restarted hub's new one; before that
/// rule, writes at the restarted hub reached the peer only after ~10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_restart_on_the_same_address_rejoins_before_the_idle_timeout() -> Result<()> {
    let (d1, d2) = (tmp(), tmp());
    let h2 = hub("off").sync_interval_secs(3600).start(d2.path())?;
    let mut h1 = hub("off")
        .sync_interval_secs(3600)
        .bootstrap(&h2.mesh)
        .start(d1.path())?;
    let token = register(&h1, "acme-corp", ACME, S1).await?;
    wait_for(&h2, "acme-corp", &token, "S1 at hub 2", |ids| {
        ids == [S1.to_string()]
    })
    .await?;
    let (addr, _) = h1
        .mesh
        .rsplit_once("/p2p/")
        .context("mesh address without /p2p/")?;
    let addr = addr.to_owned();
    h1.child.kill()?;
    h1.child.wait()?;
    drop(h1);
    let h1 = hub("off")
        .sync_interval_secs(3600)
        .mesh(&addr)
        .bootstrap(&h2.mesh)
        .start(d1.path())?;
    let restarted = std::time::Instant::now();
    register(&h1, "acme-corp", ACME, S2).await?;
    poll(
        "S2, written at the restarted hub, at hub 2",
        Duration::from_secs(6),
        Duration::from_millis(50),
        || async {
            let (status, v) = lookup(&h2, "acme-corp", &token).await?;
            Ok(if status == 200 && ids(&v).contains(&S2.to_string()) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(format!("{status} {v}"))
            })
        },
    )
    .await?;
    eprintln!(
        "rejoined and replicated {:?} after the restart",
        restarted.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_rate_limit_and_sigterm() -> Result<()> {
    let d = tmp();
    let mut h = hub("on").start(d.path())?;
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
    let status = wait_exit(&mut h.child, "SIGTERM", WAIT, Duration::from_millis(20)).await?;
    assert!(status.success(), "{status:?}");
    Ok(())
}

#[test]
fn init_writes_identity_and_config() -> Result<()> {
    let d = tmp();
    let data: PathBuf = d.path().join("data");
    let out = run(Command::new(BIN).args(["init", "--data-dir"]).arg(&data))?;
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
    let h = hub("off").start(&data)?;
    assert_eq!(h.peer, peer);
    Ok(())
}

/// Operator commands authenticate with `--admin-token-file` when the hub does
/// not treat loopback clients as admins; a missing or empty file is a clear
/// error, and no token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_read_the_admin_token_from_a_file() -> Result<()> {
    let d = tmp();
    let conf = d.path().join("hub.toml");
    std::fs::write(&conf, "[facade]\nadmin_from_loopback = false\n")?;
    let h = hub("off")
        .env("HUBMESH_CONFIG", conf.to_str().context("utf-8 path")?)
        .env_remove("HUBMESH_ADMIN_TOKEN")
        .env_remove("HUBMESH_ADMIN_TOKEN_FILE")
        .start(d.path())?;
    let token_file = d.path().join("admin.token");
    assert!(token_file.is_file(), "the hub generated its admin token");
    let status = |extra: &[&str]| -> Result<Output> {
        let mut cmd = Command::new(BIN);
        cmd.args(["status", "--hub", &h.http])
            .args(extra)
            .env_remove("HUBMESH_ADMIN_TOKEN")
            .env_remove("HUBMESH_ADMIN_TOKEN_FILE");
        run_with_stdin(&mut cmd, b"", WAIT)
    };

    let out = status(&["--admin-token-file", token_file.to_str().context("utf-8")?])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        v["identity"]["peerId"],
        Value::String(h.peer.clone()),
        "{v}"
    );

    let out = status(&[])?;
    assert!(!out.status.success(), "no token: refused");

    let empty = d.path().join("empty.token");
    std::fs::write(&empty, "\n")?;
    let out = status(&["--admin-token-file", empty.to_str().context("utf-8")?])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = status(&["--admin-token-file", "/nonexistent/admin.token"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading the admin token file"));
    Ok(())
}

/// `[signal]` settings follow flag > `HUBMESH_SIGNAL_*` env > file >
/// default in a real `hubmesh run`, observed through validation: an
/// out-of-range value stops the hub with an error naming the setting and the
/// value used, a valid one above it lets the hub start.
#[test]
fn signal_settings_flag_over_env_over_file() -> Result<()> {
    let d = tmp();
    let conf = |name: &str, queue: u32| -> Result<String> {
        let path = d.path().join(name);
        std::fs::write(&path, format!("[signal]\noutbound_queue = {queue}\n"))?;
        Ok(path.to_str().context("utf-8 path")?.to_owned())
    };
    let (good_file, bad_file) = (conf("good.toml", 8)?, conf("bad.toml", 0)?);
    // A hub that must refuse to start: its error, within WAIT.
    let refused = |file: &str, env: Option<&str>| -> Result<String> {
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--data-dir"])
            .arg(d.path().join("refused"))
            .args([
                "--http",
                "127.0.0.1:0",
                "--mesh",
                "/ip4/127.0.0.1/udp/0/quic-v1",
            ])
            .env("HUBMESH_CONFIG", file);
        match env {
            Some(v) => cmd.env("HUBMESH_SIGNAL_OUTBOUND_QUEUE", v),
            None => cmd.env_remove("HUBMESH_SIGNAL_OUTBOUND_QUEUE"),
        };
        let out = run(&mut cmd)?;
        assert!(!out.status.success(), "{out:?}");
        Ok(String::from_utf8(out.stderr)?)
    };

    // Env beats file: the env's 0 is used (and refused), not the file's 8.
    let e = refused(&good_file, Some("0"))?;
    assert!(
        e.contains(
            "signal.outbound_queue (--signal-outbound-queue, HUBMESH_SIGNAL_OUTBOUND_QUEUE) must be 1..=4096, got 0"
        ),
        "{e}"
    );
    // Not a number: clap names the flag and the value.
    let e = refused(&good_file, Some("lots"))?;
    assert!(
        e.contains("--signal-outbound-queue") && e.contains("lots"),
        "{e}"
    );
    // File beats default: the file's 0 is refused when nothing is above it.
    let e = refused(&bad_file, None)?;
    assert!(e.contains("got 0"), "{e}");

    // Env beats file: a valid env value hides the file's bad one.
    let h = hub("off")
        .env("HUBMESH_CONFIG", &bad_file)
        .env("HUBMESH_SIGNAL_OUTBOUND_QUEUE", "16")
        .start(&d.path().join("env"))?;
    drop(h);
    // Flag beats env: a valid flag hides the env's bad value.
    let h = hub("off")
        .env("HUBMESH_CONFIG", &good_file)
        .env("HUBMESH_SIGNAL_OUTBOUND_QUEUE", "0")
        .arg("--signal-outbound-queue")
        .arg("32")
        .start(&d.path().join("flag"))?;
    drop(h);
    Ok(())
}

/// Reads from `s` into `buf` until `done(buf)` says how many bytes make the
/// message, each read within [`WAIT`]; returns those bytes (the rest stays).
async fn read_until(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> Option<usize>,
) -> Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(n) = done(buf) {
            return Ok(buf.drain(..n).collect());
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .context("no answer in time")??;
        if n == 0 {
            bail!("connection closed after {:?}", String::from_utf8_lossy(buf));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A whole HTTP/1.1 response head and its `Content-Length` body, once in `b`.
fn http_response(b: &[u8]) -> Option<usize> {
    let head = b.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&b[..head]).to_ascii_lowercase();
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (b.len() >= head + len).then_some(head + len)
}

/// Issue 4: a request in flight when SIGTERM arrives completes with its
/// normal answer, new connections are refused from the moment the shutdown
/// starts, the process exits 0 within a bound, and the acknowledged write is
/// in the store after a restart.
///
/// The request is made "in flight" deterministically, without sleeps: a
/// register (a durable write) sent over a raw TCP stream with
/// `Expect: 100-continue`. The hub answers `100 Continue` only when the
/// handler starts reading the body, so once the test has read it the
/// request is inside the hub, waiting for its body; the test sends half the
/// body, then SIGTERM, then polls until a new connection is refused (the
/// hub has stopped accepting: shutdown has started, while this request is
/// still waiting for the rest of its body), and only then sends the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_request_finish() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let d = tmp();
    let mut h = hub("off").start(d.path())?;
    let addr = h
        .http
        .strip_prefix("http://")
        .context("http url")?
        .to_owned();
    let body = serde_json::to_vec(&register_body("acme-corp", ACME, S1))?;
    let (first, rest) = body.split_at(body.len() / 2);

    let mut s = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(&addr)).await??;
    let head = format!(
        "POST /api/v1/servers/register HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    let mut buf = Vec::new();
    let cont = read_until(&mut s, &mut buf, http_response).await?;
    assert!(
        cont.starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "{:?}",
        String::from_utf8_lossy(&cont)
    );
    s.write_all(first).await?;

    // SIGTERM, then wait until the hub refuses new connections.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(h.child.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let stopped_accepting = std::time::Instant::now();
    poll(
        "the hub to refuse new connections",
        WAIT,
        Duration::from_millis(10),
        || async {
            Ok(
                match tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(&addr)).await? {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        ControlFlow::Break(())
                    }
                    other => ControlFlow::Continue(format!("{other:?}")),
                },
            )
        },
    )
    .await?;
    let refused_after = stopped_accepting.elapsed();
    assert!(
        h.child.try_wait()?.is_none(),
        "the hub waits for the in-flight request"
    );

    // The rest of the body: the request completes with its normal answer.
    s.write_all(rest).await?;
    let resp = read_until(&mut s, &mut buf, http_response).await?;
    let resp = String::from_utf8(resp)?;
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    let json: Value = serde_json::from_str(resp.split("\r\n\r\n").nth(1).context("body")?)?;
    let token = json["token"].as_str().context("token")?.to_owned();
    // Still refused while the hub finishes its teardown (or already gone).
    let again = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(&addr)).await?;
    assert!(again.is_err(), "a new connection after shutdown began");

    // A clean exit, well within the grace period (10 s) plus teardown.
    let status = wait_exit(&mut h.child, "SIGTERM", WAIT, Duration::from_millis(20)).await?;
    assert!(status.success(), "{status:?}");
    drop(s);
    eprintln!("new connections refused {refused_after:?} after SIGTERM");

    // The acknowledged write survived: the same data dir serves it.
    let h = hub("off").start(d.path())?;
    let (status, v) = lookup(&h, "acme-corp", &token).await?;
    assert_eq!(status, 200, "{v}");
    assert_eq!(ids(&v), [S1], "{v}");
    Ok(())
}
