//! `WS /ws/signal?token=JWT` (compat §E): one session per node, bound to the
//! node identity of the token's account. A `{type:"signal", target_node_id,
//! payload}` frame reaches the target on whatever hub it is connected to
//! (locally through the target's outbound queue; across hubs over the mesh
//! signal relay, one ordered stream per hub pair), as `{type:"signal",
//! from_node_id, payload}`; every refusal is an error frame `{type:"error",
//! message, code}` (codes in `specs/federation.md`).
//!
//! Memory per socket is bounded: 4 KiB read buffer, no write buffering, a
//! maximum message and frame size, a bounded outbound queue (a reader that
//! lets it fill is disconnected: the relay never waits on one slow socket),
//! and a per-connection frame rate. Keep-alive pings close dead peers; the
//! hub's shutdown closes every socket with a close frame.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::get;
use governor::{DefaultDirectRateLimiter, Quota};
use hubmesh_mesh::{Mesh, PeerId, SignalError};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::IntoParams;

use super::nodes;
use super::{Limit, presence, profile};
use crate::auth::UserClaims;
use crate::facade::AppState;
use crate::now_ms;

/// Signaling settings (`[signal]` in the config file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalConfig {
    /// Presence record lifetime; rewritten every third of it.
    pub presence_ttl: Duration,
    /// Most WebSocket sessions on this hub.
    pub max_sessions: usize,
    /// Largest text frame a client may send (larger: `too_large` error frame).
    pub max_message_bytes: usize,
    /// Frames per second per connection (burst: twice that); 0 = unlimited.
    pub frames_per_second: u32,
    /// Outbound frames queued per socket before the reader is dropped.
    pub outbound_queue: usize,
    /// Keep-alive ping period.
    pub ping_interval: Duration,
    /// Without any frame from the client for this long, the socket is closed.
    pub ping_timeout: Duration,
    /// `POST /register-node-id` per minute per client IP.
    pub register_per_minute: u32,
    /// `PUT`/`DELETE /profile` per minute per client IP.
    pub profile_per_minute: u32,
}

impl Default for SignalConfig {
    fn default() -> Self {
        SignalConfig {
            presence_ttl: Duration::from_secs(30),
            max_sessions: 50_000,
            max_message_bytes: 16 * 1024,
            frames_per_second: 50,
            outbound_queue: 64,
            ping_interval: Duration::from_secs(20),
            ping_timeout: Duration::from_secs(60),
            register_per_minute: 10,
            profile_per_minute: 20,
        }
    }
}

/// The signaling settings as given: the `[signal]` table of the config file,
/// and the same settings as `hubmesh run` flags `--signal-*`, each also read
/// from its `HUBMESH_SIGNAL_*` variable. Every field is optional; the config
/// merges flag > env (both parsed by clap into one value) > file > default
/// with [`FileSignal::or`], then checks the result with [`FileSignal::resolve`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
#[command(next_help_heading = "Signaling (/ws/signal; file table [signal])")]
pub struct FileSignal {
    /// Presence record lifetime, seconds (3..=600); rewritten every third of it. Default 30.
    #[arg(
        long = "signal-presence-ttl-secs",
        env = "HUBMESH_SIGNAL_PRESENCE_TTL_SECS",
        value_name = "SECS"
    )]
    pub presence_ttl_secs: Option<u64>,
    /// Most /ws/signal sessions on this hub (> 0). Default 50000.
    #[arg(
        long = "signal-max-sessions",
        env = "HUBMESH_SIGNAL_MAX_SESSIONS",
        value_name = "N"
    )]
    pub max_sessions: Option<usize>,
    /// Largest client text frame, bytes (1024..=49152). Default 16384.
    #[arg(
        long = "signal-max-message-bytes",
        env = "HUBMESH_SIGNAL_MAX_MESSAGE_BYTES",
        value_name = "BYTES"
    )]
    pub max_message_bytes: Option<usize>,
    /// Frames per second per connection (burst twice that), 0 = unlimited. Default 50.
    #[arg(
        long = "signal-frames-per-second",
        env = "HUBMESH_SIGNAL_FRAMES_PER_SECOND",
        value_name = "N"
    )]
    pub frames_per_second: Option<u32>,
    /// Frames queued per socket before a slow reader is closed (4008), 1..=4096. Default 64.
    #[arg(
        long = "signal-outbound-queue",
        env = "HUBMESH_SIGNAL_OUTBOUND_QUEUE",
        value_name = "FRAMES"
    )]
    pub outbound_queue: Option<usize>,
    /// Keep-alive ping period, seconds (> 0). Default 20.
    #[arg(
        long = "signal-ping-interval-secs",
        env = "HUBMESH_SIGNAL_PING_INTERVAL_SECS",
        value_name = "SECS"
    )]
    pub ping_interval_secs: Option<u64>,
    /// Keep-alive timeout, seconds (> ping interval): close 4000 without a client frame. Default 60.
    #[arg(
        long = "signal-ping-timeout-secs",
        env = "HUBMESH_SIGNAL_PING_TIMEOUT_SECS",
        value_name = "SECS"
    )]
    pub ping_timeout_secs: Option<u64>,
    /// Node registrations (POST /register-node-id) per minute per client IP (> 0). Default 10.
    #[arg(
        long = "signal-register-per-minute",
        env = "HUBMESH_SIGNAL_REGISTER_PER_MINUTE",
        value_name = "N"
    )]
    pub register_per_minute: Option<u32>,
    /// Profile updates (PUT/DELETE /profile) per minute per client IP (> 0). Default 20.
    #[arg(
        long = "signal-profile-per-minute",
        env = "HUBMESH_SIGNAL_PROFILE_PER_MINUTE",
        value_name = "N"
    )]
    pub profile_per_minute: Option<u32>,
}

