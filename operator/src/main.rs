//! `operator` binary: the CLI over the library. `run` is the operator (controller, map server,
//! leader election); `crd` prints the CRD; `render` prints, without a cluster, what a DerpRegion
//! becomes.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use derp_operator::offline::{parse_objects, render_offline};
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
    /// Run the operator: reconcile DerpRegions (when leader) and serve the DERP map (always).
    /// Cluster access as kubectl's: in-cluster service account, else KUBECONFIG or ~/.kube/config.
    Run(Box<RunArgs>),
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

#[derive(clap::Args)]
struct RunArgs {
    /// Address of the map server (`/derpmap.json`, `/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "DERPFLEET_MAP_ADDR", default_value = "0.0.0.0:8080")]
    map_addr: std::net::SocketAddr,
    /// Also serve `/metrics` (and the health endpoints) on this address.
    #[arg(long = "metrics-addr", env = "DERPFLEET_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// How long a published node whose derper is not Ready (NotReady, restarting, or its pod
    /// being replaced) stays in the map (e.g. 10m, 30s, 0s). Headscale reads the map only every
    /// update_frequency, so a node dropped for a blink stays missing for clients until its next
    /// read, while a kept node is redialled the moment its derper is back. A deleted Node, a node
    /// the region no longer selects, or a pod not replaced within 60 s leaves at once.
    #[arg(long, env = "DERPFLEET_NOT_READY_GRACE", default_value = "10m", value_parser = go_duration::parse)]
    not_ready_grace: std::time::Duration,
    /// Set `OmitDefaultRegions` in the map (ask clients not to use Tailscale's own regions).
    #[arg(long, env = "DERPFLEET_OMIT_DEFAULT_REGIONS")]
    omit_default_regions: bool,
    /// Watch DerpRegions (and their objects) in this namespace only; all namespaces when unset.
    #[arg(long, env = "DERPFLEET_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Namespace of the operator: its Lease and the map ConfigMap.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    operator_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "DERPFLEET_LEASE_NAME",
        default_value = "derp-fleet-operator"
    )]
    lease_name: String,
    /// Seconds a Lease is valid without renewal (a crashed leader is replaced after this).
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// This replica's identity in the Lease; the pod name in a cluster, else host name + pid.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Derper image for regions that set none.
    #[arg(long, env = "DERPFLEET_DERPER_IMAGE")]
    derper_image: Option<String>,
    /// ConfigMap (in the operator namespace) the leader writes the map to; "" disables it.
    #[arg(long, env = "DERPFLEET_MAP_CONFIGMAP", default_value = "derp-map")]
    map_configmap: String,
    /// Most regions reconciled at once (0: no limit). Bounds the operator's memory and its burst
    /// of API requests when many regions change together (a cold start, winning the Lease).
    #[arg(long, env = "DERPFLEET_RECONCILE_CONCURRENCY", default_value_t = 16)]
    reconcile_concurrency: u16,
    /// Probe every node in the map this often (TLS and DERP handshake, STUN, mesh delivery
    /// between the nodes of a region), e.g. 15s; 0s (the default) leaves the prober off.
    #[arg(long, env = "DERPFLEET_PROBE_INTERVAL", default_value = "0s", value_parser = go_duration::parse)]
    probe_interval: std::time::Duration,
    /// Most nodes (and node pairs) probed at once.
    #[arg(long, env = "DERPFLEET_PROBE_CONCURRENCY", default_value_t = 32)]
    probe_concurrency: u16,
    /// Bound of each probe check (the whole DERP connect, a STUN answer, a mesh delivery).
    #[arg(long, env = "DERPFLEET_PROBE_TIMEOUT", default_value = "5s", value_parser = go_duration::parse)]
    probe_timeout: std::time::Duration,
    /// Failed rounds in a row after which a node is unhealthy.
    #[arg(long, env = "DERPFLEET_PROBE_FAIL_ROUNDS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    probe_fail_rounds: u32,
    /// Good rounds in a row after which an unhealthy node is healthy again.
    #[arg(long, env = "DERPFLEET_PROBE_RECOVER_ROUNDS", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..))]
    probe_recover_rounds: u32,
    /// Latencies and last success are written to the status at most this often (state changes
    /// are written at once).
    #[arg(long, env = "DERPFLEET_PROBE_STATUS_REFRESH", default_value = "5m", value_parser = go_duration::parse)]
    probe_status_refresh: std::time::Duration,
    /// Leave nodes the prober holds unhealthy out of the map (never a region's last nodes).
    /// Off by default: the prober runs inside the cluster, and a node it cannot reach may be
    /// fine for clients outside (and the other way round).
    #[arg(long, env = "DERPFLEET_PROBE_GATES_MAP")]
    probe_gates_map: bool,
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
        Command::Run(args) => run(*args)?,
        Command::Crd => emit(&derp_operator::crd::crd_yaml()?)?,
        Command::Render {
            file,
            nodes,
            format,
        } => render_files(&file, nodes.as_deref(), format)?,
    }
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Logs go to stderr, with colour codes only on a terminal (not in kubectl logs).
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "operator".into());
        format!("{host}-{}", std::process::id())
    });
    let cfg = derp_operator::run::RunConfig {
        map_addr: args.map_addr,
        metrics_addr: args.metrics_addr,
        map: derp_operator::mapbuild::MapConfig {
            not_ready_grace: args.not_ready_grace,
            omit_default_regions: args.omit_default_regions,
        },
        watch_namespace: args.namespace,
        operator_namespace: args.operator_namespace.clone(),
        lease: derp_operator::leader::LeaseConfig {
            namespace: args.operator_namespace,
            name: args.lease_name,
            identity,
            duration_secs: args.lease_duration.max(2),
            // Renew a third of the duration before expiry (5 s of the default 15 s).
            grace_secs: (args.lease_duration / 3).max(1),
        },
        derper_image: args.derper_image,
        map_configmap: Some(args.map_configmap).filter(|n| !n.is_empty()),
        reconcile_concurrency: args.reconcile_concurrency,
        probe: (!args.probe_interval.is_zero()).then(|| derp_operator::probe::ProbeConfig {
            interval: args.probe_interval,
            concurrency: usize::from(args.probe_concurrency.max(1)),
            timeout: args.probe_timeout,
            fail_rounds: args.probe_fail_rounds,
            recover_rounds: args.probe_recover_rounds,
            status_refresh: args.probe_status_refresh,
        }),
        probe_gates_map: args.probe_gates_map,
    };
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async move {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the cluster (in-cluster config or KUBECONFIG)")?;
        let cancel = tokio_util::sync::CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutdown signal received");
            c.cancel();
        });
        derp_operator::run::run(client, cfg, cancel).await?;
        anyhow::Ok(())
    })
}

/// SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn read(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// `operator render`: the objects and map entry of each DerpRegion in `file`, offline.
fn render_files(
    file: &std::path::Path,
    nodes: Option<&std::path::Path>,
    format: Format,
) -> anyhow::Result<()> {
    let mut objs = parse_objects(&read(file)?).with_context(|| file.display().to_string())?;
    if let Some(n) = nodes {
        let more = parse_objects(&read(n)?).with_context(|| n.display().to_string())?;
        objs.nodes.extend(more.nodes);
    }
    for s in &objs.skipped {
        eprintln!(
            "{}: skipping {s} (only DerpRegions and Nodes are rendered)",
            file.display()
        );
    }
    if objs.regions.is_empty() {
        bail!("{}: no DerpRegion found", file.display());
    }
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs())?;
    let mut rng = rand::thread_rng();
    let mut objects = Vec::new();
    let mut map = DerpMap::default();
    for region in &objs.regions {
        let p = render_offline(region, &objs.nodes, now, &mut rng)?;
        objects.extend(p.rendered.to_values()?);
        map.regions.extend(p.map.regions);
    }
    let mut out = String::new();
    match format {
        Format::Yaml => {
            for o in &objects {
                writeln!(out, "---\n{}", yaml_serde::to_string(o)?.trim_end())?;
            }
            writeln!(out, "# DERP map (derp.urls JSON):")?;
            for l in map.to_json_pretty()?.lines() {
                writeln!(out, "# {l}")?;
            }
            writeln!(out, "# Headscale derp.paths YAML:")?;
            for l in headscale_yaml::to_string(&map)?.lines() {
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
        Format::Headscale => out.push_str(&headscale_yaml::to_string(&map)?),
        Format::Map => writeln!(out, "{}", map.to_json_pretty()?)?,
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
