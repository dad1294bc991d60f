//! Listeners, kernel capabilities and connection reports; the modes live in their own files
//! ([`tls`]: terminate, reencrypt, originate; [`passthrough`]), the byte movers in [`relay`].

pub mod passthrough;
mod relay;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::bpf::ListenerEntry;
use crate::certs::WatchedTls;
use crate::config::{Config, DataPathPolicy, LimitsConfig, ListenerConfig, Mode};
use crate::ktls::{Cipher, TlsVersion};
use crate::metrics::Telemetry;
use crate::probe;

/// How a connection's bytes move after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// Keys in the kernel; bytes moved with splice(2) through a pipe per direction.
    Ktls,
    /// Both legs plain TCP to the agent (passthrough); spliced through a pipe per direction.
    Splice,
    /// rustls in user space and a copy loop.
    Userspace,
    /// Both legs plain TCP (passthrough) in the eBPF sock hash: the kernel redirects each
    /// segment to the other leg.
    Sockmap,
}

impl fmt::Display for DataPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataPath::Ktls => "ktls",
            DataPath::Splice => "splice",
            DataPath::Sockmap => "sockmap",
            DataPath::Userspace => "userspace",
        })
    }
}

/// What the running kernel can offload, probed once at start.
#[derive(Debug, Clone)]
pub struct KernelCaps {
    /// Version/cipher pairs the kernel takes for both TX and RX, or why kTLS is unusable.
    ktls: Result<BTreeSet<(TlsVersion, Cipher)>, String>,
    /// `Ok` when the kernel takes new TLS 1.3 keys on a live socket (KeyUpdate), else why not.
    pub(crate) rekey: Result<(), String>,
}

impl KernelCaps {
    /// Probes the running kernel.
    pub fn probe() -> Self {
        Self::from_report(&probe::ProbeReport::collect())
    }

    /// What a probe report says can be offloaded: pairs accepted for both TX and RX.
    pub fn from_report(report: &probe::ProbeReport) -> Self {
        let ktls = match (&report.ktls, &report.splice) {
            (Some(why), _) => Err(format!("kernel has no kTLS: {why}")),
            (None, Some(why)) => Err(format!("kernel cannot splice kTLS sockets: {why}")),
            (None, None) => Ok(report
                .ciphers
                .iter()
                .filter(|c| c.tx.is_none() && c.rx.is_none())
                .map(|c| (c.version, c.cipher))
                .collect()),
        };
        let rekey = match &report.rekey {
            None => Ok(()),
            Some(why) => Err(format!("kernel cannot rekey kTLS: {why}")),
        };
        Self { ktls, rekey }
    }

    /// `Ok` when the kernel can offload every version and cipher rustls may negotiate here, so
    /// a handshake can be run for the kernel before its outcome is known.
    pub fn offloads_all(&self) -> Result<(), String> {
        let supported = self.ktls.as_ref().map_err(Clone::clone)?;
        let missing: Vec<String> = TlsVersion::ALL
            .iter()
            .flat_map(|&v| Cipher::ALL.iter().map(move |&c| (v, c)))
            .filter(|pair| !supported.contains(pair))
            .map(|(v, c)| format!("{v} {c}"))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "kernel cannot offload {} (TX and RX)",
                missing.join(", ")
            ))
        }
    }

    /// `Ok` when the kernel can carry this session, else why not.
    pub fn offload(
        &self,
        version: Option<TlsVersion>,
        cipher: Option<Cipher>,
    ) -> Result<(), String> {
        let supported = self.ktls.as_ref().map_err(Clone::clone)?;
        let (Some(v), Some(c)) = (version, cipher) else {
            return Err("negotiated version or cipher cannot be offloaded to kTLS".into());
        };
        if supported.contains(&(v, c)) {
            Ok(())
        } else {
            Err(format!("kernel cannot offload {v} {c} (TX and RX)"))
        }
    }
}

