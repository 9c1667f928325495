//! The store's behaviour, run against both engines (sled on disk and memory).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::*;
use hubmesh_store::{MergeOutcome, StoreError, codec};
use serde::{Deserialize, Serialize};

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sled {
            $( #[tokio::test] async fn $name() { super::$name(super::Harness::new(super::Backend::Sled)).await } )*
        }
        mod in_memory {
            $( #[tokio::test] async fn $name() { super::$name(super::Harness::new(super::Backend::Memory)).await } )*
        }
    };
}

both_backends!(
    originate_then_read_back,
    last_writer_wins_on_version_then_origin,
    tombstone_is_not_undone_by_a_late_copy,
    reads_never_return_expired_records,
    prefix_scan_pages_within_a_namespace,
    term_index_follows_the_held_version,
    sync_pages_and_watermarks,
    own_sequence_numbers_never_repeat,
    local_write_supersedes_what_the_hub_holds,
    local_trees_round_trip,
    sealed_trees_encrypt_and_authenticate,
    corrupt_and_foreign_values_are_typed_errors,
    oversized_records_are_rejected_and_the_batch_goes_on,
    concurrent_durable_writers_all_complete,
    namespace_counts_count_live_records,
    change_stamps_move_with_every_write_to_their_group,
    cached_point_reads_follow_every_write,
);

async fn originate_then_read_back(h: Harness) {
    let s = TestSigner(origin(1));
    let recs = h
        .store
        .originate(vec![draft("server", "acme/1", b"\xa0", T0 + HOUR)], &s)
        .await
        .unwrap();
    assert_eq!(recs[0].seq, 1);
    assert_eq!(recs[0].origin, origin(1));
    assert_eq!(recs[0].version.wall_ms, T0);
    let got = h.store.get("server", "acme/1").unwrap().unwrap();
    assert_eq!(got, recs[0]);
    let raw = h.store.get_raw("server", "acme/1").unwrap().unwrap();
    assert_eq!(raw, codec::encode_record(&recs[0]).unwrap());
    let h = h.reopen();
    assert_eq!(h.store.get("server", "acme/1").unwrap().unwrap(), recs[0]);
}

async fn last_writer_wins_on_version_then_origin(h: Harness) {
    let a = rec("server", "k", 1, T0, 1);
    let b = rec("server", "k", 2, T0, 1); // same version, higher origin: wins
    let c = rec("server", "k", 1, T0 - 5, 2); // older version: loses
    let r = h
        .store
        .merge(vec![a.clone(), b.clone(), c.clone(), b.clone()])
        .unwrap();
    assert_eq!(
        r.outcomes,
        vec![
            MergeOutcome::Applied,
            MergeOutcome::Applied,
            MergeOutcome::Stale,
            MergeOutcome::Duplicate
        ]
    );
    h.store.durable(r.ticket).await.unwrap();
    assert_eq!(h.store.get("server", "k").unwrap().unwrap(), b);
    let r = h.store.merge(vec![a.clone()]).unwrap();
    assert_eq!(r.outcomes, vec![MergeOutcome::Stale]);
    assert_eq!(h.store.get("server", "k").unwrap().unwrap(), b);
}

async fn tombstone_is_not_undone_by_a_late_copy(h: Harness) {
    let live = rec("server", "k", 1, T0, 1);
    let mut tomb = rec("server", "k", 2, T0 + 10, 1);
    tomb.deleted = true;
    tomb.body.clear();
    tomb.expires_ms = live.expires_ms + HOUR;
    h.store.merge(vec![tomb.clone()]).unwrap();
    // The late copy arrives after the delete.
    let r = h.store.merge(vec![live.clone()]).unwrap();
    assert_eq!(r.outcomes, vec![MergeOutcome::Stale]);
    assert!(h.store.get("server", "k").unwrap().is_none());
    assert_eq!(h.store.get_any("server", "k").unwrap().unwrap(), tomb);
    // Once both have expired, the tombstone is swept and the late copy is refused as expired.
    h.advance(26 * HOUR);
    assert_eq!(h.store.sweep_expired(100).unwrap(), 1);
    assert!(h.store.get_any("server", "k").unwrap().is_none());
    let r = h.store.merge(vec![live]).unwrap();
    assert_eq!(r.outcomes, vec![MergeOutcome::Expired]);
}

