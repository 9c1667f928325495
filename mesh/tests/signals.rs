//! Signal relay across hubs: per-pair order under concurrent senders, size
//! limit, and an explicit error for an unreachable hub.
#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::*;
use hubmesh_mesh::{MAX_SIGNAL_BYTES, MeshEvent, PeerId, SignalError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_arrive_in_order_per_pair_and_unreachable_is_reported() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start_hub(dirs[0].path(), vec![]).await;
    let b = start_hub(dirs[1].path(), vec![a.addr.clone()]).await;
    let mut c = start_hub(dirs[2].path(), vec![a.addr.clone()]).await;
    wait_connected(&[&a, &b, &c], 1).await;

    // A and B each send 300 numbered signals to C at the same time; B may not
    // even be connected to C yet (the relay dials it by its DHT address).
    const N: u32 = 300;
    let mut senders = Vec::new();
    for hub in [&a, &b] {
        let mesh = hub.mesh.clone();
        let target = c.id();
        senders.push(tokio::spawn(async move {
            for i in 0..N {
                mesh.send_signal(target, i.to_be_bytes().to_vec())
                    .await
                    .unwrap();
            }
        }));
    }
    let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
    tokio::time::timeout(Duration::from_secs(20), async {
        while from_a.len() < N as usize || from_b.len() < N as usize {
            if let MeshEvent::Signal { from, payload } = c.events.recv().await.unwrap() {
                let n = u32::from_be_bytes(payload.try_into().unwrap());
                if from == a.id() {
                    from_a.push(n);
                } else if from == b.id() {
                    from_b.push(n);
                }
            }
        }
    })
    .await
    .expect("all signals delivered");
    let want: Vec<u32> = (0..N).collect();
    assert_eq!(from_a, want, "A→C in order");
    assert_eq!(from_b, want, "B→C in order");
    for s in senders {
        s.await.unwrap();
    }

    // Largest payload passes, one byte more is refused locally.
    a.mesh
        .send_signal(c.id(), vec![1; MAX_SIGNAL_BYTES])
        .await
        .unwrap();
    let ev = wait_event(&mut c.events, Duration::from_secs(5), |e| {
        matches!(e, MeshEvent::Signal { .. })
    })
    .await;
    assert!(matches!(ev, MeshEvent::Signal { payload, .. } if payload.len() == MAX_SIGNAL_BYTES));
    assert_eq!(
        a.mesh
            .send_signal(c.id(), vec![1; MAX_SIGNAL_BYTES + 1])
            .await,
        Err(SignalError::TooLarge {
            size: MAX_SIGNAL_BYTES + 1,
            max: MAX_SIGNAL_BYTES
        })
    );

    // An unknown hub is unreachable, promptly.
    let unknown = PeerId::random();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        a.mesh.send_signal(unknown, b"x".to_vec()),
    )
    .await
    .unwrap();
    assert!(matches!(r, Err(SignalError::Unreachable(_))), "{r:?}");

    // A hub that went away is unreachable too (after its connection closes).
    let c_id = c.id();
    c.mesh.shutdown().await;
    let am = a.mesh.clone();
    eventually(Duration::from_secs(10), "C gone", || {
        let am = am.clone();
        async move { !am.peers().await.unwrap().iter().any(|p| p.peer == c_id) }
    })
    .await;
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        a.mesh.send_signal(c_id, b"x".to_vec()),
    )
    .await
    .unwrap();
    assert!(matches!(r, Err(SignalError::Unreachable(_))), "{r:?}");
    a.mesh.shutdown().await;
    assert_eq!(
        a.mesh.send_signal(b.id(), b"x".to_vec()).await,
        Err(SignalError::Closed)
    );
    b.mesh.shutdown().await;
}