/// Whether a listener can serve on this kernel and on which data path; `Err` says why it cannot
/// run at all (TLS material that does not load, or `data_path = "ktls"` on a kernel that cannot
/// offload). Used by `tlsplice probe --config`.
pub fn readiness(l: &ListenerConfig, caps: &KernelCaps) -> Result<String, String> {
    let telemetry = Arc::new(Telemetry::memory(BTreeMap::new(), "readiness check".into()));
    let limits = SharedLimits::new(&LimitsConfig::default());
    ListenerState::new(l, Arc::new(caps.clone()), None, 0, telemetry, limits)
        .map_err(|e| e.to_string())?;
    if l.mode == Mode::Passthrough {
        return Ok(match l.data_path {
            DataPathPolicy::Userspace => "data path userspace (listener data_path = userspace)",
            _ => "data path splice (passthrough: both legs are plain TCP to the agent)",
        }
        .to_owned());
    }
    let offloadable = match &caps.ktls {
        Ok(pairs) if pairs.is_empty() => Err("kernel offloads no TLS version and cipher".into()),
        Ok(pairs) => Ok(pairs
            .iter()
            .map(|(v, c)| format!("{v} {c}"))
            .collect::<Vec<_>>()
            .join(", ")),
        Err(why) => Err(why.clone()),
    };
    match (l.data_path, offloadable) {
        (DataPathPolicy::Userspace, _) => {
            Ok("data path userspace (listener data_path = userspace)".into())
        }
        (DataPathPolicy::Auto, Ok(pairs)) => Ok(format!(
            "data path ktls for {pairs}; userspace for other sessions"
        )),
        (DataPathPolicy::Ktls, Ok(pairs)) => Ok(format!(
            "data path ktls for {pairs}; other sessions are refused (data_path = \"ktls\")"
        )),
        (DataPathPolicy::Auto, Err(why)) => Ok(format!("data path userspace: {why}")),
        (DataPathPolicy::Ktls, Err(why)) => Err(format!("data_path = \"ktls\" but {why}")),
    }
}

/// The outcome of one connection, as logged and (optionally) sent to an observer.
#[derive(Debug, Clone)]
pub struct ConnectionReport {
    /// Listener name.
    pub listener: String,
    /// Client address.
    pub peer: SocketAddr,
    /// The data path used, when the connection got that far.
    pub data_path: Option<DataPath>,
    /// Why that data path (or why none).
    pub reason: String,
    /// Negotiated version and cipher, e.g. "TLSv1.3 AES-128-GCM".
    pub session: String,
    /// The verified client certificate's names (mTLS listeners), e.g. "CN=a SAN=DNS:a".
    pub client_identity: Option<String>,
    /// Plaintext bytes from the client to the upstream.
    pub bytes_up: u64,
    /// TLS 1.3 key changes under kTLS: the peers' KeyUpdates followed and our own (on request
    /// or at the record limit), each direction counted once.
    pub key_updates: u64,
    /// Session tickets stored from a TLS upstream under kTLS, for resumption.
    pub tickets: u64,
    /// Plaintext bytes from the upstream to the client.
    pub bytes_down: u64,
    /// The client leg's TLS handshake, when the agent ran one.
    pub client_handshake: Option<HandshakeOutcome>,
    /// The upstream leg's TLS handshake, when the agent ran one.
    pub upstream_handshake: Option<HandshakeOutcome>,
    /// `None` on a clean close, else the error.
    pub error: Option<String>,
}

impl ConnectionReport {
    /// A report for a connection that has just been accepted.
    pub fn new(listener: &str, peer: SocketAddr) -> Self {
        Self {
            listener: listener.to_owned(),
            peer,
            data_path: None,
            reason: String::new(),
            session: String::new(),
            client_identity: None,
            bytes_up: 0,
            key_updates: 0,
            tickets: 0,
            bytes_down: 0,
            client_handshake: None,
            upstream_handshake: None,
            error: None,
        }
    }
}

/// How one TLS handshake ended, as counted by [`crate::metrics`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeOutcome {
    /// `None` when it completed, else the reason it failed (a `tlsplice_common::REASONS` text).
    pub failure: Option<String>,
    /// Negotiated protocol version, wire value (0 when it failed).
    pub version: u16,
    /// Negotiated cipher suite, IANA value (0 when it failed).
    pub suite: u16,
}

