//! The agent's TOML configuration: listeners, their mode, upstream and TLS material.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod tls;
mod validate;

pub use self::tls::{CipherSuiteName, GroupName, TlsPolicyConfig, VersionName};

/// How a listener treats its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Client TLS, plaintext to the upstream.
    Terminate,
    /// Client TLS, a new TLS connection to the upstream.
    Reencrypt,
    /// Plaintext in (a local app), TLS to the upstream.
    Originate,
    /// The client's TLS passed through untouched, routed by the ClientHello's server name.
    Passthrough,
}

impl Mode {
    /// The client leg is TLS that this agent terminates.
    pub fn client_tls(self) -> bool {
        matches!(self, Mode::Terminate | Mode::Reencrypt)
    }

    /// The upstream leg is TLS that this agent originates.
    pub fn upstream_tls(self) -> bool {
        matches!(self, Mode::Reencrypt | Mode::Originate)
    }
}

/// How the agent connects to a TLS upstream (reencrypt, originate).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Name the upstream certificate must carry; sent as SNI.
    pub server_name: String,
    /// PEM bundle of CAs the upstream certificate must chain to.
    pub ca: PathBuf,
    /// PEM client certificate chain for upstream mTLS (with `client_key`).
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key for `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Versions offered to the upstream (see [`TlsPolicyConfig`]).
    #[serde(default)]
    pub tls_versions: Option<Vec<VersionName>>,
    /// Cipher suites offered to the upstream, in order.
    #[serde(default)]
    pub cipher_suites: Option<Vec<CipherSuiteName>>,
    /// Key exchange groups offered to the upstream, in order.
    #[serde(default)]
    pub groups: Option<Vec<GroupName>>,
    /// Resume sessions with the upstream.
    #[serde(default)]
    pub session_resumption: Option<bool>,
    /// Who the upstream must be, beyond `server_name`: its certificate must match one of
    /// these (`spiffe://trust-domain/path-prefix`, `dns:name`, `cn:name`); empty: any
    /// certificate valid for `server_name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_servers: Vec<crate::authz::IdentityPattern>,
    /// The policy in force: the keys above over the node's `[tls]` defaults
    /// ([`Config::resolve_tls`]).
    #[serde(skip)]
    pub effective_tls: TlsPolicyConfig,
}

impl UpstreamTls {
    /// The policy keys this leg sets itself.
    pub fn own_tls(&self) -> TlsPolicyConfig {
        TlsPolicyConfig {
            tls_versions: self.tls_versions.clone(),
            cipher_suites: self.cipher_suites.clone(),
            groups: self.groups.clone(),
            session_resumption: self.session_resumption,
        }
    }
}

/// Which PROXY protocol header the agent writes first on each upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// The text header: client and listener addresses only.
    V1,
    /// The binary header: addresses, and on TLS client legs the session and the verified client
    /// certificate as TLVs (see [`crate::proxy_protocol`]).
    V2,
}

/// Which data path a listener may use after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPathPolicy {
    /// kTLS + splice when the kernel can offload the negotiated version and cipher, otherwise
    /// user space (and each connection says why).
    #[default]
    Auto,
    /// kTLS + splice only: a connection that cannot be offloaded is closed.
    Ktls,
    /// rustls in user space and a copy loop.
    Userspace,
}

