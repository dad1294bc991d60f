//! Counters: where each connection's outcome is recorded ([`Telemetry::record`]), and how every
//! counter is read back ([`exposition`]: Prometheus text at `/metrics`, `tlsplice stats` as a
//! table or JSON).
//!
//! With eBPF on, the counters live in the pinned per-CPU BPF map (see [`crate::bpf`]): the
//! sock_ops program counts accepted and closed connections there, and the agent adds what only
//! user space knows (handshake outcomes, data paths, bytes). With eBPF off the agent keeps its
//! own counts in memory, and the kernel-side families are absent.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

mod active;
mod exposition;
mod latency;

pub use active::ActiveConnection;
pub use latency::HandshakeKind;

pub use exposition::{Sample, encode, json, registry, samples, table};

use tlsplice_common::{NO_DATA_PATH, StatKey, direction, metric};

use crate::bpf::{BpfError, LoadedBpf, PinnedSnapshot};
use crate::outcome::{ConnectionReport, DataPath};

/// Where counters are kept.
enum Store {
    /// The pinned BPF map.
    Bpf(Box<LoadedBpf>),
    /// In memory, when eBPF is off.
    Memory(Mutex<BTreeMap<StatKey, u64>>),
}

/// The agent's counters and the state of its eBPF programs.
pub struct Telemetry {
    listeners: Mutex<BTreeMap<u16, String>>,
    store: Store,
    /// `Err` says why eBPF is off.
    ebpf: Result<(), String>,
    /// Certificates and their reloads, per listener index (user-space state, not counters of
    /// the data plane, so not in the BPF map).
    certs: Mutex<BTreeMap<u16, CertState>>,
    /// SIGHUP configuration reloads: applied, refused.
    config_reloads: Mutex<(u64, u64)>,
    /// The splice pipe pool, once the proxy has one.
    pipes: std::sync::OnceLock<std::sync::Arc<crate::splice::PipePool>>,
    /// Idle connections parked without a task, over all listeners.
    parked: std::sync::atomic::AtomicI64,
    /// Live upgrades: this agent's, and those it refused.
    takeovers: Mutex<TakeoverStats>,
    /// Handshake and connection histograms.
    latency: latency::Latency,
    /// Connections open now, by listener and data path.
    active: std::sync::Arc<active::ActiveTable>,
}

/// Live upgrades ([`crate::takeover`]) as the metrics show them.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct TakeoverStats {
    /// Takeovers this agent refused or that did not complete (it went on serving).
    pub(crate) refused: u64,
    /// This agent took over: how long from its start to serving on the sockets, in seconds.
    pub(crate) took_seconds: Option<f64>,
    /// Sockets it took over, and sockets it bound anew.
    pub(crate) adopted: u64,
    pub(crate) bound_anew: u64,
    /// Established connections at this agent's takeover, as the agent before counted them
    /// (moved here, lost, staying there to drain), and how long their moves took.
    pub(crate) connections: Option<(crate::takeover::MoveSummary, f64)>,
}

/// One listener's certificates as now served, and its reloads.
#[derive(Debug, Default, Clone)]
struct CertState {
    serving: Vec<crate::identity::CertInfo>,
    reloads_ok: u64,
    reloads_failed: u64,
    failing: bool,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("listeners", &self.listeners)
            .field("ebpf", &self.ebpf)
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Counters in memory; `why` says why eBPF is off.
    pub fn memory(listeners: BTreeMap<u16, String>, why: String) -> Self {
        Self {
            listeners: Mutex::new(listeners),
            store: Store::Memory(Mutex::new(BTreeMap::new())),
            ebpf: Err(why),
            certs: Mutex::default(),
            config_reloads: Mutex::default(),
            pipes: std::sync::OnceLock::new(),
            parked: std::sync::atomic::AtomicI64::new(0),
            takeovers: Mutex::default(),
            latency: latency::Latency::default(),
            active: std::sync::Arc::default(),
        }
    }

