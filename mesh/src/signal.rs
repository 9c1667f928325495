//! Signal relay: opaque payloads from this hub to a named hub, over one
//! long-lived QUIC stream per (sender, target) pair (`libp2p-stream`), each
//! payload one frame of a 4-byte big-endian length followed by the bytes
//! (at most [`MAX_SIGNAL_BYTES`]). One stream per pair keeps per-pair order
//! (QUIC streams are ordered) and avoids a stream setup per message.
//!
//! Sending holds the pair's stream lock while writing, so concurrent senders to
//! one target are serialised in call order. Receiving runs one reader task per
//! inbound stream outside the swarm's event loop; a reader waits for room in
//! the event channel (signals are never dropped), which backpressures the
//! sender through QUIC flow control. A malformed frame (length over the limit)
//! closes the stream.
//!
//! An owner that can take a signal without waiting installs a
//! [`SignalHandler`] (`Mesh::set_signal_handler`): the reader then hands each
//! frame to it directly, borrowed from the read buffer, instead of copying it
//! into a [`crate::MeshEvent::Signal`] for another task to pick up. That saves
//! a copy and a task wake-up per relayed signal, which is most of what a
//! cross-hub signal costs beyond the QUIC hop itself. Frames read before the
//! handler is installed still arrive as events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::task::JoinSet;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

use crate::error::SignalError;
use crate::events::EventSink;
pub use crate::protocol::MAX_SIGNAL_BYTES;

/// How long opening a stream (dialling the target if needed) may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// DHT lookups for a hub whose address is unknown before it is unreachable.
const DHT_ROUNDS: u32 = 3;
/// Pause between those lookups.
const DHT_RETRY: Duration = Duration::from_millis(250);
/// How long one frame may wait for the receiver's flow-control window.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Most inbound signal streams read at once (over all peers).
const MAX_INBOUND_STREAMS: usize = 1024;
/// Most outbound pair entries kept; idle ones are forgotten beyond this.
const MAX_OUTBOUND_ENTRIES: usize = 1024;

type Writer = FramedWrite<Compat<Stream>, LengthDelimitedCodec>;

/// Takes one inbound signal (sending hub, payload) on the reader's task. It
/// must not block or wait: it runs between two reads of the stream.
pub(crate) type SignalHandler = Arc<dyn Fn(PeerId, &[u8]) + Send + Sync>;

/// Where inbound signals go: the installed handler, else the event channel.
#[derive(Clone)]
pub(crate) struct SignalSink {
    events: EventSink,
    handler: Arc<OnceLock<SignalHandler>>,
}

impl SignalSink {
    pub(crate) fn new(events: EventSink) -> Self {
        SignalSink {
            events,
            handler: Arc::new(OnceLock::new()),
        }
    }

    /// Installs the handler; `false` if one was installed already.
    pub(crate) fn set_handler(&self, handler: SignalHandler) -> bool {
        self.handler.set(handler).is_ok()
    }

    /// Delivers one signal. `Err` when the event receiver is gone.
    async fn deliver(&self, from: PeerId, payload: &[u8]) -> Result<(), ()> {
        match self.handler.get() {
            Some(h) => {
                h(from, payload);
                Ok(())
            }
            None => self.events.emit_signal(from, payload.to_vec()).await,
        }
    }
}

/// The frame codec of the signal protocol: u32 big-endian length prefix.
pub(crate) fn frame_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(MAX_SIGNAL_BYTES)
        .new_codec()
}

/// The sending side, shared by every clone of the [`crate::Mesh`] handle.
pub(crate) struct SignalRelay {
    local: PeerId,
    control: libp2p_stream::Control,
    protocol: StreamProtocol,
    sink: SignalSink,
    commands: tokio::sync::mpsc::Sender<crate::event_loop::Command>,
    outbound: Mutex<HashMap<PeerId, Arc<tokio::sync::Mutex<Option<Writer>>>>>,
}

impl std::fmt::Debug for SignalRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalRelay")
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

