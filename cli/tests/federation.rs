//! Two real `hubmesh run` processes: node X on hub 1 and node Y on hub 2
//! (accounts made with `hubmesh user add`, tokens from `POST /token`)
//! register identities and profiles; a search on hub 2 finds X; X signals Y
//! and Y answers; a payload sealed with `hubmesh seal` to Y's published key
//! crosses both hubs and opens with `hubmesh open`; X disconnects and Y's
//! next signal gets "offline"; a token logged out at hub 1 is refused at
//! hub 2. And SIGTERM closes a live signaling session with 1001 before the
//! process exits. Every wait has a deadline.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::{HubOptions, HubProc, WAIT, client, hubmesh, run_with_stdin, tmp, wait_until};
use futures::{SinkExt, StreamExt};
use hubmesh_node::federation::nodes::node_id_of;
use rand::SeedableRng;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const PW: &str = "correct horse battery";

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A hub of the `fed-test` federation.
fn hub() -> HubOptions {
    HubOptions::new("fed-test")
}

/// Runs the CLI with `args`, `stdin` piped in, within [`WAIT`]; fails unless it succeeds.
fn cli(args: &[&str], stdin: &[u8]) -> Result<std::process::Output> {
    let out = run_with_stdin(&mut hubmesh(args), stdin, WAIT)?;
    if !out.status.success() {
        bail!(
            "hubmesh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// `hubmesh user add NAME --data-dir DIR` with the password [`PW`] on stdin.
fn add_user(dir: &std::path::Path, name: &str) -> Result<()> {
    let pw = format!("{PW}\n{PW}\n");
    let dir = dir.to_str().context("UTF-8 data dir")?;
    cli(&["user", "add", name, "--data-dir", dir], pw.as_bytes())?;
    Ok(())
}

/// `POST /register-node-id` with `body` and `tok`; fails unless it is a 200.
async fn register_identity(hub: &HubProc, tok: &str, body: Value) -> Result<()> {
    let r = call(
        hub,
        reqwest::Method::POST,
        "/register-node-id",
        Some(tok),
        Some(body),
    )
    .await?;
    assert_eq!(r.0, 200, "{r:?}");
    Ok(())
}

async fn token(hub: &HubProc, user: &str) -> Result<String> {
    let r = client()
        .post(format!("{}/token", hub.http))
        .form(&[("username", user), ("password", PW)])
        .send()
        .await?;
    let v: Value = r.json().await?;
    Ok(v["access_token"]
        .as_str()
        .context("access_token")?
        .to_owned())
}

async fn call(
    hub: &HubProc,
    method: reqwest::Method,
    path: &str,
    tok: Option<&str>,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let mut r = client().request(method, format!("{}{path}", hub.http));
    if let Some(t) = tok {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await?;
    Ok((
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    ))
}

/// A fresh RSA-2048 identity: (node_id, registration body).
fn identity(seed: u64) -> (String, Value) {
    let k = rsa::RsaPrivateKey::new(&mut rand::rngs::StdRng::seed_from_u64(seed), 2048).unwrap();
    let public = k.to_public_key();
    let node_id = node_id_of(public.to_public_key_der().unwrap().as_bytes());
    let pem = k.to_pkcs8_pem(LineEnding::LF).unwrap();
    let kp = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, node_id.clone());
    let cert = p.self_signed(&kp).unwrap().pem();
    let body = json!({"node_id": node_id, "public_key": public.to_public_key_pem(LineEnding::LF).unwrap(), "certificate": cert});
    (node_id, body)
}

async fn ws(hub: &HubProc, tok: &str) -> Result<Ws> {
    let u = format!(
        "{}/ws/signal?token={tok}",
        hub.http.replacen("http", "ws", 1)
    );
    let (s, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(u)).await??;
    Ok(s)
}

async fn next(s: &mut Ws) -> Result<Value> {
    loop {
        match tokio::time::timeout(WAIT, s.next())
            .await
            .context("no frame in time")?
        {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t)?),
            Some(Ok(Message::Close(c))) => bail!("closed: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("{e}"),
            None => bail!("ended"),
        }
    }
}

async fn send(s: &mut Ws, target: &str, payload: Value) -> Result<()> {
    let f = json!({"type": "signal", "target_node_id": target, "payload": payload});
    Ok(s.send(Message::text(f.to_string())).await?)
}

async fn until<F: std::future::Future<Output = Result<bool>>>(
    what: &str,
    f: impl FnMut() -> F,
) -> Result<()> {
    wait_until(what, WAIT, Duration::from_millis(100), f).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hub_processes_identity_search_signal_seal_offline_logout() -> Result<()> {
    let (d1, d2, keys) = (tmp(), tmp(), tmp());
    add_user(d1.path(), "xavier")?;
    add_user(d2.path(), "yvonne")?;
    let h1 = hub().start(d1.path())?;
    let h2 = hub().bootstrap(&h1.mesh).start(d2.path())?;
    let tx = token(&h1, "xavier").await?;
    let ty = token(&h2, "yvonne").await?;

    // Y's sealing key, made with the CLI.
    let key_file = keys.path().join("y.key");
    let out = cli(&["seal-keygen", "--out", key_file.to_str().unwrap()], b"")?;
    let y_public = String::from_utf8(out.stdout)?.trim().to_owned();

    let (x_id, x_body) = identity(11);
    let (y_id, y_body) = identity(12);
    register_identity(&h1, &tx, x_body).await?;
    register_identity(&h2, &ty, y_body).await?;
    let r = call(
        &h1,
        reqwest::Method::PUT,
        "/profile",
        Some(&tx),
        Some(json!({"name": "X", "expertise": [{"topic": "distributed systems", "level": 5}]})),
    )
    .await?;
    assert_eq!(r.0, 200, "{r:?}");
    let r = call(&h2, reqwest::Method::PUT, "/profile", Some(&ty), Some(json!({"name": "Y", "x25519_public_key": y_public, "expertise": [{"topic": "webrtc", "level": 3}]}))).await?;
    assert_eq!(r.0, 200, "{r:?}");

    // A search on hub 2 finds X.
    until("X in hub 2's search", || async {
        let (s, v) = call(
            &h2,
            reqwest::Method::GET,
            "/discovery/search?q=distributed",
            None,
            None,
        )
        .await?;
        Ok(s == 200
            && v.as_array()
                .is_some_and(|a| a.iter().any(|p| p["node_id"] == x_id.as_str())))
    })
    .await?;

    // X on hub 1, Y on hub 2: X signals Y, Y answers.
    let mut wx = ws(&h1, &tx).await?;
    assert_eq!(next(&mut wx).await?["type"], "auth_ok");
    let mut wy = ws(&h2, &ty).await?;
    assert_eq!(next(&mut wy).await?["node_id"], y_id.as_str());
    until("Y online on hub 1", || async {
        let (_, v) = call(
            &h1,
            reqwest::Method::GET,
            &format!("/profile/{y_id}"),
            None,
            None,
        )
        .await?;
        Ok(v["online"] == true)
    })
    .await?;
    send(&mut wx, &y_id, json!({"type": "offer", "sdp": "v=0"})).await?;
    let got = next(&mut wy).await?;
    assert_eq!(
        got,
        json!({"type": "signal", "from_node_id": x_id, "payload": {"type": "offer", "sdp": "v=0"}})
    );
    send(&mut wy, &x_id, json!({"type": "answer"})).await?;
    assert_eq!(next(&mut wx).await?["payload"]["type"], "answer");

    // hubmesh seal (key from Y's profile on hub 1) → through both hubs → hubmesh open.
    let profile_url = format!("{}/profile/{y_id}", h1.http);
    let out = cli(&["seal", "--profile", &profile_url], b"secret sdp")?;
    let envelope = String::from_utf8(out.stdout)?.trim().to_owned();
    send(&mut wx, &y_id, json!({"sealed": envelope})).await?;
    let got = next(&mut wy).await?;
    let relayed = got["payload"]["sealed"]
        .as_str()
        .context("sealed")?
        .to_owned();
    let out = cli(
        &["open", "--key", key_file.to_str().unwrap()],
        relayed.as_bytes(),
    )?;
    assert_eq!(out.stdout, b"secret sdp");

    // X disconnects; Y's next signal gets "offline".
    wx.close(None).await?;
    drop(wx);
    until("X offline on hub 2", || async {
        let (_, v) = call(
            &h2,
            reqwest::Method::GET,
            &format!("/profile/{x_id}"),
            None,
            None,
        )
        .await?;
        Ok(v["online"] == false)
    })
    .await?;
    send(&mut wy, &x_id, json!({"type": "ice-candidate"})).await?;
    let e = next(&mut wy).await?;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("target_offline")),
        "{e}"
    );

    // X's token, logged out at hub 1, is refused at hub 2.
    let (st, _) = call(&h2, reqwest::Method::GET, "/profile", Some(&tx), None).await?;
    assert_eq!(st, 200, "roaming token accepted before logout");
    let (st, v) = call(&h1, reqwest::Method::POST, "/logout", Some(&tx), None).await?;
    assert_eq!(st, 200, "{v}");
    until("revocation at hub 2", || async {
        Ok(call(&h2, reqwest::Method::GET, "/profile", Some(&tx), None)
            .await?
            .0
            == 401)
    })
    .await?;
    let mut refused = ws(&h2, &tx).await?;
    let e = next(&mut refused).await?;
    assert_eq!(e["code"], "token_revoked", "{e}");
    Ok(())
}

/// SIGTERM to a hub process with a live signaling session: the session gets
/// a close frame with code 1001 (going away) before the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_signal_sessions_with_going_away() -> Result<()> {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let d = tmp();
    add_user(d.path(), "zoe")?;
    let mut h = hub().start(d.path())?;
    let tz = token(&h, "zoe").await?;
    let (_, body) = identity(21);
    register_identity(&h, &tz, body).await?;
    let mut s = ws(&h, &tz).await?;
    assert_eq!(next(&mut s).await?["type"], "auth_ok");

    let pid = nix::unistd::Pid::from_raw(i32::try_from(h.child.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    loop {
        match tokio::time::timeout(WAIT, s.next())
            .await
            .context("no close frame in time")?
        {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
                break;
            }
            Some(Ok(Message::Close(None))) => bail!("a close frame without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("the socket failed before a close frame: {e}"),
            None => bail!("the socket ended without a close frame"),
        }
    }
    let status = common::wait_exit(
        &mut h.child,
        "the hub after SIGTERM",
        WAIT,
        Duration::from_millis(20),
    )
    .await?;
    assert!(status.success(), "{status:?}");
    Ok(())
}
