//! Listeners and their connections. A connection's life, in the order it happens:
//! [`listener`] accepts and admits it under the limits; its mode sets it up ([`tls`]:
//! terminate, reencrypt, originate; [`passthrough`]), with the upstream leg from [`upstream`];
//! its data path moves the bytes ([`relay`], one module per path), an idle kernel-path connection
//! waiting in its listener's [`parking`] with no task of its own; [`connection`] records how it
//! ended, in one place. [`Proxy`] runs the listeners and applies reloads; [`measure`]
//! decides the node's passthrough path at start.

mod connection;
mod listener;
pub mod measure;
mod moving;
pub(crate) mod parking;
mod passthrough;
pub(crate) mod relay;
pub(crate) mod sources;
mod state;
mod tls;
mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use self::listener::accept_loop;
use self::state::{ListenerState, SharedLimits};
use crate::bpf::ListenerEntry;
use crate::certs::WatchedTls;
use crate::config::{Config, ListenerConfig, Mode};
use crate::metrics::Telemetry;
use crate::outcome::ConnectionReport;
use crate::path::{KernelCaps, PlainPath, PlainPlan};
use crate::takeover::Inherited;

pub use self::moving::{MoveTo, MovingConnections, moves_pending, moving_channel};
pub use self::state::HeldConnections;

