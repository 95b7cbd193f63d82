//! `derper`: parse the Go-compatible command line, start the server, print this node's DERP
//! map entry, and run until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use derper::cli::{Cli, normalize_args};
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    let args = normalize_args(std::env::args());
    let cli = Cli::parse_from(args);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DERPER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal; log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let print = cli.print_derpmap.clone();
    let config = match cli.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("derper: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("derper: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config, print)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("derper: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: derper::config::Config, print: Option<String>) -> anyhow::Result<()> {
    if let Some(format) = print {
        let map = derper::server::configured_map(&config).context("building the DERP map")?;
        if format == "yaml" {
            print!("{}", headscale_yaml::to_string(&map)?);
        } else {
            println!("{}", map.to_json_pretty()?);
        }
        return Ok(());
    }
    // Signal handlers go in before anything is served: a SIGTERM (or SIGHUP) that arrives while
    // the server starts must mean a graceful stop (or a reload), not the default action, which
    // kills the process. tokio keeps a handler once installed.
    let stop = StopSignal::install();
    drop(derper::signals::Hangups::new());
    let shutdown = CancellationToken::new();
    let handle = derper::server::start(config, shutdown.clone())
        .await
        .context("starting the server")?;
    let map = &handle.derp_map;
    // The block a self-hoster pastes into Headscale: on stdout, apart from the logs.
    println!(
        "# DERP map for this server: Headscale derp.urls / tailcfg.DERPMap JSON\n{}\n# Headscale derp.paths YAML\n{}",
        map.to_json_pretty()?,
        headscale_yaml::to_string(map)?
    );
    stop.wait().await;
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}

/// SIGTERM or Ctrl-C.
struct StopSignal {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl StopSignal {
    fn install() -> Self {
        StopSignal {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok(),
        }
    }

    async fn wait(self) {
        #[cfg(unix)]
        if let Some(mut term) = self.term {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}
