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

/// Marks a report as closed by the idle timeout (its data path stays, and says how it ran).
pub(crate) fn idled(report: &mut ConnectionReport, timeout: std::time::Duration) {
    report.reason = format!(
        "idle timeout: no byte either way for {} ms ({})",
        timeout.as_millis(),
        report.reason
    );
    report.error = Some(format!(
        "idle for {} ms (idle_timeout_ms): closed",
        timeout.as_millis()
    ));
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
    /// Refused connections being closed gently (each up to a second), over all listeners.
    pub(crate) lingering: Arc<Semaphore>,
}

/// Refused connections closed gently at once; past it they are closed without waiting.
const MAX_LINGERING: usize = 1024;

impl SharedLimits {
    fn new(limits: &LimitsConfig) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
            max_connections: limits.max_connections,
            max_handshakes: limits.max_handshakes,
            lingering: Arc::new(Semaphore::new(MAX_LINGERING)),
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

/// What a serving proxy can be told.
#[derive(Debug)]
pub enum Control {
    /// Apply a new configuration's listeners (SIGHUP); the reply says what changed, or why
    /// nothing did.
    Reload(
        Box<Config>,
        tokio::sync::oneshot::Sender<Result<ReloadSummary, String>>,
    ),
    /// Stop accepting on every listener and drain for up to this long (SIGTERM).
    Stop(std::time::Duration),
}

/// What a reload did, by listener name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    /// New listeners, bound and accepting.
    pub added: Vec<String>,
    /// Listeners closed; their connections drain.
    pub removed: Vec<String>,
    /// Listeners whose settings changed: new connections get the new settings, established
    /// ones keep theirs (a changed address is a close and a new bind).
    pub changed: Vec<String>,
    /// Listeners left as they were.
    pub unchanged: Vec<String>,
}

/// A listener being served.
struct Running {
    index: u16,
    addr: SocketAddr,
    state: watch::Sender<Arc<ListenerState>>,
    stop: watch::Sender<Option<std::time::Duration>>,
}

