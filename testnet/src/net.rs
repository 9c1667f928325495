//! [`Testnet`]: N hubs on loopback — real `hubmesh run` processes or
//! in-process [`hubmesh_node::Hub`]s — with fault injection: [`Testnet::stop`],
//! [`Testnet::kill`] (`kill -9`), [`Testnet::restart`], [`Testnet::partition`],
//! [`Testnet::heal`], and the two waits every scenario needs,
//! [`Testnet::wait_ready`] (the mesh is formed) and [`Testnet::wait_converged`]
//! (every hub holds the same registry). Everything is observed through the
//! hubs' HTTP operator API, the same in both modes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hubmesh_node::{Config, Hub};

use crate::client::{HubClient, RegistryState, http_client};
use crate::error::TestnetError;
use crate::process::{HubInfo, ProcHub, SpawnSpec};

/// Most hubs one testnet runs.
pub const MAX_HUBS: usize = 100;

/// How often waits poll the hubs.
const POLL: Duration = Duration::from_millis(50);

/// Time a hub gets to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// How long a restart retries binding the hub's previous ports.
const REBIND_WAIT: Duration = Duration::from_secs(10);

/// How the hubs run.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Real `hubmesh run` processes of this binary.
    Processes {
        /// The `hubmesh` binary.
        bin: PathBuf,
    },
    /// [`Hub::spawn`] in this process (no `kill -9`).
    InProcess,
}

/// Everything a testnet needs to know. [`Options::processes`] and
/// [`Options::in_process`] give working defaults.
#[derive(Debug, Clone)]
pub struct Options {
    /// Processes or in-process hubs.
    pub mode: Mode,
    /// Holds `hub-N/` (data dir) and `hub-N.log` per hub.
    pub dir: PathBuf,
    /// Federation name.
    pub federation: String,
    /// Hub `i` listens on HTTP `127.0.0.1:(base_port + i)` (TCP) and QUIC
    /// `127.0.0.1:(base_port + i)` (UDP); 0 picks free ports (kept across restarts).
    pub base_port: u16,
    /// Reuse existing data dirs (same identities, same records) instead of
    /// starting fresh.
    pub keep: bool,
    /// Forward hub logs to this process's stderr, prefixed by the hub's name.
    pub forward_logs: bool,
    /// `RUST_LOG` of the hubs.
    pub rust_log: String,
    /// Anti-entropy period of the hubs.
    pub sync_interval: Duration,
    /// Discovery cluster secrets `(cluster id, secret)` every hub accepts.
    pub cluster_secrets: Vec<(String, String)>,
    /// Deadline for one hub's ready line and for the mesh to form.
    pub ready_timeout: Duration,
}

impl Options {
    /// Real processes of `bin`, data and logs under `dir`.
    pub fn processes(bin: impl Into<PathBuf>, dir: impl Into<PathBuf>) -> Self {
        Options {
            mode: Mode::Processes { bin: bin.into() },
            ..Options::in_process(dir)
        }
    }

    /// In-process hubs, data and logs under `dir`.
    pub fn in_process(dir: impl Into<PathBuf>) -> Self {
        Options {
            mode: Mode::InProcess,
            dir: dir.into(),
            federation: "testnet".into(),
            base_port: 0,
            keep: false,
            forward_logs: false,
            rust_log: "warn".into(),
            sync_interval: Duration::from_secs(2),
            cluster_secrets: vec![(crate::CLUSTER.into(), crate::CLUSTER_SECRET.into())],
            ready_timeout: Duration::from_secs(30),
        }
    }
}

enum Running {
    Process(Box<ProcHub>),
    InProcess(Hub),
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Running::Process(p) => write!(f, "Process(pid {})", p.pid()),
            Running::InProcess(h) => write!(f, "InProcess({})", h.peer_id()),
        }
    }
}

#[derive(Debug)]
struct Slot {
    name: String,
    data_dir: PathBuf,
    log: PathBuf,
    http_port: u16,
    mesh_port: u16,
    info: Option<HubInfo>,
    running: Option<Running>,
}

