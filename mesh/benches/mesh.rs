//! Mesh benchmarks over real QUIC on loopback, all hubs in this process.
//! `cargo bench -p hubmesh-mesh [-- gossip|signal|ingest]` prints:
//!
//! - gossip: 10 hubs, time from `write` at one hub to the record being held
//!   (merged, `RecordAccepted`) by all nine others, p50/p99 over 1000 writes;
//! - signal: signal round trip between two hubs (A → B, B echoes → A),
//!   p50/p99 over 2000 round trips, next to a bare libp2p ping round trip
//!   over QUIC measured in the same run, and their ratio;
//! - ingest: validated records per second one hub merges from gossip.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use hubmesh_mesh::{HubSigner, Mesh, MeshConfig, MeshEvent, Multiaddr};
use hubmesh_store::{Draft, OriginId, Store};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use tokio::sync::mpsc;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn draft(key: String) -> Draft {
    Draft {
        ns: "server".into(),
        key,
        body: vec![0xa1, 0x61, 0x6e, 0x18, 0x2a],
        expires_ms: now_ms() + 3_600_000,
        deleted: false,
        terms: vec![],
    }
}

struct Hub {
    mesh: Mesh,
    events: Option<mpsc::Receiver<MeshEvent>>,
    store: Store,
    addr: Multiaddr,
    _dir: tempfile::TempDir,
}

async fn hub(boot: Vec<Multiaddr>) -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::memory();
    let mut cfg = MeshConfig::new("bench", dir.path());
    cfg.bootstrap = boot;
    cfg.event_buffer = 64 * 1024;
    let (mesh, events) = Mesh::start(cfg, store.clone()).await.unwrap();
    let addr = mesh.listen_addrs().await.unwrap()[0]
        .clone()
        .with(Protocol::P2p(mesh.peer_id()));
    Hub {
        mesh,
        events: Some(events),
        store,
        addr,
        _dir: dir,
    }
}

async fn wait_peers(hubs: &[&Mesh], n: usize, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let mut min = usize::MAX;
        for h in hubs {
            min = min.min(h.peers().await.unwrap().len());
        }
        if min >= n || Instant::now() > deadline {
            return min;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

async fn gossip_propagation() {
    const HUBS: usize = 10;
    const WRITES: usize = 1000;
    let mut hubs = vec![hub(vec![]).await];
    for _ in 1..HUBS {
        let boot = vec![hubs[0].addr.clone()];
        hubs.push(hub(boot).await);
    }
    let meshes: Vec<&Mesh> = hubs.iter().map(|h| &h.mesh).collect();
    let min_peers = wait_peers(&meshes, HUBS - 1, Duration::from_secs(20)).await;
    // Every hub's RecordAccepted events go to one collector with their arrival time.
    let (tx, mut rx) = mpsc::channel::<(String, Instant)>(64 * 1024);
    for h in hubs.iter_mut() {
        let mut events = h.events.take().unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if let MeshEvent::RecordAccepted(r) = ev {
                    let _ = tx.send((r.key, Instant::now())).await;
                }
            }
        });
    }
    // Let gossipsub build its mesh (a few heartbeats) before measuring.
    for i in 0..20 {
        hubs[i % HUBS]
            .mesh
            .write(vec![draft(format!("warm/{i}"))])
            .await
            .unwrap();
    }
    let mut arrivals: HashMap<String, usize> = HashMap::new();
    let warm_deadline = Instant::now() + Duration::from_secs(10);
    while arrivals.values().filter(|n| **n == HUBS - 1).count() < 20
        && Instant::now() < warm_deadline
    {
        if let Ok(Some((k, _))) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await
        {
            *arrivals.entry(k).or_default() += 1;
        }
    }
    let mut lat = Vec::with_capacity(WRITES);
    let mut write_lat = Vec::with_capacity(WRITES);
    let mut first_lat = Vec::with_capacity(WRITES);
    let mut lost = 0;
    let started = Instant::now();
    for i in 0..WRITES {
        let key = format!("rec/{i}");
        let t0 = Instant::now();
        hubs[i % HUBS]
            .mesh
            .write(vec![draft(key.clone())])
            .await
            .unwrap();
        write_lat.push(t0.elapsed());
        let mut seen = 0;
        let mut last = t0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while seen < HUBS - 1 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((k, at))) if k == key => {
                    if seen == 0 {
                        first_lat.push(at - t0);
                    }
                    seen += 1;
                    last = at;
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        if seen == HUBS - 1 {
            lat.push(last - t0);
        } else {
            lost += 1;
        }
    }
    let total = started.elapsed();
    lat.sort();
    write_lat.sort();
    first_lat.sort();
    println!(
        "  (durable local write p50 {} p99 {}; first remote hub p50 {} p99 {})",
        ms(pct(&write_lat, 0.5)),
        ms(pct(&write_lat, 0.99)),
        ms(pct(&first_lat, 0.5)),
        ms(pct(&first_lat, 0.99))
    );
    println!(
        "gossip propagation: {HUBS} hubs (min peers per hub {min_peers}), {} writes held by all: p50 {} p99 {} max {} (lost {lost}, {:.1} s)",
        lat.len(),
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(pct(&lat, 1.0)),
        total.as_secs_f64()
    );
    for h in &hubs {
        h.mesh.shutdown().await;
    }
}