/// One listener.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name used in logs and metrics.
    pub name: String,
    /// What the listener does.
    pub mode: Mode,
    /// Address to accept on.
    pub listen: SocketAddr,
    /// Upstream address; for passthrough the route for server names not in `sni` (without
    /// it, those connections are refused).
    #[serde(default)]
    pub upstream: Option<SocketAddr>,
    /// terminate: a unix socket path for a local plaintext upstream, instead of `upstream`.
    #[serde(default)]
    pub upstream_unix: Option<PathBuf>,
    /// passthrough: upstream per server name (matched case-insensitively).
    #[serde(default)]
    pub sni: BTreeMap<String, SocketAddr>,
    /// PEM certificate chain, leaf first (terminate, reencrypt).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key: PKCS#8, SEC1 or PKCS#1 (terminate, reencrypt).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// A DER OCSP response for `cert` (fetched by the node, not the agent): stapled while it
    /// says "good" and its nextUpdate has not passed; re-read when the file changes. A stale or
    /// unusable one is not stapled (`tlsplice_ocsp_response_stale` is 1).
    #[serde(default)]
    pub ocsp: Option<PathBuf>,
    /// More certificates, each chosen when the client's server name (SNI) matches one of its
    /// names; `cert`/`key` serve every other name and clients that send none.
    #[serde(default)]
    pub certs: Vec<SniCertificate>,
    /// PEM bundle of CAs for client certificates (terminate, reencrypt). When set, every client
    /// must present a certificate that chains to one of them (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// PEM (or DER) CRL files from the client CA (with `client_ca`): a client certificate they
    /// revoke is refused (alert certificate_revoked, outcome `certificate refused`). Each
    /// client certificate's status must be known from them (its issuer's CRL is here); re-read
    /// when a file changes, like the certificates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_crls: Vec<PathBuf>,
    /// Which clients may connect (with `client_ca`): a client certificate must match one of
    /// these (`spiffe://trust-domain/path-prefix`, `dns:name`, `cn:name`), else the
    /// handshake ends with the access_denied alert. Empty: any certificate the CA issued.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_clients: Vec<crate::authz::IdentityPattern>,
    /// TLS towards the upstream (reencrypt, originate).
    #[serde(default)]
    pub upstream_tls: Option<UpstreamTls>,
    /// The TLS policy towards clients (`[listener.tls]`; terminate, reencrypt).
    #[serde(default, skip_serializing_if = "TlsPolicyConfig::is_empty")]
    pub tls: TlsPolicyConfig,
    /// The policy in force: `tls` over the node's `[tls]` defaults ([`Config::resolve_tls`]).
    #[serde(skip)]
    pub effective_tls: TlsPolicyConfig,
    /// Write a PROXY protocol header first on each upstream connection (before any TLS).
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// ALPN protocols offered, in preference order (none by default).
    #[serde(default)]
    pub alpn: Vec<String>,
    /// Milliseconds a client has to finish the handshake.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Milliseconds to wait for the upstream to accept.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Data path policy.
    #[serde(default)]
    pub data_path: DataPathPolicy,
    /// Records a kTLS leg may send under one key before the agent rekeys (TLS 1.3, on a kernel
    /// that can: 6.14 and later) or closes the connection; default half the cipher suite's
    /// confidentiality limit (2^23 records for AES-GCM).
    #[serde(default)]
    pub rekey_after_records: Option<u64>,
    /// Milliseconds a connection may move no byte either way before it is closed (reason
    /// `idle timeout`), whatever its data path: progress is read from the kernel's TCP counters.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Connections this listener holds at once; over it new ones are closed at once and counted
    /// (reason `listener connection limit`). No limit of its own by default.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Overrides `limits.per_source_connections` on this listener.
    #[serde(default)]
    pub per_source_connections: Option<u32>,
    /// Overrides `limits.per_source_handshakes_per_second` on this listener.
    #[serde(default)]
    pub per_source_handshakes_per_second: Option<u32>,
    /// Overrides `limits.per_source_handshake_burst` on this listener.
    #[serde(default)]
    pub per_source_handshake_burst: Option<u32>,
}

/// A listener certificate chosen by the client's server name.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SniCertificate {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key: PKCS#8, SEC1 or PKCS#1.
    pub key: PathBuf,
    /// Server names it serves (`*.example.com` matches one label); default: the DNS names in
    /// the certificate's subject alternative names.
    #[serde(default)]
    pub server_names: Vec<String>,
    /// A DER OCSP response for `cert`, stapled while it is good and fresh (see `ocsp` on the
    /// listener).
    #[serde(default)]
    pub ocsp: Option<PathBuf>,
}

fn default_handshake_timeout_ms() -> u64 {
    10_000
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}

fn default_idle_timeout_ms() -> u64 {
    3_600_000
}

impl ListenerConfig {
    /// The handshake deadline.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// The upstream connect deadline.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// How long a connection may stay idle.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// The per-source limits this listener applies: its own keys over the node's.
    pub fn per_source(&self, node: &LimitsConfig) -> PerSourceLimits {
        let per_second = self
            .per_source_handshakes_per_second
            .or(node.per_source_handshakes_per_second);
        let burst = self
            .per_source_handshake_burst
            .or(node.per_source_handshake_burst);
        PerSourceLimits {
            connections: self.per_source_connections.or(node.per_source_connections),
            handshakes_per_second: per_second,
            handshake_burst: per_second.map(|r| burst.unwrap_or(r).max(1)),
            prefix_v4: node.source_prefix_v4,
            prefix_v6: node.source_prefix_v6,
        }
    }
}