async fn reads_never_return_expired_records(h: Harness) {
    let s = TestSigner(origin(1));
    h.store
        .originate(
            vec![
                draft("presence", "n1", b"a", T0 + 1000),
                draft("presence", "n2", b"b", T0 + 5000),
            ],
            &s,
        )
        .await
        .unwrap();
    h.advance(1000);
    assert!(h.store.get("presence", "n1").unwrap().is_none());
    assert!(h.store.get_raw("presence", "n1").unwrap().is_none());
    assert!(h.store.get("presence", "n2").unwrap().is_some());
    let scanned = h.store.scan_prefix("presence", "", None, 10).unwrap();
    assert_eq!(scanned.len(), 1);
    assert!(
        h.store
            .records_since(&origin(1), 0, 10)
            .unwrap()
            .records
            .len()
            == 1
    );
    // The sweep removes exactly the expired one, and is idempotent.
    assert_eq!(h.store.sweep_expired(100).unwrap(), 1);
    assert_eq!(h.store.sweep_expired(100).unwrap(), 0);
    assert!(h.store.get("presence", "n2").unwrap().is_some());
    // An already-expired record is never stored.
    let mut old = rec("presence", "n3", 2, T0, 1);
    old.expires_ms = T0;
    assert_eq!(
        h.store.merge(vec![old]).unwrap().outcomes,
        vec![MergeOutcome::Expired]
    );
    assert!(h.store.get_any("presence", "n3").unwrap().is_none());
}

async fn prefix_scan_pages_within_a_namespace(h: Harness) {
    let s = TestSigner(origin(1));
    let mut drafts = Vec::new();
    for i in 0..25 {
        drafts.push(draft("server", &format!("acme/{i:02}"), b"x", T0 + HOUR));
    }
    drafts.push(draft("server", "acmeX/1", b"x", T0 + HOUR));
    drafts.push(draft("servers", "acme/99", b"x", T0 + HOUR));
    drafts.push(draft("server", "other/1", b"x", T0 + HOUR));
    h.store.originate(drafts, &s).await.unwrap();
    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = h
            .store
            .scan_prefix("server", "acme/", after.as_deref(), 10)
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = Some(page.last().unwrap().key.clone());
        keys.extend(page.into_iter().map(|r| r.key));
    }
    let want: Vec<String> = (0..25).map(|i| format!("acme/{i:02}")).collect();
    assert_eq!(keys, want);
}

async fn term_index_follows_the_held_version(h: Harness) {
    let s = TestSigner(origin(1));
    let mut d = draft("profile", "node-a", b"v1", T0 + HOUR);
    d.terms = vec!["rust".into(), "p2p".into()];
    h.store.originate(vec![d.clone()], &s).await.unwrap();
    let mut d2 = draft("profile", "node-b", b"v1", T0 + HOUR);
    d2.terms = vec!["rust".into()];
    h.store.originate(vec![d2], &s).await.unwrap();
    assert_eq!(h.store.by_term("profile", "rust", 10).unwrap().len(), 2);
    assert_eq!(h.store.by_term("profile", "p2p", 10).unwrap().len(), 1);
    // node-a changes its topics: the old term no longer finds it.
    d.terms = vec!["go".into()];
    h.store.originate(vec![d.clone()], &s).await.unwrap();
    assert!(h.store.by_term("profile", "p2p", 10).unwrap().is_empty());
    assert_eq!(
        h.store.by_term("profile", "go", 10).unwrap()[0].key,
        "node-a"
    );
    assert_eq!(h.store.by_term("profile", "rust", 10).unwrap().len(), 1);
    // A tombstone declares no terms.
    d.deleted = true;
    h.store.originate(vec![d], &s).await.unwrap();
    assert!(h.store.by_term("profile", "go", 10).unwrap().is_empty());
    // The limit is honoured.
    assert_eq!(h.store.by_term("profile", "rust", 0).unwrap().len(), 0);
}

