//! `tlsplice-bench`: tlsplice on each of its data paths and user-space peers (HAProxy, nginx,
//! stunnel, socat), configured for the same job, through the same workloads on the same
//! machine in the same run. `run` measures and writes JSON; `report` turns one or more JSON
//! files into target/bench/report.md and SVG charts. `cargo xtask bench` drives both, on the
//! host and inside a TCG guest with kTLS.
//!
//! What is counted for a relay: CPU of its whole process tree (every thread, and children that
//! ended), plus every kernel thread's CPU over the same interval (sockmap redirects and parts of
//! kTLS run in kworkers that no process is charged for; on a quiet machine the rest of the
//! kernel threads' time is small, and it is the same for every relay). The traffic generator
//! and the upstream run as separate processes and are not counted.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use tlsplice_benches::{
    CpuReading, kernel_connection_memory_bytes, kernel_threads, node_busy_seconds, process_tree,
    pss_bytes, raise_open_files_limit, reaped_children_cpu_seconds, svg,
};

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;
/// Lines of JSON results on the guest console start with this (the guest has no shared disk).
const JSON_MARKER: &str = "TLSPLICE-BENCH-JSON ";

#[derive(Parser)]
#[command(about = "tlsplice against user-space proxies: measure (run) and write the report")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure every relay on this kernel; write the results as JSON.
    Run {
        /// A smoke run of a few minutes: small sizes and short durations.
        #[arg(long)]
        quick: bool,
        #[arg(long, value_enum, default_value_t = Scope::Host)]
        scope: Scope,
        /// The agent binary (a release build).
        #[arg(long)]
        agent: PathBuf,
        /// The tlsplice-loadgen binary.
        #[arg(long)]
        loadgen: PathBuf,
        /// Where to write the JSON; `-` prints it on stdout in marked lines (for the guest).
        #[arg(long)]
        out: String,
        /// Only these workloads (repeat the flag; default: all).
        #[arg(long = "only", value_enum)]
        only: Vec<Workload>,
        /// Only these relays, by their label, e.g. "tlsplice ktls", "nginx ktls" (repeat the
        /// flag; default: all).
        #[arg(long = "relay")]
        relays: Vec<String>,
        /// Measure each row this many times and keep each figure's median, with the smallest
        /// and largest value beside it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
        repeat: u32,
        /// What this machine's clock follows: `instructions` in a QEMU guest run with
        /// `-icount shift=0,sleep=off` (its CPU seconds are then instruction counts).
        #[arg(long, value_enum, default_value_t = Clock::Host)]
        clock: Clock,
    },
    /// Combine the results of separate runs of the same rows (two guests) into one file:
    /// each figure the median of the runs, with their smallest and largest value.
    Merge {
        #[arg(long = "input", required = true)]
        inputs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write report.md, the SVG charts and results.json from `run` outputs.
    Report {
        /// A JSON file from `run` (host, guest or both).
        #[arg(long = "input", required = true)]
        inputs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Reassemble the marked JSON lines of a guest console log into a file.
    FromConsole {
        #[arg(long)]
        log: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

/// Where the run happens, which decides the relays and whether figures are simulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Scope {
    /// This machine's kernel: every row that needs no kTLS.
    Host,
    /// A QEMU/TCG guest with kTLS: the kTLS rows and their user-space counterparts.
    Guest,
}

/// What the clock of the machine that measured follows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Clock {
    /// Real time: CPU seconds are seconds.
    #[default]
    Host,
    /// Executed instructions (QEMU `-icount shift=0`): one CPU second is 10^9 instructions,
    /// the same from run to run; throughput and latency are those of an imaginary CPU.
    Instructions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Terminate,
    Reencrypt,
    Passthrough,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Terminate => "terminate",
            Mode::Reencrypt => "reencrypt",
            Mode::Passthrough => "passthrough",
        }
    }
}

/// A relay under test.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Relay {
    /// tlsplice forced onto one data path.
    Tlsplice(&'static str),
    /// HAProxy; `ktls`: with `ktls on` on its TLS lines (HAProxy 3.3 and later).
    Haproxy {
        ktls: bool,
        build: Build,
    },
    /// nginx stream proxy; `ktls`: with `ssl_conf_command Options KTLS`.
    Nginx {
        ktls: bool,
        build: Build,
    },
    Stunnel,
    Socat,
    /// No relay: the client talks to the upstream (the floor for latency).
    Direct,
}

/// The directions of a connection whose records the kernel's TLS encrypts (tx) and decrypts
/// (rx): nginx 1.22's OpenSSL 3.0 offloads TLS 1.3 transmit only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct KtlsDirections {
    tx: bool,
    rx: bool,
}

impl KtlsDirections {
    /// The directions the kernel's kTLS counters grew in, from a row's path text
    /// ("kTLS TlsRxSw +1, kTLS TlsTxSw +1"; device offload counts too).
    fn observed(path: &str) -> Self {
        let grew = |names: [&str; 2]| {
            path.split(", ")
                .any(|p| names.iter().any(|n| p.starts_with(&format!("kTLS {n} +"))))
        };
        Self {
            tx: grew(["TlsTxSw", "TlsTxDevice"]),
            rx: grew(["TlsRxSw", "TlsRxDevice"]),
        }
    }

    /// Whether `observed` covers every direction of these.
    fn met_by(self, observed: Self) -> bool {
        (!self.tx || observed.tx) && (!self.rx || observed.rx)
    }
}

/// Which build of a peer runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Build {
    /// The host's packages (Debian 12: HAProxy 2.6, nginx 1.22 with OpenSSL 3.0).
    Debian12,
    /// The newest Debian ships (nginx 1.30 with OpenSSL 3.6 from sid, HAProxy 3.4 from
    /// experimental), which only the guest has: `cargo xtask bench` puts them under /opt/sid with
    /// wrappers named `<program>-sid`.
    Newest,
}

impl Build {
    fn suffix(self) -> &'static str {
        match self {
            Build::Debian12 => "",
            Build::Newest => "-sid",
        }
    }
}

/// Names the newest nginx's stream module in the guest (`cargo xtask bench` sets it where it
/// puts the module).
const NEWEST_STREAM_MODULE_ENV: &str = "TLSPLICE_BENCH_NEWEST_NGINX_STREAM_MODULE";
/// Says why the guest has no newest peers (`cargo xtask bench` could not fetch them).
const NEWEST_PEERS_MISSING_ENV: &str = "TLSPLICE_BENCH_NEWEST_PEERS_MISSING";

impl Relay {
    fn label(self) -> String {
        let ktls = |on: bool| if on { " ktls" } else { "" };
        match self {
            Relay::Tlsplice(p) => format!("tlsplice {p}"),
            Relay::Haproxy { ktls: on, build } => format!("haproxy{}{}", build.suffix(), ktls(on)),
            Relay::Nginx { ktls: on, build } => format!("nginx{}{}", build.suffix(), ktls(on)),
            Relay::Stunnel => "stunnel".into(),
            Relay::Socat => "socat".into(),
            Relay::Direct => "direct (no relay)".into(),
        }
    }

    /// What a peer's rows must show in the kernel's kTLS counters: the directions it hands
    /// to the kernel (`None`: not a kTLS peer; tlsplice's rows are checked by its own counters).
    fn ktls_expected(self) -> Option<KtlsDirections> {
        match self {
            Relay::Nginx {
                ktls: true,
                build: Build::Debian12,
            } => Some(KtlsDirections {
                tx: true,
                rx: false,
            }),
            Relay::Nginx { ktls: true, .. } | Relay::Haproxy { ktls: true, .. } => {
                Some(KtlsDirections { tx: true, rx: true })
            }
            _ => None,
        }
    }

    /// Why this relay is left out of the scaling sweep, if it is. The sweep's charts draw
    /// tlsplice's kernel path against the best kTLS and the best user-space peer, and the best
    /// are the newest builds; a thousand handshakes a point at emulated speed do not buy a line
    /// nobody charts.
    fn outside_scaling_sweep(self) -> Option<&'static str> {
        match self {
            Relay::Tlsplice("ktls")
            | Relay::Nginx {
                build: Build::Newest,
                ..
            }
            | Relay::Haproxy {
                build: Build::Newest,
                ..
            } => None,
            Relay::Tlsplice(_) => Some(
                "the sweep charts tlsplice's kernel path; its other paths are in the rows above",
            ),
            _ => Some(
                "the sweep charts the newest peers (nginx 1.30, HAProxy 3.4); this build's rows are above",
            ),
        }
    }

    /// "haproxy (idle connections)": a relay's label with one of its workloads, for a skip.
    fn with_workload(self, workload: Workload) -> String {
        format!("{} ({})", self.label(), workload.label())
    }

    /// Whether the guest profiles this relay: tlsplice's kernel path, and the newest nginx
    /// with kTLS and without (the peer that runs every workload, in both its ways).
    fn profiled(self) -> bool {
        matches!(
            self,
            Relay::Tlsplice("ktls")
                | Relay::Nginx {
                    build: Build::Newest,
                    ..
                }
        )
    }

    fn is_peer(self) -> bool {
        !matches!(self, Relay::Tlsplice(_) | Relay::Direct)
    }

    fn program(self) -> Option<&'static str> {
        match self {
            Relay::Haproxy {
                build: Build::Debian12,
                ..
            } => Some("haproxy"),
            Relay::Haproxy {
                build: Build::Newest,
                ..
            } => Some("haproxy-sid"),
            Relay::Nginx {
                build: Build::Debian12,
                ..
            } => Some("nginx"),
            Relay::Nginx {
                build: Build::Newest,
                ..
            } => Some("nginx-sid"),
            Relay::Stunnel => Some("stunnel4"),
            Relay::Socat => Some("socat"),
            Relay::Tlsplice(_) | Relay::Direct => None,
        }
    }
}

