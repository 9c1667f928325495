//! Accounts and user tokens through real HTTP on in-process hubs
//! (`Hub::spawn`, reqwest): password login, `/users/me` roaming to a second
//! hub, logout refused on every hub, foreign and expired tokens, self-
//! registration, the operator's `/admin/users`, every documented bad input,
//! and the family's rate limits (429 + Retry-After). Every wait has a deadline.

#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)] // test helpers

use std::time::{Duration, Instant};

use hubmesh_node::{Config, Hub};
use reqwest::StatusCode;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn config(dir: &std::path::Path, federation: &str, limits: bool) -> Config {
    let mut c = Config::default();
    c.data_dir = dir.to_path_buf();
    c.http = "127.0.0.1:0".parse().unwrap();
    c.mesh_listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    c.federation = federation.into();
    c.admin_token = Some("admintok".into());
    c.rate_limits.enabled = limits;
    c.sync_interval = Duration::from_secs(2);
    c
}

async fn spawn(c: Config) -> Hub {
    tokio::time::timeout(Duration::from_secs(30), Hub::spawn(c))
        .await
        .unwrap()
        .unwrap()
}

fn url(hub: &Hub, path: &str) -> String {
    format!("http://{}{path}", hub.http_addr())
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn json_of(r: reqwest::Response) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let status = r.status();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn login(c: &reqwest::Client, hub: &Hub, user: &str, pw: &str) -> (StatusCode, Value) {
    let r = c
        .post(url(hub, "/token"))
        .form(&[("username", user), ("password", pw)])
        .send()
        .await
        .unwrap();
    let (s, _, v) = json_of(r).await;
    (s, v)
}

async fn me(c: &reqwest::Client, hub: &Hub, token: &str) -> (StatusCode, Value) {
    let r = c
        .get(url(hub, "/users/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let (s, _, v) = json_of(r).await;
    (s, v)
}

fn detail(v: &Value) -> &str {
    v["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("no detail in {v}"))
}

/// Polls `/users/me` on `hub` until it answers `want`, within `WAIT`.
async fn until_me(c: &reqwest::Client, hub: &Hub, token: &str, want: StatusCode) -> Duration {
    let start = Instant::now();
    loop {
        let (s, v) = me(c, hub, token).await;
        if s == want {
            return start.elapsed();
        }
        assert!(start.elapsed() < WAIT, "still {s} {v} after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn forge(hub: &Hub, sub: &str, exp_offset: i64) -> String {
    let ed = hub.mesh().keypair().clone().try_into_ed25519().unwrap();
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(ed.secret().as_ref());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({
        "iss": hub.peer_id().to_string(), "sub": sub, "aud": "hubmesh:user",
        "iat": now - 7200, "exp": now + exp_offset, "jti": uuid::Uuid::new_v4().to_string(),
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        &claims,
        &jsonwebtoken::EncodingKey::from_ed_der(&der),
    )
    .unwrap()
}

/// Registers a fresh 2048-bit RSA node identity for the token's user.
async fn register_node(c: &reqwest::Client, hub: &Hub, token: &str) -> String {
    use rand::SeedableRng;
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let k = rsa::RsaPrivateKey::new(&mut rand::rngs::StdRng::seed_from_u64(7), 2048).unwrap();
    let public = k.to_public_key();
    let node_id =
        hubmesh_node::federation::nodes::node_id_of(public.to_public_key_der().unwrap().as_bytes());
    let private_pem = k.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let kp = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&private_pem, &rcgen::PKCS_RSA_SHA256)
        .unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, node_id.as_str());
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(30);
    let cert = p.self_signed(&kp).unwrap().pem();
    let r = c
        .post(url(hub, "/register-node-id"))
        .bearer_auth(token)
        .json(&json!({
            "node_id": node_id,
            "public_key": public.to_public_key_pem(LineEnding::LF).unwrap(),
            "certificate": cert,
        }))
        .send()
        .await
        .unwrap();
    let (s, _, v) = json_of(r).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    node_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roaming_token_and_logout_everywhere() {
    let (d1, d2, d3) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let h1 = spawn(config(d1.path(), "acc-test", false)).await;
    let mut c2 = config(d2.path(), "acc-test", false);
    c2.bootstrap = vec![h1.dial_addr().parse().unwrap()];
    let h2 = spawn(c2).await;
    let h3 = spawn(config(d3.path(), "elsewhere", false)).await;
    let c = client();

    h1.state()
        .federation
        .accounts
        .create("alice", Some("password-1"), true)
        .await
        .unwrap();
    let (s, v) = login(&c, &h1, "alice", "password-1").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["token_type"], "bearer");
    assert_eq!(v["expires_in"], 1800);
    let token = v["access_token"].as_str().unwrap().to_owned();

    let (s, v) = me(&c, &h1, &token).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["username"], "alice");
    assert_eq!(v["home_hub"], h1.peer_id().to_string());
    assert_eq!(v["is_admin"], true);
    assert_eq!(v["node_id"], Value::Null);
    assert_eq!(v["node_id_verified"], false);

    // Roaming: hub 2 verifies hub 1's token once it has met hub 1.
    until_me(&c, &h2, &token, StatusCode::OK).await;
    let (_, v) = me(&c, &h2, &token).await;
    assert_eq!(v["username"], "alice");
    assert_eq!(v["home_hub"], h1.peer_id().to_string());

    // A node identity registered at hub 1 shows in /users/me on hub 2.
    let node_id = register_node(&c, &h1, &token).await;
    let start = Instant::now();
    loop {
        let (_, v) = me(&c, &h2, &token).await;
        if v["node_id"] == node_id.as_str() {
            assert_eq!(v["node_id_verified"], true);
            break;
        }
        assert!(start.elapsed() < WAIT, "hub 2 never saw the node: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A second token of the same user is independent of the first.
    let (_, v) = login(&c, &h1, "alice", "password-1").await;
    let other = v["access_token"].as_str().unwrap().to_owned();

    // Logout at hub 1: refused at hub 1 at once, at hub 2 once the record arrives.
    let r = c
        .post(url(&h1, "/logout"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let (s, _, v) = json_of(r).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["message"], "Successfully logged out");
    let (s, v) = me(&c, &h1, &token).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(detail(&v), "token has been revoked");
    let took = until_me(&c, &h2, &token, StatusCode::UNAUTHORIZED).await;
    eprintln!("revocation visible at hub 2 after {took:?}");
    let (_, v) = me(&c, &h2, &token).await;
    assert_eq!(detail(&v), "token has been revoked");
    // Logging out again, anywhere: the token is already refused.
    let r = c
        .post(url(&h2, "/logout"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // The other token still works on both hubs.
    assert_eq!(me(&c, &h1, &other).await.0, StatusCode::OK);
    assert_eq!(me(&c, &h2, &other).await.0, StatusCode::OK);
    // The revocation record is replicated, with the token's expiry.
    let rec = h2
        .state()
        .store
        .scan_prefix("revocation", "", None, 10)
        .unwrap();
    assert_eq!(rec.len(), 1);

    // A token from a hub of another federation is refused.
    h3.state()
        .federation
        .accounts
        .create("mallory", Some("password-3"), true)
        .await
        .unwrap();
    let (_, v) = login(&c, &h3, "mallory", "password-3").await;
    let foreign = v["access_token"].as_str().unwrap().to_owned();
    assert_eq!(me(&c, &h3, &foreign).await.0, StatusCode::OK);
    for h in [&h1, &h2] {
        let (s, v) = me(&c, h, &foreign).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(detail(&v).contains("not a member"), "{v}");
    }

    // Expired (beyond the 30 s leeway), and signed for a removed account.
    let expired = forge(&h1, "alice", -120);
    let (s, v) = me(&c, &h1, &expired).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(detail(&v), "token expired");
    h1.state()
        .federation
        .accounts
        .remove("alice")
        .await
        .unwrap();
    let (s, v) = me(&c, &h1, &other).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(detail(&v), "the token's account no longer exists");

    // Accounts never leave the home hub: no record namespace holds them.
    let counts: Vec<String> = h2
        .state()
        .store
        .namespace_counts()
        .unwrap()
        .into_iter()
        .map(|(ns, _)| ns)
        .collect();
    assert!(
        !counts.iter().any(|ns| ns.contains("account")),
        "{counts:?}"
    );
    assert!(
        h2.state()
            .federation
            .accounts
            .list(None, 10)
            .unwrap()
            .is_empty()
    );

    for h in [h1, h2, h3] {
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_statuses() {
    let d = tempfile::tempdir().unwrap();
    let h = spawn(config(d.path(), "acc-bad", false)).await;
    let c = client();
    h.state()
        .federation
        .accounts
        .create("bob", Some("password-b"), false)
        .await
        .unwrap();

    // Wrong password, unknown user: the same 401.
    for (u, p) in [("bob", "wrong-password"), ("nobody", "password-b")] {
        let r = c
            .post(url(&h, "/token"))
            .form(&[("username", u), ("password", p)])
            .send()
            .await
            .unwrap();
        let (s, headers, v) = json_of(r).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(detail(&v), "Incorrect username or password");
        assert_eq!(headers["www-authenticate"], "Bearer");
    }
    // Not a form, a missing field, a wrong grant type: 422.
    let r = c
        .post(url(&h, "/token"))
        .json(&json!({"username": "bob", "password": "password-b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = c
        .post(url(&h, "/token"))
        .form(&[("username", "bob")])
        .send()
        .await
        .unwrap();
    let (s, _, v) = json_of(r).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(detail(&v).contains("password"), "{v}");
    let r = c
        .post(url(&h, "/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("username", "bob"),
            ("password", "password-b"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // Oversized body: 413.
    let big = "x".repeat(100 * 1024);
    let r = c
        .post(url(&h, "/token"))
        .form(&[("username", "bob"), ("password", big.as_str())])
        .send()
        .await
        .unwrap();
    let (s, _, v) = json_of(r).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(v["detail"].is_string(), "{v}");

    // Missing and malformed tokens.
    let r = c.get(url(&h, "/users/me")).send().await.unwrap();
    let (s, _, v) = json_of(r).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(detail(&v), "missing bearer token");
    for bad in ["garbage", "a.b.c", &"x".repeat(5000)] {
        let (s, v) = me(&c, &h, bad).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{bad}");
        assert!(detail(&v).starts_with("invalid token"), "{v}");
    }
    // A token whose signature does not match its issuer.
    let (_, v) = login(&c, &h, "bob", "password-b").await;
    let good = v["access_token"].as_str().unwrap().to_owned();
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    parts[2] = parts[2].chars().rev().collect();
    let (s, _) = me(&c, &h, &parts.join(".")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let r = c.post(url(&h, "/logout")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Self-registration is off by default.
    let r = c
        .post(url(&h, "/register"))
        .json(&json!({"username": "eve", "password": "password-e"}))
        .send()
        .await
        .unwrap();
    let (s, _, v) = json_of(r).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(detail(&v), "self-registration is disabled on this hub");

    // The operator API: loopback is operator; CRUD with its statuses.
    let r = c
        .post(url(&h, "/admin/users"))
        .json(&json!({"username": "carol", "password": "password-c", "admin": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = c
        .post(url(&h, "/admin/users"))
        .json(&json!({"username": "carol", "password": "password-c"}))
        .send()
        .await
        .unwrap();
    let (s, _, v) = json_of(r).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["error"], "user_exists");
    let r = c
        .post(url(&h, "/admin/users"))
        .json(&json!({"username": "bad name", "password": "password-c"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = c
        .post(url(&h, "/admin/users"))
        .json(&json!({"username": "dave", "password": "short"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = c
        .put(url(&h, "/admin/users/carol/password"))
        .json(&json!({"password": "password-c2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        login(&c, &h, "carol", "password-c").await.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, v) = login(&c, &h, "carol", "password-c2").await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = me(&c, &h, v["access_token"].as_str().unwrap()).await;
    assert_eq!(v["is_admin"], true);
    let r = c.get(url(&h, "/admin/users")).send().await.unwrap();
    let (_, _, v) = json_of(r).await;
    let names: Vec<&str> = v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["bob", "carol"]);
    assert!(!v.to_string().contains("argon2"), "hashes never leave: {v}");
    let r = c
        .put(url(&h, "/admin/users/nobody/password"))
        .json(&json!({"password": "password-x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = c
        .delete(url(&h, "/admin/users/carol"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .delete(url(&h, "/admin/users/carol"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Not from loopback and without the token: refused (router with a far peer).
    {
        use tower::ServiceExt;
        let app = hubmesh_node::facade::router(h.state().clone()).layer(
            axum::extract::connect_info::MockConnectInfo(
                "10.1.2.3:5".parse::<std::net::SocketAddr>().unwrap(),
            ),
        );
        let req = axum::http::Request::get("/admin/users")
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let req = axum::http::Request::get("/admin/users")
            .header("x-admin-token", "admintok")
            .body(axum::body::Body::empty())
            .unwrap();
        assert_eq!(app.oneshot(req).await.unwrap().status(), StatusCode::OK);
    }
    h.shutdown().await;

    // Dev mode: self-registration on.
    let d = tempfile::tempdir().unwrap();
    let mut cfg = config(d.path(), "acc-dev", false);
    cfg.federation_hub.self_registration = true;
    let h = spawn(cfg).await;
    let reg = |body: Value| {
        let c = c.clone();
        let u = url(&h, "/register");
        async move { json_of(c.post(u).json(&body).send().await.unwrap()).await }
    };
    let (s, _, v) = reg(json!({"username": "eve", "password": "password-e"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["username"], "eve");
    assert_eq!(
        reg(json!({"username": "eve", "password": "password-e"}))
            .await
            .0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        reg(json!({"username": "e e", "password": "password-e"}))
            .await
            .0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        reg(json!({"username": "frank", "password": "pw"})).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        reg(json!({"username": "frank"})).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let r = c
        .post(url(&h, "/register"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(login(&c, &h, "eve", "password-e").await.0, StatusCode::OK);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_and_general_rate_limits() {
    let d = tempfile::tempdir().unwrap();
    let h = spawn(config(d.path(), "acc-limits", true)).await;
    let c = client();
    for _ in 0..5 {
        let (s, _) = login(&c, &h, "nobody", "password-x").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let r = c
        .post(url(&h, "/token"))
        .form(&[("username", "nobody"), ("password", "password-x")])
        .send()
        .await
        .unwrap();
    let (s, headers, v) = json_of(r).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(detail(&v), "Rate limit exceeded: 5 per 1 minute");
    let secs: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&secs), "{secs}");
    // /login/{provider} shares the login quota.
    let r = c.get(url(&h, "/login/github")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // The general quota (60/min) covers every route of the family.
    let mut limited = None;
    for i in 0..80 {
        let r = c.get(url(&h, "/users/me")).send().await.unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            let (_, headers, v) = json_of(r).await;
            assert_eq!(detail(&v), "Rate limit exceeded: 60 per 1 minute");
            assert!(headers.contains_key("retry-after"));
            limited = Some(i);
            break;
        }
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let i = limited.expect("the general limit never answered 429");
    assert!((50..=60).contains(&i), "limited after {i} requests");
    // Other families are not affected.
    let r = c.get(url(&h, "/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    h.shutdown().await;
}

/// Cost of the revocation check (one store point lookup) on a sled store
/// holding 100 000 revocations, median of 5 runs of 100 000 lookups.
/// `cargo test -p hubmesh-node --release --test accounts -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement"]
async fn revocation_lookup_cost() {
    let d = tempfile::tempdir().unwrap();
    let h = spawn(config(d.path(), "acc-bench", false)).await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as u64;
    let mut jtis = Vec::new();
    for chunk in 0..100 {
        let mut drafts = Vec::new();
        for i in 0..1000 {
            let jti = format!("{chunk:04}-{i:04}-{}", uuid::Uuid::new_v4());
            let body = hubmesh_node::federation::revocation::RevocationBody {
                jti: jti.clone(),
                iss: h.peer_id().to_string(),
                sub: "alice".into(),
                exp: now + 1800,
            };
            drafts.push(hubmesh_store::Draft {
                ns: "revocation".into(),
                key: jti.clone(),
                body: serde_cbor::to_vec(&body).unwrap(),
                expires_ms: (now + 1800) * 1000,
                deleted: false,
                terms: Vec::new(),
            });
            jtis.push(jti);
        }
        h.mesh().write(drafts).await.unwrap();
    }
    let store = h.state().store.clone();
    let misses: Vec<String> = (0..1000)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    for (label, keys) in [("hit", &jtis), ("miss", &misses)] {
        let mut runs = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            let mut n = 0u32;
            for i in 0..100_000 {
                let k = &keys[(i * 7919) % keys.len()];
                n +=
                    u32::from(hubmesh_node::federation::revocation::is_revoked(&store, k).unwrap());
            }
            runs.push(start.elapsed().as_nanos() as f64 / 100_000.0);
            assert_eq!(n == 0, label == "miss");
        }
        runs.sort_by(f64::total_cmp);
        eprintln!(
            "revocation lookup ({label}): median {:.0} ns (runs {runs:?})",
            runs[2]
        );
    }
    h.shutdown().await;
}

/// Cost of a password login (`POST /token`: one Argon2id verification) and
/// of an authenticated request (`GET /users/me`: cached signature check +
/// revocation lookup), over loopback HTTP; medians of 21 and 1001 requests.
/// `cargo test -p hubmesh-node --release --test accounts -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement"]
async fn login_and_request_cost() {
    let d = tempfile::tempdir().unwrap();
    let h = spawn(config(d.path(), "acc-bench2", false)).await;
    h.state()
        .federation
        .accounts
        .create("alice", Some("password-1"), false)
        .await
        .unwrap();
    let c = client();
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut logins = Vec::new();
    let mut token = String::new();
    for _ in 0..21 {
        let start = Instant::now();
        let (s, v) = login(&c, &h, "alice", "password-1").await;
        logins.push(start.elapsed());
        assert_eq!(s, StatusCode::OK);
        token = v["access_token"].as_str().unwrap().to_owned();
    }
    let mut reqs = Vec::new();
    for _ in 0..1001 {
        let start = Instant::now();
        let (s, _) = me(&c, &h, &token).await;
        reqs.push(start.elapsed());
        assert_eq!(s, StatusCode::OK);
    }
    eprintln!(
        "POST /token median {:?}; GET /users/me median {:?}",
        median(logins),
        median(reqs)
    );
    h.shutdown().await;
}