async fn sync_pages_and_watermarks(h: Harness) {
    let o = origin(7);
    // Out of order: 3 before 1 and 2. The watermark only counts contiguous runs.
    h.store.merge(vec![rec("server", "c", 7, T0, 3)]).unwrap();
    assert_eq!(h.store.watermark(&o).unwrap(), 0);
    h.store
        .merge(vec![
            rec("server", "a", 7, T0, 1),
            rec("server", "b", 7, T0, 2),
        ])
        .unwrap();
    assert_eq!(h.store.watermark(&o).unwrap(), 3);
    // A gap (seq 4 never seen) holds the watermark at 3.
    h.store.merge(vec![rec("server", "e", 7, T0, 5)]).unwrap();
    assert_eq!(h.store.watermark(&o).unwrap(), 3);
    // After a full sync from a peer whose watermark is 5, it moves.
    h.store.advance_watermark(&o, 5).unwrap();
    assert_eq!(h.store.watermark(&o).unwrap(), 5);
    h.store.advance_watermark(&o, 2).unwrap();
    assert_eq!(h.store.watermark(&o).unwrap(), 5);

    // Pages: records with seq > after, ascending, in bounded pages.
    let mut batch = Vec::new();
    for seq in 6..=30 {
        batch.push(rec("server", &format!("k{seq}"), 7, T0, seq));
    }
    h.store.merge(batch).unwrap();
    let mut got = Vec::new();
    let mut after = 2;
    loop {
        let page = h.store.records_since(&o, after, 7).unwrap();
        assert!(page.records.len() <= 7);
        assert_eq!(page.watermark, 30);
        got.extend(page.records.iter().map(|r| r.seq));
        match page.next_after {
            Some(n) => after = n,
            None => break,
        }
    }
    let mut want = vec![3, 5];
    want.extend(6..=30);
    assert_eq!(got, want);
    // A superseded record leaves its origin's stream.
    h.store
        .merge(vec![rec("server", "k6", 8, T0 + 1, 1)])
        .unwrap();
    let page = h.store.records_since(&o, 5, 100).unwrap();
    assert_eq!(page.records.first().unwrap().seq, 7);
    assert_eq!(
        h.store
            .records_since(&origin(8), 0, 100)
            .unwrap()
            .records
            .len(),
        1
    );
    // Watermarks persist.
    let h = h.reopen();
    assert_eq!(h.store.watermark(&o).unwrap(), 30);
    assert!(h.store.watermarks().unwrap().contains(&(origin(8), 1)));
    assert!(
        h.store
            .records_since(&o, u64::MAX, 10)
            .unwrap()
            .records
            .is_empty()
    );
}

async fn own_sequence_numbers_never_repeat(h: Harness) {
    let s = TestSigner(origin(1));
    let a = h
        .store
        .originate(vec![draft("server", "a", b"1", T0 + HOUR)], &s)
        .await
        .unwrap();
    let b = h
        .store
        .originate(
            vec![
                draft("server", "b", b"1", T0 + HOUR),
                draft("server", "a", b"2", T0 + HOUR),
            ],
            &s,
        )
        .await
        .unwrap();
    assert_eq!((a[0].seq, b[0].seq, b[1].seq), (1, 2, 3));
    assert!(b[1].version > a[0].version);
    let h = h.reopen();
    // A copy of our own record with a higher seq came back from a peer.
    h.store.merge(vec![rec("server", "z", 1, T0, 9)]).unwrap();
    let c = h
        .store
        .originate(vec![draft("server", "c", b"1", T0 + HOUR)], &s)
        .await
        .unwrap();
    // Above every seq seen, and (after a restart) above the reserved block.
    assert!(c[0].seq >= 10, "seq {}", c[0].seq);
    let d = h
        .store
        .originate(vec![draft("server", "d", b"1", T0 + HOUR)], &s)
        .await
        .unwrap();
    assert_eq!(d[0].seq, c[0].seq + 1);
    assert_eq!(h.store.watermark(&origin(1)).unwrap(), d[0].seq);
    assert!(c[0].version > b[1].version);
}

