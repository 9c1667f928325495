//! `hubmesh testnet` with real hub processes: the library's chaos scenarios
//! on three `hubmesh run` processes (partition and heal; kill -9 during
//! writes), and `hubmesh testnet up` driven as a new user would — spawned
//! binary, `--json` stdout parsed, a registration written at one hub and read
//! at another with the `hubmesh discovery` commands, SIGINT, then no hub
//! process left and no port answering; `--keep` brings the same federation
//! back; and a `kill -9` of `up` itself still takes every hub down.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::{BIN, KillOnDrop, StdoutLines, run_with_stdin, wait_exit};
use hubmesh_testnet::chaos::{self, ChaosOptions, Scenario};
use hubmesh_testnet::{HubInfo, Options, Testnet};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Longer than `common::WAIT`: three hubs start (and sync) per wait here.
const WAIT: Duration = Duration::from_secs(40);

fn chaos_opts() -> ChaosOptions {
    ChaosOptions {
        step_writes: 25,
        timeout: Duration::from_secs(40),
        ..ChaosOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_and_heal_three_hub_processes_lose_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut net = Testnet::start(3, Options::processes(BIN, dir.path())).await?;
    assert!(net.pid(0).is_some() && net.pid(2).is_some());
    let r = chaos::run(&mut net, Scenario::Partition, &chaos_opts(), 7).await?;
    eprintln!("{}", r.line());
    assert!(r.passed(), "{}", r.line());
    assert!(r.acknowledged >= 50, "{}", r.line());
    assert_eq!(r.acknowledged_missing, 0, "{}", r.line());
    assert_eq!(r.found_everywhere, r.acknowledged, "{}", r.line());
    assert_eq!(r.diverged_before_heal, Some(true), "{}", r.line());
    net.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_writes_three_hub_processes_lose_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut net = Testnet::start(3, Options::processes(BIN, dir.path())).await?;
    let before = net.info(2)?.peer.clone();
    let r = chaos::run(&mut net, Scenario::Kill9, &chaos_opts(), 9).await?;
    eprintln!("{}", r.line());
    assert!(r.passed(), "{}", r.line());
    assert_eq!(r.acknowledged_missing, 0, "{}", r.line());
    assert!(
        r.written > r.acknowledged,
        "writes to the dead hub fail: {}",
        r.line()
    );
    assert_eq!(net.info(2)?.peer, before, "restarted from its data dir");
    net.shutdown().await?;
    Ok(())
}

/// `hubmesh testnet up` running in the background, stdout parsed.
struct Up {
    child: KillOnDrop,
    hubs: Vec<HubInfo>,
}

fn up(dir: &Path, extra: &[&str]) -> Result<Up> {
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args([
                "testnet",
                "up",
                "--hubs",
                "3",
                "--base-port",
                "0",
                "--json",
                "--quiet",
            ])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .env("CLUSTER_SECRET_ACME_CORP", "s3cret")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    let lines = StdoutLines::of(&mut child)?;
    let mut hubs = Vec::new();
    let deadline = Instant::now() + WAIT;
    while hubs.len() < 3 {
        let Some(line) = lines.next_before(deadline) else {
            bail!("only {} hub lines within {WAIT:?}", hubs.len());
        };
        let h: HubInfo = serde_json::from_str(&line).with_context(|| format!("{line:?}"))?;
        assert!(h.mesh.ends_with(&format!("/p2p/{}", h.peer)), "{line}");
        hubs.push(h);
    }
    Ok(Up { child, hubs })
}

/// Sends `sig` to `up` and waits (within [`WAIT`]) for it to exit.
async fn stop(up: &mut Up, sig: Signal) -> Result<ExitStatus> {
    kill(Pid::from_raw(up.child.id() as i32), sig)?;
    wait_exit(
        &mut up.child,
        &format!("testnet up after {sig}"),
        WAIT,
        Duration::from_millis(100),
    )
    .await
}

/// The `hubmesh run` processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state, ppid, …
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let ppid: Option<u32> = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// Whether `pid` is gone (or a zombie nobody reaped yet: no longer running).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, r)| r.starts_with('Z')),
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Runs `hubmesh ARGS` within [`WAIT`]; its stdout, or an error unless it succeeds.
fn cli(args: &[&str]) -> Result<String> {
    let out = run_with_stdin(
        Command::new(BIN)
            .args(args)
            .env("CLUSTER_SECRET_ACME_CORP", "s3cret"),
        b"",
        WAIT,
    )?;
    if !out.status.success() {
        bail!(
            "hubmesh {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    common::wait_until(what, WAIT, Duration::from_millis(100), || {
        std::future::ready(Ok(f()))
    })
    .await
}

fn answers(http: &str) -> bool {
    let addr = http.trim_start_matches("http://");
    std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(500)).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_as_a_new_user_then_ctrl_c_leaves_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let u = up(dir.path(), &["--keep"])?;
    let up_pid = u.child.id();
    let hubs = u.hubs.clone();
    let pids = children(up_pid);
    assert_eq!(pids.len(), 3, "{pids:?}");
    for p in &pids {
        assert!(cmdline(*p).contains(" run "), "{}", cmdline(*p));
    }
    // Every hub already sees the other two.
    let client = reqwest::Client::new();
    for h in &hubs {
        let peers: serde_json::Value = client
            .get(format!("{}/admin/peers", h.http))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(
            peers.as_array().map(Vec::len),
            Some(2),
            "{}: {peers}",
            h.name
        );
    }
    // Register at hub-0 with the CLI, look it up at hub-2.
    let reg: serde_json::Value = serde_json::from_str(&cli(&[
        "discovery",
        "register",
        "--hub",
        &hubs[0].http,
        "--cluster",
        "acme-corp",
        "--public-url",
        "https://server-a.example:9090",
    ])?)?;
    let token = reg["token"].as_str().context("token")?.to_owned();
    let server = reg["serverId"].as_str().context("serverId")?.to_owned();
    let hub2 = hubs[2].http.clone();
    wait_until("the registration replicated to hub-2", || {
        cli(&[
            "discovery",
            "lookup",
            "--hub",
            &hub2,
            "--cluster",
            "acme-corp",
            "--token",
            &token,
        ])
        .is_ok_and(|out| out.contains(&server))
    })
    .await?;

    // Ctrl-C: every hub stops, `up` exits 0, nothing answers any more.
    let mut u = u;
    let status = stop(&mut u, Signal::SIGINT).await?;
    assert!(status.success(), "{status}");
    for p in &pids {
        assert!(gone(*p), "hub pid {p} still runs: {}", cmdline(*p));
    }
    for h in &hubs {
        assert!(!answers(&h.http), "{} still answers", h.http);
    }
    assert!(dir.path().join("hub-0.log").exists());

    // --keep: `up` again restarts the same federation (same identities, same data).
    let again = up(dir.path(), &["--keep"])?;
    let before: BTreeSet<_> = hubs.iter().map(|h| h.peer.clone()).collect();
    let after: BTreeSet<_> = again.hubs.iter().map(|h| h.peer.clone()).collect();
    assert_eq!(before, after);
    let out = cli(&[
        "lookup",
        "--hub",
        &again.hubs[1].http,
        "server",
        &format!("acme-corp/{server}"),
    ])?;
    assert!(out.contains(&server), "{out}");
    drop(again);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_do_not_outlive_a_killed_up() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut u = up(dir.path(), &[])?;
    let pids = children(u.child.id());
    assert_eq!(pids.len(), 3, "{pids:?}");
    // kill -9: `up` cannot clean up; the kernel's parent-death signal must.
    u.child.kill()?;
    u.child.wait()?;
    wait_until("every hub gone after its parent died", || {
        pids.iter().all(|p| gone(*p))
    })
    .await?;
    for h in &u.hubs {
        assert!(!answers(&h.http), "{} still answers", h.http);
    }
    Ok(())
}