/// Bound listeners, ready to serve.
pub struct Proxy {
    /// Bound and listening, not yet registered with a runtime: the agent binds before it
    /// drops its capabilities and starts its worker threads.
    bound: Vec<(std::net::TcpListener, ListenerState)>,
    caps: Arc<KernelCaps>,
    reports: Option<mpsc::UnboundedSender<ConnectionReport>>,
    limits: SharedLimits,
    telemetry: Arc<Telemetry>,
    passthrough: passthrough::PlainPath,
    /// Every listener's TLS material by counter index, for the certificate watcher.
    tls: Arc<std::sync::Mutex<BTreeMap<u16, Arc<WatchedTls>>>>,
    /// The index the next new listener name gets (indexes are never reused, so the counters
    /// of a removed listener keep its name).
    next_index: u16,
    /// Counter index by listener name, for every name seen.
    indexes: BTreeMap<String, u16>,
    /// How long a listener removed by a reload lets its connections finish.
    drain: std::time::Duration,
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
        let mut proxy = Self {
            bound: Vec::new(),
            caps,
            reports,
            limits: SharedLimits::new(&config.limits),
            telemetry,
            passthrough: passthrough::PlainPath::default(),
            tls: Arc::default(),
            next_index: 0,
            indexes: BTreeMap::new(),
            drain: config.limits.drain_timeout(),
        };
        for l in &config.listeners {
            let index = proxy.index_of(&l.name);
            let (listener, state) = proxy.prepare(l, index)?;
            proxy.bound.push((listener, state));
        }
        Ok(proxy)
    }

    fn index_of(&mut self, name: &str) -> u16 {
        if let Some(i) = self.indexes.get(name) {
            return *i;
        }
        let i = self.next_index;
        self.next_index = self.next_index.saturating_add(1);
        self.indexes.insert(name.to_owned(), i);
        i
    }

    fn state(&self, l: &ListenerConfig, index: u16) -> Result<ListenerState, ProxyError> {
        let mut state = ListenerState::new(
            l,
            self.caps.clone(),
            self.reports.clone(),
            index,
            self.telemetry.clone(),
            self.limits.clone(),
        )?;
        state.passthrough = self.passthrough.clone();
        Ok(state)
    }

    /// Loads a listener's material and binds its address.
    fn prepare(
        &self,
        l: &ListenerConfig,
        index: u16,
    ) -> Result<(std::net::TcpListener, ListenerState), ProxyError> {
        let state = self.state(l, index)?;
        let listener = listen(l.listen).map_err(|source| ProxyError::Bind {
            listener: l.name.clone(),
            addr: l.listen,
            source,
        })?;
        Ok((listener, state))
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
        self.passthrough = path.clone();
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
        self.telemetry = telemetry.clone();
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

    /// Every listener's TLS material by counter index, kept current across reloads, for the
    /// certificate watcher.
    pub fn tls_watchers(&self) -> Arc<std::sync::Mutex<BTreeMap<u16, Arc<WatchedTls>>>> {
        {
            let mut tls = self.tls.lock().unwrap_or_else(|p| p.into_inner());
            for (_, s) in &self.bound {
                tls.insert(s.index, s.tls.clone());
            }
        }
        self.tls.clone()
    }

    /// Accepts on every listener until the task is dropped.
    pub async fn run(self) {
        let (control, rx) = mpsc::channel(1);
        self.serve(rx).await;
        drop(control);
    }

    /// Starts accepting on a bound listener; `Err` says why it could not.
    fn start(
        &self,
        loops: &mut tokio::task::JoinSet<()>,
        running: &mut BTreeMap<String, Running>,
        listener: std::net::TcpListener,
        state: ListenerState,
    ) -> Result<(), String> {
        let name = state.config.name.clone();
        let addr = listener.local_addr().unwrap_or(state.config.listen);
        let index = state.index;
        self.tls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(index, state.tls.clone());
        match TcpListener::from_std(listener) {
            Ok(listener) => {
                let l = &state.config;
                tracing::info!(listener = %name, mode = ?l.mode, addr = %addr,
                    upstream = ?l.upstream, sni_routes = l.sni.len(), "listening");
                let (state_tx, state_rx) = watch::channel(Arc::new(state));
                let (stop_tx, stop_rx) = watch::channel(None);
                loops.spawn(accept_loop(listener, state_rx, stop_rx));
                running.insert(
                    name,
                    Running {
                        index,
                        addr,
                        state: state_tx,
                        stop: stop_tx,
                    },
                );
                Ok(())
            }
            Err(e) => {
                self.tls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&index);
                tracing::error!(listener = %name, error = %e,
                    "cannot accept: registering the listener with the runtime failed");
                Err(format!(
                    "listener {name:?}: registering with the runtime failed: {e}"
                ))
            }
        }
    }

    /// Accepts on every listener, applying reloads, until told to stop; then every listener
    /// closes at once, established connections get until the deadline to finish, and those
    /// still open are closed (each reported with the reason `drain deadline`). Returns when
    /// every connection has ended.
    pub async fn serve(mut self, mut control: mpsc::Receiver<Control>) {
        let mut loops = tokio::task::JoinSet::new();
        let mut running = BTreeMap::new();
        for (listener, state) in std::mem::take(&mut self.bound) {
            // Logged by start; the other listeners serve.
            let _ = self.start(&mut loops, &mut running, listener, state);
        }
        let mut open = true;
        loop {
            tokio::select! {
                message = control.recv(), if open => match message {
                    None => open = false,
                    Some(Control::Stop(deadline)) => {
                        for r in running.values() {
                            let _ = r.stop.send(Some(deadline));
                        }
                        break;
                    }
                    Some(Control::Reload(config, reply)) => {
                        let result = self.reload(&config, &mut loops, &mut running);
                        let _ = reply.send(result);
                    }
                },
                // Accept loops end when their listener is removed (after its drain).
                Some(_) = loops.join_next(), if !loops.is_empty() => {}
                else => std::future::pending::<()>().await,
            }
        }
        while loops.join_next().await.is_some() {}
    }

    /// Applies `config`'s listeners: everything is loaded and bound first, so a reload that
    /// fails anywhere changes nothing.
    fn reload(
        &mut self,
        config: &Config,
        loops: &mut tokio::task::JoinSet<()>,
        running: &mut BTreeMap<String, Running>,
    ) -> Result<ReloadSummary, String> {
        let mut summary = ReloadSummary::default();
        let mut changed_states = Vec::new();
        let mut fresh = Vec::new();
        let mut moved = Vec::new();
        for l in &config.listeners {
            let current = running.get(&l.name);
            match current {
                Some(r) if r.state.borrow().config == *l => summary.unchanged.push(l.name.clone()),
                Some(r) if r.state.borrow().config.listen == l.listen => {
                    let mut state = self.state(l, r.index).map_err(|e| e.to_string())?;
                    let old = r.state.borrow().clone();
                    if old.config.max_connections == l.max_connections {
                        // The connections already held count against the same limit.
                        state.connections.clone_from(&old.connections);
                    }
                    changed_states.push(state);
                    summary.changed.push(l.name.clone());
                }
                Some(r) => {
                    // A new address: bind it before the old one closes.
                    let prepared = self.prepare(l, r.index).map_err(|e| e.to_string())?;
                    moved.push(prepared);
                    summary.changed.push(l.name.clone());
                }
                None => {
                    let index = self.index_of(&l.name);
                    let prepared = self.prepare(l, index).map_err(|e| e.to_string())?;
                    fresh.push(prepared);
                    summary.added.push(l.name.clone());
                }
            }
        }
        // Everything loaded and bound: apply.
        for state in changed_states {
            if let Some(r) = running.get(&state.config.name) {
                self.tls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(state.index, state.tls.clone());
                let _ = r.state.send(Arc::new(state));
            }
        }
        let gone: Vec<String> = running
            .keys()
            .filter(|name| !config.listeners.iter().any(|l| &l.name == *name))
            .cloned()
            .collect();
        for name in gone.iter().chain(moved.iter().map(|(_, s)| &s.config.name)) {
            if let Some(r) = running.remove(name) {
                let _ = r.stop.send(Some(self.drain));
                self.tls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&r.index);
                if gone.contains(name) {
                    // Its certificates are no longer served: no expiry alert for them.
                    self.telemetry.remove_certificates(r.index);
                }
            }
        }
        summary.removed = gone;
        let mut failed = Vec::new();
        for (listener, state) in fresh {
            self.telemetry.add_listener(state.index, &state.config.name);
            if let Err(e) = self.start(loops, running, listener, state) {
                failed.push(e);
            }
        }
        for (listener, state) in moved {
            if let Err(e) = self.start(loops, running, listener, state) {
                failed.push(e);
            }
        }
        if let Some(bpf) = self.telemetry.bpf() {
            let entries: Vec<ListenerEntry> = running
                .iter()
                .map(|(name, r)| ListenerEntry {
                    index: r.index,
                    name: name.clone(),
                    port: r.addr.port(),
                })
                .collect();
            if let Err(e) = bpf.set_listeners(&entries) {
                tracing::warn!(error = %e, "the BPF listener maps were not updated: kernel-side counts of new listeners are off");
            }
        }
        if !failed.is_empty() {
            return Err(format!(
                "partly applied: {} (the other changes are in place)",
                failed.join("; ")
            ));
        }
        Ok(summary)
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

