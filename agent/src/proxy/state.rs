//! What a listener's connections share: its settings and TLS material, the kernel's
//! capabilities, the counters, and the limits each connection is admitted under.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::certs::WatchedTls;
use crate::config::{LimitsConfig, ListenerConfig};
use crate::metrics::Telemetry;
use crate::outcome::{ConnectionReport, Failure, Reason};
use crate::path::{Choice, KernelCaps, Negotiated, PathInputs, PlainPath, choose};
use crate::splice::PipePool;

/// The node-wide limits every listener shares.
#[derive(Debug, Clone)]
pub(crate) struct SharedLimits {
    /// Connections held at once, over all listeners.
    connections: Arc<Semaphore>,
    /// TLS handshakes in progress at once, over all listeners.
    handshakes: Arc<Semaphore>,
    max_connections: usize,
    max_handshakes: usize,
    /// Refused connections being closed gently (each up to a second), over all listeners.
    pub(crate) lingering: Arc<Semaphore>,
    /// The pipes spliced directions borrow while their bytes are in flight.
    pub(crate) pipes: Arc<PipePool>,
    /// A kTLS peer's KeyUpdates followed in one second, per connection.
    pub(crate) key_updates_per_second: u16,
}

/// Refused connections closed gently at once; past it they are closed without waiting.
const MAX_LINGERING: usize = 1024;

impl SharedLimits {
    pub(crate) fn new(limits: &LimitsConfig) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
            max_connections: limits.max_connections,
            max_handshakes: limits.max_handshakes,
            lingering: Arc::new(Semaphore::new(MAX_LINGERING)),
            pipes: Arc::new(PipePool::new(
                limits.max_splice_pipes,
                super::relay::splice::SPLICE_CHUNK,
            )),
            key_updates_per_second: limits.key_updates_per_second,
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
    pub(crate) passthrough: PlainPath,
    pub(crate) limits: SharedLimits,
    /// This listener's own connection limit.
    pub(crate) connections: Option<Arc<Semaphore>>,
}

/// An admitted connection, as its end needs it: its listener's settings when it arrived, its
/// places under the limits, its client and what is known of it so far.
pub(crate) struct Admitted {
    /// Its listener's settings when it arrived.
    pub(crate) state: Arc<ListenerState>,
    /// Its places under the connection limits.
    pub(crate) admission: Admission,
    /// The client's address.
    pub(crate) peer: std::net::SocketAddr,
    /// What is known of it so far.
    pub(crate) facts: crate::outcome::Facts,
}

/// A connection's places under the connection limits, given back when it ends.
pub(crate) struct Admission {
    _node: OwnedSemaphorePermit,
    _own: Option<OwnedSemaphorePermit>,
}

impl ListenerState {
    /// The state of listener `l`, its TLS material loaded.
    pub(crate) fn new(
        l: &ListenerConfig,
        caps: Arc<KernelCaps>,
        reports: Option<mpsc::UnboundedSender<ConnectionReport>>,
        index: u16,
        telemetry: Arc<Telemetry>,
        limits: SharedLimits,
    ) -> Result<Self, crate::identity::MaterialError> {
        Ok(Self {
            config: l.clone(),
            tls: Arc::new(WatchedTls::load(l)?),
            caps,
            reports,
            index,
            telemetry,
            passthrough: PlainPath::default(),
            limits,
            connections: l.max_connections.map(|n| Arc::new(Semaphore::new(n))),
        })
    }

    /// This listener's data path choice for a connection whose handshakes are as far as
    /// `negotiated` says.
    pub(crate) fn choose(&self, negotiated: Negotiated<'_>) -> Choice {
        choose(&PathInputs {
            mode: self.config.mode,
            policy: self.config.data_path,
            kernel: &self.caps,
            plain: &self.passthrough,
            negotiated,
        })
    }

    /// Takes this connection's places under the node-wide and the listener's limits, or says
    /// which limit refuses it.
    pub(crate) fn admit(&self) -> Result<Admission, Failure> {
        let node = self
            .limits
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Failure::new(
                    Reason::ConnectionLimit,
                    format!(
                        "{} connections held (limits.max_connections)",
                        self.limits.max_connections
                    ),
                )
            })?;
        let own = match &self.connections {
            None => None,
            Some(sem) => Some(sem.clone().try_acquire_owned().map_err(|_| {
                Failure::new(
                    Reason::ListenerConnectionLimit,
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

    /// A place under the handshake limit for one TLS handshake, or why not.
    pub(crate) fn handshake_permit(&self) -> Result<OwnedSemaphorePermit, Failure> {
        self.limits
            .handshakes
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Failure::new(
                    Reason::HandshakeLimit,
                    format!(
                        "{} TLS handshakes in progress (limits.max_handshakes)",
                        self.limits.max_handshakes
                    ),
                )
            })
    }
}
