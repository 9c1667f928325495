//! `cargo bench -p hubmesh-store`: the store's figures from issue #2, each the
//! median of several runs, printed beside its target.
//!
//! - merges/s of 300-byte records, batched (1000 per batch), on sled, one thread;
//! - point gets/s on sled, one thread;
//! - acknowledged (durable) writes/s with 64 concurrent writers (group commit);
//! - on-disk size after churn (a live set of 100k records, 10× that inserted
//!   and deleted), as a ratio to the live data size.
//!
//! `HUBMESH_BENCH_QUICK=1` shrinks every size tenfold (for a smoke run);
//! `HUBMESH_BENCH_CHURN_ROUNDS=N` runs N churn rounds instead of 10 (the
//! ratio is printed after each, to show where it settles);
//! `HUBMESH_BENCH_ONLY=merges,gets,durable,engine,churn` picks scenarios
//! (`engine` is context: raw sled with no record logic).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hubmesh_store::{Clock, Draft, OriginId, Record, Signer, Store, StoreConfig, Version, codec};

/// The allocator the `hubmesh` binary ships with: sled allocates per
/// operation, and glibc malloc cost it ~40% on merges here.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const T0: u64 = 1_800_000_000_000;

struct BenchSigner;
impl Signer for BenchSigner {
    fn origin(&self) -> OriginId {
        OriginId::new(vec![1; 38])
    }
    fn sign(&self, _msg: &[u8]) -> Vec<u8> {
        vec![7; 64]
    }
}

fn scale() -> usize {
    if std::env::var_os("HUBMESH_BENCH_QUICK").is_some() {
        10
    } else {
        1
    }
}

fn open(dir: &std::path::Path, clock: Clock) -> Store {
    open_with_record_cache(dir, clock, StoreConfig::default().record_cache_bytes)
}

fn open_with_record_cache(dir: &std::path::Path, clock: Clock, record_cache_bytes: u64) -> Store {
    Store::open_with(StoreConfig {
        path: Some(dir.to_path_buf()),
        clock,
        record_cache_bytes,
        ..StoreConfig::default()
    })
    .expect("open store")
}

/// A record whose encoding is 300 bytes.
fn record(i: u64, origin: u8, body_len: usize) -> Record {
    Record {
        ns: "server".into(),
        key: format!("cluster-{:04}/{:016x}", i % 1000, i),
        body: vec![0xab; body_len],
        origin: OriginId::new(vec![origin; 38]),
        version: Version {
            wall_ms: T0 + i,
            counter: 0,
        },
        seq: i + 1,
        expires_ms: T0 + 86_400_000,
        deleted: false,
        terms: vec![],
        sig: vec![9; 64],
    }
}

fn body_len_for_300() -> usize {
    let base = codec::encode_record(&record(0, 2, 0))
        .expect("encode")
        .len();
    // A CBOR byte string over 23 bytes carries a 1-byte length header.
    300 - base - 1
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench_merges(body_len: usize) -> f64 {
    let n = 200_000 / scale();
    let mut runs = Vec::new();
    for _ in 0..5 {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), Clock::manual(T0));
        // Batches are built before the clock starts: copying the input is
        // the caller's cost, not the store's.
        let batches: Vec<Vec<Record>> = (0..n as u64)
            .map(|i| record(i, 2, body_len))
            .collect::<Vec<_>>()
            .chunks(1000)
            .map(<[Record]>::to_vec)
            .collect();
        let start = Instant::now();
        for batch in batches {
            store.merge(batch).expect("merge");
        }
        runs.push(n as f64 / start.elapsed().as_secs_f64());
    }
    median(runs)
}