/// The relays of each mode, per scope; and the pairs not run, with why.
fn relays(scope: Scope, mode: Mode) -> (Vec<Relay>, Vec<(Relay, &'static str)>) {
    use Relay::*;
    const HAPROXY: Relay = Haproxy {
        ktls: false,
        build: Build::Debian12,
    };
    const NGINX: Relay = Nginx {
        ktls: false,
        build: Build::Debian12,
    };
    match (scope, mode) {
        (Scope::Host, Mode::Terminate) => (
            vec![Tlsplice("userspace"), HAPROXY, NGINX, Stunnel],
            vec![(
                Tlsplice("ktls"),
                "this kernel has no kTLS: the ktls rows are in the guest section",
            )],
        ),
        (Scope::Host, Mode::Reencrypt) => (
            vec![Tlsplice("userspace"), HAPROXY, NGINX],
            vec![
                (
                    Tlsplice("ktls"),
                    "this kernel has no kTLS: the ktls rows are in the guest section",
                ),
                (
                    Stunnel,
                    "stunnel does one TLS side per service: re-encrypting takes two services chained over loopback, not the same job",
                ),
            ],
        ),
        (Scope::Host, Mode::Passthrough) => (
            vec![
                Tlsplice("splice"),
                Tlsplice("sockmap"),
                Tlsplice("userspace"),
                HAPROXY,
                NGINX,
                Socat,
                Direct,
            ],
            vec![(
                Stunnel,
                "stunnel cannot relay TLS without terminating it (no SNI passthrough)",
            )],
        ),
        (Scope::Guest, Mode::Passthrough) => (
            Vec::new(),
            vec![(
                Tlsplice("sockmap"),
                "passthrough needs no kTLS: its rows are measured on the host's real CPU",
            )],
        ),
        (Scope::Guest, _) => (
            vec![
                Tlsplice("ktls"),
                Tlsplice("userspace"),
                // The newest kTLS peers first, then the same with kTLS off, then Debian 12's.
                Nginx {
                    ktls: true,
                    build: Build::Newest,
                },
                Haproxy {
                    ktls: true,
                    build: Build::Newest,
                },
                Nginx {
                    ktls: false,
                    build: Build::Newest,
                },
                Haproxy {
                    ktls: false,
                    build: Build::Newest,
                },
                Nginx {
                    ktls: true,
                    build: Build::Debian12,
                },
                NGINX,
            ],
            vec![(
                HAPROXY,
                "HAProxy 2.6 (Debian 12) has no kTLS; its user-space figures are in the host section",
            )],
        ),
    }
}

/// Sizes and durations of the workloads.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sizes {
    bulk_bytes: u64,
    bulk16_bytes: u64,
    rr_secs: f64,
    rr_small_rate: f64,
    rr_large_rate: f64,
    handshake_secs: f64,
    idle_count: usize,
    /// How cost grows: request/response over this many connections (at `scale_size`)...
    #[serde(default)]
    scale_conns: Vec<usize>,
    /// ...and of these sizes (over `scale_size_conns` connections); none: not measured.
    #[serde(default)]
    scale_sizes: Vec<usize>,
    #[serde(default)]
    scale_size: usize,
    #[serde(default)]
    scale_size_conns: usize,
    /// Each point's offered load: this many bytes a second each way, at most
    /// `scale_max_rate` requests a second, for `scale_secs`.
    #[serde(default)]
    scale_bytes_per_s: f64,
    #[serde(default)]
    scale_max_rate: f64,
    #[serde(default)]
    scale_secs: f64,
}

impl Sizes {
    fn new(scope: Scope, quick: bool) -> Self {
        match (scope, quick) {
            (Scope::Host, false) => Self {
                bulk_bytes: 1 << 30,
                bulk16_bytes: 1 << 30,
                // Each row is the median of 3 runs: short runs, three times, tell noise from
                // a difference better than one long run.
                rr_secs: 8.0,
                rr_small_rate: 2000.0,
                rr_large_rate: 400.0,
                handshake_secs: 5.0,
                // Two descriptors per connection on every tlsplice path: 9,000 fit under the
                // 20,000 a process may hold here, with the listeners and pool beside them.
                idle_count: 9_000,
                ..Self::unscaled()
            },
            (Scope::Host, true) => Self {
                bulk_bytes: 64 << 20,
                bulk16_bytes: 8 << 20,
                rr_secs: 2.0,
                rr_small_rate: 1000.0,
                rr_large_rate: 200.0,
                handshake_secs: 2.0,
                idle_count: 300,
                ..Self::unscaled()
            },
            // The guest's CPU is emulated (tens of times slower): smaller sizes, same shapes. Its
            // clock counts instructions, so a guest second is 10^9 instructions of work and a
            // figure repeats without a long run; 1,000 requests give a p99. Sixteen relays and
            // modes in two guests must fit a working session: every connection costs a
            // handshake at emulated speed, so the idle and scaling rows are held to 1,000.
            (Scope::Guest, false) => Self {
                bulk_bytes: 64 << 20,
                bulk16_bytes: 8 << 20,
                rr_secs: 5.0,
                rr_small_rate: 200.0,
                rr_large_rate: 40.0,
                handshake_secs: 2.0,
                idle_count: 1_000,
                scale_conns: vec![1, 16, 256, 1000],
                scale_sizes: vec![1 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20],
                scale_size: 16 << 10,
                scale_size_conns: 16,
                scale_bytes_per_s: 8.0 * MIB,
                scale_max_rate: 400.0,
                scale_secs: 2.5,
            },
            // Sixteen relays and modes in a smoke run that CI waits for: just enough of each.
            (Scope::Guest, true) => Self {
                bulk_bytes: 4 << 20,
                bulk16_bytes: 1 << 20,
                rr_secs: 1.0,
                rr_small_rate: 20.0,
                rr_large_rate: 5.0,
                handshake_secs: 0.5,
                idle_count: 50,
                scale_conns: vec![1, 16],
                scale_sizes: vec![1 << 10, 64 << 10],
                scale_size: 16 << 10,
                scale_size_conns: 4,
                scale_bytes_per_s: MIB,
                scale_max_rate: 50.0,
                scale_secs: 0.5,
            },
        }
    }

    /// No scaling points: on the host (no kTLS), the sweep would measure nothing the guest's
    /// rows do not show for the kernel path.
    fn unscaled() -> Self {
        Self {
            bulk_bytes: 0,
            bulk16_bytes: 0,
            rr_secs: 0.0,
            rr_small_rate: 0.0,
            rr_large_rate: 0.0,
            handshake_secs: 0.0,
            idle_count: 0,
            scale_conns: Vec::new(),
            scale_sizes: Vec::new(),
            scale_size: 0,
            scale_size_conns: 0,
            scale_bytes_per_s: 0.0,
            scale_max_rate: 0.0,
            scale_secs: 0.0,
        }
    }

    /// The (connections, message size) points of the scaling sweep: the connection sweep,
    /// then the size sweep.
    /// A point both sweeps cross is measured once: its row serves both charts.
    fn scale_points(&self) -> Vec<(usize, usize)> {
        let by_conns = self.scale_conns.iter().map(|&c| (c, self.scale_size));
        let by_size = self.scale_sizes.iter().map(|&z| (self.scale_size_conns, z));
        let mut points: Vec<(usize, usize)> = Vec::new();
        for point in by_conns.chain(by_size) {
            if !points.contains(&point) {
                points.push(point);
            }
        }
        points
    }

    /// Requests a second offered at a point (all connections together).
    fn scale_rate(&self, size: usize) -> f64 {
        (self.scale_bytes_per_s / size.max(1) as f64).min(self.scale_max_rate)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
enum Workload {
    Bulk1,
    Bulk16,
    Rr1k,
    Rr64k,
    HandshakeNew,
    HandshakeResumed,
    Idle,
    /// CPU per GiB and p99 latency against connections and message size (request/response).
    Scale,
    /// Where the instructions go: perf over tlsplice's kernel path and the newest nginx (kTLS
    /// and not) in the guest, for bulk on one connection and the sweep's most connections.
    Profile,
    /// Full handshakes per second against tlsplice's worker threads (the host's terminate).
    Threads,
}

const WORKLOADS: [Workload; 10] = [
    Workload::Bulk1,
    Workload::Bulk16,
    Workload::Rr1k,
    Workload::Rr64k,
    Workload::HandshakeNew,
    Workload::HandshakeResumed,
    Workload::Idle,
    Workload::Scale,
    Workload::Profile,
    Workload::Threads,
];

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::Bulk1 => "bulk, 1 connection",
            Workload::Bulk16 => "bulk, 16 connections",
            Workload::Rr1k => "request/response 1 KiB",
            Workload::Rr64k => "request/response 64 KiB",
            Workload::HandshakeNew => "handshakes, full",
            Workload::HandshakeResumed => "handshakes, resumption offered",
            Workload::Idle => "idle connections",
            Workload::Scale => "how cost grows",
            Workload::Profile => "where the instructions go (perf)",
            Workload::Threads => "handshakes by worker threads",
        }
    }
}