/// Errors starting the proxy, with the listener they concern.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// TLS material could not be loaded.
    #[error("listener {listener:?}: {source}")]
    Material {
        /// Listener name.
        listener: String,
        /// What and why.
        source: crate::identity::MaterialError,
    },
    /// The listen address could not be bound.
    #[error("listener {listener:?}: bind {addr}: {source}")]
    Bind {
        /// Listener name.
        listener: String,
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The node-wide limits every listener shares.
#[derive(Debug, Clone)]
pub(crate) struct SharedLimits {
    /// Connections held at once, over all listeners.
    pub(crate) connections: Arc<Semaphore>,
    /// TLS handshakes in progress at once, over all listeners.
    pub(crate) handshakes: Arc<Semaphore>,
    pub(crate) max_connections: usize,
    pub(crate) max_handshakes: usize,
}

impl SharedLimits {
    fn new(limits: &LimitsConfig) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
            max_connections: limits.max_connections,
            max_handshakes: limits.max_handshakes,
        }
    }
}

/// A listener ready to accept, with everything its connections share.
pub(crate) struct ListenerState {
    pub(crate) config: ListenerConfig,
    /// This listener's TLS material (certificates, trust), swapped when its files change.
    pub(crate) tls: Arc<WatchedTls>,
    pub(crate) caps: Arc<KernelCaps>,
    pub(crate) reports: Option<mpsc::UnboundedSender<ConnectionReport>>,
    /// This listener's index in counter keys.
    pub(crate) index: u16,
    pub(crate) telemetry: Arc<Telemetry>,
    /// Node-wide passthrough data path, as decided at start, and why.
    pub(crate) passthrough: passthrough::PlainPath,
    pub(crate) limits: SharedLimits,
    /// This listener's own connection limit.
    connections: Option<Arc<Semaphore>>,
}

impl ListenerState {
    fn new(
        l: &ListenerConfig,
        caps: Arc<KernelCaps>,
        reports: Option<mpsc::UnboundedSender<ConnectionReport>>,
        index: u16,
        telemetry: Arc<Telemetry>,
        limits: SharedLimits,
    ) -> Result<Self, ProxyError> {
        let tls = WatchedTls::load(l).map_err(|source| ProxyError::Material {
            listener: l.name.clone(),
            source,
        })?;
        Ok(Self {
            config: l.clone(),
            tls: Arc::new(tls),
            caps,
            reports,
            index,
            telemetry,
            passthrough: passthrough::PlainPath::default(),
            limits,
            connections: l.max_connections.map(|n| Arc::new(Semaphore::new(n))),
        })
    }

    /// Takes this connection's places under the node-wide and the listener's limits, or says
    /// which limit refuses it.
    fn admit(&self) -> Result<Admission, (&'static str, String)> {
        let node = self
            .limits
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                (
                    "connection limit",
                    format!(
                        "{} connections held (limits.max_connections)",
                        self.limits.max_connections
                    ),
                )
            })?;
        let own = match &self.connections {
            None => None,
            Some(sem) => Some(sem.clone().try_acquire_owned().map_err(|_| {
                (
                    "listener connection limit",
                    format!(
                        "{} connections held on this listener (max_connections)",
                        self.config.max_connections.unwrap_or_default()
                    ),
                )
            })?),
        };
        Ok(Admission {
            _node: node,
            _own: own,
        })
    }

    /// A place under the handshake limit for one connection's TLS handshakes, or why not.
    pub(crate) fn handshake_permit(
        &self,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, (&'static str, String)> {
        self.limits
            .handshakes
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                (
                    "handshake limit",
                    format!(
                        "{} TLS handshakes in progress (limits.max_handshakes)",
                        self.limits.max_handshakes
                    ),
                )
            })
    }
}

