//! Signal round trip, cross-hub vs same-hub, over the federation-hub
//! family's `WS /ws/signal` (compat §E, `specs/federation.md` §5), as real
//! clients do it: an account per node (operator API `POST /admin/users`), a
//! token (`POST /token`), an RSA node identity with a self-signed certificate
//! (`POST /register-node-id`), then WebSocket sessions. Node A on hub 0 sends
//! a signal to B (hub 0, same hub) or C (hub 1, cross-hub); the peer's client
//! echoes it back to A; the round trip is A's send → A's receipt. Samples
//! alternate between the two paths so both see the same machine noise.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use hubmesh_node::federation::nodes::node_id_of;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::bench::{Figure, percentile};
use crate::net::Testnet;

/// Round trips per path.
const SAMPLES: usize = 200;
/// Deadline of one round trip (and of the warm-up per path).
const DEADLINE: Duration = Duration::from_secs(10);
/// Deadline of the whole scenario.
const TOTAL: Duration = Duration::from_secs(120);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Percentiles of one path.
#[derive(Debug, Clone, Serialize)]
pub struct Rtt {
    /// Samples.
    pub samples: usize,
    /// p50, ms.
    pub p50_ms: f64,
    /// p99, ms.
    pub p99_ms: f64,
}

/// The signal scenario's outcome.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SignalResult {
    /// Measured.
    Measured {
        /// A and B on hub 0.
        same_hub: Rtt,
        /// A on hub 0, C on hub 1.
        cross_hub: Rtt,
        /// cross p50 / same p50.
        ratio_p50: f64,
    },
    /// Not measured, and why.
    NotAvailable {
        /// Why.
        reason: String,
    },
}

impl SignalResult {
    /// The report's figures.
    pub fn figures(&self) -> Vec<Figure> {
        match self {
            SignalResult::Measured {
                same_hub,
                cross_hub,
                ratio_p50,
            } => vec![
                Figure::new(
                    "signal round trip same-hub p50",
                    Some(same_hub.p50_ms),
                    "ms",
                )
                .note(format!(
                    "p99 {:.2} ms, {} samples, WS /ws/signal, echo by the peer client",
                    same_hub.p99_ms, same_hub.samples
                )),
                Figure::new(
                    "signal round trip cross-hub p50",
                    Some(cross_hub.p50_ms),
                    "ms",
                )
                .note(format!(
                    "p99 {:.2} ms, {} samples, hub 0 ↔ hub 1 over the mesh",
                    cross_hub.p99_ms, cross_hub.samples
                )),
                Figure::new(
                    "signal round trip, cross-hub / same-hub p50",
                    Some(*ratio_p50),
                    "ratio",
                )
                .target("≤ 1.5 (issue 5)", Some(*ratio_p50 <= 1.5)),
            ],
            SignalResult::NotAvailable { reason } => vec![
                Figure::new("signal round trip, cross-hub / same-hub p50", None, "ratio")
                    .target("≤ 1.5 (issue 5)", None)
                    .note(format!("not available: {reason}")),
            ],
        }
    }

    /// One Markdown paragraph.
    pub fn summary(&self) -> String {
        match self {
            SignalResult::Measured {
                same_hub,
                cross_hub,
                ratio_p50,
            } => format!(
                "Same hub: p50 {:.3} ms, p99 {:.3} ms ({} samples). Cross hub: p50 {:.3} ms, p99 {:.3} ms ({} samples). Ratio of p50s {:.2} (target ≤ 1.5).",
                same_hub.p50_ms,
                same_hub.p99_ms,
                same_hub.samples,
                cross_hub.p50_ms,
                cross_hub.p99_ms,
                cross_hub.samples,
                ratio_p50
            ),
            SignalResult::NotAvailable { reason } => format!("Not available: {reason}."),
        }
    }
}

/// Measures the round trips on `net` (at least 2 hubs, all running).
pub async fn run(net: &Testnet) -> SignalResult {
    match tokio::time::timeout(TOTAL, measure(net)).await {
        Ok(Ok(r)) => r,
        Ok(Err(reason)) => SignalResult::NotAvailable { reason },
        Err(_) => SignalResult::NotAvailable {
            reason: format!("did not finish within {TOTAL:?}"),
        },
    }
}

/// A connected node client.
struct Node {
    id: String,
    ws: Ws,
}

