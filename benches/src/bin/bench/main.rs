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
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use tlsplice_benches::{
    kernel_connection_memory_bytes, kernel_threads_cpu_seconds, node_busy_seconds,
    process_cpu_seconds, process_tree, pss_bytes, raise_open_files_limit,
    reaped_children_cpu_seconds, svg,
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
    Haproxy,
    /// nginx stream proxy; `true` with `ssl_conf_command Options KTLS`.
    Nginx(bool),
    Stunnel,
    Socat,
    /// No relay: the client talks to the upstream (the floor for latency).
    Direct,
}

impl Relay {
    fn label(self) -> String {
        match self {
            Relay::Tlsplice(p) => format!("tlsplice {p}"),
            Relay::Haproxy => "haproxy".into(),
            Relay::Nginx(true) => "nginx ktls".into(),
            Relay::Nginx(false) => "nginx".into(),
            Relay::Stunnel => "stunnel".into(),
            Relay::Socat => "socat".into(),
            Relay::Direct => "direct (no relay)".into(),
        }
    }

    fn is_peer(self) -> bool {
        !matches!(self, Relay::Tlsplice(_) | Relay::Direct)
    }

    fn program(self) -> Option<&'static str> {
        match self {
            Relay::Haproxy => Some("haproxy"),
            Relay::Nginx(_) => Some("nginx"),
            Relay::Stunnel => Some("stunnel4"),
            Relay::Socat => Some("socat"),
            Relay::Tlsplice(_) | Relay::Direct => None,
        }
    }
}

