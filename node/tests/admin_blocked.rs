//! `PUT /admin/blocked` (fault injection, `specs/facade.md`) over real HTTP on
//! two in-process hubs: it disconnects and refuses the listed peers, `[]`
//! heals, and bad input gets a clear 4xx.

#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)]

use std::time::{Duration, Instant};

use hubmesh_node::{Config, Hub};
use serde_json::{Value, json};

async fn hub(dir: &std::path::Path, bootstrap: Option<String>) -> Hub {
    let mut c = Config::default();
    c.data_dir = dir.to_path_buf();
    c.http = "127.0.0.1:0".parse().unwrap();
    c.mesh_listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    c.bootstrap = bootstrap.into_iter().map(|b| b.parse().unwrap()).collect();
    c.federation = "blocked-test".into();
    tokio::time::timeout(Duration::from_secs(30), Hub::spawn(c))
        .await
        .unwrap()
        .unwrap()
}

async fn put(hub: &Hub, body: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .put(format!("http://{}/admin/blocked", hub.http_addr()))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn connected(hub: &Hub, peer: &str) -> bool {
    hub.mesh()
        .peers()
        .await
        .unwrap()
        .iter()
        .any(|p| p.peer.to_string() == peer)
}

async fn wait_connected(hub: &Hub, peer: &str, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while connected(hub, peer).await != want {
        assert!(
            Instant::now() < deadline,
            "connected to {peer} should be {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_disconnects_heal_reconnects_bad_input_refused() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let h1 = hub(d1.path(), None).await;
    let h2 = hub(d2.path(), Some(h1.dial_addr())).await;
    let (p1, p2) = (h1.peer_id().to_string(), h2.peer_id().to_string());
    wait_connected(&h1, &p2, true).await;

    let (s, v) = put(&h1, &json!([p2]).to_string()).await;
    assert_eq!((s, &v), (200, &json!({"blocked": [p2]})));
    wait_connected(&h1, &p2, false).await;
    wait_connected(&h2, &p1, false).await;

    let (s, v) = put(&h1, "[]").await;
    assert_eq!((s, &v), (200, &json!({"blocked": []})));
    wait_connected(&h1, &p2, true).await;

    for (body, status, code) in [
        ("[\"not-a-peer\"]", 422, "invalid_field"),
        (&*json!([p1]).to_string(), 422, "invalid_field"),
        ("{\"blocked\": []}", 422, "invalid_field"),
        ("[", 400, "malformed_json"),
    ] {
        let (s, v) = put(&h1, body).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (status, Some(code)),
            "{body}: {v}"
        );
    }
    let many: Vec<String> = (0..1025).map(|_| p2.clone()).collect();
    let (s, v) = put(&h1, &json!(many).to_string()).await;
    assert_eq!(s, 422, "{v}");
    h2.shutdown().await;
    h1.shutdown().await;
}