async fn node(
    http: &reqwest::Client,
    base: &str,
    ws_base: &str,
    name: &str,
) -> Result<Node, String> {
    let password = format!("{name}-testnet-password");
    let r = http
        .post(format!("{base}/admin/users"))
        .json(&json!({"username": name, "password": password}))
        .send()
        .await
        .map_err(|e| format!("POST /admin/users: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("POST /admin/users answered {}", r.status()));
    }
    let r = http
        .post(format!("{base}/token"))
        .form(&[("username", name), ("password", password.as_str())])
        .send()
        .await
        .map_err(|e| format!("POST /token: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("POST /token answered {}", r.status()));
    }
    let v: Value = r.json().await.map_err(|e| format!("POST /token: {e}"))?;
    let token = v["access_token"]
        .as_str()
        .ok_or("POST /token: no access_token")?
        .to_owned();
    let (id, body) = tokio::task::spawn_blocking(identity)
        .await
        .map_err(|e| format!("making an identity: {e}"))??;
    let r = http
        .post(format!("{base}/register-node-id"))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("POST /register-node-id: {e}"))?;
    if !r.status().is_success() {
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        return Err(format!("POST /register-node-id answered {status}: {text}"));
    }
    let url = format!("{ws_base}/ws/signal?token={token}");
    let (mut ws, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| "WS /ws/signal: no handshake in time".to_owned())?
        .map_err(|e| format!("WS /ws/signal: {e}"))?;
    let first = next_json(&mut ws).await?;
    if first["type"] != "auth_ok" {
        return Err(format!("WS /ws/signal: first frame {first}"));
    }
    Ok(Node { id, ws })
}

/// A fresh RSA-2048 node identity: (node id, `/register-node-id` body).
fn identity() -> Result<(String, Value), String> {
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).map_err(|e| e.to_string())?;
    let public = key.to_public_key();
    let der = public.to_public_key_der().map_err(|e| e.to_string())?;
    let id = node_id_of(der.as_bytes());
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| e.to_string())?;
    let kp = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256)
        .map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, id.clone());
    let cert = params.self_signed(&kp).map_err(|e| e.to_string())?.pem();
    let public_pem = public
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| e.to_string())?;
    let body = json!({"node_id": id, "public_key": public_pem, "certificate": cert});
    Ok((id, body))
}

async fn next_json(ws: &mut Ws) -> Result<Value, String> {
    loop {
        match tokio::time::timeout(DEADLINE, ws.next()).await {
            Err(_) => return Err("no frame in time".into()),
            Ok(None) => return Err("the socket ended".into()),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(Message::Text(t)))) => {
                return serde_json::from_str(&t).map_err(|e| format!("bad frame {t}: {e}"));
            }
            Ok(Some(Ok(Message::Close(c)))) => return Err(format!("closed: {c:?}")),
            Ok(Some(Ok(_))) => {}
        }
    }
}

fn signal(target: &str, payload: Value) -> Message {
    Message::text(
        json!({"type": "signal", "target_node_id": target, "payload": payload}).to_string(),
    )
}

/// Echoes every signal back to its sender until the socket ends.
fn echo(mut node: Node) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Ok(msg)) = node.ws.next().await {
            let Message::Text(t) = msg else { continue };
            let Ok(v) = serde_json::from_str::<Value>(&t) else {
                continue;
            };
            if v["type"] == "signal"
                && let Some(from) = v["from_node_id"].as_str()
                && node
                    .ws
                    .send(signal(from, v["payload"].clone()))
                    .await
                    .is_err()
            {
                break;
            }
        }
    })
}

/// Sends `seq` to `target` and waits for its echo; error frames (a target's
/// presence not replicated yet) are returned as `Err`.
async fn round_trip(a: &mut Node, target: &str, seq: u64) -> Result<Duration, String> {
    let t0 = Instant::now();
    a.ws.send(signal(target, json!({"seq": seq})))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let v = next_json(&mut a.ws).await?;
        if v["type"] == "signal" && v["payload"]["seq"] == seq {
            return Ok(t0.elapsed());
        }
        if v["type"] == "error" {
            return Err(format!("error frame {v}"));
        }
    }
}

async fn warm_up(a: &mut Node, target: &str, seq: &mut u64) -> Result<(), String> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        *seq += 1;
        match round_trip(a, target, *seq).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("warm-up to {target}: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn stats(mut v: Vec<f64>) -> Rtt {
    v.sort_by(f64::total_cmp);
    Rtt {
        samples: v.len(),
        p50_ms: percentile(&v, 50.0).unwrap_or(f64::NAN),
        p99_ms: percentile(&v, 99.0).unwrap_or(f64::NAN),
    }
}

async fn measure(net: &Testnet) -> Result<SignalResult, String> {
    if net.len() < 2 {
        return Err("needs 2 hubs".into());
    }
    let http = crate::client::http_client().map_err(|e| e.to_string())?;
    let base = |i: usize| {
        net.info(i)
            .map(|h| h.http.clone())
            .map_err(|e| e.to_string())
    };
    let (h0, h1) = (base(0)?, base(1)?);
    let ws0 = h0.replacen("http://", "ws://", 1);
    let ws1 = h1.replacen("http://", "ws://", 1);
    let tag = std::process::id();
    let mut a = node(&http, &h0, &ws0, &format!("sig-a-{tag}")).await?;
    let b = node(&http, &h0, &ws0, &format!("sig-b-{tag}")).await?;
    let c = node(&http, &h1, &ws1, &format!("sig-c-{tag}")).await?;
    let (b_id, c_id) = (b.id.clone(), c.id.clone());
    let echoes = [echo(b), echo(c)];
    let mut seq = 0;
    let result = async {
        warm_up(&mut a, &b_id, &mut seq).await?;
        warm_up(&mut a, &c_id, &mut seq).await?;
        let (mut same, mut cross) = (Vec::new(), Vec::new());
        for k in 0..2 * SAMPLES {
            seq += 1;
            let (target, into) = if k % 2 == 0 {
                (&b_id, &mut same)
            } else {
                (&c_id, &mut cross)
            };
            let d = round_trip(&mut a, target, seq).await?;
            into.push(d.as_secs_f64() * 1000.0);
        }
        let (same, cross) = (stats(same), stats(cross));
        let ratio_p50 = cross.p50_ms / same.p50_ms;
        Ok(SignalResult::Measured {
            same_hub: same,
            cross_hub: cross,
            ratio_p50,
        })
    }
    .await;
    let _ = a.ws.close(None).await;
    for e in echoes {
        e.abort();
    }
    result
}
