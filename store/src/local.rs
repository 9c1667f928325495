//! Local-only data that never replicates: typed trees for accounts and
//! sessions, and sealed trees for secrets (encrypted at rest).

use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::{Serialize, de::DeserializeOwned};

use crate::codec;
use crate::commit::DurableTicket;
use crate::error::{Result, StoreError};
use crate::kv::{Batch, Tree};
use crate::registry::Store;

/// Largest value a local tree accepts.
pub const MAX_LOCAL_VALUE_BYTES: usize = 256 * 1024;
/// Longest key in a local tree.
pub const MAX_LOCAL_KEY_BYTES: usize = 512;

/// A typed key→value tree local to this hub.
pub struct LocalTree<T> {
    name: String,
    tree: Tree,
    store: Store,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for LocalTree<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTree")
            .field("name", &self.name)
            .finish()
    }
}

impl<T> Clone for LocalTree<T> {
    fn clone(&self) -> Self {
        LocalTree {
            name: self.name.clone(),
            tree: self.tree.clone(),
            store: self.store.clone(),
            _t: PhantomData,
        }
    }
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_LOCAL_KEY_BYTES {
        return Err(StoreError::TooLarge {
            what: "local key",
            size: key.len(),
            max: MAX_LOCAL_KEY_BYTES,
        });
    }
    Ok(())
}

fn check_value(bytes: &[u8]) -> Result<()> {
    if bytes.len() > MAX_LOCAL_VALUE_BYTES {
        return Err(StoreError::TooLarge {
            what: "local value",
            size: bytes.len(),
            max: MAX_LOCAL_VALUE_BYTES,
        });
    }
    Ok(())
}

impl<T: Serialize + DeserializeOwned> LocalTree<T> {
    pub(crate) fn new(name: &str, tree: Tree, store: Store) -> Self {
        LocalTree {
            name: name.to_owned(),
            tree,
            store,
            _t: PhantomData,
        }
    }

    fn context(&self, key: &str) -> String {
        format!("local/{}/{key}", self.name)
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Result<Option<T>> {
        match self.tree.get(key.as_bytes())? {
            Some(v) => Ok(Some(codec::decode_value(&v, &self.context(key))?)),
            None => Ok(None),
        }
    }

    /// Sets `key`; wait on the ticket with [`Store::durable`] before acknowledging.
    pub fn put(&self, key: &str, value: &T) -> Result<DurableTicket> {
        check_key(key)?;
        let bytes = codec::encode_value(value)?;
        check_value(&bytes)?;
        let mut b = Batch::default();
        b.insert(key.as_bytes().to_vec(), bytes);
        self.tree.apply(b)?;
        Ok(self.store.note_local_write())
    }

    /// Sets `key` only if it is absent; `None` if it was present.
    pub fn insert_new(&self, key: &str, value: &T) -> Result<Option<DurableTicket>> {
        check_key(key)?;
        let bytes = codec::encode_value(value)?;
        check_value(&bytes)?;
        if self.tree.insert_if_absent(key.as_bytes(), bytes)? {
            Ok(Some(self.store.note_local_write()))
        } else {
            Ok(None)
        }
    }

    /// Removes `key`; whether it was present.
    pub fn remove(&self, key: &str) -> Result<(bool, DurableTicket)> {
        let was = self.tree.remove(key.as_bytes())?;
        Ok((was, self.store.note_local_write()))
    }

    /// Up to `limit` entries whose key starts with `prefix`, after key `after`.
    pub fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, T)>> {
        let from = match after {
            Some(a) => {
                let mut k = a.as_bytes().to_vec();
                k.push(0);
                k
            }
            None => prefix.as_bytes().to_vec(),
        };
        let mut out = Vec::new();
        for (k, v) in self.tree.prefix_from(prefix.as_bytes(), &from, limit)? {
            let key = String::from_utf8(k).map_err(|e| StoreError::Corrupt {
                context: format!("local/{} key", self.name),
                reason: e.to_string(),
            })?;
            let value = codec::decode_value(&v, &self.context(&key))?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// Number of entries.
    pub fn len(&self) -> Result<usize> {
        self.tree.len()
    }

    /// Whether the tree is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// The 32-byte key secrets are sealed under, kept in the data dir.
#[derive(Clone)]
pub(crate) struct SealKey(Arc<XChaCha20Poly1305>);

impl SealKey {
    pub(crate) fn random() -> SealKey {
        let mut k = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut k);
        SealKey(Arc::new(XChaCha20Poly1305::new(&k.into())))
    }

    /// Reads the key file, or creates it (mode 0600) on first open.
    pub(crate) fn load_or_create(path: &Path) -> Result<SealKey> {
        let bad = |reason: String| StoreError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let k: [u8; 32] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| bad(format!("expected 32 bytes, found {}", bytes.len())))?;
                Ok(SealKey(Arc::new(XChaCha20Poly1305::new(&k.into()))))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut k = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut k);
                write_private(path, &k)?;
                Ok(SealKey(Arc::new(XChaCha20Poly1305::new(&k.into()))))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Writes a file only the owner can read, durably, failing if it exists.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// A typed tree whose values are sealed at rest: XChaCha20-Poly1305 with a
/// random 24-byte nonce per write, and the tree name and key as associated
/// data, so a sealed value cannot be moved to another key undetected.
pub struct SealedTree<T> {
    inner: LocalTree<Vec<u8>>,
    key: SealKey,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for SealedTree<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedTree")
            .field("name", &self.inner.name)
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> SealedTree<T> {
    pub(crate) fn new(name: &str, tree: Tree, key: SealKey, store: Store) -> Self {
        SealedTree {
            inner: LocalTree::new(name, tree, store),
            key,
            _t: PhantomData,
        }
    }

    fn aad(&self, key: &str) -> Vec<u8> {
        format!("hubmesh/sealed/{}\0{key}", self.inner.name).into_bytes()
    }

    /// The value under `key`, unsealed.
    pub fn get(&self, key: &str) -> Result<Option<T>> {
        let Some(sealed) = self.inner.get(key)? else {
            return Ok(None);
        };
        if sealed.len() < 24 {
            return Err(StoreError::Unseal {
                tree: self.inner.name.clone(),
            });
        }
        let (nonce, ct) = sealed.split_at(24);
        let plain = self
            .key
            .0
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: &self.aad(key),
                },
            )
            .map_err(|_| StoreError::Unseal {
                tree: self.inner.name.clone(),
            })?;
        Ok(Some(codec::decode_value(&plain, &self.inner.context(key))?))
    }

    /// Seals and sets `key`.
    pub fn put(&self, key: &str, value: &T) -> Result<DurableTicket> {
        let plain = codec::encode_value(value)?;
        let mut nonce = [0u8; 24];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ct = self
            .key
            .0
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &self.aad(key),
                },
            )
            .map_err(|_| StoreError::Backend("sealing failed".into()))?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&ct);
        self.inner.put(key, &sealed)
    }

    /// Removes `key`.
    pub fn remove(&self, key: &str) -> Result<(bool, DurableTicket)> {
        self.inner.remove(key)
    }

    /// Test hook: the sealed bytes as stored.
    #[doc(hidden)]
    pub fn debug_raw(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.inner.get(key)
    }

    /// Test hook: overwrite the sealed bytes.
    #[doc(hidden)]
    pub fn debug_put_raw(&self, key: &str, raw: Vec<u8>) -> Result<DurableTicket> {
        self.inner.put(key, &raw)
    }
}
