//! `hubmesh testnet bench`: benchmark scenarios against testnets it starts
//! (real hub processes, loopback only), and a report in Markdown and JSON.
//!
//! - registration propagation: register at one hub (rotating) → held by every
//!   other hub, p50/p99, for each testnet size (3, 10, 30 by default), with
//!   the time each testnet took to form its mesh and to converge;
//! - REST register and lookup throughput on one hub of a 3-hub testnet with
//!   64 concurrent clients (registrations gossip to the other two as usual);
//! - hub memory (RSS from `/proc/<pid>/status`) idle and under that load;
//! - cross-hub vs same-hub signal round trip ([`crate::bench::signal`]).
//!
//! Every loop is bounded in count and in time.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{HubClient, Registration};
use crate::error::TestnetError;
use crate::net::{Options, Testnet};

pub mod signal;

/// Cluster of the throughput registrations.
const LOAD_CLUSTER: &str = "load";
/// Cluster the lookup benchmark lists.
const LOOKUP_CLUSTER: &str = "lookup";
/// Servers registered in [`LOOKUP_CLUSTER`] before the lookup load.
const LOOKUP_SERVERS: u64 = 10;
/// Secret of every bench cluster.
const BENCH_SECRET: &str = "bench-secret";
/// Deadline for one propagation sample.
const SAMPLE_DEADLINE: Duration = Duration::from_secs(5);
/// Most propagation samples per size (each uses its own cluster, `p<i>`).
pub const MAX_SAMPLES: usize = 1000;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The `hubmesh` binary.
    pub bin: PathBuf,
    /// Data dirs and logs of the testnets.
    pub dir: PathBuf,
    /// Testnet sizes for propagation.
    pub sizes: Vec<usize>,
    /// Propagation samples per size.
    pub samples: usize,
    /// Concurrent clients of the throughput loads.
    pub clients: usize,
    /// Duration of each throughput load.
    pub load_time: Duration,
    /// Hard cap on requests of each throughput load.
    pub max_requests: u64,
    /// Report path without extension: writes `<out>.md` and `<out>.json`.
    pub out: PathBuf,
}

impl BenchOptions {
    /// The defaults of `hubmesh testnet bench`.
    pub fn new(bin: impl Into<PathBuf>, dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        BenchOptions {
            bin: bin.into(),
            out: dir.join("bench-report"),
            dir,
            sizes: vec![3, 10, 30],
            samples: 100,
            clients: 64,
            load_time: Duration::from_secs(5),
            max_requests: 200_000,
        }
    }
}

/// One figure of the report, beside its target.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// The value (`None`: not available, see `note`).
    pub value: Option<f64>,
    /// Unit.
    pub unit: String,
    /// Target and where it comes from.
    pub target: Option<String>,
    /// Whether the target is met.
    pub met: Option<bool>,
    /// How it was measured, or why it is missing.
    pub note: Option<String>,
}

impl Figure {
    fn new(name: impl Into<String>, value: Option<f64>, unit: &str) -> Self {
        Figure {
            name: name.into(),
            value,
            unit: unit.into(),
            target: None,
            met: None,
            note: None,
        }
    }

    fn target(mut self, target: &str, met: Option<bool>) -> Self {
        self.target = Some(target.into());
        self.met = met;
        self
    }

    fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

/// Propagation at one testnet size.
#[derive(Debug, Clone, Serialize)]
pub struct Propagation {
    /// Hubs.
    pub hubs: usize,
    /// Start of the first hub → every hub connected to every other, ms.
    pub formed_ms: f64,
    /// Last sample written → every hub holds the same registry, ms.
    pub converged_ms: Option<f64>,
    /// Samples taken.
    pub samples: usize,
    /// Samples not visible everywhere within 5 s.
    pub timed_out: usize,
    /// Register request sent → held by every other hub: p50, ms.
    pub p50_ms: Option<f64>,
    /// Same, p99, ms.
    pub p99_ms: Option<f64>,
    /// Same, max, ms.
    pub max_ms: Option<f64>,
    /// Register answered (durable ack) p50, ms.
    pub ack_p50_ms: Option<f64>,
    /// Poll period of each watching hub, ms (the resolution).
    pub poll_ms: f64,
    /// Mean RSS of the hubs right after the mesh formed, MiB.
    pub rss_mean_mib: Option<f64>,
}

/// A throughput load.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// `register` or `lookup`.
    pub op: String,
    /// Concurrent clients.
    pub clients: usize,
    /// 2xx answers.
    pub ok: u64,
    /// Other answers and failures.
    pub errors: u64,
    /// Seconds measured.
    pub secs: f64,
    /// 2xx answers per second.
    pub per_sec: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// When it ran (RFC 3339).
    pub started: String,
    /// Available cores.
    pub cores: usize,
    /// `release` or `debug` (of this binary, hence of the hubs).
    pub build: String,
    /// hubmesh version.
    pub version: String,
    /// Every figure beside its target.
    pub figures: Vec<Figure>,
    /// Propagation per size.
    pub propagation: Vec<Propagation>,
    /// Throughput loads.
    pub throughput: Vec<Throughput>,
    /// Signal round trips.
    pub signal: signal::SignalResult,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn testnet_options(opts: &BenchOptions, name: &str, samples: usize) -> Options {
    let mut o = Options::processes(&opts.bin, opts.dir.join(name));
    // Production anti-entropy period: propagation is measured on the gossip path.
    o.sync_interval = Duration::from_secs(30);
    o.ready_timeout = Duration::from_secs(120);
    o.federation = format!("bench-{name}");
    for s in 0..samples {
        o.cluster_secrets
            .push((format!("p{s}"), BENCH_SECRET.into()));
    }
    o.cluster_secrets
        .push((LOAD_CLUSTER.into(), BENCH_SECRET.into()));
    o.cluster_secrets
        .push((LOOKUP_CLUSTER.into(), BENCH_SECRET.into()));
    o
}

/// Runs every scenario, writes `<out>.md` and `<out>.json`, returns the report.
pub async fn run(opts: &BenchOptions) -> Result<BenchReport, TestnetError> {
    if opts.samples == 0 || opts.samples > MAX_SAMPLES {
        return Err(TestnetError::Invalid(format!(
            "samples must be 1..={MAX_SAMPLES}"
        )));
    }
    if opts.clients == 0 || opts.clients > 1024 {
        return Err(TestnetError::Invalid("clients must be 1..=1024".into()));
    }
    let started = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut figures = Vec::new();
    let mut propagation = Vec::new();
    let mut throughput = Vec::new();

    // Throughput, memory and same/cross-hub signal on a 3-hub testnet.
    eprintln!("bench: 3-hub testnet for throughput, memory and signal round trips");
    let net = Testnet::start(3, testnet_options(opts, "load", 0)).await?;
    let loaded = load_scenarios(&net, opts).await;
    let sig = signal::run(&net).await;
    let stopped = stop(net).await;
    let (tp, rss) = loaded?;
    stopped?;
    for t in &tp {
        let target = match t.op.as_str() {
            "register" => Some(("≥ 5000 req/s, one hub, 64 clients (issue 4)", 5000.0)),
            "lookup" => Some(("≥ 30000 req/s, one hub, 64 clients (issue 4)", 30000.0)),
            _ => None,
        };
        let reference = if target.is_none() {
            "; reference: the cheapest route with the same client"
        } else {
            ""
        };
        let mut f = Figure::new(
            format!("REST {} throughput", t.op),
            Some(t.per_sec),
            "req/s",
        )
        .note(format!(
            "{} clients, {:.1} s, {} ok, {} errors, hub 0 of 3{reference}",
            t.clients, t.secs, t.ok, t.errors
        ));
        if let Some((text, min)) = target {
            f = f.target(text, Some(t.per_sec >= min));
        }
        figures.push(f);
    }
    throughput.extend(tp);
    figures.push(
        Figure::new(
            "hub RSS idle",
            rss.idle.map(|b| b as f64 / 1048576.0),
            "MiB",
        )
        .note("hub 0 of 3, after the mesh formed, before any load"),
    );
    figures.push(
        Figure::new(
            "hub RSS under load (peak)",
            rss.peak.map(|b| b as f64 / 1048576.0),
            "MiB",
        )
        .note("hub 0, sampled every 100 ms during the register and lookup loads"),
    );
    figures.extend(sig.figures());

    for &n in &opts.sizes {
        eprintln!("bench: propagation at {n} hubs ({} samples)", opts.samples);
        let name = format!("prop{n}");
        let net = Testnet::start(n, testnet_options(opts, &name, opts.samples)).await?;
        let p = propagate(&net, opts.samples).await;
        let stopped = stop(net).await;
        let p = p?;
        stopped?;
        figures.push(
            Figure::new(format!("propagation p50, {n} hubs"), p.p50_ms, "ms").note(format!(
                "register sent → held by all {} other hubs; {} samples, poll {:.0} ms",
                n - 1,
                p.samples,
                p.poll_ms
            )),
        );
        figures.push(
            Figure::new(format!("propagation p99, {n} hubs"), p.p99_ms, "ms").target(
                "< 50 ms (issue 4)",
                p.p99_ms.map(|v| v < 50.0 && p.timed_out == 0),
            ),
        );
        figures.push(
            Figure::new(format!("mesh formed, {n} hubs"), Some(p.formed_ms), "ms").note(
                "first spawn → every hub connected to every other (hubs started one after another)",
            ),
        );
        figures.push(
            Figure::new(
                format!("converged after writes, {n} hubs"),
                p.converged_ms,
                "ms",
            )
            .note("last sample written → equal counts, watermarks and registrations on every hub"),
        );
        figures.push(
            Figure::new(
                format!("hub RSS idle, mean of {n} hubs"),
                p.rss_mean_mib,
                "MiB",
            )
            .note("right after the mesh formed"),
        );
        propagation.push(p);
    }

    let report = BenchReport {
        started,
        cores,
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
        version: env!("CARGO_PKG_VERSION").into(),
        figures,
        propagation,
        throughput,
        signal: sig,
    };
    write_report(&report, &opts.out)?;
    Ok(report)
}

async fn stop(net: Testnet) -> Result<(), TestnetError> {
    net.shutdown().await
}

/// RSS of hub 0.
#[derive(Debug, Default)]
struct Rss {
    idle: Option<u64>,
    peak: Option<u64>,
}

async fn load_scenarios(
    net: &Testnet,
    opts: &BenchOptions,
) -> Result<(Vec<Throughput>, Rss), TestnetError> {
    let hub = net.client(0)?;
    // Settle: the mesh just formed; let the first sync rounds finish.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut rss = Rss {
        idle: net.rss_bytes(0),
        peak: None,
    };
    let pid = net.pid(0);
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            let Some(pid) = pid else { return };
            loop {
                if let Some(b) = crate::process::rss_bytes(pid) {
                    peak.fetch_max(b, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let result = async {
        let register = load(&hub, "register", opts, {
            move |client: &HubClient, n: u64| {
                let client = client.clone();
                async move {
                    let reg = Registration::new(LOAD_CLUSTER, BENCH_SECRET, 0x10ad, n)?;
                    client.register(&reg).await.map(drop)
                }
            }
        })
        .await?;
        let mut token = String::new();
        for n in 0..LOOKUP_SERVERS {
            let reg = Registration::new(LOOKUP_CLUSTER, BENCH_SECRET, 0x100c, n)?;
            token = hub.register(&reg).await?;
        }
        let token = Arc::new(token);
        let lookup = load(&hub, "lookup", opts, move |client: &HubClient, _n: u64| {
            let (client, token) = (client.clone(), token.clone());
            async move {
                client
                    .lookup_cluster(LOOKUP_CLUSTER, &token)
                    .await
                    .map(drop)
            }
        })
        .await?;
        // The same loop on the cheapest route: what this client and the HTTP
        // stack manage on this machine, to read the two figures above against.
        let root = load(&hub, "GET /", opts, |client: &HubClient, _n: u64| {
            let client = client.clone();
            async move { client.root().await }
        })
        .await?;
        Ok::<_, TestnetError>(vec![register, lookup, root])
    }
    .await;
    sampler.abort();
    let p = peak.load(Ordering::Relaxed);
    rss.peak = (p > 0).then_some(p);
    Ok((result?, rss))
}

/// `clients` loops sending `op(n)` until `load_time` passes or
/// `max_requests` were sent.
async fn load<F, Fut>(
    hub: &HubClient,
    name: &str,
    opts: &BenchOptions,
    op: F,
) -> Result<Throughput, TestnetError>
where
    F: Fn(&HubClient, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), TestnetError>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + opts.load_time;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..opts.clients {
        let (op, next, ok, errors, hub) = (
            op.clone(),
            next.clone(),
            ok.clone(),
            errors.clone(),
            hub.clone(),
        );
        let max = opts.max_requests;
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= max {
                    break;
                }
                match op(&hub, n).await {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let secs = start.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    Ok(Throughput {
        op: name.into(),
        clients: opts.clients,
        ok,
        errors: errors.load(Ordering::Relaxed),
        secs,
        per_sec: ok as f64 / secs,
    })
}

/// Registration propagation: `samples` writes, one at a time, each at hub
/// `s % n` into its own cluster `p<s>`; every other hub is polled (its own
/// store, no DHT) until it holds the write.
async fn propagate(net: &Testnet, samples: usize) -> Result<Propagation, TestnetError> {
    let n = net.len();
    let rss: Vec<u64> = (0..n).filter_map(|i| net.rss_bytes(i)).collect();
    let rss_mean_mib =
        (!rss.is_empty()).then(|| rss.iter().sum::<u64>() as f64 / rss.len() as f64 / 1048576.0);
    let clients: Vec<HubClient> = (0..n).map(|i| net.client(i)).collect::<Result<_, _>>()?;
    // Polling load grows with the hubs watched; keep it near 2-3k requests/s.
    let poll = Duration::from_micros((200 * n as u64).max(1000));
    let mut all = Vec::new();
    let mut acks = Vec::new();
    let mut timed_out = 0;
    for s in 0..samples {
        let writer = s % n;
        let cluster = format!("p{s}");
        let reg = Registration::new(&cluster, BENCH_SECRET, 0x9e0, s as u64)?;
        let t0 = Instant::now();
        clients[writer].register(&reg).await?;
        acks.push(ms(t0.elapsed()));
        let watchers = clients
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != writer)
            .map(|(_, c)| {
                let cluster = cluster.clone();
                async move {
                    loop {
                        if let Ok(list) = c.servers(Some(&cluster)).await
                            && !list.is_empty()
                        {
                            return Some(t0.elapsed());
                        }
                        if t0.elapsed() > SAMPLE_DEADLINE {
                            return None;
                        }
                        tokio::time::sleep(poll).await;
                    }
                }
            });
        let seen = futures::future::join_all(watchers).await;
        if seen.iter().any(Option::is_none) {
            timed_out += 1;
        } else if let Some(max) = seen.into_iter().flatten().max() {
            all.push(ms(max));
        }
    }
    let written = Instant::now();
    let converged_ms = net
        .wait_converged(Duration::from_secs(90))
        .await
        .ok()
        .map(|_| ms(written.elapsed()));
    all.sort_by(f64::total_cmp);
    acks.sort_by(f64::total_cmp);
    Ok(Propagation {
        hubs: n,
        formed_ms: ms(net.formed_in()),
        converged_ms,
        samples,
        timed_out,
        p50_ms: percentile(&all, 50.0),
        p99_ms: percentile(&all, 99.0),
        max_ms: all.last().copied(),
        ack_p50_ms: percentile(&acks, 50.0),
        poll_ms: ms(poll),
        rss_mean_mib,
    })
}

fn fmt_value(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// The report as Markdown.
pub fn markdown(r: &BenchReport) -> String {
    let mut md = String::new();
    md.push_str("# hubmesh testnet bench\n\n");
    md.push_str(&format!(
        "Run {} · {} cores · {} build · hubmesh {} · loopback, real hub processes\n\n",
        r.started, r.cores, r.build, r.version
    ));
    md.push_str("| figure | value | unit | target | met | how |\n|---|---|---|---|---|---|\n");
    for f in &r.figures {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            f.name,
            fmt_value(f.value),
            f.unit,
            f.target.as_deref().unwrap_or(""),
            match f.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            },
            f.note.as_deref().unwrap_or("")
        ));
    }
    md.push_str("\n## Propagation\n\n| hubs | formed ms | samples | timed out | p50 ms | p99 ms | max ms | ack p50 ms | converged ms | poll ms | RSS mean MiB |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for p in &r.propagation {
        md.push_str(&format!(
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} |\n",
            p.hubs,
            p.formed_ms,
            p.samples,
            p.timed_out,
            fmt_value(p.p50_ms),
            fmt_value(p.p99_ms),
            fmt_value(p.max_ms),
            fmt_value(p.ack_p50_ms),
            fmt_value(p.converged_ms),
            p.poll_ms,
            fmt_value(p.rss_mean_mib)
        ));
    }
    md.push_str("\n## Throughput\n\n| op | clients | ok | errors | s | req/s |\n|---|---|---|---|---|---|\n");
    for t in &r.throughput {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.0} |\n",
            t.op, t.clients, t.ok, t.errors, t.secs, t.per_sec
        ));
    }
    md.push_str(&format!(
        "\n## Signal round trip\n\n{}\n",
        r.signal.summary()
    ));
    md
}

/// Writes `<out>.md` and `<out>.json`.
pub fn write_report(
    r: &BenchReport,
    out: &std::path::Path,
) -> Result<(PathBuf, PathBuf), TestnetError> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| TestnetError::io(format!("creating {}", dir.display()), e))?;
    }
    let md_path = out.with_extension("md");
    let json_path = out.with_extension("json");
    std::fs::write(&md_path, markdown(r))
        .map_err(|e| TestnetError::io(format!("writing {}", md_path.display()), e))?;
    let json = serde_json::to_string_pretty(r)
        .map_err(|e| TestnetError::Invalid(format!("encoding the report: {e}")))?;
    std::fs::write(&json_path, json + "\n")
        .map_err(|e| TestnetError::io(format!("writing {}", json_path.display()), e))?;
    Ok((md_path, json_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
