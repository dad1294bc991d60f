//! The `tlsplice` node agent binary.

use anyhow::Result;
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
    /// rekey, kTLS counters, BTF, capabilities). Exits non-zero when kTLS is unavailable and
    /// `--require-ktls` is given.
    Probe {
        /// Exit with status 2 when the kernel cannot run kTLS.
        #[arg(long)]
        require_ktls: bool,
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
        Command::Probe { require_ktls } => {
            let report = tlsplice::probe::ProbeReport::collect();
            print!("{report}");
            if require_ktls && report.ktls.is_some() {
                std::process::exit(2);
            }
        }
    }
    Ok(())
}