impl SignalRelay {
    pub(crate) fn new(
        local: PeerId,
        control: libp2p_stream::Control,
        protocol: StreamProtocol,
        sink: SignalSink,
        commands: tokio::sync::mpsc::Sender<crate::event_loop::Command>,
    ) -> Self {
        SignalRelay {
            local,
            control,
            protocol,
            sink,
            commands,
            outbound: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, target: PeerId) -> Result<Arc<tokio::sync::Mutex<Option<Writer>>>, SignalError> {
        let mut map = self.outbound.lock().map_err(|_| SignalError::Closed)?;
        if map.len() >= MAX_OUTBOUND_ENTRIES && !map.contains_key(&target) {
            map.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        Ok(map.entry(target).or_default().clone())
    }

    /// Installs the inbound signal handler (module docs); `false` if one was
    /// installed already.
    pub(crate) fn set_handler(&self, handler: SignalHandler) -> bool {
        self.sink.set_handler(handler)
    }

    /// Forgets the stream to `target` (after a disconnect).
    pub(crate) fn forget(&self, target: &PeerId) {
        if let Ok(mut map) = self.outbound.lock() {
            map.remove(target);
        }
    }

    /// Opens a stream to `target`, dialling it if needed; when no address of
    /// it is known, asks the DHT for one first.
    async fn open(&self, target: PeerId) -> Result<Stream, SignalError> {
        let unreachable = || SignalError::Unreachable(target.to_string());
        let deadline = tokio::time::Instant::now() + OPEN_TIMEOUT;
        let mut dht_rounds = 0;
        loop {
            let mut control = self.control.clone();
            let opened = tokio::time::timeout_at(
                deadline,
                control.open_stream(target, self.protocol.clone()),
            )
            .await
            .map_err(|_| unreachable())?;
            let error = match opened {
                Ok(stream) => return Ok(stream),
                Err(e) => e,
            };
            tracing::debug!(%target, %error, "cannot open a signal stream");
            if dht_rounds == DHT_ROUNDS {
                return Err(unreachable());
            }
            if dht_rounds > 0 {
                // The hub may have joined a moment ago: give the DHT time to learn it.
                tokio::time::sleep(DHT_RETRY).await;
            }
            dht_rounds += 1;
            let (tx, rx) = tokio::sync::oneshot::channel();
            let command = crate::event_loop::Command::FindPeer {
                peer: target,
                reply: tx,
            };
            self.commands
                .send(command)
                .await
                .map_err(|_| SignalError::Closed)?;
            let found = tokio::time::timeout_at(deadline, rx)
                .await
                .map_err(|_| unreachable())?
                .map_err(|_| SignalError::Closed)?;
            if !found {
                tracing::debug!(%target, "the DHT does not know the hub (yet)");
            }
        }
    }

    /// Sends one payload to `target`; see the module docs for the guarantees.
    pub(crate) async fn send(&self, target: PeerId, payload: Vec<u8>) -> Result<(), SignalError> {
        if payload.len() > MAX_SIGNAL_BYTES {
            return Err(SignalError::TooLarge {
                size: payload.len(),
                max: MAX_SIGNAL_BYTES,
            });
        }
        if target == self.local {
            return self
                .sink
                .deliver(self.local, &payload)
                .await
                .map_err(|_| SignalError::Closed);
        }
        let slot = self.slot(target)?;
        let mut guard = slot.lock().await;
        let payload = Bytes::from(payload);
        // A cached stream may have died with its connection, and a fresh one
        // may have been opened on a connection that is being closed as the
        // duplicate of a simultaneous dial: a write failure is retried on a
        // fresh stream, twice at most.
        let mut fresh_opens = 0;
        loop {
            let fresh = guard.is_none();
            if fresh {
                let stream = self.open(target).await?;
                fresh_opens += 1;
                *guard = Some(FramedWrite::new(stream.compat(), frame_codec()));
            }
            let writer = guard.as_mut().ok_or(SignalError::Closed)?;
            match tokio::time::timeout(SEND_TIMEOUT, writer.send(payload.clone())).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => {
                    tracing::debug!(%target, error = %e, "signal stream broke");
                    *guard = None;
                    if fresh_opens >= 2 {
                        return Err(SignalError::Unreachable(target.to_string()));
                    }
                }
                Err(_) => {
                    *guard = None;
                    return Err(SignalError::Unreachable(target.to_string()));
                }
            }
        }
    }
}

/// Accepts inbound signal streams until `cancel` fires, reading each in its
/// own task; every reader ends with this task.
pub(crate) async fn run_inbound(
    mut incoming: libp2p_stream::IncomingStreams,
    sink: SignalSink,
    cancel: CancellationToken,
) {
    let mut readers = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
            next = incoming.next() => {
                let Some((peer, stream)) = next else { break };
                if readers.len() >= MAX_INBOUND_STREAMS {
                    tracing::warn!(%peer, "too many inbound signal streams; refusing one");
                    drop(stream);
                    continue;
                }
                readers.spawn(read_stream(peer, stream, sink.clone()));
            }
        }
    }
    readers.shutdown().await;
}

async fn read_stream(peer: PeerId, stream: Stream, sink: SignalSink) {
    let mut frames = FramedRead::new(stream.compat(), frame_codec());
    while let Some(frame) = frames.next().await {
        match frame {
            Ok(bytes) => {
                if sink.deliver(peer, &bytes).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "malformed signal frame; closing the stream");
                return;
            }
        }
    }
}