    /// Counters in the loaded BPF maps, or in memory when loading failed (the error is kept
    /// and reported).
    pub fn new(listeners: BTreeMap<u16, String>, bpf: Result<LoadedBpf, BpfError>) -> Self {
        match bpf {
            Ok(bpf) => Self {
                listeners: Mutex::new(listeners),
                store: Store::Bpf(Box::new(bpf)),
                ebpf: Ok(()),
                certs: Mutex::default(),
                config_reloads: Mutex::default(),
                pipes: std::sync::OnceLock::new(),
                parked: std::sync::atomic::AtomicI64::new(0),
                takeovers: Mutex::default(),
                latency: latency::Latency::default(),
                active: std::sync::Arc::default(),
            },
            Err(e) => Self::memory(listeners, e.to_string()),
        }
    }

    /// Exports the gauges of `pool`, the proxy's splice pipe pool (the first one given).
    pub fn watch_pipes(&self, pool: std::sync::Arc<crate::splice::PipePool>) {
        let _ = self.pipes.set(pool);
    }

    /// `delta` idle connections parked (or, negative, woken).
    pub fn parked_connections(&self, delta: i64) {
        self.parked
            .fetch_add(delta, std::sync::atomic::Ordering::Relaxed);
    }

    /// Idle connections parked now.
    pub fn parked(&self) -> i64 {
        self.parked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What the splice pipe pool holds now, once there is one.
    pub fn pipe_counts(&self) -> Option<crate::splice::PipeCounts> {
        self.pipes.get().map(|p| p.counts())
    }

    /// `Ok` when the eBPF programs are loaded, else why not.
    pub fn ebpf(&self) -> Result<(), &str> {
        self.ebpf.as_ref().map(|_| ()).map_err(String::as_str)
    }

    /// The loaded eBPF programs and maps, when eBPF is on.
    pub fn bpf(&self) -> Option<&LoadedBpf> {
        match &self.store {
            Store::Bpf(b) => Some(b),
            Store::Memory(_) => None,
        }
    }

    /// The pin directory, when eBPF is on.
    pub fn pin_dir(&self) -> Option<&std::path::Path> {
        match &self.store {
            Store::Bpf(b) => Some(b.pin_dir()),
            Store::Memory(_) => None,
        }
    }

    fn add_all(&self, counts: &[(StatKey, u64)]) {
        match &self.store {
            Store::Bpf(b) => {
                if let Err(e) = b.add_all(counts) {
                    tracing::warn!(error = %e, "counter update failed");
                }
            }
            Store::Memory(m) => {
                let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
                for (key, n) in counts {
                    let cell = m.entry(*key).or_default();
                    *cell = cell.wrapping_add(*n);
                }
            }
        }
    }

    /// Every listener's name by counter index, those removed by a reload included.
    pub fn listener_names(&self) -> BTreeMap<u16, String> {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Names a listener added by a reload; in the BPF maps too when eBPF is on.
    pub fn add_listener(&self, index: u16, name: &str) {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(index, name.to_owned());
    }

    /// Counts a takeover this agent refused, or that did not complete.
    pub fn count_takeover_refused(&self) {
        self.takeovers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refused += 1;
    }

    /// Records that this agent took over: how long it took, and how many sockets it adopted
    /// and bound anew.
    pub fn record_takeover(&self, took: std::time::Duration, adopted: u64, bound_anew: u64) {
        let mut t = self.takeovers.lock().unwrap_or_else(|p| p.into_inner());
        t.took_seconds = Some(took.as_secs_f64());
        t.adopted = adopted;
        t.bound_anew = bound_anew;
    }

    /// Records the established connections' moves at this agent's takeover.
    pub fn record_moves(&self, summary: crate::takeover::MoveSummary, took: std::time::Duration) {
        self.takeovers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .connections = Some((summary, took.as_secs_f64()));
    }

    pub(crate) fn takeover_stats(&self) -> TakeoverStats {
        *self.takeovers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one configuration reload, applied or refused.
    pub fn count_config_reload(&self, applied: bool) {
        let mut n = self
            .config_reloads
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if applied {
            n.0 += 1;
        } else {
            n.1 += 1;
        }
    }

    fn with_certs(&self, listener: u16, f: impl FnOnce(&mut CertState)) {
        let mut certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        f(certs.entry(listener).or_default());
    }

    /// The certificates listener `listener` now serves (for the expiry gauge).
    pub fn set_certificates(&self, listener: u16, serving: Vec<crate::identity::CertInfo>) {
        self.with_certs(listener, |c| c.serving = serving);
    }

    /// Forgets a removed listener's certificates and reload state.
    pub fn remove_certificates(&self, listener: u16) {
        self.certs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&listener);
    }

    /// Counts one reload of a listener's TLS material, loaded or refused.
    pub fn count_reload(&self, listener: u16, loaded: bool) {
        self.with_certs(listener, |c| {
            if loaded {
                c.reloads_ok += 1;
            } else {
                c.reloads_failed += 1;
            }
        });
    }

    /// Whether the newest files of a listener's TLS material fail to load (the old serve).
    pub fn set_reload_failing(&self, listener: u16, failing: bool) {
        self.with_certs(listener, |c| c.failing = failing);
    }

    /// A place among the open connections of listener `listener` on `path`, held until
    /// dropped.
    pub fn active_connection(&self, listener: u16, path: DataPath) -> ActiveConnection {
        ActiveConnection::new(self.active.clone(), listener, path)
    }

    /// Open connections by (listener index, data path).
    pub(crate) fn active_counts(&self) -> Vec<((u16, DataPath), i64)> {
        self.active.counts()
    }

    /// A client handshake of `listener` completed in `seconds`.
    pub fn handshake_done(&self, listener: &str, kind: HandshakeKind, seconds: f64) {
        self.latency.handshake(listener, kind, seconds);
    }

    /// Counts one finished connection of listener `listener`.
    pub fn record(&self, listener: u16, r: &ConnectionReport) {
        if let (Some(path), Some(seconds)) = (r.data_path, r.duration_seconds) {
            let bytes = r.bytes_up.saturating_add(r.bytes_down);
            self.latency
                .connection(&r.listener, path.as_str(), seconds, bytes);
        }
        let key = |metric, a, b, c| StatKey {
            metric,
            listener,
            a,
            b,
            c,
            d: 0,
        };
        let data_path = r.data_path.map_or(NO_DATA_PATH, DataPath::code);
        let mut counts = Vec::with_capacity(6);
        for (m, h) in [
            (metric::HANDSHAKE, &r.client_handshake),
            (metric::UPSTREAM_HANDSHAKE, &r.upstream_handshake),
        ] {
            if let Some(h) = h {
                let handshake = StatKey {
                    d: h.group,
                    ..key(m, h.outcome.code(), h.version, h.suite)
                };
                counts.push((handshake, 1));
            }
        }
        if r.data_path.is_some() {
            counts.push((key(metric::BYTES, data_path, direction::UP, 0), r.bytes_up));
            counts.push((
                key(metric::BYTES, data_path, direction::DOWN, 0),
                r.bytes_down,
            ));
        }
        counts.push((key(metric::KEY_UPDATES, 0, 0, 0), r.key_updates));
        // Last, so a reader that waits until the connection is counted and then reads once
        // more sees all of its counts.
        counts.push((key(metric::CONN_OUTCOME, data_path, r.outcome.code(), 0), 1));
        counts.retain(|(_, n)| *n > 0);
        self.add_all(&counts);
    }

    /// Every counter, with the listener names.
    pub fn snapshot(&self) -> Result<PinnedSnapshot, BpfError> {
        let counters = match &self.store {
            Store::Bpf(b) => b.snapshot()?,
            Store::Memory(m) => m.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        };
        Ok(PinnedSnapshot {
            counters,
            listeners: self.listener_names(),
            sockmap_sockets: self.bpf().map(LoadedBpf::sockmap_sockets),
            sockmap_peers: None,
        })
    }
}
