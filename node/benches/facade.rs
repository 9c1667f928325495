//! Facade benchmarks (harness = false), bounded in count and time, loopback only:
//! - register req/s on one hub with 64 concurrent clients (durable ack, then gossip),
//! - cluster lookup req/s with 64 concurrent clients,
//!   each also as a ratio to a minimal axum handler returning the same JSON,
//!   measured in the same run with the same client;
//! - register at hub 1 → visible in lookup at hub 2: p50 / p99;
//! - context: store flushes per second during the register load, and register
//!   req/s at a hub with no peer (the local path without replication).
//!
//! The load generator is `wrk` (a separate C process: 1 thread by default, 64 connections,
//! bodies from a Lua script) when it is on `PATH` (`apt-get install wrk`), else
//! an in-process reqwest loop, which saturates before the hub does; the output
//! names the one used. Each throughput phase runs `BENCH_RUNS` times (default
//! 3), alternating hub and baseline; the medians are reported.
//!
//! Run: `cargo bench -p hubmesh-node --bench facade` (BENCH_SECS, default 3;
//! BENCH_LOADGEN=reqwest forces the in-process generator).

#![allow(clippy::unwrap_used, clippy::field_reassign_with_default)] // a benchmark binary

/// The allocator the `hubmesh` binary ships with, so the hub measured here
/// allocates as a deployed one does.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use base64::Engine;
use hubmesh_node::discovery::{hmac_message, sign_registration};
use hubmesh_node::{Config, Hub};
use serde_json::{Value, json};

const CLIENTS: usize = 64;
const SECRET: &str = "bench-secret";
const LATENCY_SAMPLES: usize = 200;

/// wrk script: each wrk thread POSTs its own slice of the prepared bodies
/// (one JSON document per line), so no body is sent twice (a replay is a 409).
const WRK_POST_SCRIPT: &str = r#"
local counter = 1
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end
function init(args)
  bodies = {}
  local nthreads = tonumber(args[2])
  local i = 0
  for line in io.lines(args[1]) do
    if i % nthreads == (id - 1) then bodies[#bodies + 1] = line end
    i = i + 1
  end
  idx = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end
function request()
  idx = idx + 1
  if idx > #bodies then idx = 1 end
  return wrk.format(nil, args_path, nil, bodies[idx])
end
"#;

/// Which load generator drives the throughput phases.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LoadGen {
    Wrk,
    Reqwest,
}

fn pick_loadgen() -> LoadGen {
    let forced = std::env::var("BENCH_LOADGEN").unwrap_or_default();
    if forced == "reqwest" {
        return LoadGen::Reqwest;
    }
    let have_wrk = std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok();
    if have_wrk {
        LoadGen::Wrk
    } else {
        LoadGen::Reqwest
    }
}