/// A connection's places under the connection limits, given back when it ends.
struct Admission {
    _node: tokio::sync::OwnedSemaphorePermit,
    _own: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Every listener's TLS material loaded from `config`, or every listener problem with it
/// (`tlsplice check`, and the agent before it binds anything).
pub fn check_material(config: &Config) -> Vec<String> {
    config
        .listeners
        .iter()
        .filter_map(|l| {
            WatchedTls::load(l)
                .err()
                .map(|e| format!("listener {:?}: {e}", l.name))
        })
        .collect()
}

/// Bound listeners, ready to serve.
pub struct Proxy {
    /// Bound and listening, not yet registered with a runtime: the agent binds before it
    /// drops its capabilities and starts its worker threads.
    bound: Vec<(std::net::TcpListener, ListenerState)>,
}

impl Proxy {
    /// Loads TLS material and binds every listener. Connections are counted in memory until
    /// [`Proxy::set_telemetry`] says otherwise.
    pub async fn bind(
        config: &Config,
        caps: Arc<KernelCaps>,
        reports: Option<mpsc::UnboundedSender<ConnectionReport>>,
    ) -> Result<Self, ProxyError> {
        let names = config
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| (listener_index(i), l.name.clone()))
            .collect();
        let telemetry = Arc::new(Telemetry::memory(names, "not loaded".into()));
        let limits = SharedLimits::new(&config.limits);
        let mut bound = Vec::new();
        for (i, l) in config.listeners.iter().enumerate() {
            let state = ListenerState::new(
                l,
                caps.clone(),
                reports.clone(),
                listener_index(i),
                telemetry.clone(),
                limits.clone(),
            )?;
            let listener = listen(l.listen).map_err(|source| ProxyError::Bind {
                listener: l.name.clone(),
                addr: l.listen,
                source,
            })?;
            bound.push((listener, state));
        }
        Ok(Self { bound })
    }

    /// Every bound listener with its counter index and port, for the BPF maps.
    pub fn listener_entries(&self) -> Vec<ListenerEntry> {
        self.bound
            .iter()
            .map(|(l, s)| ListenerEntry {
                index: s.index,
                name: s.config.name.clone(),
                port: l.local_addr().map_or(0, |a| a.port()),
            })
            .collect()
    }

    /// How passthrough listeners relay from now on.
    pub fn set_passthrough(&mut self, path: &passthrough::PlainPath) {
        for (_, state) in &mut self.bound {
            state.passthrough = path.clone();
        }
    }

    /// Whether any listener is a passthrough listener.
    pub fn has_passthrough(&self) -> bool {
        self.bound
            .iter()
            .any(|(_, s)| s.config.mode == Mode::Passthrough)
    }

    /// Where every listener counts its connections from now on.
    pub fn set_telemetry(&mut self, telemetry: &Arc<Telemetry>) {
        for (_, state) in &mut self.bound {
            state.telemetry = telemetry.clone();
        }
    }