/// Bare libp2p ping RTTs between two QUIC swarms (5 ms interval).
async fn bare_ping(samples: usize) -> Vec<Duration> {
    let mk = || {
        libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_quic()
            .with_behaviour(|_| {
                libp2p::ping::Behaviour::new(
                    libp2p::ping::Config::new().with_interval(Duration::from_millis(5)),
                )
            })
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build()
    };
    let mut a = mk();
    let mut b = mk();
    b.listen_on("/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap())
        .unwrap();
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = b.select_next_some().await {
            break address;
        }
    };
    let b_task = tokio::spawn(async move {
        loop {
            b.select_next_some().await;
        }
    });
    a.dial(addr).unwrap();
    let mut rtts = Vec::with_capacity(samples);
    let deadline = Instant::now() + Duration::from_secs(30);
    while rtts.len() < samples + 20 && Instant::now() < deadline {
        if let SwarmEvent::Behaviour(libp2p::ping::Event {
            result: Ok(rtt), ..
        }) = a.select_next_some().await
        {
            rtts.push(rtt);
        }
    }
    b_task.abort();
    rtts.drain(..20.min(rtts.len())); // warm-up
    rtts
}

async fn signal_rtt() {
    const N: usize = 2000;
    let mut a = hub(vec![]).await;
    let mut b = hub(vec![a.addr.clone()]).await;
    wait_peers(&[&a.mesh, &b.mesh], 1, Duration::from_secs(10)).await;
    let b_id = b.mesh.peer_id();
    // B echoes every signal back to A.
    let mut b_events = b.events.take().unwrap();
    let b_mesh = b.mesh.clone();
    let echo = tokio::spawn(async move {
        while let Some(ev) = b_events.recv().await {
            if let MeshEvent::Signal { from, payload } = ev {
                let _ = b_mesh.send_signal(from, payload).await;
            }
        }
    });
    let mut a_events = a.events.take().unwrap();
    let mut rtts = Vec::with_capacity(N);
    for i in 0..(N + 100) {
        let t0 = Instant::now();
        a.mesh
            .send_signal(b_id, (i as u64).to_be_bytes().to_vec())
            .await
            .unwrap();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(5), a_events.recv())
                .await
                .expect("echo in time")
                .unwrap();
            if let MeshEvent::Signal { from, .. } = ev
                && from == b_id
            {
                break;
            }
        }
        if i >= 100 {
            rtts.push(t0.elapsed());
        }
    }
    echo.abort();
    a.mesh.shutdown().await;
    b.mesh.shutdown().await;
    let mut ping = bare_ping(1000).await;
    rtts.sort();
    ping.sort();
    let (s50, s99, p50, p99) = (
        pct(&rtts, 0.5),
        pct(&rtts, 0.99),
        pct(&ping, 0.5),
        pct(&ping, 0.99),
    );
    println!(
        "signal relay round trip: {} samples p50 {} p99 {}; bare libp2p ping over QUIC: {} samples p50 {} p99 {}; ratio p50 {:.2} p99 {:.2}",
        rtts.len(),
        ms(s50),
        ms(s99),
        ping.len(),
        ms(p50),
        ms(p99),
        s50.as_secs_f64() / p50.as_secs_f64(),
        s99.as_secs_f64() / p99.as_secs_f64()
    );
}

async fn ingest() {
    const N: usize = 20_000;
    const CHUNK: usize = 500;
    const WINDOW: u64 = 4_000;
    let p = hub(vec![]).await;
    let r = hub(vec![p.addr.clone()]).await;
    wait_peers(&[&p.mesh, &r.mesh], 1, Duration::from_secs(10)).await;
    // Gossip needs the subscription exchange: wait until one record flows.
    let signer = HubSigner(p.mesh.keypair().clone());
    let origin = OriginId::new(p.mesh.peer_id().to_bytes());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    while r.store.watermark(&origin).unwrap() == 0 && Instant::now() < deadline {
        let rec = p
            .store
            .originate(vec![draft(format!("warm/{n}"))], &signer)
            .await
            .unwrap();
        p.mesh.publish_via(rec, true, false).await.unwrap();
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let base = p.store.watermark(&origin).unwrap();
    // Sign everything up front: the receiver's cost is what is measured.
    let mut chunks = Vec::new();
    for c in 0..(N / CHUNK) {
        let drafts = (0..CHUNK)
            .map(|i| draft(format!("ingest/{c}/{i}")))
            .collect();
        let (records, ticket) = p.store.originate_nowait(drafts, &signer).unwrap();
        p.store.durable(ticket).await.unwrap();
        chunks.push(records);
    }
    // Let the receiver catch up on warm-up records before timing.
    while r.store.watermark(&origin).unwrap() < base && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let mut sent = 0u64;
    let limit = Instant::now() + Duration::from_secs(60);
    for chunk in chunks {
        while sent > WINDOW + r.store.watermark(&origin).unwrap().saturating_sub(base) {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        sent += chunk.len() as u64;
        p.mesh.publish_via(chunk, true, false).await.unwrap();
    }
    let target = base + N as u64;
    while r.store.watermark(&origin).unwrap() < target && Instant::now() < limit {
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let elapsed = started.elapsed();
    let got = r.store.watermark(&origin).unwrap() - base;
    println!(
        "gossip ingest: {got}/{N} validated records merged by one hub in {:.3} s = {:.0} records/s",
        elapsed.as_secs_f64(),
        got as f64 / elapsed.as_secs_f64()
    );
    p.mesh.shutdown().await;
    r.mesh.shutdown().await;
}

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if want("gossip") {
            gossip_propagation().await;
        }
        if want("signal") {
            signal_rtt().await;
        }
        if want("ingest") {
            ingest().await;
        }
    });
}