async fn local_write_supersedes_what_the_hub_holds(h: Harness) {
    // Another hub's clock runs ahead; a delete made here after seeing its
    // record must still win.
    let far = rec("server", "k", 9, T0 + 60_000, 1);
    h.store.merge(vec![far.clone()]).unwrap();
    let s = TestSigner(origin(1));
    let mut d = draft("server", "k", b"", T0 + 48 * HOUR);
    d.deleted = true;
    let out = h.store.originate(vec![d], &s).await.unwrap();
    assert!(out[0].version > far.version);
    assert!(h.store.get("server", "k").unwrap().is_none());
    // And a fresh write on an unrelated key is ordered after what was observed.
    let out2 = h
        .store
        .originate(vec![draft("server", "other", b"x", T0 + HOUR)], &s)
        .await
        .unwrap();
    assert!(out2[0].version > far.version);
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Account {
    name: String,
    admin: bool,
}

async fn local_trees_round_trip(h: Harness) {
    let accounts = h.store.local::<Account>("accounts").unwrap();
    let alice = Account {
        name: "alice".into(),
        admin: true,
    };
    let t = accounts.insert_new("alice", &alice).unwrap().unwrap();
    h.store.durable(t).await.unwrap();
    assert!(accounts.insert_new("alice", &alice).unwrap().is_none());
    let bob = Account {
        name: "bob".into(),
        admin: false,
    };
    let t = accounts.put("bob", &bob).unwrap();
    h.store.durable(t).await.unwrap();
    assert_eq!(accounts.get("alice").unwrap().unwrap(), alice);
    let all = accounts.scan("", None, 10).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(accounts.scan("", Some("alice"), 10).unwrap()[0].0, "bob");
    assert!(accounts.put("", &bob).is_err());
    drop(accounts);
    let h = h.reopen();
    let accounts = h.store.local::<Account>("accounts").unwrap();
    assert_eq!(accounts.len().unwrap(), 2);
    let (was, t) = accounts.remove("bob").unwrap();
    h.store.durable(t).await.unwrap();
    assert!(was);
    assert!(accounts.get("bob").unwrap().is_none());
    // Local trees are not the registry: nothing replicates from them.
    assert!(h.store.watermarks().unwrap().is_empty());
    assert!(h.store.local::<Account>("Bad Name").is_err());
}

async fn sealed_trees_encrypt_and_authenticate(h: Harness) {
    let secrets = h.store.sealed::<String>("secrets").unwrap();
    let t = secrets
        .put("jwt", &"very-secret-value".to_string())
        .unwrap();
    h.store.durable(t).await.unwrap();
    let raw = secrets.debug_raw("jwt").unwrap().unwrap();
    assert!(!raw.windows(17).any(|w| w == b"very-secret-value"));
    assert_eq!(secrets.get("jwt").unwrap().unwrap(), "very-secret-value");
    // Moved to another key: refused (the key is bound as associated data).
    let _ = secrets.debug_put_raw("moved", raw.clone()).unwrap();
    assert!(matches!(
        secrets.get("moved"),
        Err(StoreError::Unseal { .. })
    ));
    // Tampered: refused.
    let mut bad = raw.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let _ = secrets.debug_put_raw("jwt", bad).unwrap();
    assert!(matches!(secrets.get("jwt"), Err(StoreError::Unseal { .. })));
    let _ = secrets.debug_put_raw("short", vec![1, 2, 3]).unwrap();
    assert!(matches!(
        secrets.get("short"),
        Err(StoreError::Unseal { .. })
    ));
    // The key survives a restart (sled keeps it in the data dir).
    let _ = secrets.put("jwt", &"v2".to_string()).unwrap();
    drop(secrets);
    let h = h.reopen();
    let secrets = h.store.sealed::<String>("secrets").unwrap();
    assert_eq!(secrets.get("jwt").unwrap().unwrap(), "v2");
}

async fn corrupt_and_foreign_values_are_typed_errors(h: Harness) {
    h.store
        .debug_put_raw("server", "garbage", vec![1, 0xff, 0xfe])
        .unwrap();
    assert!(matches!(
        h.store.get("server", "garbage"),
        Err(StoreError::Corrupt { .. })
    ));
    h.store
        .debug_put_raw("server", "future", vec![42, 0xa0])
        .unwrap();
    assert!(matches!(
        h.store.get("server", "future"),
        Err(StoreError::UnknownFormat { found: 42, .. })
    ));
    h.store.debug_put_raw("server", "empty", vec![]).unwrap();
    assert!(matches!(
        h.store.get("server", "empty"),
        Err(StoreError::Corrupt { .. })
    ));
    // A valid record for the key repairs it.
    let r = h
        .store
        .merge(vec![rec("server", "garbage", 1, T0, 1)])
        .unwrap();
    assert_eq!(r.outcomes, vec![MergeOutcome::Applied]);
    assert!(h.store.get("server", "garbage").unwrap().is_some());
    // A local tree holding a value of another type: typed error, no panic.
    let t = h.store.local::<String>("mixed").unwrap();
    let _ = t.put("k", &"text".to_string()).unwrap();
    let as_u64 = h.store.local::<Vec<u64>>("mixed").unwrap();
    assert!(matches!(as_u64.get("k"), Err(StoreError::Corrupt { .. })));
}

async fn oversized_records_are_rejected_and_the_batch_goes_on(h: Harness) {
    let mut big = rec("server", "big", 1, T0, 1);
    big.body = vec![0; hubmesh_store::MAX_BODY_BYTES + 1];
    let mut bad_ns = rec("server", "x", 1, T0, 2);
    bad_ns.ns = "NOPE".into();
    let ok = rec("server", "ok", 1, T0, 3);
    let r = h.store.merge(vec![big, bad_ns, ok]).unwrap();
    assert!(matches!(r.outcomes[0], MergeOutcome::Rejected(_)));
    assert!(matches!(r.outcomes[1], MergeOutcome::Rejected(_)));
    assert_eq!(r.outcomes[2], MergeOutcome::Applied);
    assert!(h.store.get("server", "big").unwrap().is_none());
    let s = TestSigner(origin(1));
    let mut d = draft("server", "big", b"", T0 + HOUR);
    d.body = vec![0; hubmesh_store::MAX_BODY_BYTES + 1];
    assert!(matches!(
        h.store.originate(vec![d], &s).await,
        Err(StoreError::TooLarge { .. })
    ));
}

async fn concurrent_durable_writers_all_complete(h: Harness) {
    let mut tasks = Vec::new();
    for w in 0..64u8 {
        let store = h.store.clone();
        tasks.push(tokio::spawn(async move {
            let s = TestSigner(origin(1));
            for i in 0..20 {
                store
                    .originate(
                        vec![draft("server", &format!("w{w}/{i}"), b"x", T0 + HOUR)],
                        &s,
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(std::time::Duration::from_secs(60), t)
            .await
            .expect("writers finish")
            .unwrap();
    }
    let h = h.reopen();
    assert_eq!(
        h.store
            .scan_prefix("server", "w", None, 10_000)
            .unwrap()
            .len(),
        64 * 20
    );
    assert_eq!(h.store.watermark(&origin(1)).unwrap(), 64 * 20);
}

async fn namespace_counts_count_live_records(h: Harness) {
    let s = TestSigner(origin(1));
    let mut d = draft("server", "gone", b"", T0 + HOUR);
    d.deleted = true;
    h.store
        .originate(
            vec![
                draft("node", "a", b"", T0 + HOUR),
                draft("server", "a", b"", T0 + HOUR),
                draft("server", "b", b"", T0 + 10),
                d,
            ],
            &s,
        )
        .await
        .unwrap();
    h.advance(10);
    assert_eq!(
        h.store.namespace_counts().unwrap(),
        vec![("node".to_string(), 1), ("server".to_string(), 1)]
    );
}

#[test]
fn unknown_on_disk_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path().join("db")).unwrap();
        let t = db.open_tree("registry").unwrap();
        t.insert(b"mformat", vec![99u8]).unwrap();
        db.flush().unwrap();
    }
    match hubmesh_store::Store::open(dir.path()) {
        Err(StoreError::UnknownFormat { found: 99, .. }) => {}
        other => panic!("expected UnknownFormat, got {other:?}"),
    }
}

#[test]
fn bad_key_file_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("store.key"), b"short").unwrap();
    assert!(matches!(
        hubmesh_store::Store::open(dir.path()),
        Err(StoreError::KeyFile { .. })
    ));
}

async fn change_stamps_move_with_every_write_to_their_group(h: Harness) {
    let s = TestSigner(origin(1));
    let stamp = || h.store.change_stamp("server", "acme");
    let mut last = stamp();
    // Originated, merged, deleted, swept: each moves the group's stamp.
    h.store
        .originate(vec![draft("server", "acme/1", b"a", T0 + HOUR)], &s)
        .await
        .unwrap();
    assert_ne!(stamp(), last);
    last = stamp();
    h.store
        .merge(vec![rec("server", "acme/2", 2, T0, 1)])
        .unwrap();
    assert_ne!(stamp(), last);
    last = stamp();
    let mut tomb = draft("server", "acme/1", b"", T0 + 2 * HOUR);
    tomb.deleted = true;
    h.store.originate(vec![tomb], &s).await.unwrap();
    assert_ne!(stamp(), last);
    last = stamp();
    // A stale copy changes nothing, so the stamp stays.
    h.store
        .merge(vec![rec("server", "acme/2", 1, T0 - 10, 1)])
        .unwrap();
    // (Only slots of written keys move; a refused record writes nothing
    // but its origin's watermark, which is not a record.)
    assert_eq!(stamp(), last);
    h.advance(3 * HOUR);
    assert!(h.store.sweep_expired(100).unwrap() > 0);
    assert_ne!(stamp(), last);
    // A key with no `/` is its own group.
    let before = h.store.change_stamp("profile", "node-1");
    h.store
        .originate(vec![draft("profile", "node-1", b"p", T0 + 4 * HOUR)], &s)
        .await
        .unwrap();
    assert_ne!(h.store.change_stamp("profile", "node-1"), before);
}

async fn cached_point_reads_follow_every_write(h: Harness) {
    let read = || h.store.get("server", "acme/1").unwrap();
    let a = rec("server", "acme/1", 1, T0, 1);
    h.store.merge(vec![a.clone()]).unwrap();
    assert_eq!(read(), Some(a.clone()));
    assert_eq!(read(), Some(a)); // served again, from the cache
    // A newer version from another origin replaces it.
    let b = rec("server", "acme/1", 2, T0 + 10, 1);
    h.store.merge(vec![b.clone()]).unwrap();
    assert_eq!(read(), Some(b.clone()));
    // A write to another key of the group, then a tombstone.
    h.store
        .merge(vec![rec("server", "acme/2", 2, T0 + 11, 2)])
        .unwrap();
    assert_eq!(read(), Some(b.clone()));
    let mut tomb = rec("server", "acme/1", 2, T0 + 20, 3);
    tomb.deleted = true;
    tomb.body.clear();
    tomb.expires_ms = b.expires_ms + HOUR;
    h.store.merge(vec![tomb.clone()]).unwrap();
    assert_eq!(read(), None);
    assert_eq!(
        h.store.get_any("server", "acme/1").unwrap(),
        Some(tomb.clone())
    );
    // Expiry without a write, then the sweep.
    h.advance(tomb.expires_ms - T0);
    assert_eq!(h.store.get_any("server", "acme/1").unwrap(), None);
    assert!(h.store.sweep_expired(100).unwrap() > 0);
    assert_eq!(h.store.get_any("server", "acme/1").unwrap(), None);
    // After a reopen the cache starts empty and reads come from the engine.
    let s = TestSigner(origin(1));
    let now = h.clock.now_ms();
    let mine = h
        .store
        .originate(vec![draft("server", "acme/3", b"x", now + HOUR)], &s)
        .await
        .unwrap();
    assert_eq!(
        h.store.get("server", "acme/3").unwrap().as_ref(),
        mine.first()
    );
    let h = h.reopen();
    assert_eq!(
        h.store.get("server", "acme/3").unwrap().as_ref(),
        mine.first()
    );
}
