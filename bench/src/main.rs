//! `derp-bench`: the load generator behind `bench/run` and `bench/soak`. Each subcommand
//! measures one thing against one running server and prints a JSON object on stdout.

mod hist;
mod idle;
mod load;
mod procfs;
mod soak;
mod stun;
mod tlsbase;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use derp_client::TlsTrust;

#[derive(Parser)]
#[command(
    name = "derp-bench",
    about = "DERP server load generator (JSON on stdout)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Target {
    /// DERP URL, e.g. https://127.0.0.1:8443/derp
    #[arg(long)]
    url: String,
    /// Certificate pin (sha256-raw:HEX); without it any certificate is accepted.
    #[arg(long)]
    pin: Option<String>,
    /// The server's process id, for CPU time and memory from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
}

impl Target {
    fn trust(&self) -> Result<TlsTrust> {
        match &self.pin {
            Some(p) => TlsTrust::from_sha256_raw(p).context("--pin"),
            None => Ok(TlsTrust::Insecure),
        }
    }
}

#[derive(Args)]
struct RelayArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 4)]
    pairs: usize,
    #[arg(long, default_value_t = 1024)]
    size: usize,
    #[arg(long, default_value_t = 24)]
    window: u64,
    /// Total packets/s over all pairs (default: as fast as the window allows).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, value_parser = go_duration::parse, default_value = "1s")]
    warmup: Duration,
    #[arg(long, value_parser = go_duration::parse, default_value = "5s")]
    duration: Duration,
    /// Also run derpprobe's queuing-delay probe: this many 260-byte packets per second.
    #[arg(long)]
    qd_rate: Option<f64>,
    /// Also run a closed-loop STUN client against this address.
    #[arg(long)]
    stun: Option<SocketAddr>,
    #[arg(long, default_value_t = 2)]
    stun_sockets: usize,
    #[arg(long, default_value_t = 8)]
    stun_window: usize,
}

impl RelayArgs {
    fn spec(self) -> Result<load::LoadSpec> {
        Ok(load::LoadSpec {
            url: self.target.url.clone(),
            trust: self.target.trust()?,
            warmup: self.warmup,
            duration: self.duration,
            load: load::FlowSpec {
                pairs: self.pairs,
                size: self.size,
                window: self.window,
                rate_pps: self.rate,
                timeout: None,
            },
            // derpprobe: one pair, 260-byte packets on a ticker, 5 s packet timeout.
            probe: self.qd_rate.map(|r| load::FlowSpec {
                pairs: 1,
                size: 260,
                window: 100_000,
                rate_pps: Some(r),
                timeout: Some(Duration::from_secs(5)),
            }),
            stun: self.stun.map(|addr| stun::StunSpec {
                addr,
                sockets: self.stun_sockets,
                window: self.stun_window,
                busy: false,
            }),
            server_pid: self.target.server_pid,
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Relay packets between client pairs; optional probe flow and STUN load in the same run.
    Relay(RelayArgs),
    /// STUN only: closed-loop binding requests.
    Stun {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 4)]
        sockets: usize,
        #[arg(long, default_value_t = 64)]
        window: usize,
        #[arg(long, value_parser = go_duration::parse, default_value = "1s")]
        warmup: Duration,
        #[arg(long, value_parser = go_duration::parse, default_value = "5s")]
        duration: Duration,
        /// Report this process's CPU use inside the window (the server's).
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Connect idle clients in steps and read the server's RSS after each.
    Idle {
        #[command(flatten)]
        target: Target,
        /// Cumulative client counts, e.g. 1000,10000.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        steps: Vec<usize>,
        #[arg(long, value_parser = go_duration::parse, default_value = "3s")]
        settle: Duration,
    },
    /// Plain TLS echo server (the baseline's server side); runs until killed.
    TlsEchoServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Plain TLS echo client: MB/s echoed through the server.
    TlsEcho {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 4)]
        conns: usize,
        #[arg(long, default_value_t = 1 << 20)]
        window_bytes: usize,
        #[arg(long, value_parser = go_duration::parse, default_value = "1s")]
        warmup: Duration,
        #[arg(long, value_parser = go_duration::parse, default_value = "5s")]
        duration: Duration,
        /// The echo server's process id, for its CPU time from /proc.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Clients connecting, relaying and leaving for a duration; samples into a CSV.
    Soak {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 2000)]
        clients: usize,
        #[arg(long, value_parser = go_duration::parse, default_value = "10m")]
        duration: Duration,
        #[arg(long, value_parser = go_duration::parse, default_value = "5s")]
        interval: Duration,
        /// The server's --metrics-addr, for the derper_connections gauge.
        #[arg(long)]
        metrics: Option<SocketAddr>,
        #[arg(long)]
        csv: PathBuf,
        #[arg(long, value_parser = go_duration::parse, default_value = "2s")]
        min_life: Duration,
        #[arg(long, value_parser = go_duration::parse, default_value = "20s")]
        max_life: Duration,
    },
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Relay(args) => print_json(&load::run(args.spec()?).await?),
        Cmd::Stun {
            addr,
            sockets,
            window,
            warmup,
            duration,
            server_pid,
        } => {
            let spec = stun::StunSpec {
                addr,
                sockets,
                window,
                busy: true,
            };
            print_json(&stun_alone(spec, warmup, duration, server_pid).await?)
        }
        Cmd::Idle {
            target,
            steps,
            settle,
        } => {
            let pid = target.server_pid.context("idle needs --server-pid")?;
            print_json(&idle::run(&target.url, &target.trust()?, &steps, pid, settle).await?)
        }
        Cmd::TlsEchoServer { listen, cert, key } => tlsbase::serve(listen, &cert, &key).await,
        Cmd::TlsEcho {
            addr,
            conns,
            window_bytes,
            warmup,
            duration,
            server_pid,
        } => print_json(
            &tlsbase::client(addr, conns, window_bytes, warmup, duration, server_pid).await?,
        ),
        Cmd::Soak {
            target,
            clients,
            duration,
            interval,
            metrics,
            csv,
            min_life,
            max_life,
        } => {
            let spec = soak::SoakSpec {
                url: target.url.clone(),
                trust: target.trust()?,
                clients,
                duration,
                interval,
                pid: target.server_pid.context("soak needs --server-pid")?,
                metrics,
                csv,
                min_life,
                max_life: max_life.max(min_life),
            };
            print_json(&soak::run(spec).await?)
        }
    }
}

/// STUN alone (`stun`): the load after `warmup` for `duration`, with the server's CPU over that
/// window when its pid is given.
async fn stun_alone(
    spec: stun::StunSpec,
    warmup: Duration,
    duration: Duration,
    server_pid: Option<u32>,
) -> Result<stun::StunStats> {
    let t0 = tokio::time::Instant::now() + warmup;
    let stop = tokio_util::sync::CancellationToken::new();
    let h = tokio::spawn(stun::run(spec, t0, t0 + duration, stop.clone()));
    tokio::time::sleep_until(t0).await;
    let cpu0 = server_pid.map(procfs::cpu_seconds).transpose()?;
    tokio::time::sleep_until(t0 + duration).await;
    let cpu1 = server_pid.map(procfs::cpu_seconds).transpose()?;
    stop.cancel();
    let mut st = h.await.context("STUN task")??;
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        let cpu = b - a;
        st.server_cpu_util = Some(cpu / duration.as_secs_f64());
        st.server_cpu_us_per_req = Some(cpu * 1e6 / st.responses.max(1) as f64);
    }
    Ok(st)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // One thread: the bench is pinned to one core, and a single-threaded runtime wastes nothing
    // on work stealing.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("derp-bench: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("derp-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
