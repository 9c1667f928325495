//! Chaos scenarios against a running [`Testnet`]: writes (Discovery
//! registrations) go on while hubs crash, restart or are cut apart; each
//! scenario ends with the exact convergence check and a verdict.
//!
//! - [`Scenario::Kill9`]: `kill -9` one hub during writes, restart it;
//! - [`Scenario::Partition`]: split the hubs into two groups, write on both
//!   sides, check the sides really diverged, heal;
//! - [`Scenario::Rolling`]: restart every hub in turn (rolling upgrade).
//!
//! Counted: written (requests sent), acknowledged (2xx: stored durably),
//! found on every hub afterwards, acknowledged-but-missing (must be 0), and
//! the time from the end of the last fault to convergence.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

use crate::client::{HubClient, Registration};
use crate::error::TestnetError;
use crate::net::Testnet;
use crate::{CLUSTER, CLUSTER_SECRET};

/// A chaos scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// `kill -9` a hub during writes, then restart it.
    Kill9,
    /// Two groups, writes on both sides, then heal.
    Partition,
    /// Restart every hub in turn during writes.
    Rolling,
}

impl Scenario {
    /// Every scenario, in the order `hubmesh testnet chaos` runs them.
    pub const ALL: [Scenario; 3] = [Scenario::Kill9, Scenario::Partition, Scenario::Rolling];

    /// The scenario's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Kill9 => "kill9",
            Scenario::Partition => "partition",
            Scenario::Rolling => "rolling",
        }
    }
}

impl std::str::FromStr for Scenario {
    type Err = TestnetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scenario::ALL
            .into_iter()
            .find(|sc| sc.name() == s)
            .ok_or_else(|| {
                TestnetError::Invalid(format!(
                    "unknown scenario {s:?} (kill9, partition, rolling)"
                ))
            })
    }
}

/// Knobs of a chaos run. Defaults keep one scenario within ~15 s on 3-4 hubs.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Concurrent writers.
    pub writers: usize,
    /// Pause of each writer between two writes.
    pub pace: Duration,
    /// Acknowledged writes to wait for between two fault steps.
    pub step_writes: u64,
    /// Hard cap on writes per scenario.
    pub max_writes: u64,
    /// Deadline for each wait (writes, convergence).
    pub timeout: Duration,
}

impl Default for ChaosOptions {
    fn default() -> Self {
        ChaosOptions {
            writers: 4,
            pace: Duration::from_millis(10),
            step_writes: 40,
            max_writes: 5_000,
            timeout: Duration::from_secs(60),
        }
    }
}

/// The outcome of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    /// Scenario name.
    pub scenario: String,
    /// Hubs in the testnet.
    pub hubs: usize,
    /// Registrations sent.
    pub written: u64,
    /// Answered 2xx (durably stored at the hub that answered).
    pub acknowledged: u64,
    /// Acknowledged and held by every hub afterwards.
    pub found_everywhere: u64,
    /// Acknowledged but missing on at least one hub afterwards (must be 0).
    pub acknowledged_missing: u64,
    /// Every hub held the same registry within the deadline.
    pub converged: bool,
    /// From the end of the last fault (and the last write) to convergence.
    pub converge_ms: Option<f64>,
    /// Partition only: each side held writes the other lacked before the heal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diverged_before_heal: Option<bool>,
    /// `PASS` or `FAIL`.
    pub verdict: String,
    /// Why it failed, and anything else worth knowing.
    pub notes: Vec<String>,
}

impl ChaosReport {
    /// Whether the verdict is `PASS`.
    pub fn passed(&self) -> bool {
        self.verdict == "PASS"
    }

    /// One human-readable line.
    pub fn line(&self) -> String {
        format!(
            "{:<9} {} hubs: written {}, acknowledged {}, found everywhere {}, acknowledged-but-missing {}, converged {} ({}){} → {}{}",
            self.scenario,
            self.hubs,
            self.written,
            self.acknowledged,
            self.found_everywhere,
            self.acknowledged_missing,
            self.converged,
            self.converge_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0} ms")),
            self.diverged_before_heal
                .map_or_else(String::new, |d| format!(", diverged before heal {d}")),
            self.verdict,
            if self.notes.is_empty() {
                String::new()
            } else {
                format!(" [{}]", self.notes.join("; "))
            }
        )
    }
}