/// An out-of-range signal setting, named in all three spellings.
fn bad_setting(key: &str, rule: &str, got: impl std::fmt::Display) -> crate::error::NodeError {
    let flag = key.replace('_', "-");
    let env = key.to_ascii_uppercase();
    crate::error::NodeError::Config(format!(
        "signal.{key} (--signal-{flag}, HUBMESH_SIGNAL_{env}) must be {rule}, got {got}"
    ))
}

impl FileSignal {
    /// Each setting of `self`, else of `lower` (`flags_and_env.or(file)`).
    pub fn or(self, lower: FileSignal) -> FileSignal {
        FileSignal {
            presence_ttl_secs: self.presence_ttl_secs.or(lower.presence_ttl_secs),
            max_sessions: self.max_sessions.or(lower.max_sessions),
            max_message_bytes: self.max_message_bytes.or(lower.max_message_bytes),
            frames_per_second: self.frames_per_second.or(lower.frames_per_second),
            outbound_queue: self.outbound_queue.or(lower.outbound_queue),
            ping_interval_secs: self.ping_interval_secs.or(lower.ping_interval_secs),
            ping_timeout_secs: self.ping_timeout_secs.or(lower.ping_timeout_secs),
            register_per_minute: self.register_per_minute.or(lower.register_per_minute),
            profile_per_minute: self.profile_per_minute.or(lower.profile_per_minute),
        }
    }

    /// The resolved settings (defaults for unset ones), checked; an error
    /// names the setting as file key, flag and env variable.
    pub fn resolve(self) -> Result<SignalConfig, crate::error::NodeError> {
        let d = SignalConfig::default();
        let c = SignalConfig {
            presence_ttl: self
                .presence_ttl_secs
                .map(Duration::from_secs)
                .unwrap_or(d.presence_ttl),
            max_sessions: self.max_sessions.unwrap_or(d.max_sessions),
            max_message_bytes: self.max_message_bytes.unwrap_or(d.max_message_bytes),
            frames_per_second: self.frames_per_second.unwrap_or(d.frames_per_second),
            outbound_queue: self.outbound_queue.unwrap_or(d.outbound_queue),
            ping_interval: self
                .ping_interval_secs
                .map(Duration::from_secs)
                .unwrap_or(d.ping_interval),
            ping_timeout: self
                .ping_timeout_secs
                .map(Duration::from_secs)
                .unwrap_or(d.ping_timeout),
            register_per_minute: self.register_per_minute.unwrap_or(d.register_per_minute),
            profile_per_minute: self.profile_per_minute.unwrap_or(d.profile_per_minute),
        };
        let ttl = c.presence_ttl.as_secs();
        if !(3..=600).contains(&ttl) {
            return Err(bad_setting("presence_ttl_secs", "3..=600", ttl));
        }
        if c.max_sessions == 0 {
            return Err(bad_setting("max_sessions", "> 0", 0));
        }
        if !(1024..=48 * 1024).contains(&c.max_message_bytes) {
            return Err(bad_setting(
                "max_message_bytes",
                "1024..=49152",
                c.max_message_bytes,
            ));
        }
        if !(1..=4096).contains(&c.outbound_queue) {
            return Err(bad_setting("outbound_queue", "1..=4096", c.outbound_queue));
        }
        if c.ping_interval.is_zero() {
            return Err(bad_setting("ping_interval_secs", "> 0", 0));
        }
        if c.ping_timeout <= c.ping_interval {
            return Err(bad_setting(
                "ping_timeout_secs",
                &format!("> ping_interval_secs ({})", c.ping_interval.as_secs()),
                c.ping_timeout.as_secs(),
            ));
        }
        if c.register_per_minute == 0 {
            return Err(bad_setting("register_per_minute", "> 0", 0));
        }
        if c.profile_per_minute == 0 {
            return Err(bad_setting("profile_per_minute", "> 0", 0));
        }
        Ok(c)
    }
}

/// The read buffer of a socket (bytes).
pub const READ_BUFFER: usize = 4096;
/// How long one outbound frame may take to write before the socket is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Mesh error replies queued towards other hubs.
const REPLY_QUEUE: usize = 1024;
/// Version of the hub-to-hub relay frame.
const RELAY_VERSION: u8 = 1;
/// Most cached routes to remote nodes; the cache is emptied when full.
const MAX_ROUTES: usize = 16_384;
/// How long a cached route is used before the presence record is read
/// again: bounds how stale a route can be if a presence event was lost.
const ROUTE_TTL_MS: u64 = 1_000;