/// One measured (mode, relay, workload).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Row {
    mode: String,
    relay: String,
    peer: bool,
    workload: String,
    /// Plaintext bytes moved through the relay (client to upstream).
    bytes: u64,
    secs: f64,
    throughput_mib_s: Option<f64>,
    /// Relay process tree CPU seconds over the workload.
    relay_cpu_s: f64,
    /// Every kernel thread's CPU seconds over the workload.
    kernel_threads_cpu_s: f64,
    /// Relay + kernel threads, per GiB moved.
    cpu_s_per_gib: Option<f64>,
    /// Busy CPU seconds of the whole machine over the workload (/proc/stat: the traffic
    /// generator and upstream included, which do the same work for every relay of a mode).
    node_cpu_s: f64,
    node_cpu_s_per_gib: Option<f64>,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    p999_us: Option<f64>,
    samples: Option<u64>,
    offered_rate: Option<f64>,
    cdf: Option<Vec<[f64; 2]>>,
    handshakes_per_s: Option<f64>,
    resumed_fraction: Option<f64>,
    cpu_ms_per_handshake: Option<f64>,
    connections: Option<u64>,
    /// The request and response size of a scaling point.
    #[serde(default)]
    message_bytes: Option<u64>,
    rss_per_connection_bytes: Option<f64>,
    /// Open descriptors the relay holds per idle connection.
    fds_per_connection: Option<f64>,
    /// The kernel's memory per idle connection, node-wide (every socket of the path: client,
    /// relay legs, upstream), from /proc/meminfo Slab and /proc/net/sockstat TCP pages.
    kernel_bytes_per_connection: Option<f64>,
    /// Relay memory after the workload (process tree, proportional set size).
    rss_bytes: u64,
    /// What carried the bytes, as observed: the agent's per-path connection counters, or the
    /// kernel's kTLS record counters for peers in the guest.
    path_observed: String,
    errors: u64,
    first_error: Option<String>,
    /// How many runs the figures are the median of (`--repeat`).
    #[serde(default)]
    runs: u32,
    /// For a kTLS peer, the directions its rows must show in the kernel's counters.
    #[serde(default)]
    ktls_expected: Option<KtlsDirections>,
    /// A peer's failure on this workload that is known and not the harness's (why it fails):
    /// the row keeps its errors, and the run does not fail for them.
    #[serde(default)]
    known_failure: Option<String>,
    /// For a row of several runs: each figure's smallest and largest value, by figure name.
    #[serde(default)]
    spread: repeat::Spreads,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Skip {
    mode: String,
    relay: String,
    why: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Results {
    scope: Scope,
    simulated: bool,
    quick: bool,
    /// The profile the relay-side binaries were built with ("debug" for quick runs: the test
    /// profile, optimised with debug assertions on).
    build: String,
    date: String,
    kernel: String,
    cpu: String,
    cpus: usize,
    memory_gib: f64,
    versions: BTreeMap<String, String>,
    /// `openssl speed -evp aes-128-gcm` on 16 KiB blocks, one core, bytes per second: the
    /// bound for the suite every row runs (the load generator offers TLS_AES_128_GCM_SHA256).
    crypto_bytes_per_s: Option<f64>,
    /// The same for chacha20-poly1305, the suite of CPUs without AES instructions (shown
    /// beside it; no row runs it).
    #[serde(default)]
    chacha_bytes_per_s: Option<f64>,
    /// The openssl command that measured both (the newest where the guest has it).
    #[serde(default = "default_openssl")]
    crypto_openssl: String,
    sizes: Sizes,
    /// Descriptors one process may hold here (RLIMIT_NOFILE after raising it as far as allowed).
    open_files_limit: u64,
    /// Runs per row (`--repeat`, or separate runs merged): each figure is their median.
    #[serde(default)]
    repeat: u32,
    /// What the clock followed.
    #[serde(default)]
    clock: Clock,
    /// The kernel's transparent huge page setting (/sys/kernel/mm/transparent_hugepage/enabled,
    /// the one in brackets): khugepaged's work for any process is kernel-thread CPU.
    #[serde(default)]
    transparent_hugepages: Option<String>,
    rows: Vec<Row>,
    skipped: Vec<Skip>,
    /// Where the instructions go, for the relays profiled (merged runs: the first run's).
    #[serde(default)]
    profiles: Vec<profile::Profile>,
}

/// Paths and addresses shared by every relay of a run.
struct Bench {
    dir: PathBuf,
    agent: PathBuf,
    loadgen: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    plain_upstream: SocketAddr,
    tls_upstream: SocketAddr,
    sizes: Sizes,
}

/// CPU run so far by a relay and by the kernel's threads ([`Running::cpu_mark`]).
struct CpuMark {
    relay: CpuReading,
    reaped_s: f64,
    kernel_threads: CpuReading,
}

impl CpuMark {
    /// (relay, kernel threads) CPU seconds from `before` to this mark.
    fn since(&self, before: &CpuMark) -> (f64, f64) {
        (
            self.relay.seconds_since(&before.relay) + self.reaped_s - before.reaped_s,
            self.kernel_threads.seconds_since(&before.kernel_threads),
        )
    }
}

/// A started relay; dropping it stops it.
struct Running {
    child: Option<Child>,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
}

impl Running {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the relay's process tree (and the children it reaped) and every kernel thread have
    /// run so far.
    fn cpu_mark(&self) -> CpuMark {
        let pids = self.pid().map(process_tree).unwrap_or_default();
        CpuMark {
            relay: CpuReading::of(pids),
            // Children that ended (socat's per-connection forks) are in the root's cutime/cstime.
            reaped_s: self.pid().map_or(0.0, reaped_children_cpu_seconds),
            kernel_threads: CpuReading::of(kernel_threads()),
        }
    }

    fn fds(&self) -> u64 {
        self.pid().map_or(0, |pid| {
            process_tree(pid)
                .into_iter()
                .filter_map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
                .map(|d| d.count() as u64)
                .sum()
        })
    }

    /// Proportional set size of the process tree: shared pages are split between the
    /// processes that map them, so nginx's and HAProxy's workers are not counted twice.
    fn rss(&self) -> u64 {
        self.pid()
            .map_or(0, |pid| process_tree(pid).into_iter().map(pss_bytes).sum())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        // Each relay leads its own process group (see spawn_logged): SIGTERM to the group first
        // (the agent removes its pins, nginx and HAProxy stop their workers), then SIGKILL to
        // whatever is left of it, socat's forks and nginx's workers included.
        let group = child.id();
        tlsplice_benches::signal_group(group, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        tlsplice_benches::signal_group(group, libc::SIGKILL);
        let _ = child.wait();
    }
}

/// Starts `cmd` as the leader of a new process group, its output into `log`.
fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let file = std::fs::File::create(log)?;
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))
}

impl Bench {
    fn upstream_of(&self, mode: Mode) -> SocketAddr {
        if mode == Mode::Terminate {
            self.plain_upstream
        } else {
            self.tls_upstream
        }
    }

    fn start(&self, relay: Relay, mode: Mode) -> Result<Running> {
        self.start_with_threads(relay, mode, None)
    }