/// The per-source limits in force on one listener (its keys over `[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerSourceLimits {
    /// Connections one source may hold at once.
    pub connections: Option<u32>,
    /// New connections one source may open per second, on average.
    pub handshakes_per_second: Option<u32>,
    /// New connections one source may open at once (set whenever the rate is).
    pub handshake_burst: Option<u32>,
    /// Leading bits of an IPv4 address that make its source.
    pub prefix_v4: u8,
    /// Leading bits of an IPv6 address that make its source.
    pub prefix_v6: u8,
}

/// Whether the agent loads its eBPF programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EbpfMode {
    /// Load them; when the kernel or the privileges refuse, serve without them and say why.
    #[default]
    Auto,
    /// Refuse to start without them.
    Required,
    /// Do not load them.
    Off,
}

/// How much cheaper in node CPU per byte sockmap must measure than splice for
/// [`PassthroughPath::Auto`] to pick it: measurements this short are noisy, and a choice that
/// flips between restarts on noise is worse than either path.
pub const SOCKMAP_MARGIN: f64 = 0.10;

/// How passthrough listeners move bytes between their two plain legs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PassthroughPath {
    /// splice(2) through a pipe per direction, driven by the agent.
    Splice,
    /// The eBPF sock hash and stream verdict program: the kernel redirects each segment to the
    /// peer socket; the agent only waits for the ends. Needs the eBPF programs loaded.
    Sockmap,
    /// Measure both on this kernel when the agent starts (loopback, under a second each) and
    /// use sockmap only when it costs the node clearly less CPU per byte (by
    /// [`SOCKMAP_MARGIN`]); splice otherwise, and when the eBPF programs are off.
    #[default]
    Auto,
}

/// The `[ebpf]` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EbpfConfig {
    /// Load the programs or not.
    #[serde(default)]
    pub mode: EbpfMode,
    /// bpffs directory where the maps and programs are pinned.
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// cgroup v2 directory whose sockets the sock_ops program sees (default: the cgroup2 root).
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Data path of passthrough listeners.
    #[serde(default)]
    pub passthrough: PassthroughPath,
}

/// Where the agent pins its maps and programs unless told otherwise.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/tlsplice";

fn default_pin_path() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_PATH)
}

impl Default for EbpfConfig {
    fn default() -> Self {
        Self {
            mode: EbpfMode::default(),
            pin_path: default_pin_path(),
            cgroup: None,
            passthrough: PassthroughPath::default(),
        }
    }
}

/// The `[admin]` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin server (`/metrics`, `/healthz`).
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

/// The `[limits]` section: node-wide limits and the drain deadline.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections held at once over all listeners; over it new ones are closed at once and
    /// counted (reason `connection limit`).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// TLS handshakes in progress at once over all listeners (they cost the CPU); over it new
    /// connections are closed before their handshake and counted (reason `handshake limit`).
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// TLS handshakes that may wait for a place when `max_handshakes` are in progress (default:
    /// as many as `max_handshakes`; 0 refuses at once). Places go to the waiting sources in
    /// turn, so one source's queue does not hold back another's; a handshake waits at most its
    /// `handshake_timeout_ms` (which the wait counts against), then is closed (reason
    /// `handshake limit`), as is one that finds the queue full.
    #[serde(default)]
    pub handshake_queue: Option<usize>,
    /// On SIGTERM: milliseconds established connections may go on after the listeners close;
    /// those still open then are closed (reason `drain deadline`).
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// Pipes the splice and kTLS data paths hold at once, node-wide (two descriptors each). A
    /// connection takes one per direction only while bytes are in flight, so idle connections
    /// hold none; a direction whose receiver is slow keeps its pipe (with its bytes) until they
    /// are out. At the limit a direction waits for a pipe (counted in
    /// `tlsplice_splice_pipe_waits_total`).
    #[serde(default = "default_max_splice_pipes")]
    pub max_splice_pipes: usize,
    /// TLS 1.3 KeyUpdates a peer may send on one connection in one second (kTLS data path:
    /// each costs the agent a key derivation and a kernel call); the next one in that second
    /// closes the connection (reason `key update rate limit`). HAProxy's
    /// `tune.ssl.keyupdate-rate-limit` has the same default. On the user-space path rustls
    /// applies its own rule (32 in a row without data between them), counted the same way.
    #[serde(default = "default_key_updates_per_second")]
    pub key_updates_per_second: u16,
    /// Connections one source (a client address, or its network under `source_prefix_v4` /
    /// `source_prefix_v6`) may hold at once on one listener; over it new ones are closed before
    /// a byte is read (reason `source connection limit`). No limit by default. A listener's
    /// `per_source_connections` overrides it.
    #[serde(default)]
    pub per_source_connections: Option<u32>,
    /// New connections (each a handshake) one source may open per second on one listener, on
    /// average (a token bucket); over it they are closed before a byte is read (reason `source
    /// rate limit`). No limit by default. A listener's key of the same name overrides it.
    #[serde(default)]
    pub per_source_handshakes_per_second: Option<u32>,
    /// How many new connections one source may open at once after a quiet spell (the token
    /// bucket's size); default one second's worth of `per_source_handshakes_per_second`.
    #[serde(default)]
    pub per_source_handshake_burst: Option<u32>,
    /// Leading bits of an IPv4 client address that make its source: 32 (each address, the
    /// default), 24 (its /24), any of 0-32.
    #[serde(default = "default_source_prefix_v4")]
    pub source_prefix_v4: u8,
    /// Leading bits of an IPv6 client address that make its source: 128 (each address, the
    /// default), 64 (its /64, what one host usually has), any of 0-128.
    #[serde(default = "default_source_prefix_v6")]
    pub source_prefix_v6: u8,
    /// Threads that run connections and handshakes (default: one per CPU the agent may use).
    /// Fewer leave CPUs to the node's workloads; handshakes per second grow with them up to
    /// the CPUs there are.
    #[serde(default)]
    pub worker_threads: Option<usize>,
}

