//! Helpers shared by the process-level tests in `cli/tests/`: real
//! `hubmesh run` processes started with the CLI contract (`--data-dir --http
//! --mesh --federation [--bootstrap]…`, then one `hubmesh ready http=…
//! mesh=… peer=…` stdout line), children killed on drop, CLI runs with a
//! deadline, and polling with a deadline. Every wait here is bounded.

// Each test binary (`hubs`, `users`, `federation`, `testnet`) compiles its own
// copy of this module and uses only a subset of it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::ops::{ControlFlow, Deref, DerefMut};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The `hubmesh` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_hubmesh");

/// The default deadline for a hub's ready line, a CLI run, or a polled condition.
pub const WAIT: Duration = Duration::from_secs(20);

/// A child process killed (and reaped) when dropped, so that no test leaves
/// one behind, whether it passes, fails or panics.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The stdout lines of a child, read on a thread, each awaited with a deadline.
#[derive(Debug)]
pub struct StdoutLines(Receiver<String>);

impl StdoutLines {
    /// Takes `child`'s (piped) stdout and starts reading it. The reader stops
    /// at the child's end of output or once this is dropped.
    pub fn of(child: &mut Child) -> Result<Self> {
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::sync_channel(8);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self(rx))
    }

    /// The next line, if one comes before `deadline` (and the output has not ended).
    pub fn next_before(&self, deadline: Instant) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.0.recv_timeout(left).ok()
    }
}

/// A running `hubmesh run` process and where its ready line says it is.
#[derive(Debug)]
pub struct HubProc {
    pub child: KillOnDrop,
    /// `http://ADDR`.
    pub http: String,
    /// The mesh multiaddr, ending in `/p2p/PEER`.
    pub mesh: String,
    pub peer: String,
}

/// How to start a hub: the flags and environment that differ between tests.
/// `--http 127.0.0.1:0`, `--mesh /ip4/127.0.0.1/udp/0/quic-v1` unless set, and
/// `RUST_LOG=warn`, stdout piped (for the ready line), stderr inherited.
#[derive(Debug, Clone)]
pub struct HubOptions {
    federation: String,
    mesh: String,
    bootstrap: Vec<String>,
    rate_limits: String,
    sync_interval_secs: u64,
    env: Vec<(String, String)>,
    env_remove: Vec<String>,
    args: Vec<String>,
    ready_within: Duration,
}

impl HubOptions {
    /// A hub of `federation`, no bootstrap peers, `HUBMESH_RATE_LIMITS=off`,
    /// `HUBMESH_SYNC_INTERVAL_SECS=2`, the ready line within [`WAIT`].
    pub fn new(federation: &str) -> Self {
        Self {
            federation: federation.to_owned(),
            mesh: "/ip4/127.0.0.1/udp/0/quic-v1".to_owned(),
            bootstrap: Vec::new(),
            rate_limits: "off".to_owned(),
            sync_interval_secs: 2,
            env: Vec::new(),
            env_remove: Vec::new(),
            args: Vec::new(),
            ready_within: WAIT,
        }
    }

    /// The `--mesh` listen address (default `/ip4/127.0.0.1/udp/0/quic-v1`).
    pub fn mesh(mut self, addr: &str) -> Self {
        addr.clone_into(&mut self.mesh);
        self
    }

    /// Adds a `--bootstrap ADDR`.
    pub fn bootstrap(mut self, addr: &str) -> Self {
        self.bootstrap.push(addr.to_owned());
        self
    }

    /// `HUBMESH_RATE_LIMITS` (`on` or `off`).
    pub fn rate_limits(mut self, value: &str) -> Self {
        value.clone_into(&mut self.rate_limits);
        self
    }

    /// `HUBMESH_SYNC_INTERVAL_SECS`.
    pub fn sync_interval_secs(mut self, secs: u64) -> Self {
        self.sync_interval_secs = secs;
        self
    }

