//! The `tlsplice` node agent binary.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// tlsplice: cheap TLS between hops with kTLS and in-kernel splicing.
#[derive(Debug, Parser)]
#[command(name = "tlsplice", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print what the running kernel and this process can do (kTLS per version and cipher,
    /// rekey, kTLS counters, BTF, capabilities) and, with `--config`, which data path each
    /// listener gets. Exits with status 2 when a configured listener cannot run at all, or when
    /// kTLS is unavailable and `--require-ktls` is given.
    Probe {
        /// Exit with status 2 when the kernel cannot run kTLS.
        #[arg(long)]
        require_ktls: bool,
        /// Also check every listener of this configuration against the kernel.
        #[arg(long, env = "TLSPLICE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Serve the listeners of a configuration file until SIGTERM or Ctrl-C.
    Run {
        /// The TOML configuration.
        #[arg(long, env = "TLSPLICE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a configuration file and exit.
    Check {
        /// The TOML configuration.
        #[arg(long, env = "TLSPLICE_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TLSPLICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Probe {
            require_ktls,
            config,
        } => {
            let report = tlsplice::probe::ProbeReport::collect();
            print!("{report}");
            let mut fail = require_ktls && report.ktls.is_some();
            if let Some(path) = config {
                let c = tlsplice::config::Config::load(&path)?;
                let caps = tlsplice::proxy::KernelCaps::from_report(&report);
                for l in &c.listeners {
                    let mode = format!("{:?}", l.mode).to_lowercase();
                    match tlsplice::proxy::readiness(l, &caps) {
                        Ok(how) => println!("listener {} ({mode}): ok: {how}", l.name),
                        Err(why) => {
                            println!("listener {} ({mode}): cannot run: {why}", l.name);
                            fail = true;
                        }
                    }
                }
            }
            if fail {
                std::process::exit(2);
            }
        }
        Command::Check { config } => {
            let c = tlsplice::config::Config::load(&config)?;
            println!(
                "{}: {} listener(s), valid",
                config.display(),
                c.listeners.len()
            );
        }
        Command::Run { config } => run(&config)?,
    }
    Ok(())
}

fn run(path: &std::path::Path) -> Result<()> {
    let config = tlsplice::config::Config::load(path)?;
    let caps = Arc::new(tlsplice::proxy::KernelCaps::probe());
    tracing::info!(kernel = %tlsplice::probe::kernel_release(), ktls = ?caps, "kernel probed");
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async {
        let proxy = tlsplice::proxy::Proxy::bind(&config, caps, None).await?;
        for l in &config.listeners {
            tracing::info!(listener = %l.name, mode = ?l.mode, addr = ?proxy.local_addr(&l.name),
                upstream = ?l.upstream, sni_routes = l.sni.len(), "listening");
        }
        tokio::select! {
            () = proxy.run() => {}
            r = tokio::signal::ctrl_c() => { r.context("waiting for Ctrl-C")?; }
            () = sigterm() => {}
        }
        tracing::info!("stopping");
        anyhow::Ok(())
    })
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
