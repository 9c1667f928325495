//! The peer book: hubs this hub has met (PeerId and listen addresses),
//! persisted in `peers.cbor` in the data dir so that a restarted hub re-dials
//! them without its bootstrap list, plus the in-memory redial backoff.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hubmesh_store::codec;
use libp2p::{Multiaddr, PeerId};
use serde_bytes::ByteBuf;

/// Most peers remembered; the least recently seen is forgotten first.
pub(crate) const MAX_PEERS: usize = 1024;
/// Most addresses remembered per peer.
pub(crate) const MAX_ADDRS: usize = 8;
/// Largest `peers.cbor` read back.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// First redial delay after a failure; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) addrs: Vec<Multiaddr>,
    last_seen_ms: u64,
    backoff: Duration,
    next_dial: Instant,
}

/// On-disk form: (peer id bytes, address bytes, last seen ms).
type FileEntry = (ByteBuf, Vec<ByteBuf>, u64);

/// See the module docs.
#[derive(Debug)]
pub(crate) struct PeerBook {
    path: PathBuf,
    peers: BTreeMap<PeerId, Entry>,
    dirty: bool,
}

impl PeerBook {
    /// Loads `path`; a missing file is an empty book, a corrupt one is logged and ignored.
    pub(crate) fn load(path: &Path) -> PeerBook {
        let mut book = PeerBook {
            path: path.to_path_buf(),
            peers: BTreeMap::new(),
            dirty: false,
        };
        match read_file(path) {
            Ok(Some(entries)) => {
                for (peer, addrs, seen) in entries.into_iter().take(MAX_PEERS) {
                    let Ok(peer) = PeerId::from_bytes(&peer) else {
                        continue;
                    };
                    let addrs: Vec<Multiaddr> = addrs
                        .into_iter()
                        .take(MAX_ADDRS)
                        .filter_map(|a| Multiaddr::try_from(a.into_vec()).ok())
                        .collect();
                    if !addrs.is_empty() {
                        book.peers.insert(peer, Entry::new(addrs, seen));
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable peer book")
            }
        }
        book
    }

    /// Records that `peer` was met with these listen addresses.
    pub(crate) fn note(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, now_ms: u64) {
        let mut addrs: Vec<Multiaddr> = addrs
            .into_iter()
            .filter(|a| {
                !a.iter()
                    .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit))
            })
            .map(strip_p2p)
            .collect();
        addrs.dedup();
        addrs.truncate(MAX_ADDRS);
        if addrs.is_empty() {
            return;
        }
        match self.peers.get_mut(&peer) {
            Some(e) => {
                if e.addrs != addrs {
                    e.addrs = addrs;
                    self.dirty = true;
                }
                // Only persist "last seen" changes occasionally (an hour's granularity).
                if now_ms.saturating_sub(e.last_seen_ms) > 3_600_000 {
                    self.dirty = true;
                }
                e.last_seen_ms = now_ms;
                e.backoff = MIN_BACKOFF;
            }
            None => {
                if self.peers.len() >= MAX_PEERS
                    && let Some(oldest) = self
                        .peers
                        .iter()
                        .min_by_key(|(_, e)| e.last_seen_ms)
                        .map(|(p, _)| *p)
                {
                    self.peers.remove(&oldest);
                }
                self.peers.insert(peer, Entry::new(addrs, now_ms));
                self.dirty = true;
            }
        }
    }

    /// The known addresses of `peer`.
    #[cfg(test)]
    pub(crate) fn addrs(&self, peer: &PeerId) -> Option<&[Multiaddr]> {
        self.peers.get(peer).map(|e| e.addrs.as_slice())
    }

    /// Peers due for a redial (not connected), pushing their next attempt back.
    pub(crate) fn due(
        &mut self,
        now: Instant,
        is_connected: impl Fn(&PeerId) -> bool,
    ) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let mut out = Vec::new();
        for (peer, e) in self.peers.iter_mut() {
            if is_connected(peer) || e.next_dial > now {
                continue;
            }
            out.push((*peer, e.addrs.clone()));
            e.next_dial = now + e.backoff;
            e.backoff = (e.backoff * 2).min(MAX_BACKOFF);
        }
        out
    }

    /// Makes every peer due now (after a heal or an unblock).
    pub(crate) fn reset_backoff(&mut self) {
        let now = Instant::now();
        for e in self.peers.values_mut() {
            e.backoff = MIN_BACKOFF;
            e.next_dial = now;
        }
    }

    /// Writes the book if it changed (temp file + rename, so a crash leaves
    /// either the old or the new book).
    pub(crate) fn save_if_dirty(&mut self) -> std::io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let entries: Vec<FileEntry> = self
            .peers
            .iter()
            .map(|(p, e)| {
                (
                    ByteBuf::from(p.to_bytes()),
                    e.addrs.iter().map(|a| ByteBuf::from(a.to_vec())).collect(),
                    e.last_seen_ms,
                )
            })
            .collect();
        let bytes = codec::encode_value(&entries).map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("cbor.tmp");
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, &self.path)?;
        self.dirty = false;
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.peers.len()
    }
}

impl Entry {
    fn new(addrs: Vec<Multiaddr>, last_seen_ms: u64) -> Entry {
        Entry {
            addrs,
            last_seen_ms,
            backoff: MIN_BACKOFF,
            next_dial: Instant::now(),
        }
    }
}

fn strip_p2p(mut a: Multiaddr) -> Multiaddr {
    if matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
        a.pop();
    }
    a
}

fn read_file(path: &Path) -> std::io::Result<Option<Vec<FileEntry>>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(std::io::Error::other("peer book too large"));
    }
    let bytes = std::fs::read(path)?;
    codec::decode_value(&bytes, "peer book")
        .map(Some)
        .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persists_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.cbor");
        let mut book = PeerBook::load(&path);
        let p = PeerId::random();
        let a: Multiaddr = "/ip4/127.0.0.1/udp/4001/quic-v1".parse().unwrap();
        book.note(p, vec![a.clone()], 1);
        book.save_if_dirty().unwrap();
        let mut again = PeerBook::load(&path);
        assert_eq!(again.addrs(&p), Some(&[a][..]));
        assert_eq!(again.due(Instant::now(), |_| false).len(), 1);
        assert!(
            again.due(Instant::now(), |_| false).is_empty(),
            "backoff applies"
        );
        std::fs::write(&path, b"junk").unwrap();
        assert_eq!(PeerBook::load(&path).len(), 0);
    }
}