    /// [`Bench::start`], with tlsplice's `--worker-threads` when `worker_threads` is given.
    fn start_with_threads(
        &self,
        relay: Relay,
        mode: Mode,
        worker_threads: Option<usize>,
    ) -> Result<Running> {
        let port = tlsplice_tests::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let up = self.upstream_of(mode);
        let threads = worker_threads.map_or(String::new(), |n| format!("-{n}-threads"));
        let tag = format!(
            "{}-{}{threads}",
            mode.name(),
            relay.label().replace([' ', '(', ')'], "_")
        );
        let log = self.dir.join(format!("{tag}.log"));
        let (ca, cert, key) = (self.ca.display(), self.cert.display(), self.key.display());
        let mut admin = None;
        let child = match relay {
            Relay::Direct => {
                return Ok(Running {
                    child: None,
                    addr: up,
                    admin: None,
                });
            }
            Relay::Tlsplice(path) => {
                let data_path = match path {
                    "ktls" => "ktls",
                    "userspace" => "userspace",
                    _ => "auto",
                };
                let mut config = format!(
                    "[limits]\nmax_connections = 100000\n\n[[listener]]\nname = \"bench\"\nmode = \"{m}\"\n\
                     listen = \"{addr}\"\nupstream = \"{up}\"\ndata_path = \"{data_path}\"\n",
                    m = mode.name()
                );
                if mode != Mode::Passthrough {
                    config.push_str(&format!("cert = \"{cert}\"\nkey = \"{key}\"\n"));
                }
                if mode == Mode::Passthrough {
                    config.push_str(&format!("[listener.sni]\n\"localhost\" = \"{up}\"\n"));
                }
                if mode == Mode::Reencrypt {
                    config.push_str(&format!(
                        "[listener.upstream_tls]\nserver_name = \"localhost\"\nca = \"{ca}\"\n"
                    ));
                }
                let file = self.dir.join(format!("{tag}.toml"));
                std::fs::write(&file, config)?;
                let admin_addr = SocketAddr::from(([127, 0, 0, 1], tlsplice_tests::free_port()));
                admin = Some(admin_addr);
                let passthrough = if path == "sockmap" {
                    "sockmap"
                } else {
                    "splice"
                };
                let ebpf = if path == "sockmap" {
                    "required"
                } else {
                    "auto"
                };
                let threads_flag: Vec<String> = worker_threads
                    .map(|n| vec!["--worker-threads".to_owned(), n.to_string()])
                    .unwrap_or_default();
                spawn_logged(
                    Command::new(&self.agent)
                        .args(["run", "--config"])
                        .arg(&file)
                        .args(&threads_flag)
                        .args(["--passthrough-path", passthrough, "--ebpf", ebpf])
                        .args(["--admin-addr", &admin_addr.to_string()])
                        .args([
                            "--bpf-pin-path",
                            &format!("/sys/fs/bpf/tlsplice-bench-{port}"),
                        ])
                        .env("TLSPLICE_LOG", "warn"),
                    &log,
                )?
            }
            Relay::Haproxy { ktls, .. } => {
                let pem = self.dir.join("haproxy.pem");
                std::fs::write(
                    &pem,
                    std::fs::read_to_string(&self.cert)? + &std::fs::read_to_string(&self.key)?,
                )?;
                // HAProxy 3.3+ hands a TLS line's keys to the kernel with `ktls on`. Without
                // `option splice-auto`: with it, HAProxy 3.4.7 spliced a bulk transfer's bytes
                // and never passed the upstream's answer back (the client saw the connection
                // close); it reads and writes the kTLS sockets itself.
                let ktls_option = if ktls { " ktls on" } else { "" };
                // kTLS is an experimental directive in HAProxy 3.3 and 3.4.
                let experimental = if ktls {
                    "  expose-experimental-directives\n"
                } else {
                    ""
                };
                let (bind, server, options) = match mode {
                    Mode::Terminate => (
                        format!(
                            "{addr} ssl crt {} ssl-min-ver TLSv1.3{ktls_option}",
                            pem.display()
                        ),
                        format!("{up}"),
                        "",
                    ),
                    Mode::Reencrypt => (
                        format!(
                            "{addr} ssl crt {} ssl-min-ver TLSv1.3{ktls_option}",
                            pem.display()
                        ),
                        format!(
                            "{up} ssl verify required ca-file {ca} sni str(localhost) ssl-min-ver TLSv1.3{ktls_option}"
                        ),
                        "",
                    ),
                    Mode::Passthrough => {
                        (format!("{addr}"), format!("{up}"), "  option splice-auto\n")
                    }
                };
                // Passthrough routes on the ClientHello's server name, as tlsplice does.
                let route = if mode == Mode::Passthrough {
                    "  tcp-request inspect-delay 5s\n  tcp-request content accept if { req_ssl_hello_type 1 }\n  \
                     use_backend be if { req_ssl_sni -i localhost }\n"
                } else {
                    "  default_backend be\n"
                };
                // As many connections as its descriptors allow (two each, and room for its
                // own: HAProxy refuses to start when maxconn needs more than the limit): the
                // idle workload holds thousands. Its splice pipes (passthrough) are reserved
                // from the same limit, a quarter of maxconn unless told: 512 are plenty for
                // the bulk workloads' 16 connections.
                let maxconn = tlsplice_benches::open_files_limit().saturating_sub(1500) / 2;
                let config = format!(
                    "global\n  maxconn {maxconn}\n  maxpipes 512\n{experimental}\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n{options}\n\
                     frontend fe\n  bind {bind}\n{route}\nbackend be\n  server up {server}\n"
                );
                let file = self.dir.join(format!("{tag}.cfg"));
                std::fs::write(&file, config)?;
                let program = relay.program().unwrap_or("haproxy");
                spawn_logged(Command::new(program).args(["-db", "-f"]).arg(&file), &log)?
            }
            Relay::Nginx { ktls, build } => {
                let ktls_option = if ktls {
                    "ssl_conf_command Options KTLS;"
                } else {
                    ""
                };
                let proxy_ktls = if ktls {
                    "proxy_ssl_conf_command Options KTLS;"
                } else {
                    ""
                };
                let (listen, tls) = match mode {
                    // Routed on the ClientHello's server name (ssl_preread), as tlsplice does.
                    Mode::Passthrough => (format!("{addr}"), "ssl_preread on;".to_owned()),
                    _ => (
                        format!("{addr} ssl"),
                        format!(
                            "ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.3; {ktls_option}"
                        ),
                    ),
                };
                let upstream_tls = if mode == Mode::Reencrypt {
                    format!(
                        "proxy_ssl on; proxy_ssl_verify on; proxy_ssl_trusted_certificate {ca}; proxy_ssl_name localhost; \
                         proxy_ssl_server_name on; proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on; {proxy_ktls}"
                    )
                } else {
                    String::new()
                };
                let module = match build {
                    Build::Debian12 => Some("/usr/lib/nginx/modules/ngx_stream_module.so".into()),
                    Build::Newest => std::env::var(NEWEST_STREAM_MODULE_ENV).ok(),
                };
                let module = module
                    .filter(|m| Path::new(m).exists())
                    .map(|m| format!("load_module {m};\n"))
                    .unwrap_or_default();
                let (map, target) = if mode == Mode::Passthrough {
                    (
                        format!("  map $ssl_preread_server_name $route {{ localhost {up}; }}\n"),
                        "$route".to_owned(),
                    )
                } else {
                    (String::new(), up.to_string())
                };
                let config = format!(
                    "{module}daemon off;\nmaster_process on;\nworker_processes auto;\nuser root;\n\
                     worker_rlimit_nofile {nofile};\npid {dir}/{tag}.pid;\nerror_log {log} warn;\n\
                     events {{ worker_connections {nofile}; }}\n\
                     stream {{\n{map}  server {{\n    listen {listen};\n    {tls}\n    {upstream_tls}\n    proxy_pass {target};\n    proxy_timeout 1h;\n    proxy_half_close on;\n  }}\n}}\n",
                    dir = self.dir.display(),
                    log = log.display(),
                    // A stream connection is two worker connections (client and upstream): as
                    // many as a worker's descriptors allow, one worker may hold them all. Capped:
                    // nginx allocates every worker connection up front (about 400 bytes each),
                    // and a guest's limit of a million would take 400 MiB of its 2 GiB.
                    nofile = tlsplice_benches::open_files_limit()
                        .min(40_000)
                        .saturating_sub(200),
                );
                let file = self.dir.join(format!("{tag}.conf"));
                std::fs::write(&file, config)?;
                spawn_logged(
                    Command::new(relay.program().unwrap_or("nginx"))
                        .arg("-p")
                        .arg(&self.dir)
                        .arg("-e")
                        .arg(&log)
                        .arg("-c")
                        .arg(&file),
                    &self.dir.join(format!("{tag}.out")),
                )?
            }
            Relay::Stunnel => {
                let config = format!(
                    "foreground = yes\npid =\ndebug = 3\noutput = {log}\n\n[bench]\naccept = {addr}\nconnect = {up}\n\
                     cert = {cert}\nkey = {key}\nsslVersionMin = TLSv1.3\n\
                     socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n",
                    log = log.display()
                );
                let file = self.dir.join(format!("{tag}.conf"));
                std::fs::write(&file, config)?;
                spawn_logged(
                    Command::new("stunnel4").arg(&file),
                    &self.dir.join(format!("{tag}.out")),
                )?
            }
            Relay::Socat => spawn_logged(
                // The same socket settings the others have: no Nagle delay, 64 KiB copies.
                Command::new("socat").args([
                    "-b".to_owned(),
                    "65536".to_owned(),
                    format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096,nodelay"),
                    format!("TCP:{up},nodelay"),
                ]),
                &log,
            )?,
        };
        let mut running = Running {
            child: Some(child),
            addr,
            admin,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = match admin {
                Some(a) => {
                    tlsplice_tests::http_get(a, "/readyz").is_ok_and(|(code, _)| code == 200)
                }
                None => TcpStream::connect(addr).is_ok(),
            };
            if ready {
                break;
            }
            if let Some(Ok(Some(status))) = running.child.as_mut().map(Child::try_wait) {
                bail!(
                    "{} exited ({status}) at start: {}",
                    relay.label(),
                    tail(&log)
                );
            }
            if Instant::now() > deadline {
                bail!("{} did not start in 30 s: {}", relay.label(), tail(&log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(running)
    }

    /// Runs the traffic generator to its end; a relay that stalls it is given `limit`, then
    /// it is killed and the row fails.
    fn loadgen(&self, args: &[String], limit: Duration) -> Result<serde_json::Value> {
        let loadgen = Loadgen::spawn(&self.loadgen, args)?;
        let line = loadgen.next_line(limit, "report")?;
        let status = loadgen.finish(AFTER_REPORT)?;
        if !status.success() {
            bail!("tlsplice-loadgen {args:?} failed: {status}");
        }
        serde_json::from_str(line.trim()).with_context(|| format!("loadgen printed {line:?}"))
    }

    fn target_args(&self, addr: SocketAddr) -> Vec<String> {
        vec![
            "--addr".into(),
            addr.to_string(),
            "--ca".into(),
            self.ca.display().to_string(),
        ]
    }

    /// Runs one workload through a started relay and measures it.
    fn measure(&self, running: &Running, workload: Workload) -> Result<Row> {
        let s = &self.sizes;
        let mut args: Vec<String> = Vec::new();
        let target = self.target_args(running.addr);
        let paths_before = observed_paths(running.admin);
        if workload == Workload::Idle {
            // Settled before as after (see `idle`): memory a relay freed before this row (its
            // start, the rows before) must not count against the idle connections.
            std::thread::sleep(Duration::from_secs(3));
        }
        let rss_before = running.rss();
        let fds_before = running.fds();
        let (cpu0, n0) = (running.cpu_mark(), node_busy_seconds());
        let start = Instant::now();
        let mut row = Row::default();
        let report = if workload == Workload::Idle {
            let kernel_before = kernel_connection_memory_bytes();
            let (report, held) = self.idle(running, &target)?;
            let established = report["established"].as_u64().unwrap_or(0);
            row.connections = Some(established);
            let rss_held = held.rss;
            if established > 0 {
                let n = established as f64;
                row.rss_per_connection_bytes = Some((rss_held as f64 - rss_before as f64) / n);
                row.fds_per_connection = Some((held.fds as f64 - fds_before as f64) / n);
                row.kernel_bytes_per_connection = kernel_before
                    .zip(held.kernel)
                    .map(|(before, held)| (held as f64 - before as f64) / n);
            }
            row.rss_bytes = rss_held;
            report
        } else {
            match workload {
                Workload::Bulk1 | Workload::Bulk16 => {
                    let (bytes, conns) = if workload == Workload::Bulk1 {
                        (s.bulk_bytes, 1)
                    } else {
                        (s.bulk16_bytes, 16)
                    };
                    args.extend(["bulk".into(), "--bytes".into(), bytes.to_string()]);
                    args.extend(["--conns".into(), conns.to_string()]);
                }
                Workload::Rr1k | Workload::Rr64k => {
                    let (size, rate) = if workload == Workload::Rr1k {
                        (1024, s.rr_small_rate)
                    } else {
                        (65536, s.rr_large_rate)
                    };
                    args.extend(["rr".into(), "--size".into(), size.to_string()]);
                    args.extend(["--rate".into(), rate.to_string()]);
                    args.extend(["--secs".into(), s.rr_secs.to_string()]);
                }
                Workload::HandshakeNew | Workload::HandshakeResumed => {
                    args.extend(["handshakes".into(), "--secs".into()]);
                    args.push(s.handshake_secs.to_string());
                    if workload == Workload::HandshakeResumed {
                        args.push("--resume".into());
                    }
                }
                Workload::Idle => unreachable!("handled above"),
                Workload::Scale | Workload::Profile | Workload::Threads => {
                    bail!("{} is measured point by point", workload.label())
                }
            }
            args.extend(target);
            // Generous: a relay at 1 MiB/s still finishes; one that stalls fails its row.
            let limit = match workload {
                Workload::Bulk1 => s.bulk_bytes >> 20,
                Workload::Bulk16 => 16 * (s.bulk16_bytes >> 20),
                _ => 0,
            } + 120
                + (s.rr_secs.max(s.handshake_secs) as u64);
            self.loadgen(&args, Duration::from_secs(limit))?
        };
        // Let the relay finish its bookkeeping for the connections before reading its CPU.
        std::thread::sleep(Duration::from_millis(300));
        let wall = start.elapsed().as_secs_f64();
        (row.relay_cpu_s, row.kernel_threads_cpu_s) = running.cpu_mark().since(&cpu0);
        row.node_cpu_s = node_busy_seconds() - n0;
        let cpu = row.relay_cpu_s + row.kernel_threads_cpu_s;
        if row.rss_bytes == 0 {
            row.rss_bytes = running.rss();
        }
        errors_reported(&mut row, &report);
        let f = |k: &str| report[k].as_f64();
        match workload {
            Workload::Bulk1 | Workload::Bulk16 => {
                row.bytes = report["bytes"].as_u64().unwrap_or(0);
                row.secs = f("secs").unwrap_or(wall);
                row.throughput_mib_s = Some(row.bytes as f64 / MIB / row.secs);
                if row.bytes > 0 {
                    let gib = row.bytes as f64 / GIB;
                    row.cpu_s_per_gib = Some(cpu / gib);
                    row.node_cpu_s_per_gib = Some(row.node_cpu_s / gib);
                }
            }
            Workload::Rr1k | Workload::Rr64k => {
                request_response_figures(&mut row, &report, wall);
                row.offered_rate = f("offered_rate");
                row.cdf = serde_json::from_value(report["cdf"].clone()).ok();
                let size = report["size"].as_u64().unwrap_or(0);
                row.bytes = size * row.samples.unwrap_or(0);
            }
            Workload::HandshakeNew | Workload::HandshakeResumed => {
                row.secs = f("secs").unwrap_or(wall);
                row.handshakes_per_s = f("per_sec");
                let n = report["handshakes"].as_u64().unwrap_or(0);
                if n > 0 {
                    row.resumed_fraction =
                        Some(report["resumed"].as_u64().unwrap_or(0) as f64 / n as f64);
                    row.cpu_ms_per_handshake = Some(cpu * 1000.0 / n as f64);
                }
            }
            Workload::Idle | Workload::Scale | Workload::Profile | Workload::Threads => {
                row.secs = wall
            }
        }
        let closing = if workload == Workload::Idle {
            row.connections.unwrap_or(0)
        } else {
            0
        };
        row.path_observed = paths_once_reported(running, &paths_before, closing);
        Ok(row)
    }

    /// One point of the scaling sweep: request/response of `size` bytes over `conns`
    /// connections at the offered rate of [`Sizes::scale_rate`]. The relay's CPU is read once
    /// every connection is open, so the handshakes are not counted against the bytes; CPU per
    /// GiB is over the bytes relayed both ways.
    /// With `record` (perf, its data file) the measured part is recorded.
    fn scale_point(
        &self,
        running: &Running,
        conns: usize,
        size: usize,
        record: Option<(&Path, &Path)>,
    ) -> Result<Row> {
        let s = &self.sizes;
        let rate = s.scale_rate(size);
        // Before the connections open: the kernel's kTLS counters (the peers' path) count a
        // connection when its keys are set.
        let paths_before = observed_paths(running.admin);
        let args: Vec<String> = ["rr", "--wait", "--size", &size.to_string()]
            .into_iter()
            .map(str::to_owned)
            .chain(["--rate".into(), rate.to_string()])
            .chain(["--secs".into(), s.scale_secs.to_string()])
            .chain(["--conns".into(), conns.to_string()])
            .chain(self.target_args(running.addr))
            .collect();
        let mut loadgen = Loadgen::spawn(&self.loadgen, &args)?;
        // Generous: a thousand handshakes on an emulated CPU, then the requests.
        let limit =
            Duration::from_secs(120 + conns as u64 / 5) + Duration::from_secs_f64(s.scale_secs);
        let connected = loadgen.next_line(limit, "connected line")?;
        if !connected.contains("connected") {
            bail!("loadgen did not open its {conns} connections: {connected:?}");
        }
        // Settled: the handshakes' work (and its timers) out of the way.
        std::thread::sleep(Duration::from_secs(1));
        let recording = record
            .map(|(perf, data)| profile::PerfRecord::start(perf, data))
            .transpose()?;
        let (cpu0, n0) = (running.cpu_mark(), node_busy_seconds());
        let start = Instant::now();
        loadgen.say("go")?;
        let line = loadgen.next_line(limit, "result")?;
        let status = loadgen.finish(AFTER_REPORT)?;
        std::thread::sleep(Duration::from_millis(300));
        let mut row = Row::default();
        (row.relay_cpu_s, row.kernel_threads_cpu_s) = running.cpu_mark().since(&cpu0);
        if let Some(recording) = recording {
            recording.stop()?;
        }
        row.node_cpu_s = node_busy_seconds() - n0;
        let report: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("loadgen ({status}) printed {line:?}"))?;
        request_response_figures(&mut row, &report, start.elapsed().as_secs_f64());
        row.offered_rate = Some(rate);
        row.connections = Some(conns as u64);
        row.message_bytes = Some(size as u64);
        // Both ways: every request and its echo crossed the relay.
        row.bytes = 2 * size as u64 * row.samples.unwrap_or(0);
        if row.bytes > 0 {
            let gib = row.bytes as f64 / GIB;
            row.cpu_s_per_gib = Some((row.relay_cpu_s + row.kernel_threads_cpu_s) / gib);
            row.node_cpu_s_per_gib = Some(row.node_cpu_s / gib);
        }
        row.rss_bytes = running.rss();
        row.path_observed = paths_once_reported(running, &paths_before, conns as u64);
        Ok(row)
    }

    /// Profiles a running relay with `perf` through one workload: bulk on one connection, or
    /// the scaling sweep's point of `conns` connections. Not a row: perf's sampling costs
    /// instructions of its own, so the counted rows are measured without it.
    fn profile(
        &self,
        running: &Running,
        perf: &Path,
        workload: Workload,
        conns: usize,
    ) -> profile::Profile {
        let data = self.dir.join("perf.data");
        let recorded = || -> Result<(f64, String)> {
            if workload == Workload::Scale {
                let size = self.sizes.scale_size;
                let row = self.scale_point(running, conns, size, Some((perf, &data)))?;
                if row.errors > 0 {
                    bail!("the point failed: {}", row.first_error.unwrap_or_default());
                }
                Ok((
                    row.relay_cpu_s + row.kernel_threads_cpu_s,
                    scale_label(conns, size),
                ))
            } else {
                let bytes = self.sizes.bulk_bytes;
                let mut args: Vec<String> = ["bulk", "--bytes", &bytes.to_string()]
                    .into_iter()
                    .map(str::to_owned)
                    .chain(["--conns".into(), "1".into()])
                    .collect();
                args.extend(self.target_args(running.addr));
                let recording = profile::PerfRecord::start(perf, &data)?;
                let cpu0 = running.cpu_mark();
                let report = self.loadgen(&args, Duration::from_secs(120 + (bytes >> 20)))?;
                std::thread::sleep(Duration::from_millis(300));
                let (relay, kernel) = running.cpu_mark().since(&cpu0);
                recording.stop()?;
                if report["errors"].as_u64().unwrap_or(0) > 0 {
                    bail!("the transfer failed: {}", report["first_error"]);
                }
                Ok((relay + kernel, Workload::Bulk1.label().to_owned()))
            }
        };
        let mut profile = profile::Profile::default();
        let result = recorded().and_then(|(cpu, label)| {
            profile.counted_cpu_s = cpu;
            profile.workload = label;
            // The relay's processes and the kernel's threads: what the rows' CPU counts.
            let mut pids = running.pid().map(process_tree).unwrap_or_default();
            pids.extend(kernel_threads());
            profile::read(perf, &data, &pids)
        });
        match result {
            Ok((samples, functions, objects)) => {
                profile.samples = samples;
                profile.functions = functions;
                profile.objects = objects;
            }
            Err(e) => profile.error = Some(format!("{e:#}")),
        }
        let _ = std::fs::remove_file(&data);
        profile
    }

    /// Opens the idle connections, waits for the relay to settle, reads what it and the kernel
    /// hold, closes them.
    fn idle(&self, running: &Running, target: &[String]) -> Result<(serde_json::Value, Held)> {
        let args: Vec<String> = ["idle".into(), "--count".into()]
            .into_iter()
            .chain([self.sizes.idle_count.to_string()])
            .chain(target.iter().cloned())
            .collect();
        let loadgen = Loadgen::spawn(&self.loadgen, &args)?;
        // Generous: every connection a handshake at emulated speed.
        let limit = Duration::from_secs(120 + self.sizes.idle_count as u64 / 5);
        let line = loadgen.next_line(limit, "count of established connections")?;
        // Settled: what the handshakes freed has gone back to the kernel where the relay's
        // allocator gives it back (jemalloc's decay is a second for tlsplice).
        std::thread::sleep(Duration::from_secs(3));
        let held = Held {
            rss: running.rss(),
            fds: running.fds(),
            kernel: kernel_connection_memory_bytes(),
        };
        // It closes its connections now: as long again as it took to open them, at most.
        let status = loadgen.finish(limit)?;
        let report: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("idle loadgen ({status}) printed {line:?}"))?;
        Ok((report, held))
    }
}

/// A child process that is killed (if still running) and reaped when this is dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How long the load generator may take to end once it has printed its report (it closes
/// its connections).
const AFTER_REPORT: Duration = Duration::from_secs(60);

/// A running tlsplice-loadgen. Its stdout is read line by line on a thread, so every wait for
/// it has a deadline; it is killed and reaped however the row ends, so a relay that stalls a
/// request fails its row instead of holding the run.
struct Loadgen {
    child: Reaped,
    lines: std::sync::mpsc::Receiver<std::io::Result<String>>,
    args: Vec<String>,
}

impl Loadgen {
    /// Starts it with these arguments; its stdin is a pipe it may wait on (`--wait`, `idle`).
    fn spawn(program: &Path, args: &[String]) -> Result<Self> {
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("running tlsplice-loadgen {args:?}"))?;
        let mut child = Reaped(child);
        let stdout = child.0.stdout.take().context("loadgen stdout")?;
        let (send, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            args: args.to_vec(),
        })
    }