/// Why a session ends, and what the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The node connected again (here or on another hub).
    TakenOver,
    /// The outbound queue filled up.
    SlowConsumer,
    /// The hub is shutting down.
    Shutdown,
    /// The token expired while connected.
    TokenExpired,
    /// The token was revoked (logout on any hub).
    TokenRevoked,
    /// The account was deleted.
    AccountDeleted,
    /// No frame within the keep-alive timeout.
    PingTimeout,
    /// A message over the WebSocket size cap.
    TooLarge,
    /// The client closed or the connection broke (no close frame sent).
    Gone,
}

impl Close {
    /// Close code and reason.
    pub fn frame(self) -> Option<(u16, &'static str)> {
        Some(match self {
            Close::TakenOver => (4001, "session taken over by a newer connection"),
            Close::SlowConsumer => (4008, "outbound queue full: reader too slow"),
            Close::Shutdown => (1001, "hub shutting down"),
            Close::TokenExpired => (1008, "token expired"),
            Close::TokenRevoked => (1008, "token revoked"),
            Close::AccountDeleted => (1008, "account deleted"),
            Close::PingTimeout => (4000, "keep-alive timeout"),
            Close::TooLarge => (1009, "message too large"),
            Close::Gone => return None,
        })
    }

    fn error_frame(self) -> Option<(&'static str, &'static str)> {
        match self {
            Close::TokenExpired => Some(("token_expired", "token expired; log in again")),
            Close::TokenRevoked => Some(("token_revoked", "token has been revoked")),
            Close::AccountDeleted => Some(("account_deleted", "account deleted")),
            Close::TakenOver => Some(("session_taken_over", "this node connected again elsewhere")),
            _ => None,
        }
    }
}

/// A session's outbound queue and kill switch, shared by its registry entry
/// and its socket task. One small allocation per session: the queue holds
/// no memory while empty (the socket task takes the whole queue at each
/// wake-up), where a bounded tokio channel preallocates a block of 32 slots
/// (~1 KB) per idle session, and a separate cancellation token would add
/// another node.
struct Outbox {
    queue: Mutex<VecDeque<String>>,
    /// Wakes the socket task: a frame was queued or the session was killed.
    wake: Notify,
    /// Set once: why the session ends. A set reason refuses new frames.
    reason: OnceLock<Close>,
}

/// Outcome of [`Outbox::push`].
enum Push {
    Queued,
    Full,
    Closed,
}

impl Outbox {
    fn new() -> Self {
        Outbox {
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            reason: OnceLock::new(),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<String>> {
        // Every critical section is one push or one take: a panic cannot
        // leave the queue half-updated.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `text` unless `cap` frames are waiting or the session ends.
    fn push(&self, text: String, cap: usize) -> Push {
        if self.reason.get().is_some() {
            return Push::Closed;
        }
        let mut q = self.queue();
        if q.len() >= cap {
            return Push::Full;
        }
        q.push_back(text);
        drop(q);
        self.wake.notify_one();
        Push::Queued
    }

    /// Everything queued, leaving an empty (unallocated) queue behind.
    fn take(&self) -> VecDeque<String> {
        std::mem::take(&mut *self.queue())
    }

    /// Ends the session for `why` (the first reason wins).
    fn fire(&self, why: Close) {
        let _ = self.reason.set(why);
        self.wake.notify_one();
    }
}

struct Entry {
    session: u64,
    since_ms: u64,
    jti: String,
    exp: u64,
    outbox: Arc<Outbox>,
}

/// A local session, as the refresh pass sees it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// Node id.
    pub node_id: String,
    /// Session id.
    pub session: u64,
    /// Start, ms since the epoch.
    pub since_ms: u64,
    /// Token id.
    pub jti: String,
    /// Token expiry, seconds since the epoch.
    pub exp: u64,
}

/// The signaling state of one hub: its sessions, the socket tasks, and the
/// queue of error replies to other hubs.
pub struct Signaling {
    config: SignalConfig,
    peer_id: String,
    sessions: Mutex<HashMap<String, Entry>>,
    /// Remote node id → (its hub, cached until ms): saves a store read,
    /// a CBOR decode and a PeerId parse per cross-hub signal. Dropped when
    /// a presence record for the node arrives, and wholesale when mesh
    /// events were lost.
    routes: Mutex<HashMap<String, (PeerId, u64)>>,
    next_session: AtomicU64,
    shutting_down: AtomicBool,
    cancel: CancellationToken,
    tracker: TaskTracker,
    replies: mpsc::Sender<Reply>,
    replies_rx: Mutex<Option<mpsc::Receiver<Reply>>>,
    /// `POST /register-node-id` limit.
    pub register_limit: Limit,
    /// `PUT`/`DELETE /profile` limit.
    pub profile_limit: Limit,
}

impl std::fmt::Debug for Signaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signaling")
            .field("config", &self.config)
            .field("sessions", &self.len())
            .finish_non_exhaustive()
    }
}

/// An error relay frame owed to another hub.
type Reply = (PeerId, Vec<u8>);

/// A refusal answered with an error frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// Stable code.
    pub code: &'static str,
    /// Human-readable text.
    pub message: String,
    /// The target the refused signal was for.
    pub target: Option<String>,
    /// Ends the session after the error frame.
    pub close: Option<Close>,
}