fn default_source_prefix_v4() -> u8 {
    32
}

fn default_source_prefix_v6() -> u8 {
    128
}

fn default_max_connections() -> usize {
    100_000
}

fn default_max_handshakes() -> usize {
    4_096
}

fn default_drain_timeout_ms() -> u64 {
    30_000
}

fn default_max_splice_pipes() -> usize {
    4_096
}

fn default_key_updates_per_second() -> u16 {
    100
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_handshakes: default_max_handshakes(),
            handshake_queue: None,
            drain_timeout_ms: default_drain_timeout_ms(),
            max_splice_pipes: default_max_splice_pipes(),
            key_updates_per_second: default_key_updates_per_second(),
            per_source_connections: None,
            per_source_handshakes_per_second: None,
            per_source_handshake_burst: None,
            source_prefix_v4: default_source_prefix_v4(),
            worker_threads: None,
            source_prefix_v6: default_source_prefix_v6(),
        }
    }
}

impl LimitsConfig {
    /// The drain deadline.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

/// The `[certs]` section: how certificate files are watched.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertsConfig {
    /// Milliseconds between checks of every certificate, key and CA file for new contents
    /// (symlink swaps included: the contents are compared). SIGHUP checks at once.
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
    /// A certificate closer than this many days to its expiry is logged as a warning (at load,
    /// and once when the time passes).
    #[serde(default = "default_expiry_warning_days")]
    pub expiry_warning_days: u64,
}

fn default_reload_interval_ms() -> u64 {
    2_000
}

fn default_expiry_warning_days() -> u64 {
    14
}

impl Default for CertsConfig {
    fn default() -> Self {
        Self {
            reload_interval_ms: default_reload_interval_ms(),
            expiry_warning_days: default_expiry_warning_days(),
        }
    }
}

impl CertsConfig {
    /// Time between file checks.
    pub fn reload_interval(&self) -> Duration {
        Duration::from_millis(self.reload_interval_ms)
    }

