//! Hostile input: forged records on every inbound path (sync page, gossip,
//! DHT put), banning of a repeat offender, the allowlist refusing a stranger,
//! and malformed frames on the sync and signal protocols.
#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use futures::{AsyncReadExt, AsyncWriteExt};
use hubmesh_mesh::{HubSigner, Keypair, Membership, MeshEvent, SignalError};
use hubmesh_store::{OriginId, Record, Signer, Store, codec};
use libp2p::StreamProtocol;
use libp2p::swarm::SwarmEvent;

/// Signs as `origin` with a signature that cannot verify.
struct BadSigner(OriginId);
impl Signer for BadSigner {
    fn origin(&self) -> OriginId {
        self.0.clone()
    }
    fn sign(&self, _msg: &[u8]) -> Vec<u8> {
        vec![7; 64]
    }
}

/// Puts three forged records into `m`'s store, as a misbehaving hub would
/// hold them, and returns them: a bad signature, a tampered body under a
/// good signature, and a well-signed record of a non-member origin.
async fn forge(m: &Hub, stranger: &Keypair, prefix: &str) -> Vec<Record> {
    let origin = OriginId::new(m.id().to_bytes());
    let (mut bad, _) = m
        .store
        .originate_nowait(
            vec![draft(&format!("{prefix}/bad-sig"), b"x")],
            &BadSigner(origin),
        )
        .unwrap();
    let (mut good, _) = m
        .store
        .originate_nowait(
            vec![draft(&format!("{prefix}/tampered"), b"honest")],
            &HubSigner(m.mesh.keypair().clone()),
        )
        .unwrap();
    let mut tampered = good.remove(0);
    tampered.body = b"evil".to_vec();
    m.store
        .debug_put_raw(
            "server",
            &tampered.key,
            codec::encode_record(&tampered).unwrap(),
        )
        .unwrap();
    let other = Store::memory();
    let foreign = other
        .originate(
            vec![draft(&format!("{prefix}/stranger"), b"s")],
            &HubSigner(stranger.clone()),
        )
        .await
        .unwrap()
        .remove(0);
    m.store.merge(vec![foreign.clone()]).unwrap();
    vec![bad.remove(0), tampered, foreign]
}

fn holds_none(store: &Store, forged: &[Record]) -> bool {
    forged
        .iter()
        .all(|r| match store.get_any(&r.ns, &r.key).unwrap() {
            None => true,
            // The only acceptable copy would be an honest one (never the forgery).
            Some(held) => held != *r && hubmesh_mesh::verify_record(&held).is_ok(),
        })
}