impl FrameError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        FrameError {
            code,
            message: message.into(),
            target: None,
            close: None,
        }
    }
    fn target(mut self, t: &str) -> Self {
        self.target = Some(t.to_owned());
        self
    }
}

#[derive(Deserialize)]
struct ClientFrame<'a> {
    #[serde(rename = "type")]
    kind: String,
    target_node_id: Option<String>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct SignalOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    from_node_id: &'a str,
    payload: &'a RawValue,
}

#[derive(Serialize)]
struct ErrorOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_node_id: Option<&'a str>,
}

/// The hub-to-hub relay frame (JSON, `specs/federation.md`).
#[derive(Serialize, Deserialize)]
struct Relay<'a> {
    v: u8,
    // Borrowed from the frame when unescaped (ids and codes always are):
    // decoding a relay frame allocates nothing but the outbound text.
    #[serde(borrow)]
    k: Cow<'a, str>,
    #[serde(borrow)]
    to: Cow<'a, str>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    from: Option<Cow<'a, str>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    target: Option<Cow<'a, str>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    code: Option<Cow<'a, str>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    message: Option<Cow<'a, str>>,
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
}

fn error_text(code: &str, message: &str, target: Option<&str>) -> String {
    // Plain strings always serialize.
    serde_json::to_string(&ErrorOut {
        kind: "error",
        message,
        code,
        target_node_id: target,
    })
    .unwrap_or_default()
}

fn signal_text(from: &str, payload: &RawValue) -> String {
    serde_json::to_string(&SignalOut {
        kind: "signal",
        from_node_id: from,
        payload,
    })
    .unwrap_or_default()
}

impl Signaling {
    /// The signaling state of hub `peer_id`.
    pub fn new(
        config: SignalConfig,
        peer_id: String,
        register_limit: Limit,
        profile_limit: Limit,
    ) -> Self {
        let (replies, rx) = mpsc::channel(REPLY_QUEUE);
        Signaling {
            config,
            peer_id,
            sessions: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(rand::random::<u32>() as u64),
            shutting_down: AtomicBool::new(false),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            replies,
            replies_rx: Mutex::new(Some(rx)),
            register_limit,
            profile_limit,
        }
    }

    /// This hub's PeerId.
    pub fn peer_id(&self) -> &str {
        &self.peer_id
    }