#[test]
fn chaos_command_reports_a_passing_partition_as_json() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = Command::new(BIN)
        .args([
            "testnet",
            "chaos",
            "--hubs",
            "3",
            "--scenario",
            "partition",
            "--json",
        ])
        .arg("--dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .output()?;
    let stdout = String::from_utf8(out.stdout)?;
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let r: serde_json::Value = serde_json::from_str(lines[0])?;
    assert_eq!(r["scenario"], "partition");
    assert_eq!(r["verdict"], "PASS", "{r}");
    assert_eq!(r["acknowledged_missing"], 0, "{r}");
    assert_eq!(r["diverged_before_heal"], true, "{r}");
    // Without --keep the data dirs are gone; the logs stay.
    assert!(!dir.path().join("hub-0").exists());
    assert!(dir.path().join("hub-0.log").exists());
    // A bad scenario name is a clear error, not a panic.
    let out = Command::new(BIN)
        .args(["testnet", "chaos", "--scenario", "nope"])
        .arg("--dir")
        .arg(dir.path())
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scenario"));
    Ok(())
}

#[test]
fn bench_command_writes_markdown_and_json() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let report = dir.path().join("r");
    let out = Command::new(BIN)
        .args([
            "testnet",
            "bench",
            "--sizes",
            "3",
            "--samples",
            "5",
            "--clients",
            "8",
            "--load-secs",
            "1",
        ])
        .arg("--dir")
        .arg(dir.path())
        .arg("--out")
        .arg(&report)
        .env("RUST_LOG", "warn")
        .output()?;
    assert!(
        out.status.success(),
        "{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(report.with_extension("md"))?;
    assert!(md.contains("| propagation p99, 3 hubs |"), "{md}");
    assert!(md.contains("≥ 5000 req/s"), "{md}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.with_extension("json"))?)?;
    assert!(v["cores"].as_u64().unwrap() >= 1);
    assert_eq!(v["propagation"][0]["hubs"], 3);
    assert_eq!(v["propagation"][0]["timed_out"], 0, "{v}");
    assert!(v["throughput"][0]["ok"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["signal"]["status"], "measured", "{}", v["signal"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_survives_a_hub_dying_and_still_stops_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut u = up(dir.path(), &[])?;
    let pids = children(u.child.id());
    assert_eq!(pids.len(), 3, "{pids:?}");
    // A hub crashes behind the testnet's back.
    kill(Pid::from_raw(pids[1] as i32), Signal::SIGKILL)?;
    wait_until("the crashed hub gone", || gone(pids[1])).await?;
    assert!(answers(&u.hubs[0].http));
    let status = stop(&mut u, Signal::SIGTERM).await?;
    assert!(status.success(), "{status}");
    for p in &pids {
        assert!(gone(*p), "hub pid {p} still runs");
    }
    Ok(())
}
