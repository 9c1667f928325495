//! Replication across hubs over real QUIC on loopback: gossip fan-out,
//! catch-up of a restarted hub by anti-entropy, partition and heal, and DHT
//! lookups of records a hub never received by gossip.
#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use hubmesh_mesh::{HubSigner, MeshEvent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hubs_hold_every_write_whatever_the_delivery_order() {
    init_tracing();
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let first = start_hub(dirs[0].path(), vec![]).await;
    let mut hubs = vec![first];
    for d in &dirs[1..] {
        let boot = vec![hubs[0].addr.clone()];
        hubs.push(start_hub(d.path(), boot).await);
    }
    let refs: Vec<&Hub> = hubs.iter().collect();
    wait_connected(&refs, 1).await;

    // One write at one hub reaches all.
    hubs[3]
        .mesh
        .write(vec![draft("acme/1", b"one")])
        .await
        .unwrap();
    for h in &hubs {
        let store = h.store.clone();
        eventually(Duration::from_secs(10), "acme/1 everywhere", || {
            let store = store.clone();
            async move { store.get("server", "acme/1").unwrap().is_some() }
        })
        .await;
    }

    // Concurrent writes from every hub, two of them to the same key: every
    // hub ends with the same winner whatever order the copies arrived in.
    let mut tasks = Vec::new();
    for (i, h) in hubs.iter().enumerate() {
        let mesh = h.mesh.clone();
        tasks.push(tokio::spawn(async move {
            let mut drafts: Vec<_> = (0..20)
                .map(|n| draft(&format!("hub{i}/{n}"), format!("{i}-{n}").as_bytes()))
                .collect();
            drafts.push(draft("contended", format!("from {i}").as_bytes()));
            mesh.write(drafts).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut keys: Vec<String> = (0..5)
        .flat_map(|i| (0..20).map(move |n| format!("hub{i}/{n}")))
        .collect();
    keys.push("contended".into());
    keys.push("acme/1".into());
    for h in &hubs {
        let store = h.store.clone();
        let keys = keys.clone();
        eventually(Duration::from_secs(15), "all writes everywhere", || {
            let store = store.clone();
            let keys = keys.clone();
            async move {
                keys.iter()
                    .all(|k| store.get("server", k).unwrap().is_some())
            }
        })
        .await;
    }
    // The contended key converges too (later copies may still be in flight).
    let reference = hubs[0].store.clone();
    for h in &hubs[1..] {
        let store = h.store.clone();
        let reference = reference.clone();
        eventually(Duration::from_secs(10), "same winner", || {
            let (a, b) = (store.clone(), reference.clone());
            async move { a.get("server", "contended").unwrap() == b.get("server", "contended").unwrap() }
        })
        .await;
    }
    for h in &hubs {
        for k in &keys {
            assert_eq!(
                h.store.get("server", k).unwrap(),
                reference.get("server", k).unwrap(),
                "{k} differs"
            );
        }
    }
    for h in &hubs {
        h.mesh.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_hub_catches_up_by_sync_and_redials_without_bootstrap() {
    init_tracing();
    let (da, db, dc) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let a = start_hub_with(da.path(), true, vec![], |_| {}).await;
    let b = start_hub_with(db.path(), true, vec![a.addr.clone()], |_| {}).await;
    let c = start_hub_with(dc.path(), true, vec![a.addr.clone()], |_| {}).await;
    wait_connected(&[&a, &b, &c], 1).await;
    a.mesh.write(vec![draft("before", b"0")]).await.unwrap();
    {
        let cs = c.store.clone();
        eventually(Duration::from_secs(10), "c has the first write", || {
            let cs = cs.clone();
            async move { cs.get("server", "before").unwrap().is_some() }
        })
        .await;
    }
    // The peer book is saved within a maintenance tick.
    let book = dc.path().join("mesh/peers.cbor");
    eventually(Duration::from_secs(5), "peer book written", || {
        let book = book.clone();
        async move { book.exists() }
    })
    .await;

    // Stop C; write at A and B meanwhile.
    let c_id = c.id();
    c.mesh.shutdown().await;
    drop(c); // the last handle on C's store: sled releases its lock
    let a_writes: Vec<_> = (0..30).map(|n| draft(&format!("a/{n}"), b"a")).collect();
    let b_writes: Vec<_> = (0..30).map(|n| draft(&format!("b/{n}"), b"b")).collect();
    a.mesh.write(a_writes).await.unwrap();
    // B's writes are stored but never published: only anti-entropy can carry
    // them (A's may still reach C by gossipsub's recent-message gossip).
    b.store
        .originate(b_writes, &HubSigner(b.mesh.keypair().clone()))
        .await
        .unwrap();

    // Restart C on the same data dir, with no bootstrap list: it redials the
    // peers it met and pulls what it missed by anti-entropy.
    let mut c = start_hub_with(dc.path(), true, vec![], |_| {}).await;
    assert_eq!(c.id(), c_id, "identity persisted");
    let cs = c.store.clone();
    eventually(Duration::from_secs(20), "c caught up", || {
        let cs = cs.clone();
        async move {
            (0..30).all(|n| {
                cs.get("server", &format!("a/{n}")).unwrap().is_some()
                    && cs.get("server", &format!("b/{n}")).unwrap().is_some()
            })
        }
    })
    .await;
    // The records were merged page by page; the rounds then finish.
    let mut pulled = 0;
    tokio::time::timeout(Duration::from_secs(10), async {
        while pulled < 30 {
            if let Some(MeshEvent::SyncFinished { pulled: n, .. }) = c.events.recv().await {
                pulled += n;
            }
        }
    })
    .await
    .expect("sync rounds pulled the missed records");
    let a_origin = hubmesh_store::OriginId::new(a.id().to_bytes());
    let cs = c.store.clone();
    eventually(
        Duration::from_secs(5),
        "watermark advanced past the pull",
        || {
            let (cs, o) = (cs.clone(), a_origin.clone());
            async move { cs.watermark(&o).unwrap() == 31 }
        },
    )
    .await;
    for h in [&a, &b, &c] {
        h.mesh.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_then_heal_converges_to_identical_sets() {
    init_tracing();
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let h0 = start_hub(dirs[0].path(), vec![]).await;
    let mut hubs = vec![h0];
    for d in &dirs[1..] {
        let boot = vec![hubs[0].addr.clone()];
        hubs.push(start_hub(d.path(), boot).await);
    }
    // Everyone meets everyone (Kademlia discovery from the bootstrap hub).
    let refs: Vec<&Hub> = hubs.iter().collect();
    wait_connected(&refs, 3).await;

    let left: BTreeSet<_> = [hubs[0].id(), hubs[1].id()].into();
    let right: BTreeSet<_> = [hubs[2].id(), hubs[3].id()].into();
    for (i, h) in hubs.iter().enumerate() {
        let other = if i < 2 { right.clone() } else { left.clone() };
        h.mesh.set_blocked(other).await.unwrap();
    }
    for h in &hubs {
        let mesh = h.mesh.clone();
        eventually(Duration::from_secs(10), "partitioned", || {
            let mesh = mesh.clone();
            async move { mesh.peers().await.unwrap().len() == 1 }
        })
        .await;
    }
    hubs[0]
        .mesh
        .write((0..10).map(|n| draft(&format!("left/{n}"), b"l")).collect())
        .await
        .unwrap();
    hubs[3]
        .mesh
        .write(
            (0..10)
                .map(|n| draft(&format!("right/{n}"), b"r"))
                .collect(),
        )
        .await
        .unwrap();
    hubs[1]
        .mesh
        .write(vec![draft("both", b"left")])
        .await
        .unwrap();
    hubs[2]
        .mesh
        .write(vec![draft("both", b"right")])
        .await
        .unwrap();
    // Each side converges internally and not across.
    let s1 = hubs[1].store.clone();
    eventually(Duration::from_secs(10), "left side has left writes", || {
        let s1 = s1.clone();
        async move { s1.get("server", "left/9").unwrap().is_some() }
    })
    .await;
    assert!(hubs[1].store.get("server", "right/0").unwrap().is_none());

    for h in &hubs {
        h.mesh.set_blocked(BTreeSet::new()).await.unwrap();
    }
    let mut keys: Vec<String> = (0..10)
        .flat_map(|n| [format!("left/{n}"), format!("right/{n}")])
        .collect();
    keys.push("both".into());
    let reference = hubs[0].store.clone();
    for h in &hubs {
        let store = h.store.clone();
        let keys = keys.clone();
        let reference = reference.clone();
        eventually(Duration::from_secs(20), "identical after heal", || {
            let (store, reference, keys) = (store.clone(), reference.clone(), keys.clone());
            async move {
                keys.iter().all(|k| {
                    let mine = store.get_any("server", k).unwrap();
                    mine.is_some() && mine == reference.get_any("server", k).unwrap()
                })
            }
        })
        .await;
    }
    // Identical per-origin contents everywhere.
    let origins: Vec<_> = hubs
        .iter()
        .map(|h| hubmesh_store::OriginId::new(h.id().to_bytes()))
        .collect();
    for o in &origins {
        let want = reference.records_since(o, 0, 1000).unwrap().records;
        for h in &hubs {
            assert_eq!(h.store.records_since(o, 0, 1000).unwrap().records, want);
        }
    }
    for h in &hubs {
        h.mesh.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_lookup_finds_a_record_never_gossiped_here() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let slow = |c: &mut hubmesh_mesh::MeshConfig| c.sync_interval = Duration::from_secs(3600);
    let c = start_hub_with(dirs[2].path(), false, vec![], slow).await;
    let a = start_hub_with(dirs[0].path(), false, vec![c.addr.clone()], slow).await;
    let mut b = start_hub_with(dirs[1].path(), false, vec![c.addr.clone()], slow).await;
    // A and B never talk: B only learns A's record from the DHT.
    a.mesh.set_blocked([b.id()].into()).await.unwrap();
    b.mesh.set_blocked([a.id()].into()).await.unwrap();
    wait_connected(&[&a, &b], 1).await;
    wait_connected(&[&c], 2).await;
    // B's sync round on connecting to C must be over before the put reaches
    // C, or B may pull the record from C by anti-entropy instead of the DHT.
    let c_id = c.id();
    wait_event(
        &mut b.events,
        Duration::from_secs(10),
        |e| matches!(e, MeshEvent::SyncFinished { peer, .. } if *peer == c_id),
    )
    .await;

    // Originate at A without gossip: stored, then put into the DHT only.
    let rec = a
        .store
        .originate(
            vec![draft("node/42", b"dht")],
            &HubSigner(a.mesh.keypair().clone()),
        )
        .await
        .unwrap();
    a.mesh.publish_via(rec.clone(), false, true).await.unwrap();
    let cs = c.store.clone();
    eventually(Duration::from_secs(10), "C holds the DHT put", || {
        let cs = cs.clone();
        async move { cs.get("server", "node/42").unwrap().is_some() }
    })
    .await;
    assert!(b.store.get("server", "node/42").unwrap().is_none());
    let found = tokio::time::timeout(Duration::from_secs(15), b.mesh.lookup("server", "node/42"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.as_ref(), Some(&rec[0]));
    assert_eq!(
        b.store.get("server", "node/42").unwrap().as_ref(),
        Some(&rec[0]),
        "cached"
    );
    // A miss everywhere is None, not an error.
    let none = tokio::time::timeout(Duration::from_secs(15), b.mesh.lookup("server", "missing"))
        .await
        .unwrap()
        .unwrap();
    assert!(none.is_none());
    for h in [&a, &b, &c] {
        h.mesh.shutdown().await;
    }
}

/// A DHT put reaches the replication factor's worth of hubs both when the
/// routing table is small (the origin puts to every hub it knows, no query)
/// and when it is larger (a closest-peers query picks the holders).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_put_reaches_replicas_in_small_and_large_federations() {
    init_tracing();
    const REPLICATION: usize = 4; // specs/mesh.md: replication factor 4
    for total in [3usize, 7] {
        let dirs: Vec<_> = (0..total).map(|_| tempfile::tempdir().unwrap()).collect();
        let quiet = |c: &mut hubmesh_mesh::MeshConfig| c.sync_interval = Duration::from_secs(3600);
        let mut hubs = vec![start_hub_with(dirs[0].path(), false, vec![], quiet).await];
        for d in &dirs[1..] {
            let boot = vec![hubs[0].addr.clone()];
            hubs.push(start_hub_with(d.path(), false, boot, quiet).await);
        }
        wait_connected(&[&hubs[0]], total - 1).await;
        let origin = &hubs[0];
        let key = format!("dht-only/{total}");
        let rec = origin
            .store
            .originate(
                vec![draft(&key, b"dht")],
                &HubSigner(origin.mesh.keypair().clone()),
            )
            .await
            .unwrap();
        origin.mesh.publish_via(rec, false, true).await.unwrap();
        let want = REPLICATION.min(total - 1);
        let stores: Vec<_> = hubs[1..].iter().map(|h| h.store.clone()).collect();
        eventually(
            Duration::from_secs(10),
            &format!("{want} replicas of the DHT put among {total} hubs"),
            || {
                let (stores, key) = (stores.clone(), key.clone());
                async move {
                    stores
                        .iter()
                        .filter(|s| s.get("server", &key).unwrap().is_some())
                        .count()
                        >= want
                }
            },
        )
        .await;
        for h in &hubs {
            h.mesh.shutdown().await;
        }
    }
}
