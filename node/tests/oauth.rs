//! The whole OAuth 2.0 authorization-code flow (with PKCE) against a small
//! OAuth provider this test starts on loopback (axum: authorize → redirect
//! with a code, token endpoint checking client credentials and the PKCE
//! verifier, userinfo), through a real hub over HTTP: login creates and then
//! reuses the linked account; reused, unknown or foreign state, provider
//! errors and a failing token exchange each get their documented status.

#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)] // test helpers

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hubmesh_node::config::OAuthProviderConfig;
use hubmesh_node::{Config, Hub};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const CLIENT_ID: &str = "hub-client";
const CLIENT_SECRET: &str = "hub-secret";

/// code → (PKCE challenge, redirect_uri).
#[derive(Clone, Default)]
struct Provider {
    codes: Arc<Mutex<HashMap<String, (String, String)>>>,
    tokens_issued: Arc<Mutex<u32>>,
}

async fn authorize(
    State(p): State<Provider>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if q.get("client_id").map(String::as_str) != Some(CLIENT_ID)
        || q.get("response_type").map(String::as_str) != Some("code")
        || q.get("code_challenge_method").map(String::as_str) != Some("S256")
    {
        return (StatusCode::BAD_REQUEST, "bad authorization request").into_response();
    }
    let (Some(redirect), Some(state), Some(challenge)) = (
        q.get("redirect_uri"),
        q.get("state"),
        q.get("code_challenge"),
    ) else {
        return (StatusCode::BAD_REQUEST, "missing parameter").into_response();
    };
    let code = uuid::Uuid::new_v4().to_string();
    p.codes
        .lock()
        .unwrap()
        .insert(code.clone(), (challenge.clone(), redirect.clone()));
    let mut to = url::Url::parse(redirect).unwrap();
    to.query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", state);
    (StatusCode::FOUND, [(header::LOCATION, to.to_string())]).into_response()
}

async fn token(
    State(p): State<Provider>,
    headers: HeaderMap,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let basic = format!(
        "Basic {}",
        STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    );
    if headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(basic.as_str())
    {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let entry = f
        .get("code")
        .and_then(|c| p.codes.lock().unwrap().remove(c));
    let (Some((challenge, redirect)), Some(verifier)) = (entry, f.get("code_verifier")) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant"})),
        )
            .into_response();
    };
    if f.get("grant_type").map(String::as_str) != Some("authorization_code")
        || f.get("redirect_uri") != Some(&redirect)
        || URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())) != challenge
    {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant"})),
        )
            .into_response();
    }
    *p.tokens_issued.lock().unwrap() += 1;
    Json(json!({"access_token": "at-octo", "token_type": "bearer", "expires_in": 3600}))
        .into_response()
}

async fn userinfo(headers: HeaderMap) -> Response {
    match headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        Some("Bearer at-octo") => Json(json!({
            "sub": 1001, "preferred_username": "octo", "email": "octo@example.test"
        }))
        .into_response(),
        _ => StatusCode::UNAUTHORIZED.into_response(),
    }
}