async fn wait_held(store: &Store, key: &str) {
    let store = store.clone();
    let what = format!("{key} held");
    eventually(Duration::from_secs(10), &what, || {
        let store = store.clone();
        let key = key.to_owned();
        async move { store.get("server", &key).unwrap().is_some() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_are_rejected_on_every_path_and_offenders_banned() {
    init_tracing();
    let (dm, dv, ds) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let stranger_key = Keypair::generate_ed25519();
    let m = start_hub(dm.path(), vec![]).await;
    let m_signer = HubSigner(m.mesh.keypair().clone());

    // Path 1: sync pages. M holds forged records before V ever connects.
    m.mesh.write(vec![draft("sync/ok", b"ok")]).await.unwrap();
    let forged_sync = forge(&m, &stranger_key, "sync").await;
    let members: BTreeSet<_> = [m.id()].into();
    let mut v = start_hub_with(dv.path(), false, vec![m.addr.clone()], |c| {
        c.membership = Membership::Allowlist(members)
    })
    .await;
    wait_event(&mut v.events, Duration::from_secs(10), |e| {
        matches!(e, MeshEvent::SyncFinished { .. })
    })
    .await;
    assert!(
        v.store.get("server", "sync/ok").unwrap().is_some(),
        "sync path works"
    );
    assert!(
        holds_none(&v.store, &forged_sync),
        "forged sync records refused"
    );
    let m_origin = OriginId::new(m.id().to_bytes());
    assert!(
        v.store.watermark(&m_origin).unwrap() < m.store.watermark(&m_origin).unwrap(),
        "a tainted pull does not advance the watermark"
    );

    // Path 2: gossip.
    wait_gossip_flows(&m, &v).await;
    let forged_gossip = forge(&m, &stranger_key, "gossip").await;
    m.mesh
        .publish_via(forged_gossip.clone(), true, false)
        .await
        .unwrap();
    let ok = m
        .store
        .originate(vec![draft("gossip/after", b"ok")], &m_signer)
        .await
        .unwrap();
    m.mesh.publish_via(ok, true, false).await.unwrap();
    wait_held(&v.store, "gossip/after").await;
    assert!(
        holds_none(&v.store, &forged_gossip),
        "forged gossip refused"
    );

    // Path 3: DHT puts straight into V's record store.
    let forged_dht = forge(&m, &stranger_key, "dht").await;
    m.mesh
        .dht_put_to(forged_dht.clone(), vec![v.id()])
        .await
        .unwrap();
    let ok = m
        .store
        .originate(vec![draft("dht/ok", b"ok")], &m_signer)
        .await
        .unwrap();
    m.mesh.dht_put_to(ok, vec![v.id()]).await.unwrap();
    wait_held(&v.store, "dht/ok").await;
    assert!(holds_none(&v.store, &forged_dht), "forged DHT puts refused");

    // Repeated abuse: V disconnects and bans M.
    let (mm, key) = (&m, &stranger_key);
    offend_until_dropped(&mut v.events, m.id(), |i| async move {
        let forged = forge(mm, key, &format!("more{i}")).await;
        mm.mesh.publish_via(forged, true, false).await.unwrap();
    })
    .await;
    assert!(
        !v.mesh
            .peers()
            .await
            .unwrap()
            .iter()
            .any(|p| p.peer == m.id())
    );

    // The allowlist refuses a stranger both ways.
    let s = start_hub(ds.path(), vec![v.addr.clone()]).await;
    assert!(
        v.mesh.dial(s.addr.clone()).await.is_err(),
        "V refuses to dial a non-member"
    );
    let sm = s.mesh.clone();
    eventually(Duration::from_secs(10), "stranger not connected", || {
        let sm = sm.clone();
        async move { sm.peers().await.unwrap().is_empty() }
    })
    .await;
    assert!(matches!(
        s.mesh.send_signal(v.id(), b"hi".to_vec()).await,
        Err(SignalError::Unreachable(_))
    ));
    assert!(
        !v.mesh
            .peers()
            .await
            .unwrap()
            .iter()
            .any(|p| p.peer == s.id())
    );
    for ev in drain(&mut v.events) {
        assert_ne!(ev, MeshEvent::PeerJoined(s.id()), "stranger never joined");
    }
    for h in [&m, &v, &s] {
        h.mesh.shutdown().await;
    }
}

/// Returns once a record gossiped by `m` reaches `v` (subscriptions
/// exchanged): publishes a fresh record every 20 polls until one arrives.
async fn wait_gossip_flows(m: &Hub, v: &Hub) {
    let m_signer = HubSigner(m.mesh.keypair().clone());
    let mut n = 0;
    eventually(Duration::from_secs(10), "gossip flows", || {
        n += 1;
        let (mesh, store, signer) = (m.mesh.clone(), m.store.clone(), m_signer.clone());
        let vs = v.store.clone();
        async move {
            if vs.get("server", "gossip/ok-0").unwrap().is_some() {
                return true;
            }
            if n % 20 == 1 {
                let key = format!("gossip/ok-{}", n / 20);
                let r = store
                    .originate(vec![draft(&key, b"ok")], &signer)
                    .await
                    .unwrap();
                mesh.publish_via(r, true, false).await.unwrap();
            }
            false
        }
    })
    .await;
}

/// A gossip message is a batch of records: its valid records are merged
/// and its invalid ones refused; a message that is not a well-formed batch
/// (garbage, empty, too many records) counts against its sender until the
/// sender is dropped.
#[tokio::test]
async fn gossip_batches_keep_valid_records_and_malformed_messages_count_as_strikes() {
    init_tracing();
    let (dm, dv) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let m = start_hub(dm.path(), vec![]).await;
    let mut v = start_hub(dv.path(), vec![m.addr.clone()]).await;
    wait_gossip_flows(&m, &v).await;
    let m_signer = HubSigner(m.mesh.keypair().clone());

    // One publication is one message: two valid records around a forged one.
    let first = m
        .store
        .originate(vec![draft("mixed/first", b"ok")], &m_signer)
        .await
        .unwrap();
    let (forged, _) = m
        .store
        .originate_nowait(
            vec![draft("mixed/forged", b"x")],
            &BadSigner(OriginId::new(m.id().to_bytes())),
        )
        .unwrap();
    let last = m
        .store
        .originate(vec![draft("mixed/last", b"ok")], &m_signer)
        .await
        .unwrap();
    let batch: Vec<Record> = [first, forged.clone(), last].concat();
    m.mesh.publish_via(batch, true, false).await.unwrap();
    wait_held(&v.store, "mixed/first").await;
    wait_held(&v.store, "mixed/last").await;
    assert!(
        holds_none(&v.store, &forged),
        "the forged record is refused"
    );

    // Malformed messages, each distinct (gossip drops repeats by content).
    let bad_messages = |i: usize| -> Vec<u8> {
        match i % 3 {
            0 => format!("not a batch {i}").into_bytes(),
            1 => {
                let mut empty = codec::encode_value(&Vec::<serde_bytes::ByteBuf>::new()).unwrap();
                empty.extend_from_slice(format!("{i}").as_bytes()); // trailing junk
                empty
            }
            _ => {
                let many: Vec<serde_bytes::ByteBuf> = (0..257 + i)
                    .map(|_| serde_bytes::ByteBuf::from(vec![0u8]))
                    .collect();
                codec::encode_value(&many).unwrap()
            }
        }
    };
    let mesh = &m.mesh;
    let sent = offend_until_dropped(&mut v.events, m.id(), |i| async move {
        mesh.gossip_raw(bad_messages(i)).await.unwrap();
    })
    .await;
    // 10 strikes drop a peer and the forged record above was one: 9 more
    // messages do it (a few more may leave before the drop is seen).
    assert!(
        sent <= 12,
        "every malformed message is a strike ({sent} sent)"
    );
    for h in [&m, &v] {
        h.mesh.shutdown().await;
    }
}

/// Runs `offend(0)`, `offend(1)`, … until `offender` leaves the peers of the
/// hub whose events these are (within 10 s, else the test fails); returns how
/// many offences it took.
async fn offend_until_dropped<F, Fut>(
    events: &mut tokio::sync::mpsc::Receiver<MeshEvent>,
    offender: libp2p::PeerId,
    mut offend: F,
) -> usize
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut n = 0;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            offend(n).await;
            n += 1;
            let left = tokio::time::timeout(Duration::from_millis(300), async {
                loop {
                    if let Some(MeshEvent::PeerLeft(p)) = events.recv().await
                        && p == offender
                    {
                        return;
                    }
                }
            })
            .await;
            if left.is_ok() {
                break;
            }
        }
    })
    .await
    .expect("the offender is dropped");
    n
}

