//! An acknowledged write survives SIGKILL of the writer.
//!
//! The test re-runs its own binary as a child (`crash_child`, which does
//! nothing unless `HUBMESH_CRASH_DIR` is set). The child writes records from
//! many concurrent writers and prints `ack <key>` only after the store said the
//! write is durable. The parent kills it with SIGKILL at a random moment,
//! reopens the store, and checks every acknowledged record.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use common::*;
use hubmesh_store::Store;

const DIR_ENV: &str = "HUBMESH_CRASH_DIR";
const ROUND_ENV: &str = "HUBMESH_CRASH_ROUND";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(dir) = std::env::var(DIR_ENV) else {
        return; // Only does something when spawned by the parent test.
    };
    let round: u32 = std::env::var(ROUND_ENV).unwrap().parse().unwrap();
    let store = Store::open(&dir).unwrap();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let s = TestSigner(origin(1));
            for i in 0.. {
                let key = format!("r{round}/w{w}/{i}");
                let body = key.clone().into_bytes();
                store
                    .originate(vec![draft("server", &key, &body, u64::MAX)], &s)
                    .await
                    .unwrap();
                println!("ack {key}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let seed: u64 = std::env::var("HUBMESH_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("seed {seed} (set HUBMESH_TEST_SEED to replay)");
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut acked: Vec<String> = Vec::new();
    for round in 0..3 {
        let kill_after_acks = 50 + next() % 400;
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(DIR_ENV, dir.path())
            .env(ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = sync_channel::<String>(1024);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(key) = line.strip_prefix("ack ")
                    && tx.send(key.to_owned()).is_err()
                {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut this_round = 0;
        while this_round < kill_after_acks {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(key) => {
                    acked.push(key);
                    this_round += 1;
                }
                Err(e) => {
                    let _ = child.kill();
                    panic!("child stopped acknowledging after {this_round} acks: {e}");
                }
            }
        }
        // Kill mid-write: writers are in flight right now.
        std::thread::sleep(Duration::from_micros(next() % 5000));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Acks printed before the kill are acknowledged too.
        reader.join().unwrap();
        acked.extend(rx.try_iter());

        let store = Store::open(dir.path()).expect("store reopens after SIGKILL");
        for key in &acked {
            let r = store
                .get("server", key)
                .unwrap_or_else(|e| panic!("reading {key}: {e}"))
                .unwrap_or_else(|| panic!("acknowledged record {key} lost (seed {seed})"));
            assert_eq!(r.body, key.as_bytes());
        }
        // The whole store is readable and sequence numbers stayed unique.
        let all = store.records_since(&origin(1), 0, usize::MAX).unwrap();
        let mut seqs: Vec<u64> = all.records.iter().map(|r| r.seq).collect();
        let n = seqs.len();
        seqs.dedup();
        assert_eq!(seqs.len(), n);
        assert!(n >= acked.len());
        // A crash keeps a prefix of the writes (sled recovers a prefix of its
        // log). Sequence numbers are handed out in order within a child run,
        // and a restarted child skips the rest of its reserved block. So a
        // gap between two held seqs is only allowed between runs: a record
        // lost while a later one of the same run survived breaks the prefix.
        let round_of = |r: &hubmesh_store::Record| -> u32 {
            r.key[1..r.key.find('/').unwrap()].parse().unwrap()
        };
        let mut by_seq: Vec<&hubmesh_store::Record> = all.records.iter().collect();
        by_seq.sort_by_key(|r| r.seq);
        for pair in by_seq.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                b.seq == a.seq + 1 || round_of(a) < round_of(b),
                "seqs {}..{} lost inside run {} while {} survived (seed {seed})",
                a.seq + 1,
                b.seq - 1,
                round_of(b),
                b.seq
            );
        }
        // The watermark is written after the records: it never claims more.
        let wm = store.watermark(&origin(1)).unwrap();
        assert!(
            wm <= by_seq.last().map_or(0, |r| r.seq),
            "watermark {wm} above every held seq (seed {seed})"
        );
        assert!(store.namespace_counts().is_ok());
    }
}
