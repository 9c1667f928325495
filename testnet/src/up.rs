//! `hubmesh testnet up`: start N hub processes, wait until every hub sees the
//! others, print where they are (a table, or one JSON object per hub per
//! line), forward their logs prefixed by name, and stop every hub when told
//! to (Ctrl-C / SIGTERM in the CLI).

use std::future::Future;
use std::io::Write;

use crate::error::TestnetError;
use crate::net::{Options, Testnet};
use crate::process::HubInfo;

/// Output format of the ready listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// An aligned table with a header.
    Table,
    /// One `{"name","http","mesh","peer"}` object per line.
    Json,
}

/// Renders the listing of `hubs`.
pub fn render(hubs: &[HubInfo], listing: Listing) -> Result<String, TestnetError> {
    let mut out = String::new();
    match listing {
        Listing::Json => {
            for h in hubs {
                let line = serde_json::to_string(h)
                    .map_err(|e| TestnetError::Invalid(format!("encoding {}: {e}", h.name)))?;
                out.push_str(&line);
                out.push('\n');
            }
        }
        Listing::Table => {
            let w_name = hubs.iter().map(|h| h.name.len()).max().unwrap_or(0).max(3);
            let w_http = hubs.iter().map(|h| h.http.len()).max().unwrap_or(0).max(4);
            let w_mesh = hubs.iter().map(|h| h.mesh.len()).max().unwrap_or(0).max(4);
            out.push_str(&format!(
                "{:w_name$}  {:w_http$}  {:w_mesh$}  PEER\n",
                "HUB", "HTTP", "MESH"
            ));
            for h in hubs {
                out.push_str(&format!(
                    "{:w_name$}  {:w_http$}  {:w_mesh$}  {}\n",
                    h.name, h.http, h.mesh, h.peer
                ));
            }
        }
    }
    Ok(out)
}

/// Runs `hubmesh testnet up`: starts `n` hubs, prints the listing on stdout
/// once all are connected, waits for `stop`, then stops every hub (and,
/// without `keep`, removes their data dirs).
pub async fn run(
    n: usize,
    opts: Options,
    listing: Listing,
    stop: impl Future<Output = ()>,
) -> Result<(), TestnetError> {
    let dir = opts.dir.clone();
    let keep = opts.keep;
    let mut net = Testnet::start(n, opts).await?;
    let printed = render(&net.infos(), listing).and_then(|text| {
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| TestnetError::io("writing the listing", e))
    });
    if let Err(e) = printed {
        // Nobody can learn where the hubs are: stop them cleanly, then fail.
        net.shutdown().await?;
        return Err(e);
    }
    eprintln!(
        "testnet: {n} hubs ready in {:.1} s; logs in {}; Ctrl-C stops them{}",
        net.formed_in().as_secs_f64(),
        dir.display(),
        if keep { " (data dirs kept)" } else { "" }
    );
    // Until told to stop, report hubs that die on their own (the others go on).
    let mut stop = std::pin::pin!(stop);
    let mut check = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            () = &mut stop => break,
            _ = check.tick() => {
                for (name, status) in net.reap_exited() {
                    eprintln!("testnet: {name} exited on its own ({status}); see its log in {}", dir.display());
                }
            }
        }
    }
    eprintln!("testnet: stopping {n} hubs");
    net.shutdown().await?;
    eprintln!("testnet: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_as_table_and_json_lines() {
        let hubs = vec![HubInfo {
            name: "hub-0".into(),
            http: "http://127.0.0.1:7000".into(),
            mesh: "/ip4/127.0.0.1/udp/7000/quic-v1/p2p/12D3KooWX".into(),
            peer: "12D3KooWX".into(),
        }];
        let t = render(&hubs, Listing::Table).unwrap();
        assert!(t.starts_with("HUB  "), "{t}");
        assert!(
            t.lines()
                .nth(1)
                .unwrap()
                .starts_with("hub-0  http://127.0.0.1:7000  /ip4/")
        );
        let j = render(&hubs, Listing::Json).unwrap();
        let v: serde_json::Value = serde_json::from_str(j.trim_end()).unwrap();
        assert_eq!(v["name"], "hub-0");
        assert_eq!(v["peer"], "12D3KooWX");
        assert_eq!(j.lines().count(), 1);
    }
}