    /// The address a listener is bound to (useful with port 0).
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.bound
            .iter()
            .find(|(_, s)| s.config.name == name)
            .and_then(|(l, _)| l.local_addr().ok())
    }

    /// Every listener's index and TLS material, for the certificate watcher.
    pub fn tls_watchers(&self) -> Vec<(u16, Arc<WatchedTls>)> {
        self.bound
            .iter()
            .map(|(_, s)| (s.index, s.tls.clone()))
            .collect()
    }

    /// Accepts on every listener until the task is dropped.
    pub async fn run(self) {
        self.serve(std::future::pending()).await;
    }

    /// Accepts on every listener until `stop` yields a drain deadline; then every listener
    /// closes at once, established connections get until the deadline to finish, and those
    /// still open are closed (each reported with the reason `drain deadline`). Returns when
    /// every connection has ended.
    pub async fn serve(self, stop: impl std::future::Future<Output = std::time::Duration>) {
        let (tx, rx) = watch::channel(None);
        let mut tasks = tokio::task::JoinSet::new();
        for (listener, state) in self.bound {
            match TcpListener::from_std(listener) {
                Ok(listener) => {
                    tasks.spawn(accept_loop(listener, Arc::new(state), rx.clone()));
                }
                Err(e) => {
                    tracing::error!(listener = %state.config.name, error = %e,
                        "cannot accept: registering the listener with the runtime failed");
                }
            }
        }
        tokio::select! {
            deadline = stop => {
                let _ = tx.send(Some(deadline));
            }
            // Accept loops end only when told to; keep polling so a panic is not left unseen.
            () = async { while tasks.join_next().await.is_some() {} } => {}
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// A non-blocking listening socket on `addr`, with SO_REUSEADDR so a restarted agent can bind
/// while the old one's connections are in TIME_WAIT.
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Counter keys carry listener indexes as u16; configurations never get near that many.
fn listener_index(i: usize) -> u16 {
    u16::try_from(i).unwrap_or(u16::MAX)
}

/// Waits for the drain deadline sent by [`Proxy::serve`] (forever when none will come).
async fn drain_deadline(
    stop: &mut watch::Receiver<Option<std::time::Duration>>,
) -> std::time::Duration {
    loop {
        if let Some(deadline) = *stop.borrow_and_update() {
            return deadline;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Reports, logs and counts one connection's end.
fn finish(state: &ListenerState, report: ConnectionReport) {
    log_report(&report);
    state.telemetry.record(state.index, &report);
    if let Some(tx) = &state.reports {
        let _ = tx.send(report);
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<ListenerState>,
    mut stop: watch::Receiver<Option<std::time::Duration>>,
) {
    // Every connection task, so a drain can wait for them and close what is left.
    let mut connections = tokio::task::JoinSet::new();
    let mut peers: HashMap<tokio::task::Id, SocketAddr> = HashMap::new();
    let stopped = drain_deadline(&mut stop);
    tokio::pin!(stopped);
    let deadline = loop {
        tokio::select! {
            biased;
            deadline = &mut stopped => break deadline,
            Some(done) = connections.join_next_with_id(), if !connections.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => {
                        if e.is_panic() {
                            tracing::error!(listener = %state.config.name, error = %e, "connection task panicked");
                        }
                        e.id()
                    }
                };
                peers.remove(&id);
            }
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => match state.admit() {
                    Ok(admission) => {
                        let state = state.clone();
                        let task = connections.spawn(async move {
                            let report = match state.config.mode {
                                Mode::Terminate | Mode::Reencrypt | Mode::Originate => {
                                    tls::handle(&state, sock, peer).await
                                }
                                Mode::Passthrough => passthrough::handle(&state, sock, peer).await,
                            };
                            // The places are free before the report says the connection ended.
                            drop(admission);
                            finish(&state, report);
                        });
                        peers.insert(task.id(), peer);
                    }
                    Err((reason, error)) => {
                        let mut report = ConnectionReport::new(&state.config.name, peer);
                        reason.clone_into(&mut report.reason);
                        report.error = Some(error);
                        finish(&state, report);
                        // A FIN, and whatever the client already sent read away, rather than
                        // a reset; bounded in time by linger_close.
                        connections.spawn(relay::linger_close(sock));
                    }
                },
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = %state.config.name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    };
    drop(listener);
    if !peers.is_empty() {
        tracing::info!(listener = %state.config.name, connections = peers.len(),
            deadline_ms = deadline.as_millis(), "listener closed; draining its connections");
    }
    let drained = tokio::time::timeout(deadline, async {
        while let Some(done) = connections.join_next_with_id().await {
            peers.remove(&done.map_or_else(|e| e.id(), |(id, ())| id));
        }
    })
    .await;
    if drained.is_err() {
        connections.abort_all();
        for peer in peers.into_values() {
            let mut report = ConnectionReport::new(&state.config.name, peer);
            report.reason = "drain deadline".into();
            report.error = Some(format!(
                "still open at the drain deadline ({} ms): closed",
                deadline.as_millis()
            ));
            finish(&state, report);
        }
        while connections.join_next().await.is_some() {}
    }
}

fn log_report(r: &ConnectionReport) {
    let path = r
        .data_path
        .map_or_else(|| "none".to_owned(), |p| p.to_string());
    let client = r.client_identity.as_deref().unwrap_or("-");
    match &r.error {
        None => tracing::info!(
            listener = %r.listener, peer = %r.peer, data_path = %path, reason = %r.reason,
            session = %r.session, client_identity = %client, bytes_up = r.bytes_up, bytes_down = r.bytes_down,
            key_updates = r.key_updates, tickets = r.tickets, "connection closed"
        ),
        Some(e) => tracing::warn!(
            listener = %r.listener, peer = %r.peer, data_path = %path, reason = %r.reason,
            session = %r.session, client_identity = %client, bytes_up = r.bytes_up, bytes_down = r.bytes_down,
            key_updates = r.key_updates, tickets = r.tickets, error = %e, "connection failed"
        ),
    }
}
