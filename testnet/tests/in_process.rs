//! The library on in-process hubs (no binary needed): three hubs form a mesh,
//! the partition-and-heal chaos scenario converges with nothing acknowledged
//! lost, a restarted hub rejoins, and `kill -9` is refused without processes.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hubmesh_testnet::chaos::{self, ChaosOptions, Scenario};
use hubmesh_testnet::{Options, Testnet, TestnetError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_heal_and_restart_in_process() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut net = Testnet::start(3, Options::in_process(dir.path())).await?;
    assert_eq!(net.infos().len(), 3);

    let opts = ChaosOptions {
        step_writes: 20,
        timeout: Duration::from_secs(30),
        ..ChaosOptions::default()
    };
    let r = chaos::run(&mut net, Scenario::Partition, &opts, 1).await?;
    assert!(r.passed(), "{}", r.line());
    assert!(r.acknowledged >= 40, "{}", r.line());
    assert_eq!(r.acknowledged_missing, 0, "{}", r.line());
    assert_eq!(r.found_everywhere, r.acknowledged, "{}", r.line());
    assert_eq!(r.diverged_before_heal, Some(true), "{}", r.line());

    // A restart keeps the identity and the records.
    let peer = net.info(1)?.peer.clone();
    net.restart(1).await?;
    assert_eq!(net.info(1)?.peer, peer);
    net.wait_converged(Duration::from_secs(30)).await?;

    assert!(matches!(
        net.kill(0).await,
        Err(TestnetError::NeedsProcesses(_))
    ));
    net.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn bad_arguments_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let err = Testnet::start(0, Options::in_process(dir.path()))
        .await
        .unwrap_err();
    assert!(matches!(err, TestnetError::Invalid(_)), "{err}");
    let mut o = Options::in_process(dir.path());
    o.base_port = 65530;
    let err = Testnet::start(10, o).await.unwrap_err();
    assert!(matches!(err, TestnetError::Invalid(_)), "{err}");
    assert!("nope".parse::<Scenario>().is_err());
    Ok(())
}