    /// The settings.
    pub fn config(&self) -> &SignalConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every critical section is a single map operation).
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open sessions on this hub.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `node_id` holds a session on this hub.
    pub fn is_local(&self, node_id: &str) -> bool {
        self.lock().contains_key(node_id)
    }

    /// The local sessions.
    pub fn snapshot(&self) -> Vec<SessionInfo> {
        self.lock()
            .iter()
            .map(|(k, e)| SessionInfo {
                node_id: k.clone(),
                session: e.session,
                since_ms: e.since_ms,
                jti: e.jti.clone(),
                exp: e.exp,
            })
            .collect()
    }

    /// Forgets idle clients of the family's REST limiters.
    pub fn cleanup_limiters(&self) {
        self.register_limit.limiter.cleanup();
        self.profile_limit.limiter.cleanup();
    }

    /// Closes the local session of `node_id`, if any.
    pub fn kill_node(&self, node_id: &str, why: Close) {
        if let Some(e) = self.lock().get(node_id) {
            e.outbox.fire(why);
        }
    }

    /// Closes the local session `session` of `node_id`, if still open.
    pub fn kill_session(&self, node_id: &str, session: u64, why: Close) {
        if let Some(e) = self.lock().get(node_id)
            && e.session == session
        {
            e.outbox.fire(why);
        }
    }

    /// Closes the local session of `node_id` if it started before `since_ms`.
    pub fn kill_if_older(&self, node_id: &str, since_ms: u64, why: Close) {
        if let Some(e) = self.lock().get(node_id)
            && e.since_ms < since_ms
        {
            e.outbox.fire(why);
        }
    }

    /// Queues `text` on `node_id`'s socket. A full queue drops that reader.
    fn deliver(&self, node_id: &str, text: String) -> bool {
        let map = self.lock();
        let Some(e) = map.get(node_id) else {
            return false;
        };
        match e.outbox.push(text, self.config.outbound_queue.max(1)) {
            Push::Queued => true,
            Push::Full => {
                metrics::counter!("hubmesh_ws_slow_consumers_total").increment(1);
                e.outbox.fire(Close::SlowConsumer);
                false
            }
            Push::Closed => false,
        }
    }

    fn insert(&self, node_id: &str, entry: Entry) -> Result<(), ()> {
        let mut map = self.lock();
        if !map.contains_key(node_id) && map.len() >= self.config.max_sessions {
            return Err(());
        }
        if let Some(old) = map.insert(node_id.to_owned(), entry) {
            old.outbox.fire(Close::TakenOver);
        }
        Ok(())
    }

    fn remove_if(&self, node_id: &str, session: u64) -> bool {
        let mut map = self.lock();
        if map.get(node_id).is_some_and(|e| e.session == session) {
            map.remove(node_id);
            true
        } else {
            false
        }
    }

    /// Relays one signal from local node `from`.
    async fn relay(
        &self,
        state: &AppState,
        from: &str,
        target: &str,
        payload: &RawValue,
    ) -> Result<(), FrameError> {
        if !nodes::is_node_id(target) {
            return Err(
                FrameError::new("unknown_target", "target_node_id is not a node id").target(target),
            );
        }
        if target == from {
            return Err(FrameError::new("invalid_target", "cannot signal yourself").target(target));
        }
        if self.is_local(target) {
            return if self.deliver(target, signal_text(from, payload)) {
                Ok(())
            } else {
                Err(FrameError::new("target_offline", "target disconnected").target(target))
            };
        }
        let peer = match self.route(target) {
            Some(peer) => peer,
            None => match presence::locate(state, target) {
                Some(p) if p.hub != self.peer_id => {
                    let peer: PeerId = p.hub.parse().map_err(|_| {
                        FrameError::new("target_offline", "target's hub unknown").target(target)
                    })?;
                    self.remember_route(target, peer);
                    peer
                }
                _ => {
                    let known = match state.store.get(nodes::NS, target) {
                        Ok(Some(_)) => true,
                        _ => matches!(state.mesh.lookup(nodes::NS, target).await, Ok(Some(_))),
                    };
                    return Err(if known {
                        FrameError::new("target_offline", "target is not connected to any hub")
                    } else {
                        FrameError::new("unknown_target", "no such node in the federation")
                    }
                    .target(target));
                }
            },
        };
        let frame = serde_json::to_vec(&Relay {
            v: RELAY_VERSION,
            k: "signal".into(),
            to: target.into(),
            from: Some(from.into()),
            target: None,
            code: None,
            message: None,
            payload: Some(payload),
        })
        .map_err(|e| FrameError::new("internal", e.to_string()))?;
        match state.mesh.send_signal(peer, frame).await {
            Ok(()) => Ok(()),
            Err(SignalError::TooLarge { .. }) => {
                Err(FrameError::new("too_large", "payload too large to relay").target(target))
            }
            Err(e) => {
                self.forget_route(target);
                Err(FrameError::new(
                    "target_offline",
                    format!("target's hub is unreachable: {e}"),
                )
                .target(target))
            }
        }
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<String, (PeerId, u64)>> {
        // Single map operations only: a panic cannot leave it inconsistent.
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached hub of remote node `node_id`, if still fresh.
    fn route(&self, node_id: &str) -> Option<PeerId> {
        let now = now_ms();
        self.routes()
            .get(node_id)
            .filter(|(_, until)| *until > now)
            .map(|(peer, _)| *peer)
    }

    fn remember_route(&self, node_id: &str, hub: PeerId) {
        let mut routes = self.routes();
        if routes.len() >= MAX_ROUTES && !routes.contains_key(node_id) {
            routes.clear();
        }
        routes.insert(node_id.to_owned(), (hub, now_ms() + ROUTE_TTL_MS));
    }

    /// Drops the cached route to `node_id` (its presence record changed).
    pub fn forget_route(&self, node_id: &str) {
        self.routes().remove(node_id);
    }

    /// Drops every cached route (presence events may have been lost).
    pub fn forget_routes(&self) {
        self.routes().clear();
    }

    /// A relay frame from hub `from` (mesh signal event). Never waits: a
    /// full socket queue drops that reader; an undeliverable signal is
    /// answered to the sending hub with an error relay frame.
    pub fn on_mesh_signal(&self, from: PeerId, bytes: &[u8]) {
        let Ok(r) = serde_json::from_slice::<Relay>(bytes) else {
            tracing::debug!(%from, "undecodable relay frame dropped");
            return;
        };
        if r.v != RELAY_VERSION {
            tracing::debug!(%from, v = r.v, "relay frame of an unknown version dropped");
            return;
        }
        match (r.k.as_ref(), r.from.as_deref(), r.payload) {
            ("signal", Some(sender), Some(payload)) => {
                if !self.deliver(&r.to, signal_text(sender, payload)) {
                    let reply = Relay {
                        v: RELAY_VERSION,
                        k: "error".into(),
                        to: sender.into(),
                        from: None,
                        target: Some(r.to.clone()),
                        code: Some("target_offline".into()),
                        message: Some("target is not connected to its hub".into()),
                        payload: None,
                    };
                    if let Ok(b) = serde_json::to_vec(&reply)
                        && self.replies.try_send((from, b)).is_err()
                    {
                        metrics::counter!("hubmesh_ws_error_replies_dropped_total").increment(1);
                    }
                }
            }
            ("error", _, _) => {
                let text = error_text(
                    r.code.as_deref().unwrap_or("target_offline"),
                    r.message.as_deref().unwrap_or("signal not delivered"),
                    r.target.as_deref(),
                );
                self.deliver(&r.to, text);
            }
            _ => tracing::debug!(%from, kind = %r.k, "malformed relay frame dropped"),
        }
    }

    /// Sends queued error replies to other hubs until `cancel`.
    pub async fn run_replies(self: Arc<Self>, mesh: Mesh, cancel: CancellationToken) {
        let rx = self
            .replies_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(mut rx) = rx else { return };
        loop {
            let (peer, bytes) = tokio::select! {
                () = cancel.cancelled() => return,
                m = rx.recv() => match m { Some(m) => m, None => return },
            };
            if let Err(e) = mesh.send_signal(peer, bytes).await {
                tracing::debug!(%peer, error = %e, "error reply not sent");
            }
        }
    }

    /// Step 3 of the hub's teardown: tombstones every local presence (one
    /// batch), then closes every socket with a close frame and waits for
    /// the socket tasks (bounded).
    pub async fn shutdown(&self, mesh: &Mesh) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let ttl = self.config.presence_ttl;
        let drafts: Vec<_> = self
            .snapshot()
            .iter()
            .map(|s| presence::tombstone(&s.node_id, ttl))
            .collect();
        for chunk in drafts.chunks(256) {
            match tokio::time::timeout(Duration::from_secs(2), mesh.write(chunk.to_vec())).await {
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(3), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("WebSocket sessions still open 3 s after the close frames");
        }
    }
}

/// `/ws/signal` query.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
pub struct WsQuery {
    /// User JWT (`POST /token` or OAuth login at the account's home hub).
    pub token: Option<String>,
}

fn auth_error(code: &'static str, e: impl std::fmt::Display) -> FrameError {
    FrameError {
        code,
        message: e.to_string(),
        target: None,
        close: Some(Close::Gone),
    }
}

async fn authorize(
    state: &AppState,
    token: Option<&str>,
) -> Result<(Arc<UserClaims>, String), FrameError> {
    let token = token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| auth_error("missing_token", "token query parameter required"))?;
    let claims = super::authenticate(state, token).map_err(|e| auth_error(e.code, e.message))?;
    let node = nodes::node_of(state, &claims)
        .map_err(|e| auth_error("internal", e))?
        .ok_or_else(|| {
            auth_error(
                "node_not_registered",
                "register a node identity first (POST /register-node-id)",
            )
        })?;
    if let Err(e) = nodes::refresh_if_due(state, &node).await {
        tracing::warn!(error = %e, "identity refresh failed");
    }
    if let Err(e) = profile::refresh_if_due(state, &node.key).await {
        tracing::warn!(error = %e, "profile refresh failed");
    }
    Ok((claims, node.key))
}