/// Point gets over 100k records, uniformly at random. With the record cache
/// (the default), the first pass fills it, so the median run is all hits;
/// `record_cache_bytes == 0` measures the engine read path alone.
fn bench_gets(body_len: usize, record_cache_bytes: u64) -> f64 {
    let n = 100_000 / scale();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with_record_cache(dir.path(), Clock::manual(T0), record_cache_bytes);
    let records: Vec<Record> = (0..n as u64).map(|i| record(i, 2, body_len)).collect();
    let keys: Vec<String> = records.iter().map(|r| r.key.clone()).collect();
    for chunk in records.chunks(1000) {
        store.merge(chunk.to_vec()).expect("merge");
    }
    let gets = 1_000_000 / scale();
    let mut runs = Vec::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..gets {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = &keys[(x % n as u64) as usize];
            let r = store.get("server", k).expect("get");
            assert!(r.is_some());
        }
        runs.push(gets as f64 / start.elapsed().as_secs_f64());
    }
    median(runs)
}

fn bench_durable(body_len: usize) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut runs = Vec::new();
    let mut per_flush = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), Clock::System);
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let secs = 3.0 / scale() as f64 + 0.5;
        let elapsed = rt.block_on(async {
            let mut tasks = Vec::new();
            let start = Instant::now();
            for w in 0..64 {
                let (store, done, stop) = (store.clone(), done.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let d = Draft {
                            ns: "server".into(),
                            key: format!("w{w}/{i}"),
                            body: vec![0xab; body_len],
                            expires_ms: u64::MAX,
                            deleted: false,
                            terms: vec![],
                        };
                        store.originate(vec![d], &BenchSigner).await.expect("write");
                        done.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                }));
            }
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                t.await.expect("writer");
            }
            start.elapsed()
        });
        let n = done.load(Ordering::Relaxed) as f64;
        runs.push(n / elapsed.as_secs_f64());
        per_flush.push(n / store.flush_count().max(1) as f64);
    }
    (median(runs), median(per_flush))
}