    /// The next line it prints (`what` names it in the error), within `limit`.
    fn next_line(&self, limit: Duration, what: &str) -> Result<String> {
        match self.lines.recv_timeout(limit) {
            Ok(line) => Ok(line?),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => bail!(
                "tlsplice-loadgen {:?}: no {what} in {} s",
                self.args,
                limit.as_secs()
            ),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                bail!("tlsplice-loadgen {:?} ended without its {what}", self.args)
            }
        }
    }

    /// Writes a line to its stdin (`--wait`: "go").
    fn say(&mut self, line: &str) -> Result<()> {
        let stdin = self.child.0.stdin.as_mut().context("loadgen stdin")?;
        writeln!(stdin, "{line}").context("writing to tlsplice-loadgen")
    }

    /// Closes its stdin: `idle` closes its connections then, every mode ends.
    fn close_stdin(&mut self) {
        drop(self.child.0.stdin.take());
    }

    /// Closes its stdin and waits, up to `limit`, for it to end; past that it is killed.
    fn finish(mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        self.close_stdin();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.0.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "tlsplice-loadgen {:?} did not end within {} s of its report",
                    self.args,
                    limit.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The figures every request/response report has: duration (`wall` when it has none),
/// latency percentiles, requests answered, errors.
fn request_response_figures(row: &mut Row, report: &serde_json::Value, wall: f64) {
    let f = |k: &str| report[k].as_f64();
    row.secs = f("secs").unwrap_or(wall);
    row.p50_us = f("p50_us");
    row.p99_us = f("p99_us");
    row.p999_us = f("p999_us");
    row.samples = report["samples"].as_u64();
    errors_reported(row, report);
}

/// The load generator's error count and first error.
fn errors_reported(row: &mut Row, report: &serde_json::Value) {
    row.errors = report["errors"].as_u64().unwrap_or(0);
    row.first_error = report["first_error"].as_str().map(str::to_owned);
}

/// The paths that carried connections since `before`. The agent reports a connection when it
/// has closed it (thousands of closes on an emulated CPU take seconds), so with an admin
/// address this waits, up to two minutes, until `closing` more are reported.
fn paths_once_reported(running: &Running, before: &BTreeMap<String, f64>, closing: u64) -> String {
    let mut after = observed_paths(running.admin);
    let deadline = Instant::now() + Duration::from_secs(120);
    while running.admin.is_some()
        && reported(before, &after) < closing as f64
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(500));
        after = observed_paths(running.admin);
    }
    path_difference(before, &after)
}