/// Background writers: registrations round-robin over fixed hub URLs (ports
/// survive restarts), until stopped or `max` are sent.
struct Writers {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    acked: Arc<std::sync::Mutex<Vec<(usize, String)>>>,
    tasks: JoinSet<()>,
}

impl Writers {
    fn start(targets: Vec<(usize, HubClient)>, tag: u32, opts: &ChaosOptions) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let targets = Arc::new(targets);
        let mut tasks = JoinSet::new();
        for _ in 0..opts.writers.max(1) {
            let (stop, written, acked, targets) = (
                stop.clone(),
                written.clone(),
                acked.clone(),
                targets.clone(),
            );
            let (pace, max) = (opts.pace, opts.max_writes);
            tasks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let n = written.fetch_add(1, Ordering::Relaxed);
                    if n >= max {
                        written.fetch_sub(1, Ordering::Relaxed);
                        break;
                    }
                    let (hub, client) = &targets[(n as usize) % targets.len()];
                    let reg = match Registration::new(CLUSTER, CLUSTER_SECRET, tag, n) {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, "building a registration");
                            break;
                        }
                    };
                    if client.register(&reg).await.is_ok()
                        && let Ok(mut a) = acked.lock()
                    {
                        a.push((*hub, reg.server_id));
                    }
                    tokio::time::sleep(pace).await;
                }
            });
        }
        Writers {
            stop,
            written,
            acked,
            tasks,
        }
    }

    fn acked_count(&self) -> u64 {
        self.acked.lock().map(|a| a.len() as u64).unwrap_or(0)
    }

    /// Waits until `more` further writes were acknowledged.
    async fn wait_acked(&self, more: u64, timeout: Duration) -> Result<(), TestnetError> {
        let target = self.acked_count() + more;
        let deadline = Instant::now() + timeout;
        while self.acked_count() < target {
            if Instant::now() >= deadline {
                return Err(TestnetError::Timeout {
                    what: format!("{target} acknowledged writes (have {})", self.acked_count()),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until `more` further writes were sent (acknowledged or not).
    async fn wait_written(&self, more: u64, timeout: Duration) -> Result<(), TestnetError> {
        let target = self.written.load(Ordering::Relaxed) + more;
        let deadline = Instant::now() + timeout;
        while self.written.load(Ordering::Relaxed) < target {
            if Instant::now() >= deadline {
                return Err(TestnetError::Timeout {
                    what: format!("{target} writes sent"),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops the writers; returns (written, acknowledged (hub, server id)).
    async fn finish(mut self) -> (u64, Vec<(usize, String)>) {
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        let acked = self.acked.lock().map(|a| a.clone()).unwrap_or_default();
        (self.written.load(Ordering::Relaxed), acked)
    }
}

fn targets(net: &Testnet) -> Result<Vec<(usize, HubClient)>, TestnetError> {
    (0..net.len()).map(|i| Ok((i, net.client(i)?))).collect()
}

/// Runs one scenario on `net` (all hubs running, healed). `tag` keeps this
/// run's keys apart from earlier ones on the same testnet.
pub async fn run(
    net: &mut Testnet,
    scenario: Scenario,
    opts: &ChaosOptions,
    tag: u32,
) -> Result<ChaosReport, TestnetError> {
    let n = net.len();
    if n < 2 {
        return Err(TestnetError::Invalid("chaos needs at least 2 hubs".into()));
    }
    let mut notes = Vec::new();
    let mut diverged = None;
    let writers;
    match scenario {
        Scenario::Kill9 => {
            let victim = n - 1;
            writers = Writers::start(targets(net)?, tag, opts);
            writers.wait_acked(opts.step_writes, opts.timeout).await?;
            net.kill(victim).await?;
            // Writes go on; those sent to the dead hub fail (not acknowledged).
            writers.wait_written(opts.step_writes, opts.timeout).await?;
            net.restart(victim).await?;
            writers.wait_acked(opts.step_writes, opts.timeout).await?;
        }
        Scenario::Partition => {
            let half = n / 2;
            let (a, b): (Vec<usize>, Vec<usize>) = ((0..half).collect(), (half..n).collect());
            net.partition(&[a.clone(), b.clone()]).await?;
            writers = Writers::start(targets(net)?, tag, opts);
            writers
                .wait_acked(2 * opts.step_writes, opts.timeout)
                .await?;
            // Each side must hold acknowledged writes the other lacks: proof
            // the partition was real, not a formality.
            let acked: Vec<(usize, String)> =
                writers.acked.lock().map(|v| v.clone()).unwrap_or_default();
            let side_a = net.client(a[0])?.servers(Some(CLUSTER)).await?;
            let side_b = net.client(b[0])?.servers(Some(CLUSTER)).await?;
            let ids = |s: &BTreeSet<crate::ServerEntry>| -> BTreeSet<String> {
                s.iter().map(|e| e.server_id.clone()).collect()
            };
            let (ids_a, ids_b) = (ids(&side_a), ids(&side_b));
            let a_only = acked
                .iter()
                .any(|(h, id)| a.contains(h) && ids_a.contains(id) && !ids_b.contains(id));
            let b_only = acked
                .iter()
                .any(|(h, id)| b.contains(h) && ids_b.contains(id) && !ids_a.contains(id));
            diverged = Some(a_only && b_only);
            if !(a_only && b_only) {
                notes.push("the sides did not diverge: the partition did not isolate".into());
            }
            let (written, acked) = writers.finish().await;
            // Convergence time counts from the heal command: reconnecting is part of it.
            let fault_end = Instant::now();
            net.heal().await?;
            return finish(
                net, scenario, written, acked, fault_end, diverged, notes, opts,
            )
            .await;
        }
        Scenario::Rolling => {
            writers = Writers::start(targets(net)?, tag, opts);
            writers
                .wait_acked(opts.step_writes / 2, opts.timeout)
                .await?;
            for i in 0..n {
                net.restart(i).await?;
                writers
                    .wait_acked(opts.step_writes / 2, opts.timeout)
                    .await?;
            }
        }
    }
    let (written, acked) = writers.finish().await;
    // The last fault is over before the last write: count from the last write.
    let fault_end = Instant::now();
    finish(
        net, scenario, written, acked, fault_end, diverged, notes, opts,
    )
    .await
}

#[allow(clippy::too_many_arguments)] // one call site per scenario shape
async fn finish(
    net: &Testnet,
    scenario: Scenario,
    written: u64,
    acked: Vec<(usize, String)>,
    fault_end: Instant,
    diverged: Option<bool>,
    mut notes: Vec<String>,
    opts: &ChaosOptions,
) -> Result<ChaosReport, TestnetError> {
    let converged = match net.wait_converged(opts.timeout).await {
        Ok(_) => true,
        Err(e) => {
            notes.push(e.to_string());
            false
        }
    };
    let converge_ms = converged.then(|| fault_end.elapsed().as_secs_f64() * 1000.0);
    let mut found = BTreeSet::new();
    let mut first = true;
    for i in net.running() {
        let held: BTreeSet<String> = net
            .client(i)?
            .servers(Some(CLUSTER))
            .await?
            .into_iter()
            .map(|e| e.server_id)
            .collect();
        let here: BTreeSet<String> = acked
            .iter()
            .filter(|(_, id)| held.contains(id))
            .map(|(_, id)| id.clone())
            .collect();
        found = if first { here } else { &found & &here };
        first = false;
    }
    let acknowledged = acked.len() as u64;
    let found_everywhere = found.len() as u64;
    let missing = acknowledged - found_everywhere;
    if net.running().len() != net.len() {
        notes.push(format!(
            "only {} of {} hubs running",
            net.running().len(),
            net.len()
        ));
    }
    if acknowledged == 0 {
        notes.push("nothing was acknowledged".into());
    }
    let pass = converged
        && missing == 0
        && acknowledged > 0
        && diverged.unwrap_or(true)
        && net.running().len() == net.len();
    Ok(ChaosReport {
        scenario: scenario.name().into(),
        hubs: net.len(),
        written,
        acknowledged,
        found_everywhere,
        acknowledged_missing: missing,
        converged,
        converge_ms,
        diverged_before_heal: diverged,
        verdict: if pass { "PASS" } else { "FAIL" }.into(),
        notes,
    })
}
