//! The `tlsplice` node agent binary.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

/// jemalloc gives a burst's memory back to the kernel (see tlsplice::memory).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// tlsplice: cheap TLS between hops with kTLS and in-kernel splicing.
#[derive(Debug, Parser)]
#[command(name = "tlsplice", version, about)]
struct Cli {
    /// Log format: text (for a terminal) or json (one object per line, for log shippers).
    #[arg(long, global = true, env = "TLSPLICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
// Parsed once at start and matched at once: the size of `run`'s flags costs nothing.
#[allow(clippy::large_enum_variant)]
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
    /// Serve the listeners of a configuration file until SIGTERM or Ctrl-C; SIGHUP reads it
    /// again (listeners added, changed, removed) and checks the certificate files.
    Run {
        /// The TOML configuration.
        #[arg(long, env = "TLSPLICE_CONFIG")]
        config: PathBuf,
        /// Take the listening sockets over from the agent running with this
        /// `--takeover-socket` (a live upgrade: no connection attempt refused; the old agent
        /// moves its connections that can move and drains the rest once this one serves, and
        /// keeps serving if this one fails to start). When nothing listens there, the agent
        /// starts fresh (logged), so one unit or pod spec serves the first start and upgrades.
        #[arg(long, env = "TLSPLICE_TAKEOVER", value_name = "PATH")]
        takeover: Option<PathBuf>,
        /// The takeover record version this agent speaks (tests of a refused takeover).
        #[arg(long, hide = true, default_value_t = tlsplice::takeover::RECORD_VERSION)]
        takeover_record_version: u32,
        #[command(flatten)]
        flags: NodeFlags,
    },
    /// Print a running agent's counters, read from its pinned BPF maps.
    Stats {
        /// The agent's pin directory.
        #[arg(
            long,
            env = "TLSPLICE_BPF_PIN_PATH",
            default_value = "/sys/fs/bpf/tlsplice"
        )]
        bpf_pin_path: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Print again every this many seconds, until interrupted.
        #[arg(long, value_name = "SECONDS")]
        watch: Option<u64>,
    },
    /// Validate a configuration file and exit.
    Check {
        /// The TOML configuration.
        #[arg(long, env = "TLSPLICE_CONFIG")]
        config: PathBuf,
    },
}