/// What a relay and the kernel hold while the idle connections are open.
struct Held {
    /// The relay's proportional set size.
    rss: u64,
    /// The relay's open descriptors.
    fds: u64,
    /// The kernel's connection memory, node-wide.
    kernel: Option<u64>,
}

/// What carried connections since the last look: the agent's `tlsplice_connections_total` by
/// `data_path` when there is an admin address, else the kernel's kTLS record counters.
fn observed_paths(admin: Option<SocketAddr>) -> BTreeMap<String, f64> {
    let mut seen = BTreeMap::new();
    match admin {
        Some(a) => {
            let Ok((_, body)) = tlsplice_tests::http_get(a, "/metrics") else {
                return seen;
            };
            for line in body.lines() {
                let Some(rest) = line.strip_prefix("tlsplice_connections_total{") else {
                    continue;
                };
                let Some((labels, value)) = rest.rsplit_once("} ") else {
                    continue;
                };
                let path = labels
                    .split(',')
                    .find_map(|l| l.strip_prefix("data_path=\""))
                    .map(|p| p.trim_end_matches('"').to_owned())
                    .unwrap_or_default();
                if path.is_empty() || path == "none" {
                    continue;
                }
                *seen.entry(format!("{path} connections")).or_insert(0.0) +=
                    value.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
        None => {
            for line in std::fs::read_to_string("/proc/net/tls_stat")
                .unwrap_or_default()
                .lines()
            {
                let mut f = line.split_whitespace();
                if let (Some(k), Some(v)) = (f.next(), f.next())
                    && matches!(k, "TlsTxSw" | "TlsRxSw" | "TlsTxDevice" | "TlsRxDevice")
                {
                    seen.insert(format!("kTLS {k}"), v.parse().unwrap_or(0.0));
                }
            }
        }
    }
    seen
}

/// What grew between two readings of the per-path counters, and by how much.
fn growth<'a>(
    before: &'a BTreeMap<String, f64>,
    after: &'a BTreeMap<String, f64>,
) -> impl Iterator<Item = (&'a String, f64)> {
    after.iter().filter_map(|(k, v)| {
        let d = v - before.get(k).copied().unwrap_or(0.0);
        (d > 0.0).then_some((k, d))
    })
}

/// How many connections the agent reported between two readings of its per-path counters.
fn reported(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> f64 {
    growth(before, after).map(|(_, d)| d).sum()
}

fn path_difference(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> String {
    let parts: Vec<String> = growth(before, after)
        .map(|(k, d)| format!("{k} +{d}"))
        .collect();
    parts.join(", ")
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// The first line a command prints (stdout, then stderr) that contains `needle`.
fn command_line(program: &str, args: &[&str], needle: &str) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find(|l| !l.trim().is_empty() && l.contains(needle))
        .map(|l| l.trim().to_owned())
}

fn default_openssl() -> String {
    "openssl".into()
}

/// The transparent huge page mode in force ("always", "madvise", "never"), if the kernel says.
fn transparent_hugepages() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    bracketed(&text).map(str::to_owned)
}

/// The choice a sysfs setting marks as in force: "always madvise [never]" is "never".
fn bracketed(setting: &str) -> Option<&str> {
    let (_, rest) = setting.split_once('[')?;
    let (chosen, _) = rest.split_once(']')?;
    Some(chosen)
}

/// The openssl command for the crypto bound: the newest where the guest has it (the one the
/// newest peers run on).
fn crypto_openssl() -> &'static str {
    if tlsplice_benches::which("openssl-sid").is_some() {
        "openssl-sid"
    } else {
        "openssl"
    }
}

/// `openssl speed -evp <cipher>` on 16 KiB blocks, one core: bytes per second.
fn crypto_speed(cipher: &str, quick: bool) -> Option<f64> {
    let secs = if quick { "1" } else { "3" };
    let out = Command::new(crypto_openssl())
        .args(["speed", "-evp", cipher, "-bytes", "16384", "-seconds", secs])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    // The last line is "AES-128-GCM  <thousands of bytes per second>k" (or ChaCha20-Poly1305).
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rev().find(|l| l.trim_end().ends_with('k'))?;
    let value = last.split_whitespace().last()?.trim_end_matches('k');
    value.parse::<f64>().ok().map(|k| k * 1000.0)
}

fn machine() -> (String, usize, f64) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / MIB);
    (cpu, cpus, mem)
}

/// Which rows of a run to measure (empty: all).
struct Only {
    workloads: Vec<Workload>,
    relays: Vec<String>,
}

