//! Facade tests through `oneshot` on the router of a real (single) hub:
//! every documented status and JSON error of the Discovery family, the
//! operator API guard, health and metrics.

#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)] // test helpers

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD};
use http_body_util::BodyExt;
use hubmesh_node::discovery::{hmac_message, sign_registration};
use hubmesh_node::{Config, Hub};
use serde_json::{Value, json};
use tower::ServiceExt;

const SECRET: &str = "acme-secret";

async fn hub(dir: &std::path::Path, per_minute: u32) -> Hub {
    let mut c = Config::default();
    c.data_dir = dir.to_path_buf();
    c.http = "127.0.0.1:0".parse().unwrap();
    c.mesh_listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    c.admin_token = Some("admintok".into());
    c.rate_limits.discovery_per_minute = per_minute;
    c.max_body_bytes = 4096;
    for (id, s) in [("ACME_CORP", SECRET), ("OTHER", "other-secret")] {
        c.discovery.cluster_secrets.insert(id.into(), s.into());
    }
    tokio::time::timeout(Duration::from_secs(30), Hub::spawn(c))
        .await
        .unwrap()
        .unwrap()
}

fn app(hub: &Hub, peer: &str) -> Router {
    hubmesh_node::facade::router(hub.state().clone())
        .layer(MockConnectInfo(peer.parse::<SocketAddr>().unwrap()))
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let resp = tokio::time::timeout(Duration::from_secs(10), app.clone().oneshot(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, headers, v)
}

fn now_rfc3339(offset_secs: i64) -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::seconds(offset_secs))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn register_body(cluster: &str, secret: &str, server_id: &str, ts: &str) -> Value {
    let key = B64.encode([9u8; 32]);
    let url = "https://s1.example:9090";
    json!({
        "serverId": server_id, "clusterId": cluster, "publicUrl": url, "version": "0.1.0",
        "publicKey": key, "timestamp": ts,
        "clusterSecretHmac": sign_registration(secret.as_bytes(), &hmac_message(server_id, cluster, url, &key, ts)),
    })
}

fn post_json(path: &str, body: &Value) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn with_token(method: &str, path: &str, token: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap()
}

fn assert_error(v: &Value, code: &str) {
    assert_eq!(v["error"], code, "{v}");
    assert!(v["message"].is_string(), "{v}");
}

