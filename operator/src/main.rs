//! `operator` binary: the CLI over the library. `crd` prints the CRD; `render` prints, without a
//! cluster, what a DerpRegion becomes; `run` (the controller and map server) comes next.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use derp_operator::preview::{parse_objects, preview};
use derp_proto::derpmap::DerpMap;

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
    /// Print, without a cluster, the objects a DerpRegion becomes and its DERP map entry
    /// (as if every selected node's derper were Ready).
    Render {
        /// File with one or more DerpRegions (and optionally Nodes).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// File with the cluster's Nodes (`kubectl get nodes -o yaml`).
        #[arg(long)]
        nodes: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Yaml)]
        format: Format,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// Objects as a YAML stream, then the map as JSON and Headscale YAML in comments.
    Yaml,
    /// One JSON document: {"objects": [...], "derpMap": {...}}.
    Json,
    /// Only the map, as Headscale's `derp.paths` YAML.
    Headscale,
    /// Only the map, as the JSON `/derpmap.json` serves.
    Map,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => emit(&derp_operator::crd::crd_yaml()?)?,
        Command::Render {
            file,
            nodes,
            format,
        } => render(&file, nodes.as_deref(), format)?,
    }
    Ok(())
}

fn read(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn render(
    file: &std::path::Path,
    nodes: Option<&std::path::Path>,
    format: Format,
) -> anyhow::Result<()> {
    let mut objs = parse_objects(&read(file)?).with_context(|| file.display().to_string())?;
    if let Some(n) = nodes {
        let more = parse_objects(&read(n)?).with_context(|| n.display().to_string())?;
        objs.nodes.extend(more.nodes);
    }
    if objs.regions.is_empty() {
        bail!("{}: no DerpRegion found", file.display());
    }
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs())?;
    let mut rng = rand::thread_rng();
    let mut objects = Vec::new();
    let mut map = DerpMap::default();
    for region in &objs.regions {
        let p = preview(region, &objs.nodes, now, &mut rng)?;
        objects.extend(p.rendered.to_values()?);
        map.regions.extend(p.map.regions);
    }
    let mut out = String::new();
    match format {
        Format::Yaml => {
            for o in &objects {
                writeln!(out, "---\n{}", serde_yaml::to_string(o)?.trim_end())?;
            }
            writeln!(out, "# DERP map (derp.urls JSON):")?;
            for l in map.to_json_pretty().lines() {
                writeln!(out, "# {l}")?;
            }
            writeln!(out, "# Headscale derp.paths YAML:")?;
            for l in map.to_headscale_yaml().lines() {
                writeln!(out, "# {l}")?;
            }
            if objs.nodes.is_empty() {
                eprintln!(
                    "note: no Nodes given (--nodes); certificates, peers and the map are empty"
                );
            }
        }
        Format::Json => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "objects": objects,
                "derpMap": serde_json::to_value(&map)?,
            }))?
        )?,
        Format::Headscale => out.push_str(&map.to_headscale_yaml()),
        Format::Map => writeln!(out, "{}", map.to_json_pretty())?,
    }
    emit(&out)
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
