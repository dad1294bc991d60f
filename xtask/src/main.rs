//! `cargo xtask`: bootstrap, build, VM kernel matrix, tests and the demo for tlsplice.

mod bench;
mod bootstrap;
mod cmd;
mod fuzz;
mod initramfs;
mod kernels;
mod matrix;
mod peers;
mod scan;
mod soak;
mod vm;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "tlsplice development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what the other tasks need (apt packages, nightly rust-src, bpf-linker).
    /// Idempotent: only what is missing is installed, and each install is announced.
    Bootstrap,
    /// Everything CI runs: fmt, clippy, eBPF build, host tests, then the kernel-dependent tests
    /// on the host kernel and in each guest kernel of the matrix.
    Test {
        /// Kernels of the matrix to use (default: all). Names: 6.1, 6.12, sid.
        #[arg(long, value_delimiter = ',')]
        kernels: Vec<String>,
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// The main job: the agent terminating, re-encrypting and passing TLS through on this host,
    /// then the same in a guest kernel with kTLS, with what each connection took and why.
    Demo {
        /// Guest kernel (6.1, 6.12, sid).
        #[arg(long, default_value = "sid")]
        kernel: String,
        /// Only this host: no guest kernel (and no kTLS, on hosts without it).
        #[arg(long)]
        host_only: bool,
    },
    /// Run a command, or a test binary, inside a guest kernel with kTLS modules loaded.
    Vm {
        /// Guest kernel (6.1, 6.12, sid).
        #[arg(long, default_value = "sid")]
        kernel: String,
        /// Integration test target from tests/ to put in the guest and run (with --ignored).
        #[arg(long)]
        test: Option<String>,
        /// Host programs to copy into the guest with their libraries (e.g. openssl,curl).
        #[arg(long, value_delimiter = ',')]
        with: Vec<String>,
        /// Seconds before the guest is killed.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Ports on the host's loopback forwarded to the same port in the guest (QEMU user
        /// networking with restrict=on: the guest reaches nothing else), e.g. 8443,9090. The
        /// guest is 10.0.2.15 on eth0.
        #[arg(long, value_delimiter = ',')]
        forward: Vec<u16>,
        /// Guest clocks follow executed instructions (QEMU -icount shift=0,sleep=off): guest
        /// CPU time is then an instruction count, the same from run to run.
        #[arg(long)]
        icount: bool,
        /// Command to run in the guest (busybox sh; the agent is /usr/bin/tlsplice).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Download (if needed) and list the guest kernels.
    Kernels {
        /// Ignore the cache and resolve the newest packages again.
        #[arg(long)]
        refresh: bool,
    },
    /// tlsplice against HAProxy, nginx, stunnel and socat: on this host, then the kTLS rows in
    /// a guest; writes target/bench/report.md, SVG charts and raw JSON; then the criterion
    /// micro-benchmarks.
    Bench {
        /// A smoke run of a few minutes (small sizes, test-profile builds): what CI runs.
        #[arg(long)]
        quick: bool,
        /// Only this host: no guest, so no kTLS rows.
        #[arg(long)]
        host_only: bool,
        /// Only the guests (the kTLS rows by instruction count): no new host rows (the report
        /// keeps those of the last run, under their date).
        #[arg(long, conflicts_with = "host_only")]
        guest_only: bool,
        /// Guest kernel for the kTLS rows (6.1, 6.12, sid).
        #[arg(long, default_value = "sid")]
        kernel: String,
        /// Only these workloads (bulk1, bulk16, rr1k, rr64k, handshake-new,
        /// handshake-resumed, idle; repeat the flag). No micro-benchmarks then.
        #[arg(long = "only")]
        only: Vec<String>,
        /// Only these relays, by label ("tlsplice ktls", "nginx ktls", "haproxy"; repeat).
        #[arg(long = "relay")]
        relays: Vec<String>,
        /// Host rows are the median of this many runs, shown with their spread (default 3;
        /// 1 with --quick).
        #[arg(long)]
        repeat: Option<u32>,
    },
    /// openssl s_client (KeyUpdate both ways, TLS 1.2 renegotiation) and testssl.sh from this
    /// host against a terminate listener: the host's agent, then one in a kTLS guest through
    /// forwarded ports; what they find is asserted.
    Scan {
        /// Guest kernel (6.1, 6.12, sid).
        #[arg(long, default_value = "sid")]
        kernel: String,
        /// Only this host: no guest.
        #[arg(long)]
        host_only: bool,
    },
    /// The soak (mixed traffic through every mode, a flood from one source, then everything
    /// the agent holds back to where it was) run long: on this host with a release agent, then
    /// in a kTLS guest; and 20 certificate rotations under 200 handshakes a second.
    Soak {
        /// Connections on this host.
        #[arg(long, default_value_t = 100_000)]
        connections: u64,
        /// Connections in the guest.
        #[arg(long, default_value_t = 10_000)]
        guest_connections: u64,
        /// The most seconds each soak runs (each stops at its connection count first).
        #[arg(long, default_value_t = 5_400)]
        seconds: u64,
        /// Guest kernel (6.1, 6.12, sid).
        #[arg(long, default_value = "sid")]
        kernel: String,
        /// Only this host: no guest.
        #[arg(long)]
        host_only: bool,
        /// Only the guest.
        #[arg(long, conflicts_with = "host_only")]
        guest_only: bool,
    },
    /// Run the cargo-fuzz targets in tests/fuzz (every parser that reads untrusted bytes),
    /// each for a time, from their committed seeds (nightly; installs cargo-fuzz if missing).
    Fuzz {
        /// Seconds each target runs.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// Only these targets (client_hello, post_handshake, proxy_protocol, config; repeat).
        #[arg(long = "target")]
        targets: Vec<String>,
    },
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map_or(manifest.clone(), PathBuf::from)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.task {
        Task::Bootstrap => bootstrap::run(),
        Task::Test { kernels, no_lint } => matrix::test(&root, &kernels, !no_lint),
        Task::Demo { kernel, host_only } => matrix::demo(&root, &kernel, host_only),
        Task::Vm {
            kernel,
            test,
            with,
            timeout,
            forward,
            icount,
            command,
        } => matrix::vm(
            &root,
            &kernel,
            test.as_deref(),
            &with,
            timeout,
            &forward,
            if icount {
                vm::Clock::Instructions
            } else {
                vm::Clock::Host
            },
            &command,
        ),
        Task::Kernels { refresh } => {
            bootstrap::run()?;
            for line in &kernels::MATRIX {
                let k = kernels::fetch(line, refresh)?;
                println!("{:5} {} ({})", line.name, k.release, k.vmlinuz.display());
            }
            Ok(())
        }
        Task::Scan { kernel, host_only } => scan::run(&root, &[kernel.as_str()], host_only),
        Task::Soak {
            connections,
            guest_connections,
            seconds,
            kernel,
            host_only,
            guest_only,
        } => soak::run(
            &root,
            &soak::Options {
                connections,
                guest_connections,
                seconds,
                kernel,
                host_only,
                guest_only,
            },
        ),
        Task::Fuzz { seconds, targets } => {
            bootstrap::run()?;
            fuzz::run(&root, seconds, &targets)
        }
        Task::Bench {
            quick,
            host_only,
            guest_only,
            kernel,
            only,
            relays,
            repeat,
        } => bench::run(
            &root,
            &bench::Options {
                quick,
                host_only,
                guest_only,
                kernel,
                only,
                relays,
                host_repeat: repeat.unwrap_or(if quick { 1 } else { 3 }),
            },
        ),
    }
}