/// A bare libp2p swarm that speaks raw streams, to send malformed frames.
async fn raw_client(
    target: libp2p::Multiaddr,
) -> (libp2p_stream::Control, tokio::task::JoinHandle<()>) {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let control = swarm.behaviour().new_control();
    swarm.dial(target).unwrap();
    let task = tokio::spawn(async move {
        loop {
            if let SwarmEvent::ConnectionClosed { .. } =
                futures::StreamExt::select_next_some(&mut swarm).await
            {}
        }
    });
    (control, task)
}

/// Reads until the hub closes or resets the stream; panics if it does not.
async fn expect_closed(stream: &mut libp2p::Stream) {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the hub closed the stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_the_stream_without_harm() {
    init_tracing();
    let (dh, dp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut hub = start_hub(dh.path(), vec![]).await;
    let (mut control, task) = raw_client(hub.addr.clone()).await;
    let hub_id = hub.id();
    let signal = StreamProtocol::try_from_owned(format!("/hubmesh/{FED}/signal/1.0.0")).unwrap();
    let sync = StreamProtocol::try_from_owned(format!("/hubmesh/{FED}/sync/1.0.0")).unwrap();

    // Signal: a frame header claiming 4 GiB is refused before any allocation.
    let mut s = tokio::time::timeout(
        Duration::from_secs(5),
        control.open_stream(hub_id, signal.clone()),
    )
    .await
    .unwrap()
    .unwrap();
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
        .await
        .unwrap();
    s.flush().await.unwrap();
    expect_closed(&mut s).await;
    // Signal: one byte over the limit.
    let mut s = control.open_stream(hub_id, signal.clone()).await.unwrap();
    let over = (hubmesh_mesh::MAX_SIGNAL_BYTES as u32 + 1).to_be_bytes();
    s.write_all(&over).await.unwrap();
    s.flush().await.unwrap();
    expect_closed(&mut s).await;
    // A well-formed frame on a fresh stream is still delivered.
    let mut s = control.open_stream(hub_id, signal.clone()).await.unwrap();
    s.write_all(&[0, 0, 0, 2, b'o', b'k']).await.unwrap();
    s.flush().await.unwrap();
    let ev = wait_event(&mut hub.events, Duration::from_secs(5), |e| {
        matches!(e, MeshEvent::Signal { .. })
    })
    .await;
    assert!(matches!(ev, MeshEvent::Signal { payload, .. } if payload == b"ok"));

    // Sync: garbage, a wrong format byte, truncated CBOR and an oversized request.
    for junk in [
        b"not cbor at all".to_vec(),
        vec![9, 0x80],
        vec![1, 0xa1, 0x00, 0x9f],
        vec![1, 0x5a, 0xff, 0xff, 0xff, 0xff],
        vec![0u8; 300 * 1024],
    ] {
        let mut s = control.open_stream(hub_id, sync.clone()).await.unwrap();
        let _ = s.write_all(&junk).await;
        let _ = s.close().await;
        expect_closed(&mut s).await;
    }

    // The hub still serves honest peers.
    hub.mesh
        .write(vec![draft("still/alive", b"1")])
        .await
        .unwrap();
    let peer = start_hub(dp.path(), vec![hub.addr.clone()]).await;
    wait_held(&peer.store, "still/alive").await;
    task.abort();
    hub.mesh.shutdown().await;
    peer.mesh.shutdown().await;
}
