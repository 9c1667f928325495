//! What the mesh tells its owner ([`MeshEvent`]) and the bounded channel that
//! carries it, with its overflow policy: record, peer and sync events are
//! dropped when the consumer is behind (the store already holds the state)
//! and counted into a later [`MeshEvent::Lagged`]; signals are never dropped:
//! their reader waits for room, which backpressures the sending hub through
//! the QUIC stream's flow control.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hubmesh_store::Record;
use libp2p::PeerId;
use tokio::sync::mpsc;

/// Something the mesh observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshEvent {
    /// A remote record was validated and merged with outcome `Applied` (any path).
    RecordAccepted(Record),
    /// A signal payload from another hub, in the order that hub sent them.
    Signal {
        /// The sending hub.
        from: PeerId,
        /// The opaque payload.
        payload: Vec<u8>,
    },
    /// A first connection to a hub was established.
    PeerJoined(PeerId),
    /// The last connection to a hub was closed.
    PeerLeft(PeerId),
    /// An anti-entropy round with `peer` finished; `pulled` records were applied.
    SyncFinished {
        /// The peer synced with.
        peer: PeerId,
        /// Records applied from it.
        pulled: usize,
    },
    /// The consumer was too slow: this many record/peer/sync events were dropped.
    Lagged {
        /// How many.
        dropped: u64,
    },
}

/// The sending side of the event channel, shared by the event loop and the
/// signal readers.
#[derive(Clone, Debug)]
pub(crate) struct EventSink {
    tx: mpsc::Sender<MeshEvent>,
    dropped: Arc<AtomicU64>,
}

impl EventSink {
    pub(crate) fn new(capacity: usize) -> (EventSink, mpsc::Receiver<MeshEvent>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            EventSink {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            rx,
        )
    }

    fn report_lag(&self) -> bool {
        let n = self.dropped.swap(0, Ordering::AcqRel);
        if n == 0 {
            return true;
        }
        match self.tx.try_send(MeshEvent::Lagged { dropped: n }) {
            Ok(()) => true,
            Err(_) => {
                self.dropped.fetch_add(n, Ordering::AcqRel);
                false
            }
        }
    }

    /// Emits a droppable event without ever waiting.
    pub(crate) fn emit(&self, event: MeshEvent) {
        if !self.report_lag() {
            self.dropped.fetch_add(1, Ordering::AcqRel);
            return;
        }
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::AcqRel);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Emits a signal, waiting for room. `Err` when the receiver is gone.
    pub(crate) async fn emit_signal(&self, from: PeerId, payload: Vec<u8>) -> Result<(), ()> {
        self.report_lag();
        self.tx
            .send(MeshEvent::Signal { from, payload })
            .await
            .map_err(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_is_counted_then_reported() {
        let (sink, mut rx) = EventSink::new(2);
        let p = PeerId::random();
        for _ in 0..5 {
            sink.emit(MeshEvent::PeerJoined(p));
        }
        assert_eq!(rx.recv().await, Some(MeshEvent::PeerJoined(p)));
        assert_eq!(rx.recv().await, Some(MeshEvent::PeerJoined(p)));
        sink.emit(MeshEvent::PeerLeft(p));
        assert_eq!(rx.recv().await, Some(MeshEvent::Lagged { dropped: 3 }));
        assert_eq!(rx.recv().await, Some(MeshEvent::PeerLeft(p)));
        sink.emit_signal(p, vec![1]).await.unwrap();
        assert_eq!(
            rx.recv().await,
            Some(MeshEvent::Signal {
                from: p,
                payload: vec![1]
            })
        );
    }
}