/// The signaling WebSocket.
#[utoipa::path(
    get, path = "/ws/signal", tag = "federation",
    params(WsQuery),
    responses(
        (status = 101, description = "WebSocket: `auth_ok`, then signal and error frames (specs/federation.md)"),
        (status = 400, description = "not a WebSocket upgrade request"),
        (status = 429, description = "rate limited"),
    )
)]
pub async fn ws_signal(
    State(state): State<AppState>,
    Query(q): Query<WsQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let cfg = state.signaling.config().clone();
    // Twice the application limit: a message between the two gets a
    // `too_large` error frame and the session goes on; beyond, the
    // WebSocket layer refuses it without buffering it (close 1009).
    let hard_cap = cfg.max_message_bytes * 2;
    let auth = authorize(&state, q.token.as_deref()).await;
    let tracker = state.signaling.tracker.clone();
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(hard_cap * 2 + 1024)
        .max_message_size(hard_cap)
        .max_frame_size(hard_cap)
        .on_upgrade(move |socket| tracker.track_future(session(state, socket, auth)))
}

async fn send(socket: &mut WebSocket, m: Message) -> Result<(), ()> {
    match tokio::time::timeout(WRITE_TIMEOUT, socket.send(m)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Sends `m` on a live session's socket unless the session ends first:
/// killed (slow reader, takeover, revocation: `outbox.reason`) or the hub
/// shutting down. A reader that stopped reading blocks the write once the
/// TCP buffers are full; without this race its session (and the hub's
/// shutdown) would wait out the [`WRITE_TIMEOUT`] and the slow reader would
/// be dropped without its close frame.
async fn send_live(
    socket: &mut WebSocket,
    m: Message,
    outbox: &Outbox,
    cancel: &CancellationToken,
) -> Result<(), Close> {
    // The wake-up is shared with `Outbox::push`: one consumed here while
    // waiting for a kill is given back, so a queued frame is not left
    // waiting for the next push.
    let mut consumed = false;
    let r = {
        let killed = async {
            loop {
                if let Some(why) = outbox.reason.get() {
                    return *why;
                }
                outbox.wake.notified().await;
                consumed = true;
            }
        };
        tokio::select! {
            biased;
            () = cancel.cancelled() => Err(Close::Shutdown),
            why = killed => Err(why),
            r = send(socket, m) => r.map_err(|()| Close::Gone),
        }
    };
    if consumed {
        outbox.wake.notify_one();
    }
    r
}

async fn close_with(socket: &mut WebSocket, code: u16, reason: &'static str) {
    close_within(socket, code, reason, Duration::from_secs(1)).await;
}

async fn close_within(socket: &mut WebSocket, code: u16, reason: &'static str, within: Duration) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }));
    let _ = tokio::time::timeout(within, socket.send(frame)).await;
}

async fn session(
    state: AppState,
    mut socket: WebSocket,
    auth: Result<(Arc<UserClaims>, String), FrameError>,
) {
    let sig = state.signaling.clone();
    let ttl = sig.config().presence_ttl;
    let (claims, node_id) = match auth {
        Ok(x) => x,
        Err(e) => {
            let _ = send(
                &mut socket,
                Message::text(error_text(e.code, &e.message, None)),
            )
            .await;
            close_with(&mut socket, 1008, "authentication failed").await;
            return;
        }
    };
    if sig.shutting_down.load(Ordering::SeqCst) {
        close_with(&mut socket, 1001, "hub shutting down").await;
        return;
    }
    let outbox = Arc::new(Outbox::new());
    let session_id = sig.next_session.fetch_add(1, Ordering::Relaxed);
    let since_ms = now_ms();
    let entry = Entry {
        session: session_id,
        since_ms,
        jti: claims.jti.clone(),
        exp: claims.exp,
        outbox: outbox.clone(),
    };
    if sig.insert(&node_id, entry).is_err() {
        let _ = send(
            &mut socket,
            Message::text(error_text(
                "too_many_sessions",
                "this hub is at its session limit",
                None,
            )),
        )
        .await;
        close_with(&mut socket, 1013, "try again later").await;
        return;
    }
    // Durable before auth_ok: once the client hears auth_ok, every hub that
    // has the record can route to it.
    let presence = presence::draft(&state.peer_id, &node_id, session_id, since_ms, ttl);
    // Boxed, like every large future awaited here once: the session's own
    // future stays small for the hours it sits idle.
    if let Err(e) = Box::pin(state.mesh.write(vec![presence])).await {
        tracing::warn!(error = %e, "presence write failed");
        sig.remove_if(&node_id, session_id);
        let _ = send(
            &mut socket,
            Message::text(error_text(
                "unavailable",
                "the hub cannot record presence",
                None,
            )),
        )
        .await;
        close_with(&mut socket, 1011, "presence unavailable").await;
        return;
    }
    metrics::gauge!("hubmesh_ws_sessions").set(sig.len() as f64);
    let hello = serde_json::json!({
        "type": "auth_ok",
        "message": format!("Successfully connected as {node_id}"),
        "node_id": node_id,
    })
    .to_string();
    let why = if send(&mut socket, Message::text(hello)).await.is_err() {
        Close::Gone
    } else {
        run_session(&state, &mut socket, &outbox, &claims, &node_id).await
    };
    // Refuse frames queued from now on, and leave the hub (registry, then
    // presence) before the goodbye, which a stuck reader can hold up.
    outbox.fire(why);
    let removed = sig.remove_if(&node_id, session_id);
    metrics::gauge!("hubmesh_ws_sessions").set(sig.len() as f64);
    if removed
        && why != Close::Shutdown
        && presence::is_current(&state, &node_id, session_id)
        && let Err(e) = Box::pin(state.mesh.write(vec![presence::tombstone(&node_id, ttl)])).await
    {
        tracing::debug!(error = %e, "presence tombstone not written");
    }
    if let Some((code, reason)) = why.frame() {
        // A slow reader's socket is full by definition: its close frame
        // waits behind the frames already written, for as long as any
        // write may take (a reader that resumes within that time sees
        // 4008), unless the hub shuts down meanwhile.
        let within = if why == Close::SlowConsumer {
            WRITE_TIMEOUT
        } else {
            Duration::from_secs(1)
        };
        let goodbye = async {
            if let Some((c, m)) = why.error_frame() {
                let _ = send(&mut socket, Message::text(error_text(c, m, None))).await;
            }
            close_within(&mut socket, code, reason, within).await;
        };
        if why == Close::Shutdown {
            goodbye.await;
        } else {
            tokio::select! {
                () = goodbye => {}
                () = sig.cancel.cancelled() => {}
            }
        }
    }
    tracing::debug!(node = %node_id, ?why, "signal session ended");
}

fn frame_limiter(cfg: &SignalConfig, enabled: bool) -> Option<DefaultDirectRateLimiter> {
    let per_second = NonZeroU32::new(cfg.frames_per_second).filter(|_| enabled)?;
    let burst = per_second.saturating_mul(NonZeroU32::MIN.saturating_add(1));
    Some(DefaultDirectRateLimiter::direct(
        Quota::per_second(per_second).allow_burst(burst),
    ))
}

async fn run_session(
    state: &AppState,
    socket: &mut WebSocket,
    outbox: &Outbox,
    claims: &UserClaims,
    node_id: &str,
) -> Close {
    let sig = &state.signaling;
    let cfg = sig.config();
    let limiter = frame_limiter(cfg, state.config.rate_limits.enabled);
    let mut ping = tokio::time::interval(cfg.ping_interval);
    ping.tick().await;
    let mut last_in = Instant::now();
    loop {
        tokio::select! {
            biased;
            () = sig.cancel.cancelled() => return Close::Shutdown,
            () = outbox.wake.notified() => {
                if let Some(why) = outbox.reason.get() {
                    return *why;
                }
                for text in outbox.take() {
                    if let Err(why) = send_live(socket, Message::text(text), outbox, &sig.cancel).await {
                        return why;
                    }
                }
            },
            inbound = socket.recv() => {
                last_in = Instant::now();
                let text = match inbound {
                    None => return Close::Gone,
                    Some(Err(e)) => {
                        // tungstenite's capacity error ("Space limit exceeded: Message too long").
                        let s = e.to_string();
                        let too_large = s.contains("Space limit") || s.contains("too long");
                        return if too_large { Close::TooLarge } else { Close::Gone };
                    }
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => {
                        let t = error_text("malformed_frame", "binary frames are not supported; send JSON text", None);
                        if let Err(why) = send_live(socket, Message::text(t), outbox, &sig.cancel).await {
                            return why;
                        }
                        continue;
                    }
                    Some(Ok(Message::Close(_))) => return Close::Gone,
                    Some(Ok(_)) => continue,
                };
                // Boxed: the relay path's future (mesh send, DHT lookup) is
                // large and would otherwise be part of every idle session.
                if let Err(e) = Box::pin(handle_text(state, &limiter, claims, node_id, text.as_str())).await {
                    metrics::counter!("hubmesh_ws_error_frames_total", "code" => e.code).increment(1);
                    // A closing error's frame is sent with the close frame.
                    if let Some(c) = e.close {
                        return c;
                    }
                    let t = error_text(e.code, &e.message, e.target.as_deref());
                    if let Err(why) = send_live(socket, Message::text(t), outbox, &sig.cancel).await {
                        return why;
                    }
                }
            }
            _ = ping.tick() => {
                if last_in.elapsed() > cfg.ping_timeout {
                    return Close::PingTimeout;
                }
                if let Err(why) = send_live(socket, Message::Ping(Default::default()), outbox, &sig.cancel).await {
                    return why;
                }
            }
        }
    }
}

async fn handle_text(
    state: &AppState,
    limiter: &Option<DefaultDirectRateLimiter>,
    claims: &UserClaims,
    node_id: &str,
    text: &str,
) -> Result<(), FrameError> {
    let cfg = state.signaling.config();
    if text.len() > cfg.max_message_bytes {
        return Err(FrameError::new(
            "too_large",
            format!(
                "frame of {} bytes exceeds the limit of {}",
                text.len(),
                cfg.max_message_bytes
            ),
        ));
    }
    if let Some(l) = limiter
        && l.check().is_err()
    {
        return Err(FrameError::new(
            "rate_limited",
            format!(
                "more than {} frames per second; frame dropped",
                cfg.frames_per_second
            ),
        ));
    }
    if claims.exp <= now_ms() / 1000 {
        return Err(FrameError {
            close: Some(Close::TokenExpired),
            ..FrameError::new("token_expired", "token expired; log in again")
        });
    }
    if super::revocation::is_revoked(&state.store, &claims.jti).unwrap_or(false) {
        return Err(FrameError {
            close: Some(Close::TokenRevoked),
            ..FrameError::new("token_revoked", "token has been revoked")
        });
    }
    let f: ClientFrame = serde_json::from_str(text)
        .map_err(|e| FrameError::new("malformed_frame", format!("not a signal frame: {e}")))?;
    if f.kind != "signal" {
        return Err(FrameError::new(
            "malformed_frame",
            format!("unknown frame type {:?} (expected \"signal\")", f.kind),
        ));
    }
    let target = f
        .target_node_id
        .ok_or_else(|| FrameError::new("malformed_frame", "target_node_id is required"))?;
    let payload = f
        .payload
        .ok_or_else(|| FrameError::new("malformed_frame", "payload is required").target(&target))?;
    state
        .signaling
        .relay(state, node_id, &target, payload)
        .await
}

/// The signaling route.
pub fn routes() -> Router<AppState> {
    Router::new().route("/ws/signal", get(ws_signal))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn outbox_bounds_wakes_and_refuses_after_close() {
        let o = Outbox::new();
        assert_eq!(
            o.queue().capacity(),
            0,
            "an idle outbox holds no queue memory"
        );
        assert!(matches!(o.push("a".into(), 2), Push::Queued));
        assert!(matches!(o.push("b".into(), 2), Push::Queued));
        assert!(matches!(o.push("c".into(), 2), Push::Full));
        // The pushes left a wake-up permit: the socket task cannot miss them.
        tokio::time::timeout(Duration::from_secs(1), o.wake.notified())
            .await
            .unwrap();
        assert_eq!(Vec::from(o.take()), vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(o.queue().capacity(), 0, "taking leaves no memory behind");
        o.fire(Close::SlowConsumer);
        o.fire(Close::TakenOver);
        assert_eq!(
            o.reason.get(),
            Some(&Close::SlowConsumer),
            "first reason wins"
        );
        assert!(matches!(o.push("d".into(), 2), Push::Closed));
        tokio::time::timeout(Duration::from_secs(1), o.wake.notified())
            .await
            .unwrap();
    }

    #[test]
    fn routes_are_cached_briefly_and_forgotten() {
        let limit = || Limit::new("t", 10, &crate::Config::default());
        let sig = Signaling::new(SignalConfig::default(), "hub".into(), limit(), limit());
        let peer = PeerId::random();
        assert_eq!(sig.route("n1"), None);
        sig.remember_route("n1", peer);
        sig.remember_route("n2", peer);
        assert_eq!(sig.route("n1"), Some(peer));
        sig.forget_route("n1");
        assert_eq!(sig.route("n1"), None);
        assert_eq!(sig.route("n2"), Some(peer));
        sig.forget_routes();
        assert_eq!(sig.route("n2"), None);
        // An entry past its time is not used.
        sig.routes()
            .insert("n3".into(), (peer, now_ms().saturating_sub(1)));
        assert_eq!(sig.route("n3"), None);
    }
}