/// Node flags: each overrides its key in the file, and each is also read from a TLSPLICE_*
/// environment variable (the DaemonSet way).
#[derive(Debug, Clone, clap::Args)]
struct NodeFlags {
    /// Load the eBPF programs: auto (serve without them when they cannot load, and say
    /// why), required, off. Overrides `ebpf.mode`.
    #[arg(long, env = "TLSPLICE_EBPF", value_enum)]
    ebpf: Option<tlsplice::config::EbpfMode>,
    /// bpffs directory for the pinned maps and programs. Overrides `ebpf.pin_path`.
    #[arg(long, env = "TLSPLICE_BPF_PIN_PATH")]
    bpf_pin_path: Option<PathBuf>,
    /// Data path of passthrough listeners: splice, sockmap, or auto (measure both at start).
    /// Overrides `ebpf.passthrough`.
    #[arg(long, env = "TLSPLICE_PASSTHROUGH_PATH", value_enum)]
    passthrough_path: Option<tlsplice::config::PassthroughPath>,
    /// Admin server address (/metrics, /healthz, /readyz, /config). Overrides
    /// `admin.listen`.
    #[arg(long, env = "TLSPLICE_ADMIN_ADDR")]
    admin_addr: Option<std::net::SocketAddr>,
    /// Connections held at once over all listeners. Overrides `limits.max_connections`.
    #[arg(long, env = "TLSPLICE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// TLS handshakes in progress at once. Overrides `limits.max_handshakes`.
    #[arg(long, env = "TLSPLICE_MAX_HANDSHAKES")]
    max_handshakes: Option<usize>,
    /// TLS handshakes that may wait for a place when max_handshakes are in progress (0:
    /// refuse at once). Overrides `limits.handshake_queue`.
    #[arg(long, env = "TLSPLICE_HANDSHAKE_QUEUE")]
    handshake_queue: Option<usize>,
    /// Pipes the splice and kTLS data paths hold at once (two descriptors each; idle
    /// connections hold none). Overrides `limits.max_splice_pipes`.
    #[arg(long, env = "TLSPLICE_MAX_SPLICE_PIPES")]
    max_splice_pipes: Option<usize>,
    /// TLS 1.3 KeyUpdates a kTLS peer may send per connection in one second. Overrides
    /// `limits.key_updates_per_second`.
    #[arg(long, env = "TLSPLICE_KEY_UPDATES_PER_SECOND")]
    key_updates_per_second: Option<u16>,
    /// Connections one source may hold at once on one listener. Overrides
    /// `limits.per_source_connections`.
    #[arg(long, env = "TLSPLICE_PER_SOURCE_CONNECTIONS")]
    per_source_connections: Option<u32>,
    /// New connections (handshakes) one source may open per second on one listener.
    /// Overrides `limits.per_source_handshakes_per_second`.
    #[arg(long, env = "TLSPLICE_PER_SOURCE_HANDSHAKES_PER_SECOND")]
    per_source_handshakes_per_second: Option<u32>,
    /// New connections one source may open at once. Overrides
    /// `limits.per_source_handshake_burst`.
    #[arg(long, env = "TLSPLICE_PER_SOURCE_HANDSHAKE_BURST")]
    per_source_handshake_burst: Option<u32>,
    /// Leading bits of an IPv4 client address that make its source (32, or 24 for a /24).
    /// Overrides `limits.source_prefix_v4`.
    #[arg(long, env = "TLSPLICE_SOURCE_PREFIX_V4")]
    source_prefix_v4: Option<u8>,
    /// Leading bits of an IPv6 client address that make its source (128, or 64 for a /64).
    /// Overrides `limits.source_prefix_v6`.
    #[arg(long, env = "TLSPLICE_SOURCE_PREFIX_V6")]
    source_prefix_v6: Option<u8>,
    /// Threads that run connections (default: one per CPU). Overrides `limits.worker_threads`.
    #[arg(long, env = "TLSPLICE_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
    /// Milliseconds connections may go on after SIGTERM. Overrides `limits.drain_timeout_ms`.
    #[arg(long, env = "TLSPLICE_DRAIN_TIMEOUT_MS")]
    drain_timeout_ms: Option<u64>,
    /// TLS versions every listener and upstream leg without its own `tls_versions` accepts
    /// (comma-separated: 1.2,1.3). Overrides `tls.tls_versions`.
    #[arg(long, env = "TLSPLICE_TLS_VERSIONS", value_enum, value_delimiter = ',')]
    tls_versions: Option<Vec<tlsplice::config::VersionName>>,
    /// Cipher suites, in order of preference, for every listener and upstream leg without its
    /// own (comma-separated IANA names). Overrides `tls.cipher_suites`.
    #[arg(
        long,
        env = "TLSPLICE_CIPHER_SUITES",
        value_enum,
        value_delimiter = ','
    )]
    cipher_suites: Option<Vec<tlsplice::config::CipherSuiteName>>,
    /// Key exchange groups, in order of preference (comma-separated, e.g. X25519MLKEM768,X25519;
    /// built in: X25519MLKEM768 (TLS 1.3 only), X25519, P-256, P-384). Overrides `tls.groups`.
    #[arg(long, env = "TLSPLICE_TLS_GROUPS", value_enum, value_delimiter = ',')]
    tls_groups: Option<Vec<tlsplice::config::GroupName>>,
    /// Session resumption (tickets, session IDs) where a listener or leg does not say.
    /// Overrides `tls.session_resumption`.
    #[arg(long, env = "TLSPLICE_SESSION_RESUMPTION")]
    session_resumption: Option<bool>,
    /// A unix socket on which a new agent (`run --takeover PATH`) may take this one's
    /// listening sockets over. Only the same user or root may connect.
    #[arg(long, env = "TLSPLICE_TAKEOVER_SOCKET", value_name = "PATH")]
    takeover_socket: Option<PathBuf>,
    /// What this agent does once a new one took over and its connections have drained: exit
    /// (0), or wait for SIGTERM (a pod, whose container the kubelet would restart if it
    /// exited before the DaemonSet controller deletes it).
    #[arg(long, env = "TLSPLICE_AFTER_TAKEOVER", value_enum, default_value_t = AfterTakeover::Exit)]
    after_takeover: AfterTakeover,
}

/// What an agent does once taken over and drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AfterTakeover {
    /// Exit with status 0.
    Exit,
    /// Wait for SIGTERM or SIGINT, then exit with status 0.
    Wait,
}

