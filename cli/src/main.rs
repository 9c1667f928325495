//! `hubmesh`: the command-line front end of a hubmesh hub. Thin: it parses,
//! calls into `hubmesh-node` / `hubmesh-testnet`, and prints.

use clap::Parser;

/// A peer-to-peer federation of hub daemons.
#[derive(Debug, Parser)]
#[command(name = "hubmesh", version, about)]
enum Command {
    /// Run a hub (the daemon lands with the node issue).
    Run,
}

fn main() -> anyhow::Result<()> {
    match Command::parse() {
        Command::Run => {
            anyhow::bail!("the hub daemon is not built yet: it lands with the node issue (#4)")
        }
    }
}
