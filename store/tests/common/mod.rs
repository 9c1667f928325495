//! Shared helpers of the store's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use hubmesh_store::{Clock, Draft, OriginId, Record, Signer, Store, StoreConfig, Version};

pub const T0: u64 = 1_800_000_000_000;
pub const HOUR: u64 = 3_600_000;

/// A signer whose "signature" is a fixed tag: the store does not verify.
pub struct TestSigner(pub OriginId);

impl Signer for TestSigner {
    fn origin(&self) -> OriginId {
        self.0.clone()
    }
    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        vec![msg.len() as u8; 64]
    }
}

pub fn origin(n: u8) -> OriginId {
    OriginId::new(vec![n; 38])
}

pub fn draft(ns: &str, key: &str, body: &[u8], expires_ms: u64) -> Draft {
    Draft {
        ns: ns.into(),
        key: key.into(),
        body: body.to_vec(),
        expires_ms,
        deleted: false,
        terms: vec![],
    }
}

pub fn rec(ns: &str, key: &str, origin_n: u8, wall: u64, seq: u64) -> Record {
    Record {
        ns: ns.into(),
        key: key.into(),
        body: format!("{key}@{wall}").into_bytes(),
        origin: origin(origin_n),
        version: Version {
            wall_ms: wall,
            counter: 0,
        },
        seq,
        expires_ms: T0 + 24 * HOUR,
        deleted: false,
        terms: vec![],
        sig: vec![0; 64],
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sled,
    Memory,
}

/// A store on one backend with a manual clock; `reopen` restarts an on-disk store.
pub struct Harness {
    pub store: Store,
    pub clock: Clock,
    pub backend: Backend,
    dir: Option<tempfile::TempDir>,
}

impl Harness {
    pub fn new(backend: Backend) -> Harness {
        let clock = Clock::manual(T0);
        let dir = match backend {
            Backend::Sled => Some(tempfile::tempdir().unwrap()),
            Backend::Memory => None,
        };
        let store = Store::open_with(StoreConfig {
            path: dir.as_ref().map(|d| d.path().to_path_buf()),
            clock: clock.clone(),
            cache_bytes: 64 << 20,
            ..StoreConfig::default()
        })
        .unwrap();
        Harness {
            store,
            clock,
            backend,
            dir,
        }
    }

    /// Closes and reopens an on-disk store; the memory store is kept as is.
    pub fn reopen(self) -> Harness {
        let Harness {
            store,
            clock,
            backend,
            dir,
        } = self;
        let store = match &dir {
            Some(d) => {
                drop(store);
                Store::open_with(StoreConfig {
                    path: Some(d.path().to_path_buf()),
                    clock: clock.clone(),
                    cache_bytes: 64 << 20,
                    ..StoreConfig::default()
                })
                .unwrap()
            }
            None => store,
        };
        Harness {
            store,
            clock,
            backend,
            dir,
        }
    }

    pub fn advance(&self, ms: u64) {
        self.clock.advance(Duration::from_millis(ms));
    }
}