impl NodeFlags {
    /// The file's configuration with these flags over it.
    fn apply(&self, c: &mut tlsplice::config::Config) {
        if let Some(n) = self.max_connections {
            c.limits.max_connections = n;
        }
        if let Some(n) = self.max_handshakes {
            c.limits.max_handshakes = n;
        }
        if let Some(n) = self.handshake_queue {
            c.limits.handshake_queue = Some(n);
        }
        if let Some(n) = self.max_splice_pipes {
            c.limits.max_splice_pipes = n;
        }
        if let Some(n) = self.key_updates_per_second {
            c.limits.key_updates_per_second = n;
        }
        if let Some(n) = self.per_source_connections {
            c.limits.per_source_connections = Some(n);
        }
        if let Some(n) = self.per_source_handshakes_per_second {
            c.limits.per_source_handshakes_per_second = Some(n);
        }
        if let Some(n) = self.per_source_handshake_burst {
            c.limits.per_source_handshake_burst = Some(n);
        }
        if let Some(bits) = self.source_prefix_v4 {
            c.limits.source_prefix_v4 = bits;
        }
        if let Some(bits) = self.source_prefix_v6 {
            c.limits.source_prefix_v6 = bits;
        }
        if let Some(ms) = self.drain_timeout_ms {
            c.limits.drain_timeout_ms = ms;
        }
        if let Some(n) = self.worker_threads {
            c.limits.worker_threads = Some(usize::from(n));
        }
        if let Some(mode) = self.ebpf {
            c.ebpf.mode = mode;
        }
        if let Some(path) = &self.bpf_pin_path {
            c.ebpf.pin_path.clone_from(path);
        }
        if let Some(path) = self.passthrough_path {
            c.ebpf.passthrough = path;
        }
        if let Some(addr) = self.admin_addr {
            c.admin.listen = addr;
        }
        if let Some(v) = &self.tls_versions {
            c.tls.tls_versions = Some(v.clone());
        }
        if let Some(s) = &self.cipher_suites {
            c.tls.cipher_suites = Some(s.clone());
        }
        if let Some(g) = &self.tls_groups {
            c.tls.groups = Some(g.clone());
        }
        if let Some(r) = self.session_resumption {
            c.tls.session_resumption = Some(r);
        }
        c.resolve_tls();
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TLSPLICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
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
                let caps = tlsplice::path::KernelCaps::from_report(&report);
                // What the node's passthrough path will be, as far as this probe can tell.
                let ebpf_off = match c.ebpf.mode {
                    tlsplice::config::EbpfMode::Off => Some("ebpf.mode = off".to_owned()),
                    _ => report.ebpf.clone(),
                };
                let passthrough = tlsplice::path::PlainPath::plan(
                    c.ebpf.passthrough,
                    ebpf_off.as_deref().map_or(Ok(()), Err),
                );
                for l in &c.listeners {
                    let mode = format!("{:?}", l.mode).to_lowercase();
                    match tlsplice::proxy::readiness(l, &caps, &passthrough) {
                        Ok(how) => println!("listener {} ({mode}): ok: {how}", l.name),
                        Err(why) => {
                            println!("listener {} ({mode}): cannot run: {why}", l.name);
                            fail = true;
                        }
                    }
                    for line in tlsplice::proxy::suites_in_kernel(l, &caps) {
                        println!("listener {} ({mode}): {line}", l.name);
                    }
                }
            }
            if fail {
                std::process::exit(2);
            }
        }
        Command::Check { config } => {
            let c = valid_config(&config, None)?;
            let kernel =
                tlsplice::proxy::check_kernel_path(&c, &tlsplice::path::KernelCaps::probe());
            if !kernel.is_empty() {
                for p in &kernel {
                    eprintln!("{}: {p}", config.display());
                }
                eprintln!(
                    "{}: invalid on this kernel: {} problem(s)",
                    config.display(),
                    kernel.len()
                );
                std::process::exit(1);
            }
            println!(
                "{}: {} listener(s), valid (configuration and every certificate, key and CA file)",
                config.display(),
                c.listeners.len()
            );
        }
        Command::Run {
            config,
            takeover,
            takeover_record_version,
            flags,
        } => {
            let c = valid_config(&config, Some(&flags))?;
            // Sessions a kernel-only listener would refuse after their handshake: said at
            // start (`tlsplice check` refuses such a file).
            let caps = tlsplice::path::KernelCaps::probe();
            for problem in tlsplice::proxy::check_kernel_path(&c, &caps) {
                tracing::warn!(problem = %problem, "TLS policy and data_path = \"ktls\" disagree on this kernel");
            }
            let takeover = takeover.map(|path| (path, takeover_record_version));
            run(&c, &config, &flags, takeover)?;
        }
        Command::Stats {
            bpf_pin_path,
            json,
            watch,
        } => stats(&bpf_pin_path, json, watch)?,
    }
    Ok(())
}

