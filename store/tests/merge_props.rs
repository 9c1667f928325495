//! Merge is a join: applying any permutation of the same records, with
//! repeats, in any batching, yields the same state (and the state a model of
//! last-writer-wins predicts).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;

use common::*;
use hubmesh_store::{Clock, Record, Store, StoreConfig, Version};
use proptest::prelude::*;

const KEYS: [&str; 4] = ["a", "b", "c", "d"];

fn arb_record() -> impl Strategy<Value = Record> {
    (
        0..KEYS.len(),
        1u8..4,
        0u64..6,
        0u32..3,
        1u64..50,
        any::<bool>(),
        prop::option::of(0u8..3),
        0u8..4,
    )
        .prop_map(|(k, o, wall, counter, seq, deleted, term, body)| Record {
            ns: "server".into(),
            key: KEYS[k].into(),
            body: vec![body],
            origin: origin(o),
            version: Version {
                wall_ms: T0 + wall,
                counter,
            },
            seq,
            expires_ms: T0 + HOUR,
            deleted,
            terms: term.map(|t| vec![format!("t{t}")]).unwrap_or_default(),
            sig: vec![0; 64],
        })
}

/// Everything observable about the registry: held records, term hits, origin streams.
type State = (Vec<Option<Record>>, Vec<Vec<String>>, Vec<Vec<u64>>);

fn state(s: &Store) -> State {
    let held = KEYS
        .iter()
        .map(|k| s.get_any("server", k).unwrap())
        .collect();
    let terms = (0..3)
        .map(|t| {
            let mut keys: Vec<String> = s
                .by_term("server", &format!("t{t}"), 100)
                .unwrap()
                .into_iter()
                .map(|r| r.key)
                .collect();
            keys.sort();
            keys
        })
        .collect();
    let streams = (1..4)
        .map(|o| {
            s.records_since(&origin(o), 0, 1000)
                .unwrap()
                .records
                .iter()
                .map(|r| r.seq)
                .collect()
        })
        .collect();
    (held, terms, streams)
}

fn model(records: &[Record]) -> Vec<Option<Record>> {
    let mut m: BTreeMap<String, Record> = BTreeMap::new();
    for r in records {
        match m.get(&r.key) {
            Some(h) if !r.outranks(h) => {}
            _ => {
                m.insert(r.key.clone(), r.clone());
            }
        }
    }
    KEYS.iter().map(|k| m.get(*k).cloned()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_order_any_repeats_any_batching_same_state(
        records in prop::collection::vec(arb_record(), 1..24),
        perm_seed in any::<u64>(),
        batch in 1usize..6,
    ) {
        // One store without the record cache, one with it, read between
        // batches so the cache holds every intermediate state.
        let one = Store::open_with(StoreConfig {
            clock: Clock::manual(T0),
            record_cache_bytes: 0,
            ..StoreConfig::default()
        })
        .unwrap();
        one.merge(records.clone()).unwrap();

        // A permutation with every record repeated, applied in small batches.
        let mut shuffled: Vec<Record> = records.iter().chain(records.iter()).cloned().collect();
        let mut rng = perm_seed;
        for i in (1..shuffled.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (rng >> 33) as usize % (i + 1));
        }
        let two = Harness::new(Backend::Memory);
        for chunk in shuffled.chunks(batch) {
            two.store.merge(chunk.to_vec()).unwrap();
            let _ = state(&two.store);
        }
        let s1 = state(&one);
        prop_assert_eq!(&s1, &state(&two.store));
        prop_assert_eq!(s1.0, model(&records));
    }
}

#[test]
fn sled_and_memory_agree_on_a_fixed_history() {
    let mut records = Vec::new();
    for i in 0..200u64 {
        let mut r = rec(
            "server",
            KEYS[(i % 4) as usize],
            (i % 3) as u8 + 1,
            T0 + (i * 7919) % 13,
            i + 1,
        );
        r.deleted = i % 5 == 0;
        records.push(r);
    }
    let mem = Harness::new(Backend::Memory);
    let disk = Harness::new(Backend::Sled);
    mem.store.merge(records.clone()).unwrap();
    for r in records.iter().rev() {
        disk.store.merge(vec![r.clone()]).unwrap();
    }
    assert_eq!(state(&mem.store), state(&disk.store));
}
