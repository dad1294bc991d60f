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

use super::sources::{
    GateRefusal, HandshakeGate, HandshakePlace, Source, SourceLimits, SourcePlace, SourceRefusal,
    SourceTable,
};

/// The node-wide limits every listener shares.
#[derive(Debug, Clone)]
pub(crate) struct SharedLimits {
    /// Connections held at once, over all listeners.
    connections: Arc<Semaphore>,
    /// TLS handshakes in progress at once, over all listeners, and those waiting for a place.
    handshakes: Arc<HandshakeGate>,
    max_connections: usize,
    max_handshakes: usize,
    /// Refused connections being closed gently (each up to a second), over all listeners.
    pub(crate) lingering: Arc<Semaphore>,
    /// The pipes spliced directions borrow while their bytes are in flight.
    pub(crate) pipes: Arc<PipePool>,
    /// A kTLS peer's KeyUpdates followed in one second, per connection.
    pub(crate) key_updates_per_second: u16,
    /// The node's `[limits]`, for what listeners take from them (the per-source limits).
    node: LimitsConfig,
    /// When connections refused by a limit were last logged.
    pub(crate) refusals: Arc<RefusalLog>,
}

/// Refused connections closed gently at once; past it they are closed without waiting.
const MAX_LINGERING: usize = 1024;

/// How many connections the agent holds, readable from outside the proxy task, even once it
/// no longer takes messages (a takeover's moves that a SIGTERM ended).
#[derive(Debug, Clone)]
pub struct HeldConnections {
    connections: Arc<Semaphore>,
    max_connections: usize,
}

impl HeldConnections {
    /// Connections held now, over all listeners.
    pub fn now(&self) -> u64 {
        let held = self
            .max_connections
            .saturating_sub(self.connections.available_permits());
        u64::try_from(held).unwrap_or(u64::MAX)
    }
}

impl SharedLimits {
    /// Connections held now, over all listeners.
    pub(crate) fn held(&self) -> usize {
        self.max_connections
            .saturating_sub(self.connections.available_permits())
    }

    /// [`SharedLimits::held`], readable from outside the proxy.
    pub(crate) fn held_connections(&self) -> HeldConnections {
        HeldConnections {
            connections: self.connections.clone(),
            max_connections: self.max_connections,
        }
    }

    pub(crate) fn new(limits: &LimitsConfig) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: HandshakeGate::new(
                limits.max_handshakes,
                limits.handshake_queue.unwrap_or(limits.max_handshakes),
            ),
            max_connections: limits.max_connections,
            max_handshakes: limits.max_handshakes,
            lingering: Arc::new(Semaphore::new(MAX_LINGERING)),
            pipes: Arc::new(PipePool::new(
                limits.max_splice_pipes,
                super::relay::splice::SPLICE_CHUNK,
            )),
            key_updates_per_second: limits.key_updates_per_second,
            node: limits.clone(),
            refusals: Arc::default(),
        }
    }
}

/// How often refusals by one limit on one listener are logged: a flood is refused thousands of
/// times a second, and a log line each would cost more than the refusals. The counters count
/// every one.
const REFUSAL_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Connections refused by a limit, logged at most once per [`REFUSAL_LOG_INTERVAL`] per
/// listener and reason; each line says how many went unlogged since the one before.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    /// By (listener index, reason): when last logged, and refusals since.
    last: std::sync::Mutex<std::collections::HashMap<(u16, Reason), (std::time::Instant, u64)>>,
}

impl RefusalLog {
    /// Whether a refusal now by `reason` on listener `index` gets its log line; if so, how many
    /// refusals by it were not logged since the last line.
    pub(crate) fn log_now(&self, index: u16, reason: Reason) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.get_mut(&(index, reason)) {
            Some((at, unlogged)) if now.duration_since(*at) < REFUSAL_LOG_INTERVAL => {
                *unlogged += 1;
                None
            }
            Some((at, unlogged)) => {
                *at = now;
                Some(std::mem::take(unlogged))
            }
            None => {
                last.insert((index, reason), (now, 0));
                Some(0)
            }
        }
    }
}