async fn start_provider() -> (String, Provider, tokio::task::JoinHandle<()>) {
    let p = Provider::default();
    let app = Router::new()
        .route("/authorize", get(authorize))
        .route("/token", post(token))
        .route("/userinfo", get(userinfo))
        .with_state(p.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (base, p, task)
}

fn provider(name: &str, base: &str, secret: &str) -> OAuthProviderConfig {
    OAuthProviderConfig {
        name: name.into(),
        client_id: CLIENT_ID.into(),
        client_secret: Some(secret.into()),
        auth_url: format!("{base}/authorize"),
        token_url: format!("{base}/token"),
        userinfo_url: format!("{base}/userinfo"),
        scopes: vec!["openid".into()],
        subject_field: "sub".into(),
        name_field: "preferred_username".into(),
    }
}

async fn fetch(c: &reqwest::Client, url: &str) -> (StatusCode, Option<String>, Value) {
    let r = tokio::time::timeout(Duration::from_secs(15), c.get(url).send())
        .await
        .unwrap()
        .unwrap();
    let status = r.status();
    let location = r
        .headers()
        .get(header::LOCATION)
        .map(|v| v.to_str().unwrap().to_owned());
    let text = r.text().await.unwrap();
    (
        status,
        location,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_code_flow_against_a_loopback_provider() {
    let (base, idp, idp_task) = start_provider().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::default();
    c.data_dir = dir.path().to_path_buf();
    c.http = "127.0.0.1:0".parse().unwrap();
    c.mesh_listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    c.admin_token = Some("admintok".into());
    c.rate_limits.enabled = false;
    c.federation_hub.oauth = vec![
        provider("testidp", &base, CLIENT_SECRET),
        provider("wrongsecret", &base, "not-the-secret"),
    ];
    let hub = tokio::time::timeout(Duration::from_secs(30), Hub::spawn(c))
        .await
        .unwrap()
        .unwrap();
    let hub_url = format!("http://{}", hub.http_addr());
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // One full login: hub → provider → hub callback → JWT.
    let login = |provider: &'static str| {
        let (client, hub_url) = (client.clone(), hub_url.clone());
        async move {
            let (s, to_idp, _) = fetch(&client, &format!("{hub_url}/login/{provider}")).await;
            assert_eq!(s, StatusCode::FOUND);
            let to_idp = to_idp.unwrap();
            let q: HashMap<String, String> = url::Url::parse(&to_idp)
                .unwrap()
                .query_pairs()
                .into_owned()
                .collect();
            assert_eq!(
                q["redirect_uri"],
                format!("{hub_url}/auth/{provider}/callback")
            );
            assert_eq!(q["code_challenge_method"], "S256");
            let (s, back, v) = fetch(&client, &to_idp).await;
            assert_eq!(s, StatusCode::FOUND, "{v}");
            back.unwrap()
        }
    };
    let callback = login("testidp").await;
    let (s, _, v) = fetch(&client, &callback).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["token_type"], "bearer");
    let token = v["access_token"].as_str().unwrap().to_owned();
    let me: Value = client
        .get(format!("{hub_url}/users/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["username"], "testidp:octo");
    assert_eq!(me["is_admin"], false);
    let account = hub
        .state()
        .federation
        .accounts
        .get("testidp:octo")
        .unwrap()
        .unwrap();
    assert_eq!(account.email.as_deref(), Some("octo@example.test"));
    assert!(account.password_hash.is_none());

    // The state is single use: replaying the callback is refused.
    let (s, _, v) = fetch(&client, &callback).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["detail"], "Invalid or expired OAuth state");

    // A second login reuses the linked account.
    let (s, _, v) = fetch(&client, &login("testidp").await).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(hub.state().federation.accounts.count(), 1);
    assert_eq!(*idp.tokens_issued.lock().unwrap(), 2);

    // Unknown state, missing state, and a state issued for another provider.
    let (s, _, v) = fetch(
        &client,
        &format!("{hub_url}/auth/testidp/callback?code=x&state=nope"),
    )
    .await;
    assert_eq!(
        (s, v["detail"].as_str()),
        (
            StatusCode::BAD_REQUEST,
            Some("Invalid or expired OAuth state")
        )
    );
    let (s, _, _) = fetch(&client, &format!("{hub_url}/auth/testidp/callback?code=x")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let cb = login("testidp").await;
    let foreign = cb.replace("/auth/testidp/", "/auth/wrongsecret/");
    let (s, _, _) = fetch(&client, &foreign).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // The provider reports an error (user denied): 400 with its code.
    let cb = login("testidp").await;
    let state = url::Url::parse(&cb)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let (s, _, v) = fetch(
        &client,
        &format!("{hub_url}/auth/testidp/callback?error=access_denied&state={state}"),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["detail"], "OAuth provider error: access_denied");

    // A code the provider refuses (forged) and a client secret it refuses: 502.
    let cb = login("testidp").await;
    let mut u = url::Url::parse(&cb).unwrap();
    let pairs: Vec<(String, String)> = u
        .query_pairs()
        .into_owned()
        .map(|(k, v)| {
            if k == "code" {
                (k, "forged".into())
            } else {
                (k, v)
            }
        })
        .collect();
    u.query_pairs_mut().clear().extend_pairs(pairs);
    let (s, _, v) = fetch(&client, u.as_str()).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .starts_with("OAuth provider error")
    );
    let (s, _, v) = fetch(&client, &login("wrongsecret").await).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{v}");
    assert!(!v.to_string().contains("not-the-secret"));

    // Unknown provider.
    let (s, _, v) = fetch(&client, &format!("{hub_url}/login/nope")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("Unknown OAuth provider")
    );
    let (s, _, _) = fetch(
        &client,
        &format!("{hub_url}/auth/nope/callback?code=a&state=b"),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    hub.shutdown().await;
    idp_task.abort();
}
