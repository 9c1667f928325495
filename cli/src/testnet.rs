//! `hubmesh testnet up|chaos|bench`: a local federation in one command, with
//! faults and benchmarks. Thin: parses flags, builds the library's options,
//! wires Ctrl-C / SIGTERM, prints. Everything else is `hubmesh-testnet`
//! (see `specs/testnet.md`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use hubmesh_testnet::bench::{BenchOptions, markdown};
use hubmesh_testnet::chaos::{self, ChaosOptions, Scenario};
use hubmesh_testnet::up::{self, Listing};
use hubmesh_testnet::{Options, Testnet};

#[derive(Debug, Subcommand)]
pub enum TestnetCmd {
    /// Start N hub processes on loopback, print where they are, stop them on Ctrl-C.
    Up {
        #[command(flatten)]
        net: NetArgs,
        /// Hubs to start.
        #[arg(long, default_value_t = 3)]
        hubs: usize,
        /// Hub i listens on HTTP 127.0.0.1:(P+i) and QUIC udp/(P+i); 0 picks free ports.
        #[arg(long, default_value_t = 7000)]
        base_port: u16,
        /// Print one JSON object per hub per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Keep the data dirs at exit, and reuse them at start (same federation again).
        #[arg(long)]
        keep: bool,
        /// Do not forward the hubs' logs to stderr (they are still kept in DIR).
        #[arg(long)]
        quiet: bool,
        /// Anti-entropy period of the hubs, seconds.
        #[arg(long, default_value_t = 5)]
        sync_interval_secs: u64,
    },
    /// Start a testnet and run the chaos scenarios against it; exit 1 on a FAIL.
    Chaos {
        #[command(flatten)]
        net: NetArgs,
        /// Hubs to start (at least 2; the partition splits them in two halves).
        #[arg(long, default_value_t = 4)]
        hubs: usize,
        /// Scenario to run (kill9, partition, rolling); repeat for several; default all.
        #[arg(long = "scenario")]
        scenarios: Vec<String>,
        /// One JSON report per scenario per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the benchmark scenarios and write a Markdown and a JSON report.
    Bench {
        #[command(flatten)]
        net: NetArgs,
        /// Testnet sizes for the propagation benchmark (comma list).
        #[arg(long, value_delimiter = ',', default_value = "3,10,30")]
        sizes: Vec<usize>,
        /// Propagation samples per size.
        #[arg(long, default_value_t = 100)]
        samples: usize,
        /// Concurrent clients of the throughput loads.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Seconds of each throughput load.
        #[arg(long, default_value_t = 5)]
        load_secs: u64,
        /// Report path without extension (default DIR/bench-report): writes .md and .json.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct NetArgs {
    /// Directory for the hubs' data dirs (hub-N/) and logs (hub-N.log).
    #[arg(long, default_value = "hubmesh-testnet")]
    dir: PathBuf,
    /// Federation name.
    #[arg(long, default_value = "testnet")]
    federation: String,
    /// The hubmesh binary the hubs run (default: this one).
    #[arg(long, env = "HUBMESH_BIN")]
    bin: Option<PathBuf>,
}

impl NetArgs {
    fn bin(&self) -> anyhow::Result<PathBuf> {
        match &self.bin {
            Some(b) => Ok(b.clone()),
            None => std::env::current_exe().context("locating the hubmesh binary"),
        }
    }

    fn options(&self) -> anyhow::Result<Options> {
        let mut o = Options::processes(self.bin()?, &self.dir);
        o.federation = self.federation.clone();
        Ok(o)
    }
}

/// Resolves on the first Ctrl-C (SIGINT) or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                eprintln!("testnet: no SIGTERM handler ({e}); Ctrl-C still works");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

pub async fn run(cmd: TestnetCmd) -> anyhow::Result<()> {
    // The library's own events (stop timeouts, retries) go to stderr; RUST_LOG filters.
    hubmesh_node::init_tracing(hubmesh_node::config::LogFormat::Text);
    match cmd {
        TestnetCmd::Up {
            net,
            hubs,
            base_port,
            json,
            keep,
            quiet,
            sync_interval_secs,
        } => {
            let mut o = net.options()?;
            o.base_port = base_port;
            o.keep = keep;
            o.forward_logs = !quiet;
            o.rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
            o.sync_interval = Duration::from_secs(sync_interval_secs.max(1));
            // Operators export CLUSTER_SECRET_<ID> before `up` (the README
            // walk-through does): the hubs inherit the environment.
            let listing = if json { Listing::Json } else { Listing::Table };
            up::run(hubs, o, listing, stop_signal()).await?;
            Ok(())
        }
        TestnetCmd::Chaos {
            net,
            hubs,
            scenarios,
            json,
        } => {
            let scenarios: Vec<Scenario> = if scenarios.is_empty() {
                Scenario::ALL.to_vec()
            } else {
                scenarios
                    .iter()
                    .map(|s| s.parse())
                    .collect::<Result<_, _>>()?
            };
            let mut o = net.options()?;
            o.base_port = 0;
            eprintln!("chaos: starting {hubs} hubs in {}", net.dir.display());
            let mut testnet = Testnet::start(hubs, o).await?;
            let opts = ChaosOptions::default();
            let mut failed = 0;
            let mut outcome = Ok(());
            for (k, sc) in scenarios.into_iter().enumerate() {
                eprintln!("chaos: {}", sc.name());
                let tag = (std::process::id() << 4) ^ (k as u32 + 1);
                let report = tokio::select! {
                    r = chaos::run(&mut testnet, sc, &opts, tag) => r,
                    () = stop_signal() => {
                        outcome = Err(anyhow::anyhow!("interrupted"));
                        break;
                    }
                };
                match report {
                    Ok(r) => {
                        if !r.passed() {
                            failed += 1;
                        }
                        if json {
                            println!("{}", serde_json::to_string(&r)?);
                        } else {
                            println!("{}", r.line());
                        }
                    }
                    Err(e) => {
                        outcome =
                            Err(anyhow::Error::new(e).context(format!("scenario {}", sc.name())));
                        break;
                    }
                }
            }
            testnet.shutdown().await?;
            outcome?;
            if failed > 0 {
                bail!("{failed} scenario(s) failed");
            }
            Ok(())
        }
        TestnetCmd::Bench {
            net,
            sizes,
            samples,
            clients,
            load_secs,
            out,
        } => {
            let mut o = BenchOptions::new(net.bin()?, &net.dir);
            o.sizes = sizes;
            o.samples = samples;
            o.clients = clients;
            o.load_time = Duration::from_secs(load_secs.clamp(1, 600));
            if let Some(out) = out {
                o.out = out;
            }
            let report = tokio::select! {
                r = hubmesh_testnet::bench::run(&o) => r?,
                () = stop_signal() => bail!("interrupted"),
            };
            print!("{}", markdown(&report));
            eprintln!(
                "bench: report written to {} and {}",
                o.out.with_extension("md").display(),
                o.out.with_extension("json").display()
            );
            Ok(())
        }
    }
}