#[allow(clippy::too_many_arguments)] // one per option of `tlsplice-bench run`
fn run(
    quick: bool,
    scope: Scope,
    agent: PathBuf,
    loadgen: PathBuf,
    out: &str,
    only: &Only,
    repeat: u32,
    clock: Clock,
) -> Result<()> {
    raise_open_files_limit();
    let dir = std::env::temp_dir().join(format!("tlsplice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pki = tlsplice_tests::TestPki::generate();
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&ca, &pki.ca_pem)?;
    std::fs::write(&cert, &pki.server_cert_pem)?;
    std::fs::write(&key, &pki.server_key_pem)?;

    let plain_upstream = SocketAddr::from(([127, 0, 0, 1], tlsplice_tests::free_port()));
    let tls_upstream = SocketAddr::from(([127, 0, 0, 1], tlsplice_tests::free_port()));
    let mut upstreams = Vec::new();
    for (addr, tls) in [(plain_upstream, false), (tls_upstream, true)] {
        let mut c = Command::new(&loadgen);
        c.args(["upstream", "--listen", &addr.to_string()]);
        if tls {
            c.arg("--cert").arg(&cert).arg("--key").arg(&key);
        }
        upstreams.push(Running {
            child: Some(spawn_logged(
                &mut c,
                &dir.join(format!("upstream-{tls}.log")),
            )?),
            addr,
            admin: None,
        });
    }
    for u in &upstreams {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(u.addr).is_err() {
            if Instant::now() > deadline {
                bail!("the upstream at {} did not start", u.addr);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let bench = Bench {
        dir: dir.clone(),
        agent,
        loadgen,
        ca,
        cert,
        key,
        plain_upstream,
        tls_upstream,
        sizes: Sizes::new(scope, quick),
    };
    let (cpu, cpus, memory_gib) = machine();
    let mut versions = BTreeMap::new();
    let agent_program = bench.agent.display().to_string();
    for (name, program, args, needle) in [
        (
            "tlsplice",
            agent_program.as_str(),
            &["--version"][..],
            "tlsplice",
        ),
        ("haproxy", "haproxy", &["-v"][..], "version"),
        ("haproxy-sid", "haproxy-sid", &["-v"][..], "version"),
        ("nginx", "nginx", &["-v"][..], "version"),
        ("nginx-sid", "nginx-sid", &["-V"][..], "version"),
        ("nginx-sid openssl", "nginx-sid", &["-V"][..], "OpenSSL"),
        ("stunnel", "stunnel4", &["-version"][..], "stunnel "),
        ("socat", "socat", &["-V"][..], "socat version"),
        ("openssl", "openssl", &["version"][..], "OpenSSL"),
        ("openssl-sid", "openssl-sid", &["version"][..], "OpenSSL"),
    ] {
        if let Some(v) = command_line(program, args, needle) {
            versions.insert(name.to_owned(), v);
        }
    }
    let mut results = Results {
        scope,
        simulated: scope == Scope::Guest,
        quick,
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
        date: command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"], "UTC").unwrap_or_default(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        cpu,
        cpus,
        memory_gib,
        versions,
        crypto_bytes_per_s: crypto_speed("aes-128-gcm", quick),
        chacha_bytes_per_s: crypto_speed("chacha20-poly1305", quick),
        crypto_openssl: crypto_openssl().into(),
        sizes: bench.sizes.clone(),
        open_files_limit: tlsplice_benches::open_files_limit(),
        repeat,
        clock,
        transparent_hugepages: transparent_hugepages(),
        rows: Vec::new(),
        skipped: Vec::new(),
        profiles: Vec::new(),
    };
    println!(
        "bench: {:?} scope, kernel {}, {} x {}, quick={quick}, {repeat} run(s) per row",
        scope, results.kernel, cpus, results.cpu
    );
    // The sweeps that belong to one scope, said once.
    let wanted = |w: Workload| only.workloads.is_empty() || only.workloads.contains(&w);
    if wanted(Workload::Scale) && bench.sizes.scale_points().is_empty() {
        results.skipped.push(Skip {
            mode: "terminate, reencrypt".into(),
            relay: format!("every relay ({})", Workload::Scale.label()),
            why: "the scaling sweep runs in the guest, beside the kernel path".into(),
        });
    }
    if wanted(Workload::Threads) && scope != Scope::Host {
        results.skipped.push(Skip {
            mode: "terminate".into(),
            relay: format!("tlsplice userspace ({})", Workload::Threads.label()),
            why: "worker threads are measured on the host's real CPUs (the guest has one)".into(),
        });
    }
    for mode in [Mode::Terminate, Mode::Reencrypt, Mode::Passthrough] {
        let (run_these, skip_these) = relays(scope, mode);
        for (relay, why) in skip_these {
            results.skipped.push(Skip {
                mode: mode.name().into(),
                relay: relay.label(),
                why: why.into(),
            });
        }
        for relay in run_these {
            if !only.relays.is_empty() && !only.relays.contains(&relay.label()) {
                continue;
            }
            if let Some(why) = cannot_run(relay, &results.versions) {
                println!("bench: skip {} {}: {why}", mode.name(), relay.label());
                results.skipped.push(Skip {
                    mode: mode.name().into(),
                    relay: relay.label(),
                    why,
                });
                continue;
            }
            let mut running = match bench.start(relay, mode) {
                Ok(r) => r,
                Err(e) => {
                    println!("bench: {} {}: {e:#}", mode.name(), relay.label());
                    results.rows.push(Row {
                        mode: mode.name().into(),
                        relay: relay.label(),
                        peer: relay.is_peer(),
                        workload: "start".into(),
                        errors: 1,
                        first_error: Some(format!("{e:#}")),
                        ..Row::default()
                    });
                    continue;
                }
            };
            'workloads: for workload in WORKLOADS {
                if !only.workloads.is_empty() && !only.workloads.contains(&workload) {
                    continue;
                }
                if workload == Workload::Scale {
                    if let Some(why) = relay.outside_scaling_sweep() {
                        if !bench.sizes.scale_points().is_empty() {
                            results.skipped.push(Skip {
                                mode: mode.name().into(),
                                relay: relay.with_workload(workload),
                                why: why.into(),
                            });
                        }
                        continue;
                    }
                    for (conns, size) in bench.sizes.scale_points() {
                        let mut row = bench
                            .scale_point(&running, conns, size, None)
                            .unwrap_or_else(|e| Row {
                                errors: 1,
                                first_error: Some(format!("{e:#}")),
                                connections: Some(conns as u64),
                                message_bytes: Some(size as u64),
                                ..Row::default()
                            });
                        row.mode = mode.name().into();
                        row.relay = relay.label();
                        row.peer = relay.is_peer();
                        row.ktls_expected = relay.ktls_expected();
                        row.workload = scale_label(conns, size);
                        row.runs = 1;
                        println!("bench: {}", one_line(&row));
                        results.rows.push(row);
                    }
                    continue;
                }
                if workload == Workload::Profile {
                    // A quick run checks that profiling works, on tlsplice alone.
                    let wanted = relay.profiled() && (!quick || relay == Relay::Tlsplice("ktls"));
                    if scope != Scope::Guest || !wanted {
                        continue;
                    }
                    let Some(perf) = tlsplice_benches::which("perf-sid") else {
                        results.skipped.push(Skip {
                            mode: mode.name().into(),
                            relay: relay.with_workload(workload),
                            why: "the guest has no perf (sid's linux-perf comes with the newest peers)".into(),
                        });
                        continue;
                    };
                    let most = bench.sizes.scale_conns.iter().copied().max();
                    let points = std::iter::once((Workload::Bulk1, 1))
                        .chain(most.map(|conns| (Workload::Scale, conns)));
                    for (profiled, conns) in points {
                        let mut p = bench.profile(&running, &perf, profiled, conns);
                        p.mode = mode.name().into();
                        p.relay = relay.label();
                        println!(
                            "bench: profile {} {} {}: {} samples{}",
                            p.mode,
                            p.relay,
                            p.workload,
                            p.samples,
                            p.error
                                .as_deref()
                                .map_or(String::new(), |e| format!(", {e}"))
                        );
                        results.profiles.push(p);
                    }
                    continue;
                }
                if workload == Workload::Threads {
                    // tlsplice's own user-space terminate, on the host's real CPUs: a fresh
                    // agent per thread count.
                    if scope != Scope::Host
                        || mode != Mode::Terminate
                        || relay != Relay::Tlsplice("userspace")
                    {
                        continue;
                    }
                    for n in thread_counts(cpus, quick) {
                        let runs = (0..repeat)
                            .map(|_| {
                                let row = bench
                                    .start_with_threads(relay, mode, Some(n))
                                    .and_then(|r| bench.measure(&r, Workload::HandshakeNew));
                                let mut row = row.unwrap_or_else(|e| Row {
                                    errors: 1,
                                    first_error: Some(format!("{e:#}")),
                                    ..Row::default()
                                });
                                row.mode = mode.name().into();
                                row.relay = relay.label();
                                row.workload = threads_label(n);
                                row
                            })
                            .collect();
                        let row = repeat::combine(runs);
                        println!("bench: {}", one_line(&row));
                        results.rows.push(row);
                    }
                    continue;
                }
                if workload == Workload::Idle && relay == Relay::Socat {
                    results.skipped.push(Skip {
                        mode: mode.name().into(),
                        relay: relay.with_workload(workload),
                        why: "socat forks a process per connection: thousands of idle connections are thousands of processes".into(),
                    });
                    continue;
                }
                let label = |mut row: Row| {
                    row.mode = mode.name().into();
                    row.relay = relay.label();
                    row.peer = relay.is_peer();
                    row.ktls_expected = relay.ktls_expected();
                    row.workload = workload.label().into();
                    row
                };
                let mut runs = Vec::new();
                for round in 1..=repeat {
                    if workload == Workload::Idle {
                        // A fresh relay: what the earlier workloads left resident (allocator
                        // arenas, pools) must not be mistaken for, or hide, per-connection
                        // memory.
                        drop(running);
                        running = match bench.start(relay, mode) {
                            Ok(r) => r,
                            Err(e) => {
                                // The relay is gone: its remaining workloads cannot run.
                                let lost = label(Row {
                                    errors: 1,
                                    first_error: Some(format!(
                                        "restarting for the idle workload: {e:#}"
                                    )),
                                    ..Row::default()
                                });
                                println!("bench: {}", one_line(&lost));
                                runs.push(lost);
                                results
                                    .rows
                                    .push(repeat::combine(std::mem::take(&mut runs)));
                                break 'workloads;
                            }
                        };
                    }
                    let row = label(bench.measure(&running, workload).unwrap_or_else(|e| Row {
                        errors: 1,
                        first_error: Some(format!("{e:#}")),
                        ..Row::default()
                    }));
                    if repeat > 1 {
                        println!("bench: run {round}/{repeat}: {}", one_line(&row));
                    }
                    runs.push(row);
                }
                let mut row = repeat::combine(runs);
                if row.errors > 0 {
                    row.known_failure = known_failure(relay, workload).map(str::to_owned);
                }
                println!("bench: {}", one_line(&row));
                results.rows.push(row);
            }
        }
    }
    drop(upstreams);
    let _ = std::fs::remove_dir_all(&dir);
    let json = serde_json::to_string(&results)?;
    if out == "-" {
        let chars: Vec<char> = json.chars().collect();
        for chunk in chars.chunks(1000) {
            println!("{JSON_MARKER}{}", chunk.iter().collect::<String>());
        }
    } else {
        std::fs::write(out, &json).with_context(|| format!("writing {out}"))?;
    }
    let failed: Vec<String> = results
        .rows
        .iter()
        .filter(|r| r.known_failure.is_none() && (r.errors > 0 || mismatched(r)))
        .map(one_line)
        .chain(results.profiles.iter().filter_map(|p| {
            p.error
                .as_ref()
                .map(|e| format!("profile {} {} {}: {e}", p.mode, p.relay, p.workload))
        }))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} rows or profiles failed, or rows ran on the wrong path:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    Ok(())
}

/// Why `relay` cannot run here, if it cannot: its program is missing (for the newest peers,
/// with the reason `cargo xtask bench` could not fetch them), or it is a HAProxy older than
/// 3.3 asked for kTLS.
fn cannot_run(relay: Relay, versions: &BTreeMap<String, String>) -> Option<String> {
    let program = relay.program()?;
    if tlsplice_benches::which(program).is_none() {
        let why = std::env::var(NEWEST_PEERS_MISSING_ENV)
            .ok()
            .filter(|_| program.ends_with("-sid"))
            .map_or_else(String::new, |w| format!(": {w}"));
        return Some(format!("{program} is not installed{why}"));
    }
    if let Relay::Haproxy { ktls: true, .. } = relay {
        let line = versions.get(program).map_or("", String::as_str);
        match haproxy_version(line) {
            Some(v) if v >= (3, 3) => {}
            _ => {
                return Some(format!(
                    "{line:?}: HAProxy has kTLS (`ktls on`) from 3.3; this one's user-space rows are measured"
                ));
            }
        }
    }
    None
}

/// (major, minor) of a `haproxy -v` line ("HAProxy version 3.4.7-1 2026/11/20 - ...").
fn haproxy_version(line: &str) -> Option<(u32, u32)> {
    let version = line
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)?;
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Why a peer fails a workload, where that is known and is the peer's doing. Such a row is
/// still run (a newer peer may pass it) and reported with its errors.
fn known_failure(relay: Relay, workload: Workload) -> Option<&'static str> {
    match (relay, workload) {
        (
            Relay::Haproxy {
                ktls: true,
                build: Build::Newest,
            },
            Workload::Bulk1 | Workload::Bulk16,
        ) => Some(
            "HAProxy with `ktls on` (3.4.7, 2026-12-07) stalled every bulk transfer, in both \
             modes, with or without `option splice-auto` (or closed the client connection without \
             close_notify before the upstream's answer came back); request/response up to 64 KiB, \
             handshakes and idle connections work",
        ),
        _ => None,
    }
}

/// Worker thread counts to measure handshakes at: powers of two up to twice the CPUs (past
/// them, threads only take turns), 1 and 2 in a quick run.
fn thread_counts(cpus: usize, quick: bool) -> Vec<usize> {
    let top = if quick { 2 } else { (2 * cpus).max(2) };
    std::iter::successors(Some(1usize), |n| n.checked_mul(2))
        .take_while(|&n| n <= top)
        .collect()
}

/// The workload label of a worker-thread point.
fn threads_label(threads: usize) -> String {
    format!("handshakes, full, {threads} worker threads")
}

/// The worker threads of a [`threads_label`].
fn threads_of_label(label: &str) -> Option<usize> {
    label
        .strip_prefix("handshakes, full, ")?
        .strip_suffix(" worker threads")?
        .parse()
        .ok()
}

/// The workload label of a scaling point.
fn scale_label(conns: usize, size: usize) -> String {
    format!("scale: {conns} connections, {} KiB", size >> 10)
}

/// A tlsplice row whose connections did not all take the path it was forced onto, or a kTLS
/// peer's row whose connections the kernel did not encrypt or decrypt as expected (a peer that
/// quietly stayed in user space is not a kTLS row).
fn mismatched(row: &Row) -> bool {
    if let Some(expected) = row.ktls_expected {
        return !expected.met_by(KtlsDirections::observed(&row.path_observed));
    }
    let Some(path) = row.relay.strip_prefix("tlsplice ") else {
        return false;
    };
    // Nothing observed (a failed scrape, connections never counted) fails the row too.
    row.path_observed.is_empty()
        || row
            .path_observed
            .split(", ")
            .any(|p| !p.starts_with(&format!("{path} connections")))
}

fn one_line(r: &Row) -> String {
    let mut s = format!("{:11} {:18} {:30}", r.mode, r.relay, r.workload);
    if let Some(t) = r.throughput_mib_s {
        s += &format!(" {t:8.1} MiB/s");
    }
    if let Some(c) = r.cpu_s_per_gib {
        s += &format!(" {c:6.2} CPU-s/GiB");
    }
    if let (Some(a), Some(b), Some(c)) = (r.p50_us, r.p99_us, r.p999_us) {
        s += &format!(" p50/p99/p999 {a:.0}/{b:.0}/{c:.0} us");
    }
    if let Some(h) = r.handshakes_per_s {
        s += &format!(" {h:.0}/s");
    }
    if let Some(f) = r.resumed_fraction {
        s += &format!(" ({:.0}% resumed)", f * 100.0);
    }
    if let (Some(b), Some(f)) = (r.rss_per_connection_bytes, r.fds_per_connection) {
        s += &format!(" {:.1} KiB/conn {f:.2} fds/conn", b / 1024.0);
    }
    if let Some(k) = r.kernel_bytes_per_connection {
        s += &format!(" (kernel {:.1} KiB/conn)", k / 1024.0);
    }
    if !r.path_observed.is_empty() {
        s += &format!(" [{}]", r.path_observed);
    }
    if r.runs > 1 {
        s += &format!(" (medians of {} runs)", r.runs);
    }
    if r.errors > 0 {
        s += &format!(
            " ERRORS {}: {}",
            r.errors,
            r.first_error.as_deref().unwrap_or("")
        );
    }
    if let Some(why) = &r.known_failure {
        s += &format!(" (known: {why})");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ktls_peer_row_must_show_the_directions_it_offloads() {
        let both = KtlsDirections { tx: true, rx: true };
        let tx = KtlsDirections {
            tx: true,
            rx: false,
        };
        let cases = [
            ("kTLS TlsRxSw +1, kTLS TlsTxSw +1", both, true),
            ("kTLS TlsTxSw +16", both, false),
            ("kTLS TlsTxSw +16", tx, true),
            ("kTLS TlsTxDevice +2, kTLS TlsRxDevice +2", both, true),
            ("", tx, false),
            ("ktls connections +4", tx, false),
        ];
        for (path, expected, ok) in cases {
            assert_eq!(
                expected.met_by(KtlsDirections::observed(path)),
                ok,
                "{path}"
            );
            let row = Row {
                relay: "nginx-sid ktls".into(),
                ktls_expected: Some(expected),
                path_observed: path.into(),
                ..Row::default()
            };
            assert_eq!(mismatched(&row), !ok, "{path}");
        }
        let newest_nginx = Relay::Nginx {
            ktls: true,
            build: Build::Newest,
        };
        assert_eq!(newest_nginx.ktls_expected(), Some(both));
        assert_eq!(
            Relay::Nginx {
                ktls: false,
                build: Build::Newest
            }
            .ktls_expected(),
            None
        );
    }

    #[test]
    fn haproxy_versions_from_its_version_line() {
        let cases = [
            (
                "HAProxy version 3.4.7-1 2026/11/20 - https://haproxy.org/",
                Some((3, 4)),
            ),
            ("HAProxy version 2.6.12-1+deb12u4 2025/11/18", Some((2, 6))),
            ("HAProxy version 3.10.0", Some((3, 10))),
            ("haproxy: not found", None),
            ("", None),
        ];
        for (line, want) in cases {
            assert_eq!(haproxy_version(line), want, "{line}");
        }
        assert!(haproxy_version("HAProxy version 3.2.26-1").unwrap() < (3, 3));
    }

    #[test]
    fn worker_thread_labels_read_back() {
        for n in [1, 2, 32] {
            assert_eq!(threads_of_label(&threads_label(n)), Some(n));
        }
        assert_eq!(threads_of_label("handshakes, full"), None);
    }

    #[test]
    fn worker_threads_go_up_in_powers_of_two_to_twice_the_cpus() {
        assert_eq!(thread_counts(2, false), [1, 2, 4]);
        assert_eq!(thread_counts(16, false), [1, 2, 4, 8, 16, 32]);
        assert_eq!(thread_counts(1, false), [1, 2]);
        assert_eq!(thread_counts(16, true), [1, 2]);
    }

    #[test]
    fn the_sweep_and_the_profiles_take_the_kernel_path_and_the_newest_peers() {
        use Build::{Debian12, Newest};
        let cases = [
            (Relay::Tlsplice("ktls"), true, true),
            (Relay::Tlsplice("userspace"), false, false),
            (
                Relay::Nginx {
                    ktls: true,
                    build: Newest,
                },
                true,
                true,
            ),
            (
                Relay::Nginx {
                    ktls: false,
                    build: Newest,
                },
                true,
                true,
            ),
            (
                Relay::Haproxy {
                    ktls: true,
                    build: Newest,
                },
                true,
                false,
            ),
            (
                Relay::Haproxy {
                    ktls: false,
                    build: Newest,
                },
                true,
                false,
            ),
            (
                Relay::Nginx {
                    ktls: true,
                    build: Debian12,
                },
                false,
                false,
            ),
            (
                Relay::Haproxy {
                    ktls: false,
                    build: Debian12,
                },
                false,
                false,
            ),
            (Relay::Stunnel, false, false),
        ];
        for (relay, swept, profiled) in cases {
            assert_eq!(
                relay.outside_scaling_sweep().is_none(),
                swept,
                "{}",
                relay.label()
            );
            assert_eq!(relay.profiled(), profiled, "{}", relay.label());
        }
    }

    #[test]
    fn the_setting_in_force_is_the_bracketed_one() {
        assert_eq!(bracketed("always madvise [never]\n"), Some("never"));
        assert_eq!(bracketed("[always] madvise never"), Some("always"));
        assert_eq!(bracketed("always madvise never"), None);
    }

    #[test]
    fn scaling_points_sweep_connections_then_sizes() {
        let s = Sizes::new(Scope::Guest, true);
        assert_eq!(
            s.scale_points(),
            [(1, 16 << 10), (16, 16 << 10), (4, 1 << 10), (4, 64 << 10)]
        );
        // The full sweep crosses itself at 16 connections of 16 KiB: measured once.
        let full = Sizes::new(Scope::Guest, false).scale_points();
        assert_eq!(full.len(), 8);
        assert_eq!(full.iter().filter(|&&p| p == (16, 16 << 10)).count(), 1);
        // The offered load is capped in requests for small messages, in bytes for large ones.
        assert_eq!(s.scale_rate(1 << 10), 50.0);
        assert_eq!(s.scale_rate(64 << 10), 16.0);
        assert!(Sizes::new(Scope::Host, false).scale_points().is_empty());
    }
}

fn from_console(log: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(log)?;
    let json: String = text
        .lines()
        .filter_map(|l| l.split_once(JSON_MARKER).map(|(_, j)| j))
        .collect();
    let _: Results = serde_json::from_str(&json).context("the guest's JSON lines")?;
    std::fs::write(out, json)?;
    Ok(())
}

/// The results `run` wrote to each of `inputs`.
fn read_results(inputs: &[PathBuf]) -> Result<Vec<Results>> {
    inputs
        .iter()
        .map(|input| {
            let text = std::fs::read_to_string(input)
                .with_context(|| format!("reading {}", input.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", input.display()))
        })
        .collect()
}

/// Separate runs of the same rows as one: each row combined from its runs ([`repeat::combine`]),
/// the machine, versions and skips of the first run.
fn merge(inputs: &[PathBuf], out: &Path) -> Result<()> {
    let merged = repeat::merge_runs(read_results(inputs)?).context("no runs to merge")?;
    std::fs::write(out, serde_json::to_string(&merged)?)
        .with_context(|| format!("writing {}", out.display()))
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Run {
            quick,
            scope,
            agent,
            loadgen,
            out,
            only,
            relays,
            repeat,
            clock,
        } => run(
            quick,
            scope,
            agent,
            loadgen,
            &out,
            &Only {
                workloads: only,
                relays,
            },
            repeat,
            clock,
        ),
        Cmd::Merge { inputs, out } => merge(&inputs, &out),
        Cmd::Report { inputs, out } => report::write(&inputs, &out),
        Cmd::FromConsole { log, out } => from_console(&log, &out),
    }
}

mod profile;
mod repeat;
mod report;