/// The relays of each mode, per scope; and the pairs not run, with why.
fn relays(scope: Scope, mode: Mode) -> (Vec<Relay>, Vec<(Relay, &'static str)>) {
    use Relay::*;
    match (scope, mode) {
        (Scope::Host, Mode::Terminate) => (
            vec![Tlsplice("userspace"), Haproxy, Nginx(false), Stunnel],
            vec![(
                Tlsplice("ktls"),
                "this kernel has no kTLS: the ktls rows are in the guest section",
            )],
        ),
        (Scope::Host, Mode::Reencrypt) => (
            vec![Tlsplice("userspace"), Haproxy, Nginx(false)],
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
                Haproxy,
                Nginx(false),
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
                Nginx(true),
                Nginx(false),
            ],
            vec![(
                Haproxy,
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
}

impl Sizes {
    fn new(scope: Scope, quick: bool) -> Self {
        match (scope, quick) {
            (Scope::Host, false) => Self {
                bulk_bytes: 1 << 30,
                bulk16_bytes: 1 << 30,
                rr_secs: 20.0,
                rr_small_rate: 2000.0,
                rr_large_rate: 400.0,
                handshake_secs: 10.0,
                // Two descriptors per connection on every tlsplice path: 9,000 fit under the
                // 20,000 a process may hold here, with the listeners and pool beside them.
                idle_count: 9_000,
            },
            (Scope::Host, true) => Self {
                bulk_bytes: 64 << 20,
                bulk16_bytes: 8 << 20,
                rr_secs: 2.0,
                rr_small_rate: 1000.0,
                rr_large_rate: 200.0,
                handshake_secs: 2.0,
                idle_count: 300,
            },
            // The guest's CPU is emulated (tens of times slower): smaller sizes, same shapes.
            (Scope::Guest, false) => Self {
                bulk_bytes: 64 << 20,
                bulk16_bytes: 8 << 20,
                rr_secs: 10.0,
                rr_small_rate: 40.0,
                rr_large_rate: 10.0,
                handshake_secs: 10.0,
                idle_count: 10_000,
            },
            (Scope::Guest, true) => Self {
                bulk_bytes: 4 << 20,
                bulk16_bytes: 1 << 20,
                rr_secs: 2.0,
                rr_small_rate: 20.0,
                rr_large_rate: 5.0,
                handshake_secs: 1.0,
                idle_count: 50,
            },
        }
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
}

const WORKLOADS: [Workload; 7] = [
    Workload::Bulk1,
    Workload::Bulk16,
    Workload::Rr1k,
    Workload::Rr64k,
    Workload::HandshakeNew,
    Workload::HandshakeResumed,
    Workload::Idle,
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
    /// The profile the relay-side binaries were built with (quick runs use debug builds).
    build: String,
    date: String,
    kernel: String,
    cpu: String,
    cpus: usize,
    memory_gib: f64,
    versions: BTreeMap<String, String>,
    /// `openssl speed -evp aes-128-gcm` on 16 KiB blocks, one core, bytes per second.
    crypto_bytes_per_s: Option<f64>,
    sizes: Sizes,
    /// Descriptors one process may hold here (RLIMIT_NOFILE after raising it as far as allowed).
    open_files_limit: u64,
    /// Runs per row (`--repeat`): each figure is their median.
    #[serde(default)]
    repeat: u32,
    rows: Vec<Row>,
    skipped: Vec<Skip>,
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

    fn cpu_seconds(&self) -> f64 {
        let Some(pid) = self.pid() else { return 0.0 };
        // Children that ended (socat's per-connection forks) are in the root's cutime/cstime.
        let reaped = reaped_children_cpu_seconds(pid);
        process_tree(pid)
            .into_iter()
            .map(process_cpu_seconds)
            .sum::<f64>()
            + reaped
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
        let port = tlsplice_tests::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let up = self.upstream_of(mode);
        let tag = format!(
            "{}-{}",
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
                spawn_logged(
                    Command::new(&self.agent)
                        .args(["run", "--config"])
                        .arg(&file)
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
            Relay::Haproxy => {
                let pem = self.dir.join("haproxy.pem");
                std::fs::write(
                    &pem,
                    std::fs::read_to_string(&self.cert)? + &std::fs::read_to_string(&self.key)?,
                )?;
                let (bind, server, options) = match mode {
                    Mode::Terminate => (
                        format!("{addr} ssl crt {} ssl-min-ver TLSv1.3", pem.display()),
                        format!("{up}"),
                        "",
                    ),
                    Mode::Reencrypt => (
                        format!("{addr} ssl crt {} ssl-min-ver TLSv1.3", pem.display()),
                        format!(
                            "{up} ssl verify required ca-file {ca} sni str(localhost) ssl-min-ver TLSv1.3"
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
                    "global\n  maxconn {maxconn}\n  maxpipes 512\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n{options}\n\
                     frontend fe\n  bind {bind}\n{route}\nbackend be\n  server up {server}\n"
                );
                let file = self.dir.join(format!("{tag}.cfg"));
                std::fs::write(&file, config)?;
                spawn_logged(Command::new("haproxy").args(["-db", "-f"]).arg(&file), &log)?
            }
            Relay::Nginx(ktls) => {
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
                let module = ["/usr/lib/nginx/modules/ngx_stream_module.so"]
                    .into_iter()
                    .find(|m| Path::new(m).exists())
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
                    Command::new("nginx")
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

    /// Runs the traffic generator; a relay that stalls it is given `limit`, then it is killed
    /// and the row fails.
    fn loadgen(&self, args: &[String], limit: Duration) -> Result<serde_json::Value> {
        let mut child = Command::new(&self.loadgen)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("running tlsplice-loadgen")?;
        let mut stdout = child.stdout.take().context("loadgen stdout")?;
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "tlsplice-loadgen {args:?} did not finish in {} s",
                    limit.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = reader.join().unwrap_or_default();
        if !status.success() {
            bail!("tlsplice-loadgen {args:?} failed: {status}");
        }
        serde_json::from_str(text.trim()).with_context(|| format!("loadgen printed {text:?}"))
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
        let (cpu0, k0, n0) = (
            running.cpu_seconds(),
            kernel_threads_cpu_seconds(),
            node_busy_seconds(),
        );
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
        row.relay_cpu_s = running.cpu_seconds() - cpu0;
        row.kernel_threads_cpu_s = kernel_threads_cpu_seconds() - k0;
        row.node_cpu_s = node_busy_seconds() - n0;
        let cpu = row.relay_cpu_s + row.kernel_threads_cpu_s;
        if row.rss_bytes == 0 {
            row.rss_bytes = running.rss();
        }
        row.errors = report["errors"].as_u64().unwrap_or(0);
        row.first_error = report["first_error"].as_str().map(str::to_owned);
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
                row.secs = f("secs").unwrap_or(wall);
                row.p50_us = f("p50_us");
                row.p99_us = f("p99_us");
                row.p999_us = f("p999_us");
                row.samples = report["samples"].as_u64();
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
            Workload::Idle => row.secs = wall,
        }
        let mut after = observed_paths(running.admin);
        if workload == Workload::Idle && running.admin.is_some() {
            // The agent reports a connection when it has closed it: 10,000 closes on an
            // emulated CPU take seconds, and a row read before they are all reported would
            // say nothing about their path.
            let want = row.connections.unwrap_or(0) as f64;
            let deadline = Instant::now() + Duration::from_secs(120);
            while reported(&paths_before, &after) < want && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(500));
                after = observed_paths(running.admin);
            }
        }
        row.path_observed = path_difference(&paths_before, &after);
        Ok(row)
    }

    /// Opens the idle connections, waits for the relay to settle, reads what it and the kernel
    /// hold, closes them.
    fn idle(&self, running: &Running, target: &[String]) -> Result<(serde_json::Value, Held)> {
        let mut child = Command::new(&self.loadgen)
            .args(["idle", "--count", &self.sizes.idle_count.to_string()])
            .args(target)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        // Settled: what the handshakes freed has gone back to the kernel where the relay's
        // allocator gives it back (jemalloc's decay is a second for tlsplice).
        std::thread::sleep(Duration::from_secs(3));
        let held = Held {
            rss: running.rss(),
            fds: running.fds(),
            kernel: kernel_connection_memory_bytes(),
        };
        drop(child.stdin.take());
        let status = child.wait()?;
        let report: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("idle loadgen ({status}) printed {line:?}"))?;
        Ok((report, held))
    }
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

fn crypto_speed(quick: bool) -> Option<f64> {
    let secs = if quick { "1" } else { "3" };
    let out = Command::new("openssl")
        .args([
            "speed",
            "-evp",
            "aes-128-gcm",
            "-bytes",
            "16384",
            "-seconds",
            secs,
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    // The last line is "AES-128-GCM  <thousands of bytes per second>k".
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

fn run(
    quick: bool,
    scope: Scope,
    agent: PathBuf,
    loadgen: PathBuf,
    out: &str,
    only: &Only,
    repeat: u32,
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
        ("nginx", "nginx", &["-v"][..], "version"),
        ("stunnel", "stunnel4", &["-version"][..], "stunnel "),
        ("socat", "socat", &["-V"][..], "socat version"),
        ("openssl", "openssl", &["version"][..], "OpenSSL"),
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
        crypto_bytes_per_s: crypto_speed(quick),
        sizes: bench.sizes.clone(),
        open_files_limit: tlsplice_benches::open_files_limit(),
        repeat,
        rows: Vec::new(),
        skipped: Vec::new(),
    };
    println!(
        "bench: {:?} scope, kernel {}, {} x {}, quick={quick}, {repeat} run(s) per row",
        scope, results.kernel, cpus, results.cpu
    );
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
            if let Some(p) = relay.program()
                && tlsplice_benches::which(p).is_none()
            {
                results.skipped.push(Skip {
                    mode: mode.name().into(),
                    relay: relay.label(),
                    why: format!("{p} is not installed"),
                });
                println!(
                    "bench: skip {} {}: {p} is not installed",
                    mode.name(),
                    relay.label()
                );
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
                if workload == Workload::Idle && relay == Relay::Socat {
                    results.skipped.push(Skip {
                        mode: mode.name().into(),
                        relay: format!("{} ({})", relay.label(), workload.label()),
                        why: "socat forks a process per connection: thousands of idle connections are thousands of processes".into(),
                    });
                    continue;
                }
                let label = |mut row: Row| {
                    row.mode = mode.name().into();
                    row.relay = relay.label();
                    row.peer = relay.is_peer();
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
                let row = repeat::combine(runs);
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
        .filter(|r| r.errors > 0 || mismatched(r))
        .map(one_line)
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} rows failed or ran on the wrong path:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    Ok(())
}

/// A tlsplice row whose connections did not all take the path it was forced onto.
fn mismatched(row: &Row) -> bool {
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
    s
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
        ),
        Cmd::Report { inputs, out } => report::write(&inputs, &out),
        Cmd::FromConsole { log, out } => from_console(&log, &out),
    }
}

mod repeat;
mod report;