/// Whether a listener can serve on this kernel and on which data path, in one line; `Err` says
/// why it cannot run at all (TLS material that does not load, or `data_path = "ktls"` on a
/// kernel that cannot offload, `ebpf.passthrough = "sockmap"` without eBPF). `passthrough` is
/// the node's passthrough plan. Used by `tlsplice probe --config`; the answer comes from the
/// same path choice the connections make ([`crate::path::summary`]).
pub fn readiness(
    l: &ListenerConfig,
    caps: &KernelCaps,
    passthrough: &Result<PlainPlan<()>, String>,
) -> Result<String, String> {
    WatchedTls::load(l).map_err(|source| {
        ProxyError::Material {
            listener: l.name.clone(),
            source,
        }
        .to_string()
    })?;
    crate::path::summary(l.mode, l.data_path, caps, passthrough)
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

/// A listener's TLS sides and the policy in force on each, by their configuration key: the
/// client side (`tls`) where it terminates client TLS, the upstream leg (`upstream_tls`) where
/// it originates TLS.
fn tls_sides(l: &ListenerConfig) -> Vec<(&'static str, &crate::config::TlsPolicyConfig)> {
    let mut sides = Vec::new();
    if l.mode.client_tls() {
        sides.push(("tls", &l.effective_tls));
    }
    if let (true, Some(u)) = (l.mode.upstream_tls(), &l.upstream_tls) {
        sides.push(("upstream_tls", &u.effective_tls));
    }
    sides
}

/// Every listener whose TLS policy allows a version and cipher this kernel cannot offload
/// while `data_path = "ktls"` requires the kernel (such sessions would be refused after their
/// handshake): one line each, naming the suites. Nothing when the kernel has no kTLS at all
/// (`tlsplice probe --config` says that).
pub fn check_kernel_path(config: &Config, caps: &KernelCaps) -> Vec<String> {
    let mut problems = Vec::new();
    for l in config
        .listeners
        .iter()
        .filter(|l| l.data_path == crate::config::DataPathPolicy::Ktls)
    {
        for (key, policy) in tls_sides(l) {
            // A policy that does not resolve is reported by check_material.
            let Ok(policy) =
                crate::tls_policy::TlsPolicy::resolve(policy, crate::tls_policy::cpu_has_aes())
            else {
                continue;
            };
            let Some(missing) = caps.cannot_offload(&policy.kernel_pairs()) else {
                continue;
            };
            let suites: Vec<&str> = policy
                .suites
                .iter()
                .filter(|s| missing.contains(&(s.version().kernel(), s.cipher())))
                .map(|s| s.as_str())
                .collect();
            if !suites.is_empty() {
                problems.push(format!(
                    "listener {:?}: {key}: data_path = \"ktls\" but this kernel cannot offload {} \
                     (sessions negotiating them would be refused): leave them out of \
                     {key}.cipher_suites, or set data_path = \"auto\"",
                    l.name,
                    suites.join(", ")
                ));
            }
        }
    }
    problems
}

/// Per TLS side of a listener (`tls`, `upstream_tls`), which of its policy's suites this
/// kernel carries and which stay in user space (`tlsplice probe --config`).
pub fn suites_in_kernel(l: &ListenerConfig, caps: &KernelCaps) -> Vec<String> {
    tls_sides(l)
        .into_iter()
        .map(|(key, policy)| {
            let policy = match crate::tls_policy::TlsPolicy::resolve(
                policy,
                crate::tls_policy::cpu_has_aes(),
            ) {
                Ok(p) => p,
                Err(e) => return format!("{key}: policy refused: {e}"),
            };
            let missing = caps
                .cannot_offload(&policy.kernel_pairs())
                .unwrap_or_else(|| policy.kernel_pairs().into_iter().collect());
            let (kernel, user): (Vec<_>, Vec<_>) = policy
                .suites
                .iter()
                .partition(|s| !missing.contains(&(s.version().kernel(), s.cipher())));
            let names = |v: Vec<&crate::config::CipherSuiteName>| {
                if v.is_empty() {
                    "none".to_owned()
                } else {
                    v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                }
            };
            format!(
                "{key}: suites in the kernel (kTLS): {}; in user space: {}",
                names(kernel),
                names(user)
            )
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
    /// A copy of every listening socket, for a new agent taking over
    /// ([`crate::takeover`]).
    Handover(
        tokio::sync::oneshot::Sender<Vec<(crate::takeover::SocketRecord, std::os::fd::OwnedFd)>>,
    ),
    /// A new agent serves: every listener stops accepting and starts its drain, and the
    /// connections of the listeners it adopted that can move go to `to`, those parked at
    /// once and the others as they come to rest, until [`Control::MoveEnd`].
    MoveOut {
        /// Where moving connections go.
        to: MoveTo,
        /// The listeners the new agent adopted.
        listeners: Vec<String>,
        /// Sockmap connections move too: the new agent adopted the eBPF maps.
        sockmap: bool,
        /// Answered once every parked connection that can move went to `to` and every
        /// listener was told, with the count of connections held here (which outlives the
        /// proxy's messages: a SIGTERM during the moves ends them, and [`Control::MoveEnd`]
        /// is then not answered).
        done: tokio::sync::oneshot::Sender<HeldConnections>,
    },
    /// The moves are over: connections not moved stay here and drain. The reply is how many
    /// connections this agent still holds.
    MoveEnd(tokio::sync::oneshot::Sender<u64>),
    /// Connections the agent before this one handed over: each joins its listener, parked
    /// as it was there. The reply: how many were adopted, and why each other one was not
    /// (its legs are closed).
    Adopt(
        Vec<crate::takeover::MovingConnection>,
        tokio::sync::oneshot::Sender<(u64, Vec<String>)>,
    ),
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
    /// A copy of the listening socket, handed to a new agent taking over.
    socket: Option<std::os::fd::OwnedFd>,
    state: watch::Sender<Arc<ListenerState>>,
    stop: watch::Sender<relay::Signal>,
    /// Its idle connections' parking, where connections move out and in at a takeover.
    parking: Option<Arc<parking::Parking>>,
    /// Its connections by source, for the per-source limits.
    sources: Arc<sources::SourceTable>,
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
    passthrough: PlainPath,
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
        Self::bind_inheriting(config, caps, reports, &mut Inherited::default()).await
    }

    /// As [`Proxy::bind`], with each listener whose name and address match a socket a
    /// running agent handed over accepting on that socket instead of a new bind.
    pub async fn bind_inheriting(
        config: &Config,
        caps: Arc<KernelCaps>,
        reports: Option<mpsc::UnboundedSender<ConnectionReport>>,
        inherited: &mut Inherited,
    ) -> Result<Self, ProxyError> {
        let names = config
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| (listener_index(i), l.name.clone()))
            .collect();
        let telemetry = Arc::new(Telemetry::memory(names, "not loaded".into()));
        let limits = SharedLimits::new(&config.limits);
        telemetry.watch_pipes(limits.pipes.clone());
        let mut proxy = Self {
            bound: Vec::new(),
            caps,
            reports,
            limits,
            telemetry,
            passthrough: PlainPath::default(),
            tls: Arc::default(),
            next_index: 0,
            indexes: BTreeMap::new(),
            drain: config.limits.drain_timeout(),
        };
        for l in &config.listeners {
            let index = proxy.index_of(&l.name);
            let taken = inherited.take(&l.name, l.listen);
            let (listener, state) = match taken {
                Some(listener) => {
                    let state = proxy.state(l, index)?;
                    listener
                        .set_nonblocking(true)
                        .map_err(|source| ProxyError::Bind {
                            listener: l.name.clone(),
                            addr: l.listen,
                            source,
                        })?;
                    tracing::info!(listener = %l.name, addr = %l.listen,
                        "listening socket taken over from the running agent");
                    (listener, state)
                }
                None => proxy.prepare(l, index)?,
            };
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
        )
        .map_err(|source| ProxyError::Material {
            listener: l.name.clone(),
            source,
        })?;
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
    pub fn set_passthrough(&mut self, path: &PlainPath) {
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
        telemetry.watch_pipes(self.limits.pipes.clone());
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
        let socket = match listener.try_clone() {
            Ok(copy) => Some(std::os::fd::OwnedFd::from(copy)),
            Err(e) => {
                tracing::warn!(listener = %name, error = %e,
                    "no copy of the listening socket: a takeover would bind it anew");
                None
            }
        };
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
                let (stop_tx, stop_rx) = watch::channel(relay::Signal::default());
                let parts = match parking::Parking::new() {
                    Ok(parts) => Some(parts),
                    Err(e) => {
                        tracing::warn!(listener = %name, error = %e,
                            "no epoll set for idle connections: each keeps a task, and none moves at a takeover");
                        None
                    }
                };
                let parking = parts.as_ref().map(|(p, _, _)| p.clone());
                // Kept across reloads, so a source's connections and rate count on under new
                // settings.
                let sources = Arc::new(sources::SourceTable::default());
                loops.spawn(accept_loop(
                    listener,
                    state_rx,
                    stop_rx,
                    parts,
                    sources.clone(),
                ));
                running.insert(
                    name,
                    Running {
                        index,
                        addr,
                        socket,
                        state: state_tx,
                        stop: stop_tx,
                        parking,
                        sources,
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
        // A new agent took over: this one only drains (a reload would bind for nobody).
        let mut taken_over = false;
        loop {
            tokio::select! {
                message = control.recv(), if open => match message {
                    None => open = false,
                    Some(Control::Stop(deadline)) => {
                        for r in running.values_mut() {
                            // Moves to a new agent end here too (a SIGTERM during them): what
                            // did not go drains here with the rest.
                            if let Some(parking) = &r.parking {
                                parking.end_move();
                            }
                            r.stop.send_modify(|s| {
                                s.deadline = Some(deadline);
                                s.move_out = false;
                            });
                            // The copy kept for a takeover would hold the socket listening
                            // (its backlog filling, never accepted) through the drain.
                            r.socket = None;
                        }
                        break;
                    }
                    Some(Control::Reload(_, reply)) if taken_over => {
                        let _ = reply.send(Err(
                            "a new agent took over: this one drains and reloads nothing (reload the new agent)".into(),
                        ));
                    }
                    Some(Control::Reload(config, reply)) => {
                        let result = self.reload(&config, &mut loops, &mut running);
                        let _ = reply.send(result);
                    }
                    Some(Control::Handover(reply)) => {
                        let _ = reply.send(handover(&running));
                    }
                    Some(Control::MoveOut {
                        to,
                        listeners,
                        sockmap,
                        done,
                    }) => {
                        taken_over = true;
                        for (name, r) in running.iter_mut() {
                            let moving = listeners.contains(name) && r.parking.is_some();
                            r.socket = None;
                            let drain = self.drain;
                            r.stop.send_modify(|s| {
                                s.deadline = Some(drain);
                                s.move_out = moving;
                            });
                            if let (true, Some(parking)) = (moving, &r.parking) {
                                parking.move_out(to.clone(), sockmap);
                            }
                        }
                        let _ = done.send(self.limits.held_connections());
                    }
                    Some(Control::MoveEnd(reply)) => {
                        for r in running.values() {
                            if let Some(parking) = &r.parking {
                                parking.end_move();
                            }
                            r.stop.send_modify(|s| s.move_out = false);
                        }
                        let _ = reply.send(self.limits.held() as u64);
                    }
                    Some(Control::Adopt(batch, reply)) => {
                        let _ = reply.send(adopt(&running, batch));
                    }
                },
                // Accept loops end when their listener is removed (after its drain).
                Some(_) = loops.join_next(), if !loops.is_empty() => {}
                else => std::future::pending::<()>().await,
            }
        }
        // No more control messages: a takeover asking for the sockets now hears that this
        // agent is stopping instead of waiting out the drain.
        drop(control);
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
                let drain = self.drain;
                r.stop.send_modify(|s| s.deadline = Some(drain));
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

/// Takes in connections the agent before this one handed over: how many joined their
/// listener, and why each other one could not (its legs close, and it is logged).
fn adopt(
    running: &BTreeMap<String, Running>,
    batch: Vec<crate::takeover::MovingConnection>,
) -> (u64, Vec<String>) {
    let mut adopted = 0;
    let mut refused = Vec::new();
    for moving in batch {
        let peer = moving.record.peer;
        let name = moving.record.listener.clone();
        let taken = match running.get(&name) {
            None => Err(format!("listener {name:?} is not served here")),
            Some(Running { parking: None, .. }) => {
                Err(format!("listener {name:?} has no parking for it"))
            }
            Some(
                r @ Running {
                    parking: Some(parking),
                    ..
                },
            ) => {
                let state = r.state.borrow().clone();
                state
                    .admit_moved(&r.sources, peer)
                    .map_err(|refusal| refusal.detail)
                    .and_then(|admission| moving::incoming(moving, state, admission))
                    .map(|parked| parking.adopt(parked))
            }
        };
        match taken {
            Ok(()) => adopted += 1,
            Err(why) => {
                tracing::warn!(listener = %name, %peer, error = %why,
                    "a connection the agent before this one handed over was not adopted: closed");
                refused.push(format!("{peer} on {name:?}: {why}"));
            }
        }
    }
    (adopted, refused)
}

/// A copy of every running listener's socket, with its name and address.
fn handover(
    running: &BTreeMap<String, Running>,
) -> Vec<(crate::takeover::SocketRecord, std::os::fd::OwnedFd)> {
    running
        .iter()
        .filter_map(|(name, r)| {
            let copy = r.socket.as_ref()?.try_clone();
            match copy {
                Ok(fd) => Some((
                    crate::takeover::SocketRecord {
                        name: name.clone(),
                        addr: r.addr,
                    },
                    fd,
                )),
                Err(e) => {
                    tracing::warn!(listener = %name, error = %e,
                        "listening socket not handed over: the new agent binds it anew");
                    None
                }
            }
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::ktls::{Cipher, TlsVersion};

    /// A kernel that offloads everything but ChaCha20-Poly1305.
    fn no_chacha() -> KernelCaps {
        let pairs: BTreeSet<(TlsVersion, Cipher)> = TlsVersion::ALL
            .iter()
            .flat_map(|&v| Cipher::ALL.iter().map(move |&c| (v, c)))
            .filter(|&(_, c)| c != Cipher::Chacha20Poly1305)
            .collect();
        KernelCaps::new(Ok(pairs), Ok(()))
    }

    fn config(data_path: &str, tls: &str) -> Config {
        let text = format!(
            "[[listener]]\nname = \"web\"\nmode = \"terminate\"\nlisten = \"127.0.0.1:1\"\n\
             upstream = \"127.0.0.1:2\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
             data_path = \"{data_path}\"\n{tls}"
        );
        Config::parse(&text, std::path::Path::new("t.toml")).expect("valid")
    }

    #[test]
    fn check_refuses_a_kernel_only_listener_whose_policy_the_kernel_cannot_carry() {
        let aes_only = "[listener.tls]\ncipher_suites = [\"TLS13_AES_128_GCM_SHA256\", \"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\"]\n";
        #[rustfmt::skip]
        let table: &[(&str, &str, KernelCaps, Option<&str>)] = &[
            // Every suite by default, ChaCha20 among them: refused where the kernel lacks it.
            ("ktls", "", no_chacha(), Some("TLS13_CHACHA20_POLY1305_SHA256")),
            ("ktls", aes_only, no_chacha(), None),
            // Auto falls back per connection: nothing to refuse.
            ("auto", "", no_chacha(), None),
            // No kTLS at all is `probe --config`'s to say.
            ("ktls", "", KernelCaps::new(Err("no kTLS".into()), Ok(())), None),
        ];
        for (data_path, tls, caps, refused) in table {
            let problems = check_kernel_path(&config(data_path, tls), caps);
            match refused {
                Some(suite) => {
                    assert_eq!(problems.len(), 1, "{problems:?}");
                    assert!(
                        problems[0].contains(suite) && problems[0].contains("listener \"web\""),
                        "{problems:?}"
                    );
                }
                None => assert!(problems.is_empty(), "{data_path} {tls}: {problems:?}"),
            }
        }
        let lines = suites_in_kernel(&config("ktls", "").listeners[0], &no_chacha());
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].contains("in user space: TLS13_CHACHA20_POLY1305_SHA256"),
            "{lines:?}"
        );
    }
}