const S1: &str = "6f1c2b3a-0000-4000-8000-000000000001";
const S2: &str = "6f1c2b3a-0000-4000-8000-000000000002";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_statuses_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(dir.path(), 10_000).await;
    let app = app(&hub, "127.0.0.1:40000");

    // Register: 200 with a token.
    let body = register_body("acme-corp", SECRET, S1, &now_rfc3339(0));
    let (s, _, v) = call(&app, post_json("/api/v1/servers/register", &body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["expiresIn"], 86400);
    assert_eq!(v["serverId"], S1);
    let token = v["token"].as_str().unwrap().to_owned();

    // Replay of the same request: 409.
    let (s, _, v) = call(&app, post_json("/api/v1/servers/register", &body)).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_error(&v, "replay");

    // Wrong HMAC, unknown cluster: 401 bad_hmac.
    let mut bad = register_body("acme-corp", "wrong", S2, &now_rfc3339(0));
    let (s, _, v) = call(&app, post_json("/api/v1/servers/register", &bad)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "bad_hmac");
    let unknown = register_body("nobody", SECRET, S2, &now_rfc3339(0));
    let (s, _, v) = call(&app, post_json("/api/v1/servers/register", &unknown)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "bad_hmac");

    // Stale and future timestamps: 401 stale_timestamp.
    for off in [-301, 301] {
        let b = register_body("acme-corp", SECRET, S2, &now_rfc3339(off));
        let (s, _, v) = call(&app, post_json("/api/v1/servers/register", &b)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "offset {off}");
        assert_error(&v, "stale_timestamp");
    }

    // Malformed JSON: 400. Missing field: 422. Oversized: 413.
    let req = Request::post("/api/v1/servers/register")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"serverId\": "))
        .unwrap();
    let (s, _, v) = call(&app, req).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, "malformed_json");
    let (s, _, v) = call(
        &app,
        post_json("/api/v1/servers/register", &json!({"serverId": S2})),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_error(&v, "invalid_field");
    let mut big = body.clone();
    big["version"] = Value::String("x".repeat(10_000));
    let (s, h, v) = call(&app, post_json("/api/v1/servers/register", &big)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&v, "too_large");
    // The unread body makes the connection unusable: clients are told not to reuse it.
    assert_eq!(h["connection"], "close");

    // Bad key, bad URL, bad id: 422.
    bad = register_body("acme-corp", SECRET, S2, &now_rfc3339(0));
    bad["publicKey"] = Value::String(B64.encode([1u8; 31]));
    let (s, _, v) = call(&app, post_json("/api/v1/servers/register", &bad)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(v["message"].as_str().unwrap().contains("publicKey"), "{v}");
    bad["publicKey"] = body["publicKey"].clone();
    bad["publicUrl"] = Value::String("ftp://x".into());
    let (s, _, _) = call(&app, post_json("/api/v1/servers/register", &bad)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    bad["publicUrl"] = body["publicUrl"].clone();
    bad["serverId"] = Value::String("not-a-uuid".into());
    let (s, _, _) = call(&app, post_json("/api/v1/servers/register", &bad)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);

    // Heartbeat and lookup with the token.
    let (s, _, v) = call(
        &app,
        with_token("POST", "/api/v1/servers/heartbeat", &token),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"status": "ok", "nextHeartbeatSec": 120}));
    let (s, _, v) = call(&app, with_token("GET", "/api/v1/cluster/acme-corp", &token)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["servers"][0]["serverId"], S1);
    assert_eq!(v["servers"][0]["hub"], hub.peer_id().to_string());

    // Another cluster's token: 403.
    let other = register_body("other", "other-secret", S2, &now_rfc3339(0));
    let (s, _, v) = call(&app, post_json("/api/v1/servers/register", &other)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let other_token = v["token"].as_str().unwrap().to_owned();
    let (s, _, v) = call(
        &app,
        with_token("GET", "/api/v1/cluster/acme-corp", &other_token),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_error(&v, "forbidden");
    // ... and it cannot delete S1.
    let (s, _, _) = call(
        &app,
        with_token("DELETE", &format!("/api/v1/servers/{S1}"), &other_token),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // No token, garbage token, foreign token, expired token: 401.
    let req = Request::get("/api/v1/cluster/acme-corp")
        .body(Body::empty())
        .unwrap();
    let (s, _, v) = call(&app, req).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "missing_token");
    let (s, _, v) = call(
        &app,
        with_token("GET", "/api/v1/cluster/acme-corp", "a.b.c"),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "invalid_token");
    let foreign = hubmesh_mesh::Keypair::generate_ed25519();
    let t = sign_token(&foreign, "acme-corp", S1, 3600);
    let (s, _, v) = call(&app, with_token("GET", "/api/v1/cluster/acme-corp", &t)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "foreign_token");
    let own = hubmesh_mesh::load_or_create_identity(&dir.path().join("mesh/identity.key")).unwrap();
    let t = sign_token(&own, "acme-corp", S1, -3600);
    let (s, _, v) = call(&app, with_token("GET", "/api/v1/cluster/acme-corp", &t)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "token_expired");
    // A token this hub signs by hand with its own key is accepted.
    let t = sign_token(&own, "acme-corp", S1, 3600);
    let (s, _, _) = call(&app, with_token("GET", "/api/v1/cluster/acme-corp", &t)).await;
    assert_eq!(s, StatusCode::OK);

    // Delete with the server's token; then lookup is empty, heartbeat 404.
    let (s, _, v) = call(
        &app,
        with_token("DELETE", &format!("/api/v1/servers/{S1}"), &token),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, _, v) = call(&app, with_token("GET", "/api/v1/cluster/acme-corp", &token)).await;
    assert_eq!(v["servers"], json!([]));
    let (s, _, v) = call(
        &app,
        with_token("POST", "/api/v1/servers/heartbeat", &token),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "not_found");

    // Admin listing: loopback is admin; a remote client needs the token.
    let (s, _, v) = call(
        &app,
        Request::get("/api/v1/admin/clusters")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["totalServers"], 1);
    let remote = self::app(&hub, "203.0.113.7:5000");
    let (s, _, v) = call(
        &remote,
        Request::get("/admin/status").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_error(&v, "admin_required");
    let req = Request::get("/admin/status")
        .header("X-Admin-Token", "admintok")
        .body(Body::empty())
        .unwrap();
    let (s, _, v) = call(&remote, req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["identity"]["peerId"], hub.peer_id().to_string());
    // Admin deletes by id, across clusters.
    let req = Request::delete(format!("/api/v1/servers/{S2}"))
        .header("X-Admin-Token", "admintok")
        .body(Body::empty())
        .unwrap();
    let (s, _, v) = call(&remote, req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["clusterId"], "other");

    // Unknown route: JSON 404. Health, metrics.
    let (s, _, v) = call(&app, Request::get("/nope").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "not_found");
    for p in ["/", "/health", "/healthz"] {
        let (s, _, _) = call(&app, Request::get(p).body(Body::empty()).unwrap()).await;
        assert_eq!(s, StatusCode::OK, "{p}");
    }
    let (s, _, v) = call(&app, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    let text = v.as_str().unwrap();
    assert!(text.contains("hubmesh_http_requests_total"), "{text}");
    assert!(
        text.contains("route=\"/api/v1/cluster/{cluster_id}\""),
        "{text}"
    );
    assert!(!text.contains("route=\"/nope\""), "unbounded label: {text}");

    hub.shutdown().await;
}

fn sign_token(key: &hubmesh_mesh::Keypair, cluster: &str, server: &str, ttl: i64) -> String {
    let ed = key.clone().try_into_ed25519().unwrap();
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(ed.secret().as_ref());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({
        "iss": key.public().to_peer_id().to_string(), "sub": server, "cid": cluster,
        "aud": "hubmesh:discovery", "iat": now, "exp": now + ttl, "jti": "test",
    });
    let t = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        &claims,
        &jsonwebtoken::EncodingKey::from_ed_der(&der),
    )
    .unwrap();
    // Sanity: it is a three-part JWT with our claims.
    assert!(URL_SAFE_NO_PAD.decode(t.split('.').nth(1).unwrap()).is_ok());
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(dir.path(), 3).await;
    let app = app(&hub, "127.0.0.1:40000");
    for _ in 0..3 {
        let (s, _, _) = call(
            &app,
            Request::get("/api/v1/cluster/x")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let (s, h, v) = call(
        &app,
        Request::get("/api/v1/cluster/x")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_error(&v, "rate_limited");
    let secs: u64 = h[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&secs));
    // Another client IP is not limited; the operator API is not in the family.
    let other = self::app(&hub, "127.0.0.2:40000");
    let (s, _, _) = call(
        &other,
        Request::get("/api/v1/cluster/x")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = call(
        &app,
        Request::get("/admin/identity").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_tls_serves_https() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::default();
    c.data_dir = dir.path().to_path_buf();
    c.http = "127.0.0.1:0".parse().unwrap();
    c.mesh_listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    c.tls = hubmesh_node::config::TlsMode::SelfSigned {
        names: vec!["localhost".into()],
    };
    let hub = tokio::time::timeout(Duration::from_secs(30), Hub::spawn(c))
        .await
        .unwrap()
        .unwrap();
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = client
        .get(format!("https://{}/health", hub.http_addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Plain HTTP on the TLS port does not get an answer.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    assert!(
        plain
            .get(format!("http://{}/health", hub.http_addr()))
            .send()
            .await
            .is_err()
    );
    assert!(dir.path().join("tls/self-signed.pem").exists());
    hub.shutdown().await;
}

/// A hub for the lookup-cache test: short inactivity, optional bootstrap.
async fn lookup_hub(dir: &std::path::Path, bootstrap: Option<&Hub>, inactive: Duration) -> Hub {
    let mut c = Config::default();
    c.data_dir = dir.to_path_buf();
    c.http = "127.0.0.1:0".parse().unwrap();
    c.mesh_listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    c.rate_limits.discovery_per_minute = 10_000;
    c.discovery.inactive_after = inactive;
    c.discovery
        .cluster_secrets
        .insert("ACME_CORP".into(), SECRET.into());
    if let Some(b) = bootstrap {
        c.bootstrap = vec![b.dial_addr().parse().unwrap()];
    }
    tokio::time::timeout(Duration::from_secs(30), Hub::spawn(c))
        .await
        .unwrap()
        .unwrap()
}

async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn listed(v: &Value) -> Vec<String> {
    let mut ids: Vec<String> = v["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["serverId"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Lookup answers are cached per cluster; a cached answer must never outlive
/// what it lists: a record merged from another hub, a local delete and a
/// server going inactive each show in the very next lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_lookups_follow_merges_deletes_and_inactivity() {
    let inactive = Duration::from_secs(4);
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let h1 = lookup_hub(d1.path(), None, inactive).await;
    let h2 = lookup_hub(d2.path(), Some(&h1), inactive).await;
    let (a1, a2) = (app(&h1, "127.0.0.1:40001"), app(&h2, "127.0.0.1:40002"));
    let lookup = |app: Router, token: String| async move {
        let (s, _, v) = call(&app, with_token("GET", "/api/v1/cluster/acme-corp", &token)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        listed(&v)
    };
    let register = |app: Router, id: &'static str| async move {
        let body = register_body("acme-corp", SECRET, id, &now_rfc3339(0));
        let (s, _, v) = call(&app, post_json("/api/v1/servers/register", &body)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["token"].as_str().unwrap().to_owned()
    };
    let held_at_h2 = |id: &str| {
        h2.state()
            .store
            .get("server", &format!("acme-corp/{id}"))
            .unwrap()
            .is_some()
    };

    // S1 at hub 1; hub 2 caches an answer listing it once it arrives.
    let registered_at = std::time::Instant::now();
    let t1 = register(a1.clone(), S1).await;
    wait_until("S1 reaches hub 2", || held_at_h2(S1)).await;
    assert_eq!(lookup(a2.clone(), t1.clone()).await, vec![S1]);
    assert_eq!(lookup(a2.clone(), t1.clone()).await, vec![S1]);
    let (_, _, m) = call(&a2, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    let m = m.as_str().unwrap().to_owned();
    assert!(
        m.lines()
            .any(|l| l.starts_with("hubmesh_discovery_lookup_cache_total{outcome=\"hit\"}")),
        "the second lookup is served from the cache:\n{m}"
    );

    // S2 at hub 1: once hub 2 merged it, hub 2's next lookup lists it (the
    // cached answer would still be valid by time for seconds).
    let t2 = register(a1.clone(), S2).await;
    wait_until("S2 reaches hub 2", || held_at_h2(S2)).await;
    // The merge bumps the cluster's stamp a moment after the record is
    // readable, so allow that moment, far shorter than the cached answer's
    // remaining validity (about the 4 s of S1's inactivity window).
    let merged_at = tokio::time::Instant::now();
    loop {
        let ids = lookup(a2.clone(), t1.clone()).await;
        if ids == vec![S1, S2] {
            break;
        }
        assert!(
            merged_at.elapsed() < Duration::from_millis(500),
            "hub 2 still answers {ids:?} {:?} after merging S2",
            merged_at.elapsed()
        );
        tokio::task::yield_now().await;
    }

    // Deleting S2 at hub 2: acknowledged, then gone from its next lookup.
    let (s, _, v) = call(
        &a2,
        with_token("DELETE", &format!("/api/v1/servers/{S2}"), &t2),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(lookup(a2.clone(), t1.clone()).await, vec![S1]);

    // No heartbeat: S1 leaves the answer once inactive, not before, and
    // not later than a moment after.
    loop {
        let ids = lookup(a2.clone(), t1.clone()).await;
        let elapsed = registered_at.elapsed();
        if ids.is_empty() {
            assert!(elapsed >= inactive, "S1 dropped after only {elapsed:?}");
            break;
        }
        assert!(
            elapsed < inactive + Duration::from_secs(2),
            "S1 still listed {elapsed:?} after registering"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