    /// Sets an extra environment variable for the hub.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Removes an inherited environment variable for the hub.
    pub fn env_remove(mut self, key: &str) -> Self {
        self.env_remove.push(key.to_owned());
        self
    }

    /// Adds an extra `hubmesh run` argument (after the contract's flags).
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    /// How long to wait for the ready line.
    pub fn ready_within(mut self, within: Duration) -> Self {
        self.ready_within = within;
        self
    }

    /// Starts `hubmesh run --data-dir DIR …` and waits for its ready line.
    pub fn start(&self, dir: &Path) -> Result<HubProc> {
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--data-dir"])
            .arg(dir)
            .args(["--http", "127.0.0.1:0", "--mesh", &self.mesh])
            .args(["--federation", &self.federation])
            .env("HUBMESH_RATE_LIMITS", &self.rate_limits)
            .env(
                "HUBMESH_SYNC_INTERVAL_SECS",
                self.sync_interval_secs.to_string(),
            )
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for k in &self.env_remove {
            cmd.env_remove(k);
        }
        for b in &self.bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        cmd.args(&self.args);
        let mut child = KillOnDrop(cmd.spawn().context("spawning hubmesh run")?);
        let lines = StdoutLines::of(&mut child)?;
        let Some(line) = lines.next_before(Instant::now() + self.ready_within) else {
            bail!(
                "no ready line within {:?} (or the hub exited)",
                self.ready_within
            );
        };
        let (http, mesh, peer) = parse_ready(&line)?;
        Ok(HubProc {
            child,
            http,
            mesh,
            peer,
        })
    }
}

/// The ready line's facade URL, mesh address and PeerId (the testnet's parser).
pub fn parse_ready(line: &str) -> Result<(String, String, String)> {
    let info = hubmesh_testnet::process::parse_ready("hub", line)?;
    Ok((info.http, info.mesh, info.peer))
}

/// A temporary directory, removed when dropped.
pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temp dir")
}

/// An HTTP client whose every request has a 10 s timeout.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("building a client")
}

/// `hubmesh ARGS` with `HUBMESH_ADMIN_TOKEN` and `HUBMESH_DATA_DIR` removed,
/// so that the tests' own environment cannot redirect it.
pub fn hubmesh<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("HUBMESH_ADMIN_TOKEN")
        .env_remove("HUBMESH_DATA_DIR");
    cmd
}

/// Runs `cmd` with `stdin` piped in and stdout/stderr captured; fails (and
/// kills it) if it has not finished within `within`. Its exit status is
/// not checked.
pub fn run_with_stdin(cmd: &mut Command, stdin: &[u8], within: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    child.stdin.take().context("stdin")?.write_all(stdin)?;
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

/// Polls `step` every `every` until it breaks with a value, or fails naming
/// `what` and the last state `step` reported once `within` has passed.
pub async fn poll<T, F, Fut>(
    what: &str,
    within: Duration,
    every: Duration,
    mut step: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<ControlFlow<T, String>>>,
{
    let deadline = Instant::now() + within;
    loop {
        let last = match step().await? {
            ControlFlow::Break(v) => return Ok(v),
            ControlFlow::Continue(last) => last,
        };
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}: still {last} after {within:?}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Polls `cond` every `every` until it holds, or fails naming `what` once
/// `within` has passed.
pub async fn wait_until<F, Fut>(
    what: &str,
    within: Duration,
    every: Duration,
    mut cond: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    poll(what, within, every, || {
        let fut = cond();
        async move {
            Ok(if fut.await? {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue("false".to_owned())
            })
        }
    })
    .await
}

/// Waits (polling every `every`) for `child` to exit, or fails naming `what`
/// once `within` has passed.
pub async fn wait_exit(
    child: &mut Child,
    what: &str,
    within: Duration,
    every: Duration,
) -> Result<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("{what}: no exit within {within:?}");
        }
        tokio::time::sleep(every).await;
    }
}