/// N hubs on loopback. Dropping it kills what still runs (SIGKILL); call
/// [`Testnet::shutdown`] for a clean stop.
#[derive(Debug)]
pub struct Testnet {
    opts: Options,
    http: reqwest::Client,
    slots: Vec<Slot>,
    /// Current partition: group index per hub (`None`: healed).
    groups: Option<Vec<usize>>,
    formed_in: Duration,
}

fn mesh_port_of(mesh: &str) -> Option<u16> {
    let mut parts = mesh.split('/');
    while let Some(p) = parts.next() {
        if p == "udp" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

fn http_port_of(http: &str) -> Option<u16> {
    http.rsplit(':').next()?.parse().ok()
}

impl Testnet {
    /// Starts `n` hubs (hub `i` bootstraps from every hub before it) and
    /// waits until every hub is connected to every other.
    pub async fn start(n: usize, opts: Options) -> Result<Testnet, TestnetError> {
        if n == 0 || n > MAX_HUBS {
            return Err(TestnetError::Invalid(format!(
                "hubs must be 1..={MAX_HUBS}, not {n}"
            )));
        }
        if opts.base_port != 0 && usize::from(opts.base_port) + n > usize::from(u16::MAX) {
            return Err(TestnetError::Invalid(format!(
                "base port {} + {n} hubs exceeds 65535",
                opts.base_port
            )));
        }
        std::fs::create_dir_all(&opts.dir)
            .map_err(|e| TestnetError::io(format!("creating {}", opts.dir.display()), e))?;
        let mut slots = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("hub-{i}");
            let data_dir = opts.dir.join(&name);
            let log = opts.dir.join(format!("{name}.log"));
            if !opts.keep {
                remove_dir(&data_dir)?;
                // A fresh federation starts a fresh log.
                if log.exists() {
                    std::fs::remove_file(&log)
                        .map_err(|e| TestnetError::io(format!("removing {}", log.display()), e))?;
                }
            }
            // `i < n <= MAX_HUBS` fits in u16, and the sum was checked above.
            let port = if opts.base_port == 0 {
                0
            } else {
                opts.base_port + i as u16
            };
            slots.push(Slot {
                name,
                data_dir,
                log,
                http_port: port,
                mesh_port: port,
                info: None,
                running: None,
            });
        }
        let mut net = Testnet {
            opts,
            http: http_client()?,
            slots,
            groups: None,
            formed_in: Duration::ZERO,
        };
        let t0 = Instant::now();
        for i in 0..n {
            if let Err(e) = net.launch(i).await {
                net.shutdown_ref().await;
                return Err(e);
            }
        }
        let timeout = net.opts.ready_timeout;
        if let Err(e) = net.wait_ready(timeout).await {
            net.shutdown_ref().await;
            return Err(e);
        }
        net.formed_in = t0.elapsed();
        Ok(net)
    }

    /// How long [`Testnet::start`] took from the first spawn until every hub
    /// saw every other.
    pub fn formed_in(&self) -> Duration {
        self.formed_in
    }

    /// The options it runs with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Number of hubs (running or stopped).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether it has no hubs (never: `start` needs at least one).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Where hub `i` is (also while stopped: its last addresses).
    pub fn info(&self, i: usize) -> Result<&HubInfo, TestnetError> {
        self.slot(i)?
            .info
            .as_ref()
            .ok_or_else(|| TestnetError::Invalid(format!("hub {i} never started")))
    }

    /// Every hub's [`HubInfo`], in order.
    pub fn infos(&self) -> Vec<HubInfo> {
        self.slots.iter().filter_map(|s| s.info.clone()).collect()
    }

    /// Whether hub `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.slots.get(i).is_some_and(|s| s.running.is_some())
    }

    /// Indexes of the running hubs.
    pub fn running(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.is_running(i))
            .collect()
    }

    /// A client of hub `i`'s facade.
    pub fn client(&self, i: usize) -> Result<HubClient, TestnetError> {
        Ok(HubClient::new(
            self.http.clone(),
            self.info(i)?.http.clone(),
        ))
    }

    /// Process id of hub `i` (process mode, while running).
    pub fn pid(&self, i: usize) -> Option<u32> {
        match self.slots.get(i)?.running.as_ref()? {
            Running::Process(p) => Some(p.pid()),
            Running::InProcess(_) => None,
        }
    }

    /// Resident memory of hub `i`'s process, bytes (process mode, Linux).
    pub fn rss_bytes(&self, i: usize) -> Option<u64> {
        match self.slots.get(i)?.running.as_ref()? {
            Running::Process(p) => p.rss_bytes(),
            Running::InProcess(_) => None,
        }
    }

    /// Hub `i`'s log file.
    pub fn log_path(&self, i: usize) -> Option<&Path> {
        self.slots.get(i).map(|s| s.log.as_path())
    }

    fn slot(&self, i: usize) -> Result<&Slot, TestnetError> {
        self.slots.get(i).ok_or_else(|| {
            TestnetError::Invalid(format!("no hub {i} (testnet has {})", self.slots.len()))
        })
    }

    fn same_group(&self, a: usize, b: usize) -> bool {
        self.groups.as_ref().is_none_or(|g| g[a] == g[b])
    }

    /// PeerIds hub `i` must refuse under the current partition.
    fn blocked_for(&self, i: usize) -> Vec<String> {
        (0..self.slots.len())
            .filter(|&j| j != i && !self.same_group(i, j))
            .filter_map(|j| self.slots[j].info.as_ref().map(|h| h.peer.clone()))
            .collect()
    }

    /// Starts hub `i` (not running), bootstrapping from the running hubs it may reach.
    async fn launch(&mut self, i: usize) -> Result<(), TestnetError> {
        let bootstrap: Vec<String> = self
            .running()
            .into_iter()
            .filter(|&j| j != i && self.same_group(i, j))
            .filter_map(|j| self.slots[j].info.as_ref().map(|h| h.mesh.clone()))
            .collect();
        // A port just released (a stopped in-process hub's QUIC socket, a
        // killed process's listener) can take a moment to be free again.
        let deadline = Instant::now() + REBIND_WAIT;
        let (running, info) = loop {
            match self.spawn_once(i, &bootstrap).await {
                Ok(r) => break r,
                Err(e) if Instant::now() < deadline && self.slots[i].info.is_some() => {
                    tracing::debug!(hub = i, error = %e, "restart failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let slot = &mut self.slots[i];
        // Keep the ports picked on first start, so a restarted hub is where
        // its peers remember it.
        if slot.http_port == 0 {
            slot.http_port = http_port_of(&info.http).unwrap_or(0);
        }
        if slot.mesh_port == 0 {
            slot.mesh_port = mesh_port_of(&info.mesh).unwrap_or(0);
        }
        tracing::info!(hub = %info.name, http = %info.http, peer = %info.peer, "hub started");
        slot.info = Some(info);
        slot.running = Some(running);
        if self.groups.is_some() {
            let blocked = self.blocked_for(i);
            self.client(i)?.set_blocked(&blocked).await?;
        }
        Ok(())
    }

    async fn spawn_once(
        &self,
        i: usize,
        bootstrap: &[String],
    ) -> Result<(Running, HubInfo), TestnetError> {
        let slot = &self.slots[i];
        Ok(match &self.opts.mode {
            Mode::Processes { bin } => {
                let mut env = vec![
                    ("HUBMESH_RATE_LIMITS".to_owned(), "off".to_owned()),
                    (
                        "HUBMESH_SYNC_INTERVAL_SECS".to_owned(),
                        self.opts.sync_interval.as_secs().max(1).to_string(),
                    ),
                    ("RUST_LOG".to_owned(), self.opts.rust_log.clone()),
                    // Log files and prefixed forwarding read better without colour codes.
                    ("NO_COLOR".to_owned(), "1".to_owned()),
                ];
                for (cluster, secret) in &self.opts.cluster_secrets {
                    env.push((
                        hubmesh_node::config::cluster_secret_var(cluster),
                        secret.clone(),
                    ));
                }
                let spec = SpawnSpec {
                    bin: bin.clone(),
                    name: slot.name.clone(),
                    data_dir: slot.data_dir.clone(),
                    log: slot.log.clone(),
                    http_port: slot.http_port,
                    mesh_port: slot.mesh_port,
                    federation: self.opts.federation.clone(),
                    bootstrap: bootstrap.to_vec(),
                    env,
                    forward_logs: self.opts.forward_logs,
                    ready_timeout: self.opts.ready_timeout,
                };
                let (p, info) = ProcHub::spawn(&spec).await?;
                (Running::Process(Box::new(p)), info)
            }
            Mode::InProcess => {
                let hub = Hub::spawn(self.in_process_config(slot, bootstrap)?).await?;
                let info = HubInfo {
                    name: slot.name.clone(),
                    http: format!("http://{}", hub.http_addr()),
                    mesh: hub.dial_addr(),
                    peer: hub.peer_id().to_string(),
                };
                (Running::InProcess(hub), info)
            }
        })
    }

    #[allow(clippy::field_reassign_with_default)] // Config has many fields; a few change
    fn in_process_config(&self, slot: &Slot, bootstrap: &[String]) -> Result<Config, TestnetError> {
        let mut c = Config::default();
        c.data_dir = slot.data_dir.clone();
        c.http = std::net::SocketAddr::from(([127, 0, 0, 1], slot.http_port));
        let listen = format!("/ip4/127.0.0.1/udp/{}/quic-v1", slot.mesh_port);
        c.mesh_listen = vec![
            listen
                .parse()
                .map_err(|e| TestnetError::Invalid(format!("{listen}: {e}")))?,
        ];
        c.bootstrap = bootstrap
            .iter()
            .map(|b| {
                b.parse()
                    .map_err(|e| TestnetError::Invalid(format!("{b}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        c.federation = self.opts.federation.clone();
        c.sync_interval = self.opts.sync_interval;
        c.rate_limits.enabled = false;
        for (cluster, secret) in &self.opts.cluster_secrets {
            let var = hubmesh_node::config::cluster_secret_var(cluster);
            let id = var.trim_start_matches("CLUSTER_SECRET_").to_owned();
            c.discovery.cluster_secrets.insert(id, secret.clone());
        }
        Ok(c)
    }

    /// Hub processes that exited on their own since the last call (crash,
    /// signal from outside), with their exit status; they count as stopped.
    pub fn reap_exited(&mut self) -> Vec<(String, String)> {
        let mut gone = Vec::new();
        for slot in &mut self.slots {
            let status = match slot.running.as_mut() {
                Some(Running::Process(p)) => p.try_exited(),
                _ => None,
            };
            if let Some(status) = status {
                slot.running = None;
                gone.push((slot.name.clone(), status.to_string()));
            }
        }
        gone
    }

    /// Stops hub `i` gracefully (SIGTERM / shutdown), keeping its data.
    pub async fn stop(&mut self, i: usize) -> Result<(), TestnetError> {
        let running = self
            .slots
            .get_mut(i)
            .ok_or_else(|| TestnetError::Invalid(format!("no hub {i}")))?
            .running
            .take();
        match running {
            None => Ok(()),
            Some(Running::Process(mut p)) => {
                let status = p.terminate(STOP_GRACE).await?;
                if !status.success() {
                    tracing::warn!(hub = i, %status, "hub exited uncleanly");
                }
                Ok(())
            }
            Some(Running::InProcess(h)) => {
                h.shutdown().await;
                Ok(())
            }
        }
    }

    /// `kill -9` of hub `i` (process mode only).
    pub async fn kill(&mut self, i: usize) -> Result<(), TestnetError> {
        if !matches!(self.opts.mode, Mode::Processes { .. }) {
            return Err(TestnetError::NeedsProcesses("kill -9"));
        }
        let running = self
            .slots
            .get_mut(i)
            .ok_or_else(|| TestnetError::Invalid(format!("no hub {i}")))?
            .running
            .take();
        if let Some(Running::Process(mut p)) = running {
            p.kill9().await?;
        }
        Ok(())
    }

    /// (Re)starts hub `i` from its data dir (same identity and records),
    /// stopping it first if it runs, and waits until it is connected to every
    /// hub it may reach under the current partition.
    pub async fn restart(&mut self, i: usize) -> Result<(), TestnetError> {
        self.slot(i)?;
        self.stop(i).await?;
        self.launch(i).await?;
        self.wait_ready(self.opts.ready_timeout).await
    }

    /// Splits the hubs into groups that cannot reach each other: every hub
    /// refuses and disconnects the hubs of other groups. Hubs in no group are
    /// isolated alone. Returns once the running hubs' connections match.
    pub async fn partition(&mut self, groups: &[Vec<usize>]) -> Result<(), TestnetError> {
        let n = self.slots.len();
        // Hubs in no group each get a group of their own.
        let mut of = vec![usize::MAX; n];
        for (g, members) in groups.iter().enumerate() {
            for &i in members {
                if i >= n {
                    return Err(TestnetError::Invalid(format!("no hub {i}")));
                }
                if of[i] != usize::MAX {
                    return Err(TestnetError::Invalid(format!("hub {i} is in two groups")));
                }
                of[i] = g;
            }
        }
        let mut next = groups.len();
        for g in &mut of {
            if *g == usize::MAX {
                *g = next;
                next += 1;
            }
        }
        self.groups = Some(of);
        self.apply_blocks().await?;
        self.wait_ready(self.opts.ready_timeout).await
    }

    /// Ends the partition: every hub unblocks every peer and redials at once.
    /// Returns once every running hub is connected to every other.
    pub async fn heal(&mut self) -> Result<(), TestnetError> {
        self.groups = None;
        self.apply_blocks().await?;
        self.wait_ready(self.opts.ready_timeout).await
    }

    async fn apply_blocks(&self) -> Result<(), TestnetError> {
        let mut calls = Vec::new();
        for i in self.running() {
            let client = self.client(i)?;
            let blocked = self.blocked_for(i);
            calls.push(async move { client.set_blocked(&blocked).await });
        }
        futures::future::try_join_all(calls).await.map(drop)
    }

    /// Waits until every running hub is connected to exactly the running
    /// hubs it may reach (all of them, or its partition group).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), TestnetError> {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = self.connectivity_gaps().await;
            match missing {
                Ok(gaps) if gaps.is_empty() => return Ok(()),
                Ok(gaps) if Instant::now() >= deadline => {
                    return Err(TestnetError::Timeout {
                        what: format!("mesh connectivity: {}", gaps.join("; ")),
                        after: timeout,
                    });
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }

    async fn connectivity_gaps(&self) -> Result<Vec<String>, TestnetError> {
        let running = self.running();
        let clients = running
            .iter()
            .map(|&i| self.client(i))
            .collect::<Result<Vec<_>, _>>()?;
        let seen = futures::future::try_join_all(clients.iter().map(|c| c.peers())).await?;
        let mut gaps = Vec::new();
        for (k, &i) in running.iter().enumerate() {
            let mut lacks = Vec::new();
            let mut extra = Vec::new();
            for &j in &running {
                if j == i {
                    continue;
                }
                let peer = &self.info(j)?.peer;
                let connected = seen[k].contains(peer);
                if self.same_group(i, j) && !connected {
                    lacks.push(j);
                } else if !self.same_group(i, j) && connected {
                    extra.push(j);
                }
            }
            if !lacks.is_empty() {
                gaps.push(format!("hub-{i} not connected to {lacks:?}"));
            }
            if !extra.is_empty() {
                gaps.push(format!(
                    "hub-{i} still connected across the partition to {extra:?}"
                ));
            }
        }
        Ok(gaps)
    }

    /// Waits until every running hub holds the same registry: equal live
    /// record counts per namespace, equal per-origin watermarks, and the same
    /// set of registrations (cluster, server, last seen, writing hub). Exact,
    /// not sampled. Returns how long it took.
    pub async fn wait_converged(&self, timeout: Duration) -> Result<Duration, TestnetError> {
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        loop {
            let why = match self.registry_states().await {
                Ok(states) => match first_difference(&states) {
                    None => return Ok(t0.elapsed()),
                    Some(why) => why,
                },
                Err(e) => e.to_string(),
            };
            tracing::debug!(elapsed_ms = t0.elapsed().as_millis() as u64, %why, "not converged yet");
            if Instant::now() >= deadline {
                return Err(TestnetError::Timeout {
                    what: format!("convergence: {why}"),
                    after: timeout,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The registry state of every running hub, in `running()` order.
    pub async fn registry_states(&self) -> Result<Vec<(usize, RegistryState)>, TestnetError> {
        let running = self.running();
        let clients = running
            .iter()
            .map(|&i| self.client(i))
            .collect::<Result<Vec<_>, _>>()?;
        let states =
            futures::future::try_join_all(clients.iter().map(|c| c.registry_state())).await?;
        Ok(running.into_iter().zip(states).collect())
    }

    async fn shutdown_ref(&mut self) {
        let mut stops = Vec::new();
        for slot in &mut self.slots {
            if let Some(r) = slot.running.take() {
                let name = slot.name.clone();
                stops.push(async move {
                    match r {
                        Running::Process(mut p) => {
                            if let Err(e) = p.terminate(STOP_GRACE).await {
                                tracing::warn!(hub = %name, error = %e, "stopping the hub failed");
                            }
                        }
                        Running::InProcess(h) => h.shutdown().await,
                    }
                });
            }
        }
        futures::future::join_all(stops).await;
    }

    /// Stops every hub gracefully, all at once; without `keep`, removes
    /// their data dirs (logs stay).
    pub async fn shutdown(mut self) -> Result<(), TestnetError> {
        self.shutdown_ref().await;
        if !self.opts.keep {
            for slot in &self.slots {
                remove_dir(&slot.data_dir)?;
            }
        }
        Ok(())
    }
}

impl Drop for Testnet {
    fn drop(&mut self) {
        // Processes die with their `Child` (kill_on_drop); in-process hubs stop.
        for slot in &self.slots {
            if let Some(Running::InProcess(h)) = &slot.running {
                h.cancel_token().cancel();
            }
        }
    }
}

fn remove_dir(dir: &Path) -> Result<(), TestnetError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TestnetError::io(format!("removing {}", dir.display()), e)),
    }
}

/// Why these states are not all equal (the first difference), or `None`.
pub(crate) fn first_difference(states: &[(usize, RegistryState)]) -> Option<String> {
    let (first_i, first) = states.first()?;
    for (i, s) in &states[1..] {
        if s.counts != first.counts {
            return Some(format!(
                "record counts differ: hub-{first_i} {:?}, hub-{i} {:?}",
                first.counts, s.counts
            ));
        }
        if s.watermarks != first.watermarks {
            return Some(format!(
                "watermarks differ: hub-{first_i} {:?}, hub-{i} {:?}",
                first.watermarks, s.watermarks
            ));
        }
        if s.servers != first.servers {
            let only_first = first.servers.difference(&s.servers).count();
            let only_other = s.servers.difference(&first.servers).count();
            return Some(format!(
                "registrations differ: {only_first} only at hub-{first_i}, {only_other} only at hub-{i}"
            ));
        }
    }
    None
}
