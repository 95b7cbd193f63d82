//! `operator` binary: the CLI over the library. `crd` prints the CRD; `render` prints, without a
//! cluster, what a DerpRegion becomes; `run` (the controller and map server) comes next.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "operator",
    version,
    about = "derp-fleet: DerpRegions become derper DaemonSets and a live DERP map"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the DerpRegion CustomResourceDefinition (YAML).
    Crd,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => print!("{}", derp_operator::crd::crd_yaml()?),
    }
    Ok(())
}