/// Whether `reason` is a refusal by a limit, logged at most once per interval.
pub(crate) fn is_limit_refusal(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::ConnectionLimit
            | Reason::ListenerConnectionLimit
            | Reason::HandshakeLimit
            | Reason::SourceConnectionLimit
            | Reason::SourceRateLimit
    )
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
    /// The per-source limits on this listener (its keys over the node's).
    pub(crate) per_source: SourceLimits,
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
    // Boxed: a parked connection carries its admission, and most listeners have no per-source
    // limit (8 bytes then, not 40).
    _source: Option<Box<SourcePlace>>,
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
            connections: l.max_connections.map(|n| Arc::new(Semaphore::new(n))),
            per_source: l.per_source(&limits.node).into(),
            limits,
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

    /// Takes this connection's places under its source's, the node-wide and the listener's
    /// limits (sources counted in `sources`), or says which limit refuses it.
    pub(crate) fn admit(
        &self,
        sources: &Arc<SourceTable>,
        peer: std::net::SocketAddr,
    ) -> Result<Admission, Failure> {
        let source = if self.per_source.any() {
            let l = &self.per_source;
            let source = Source::of(peer.ip(), l.prefix_v4, l.prefix_v6);
            let place =
                sources
                    .admit(source, &self.per_source)
                    .map_err(|refused| match refused {
                        SourceRefusal::Connections(n) => Failure::new(
                            Reason::SourceConnectionLimit,
                            format!(
                                "source {source} holds {n} connections (per_source_connections)"
                            ),
                        ),
                        SourceRefusal::Rate(r) => Failure::new(
                            Reason::SourceRateLimit,
                            format!(
                                "source {source} opened connections faster than {} a second, {} at \
                             once (per_source_handshakes_per_second, per_source_handshake_burst)",
                                r.per_second, r.burst
                            ),
                        ),
                    })?;
            Some(Box::new(place))
        } else {
            None
        };
        let (node, own) = self.connection_places()?;
        Ok(Admission {
            _source: source,
            _node: node,
            _own: own,
        })
    }

    /// A place under the node's and the listener's connection limits, or which one refuses.
    fn connection_places(
        &self,
    ) -> Result<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>), Failure> {
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
        Ok((node, own))
    }

    /// The places of a connection the agent before this one had admitted (a takeover): its
    /// source's connections count it, its rate is not charged; the node's and the listener's
    /// connection limits still hold (a connection over them is refused, and closed).
    pub(crate) fn admit_moved(
        &self,
        sources: &Arc<SourceTable>,
        peer: std::net::SocketAddr,
    ) -> Result<Admission, Failure> {
        let source = self.per_source.any().then(|| {
            let l = &self.per_source;
            Box::new(sources.place_moved(Source::of(peer.ip(), l.prefix_v4, l.prefix_v6)))
        });
        let (node, own) = self.connection_places()?;
        Ok(Admission {
            _source: source,
            _node: node,
            _own: own,
        })
    }

    /// A place under the handshake limit for one TLS handshake of a client at `peer`: at once
    /// when one is free, else in its source's turn (sources take turns), waiting at most
    /// `wait`; or why not.
    pub(crate) async fn handshake_place(
        &self,
        peer: std::net::SocketAddr,
        wait: std::time::Duration,
    ) -> Result<HandshakePlace, Failure> {
        let node = &self.limits.node;
        let source = Source::of(peer.ip(), node.source_prefix_v4, node.source_prefix_v6);
        self.limits
            .handshakes
            .place(source, wait)
            .await
            .map_err(|refused| {
                let why = match refused {
                    GateRefusal::QueueFull => "and as many waiting (limits.handshake_queue)",
                    GateRefusal::Waited => "for the whole handshake deadline",
                };
                Failure::new(
                    Reason::HandshakeLimit,
                    format!(
                        "{} TLS handshakes in progress (limits.max_handshakes), {why}",
                        self.limits.max_handshakes
                    ),
                )
            })
    }
}