/// The engine's own ceiling, for context: single inserts of 300-byte values
/// into raw sled (no record logic), the latency of one insert + flush, and
/// raw sled's on-disk size over the data it holds.
fn bench_engine() -> (f64, f64, f64) {
    let raw_sled = |dir: &std::path::Path| {
        sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(1000))
            .open()
            .expect("sled")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let db = raw_sled(dir.path());
    let n = 200_000 / scale();
    let value = vec![0xabu8; 300];
    let mut runs = Vec::new();
    for run in 0..3 {
        let t = db.open_tree(format!("t{run}")).expect("tree");
        let start = Instant::now();
        for i in 0..n {
            let key = format!("cluster-{:04}/{:016x}", i % 1000, i);
            t.insert(key.as_bytes(), value.clone()).expect("insert");
        }
        runs.push(n as f64 / start.elapsed().as_secs_f64());
    }
    // Space: a fresh database holding 100k 300-byte values written in the
    // churn scenario's key order, no deletes.
    let space = {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = raw_sled(dir.path());
        let live = 100_000 / scale();
        for i in 0..live {
            let key = format!("cluster-{:04}/{:016x}", i % 1000, i);
            db.insert(key.as_bytes(), value.clone()).expect("insert");
        }
        db.flush().expect("flush");
        db.size_on_disk().expect("size") as f64 / (live * value.len()) as f64
    };
    let t = db.open_tree("flush").expect("tree");
    let mut flushes = Vec::new();
    for i in 0..200u32 {
        let start = Instant::now();
        t.insert(i.to_be_bytes(), value.clone()).expect("insert");
        db.flush().expect("flush");
        flushes.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    (median(runs), median(flushes), space)
}

fn bench_churn(body_len: usize) -> (f64, u64, u64) {
    let live = 100_000 / scale();
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual(T0);
    let store = open(dir.path(), clock.clone());
    let draft = |i: usize, deleted: bool| Draft {
        ns: "server".into(),
        key: format!("cluster-{:04}/{:016x}", i % 1000, i),
        body: if deleted {
            vec![]
        } else {
            vec![0xab; body_len]
        },
        // Tombstones live one minute: long enough to beat late copies in this run.
        expires_ms: clock.now_ms() + if deleted { 60_000 } else { 86_400_000 * 30 },
        deleted,
        terms: vec![],
    };
    let write = |drafts: Vec<Draft>| {
        for c in drafts.chunks(1000) {
            let _ = store
                .originate_nowait(c.to_vec(), &BenchSigner)
                .expect("write");
        }
    };
    write((0..live).map(|i| draft(i, false)).collect());
    let rounds: usize = std::env::var("HUBMESH_BENCH_CHURN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut per_round = Vec::new();
    for round in 1..=rounds {
        // Insert a fresh live set, delete the previous one.
        write(
            (round * live..(round + 1) * live)
                .map(|i| draft(i, false))
                .collect(),
        );
        write(
            ((round - 1) * live..round * live)
                .map(|i| draft(i, true))
                .collect(),
        );
        clock.advance(Duration::from_secs(120));
        while store.sweep_expired(10_000).expect("sweep") > 0 {}
        per_round.push(store.size_on_disk().expect("size"));
    }
    println!(
        "  on-disk MB after each churn round: {}",
        per_round
            .iter()
            .map(|b| (b / 1_000_000).to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    store.flush_now().expect("flush");
    let live_bytes: u64 = store
        .scan_prefix("server", "", None, usize::MAX)
        .expect("scan")
        .iter()
        .map(|r| codec::encode_record(r).expect("encode").len() as u64)
        .sum();
    let disk = store.size_on_disk().expect("size");
    (disk as f64 / live_bytes as f64, disk, live_bytes)
}

fn main() {
    // The hub runs with transparent huge pages off (`Hub::spawn`, see
    // specs/config.md); measure the store as it runs there.
    #[cfg(target_os = "linux")]
    nix::sys::prctl::set_thp_disable(true).expect("prctl(PR_SET_THP_DISABLE)");
    // `cargo bench` passes `--bench`; a filter argument is accepted and ignored.
    let body_len = body_len_for_300();
    let rec_len = codec::encode_record(&record(0, 2, body_len))
        .expect("encode")
        .len();
    println!(
        "hubmesh-store benchmarks ({} cores, record = {rec_len} bytes encoded)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let only = std::env::var("HUBMESH_BENCH_ONLY").unwrap_or_default();
    let run = |name: &str| only.is_empty() || only.split(',').any(|o| o == name);
    if run("merges") {
        let merges = bench_merges(body_len);
        println!(
            "merges/s (sled, batches of 1000, 1 thread):  {merges:>10.0}   target >= 100000   {}",
            verdict(merges >= 100_000.0)
        );
    }
    if run("gets") {
        let gets = bench_gets(body_len, StoreConfig::default().record_cache_bytes);
        println!(
            "point gets/s (sled + record cache, 1 thread):{gets:>10.0}   target >= 500000   {}",
            verdict(gets >= 500_000.0)
        );
        let uncached = bench_gets(body_len, 0);
        println!("  context: point gets/s with the record cache off (sled reads): {uncached:.0}");
    }
    if run("durable") {
        let (durable, per_flush) = bench_durable(body_len);
        println!(
            "durable writes/s (64 writers, group commit): {durable:>10.0}   target >= 10000    {}",
            verdict(durable >= 10_000.0)
        );
        println!("  writes per flush (median): {per_flush:.1}");
    }
    if run("engine") {
        let (inserts, flush_ms, space) = bench_engine();
        println!(
            "raw sled inserts/s (context, 1 thread):      {inserts:>10.0}   insert+flush median {flush_ms:.2} ms"
        );
        println!("  raw sled on-disk / data, 100k x 300 B values, no deletes: {space:.2}");
    }
    if run("churn") {
        let (ratio, disk, live) = bench_churn(body_len);
        println!(
            "on-disk / live after churn:                  {ratio:>10.2}   target <= 3.0      {}   ({disk} bytes on disk, {live} bytes live)",
            verdict(ratio <= 3.0)
        );
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}