/// Starts serving one accepted connection, or refuses it (cleanly, counted, logged) when a
/// connection limit is reached.
fn admit(
    state: &Arc<ListenerState>,
    connections: &mut tokio::task::JoinSet<()>,
    peers: &mut HashMap<tokio::task::Id, SocketAddr>,
    sock: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    match state.admit() {
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
            finish(state, report);
            // A FIN, and whatever the client already sent read away, rather than a reset;
            // bounded in time by linger_close, and in number: past that, closed at once.
            if let Ok(place) = state.limits.lingering.clone().try_acquire_owned() {
                connections.spawn(async move {
                    relay::linger_close(sock).await;
                    drop(place);
                });
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    states: watch::Receiver<Arc<ListenerState>>,
    mut stop: watch::Receiver<Option<std::time::Duration>>,
) {
    // The settings as they are when each connection arrives (a reload may change them).
    let current = || states.borrow().clone();
    let mut state = current();
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
                Ok((sock, peer)) => {
                    state = current();
                    // A relay must not hold back small writes (Nagle): request/response traffic
                    // would wait for the peer's delayed ACK on every message.
                    if let Err(e) = sock.set_nodelay(true) {
                        tracing::debug!(listener = %state.config.name, %peer, error = %e, "TCP_NODELAY");
                    }
                    admit(&state, &mut connections, &mut peers, sock, peer);
                }
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
