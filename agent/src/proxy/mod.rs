//! Listeners, kernel capabilities and connection reports; the modes live in their own files
//! ([`tls`]: terminate, reencrypt, originate; [`passthrough`]), the byte movers in [`relay`].

pub mod passthrough;
mod relay;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::bpf::ListenerEntry;
use crate::config::{Config, DataPathPolicy, ListenerConfig, Mode};
use crate::ktls::{Cipher, TlsVersion};
use crate::metrics::Telemetry;
use crate::{identity, probe};

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
    ListenerState::new(l, Arc::new(caps.clone()), None, 0, telemetry).map_err(|e| e.to_string())?;
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

/// A listener ready to accept, with everything its connections share.
pub(crate) struct ListenerState {
    pub(crate) config: ListenerConfig,
    /// This listener's certificate, when clients speak TLS to it.
    pub(crate) server_tls: Option<Arc<ServerConfig>>,
    /// How to reach a TLS upstream.
    pub(crate) upstream_tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    pub(crate) caps: Arc<KernelCaps>,
    pub(crate) reports: Option<mpsc::UnboundedSender<ConnectionReport>>,
    /// This listener's index in counter keys.
    pub(crate) index: u16,
    pub(crate) telemetry: Arc<Telemetry>,
    /// Node-wide passthrough data path, as decided at start, and why.
    pub(crate) passthrough: passthrough::PlainPath,
}

impl ListenerState {
    fn new(
        l: &ListenerConfig,
        caps: Arc<KernelCaps>,
        reports: Option<mpsc::UnboundedSender<ConnectionReport>>,
        index: u16,
        telemetry: Arc<Telemetry>,
    ) -> Result<Self, ProxyError> {
        let material = |source| ProxyError::Material {
            listener: l.name.clone(),
            source,
        };
        let server_tls = match (&l.cert, &l.key) {
            (Some(cert), Some(key)) => Some(
                identity::server_config(cert, key, l.client_ca.as_deref(), &l.alpn)
                    .map_err(material)?,
            ),
            _ => None,
        };
        let upstream_tls = match &l.upstream_tls {
            Some(u) => Some(identity::upstream_client(u).map_err(material)?),
            None => None,
        };
        Ok(Self {
            config: l.clone(),
            server_tls,
            upstream_tls,
            caps,
            reports,
            index,
            telemetry,
            passthrough: passthrough::PlainPath::default(),
        })
    }
}

/// Bound listeners, ready to serve.
pub struct Proxy {
    bound: Vec<(TcpListener, ListenerState)>,
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
        let mut bound = Vec::new();
        for (i, l) in config.listeners.iter().enumerate() {
            let state = ListenerState::new(
                l,
                caps.clone(),
                reports.clone(),
                listener_index(i),
                telemetry.clone(),
            )?;
            let listener =
                TcpListener::bind(l.listen)
                    .await
                    .map_err(|source| ProxyError::Bind {
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

    /// Accepts on every listener until the task is dropped.
    pub async fn run(self) {
        let mut tasks = tokio::task::JoinSet::new();
        for (listener, state) in self.bound {
            tasks.spawn(accept_loop(listener, Arc::new(state)));
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Counter keys carry listener indexes as u16; configurations never get near that many.
fn listener_index(i: usize) -> u16 {
    u16::try_from(i).unwrap_or(u16::MAX)
}

async fn accept_loop(listener: TcpListener, state: Arc<ListenerState>) {
    loop {
        match listener.accept().await {
            Ok((sock, peer)) => {
                let state = state.clone();
                tokio::spawn(async move {
                    let report = match state.config.mode {
                        Mode::Terminate | Mode::Reencrypt | Mode::Originate => {
                            tls::handle(&state, sock, peer).await
                        }
                        Mode::Passthrough => passthrough::handle(&state, sock, peer).await,
                    };
                    log_report(&report);
                    state.telemetry.record(state.index, &report);
                    if let Some(tx) = &state.reports {
                        let _ = tx.send(report);
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(listener = %state.config.name, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
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