/// A configuration and every listener's TLS material, or every problem with either (file,
/// listener, key or file).
fn checked_config(
    path: &std::path::Path,
    flags: Option<&NodeFlags>,
) -> Result<tlsplice::config::Config, Vec<String>> {
    let mut config = tlsplice::config::Config::load(path)
        .map_err(|e| e.to_string().lines().map(str::to_owned).collect::<Vec<_>>())?;
    // The material is checked as it will serve: with the node flags (a TLS policy default)
    // over the file.
    if let Some(flags) = flags {
        flags.apply(&mut config);
    }
    let problems: Vec<String> = tlsplice::proxy::check_material(&config)
        .into_iter()
        .map(|p| format!("{}: {p}", path.display()))
        .collect();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

/// [`checked_config`], or every problem printed to stderr and exit status 1.
fn valid_config(
    path: &std::path::Path,
    flags: Option<&NodeFlags>,
) -> Result<tlsplice::config::Config> {
    checked_config(path, flags).or_else(|problems| {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!("{}: invalid: {} problem(s)", path.display(), problems.len());
        std::process::exit(1)
    })
}

/// SIGHUP: reads the file again (with the same flags over it) and applies its listeners.
/// Sections other than the listeners take effect at the next start, and the log says so.
async fn reload(
    path: &std::path::Path,
    flags: &NodeFlags,
    current: &mut tlsplice::config::Config,
    control: &tokio::sync::mpsc::Sender<tlsplice::proxy::Control>,
    admin: &tlsplice::admin::AdminState,
    telemetry: &tlsplice::metrics::Telemetry,
) {
    let path_owned = path.to_owned();
    let flags_owned = flags.clone();
    let loaded =
        tokio::task::spawn_blocking(move || checked_config(&path_owned, Some(&flags_owned))).await;
    let next = match loaded {
        Ok(Ok(c)) => c,
        Ok(Err(problems)) => {
            tracing::error!(config = %path.display(), ?problems,
                "SIGHUP: the configuration does not load: nothing changed");
            telemetry.count_config_reload(false);
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: reading the configuration failed to run");
            telemetry.count_config_reload(false);
            return;
        }
    };
    for (section, same) in [
        ("ebpf", section_eq(&current.ebpf, &next.ebpf)),
        ("admin", section_eq(&current.admin, &next.admin)),
        ("limits", section_eq(&current.limits, &next.limits)),
        ("certs", section_eq(&current.certs, &next.certs)),
    ] {
        if !same {
            tracing::warn!(
                section,
                "SIGHUP: [{section}] changed: it takes effect at the next start"
            );
        }
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    let applied = match control
        .send(tlsplice::proxy::Control::Reload(
            Box::new(next.clone()),
            reply,
        ))
        .await
    {
        Ok(()) => answer
            .await
            .unwrap_or_else(|_| Err("the proxy has stopped".into())),
        Err(_) => Err("the proxy has stopped".into()),
    };
    match applied {
        Ok(summary) => {
            current.listeners = next.listeners;
            admin.set_config(current);
            telemetry.count_config_reload(true);
            tracing::info!(added = ?summary.added, removed = ?summary.removed,
                changed = ?summary.changed, unchanged = ?summary.unchanged,
                "SIGHUP: configuration reloaded");
        }
        Err(e) => {
            telemetry.count_config_reload(false);
            tracing::error!(error = %e, "SIGHUP: the new listeners could not be set up: nothing changed");
        }
    }
}

fn section_eq<T: serde::Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

fn stats(pin_path: &std::path::Path, json: bool, watch: Option<u64>) -> Result<()> {
    loop {
        let snapshot = tlsplice::bpf::read_pinned(pin_path)?;
        if watch.is_some() {
            // Clear the screen and home the cursor, like watch(1).
            print!("\x1b[2J\x1b[H");
        }
        if json {
            println!("{}", tlsplice::metrics::json(&snapshot));
        } else {
            print!("{}", tlsplice::metrics::table(&snapshot));
        }
        match watch {
            Some(seconds) => std::thread::sleep(std::time::Duration::from_secs(seconds.max(1))),
            None => return Ok(()),
        }
    }
}

/// A takeover that happened, as the old agent saw it.
struct TakenOver {
    /// The new agent's process id.
    pid: u32,
    /// The sockets it adopted.
    adopted: Vec<String>,
    /// What the connections' moves came to, and how long they took (or why they stopped).
    moves: Result<(tlsplice::takeover::MoveSummary, std::time::Duration)>,
}

/// The longest the old agent hands connections over: relays asked to move come to rest within
/// their move window (1.5 s) or stay; this is a little longer.
const MOVE_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// The moves end early once no relay can still come to rest and nothing came for this long.
const MOVE_SETTLED: std::time::Duration = std::time::Duration::from_millis(20);

/// The old agent's side of the moves: asks the proxy to stop accepting and to hand over every
/// connection that can move, sends them to the new agent in batches as they come, then ends
/// the moves (what has not come stays here and drains) and says so. However it ends, the
/// moves end with it: a connection that comes to rest afterwards parks here.
fn move_connections(
    mut mover: tlsplice::takeover::Mover,
    control: &tokio::sync::mpsc::Sender<tlsplice::proxy::Control>,
    listeners: Vec<String>,
    sockmap: bool,
) -> Result<(tlsplice::takeover::MoveSummary, std::time::Duration)> {
    let started = std::time::Instant::now();
    let (to, moving) = tlsplice::proxy::moving_channel();
    let (done, asked) = tokio::sync::oneshot::channel();
    control
        .blocking_send(tlsplice::proxy::Control::MoveOut {
            to,
            listeners,
            sockmap,
            done,
        })
        .map_err(|_| anyhow::anyhow!("the proxy stopped before the moves"))?;
    let held_here = asked
        .blocking_recv()
        .map_err(|_| anyhow::anyhow!("the proxy stopped before the moves"))?;
    let mut batch = Vec::new();
    let collected = collect_moving(&mut mover, &moving, &mut batch, started);
    // The moves end here whatever happened: relays stop being asked.
    let (reply, staying) = tokio::sync::oneshot::channel();
    let ended = control
        .blocking_send(tlsplice::proxy::Control::MoveEnd(reply))
        .is_ok();
    // A proxy told to stop meanwhile (SIGTERM) ended the moves itself and answers no more.
    let held = ended
        .then(|| staying.blocking_recv().ok())
        .flatten()
        .unwrap_or_else(|| held_here.now());
    // Those that came to rest as the moves ended (each still held its places when the proxy
    // counted what it holds).
    let mut late = 0;
    while let Some(m) = moving.try_recv() {
        late += 1;
        match m {
            Some(m) => batch.push(m),
            None => mover.lost(1),
        }
    }
    let staying = held.saturating_sub(late);
    // From here on a connection that comes to rest parks in this agent.
    drop(moving);
    if let Err(e) = collected {
        // The new agent did not answer: what is in hand closes here.
        mover.lost(batch.len() as u64);
        return Err(e);
    }
    while !batch.is_empty() {
        let rest = batch.split_off(batch.len().min(tlsplice::takeover::MOVE_BATCH));
        send_moving(&mut mover, std::mem::replace(&mut batch, rest))?;
    }
    let summary = mover.finish(staying)?;
    Ok((summary, started.elapsed()))
}

/// Takes connections as they come to rest and sends them in batches, until the moves are
/// settled (no relay still coming to rest, nothing for [`MOVE_SETTLED`]) or [`MOVE_FOR`] has
/// passed; what is still in `batch` when it returns is for the caller to send. `Err`: the new
/// agent stopped answering.
fn collect_moving(
    mover: &mut tlsplice::takeover::Mover,
    moving: &tlsplice::proxy::MovingConnections,
    batch: &mut Vec<tlsplice::takeover::MovingConnection>,
    started: std::time::Instant,
) -> Result<()> {
    use std::sync::mpsc::RecvTimeoutError;
    let mut last = std::time::Instant::now();
    loop {
        let now = std::time::Instant::now();
        let settled = tlsplice::proxy::moves_pending() == 0
            && now.duration_since(last) >= MOVE_SETTLED
            && now.duration_since(started) >= MOVE_SETTLED;
        if settled || now >= started + MOVE_FOR {
            return Ok(());
        }
        match moving.recv_timeout(std::time::Duration::from_millis(5)) {
            Ok(Some(m)) => {
                last = std::time::Instant::now();
                batch.push(m);
                if batch.len() >= tlsplice::takeover::MOVE_BATCH {
                    send_moving(mover, std::mem::take(batch))?;
                }
            }
            Ok(None) => mover.lost(1),
            Err(RecvTimeoutError::Timeout) if !batch.is_empty() => {
                send_moving(mover, std::mem::take(batch))?;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// Sends one batch; the new agent's reasons for any it refused are logged.
fn send_moving(
    mover: &mut tlsplice::takeover::Mover,
    batch: Vec<tlsplice::takeover::MovingConnection>,
) -> Result<()> {
    for why in mover
        .send(batch)
        .context("sending connections to the new agent")?
    {
        tracing::warn!(why = %why, "takeover: the new agent did not adopt a connection: closed");
    }
    Ok(())
}

/// Listens for a new agent on `socket` (on a thread of its own: the exchange blocks) and
/// hands each one the listening sockets, then the connections that can move; the takeover
/// that happened comes out of the channel. `taking_over`: this agent is taking over from the
/// one that listens there now.
fn offer_takeover(
    socket: &std::path::Path,
    taking_over: bool,
    control: tokio::sync::mpsc::Sender<tlsplice::proxy::Control>,
    admin: Option<(std::os::fd::OwnedFd, std::net::SocketAddr)>,
    telemetry: Arc<tlsplice::metrics::Telemetry>,
    serving_elsewhere: Arc<tokio::sync::Notify>,
) -> Result<tokio::sync::mpsc::UnboundedReceiver<TakenOver>> {
    use tlsplice::takeover::{ADMIN_SOCKET, Offering, Outcome, SocketRecord};
    let mut offering = Offering::bind(socket, taking_over).context("the takeover socket")?;
    tracing::info!(socket = %offering.path().display(), "takeover socket listening");
    let (done, outcomes) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("takeover".into())
        .spawn(move || {
            // None once the proxy stopped (this agent drains): nothing to hand over.
            let offer = || {
                let (tx, rx) = tokio::sync::oneshot::channel();
                control
                    .blocking_send(tlsplice::proxy::Control::Handover(tx))
                    .ok()?;
                let mut sockets = rx.blocking_recv().ok()?;
                let bpf = telemetry.bpf().and_then(|b| match b.handover() {
                    Ok((pin_dir, lock)) => Some((
                        tlsplice::takeover::BpfHandover {
                            pin_dir,
                            object: tlsplice::bpf::object_id(),
                        },
                        lock,
                    )),
                    Err(e) => {
                        tracing::warn!(error = %e, "the eBPF maps are not handed over: the new agent loads its own");
                        None
                    }
                });
                if let Some((fd, addr)) = &admin
                    && let Ok(copy) = fd.try_clone()
                {
                    sockets.push((
                        SocketRecord {
                            name: ADMIN_SOCKET.into(),
                            addr: *addr,
                        },
                        copy,
                    ));
                }
                Some(tlsplice::takeover::Offer { sockets, bpf })
            };
            loop {
                match offering.next(&offer) {
                    Ok(Outcome::TakenOver {
                        pid,
                        adopted,
                        bpf_adopted,
                        mover,
                    }) => {
                        tracing::info!(new_agent = pid, adopted = ?adopted, bpf_adopted,
                            "taken over: listening sockets closed here; moving the connections that can move");
                        // The new agent serves the admin socket too: this one's server stops
                        // now rather than after the moves.
                        serving_elsewhere.notify_one();
                        if bpf_adopted && let Some(bpf) = telemetry.bpf() {
                            // The new agent uses the maps and their pins from now on.
                            bpf.hand_over();
                        }
                        // Sockmap connections move when the new agent shares the maps.
                        let moves =
                            move_connections(mover, &control, adopted.clone(), bpf_adopted);
                        let _ = done.send(TakenOver {
                            pid,
                            adopted,
                            moves,
                        });
                        return;
                    }
                    Ok(Outcome::Refused(why)) => {
                        telemetry.count_takeover_refused();
                        tracing::warn!(reason = %why, "takeover refused: this agent goes on serving");
                    }
                    Err(e) => {
                        telemetry.count_takeover_refused();
                        tracing::warn!(error = %e, "takeover refused (it failed): this agent goes on serving");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            }
        })
        .context("starting the takeover thread")?;
    Ok(outcomes)
}

/// Loads the eBPF programs as `config.ebpf.mode` asks; `Err` only when they are required.
/// `handed_over`: the maps of the agent this one takes over from, adopted when they are in the
/// same pin directory and were made by the same object (else this agent loads its own, and
/// says why).
fn load_bpf(
    config: &tlsplice::config::Config,
    proxy: &tlsplice::proxy::Proxy,
    handed_over: Option<(tlsplice::takeover::BpfHandover, std::os::fd::OwnedFd)>,
) -> Result<Result<tlsplice::bpf::LoadedBpf, tlsplice::bpf::BpfError>> {
    use tlsplice::config::EbpfMode;
    if config.ebpf.mode == EbpfMode::Off {
        return Ok(Err(tlsplice::bpf::BpfError::Disabled));
    }
    let settings = tlsplice::bpf::BpfSettings {
        pin_path: config.ebpf.pin_path.clone(),
        cgroup: config.ebpf.cgroup.clone(),
    };
    let adopt = handed_over.and_then(|(handover, lock)| {
        let object = tlsplice::bpf::object_id();
        let why_not = if handover.pin_dir != settings.pin_path {
            Some(format!(
                "they are pinned in {}, this agent pins in {}",
                handover.pin_dir.display(),
                settings.pin_path.display()
            ))
        } else if handover.object != object {
            Some(format!(
                "they were made by another eBPF object ({}, this agent's is {object})",
                handover.object
            ))
        } else {
            None
        };
        match why_not {
            None => {
                tracing::info!(pin_dir = %handover.pin_dir.display(),
                    "eBPF: adopting the running agent's pinned maps (counters and the sock hash go on); programs loaded for this agent's cgroup");
                Some(std::fs::File::from(lock))
            }
            Some(why) => {
                tracing::warn!(reason = %why, "eBPF: the running agent's maps are not adopted; this agent loads its own");
                None
            }
        }
    });
    let loaded =
        tlsplice::bpf::LoadedBpf::load_adopting(&settings, &proxy.listener_entries(), adopt);
    match (&loaded, config.ebpf.mode) {
        (Ok(bpf), _) => tracing::info!(pin_dir = %bpf.pin_dir().display(),
            cgroup = %bpf.cgroup.display(), "eBPF programs loaded: counters in pinned maps"),
        (Err(e), EbpfMode::Required) => {
            anyhow::bail!("eBPF is required (ebpf.mode = \"required\"): {e}")
        }
        (Err(e), _) => tracing::warn!(error = %e,
            "eBPF off: serving without it (counters in memory; no kernel-side connection counts)"),
    }
    Ok(loaded)
}

fn run(
    config: &tlsplice::config::Config,
    path: &std::path::Path,
    flags: &NodeFlags,
    takeover: Option<(PathBuf, u32)>,
) -> Result<()> {
    match tlsplice::sys::raise_open_files() {
        Ok(n) => tracing::info!(open_files = n, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open file limit"),
    }
    if let Err(e) = tlsplice::sys::disable_transparent_huge_pages() {
        tracing::warn!(error = %e, "transparent huge pages stay on: memory freed after a burst may stay resident");
    }
    let caps = Arc::new(tlsplice::path::KernelCaps::probe());
    tracing::info!(kernel = %tlsplice::probe::kernel_release(), ktls = ?caps, "kernel probed");
    match tlsplice::tls_policy::seed_random() {
        Ok(took) => tracing::info!(ms = took.as_millis(), "random generator seeded"),
        Err(e) => anyhow::bail!("the crypto provider's random generator: {e}"),
    }

    // The privileged start, on this thread alone: bind, load eBPF, measure. Then the
    // capabilities that are no longer needed go, before any other thread exists.
    let setup = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the setup runtime")?;
    // A live upgrade: the running agent's listening sockets, before anything binds.
    let started = std::time::Instant::now();
    let (taker, mut inherited) = match &takeover {
        Some((socket, version)) => match tlsplice::takeover::Taker::connect(socket, *version) {
            Ok((taker, inherited)) => {
                tracing::info!(socket = %socket.display(), sockets = inherited.offered(),
                    "takeover: the running agent handed over its listening sockets");
                (Some(taker), inherited)
            }
            Err(e) if e.nobody_there() => {
                tracing::info!(socket = %socket.display(), error = %e,
                    "takeover: no agent runs here to take over from; starting fresh");
                (None, tlsplice::takeover::Inherited::default())
            }
            Err(e) => {
                return Err(e).context("taking over from the running agent (it goes on serving)");
            }
        },
        None => (None, tlsplice::takeover::Inherited::default()),
    };
    let (proxy, telemetry, admin, admin_state) = setup.block_on(async {
        // SIGHUP's default action would kill the agent: take it over before anything slow.
        // (The handler stays installed for the life of the process; this stream does not.)
        let _hangups = signal(SignalKind::hangup())?;
        let mut proxy =
            tlsplice::proxy::Proxy::bind_inheriting(config, caps, None, &mut inherited).await?;
        let names = proxy
            .listener_entries()
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect();
        let telemetry = Arc::new(tlsplice::metrics::Telemetry::new(
            names,
            load_bpf(config, &proxy, inherited.take_bpf())?,
        ));
        proxy.set_telemetry(&telemetry);
        let admin_state = Arc::new(tlsplice::admin::AdminState::new(config));
        let admin = match inherited.take(tlsplice::takeover::ADMIN_SOCKET, config.admin.listen) {
            Some(socket) => {
                tlsplice::admin::Admin::on(socket, telemetry.clone(), admin_state.clone())?
            }
            None => {
                tlsplice::admin::Admin::bind(
                    config.admin.listen,
                    telemetry.clone(),
                    admin_state.clone(),
                )
                .await?
            }
        };
        // Sockets this configuration does not serve (a listener removed or moved) close
        // here, so that once the old agent stops they refuse connections rather than queue
        // them for nobody.
        inherited.close_rest();
        // Auto measures only with a passthrough listener to serve; a fixed choice costs nothing.
        if proxy.has_passthrough()
            || config.ebpf.passthrough != tlsplice::config::PassthroughPath::Auto
        {
            let ebpf = telemetry
                .bpf()
                .ok_or_else(|| telemetry.ebpf().err().unwrap_or("not loaded"));
            let plain = tlsplice::proxy::measure::decide(config.ebpf.passthrough, ebpf)
                .await
                .map_err(|why| anyhow::anyhow!("refusing to start: {why}"))?;
            tracing::info!(
                sockmap = plain.is_sockmap(),
                why = plain.why(),
                "passthrough data path"
            );
            proxy.set_passthrough(&plain);
        } else {
            proxy.set_passthrough(&tlsplice::path::PlainPath::not_measured(
                config.ebpf.passthrough,
            ));
        }
        anyhow::Ok((proxy, telemetry, admin, admin_state))
    })?;
    setup.shutdown_timeout(std::time::Duration::from_secs(2));
    let keep = tlsplice::privileges::needed(telemetry.ebpf().is_ok());
    match tlsplice::privileges::drop_all_but(&keep) {
        Ok(d) => {
            let why: Vec<String> = keep
                .iter()
                .filter(|(c, _)| d.kept.contains(&c.to_string()))
                .map(|(c, why)| format!("{c}: {why}"))
                .collect();
            tracing::info!(kept = ?d.kept, why = ?why, dropped = ?d.dropped,
                bounding_set_reduced = d.bounding, "capabilities dropped after start");
        }
        Err(e) => tracing::warn!(error = %e, "capabilities not dropped"),
    }
    // A thread of its own: only now, when the start no longer needs to be single-threaded.
    if let Err(e) = tlsplice::memory::return_freed_pages_in_background() {
        tracing::warn!(error = %e, "jemalloc's background thread did not start: freed memory goes back to the kernel only as the agent allocates");
    }

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.limits.worker_threads {
        runtime.worker_threads(n);
    }
    // Each thread's first random bytes, before it runs a handshake (see seed_random); a
    // failure here fails that thread's first handshake instead, and is counted there.
    runtime.on_thread_start(|| {
        let _ = tlsplice::tls_policy::seed_random();
    });
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let mut hangups = signal(SignalKind::hangup())?;
        let mut terms = signal(SignalKind::terminate())?;
        let mut interrupts = signal(SignalKind::interrupt())?;
        let hup = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(tlsplice::certs::watch(
            proxy.tls_watchers(),
            telemetry.clone(),
            config.certs.clone(),
            hup.clone(),
        ));
        let ebpf = match telemetry.ebpf() {
            Ok(()) => "eBPF loaded".to_owned(),
            Err(why) => format!("eBPF off ({why})"),
        };
        admin_state.set(tlsplice::admin::Readiness::Ready(format!(
            "{} listener(s) bound; {ebpf}",
            config.listeners.len()
        )));
        tracing::info!(addr = ?admin.local_addr(), "admin server listening");
        let admin_socket = admin.socket_copy();
        let admin_addr = admin.local_addr();
        let admin_task = tokio::spawn(admin.run());
        let (control, control_rx) = tokio::sync::mpsc::channel(4);
        let drain = config.limits.drain_timeout();
        let serving = tokio::spawn(proxy.serve(control_rx));
        // This agent's own takeover socket first: once the old agent is told this one
        // serves, it stops, so nothing after that may fail.
        // Told when a new agent took over, before the moves.
        let serving_elsewhere = Arc::new(tokio::sync::Notify::new());
        let mut taken_over = match &flags.takeover_socket {
            Some(socket) => {
                let admin_socket = admin_socket.ok().zip(admin_addr);
                offer_takeover(
                    socket,
                    takeover.is_some(),
                    control.clone(),
                    admin_socket,
                    telemetry.clone(),
                    serving_elsewhere.clone(),
                )?
            }
            None => tokio::sync::mpsc::unbounded_channel().1,
        };
        if let Some(taker) = taker {
            let adopted = inherited.adopted().to_vec();
            // Every listener and the admin server: those not adopted were bound anew.
            let sockets = config.listeners.len() as u64 + 1;
            telemetry.record_takeover(
                started.elapsed(),
                adopted.len() as u64,
                sockets.saturating_sub(adopted.len() as u64),
            );
            let bpf_adopted = telemetry.bpf().is_some_and(|b| b.adopted());
            let taker = tokio::task::spawn_blocking(move || {
                let mut taker = taker;
                taker.serving(adopted.clone(), bpf_adopted).map(|()| {
                    tracing::info!(adopted = ?adopted, takeover_ms = started.elapsed().as_millis(),
                        "takeover: serving; the old agent stops accepting and hands over its connections");
                    taker
                })
            })
            .await?
            // The old agent did not hear it and goes on serving everything: this one leaves
            // rather than share the sockets with it for good.
            .context("telling the old agent this one serves")?;
            if let Some(bpf) = telemetry.bpf().filter(|b| b.adopted()) {
                // The old agent leaves the maps and their pins to this one now.
                bpf.own_adopted();
            }
            if let Some(socket) = &flags.takeover_socket {
                // The old agent stops: the next upgrade finds this one at the usual path.
                match tlsplice::takeover::install(socket) {
                    Ok(()) => tracing::info!(socket = %socket.display(), "takeover socket in place"),
                    Err(e) => tracing::warn!(error = %e,
                        "takeover socket not moved into place: this agent cannot be taken over until it restarts"),
                }
            }
            // Then the established connections that can move, batch by batch.
            let adopting = control.clone();
            let moving_since = std::time::Instant::now();
            let moved = tokio::task::spawn_blocking(move || {
                taker.adopt_connections(&mut |batch| {
                    let n = batch.len();
                    let (reply, answer) = tokio::sync::oneshot::channel();
                    if adopting
                        .blocking_send(tlsplice::proxy::Control::Adopt(batch, reply))
                        .is_err()
                    {
                        return (0, vec![format!("{n} connections: the proxy stopped")]);
                    }
                    answer
                        .blocking_recv()
                        .unwrap_or_else(|_| (0, vec![format!("{n} connections: the proxy stopped")]))
                })
            })
            .await?;
            match moved {
                Ok(summary) => {
                    let took = moving_since.elapsed();
                    telemetry.record_moves(summary, took);
                    tracing::info!(moved = summary.moved, lost = summary.lost,
                        staying = summary.staying, move_ms = took.as_millis(),
                        takeover_ms = started.elapsed().as_millis(),
                        "takeover: connections moved from the old agent (those staying end or drain there)");
                }
                Err(e) => tracing::warn!(error = %e,
                    "takeover: the old agent's connections did not all arrive (those not adopted stay with it or were lost)"),
            }
        }
        let mut current = config.clone();
        let why = loop {
            tokio::select! {
                () = serving_elsewhere.notified() => admin_task.abort(),
                Some(done) = taken_over.recv() => {
                    let TakenOver { pid, adopted, moves } = done;
                    match moves {
                        Ok((summary, took)) => tracing::info!(new_agent = pid, adopted = ?adopted,
                            moved = summary.moved, lost = summary.lost, staying = summary.staying,
                            move_ms = took.as_millis(),
                            "taken over: connections moved to the new agent; those staying here drain"),
                        Err(e) => tracing::warn!(new_agent = pid, error = %e,
                            "taken over, but the connections' moves stopped: those not moved drain here"),
                    }
                    admin_task.abort();
                    break "takeover";
                }
                _ = hangups.recv() => {
                    tracing::info!("SIGHUP: reading the configuration and checking certificate files");
                    reload(path, flags, &mut current, &control, &admin_state, &telemetry).await;
                    hup.notify_one();
                }
                _ = terms.recv() => break "SIGTERM",
                _ = interrupts.recv() => break "SIGINT",
            }
        };
        tracing::info!(
            signal = why,
            drain_timeout_ms = drain.as_millis(),
            "stopping: listeners closed, draining connections"
        );
        admin_state.set(tlsplice::admin::Readiness::Draining);
        let _ = control.send(tlsplice::proxy::Control::Stop(drain)).await;
        serving.await.context("the proxy task failed")?;
        if why == "takeover" && flags.after_takeover == AfterTakeover::Wait {
            tracing::info!("taken over and drained: waiting for SIGTERM (--after-takeover wait)");
            tokio::select! {
                _ = terms.recv() => {}
                _ = interrupts.recv() => {}
            }
        }
        // The takeover thread, blocked waiting for a successor, holds the telemetry (and so
        // the maps) for good: the pins go now.
        if let Some(bpf) = telemetry.bpf() {
            bpf.unpin();
        }
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}