    /// The expiry warning threshold.
    pub fn expiry_warning(&self) -> Duration {
        Duration::from_secs(self.expiry_warning_days.saturating_mul(86_400))
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners, each with its own mode.
    #[serde(rename = "listener", default)]
    pub listeners: Vec<ListenerConfig>,
    /// eBPF programs and their pins.
    #[serde(default)]
    pub ebpf: EbpfConfig,
    /// The admin server.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Node-wide limits and the drain deadline.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Certificate reloading and expiry warnings.
    #[serde(default)]
    pub certs: CertsConfig,
    /// Node-wide TLS policy defaults, for every listener and upstream leg that does not set
    /// its own (the node flags `--tls-versions`, `--cipher-suites`, `--tls-groups` and
    /// `--session-resumption` override them).
    #[serde(default, skip_serializing_if = "TlsPolicyConfig::is_empty")]
    pub tls: TlsPolicyConfig,
}

/// One thing wrong in a configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The listener it concerns, by name (`None`: a top-level section).
    pub listener: Option<String>,
    /// The key, e.g. `cert`, `upstream_tls.client_key`, `limits.max_connections`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.listener {
            Some(l) => write!(f, "listener {l:?}: {}: {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// A configuration that could not be loaded, with where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why, with line and column.
        source: Box<toml::de::Error>,
    },
    /// Values are wrong: every problem found, one per line.
    #[error("{}", render_problems(path, problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Everything wrong, in file order.
        problems: Vec<Problem>,
    },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {p}", path.display()))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` is used in messages. Every problem is
    /// reported, not only the first.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            });
        }
        for l in &mut config.listeners {
            l.sni = std::mem::take(&mut l.sni)
                .into_iter()
                .map(|(name, addr)| (name.to_ascii_lowercase(), addr))
                .collect();
        }
        config.resolve_tls();
        Ok(config)
    }

    /// Sets each listener's and upstream leg's policy in force from its own keys over the
    /// node's `[tls]` defaults: at load, and again once the node flags changed the defaults.
    pub fn resolve_tls(&mut self) {
        for l in &mut self.listeners {
            l.effective_tls = l.tls.or(&self.tls);
            if let Some(u) = &mut l.upstream_tls {
                u.effective_tls = u.own_tls().or(&self.tls);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_terminate_listener_with_defaults() {
        let c = Config::parse(
            r#"
            [[listener]]
            name = "web"
            mode = "terminate"
            listen = "127.0.0.1:8443"
            upstream = "127.0.0.1:8080"
            cert = "/c.pem"
            key = "/k.pem"

            [[listener]]
            name = "backend"
            mode = "reencrypt"
            listen = "127.0.0.1:9443"
            upstream = "127.0.0.1:443"
            cert = "/c.pem"
            key = "/k.pem"
            [listener.upstream_tls]
            server_name = "backend.internal"
            ca = "/ca.pem"
            "#,
            Path::new("t.toml"),
        )
        .unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.mode, Mode::Terminate);
        assert_eq!(l.data_path, DataPathPolicy::Auto);
        assert_eq!(l.handshake_timeout(), Duration::from_secs(10));
        let u = c.listeners[1].upstream_tls.as_ref().unwrap();
        assert_eq!(u.server_name, "backend.internal");
        assert!(u.client_cert.is_none());
    }

    /// The shipped examples stay valid.
    #[test]
    fn example_configs_parse() {
        for (name, text) in [
            (
                "terminate",
                include_str!("../../../deploy/examples/terminate.toml"),
            ),
            (
                "reencrypt",
                include_str!("../../../deploy/examples/reencrypt.toml"),
            ),
            (
                "originate",
                include_str!("../../../deploy/examples/originate.toml"),
            ),
            (
                "terminate",
                include_str!("../../../deploy/examples/node.toml"),
            ),
        ] {
            let c = Config::parse(text, Path::new(name)).unwrap();
            assert_eq!(format!("{:?}", c.listeners[0].mode).to_lowercase(), name);
        }
    }

    /// A listener's per-source keys over the node's; the burst defaults to a second's worth.
    #[test]
    fn per_source_limits_take_the_listener_keys_over_the_node_ones() {
        let c = Config::parse(
            r#"
            [limits]
            per_source_connections = 100
            per_source_handshakes_per_second = 50
            source_prefix_v4 = 24
            source_prefix_v6 = 64
            [[listener]]
            name = "node-wide"
            mode = "passthrough"
            listen = "127.0.0.1:1"
            upstream = "127.0.0.1:2"
            [[listener]]
            name = "own"
            mode = "passthrough"
            listen = "127.0.0.1:3"
            upstream = "127.0.0.1:2"
            per_source_connections = 4
            per_source_handshakes_per_second = 5
            per_source_handshake_burst = 20
            "#,
            Path::new("t.toml"),
        )
        .unwrap();
        let node = c.listeners[0].per_source(&c.limits);
        let own = c.listeners[1].per_source(&c.limits);
        let cases = [
            (node, (Some(100), Some(50), Some(50))),
            (own, (Some(4), Some(5), Some(20))),
            (
                c.listeners[0].per_source(&LimitsConfig::default()),
                (None, None, None),
            ),
        ];
        for (i, (got, (connections, rate, burst))) in cases.into_iter().enumerate() {
            assert_eq!(
                (
                    got.connections,
                    got.handshakes_per_second,
                    got.handshake_burst
                ),
                (connections, rate, burst),
                "case {i}"
            );
        }
        assert_eq!((node.prefix_v4, node.prefix_v6), (24, 64));
    }
}