/// Runs wrk ([`wrk_threads`] threads, `CLIENTS` connections) for `secs` against `url`;
/// returns completed req/s. POSTs the lines of `bodies` when given. Panics
/// (failing the bench) on any non-2xx answer or socket error.
/// wrk's threads (`BENCH_WRK_THREADS`, default 1). On a 2-core machine a
/// second wrk thread competes with the server under test for a core: one run
/// of this bench with 2 threads measured lookups at 24.1k req/s (minimal axum
/// 22.5k), a later one with 1 thread at 31.3k (minimal axum 24.9k).
fn wrk_threads() -> usize {
    std::env::var("BENCH_WRK_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

async fn wrk(url: &str, secs: f64, bodies: Option<&std::path::Path>, bearer: Option<&str>) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let threads = wrk_threads();
    let mut cmd = std::process::Command::new("wrk");
    cmd.args([
        &format!("-t{threads}"),
        &format!("-c{CLIENTS}"),
        &format!("-d{}s", secs.ceil() as u64),
        "--timeout",
        "10s",
    ]);
    if let Some(t) = bearer {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let parsed = url::Url::parse(url).unwrap();
    let origin = format!("{}://{}", parsed.scheme(), parsed.host_str().unwrap())
        + &parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
    if let Some(file) = bodies {
        let script = dir.path().join("post.lua");
        let text = WRK_POST_SCRIPT.replace("args_path", &format!("{:?}", parsed.path()));
        std::fs::write(&script, text).unwrap();
        cmd.arg("-s")
            .arg(&script)
            .arg(&origin)
            .arg("--")
            .arg(file)
            .arg(threads.to_string());
    } else {
        cmd.arg(url);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "wrk failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("Non-2xx"),
        "non-2xx answers under load:\n{text}"
    );
    assert!(
        !text.contains("Socket errors"),
        "socket errors under load:\n{text}"
    );
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk output:\n{text}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn config(dir: &std::path::Path, bootstrap: Option<String>) -> Config {
    let mut c = Config::default();
    c.data_dir = dir.to_path_buf();
    c.http = "127.0.0.1:0".parse().unwrap();
    c.mesh_listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    c.bootstrap = bootstrap.into_iter().map(|b| b.parse().unwrap()).collect();
    c.rate_limits.enabled = false;
    c.federation = "bench".into();
    c.discovery
        .cluster_secrets
        .insert("BENCH".into(), SECRET.into());
    c.discovery
        .cluster_secrets
        .insert("LOOKUP".into(), "lookup-secret".into());
    c
}

fn server_id(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

/// A signed register body for server `i` of `cluster` (fresh timestamp).
fn register_body_in(cluster: &str, secret: &[u8], i: usize) -> String {
    let id = server_id(i);
    let key = base64::engine::general_purpose::STANDARD.encode([5u8; 32]);
    let url = format!("https://s{i}.example:9090");
    let ts = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    json!({
        "serverId": id, "clusterId": cluster, "publicUrl": url, "version": "1.0.0",
        "publicKey": key, "timestamp": ts,
        "clusterSecretHmac": sign_registration(secret, &hmac_message(&id, cluster, &url, &key, &ts)),
    })
    .to_string()
}

/// A register body for server `i` of the `bench` cluster.
fn register_body(i: usize) -> String {
    register_body_in("bench", SECRET.as_bytes(), i)
}

/// POSTs a register body to `hub` (a base URL); returns the JSON answer.
async fn post_register(client: &reqwest::Client, hub: &str, body: String) -> Value {
    let r = client
        .post(format!("{hub}/api/v1/servers/register"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "register: {}", r.status());
    r.json().await.unwrap()
}

/// GETs `url` with a bearer token; returns the JSON answer.
async fn get_json(client: &reqwest::Client, url: &str, token: &str) -> Value {
    client
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Runs `CLIENTS` loops for `secs`, each sending `make(n)`; returns completed req/s.
async fn load<F>(client: &reqwest::Client, secs: f64, make: F) -> f64
where
    F: Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let counter = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, make, counter, errors) = (
            client.clone(),
            make.clone(),
            counter.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                match make(&client, n).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let errs = errors.load(Ordering::Relaxed);
    assert!(errs == 0, "{errs} failed requests");
    counter.load(Ordering::Relaxed) as f64 / elapsed
}

async fn baseline(register_json: Value, cluster_json: Value) -> std::net::SocketAddr {
    let app = Router::new()
        .route(
            "/api/v1/servers/register",
            post(move |axum::Json(_b): axum::Json<Value>| {
                let v = register_json.clone();
                async move { axum::Json(v) }
            }),
        )
        .route(
            "/api/v1/cluster/{id}",
            get(move || {
                let v = cluster_json.clone();
                async move { axum::Json(v) }
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let h1 = Hub::spawn(config(d1.path(), None)).await.unwrap();
        let h2 = Hub::spawn(config(d2.path(), Some(h1.dial_addr()))).await.unwrap();
        // Context for the register figure: a hub with no peer (nothing to
        // replicate), so the split between the local path (HTTP, store,
        // flush) and replication shows. Idle during the other phases.
        let d3 = tempfile::tempdir().unwrap();
        let h3 = Hub::spawn(config(d3.path(), None)).await.unwrap();
        let u3 = format!("http://{}", h3.http_addr());
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(CLIENTS)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let u1 = format!("http://{}", h1.http_addr());
        let u2 = format!("http://{}", h2.http_addr());

        // Wait (bounded) until the hubs are connected.
        let deadline = Instant::now() + Duration::from_secs(20);
        while h2.mesh().peers().await.unwrap().is_empty() {
            assert!(Instant::now() < deadline, "hubs did not connect");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Seed: a token and a cluster of 10 servers for lookups.
        let mut token = String::new();
        for i in 0..10 {
            let r = post_register(&client, &u1, register_body(i)).await;
            token = r["token"].as_str().unwrap().to_owned();
        }
        let reg_sample = post_register(&client, &u1, register_body(10)).await;
        let cluster_sample = get_json(&client, &format!("{u1}/api/v1/cluster/bench"), &token).await;
        assert_eq!(cluster_sample["servers"].as_array().unwrap().len(), 11);
        let base = format!(
            "http://{}",
            baseline(reg_sample.clone(), cluster_sample.clone()).await
        );

        // Register at hub 1 → visible in lookup at hub 2 (first, while the
        // cluster listing is small enough to hold every server).
        let mut lat = Vec::with_capacity(LATENCY_SAMPLES);
        let budget = Instant::now() + Duration::from_secs(60);
        for i in 0..LATENCY_SAMPLES {
            if Instant::now() > budget {
                break;
            }
            let body = register_body(900_000 + i);
            let id = server_id(900_000 + i);
            let start = Instant::now();
            let t = post_register(&client, &u1, body).await;
            let tok = t["token"].as_str().unwrap().to_owned();
            let deadline = start + Duration::from_secs(10);
            loop {
                // Point check through hub 2's store (what its lookup reads),
                // then confirm through its HTTP lookup.
                if h2.state().store.get("server", &format!("bench/{id}")).unwrap().is_some() {
                    lat.push(start.elapsed());
                    break;
                }
                assert!(Instant::now() < deadline, "not visible at hub 2 within 10 s");
                tokio::task::yield_now().await;
            }
            if i == 0 {
                let v = get_json(&client, &format!("{u2}/api/v1/cluster/bench"), &tok).await;
                assert!(v["servers"].as_array().unwrap().iter().any(|s| s["serverId"] == id));
            }
        }
        lat.sort();

        let loadgen = pick_loadgen();
        let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);

        // A fresh small cluster (11 servers) for the lookup phase.
        let look_token = {
            let mut t = String::new();
            for i in 0..11 {
                let r = post_register(&client, &u1, register_body_in("lookup", b"lookup-secret", i)).await;
                t = r["token"].as_str().unwrap().to_owned();
            }
            t
        };

        // Register bodies are prepared before timing: unique ids and fresh
        // HMACs, a disjoint range per run (a body sent twice is a replay).
        let per_run = 150_000usize;
        let body_dir = tempfile::tempdir().unwrap();
        let (mut hub_regs, mut base_regs, mut hub_looks, mut base_looks) = (vec![], vec![], vec![], vec![]);
        // Store flushes per second at hub 1 during each register run (context:
        // each flush is one group commit shared by the registers waiting on it).
        let mut reg_flushes = vec![];
        let mut lone_regs = vec![];
        // Lookups first (an idle mesh), then registers; after each register
        // run, wait until hub 2 holds what hub 1 holds so the replication
        // backlog of one run does not eat the CPU of the next.
        let look_url = format!("{u1}/api/v1/cluster/lookup");
        let base_look_url = format!("{base}/api/v1/cluster/lookup");
        for _ in 0..runs {
            match loadgen {
                LoadGen::Wrk => {
                    base_looks.push(wrk(&base_look_url, secs, None, Some(&look_token)).await);
                    hub_looks.push(wrk(&look_url, secs, None, Some(&look_token)).await);
                }
                LoadGen::Reqwest => {
                    let u = base_look_url.clone();
                    base_looks.push(load(&client, secs, move |c, _| c.get(&u)).await);
                    let (u, t) = (look_url.clone(), look_token.clone());
                    hub_looks.push(load(&client, secs, move |c, _| c.get(&u).bearer_auth(&t)).await);
                }
            }
        }
        for run in 0..runs {
            let first = 1000 + run * per_run;
            let bodies: Arc<Vec<String>> = Arc::new((first..first + per_run).map(register_body).collect());
            let reg_url = format!("{u1}/api/v1/servers/register");
            let base_reg_url = format!("{base}/api/v1/servers/register");
            match loadgen {
                LoadGen::Wrk => {
                    let file = body_dir.path().join(format!("bodies-{run}.txt"));
                    std::fs::write(&file, bodies.join("\n")).unwrap();
                    base_regs.push(wrk(&base_reg_url, secs, Some(&file), None).await);
                    let (f0, t0) = (h1.state().store.flush_count(), Instant::now());
                    let rate = wrk(&reg_url, secs, Some(&file), None).await;
                    reg_flushes.push((h1.state().store.flush_count() - f0) as f64 / t0.elapsed().as_secs_f64());
                    hub_regs.push(rate);
                    lone_regs.push(wrk(&format!("{u3}/api/v1/servers/register"), secs, Some(&file), None).await);
                }
                LoadGen::Reqwest => {
                    let b = bodies.clone();
                    base_regs.push(load(&client, secs, move |c, n| {
                        c.post(&base_reg_url).header("content-type", "application/json").body(b[n % b.len()].clone())
                    }).await);
                    let b = bodies.clone();
                    hub_regs.push(load(&client, secs, move |c, n| {
                        c.post(&reg_url).header("content-type", "application/json").body(b[n % b.len()].clone())
                    }).await);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let count = |h: &Hub| h.state().store.namespace_counts().unwrap().into_iter().find(|(ns, _)| ns == "server").map_or(0, |(_, n)| n);
                if count(&h2) >= count(&h1) || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let (hub_reg, base_reg, hub_look, base_look) =
            (median(hub_regs), median(base_regs), median(hub_looks), median(base_looks));


        println!(
            "facade benchmark ({CLIENTS} concurrent clients, load generator {loadgen:?} ({} thread(s) for wrk), {secs} s per phase, medians of {runs} runs, {} cores, loopback)",
            wrk_threads(),
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        );
        println!(
            "register: hub {hub_reg:.0} req/s, minimal axum {base_reg:.0} req/s, ratio {:.2}",
            hub_reg / base_reg
        );
        if !reg_flushes.is_empty() {
            let flushes = median(reg_flushes);
            println!("  store flushes at hub 1 during register: {flushes:.0}/s, {:.1} registers per flush", hub_reg / flushes);
        }
        if !lone_regs.is_empty() {
            println!("  register at a hub with no peer (no replication; context): {:.0} req/s", median(lone_regs));
        }
        println!(
            "lookup:   hub {hub_look:.0} req/s, minimal axum {base_look:.0} req/s, ratio {:.2}",
            hub_look / base_look
        );
        println!(
            "register at hub 1 -> visible at hub 2 ({} samples): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            lat.len(),
            pct(&lat, 0.5).as_secs_f64() * 1e3,
            pct(&lat, 0.99).as_secs_f64() * 1e3,
            lat.last().unwrap().as_secs_f64() * 1e3,
        );
        h3.shutdown().await;
        h2.shutdown().await;
        h1.shutdown().await;
    });
}
