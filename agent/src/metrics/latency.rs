//! The histograms an operator alerts on: how long client handshakes take (full and resumed,
//! whose ratio is the resumption rate), and how long connections last and how many bytes they
//! carry, by listener and data path. Kept in the agent's memory (not in the BPF map: they are
//! user-space timings), exported at `/metrics` beside the counters.

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of one histogram series.
type Labels = Vec<(&'static str, String)>;

/// Seconds: 1 ms to 5 s, where handshakes fall (queueing for a handshake place included).
const HANDSHAKE_SECONDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Seconds: 10 ms to 4 h.
const CONNECTION_SECONDS: [f64; 10] = [
    0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0,
];
/// Bytes (both directions): 1 KiB to 8 GiB, by eights.
const CONNECTION_BYTES: [f64; 9] = [
    1024.0,
    8192.0,
    65536.0,
    524288.0,
    4194304.0,
    33554432.0,
    268435456.0,
    2147483648.0,
    8589934592.0,
];

fn handshake_histogram() -> Histogram {
    Histogram::new(HANDSHAKE_SECONDS)
}

fn duration_histogram() -> Histogram {
    Histogram::new(CONNECTION_SECONDS)
}

fn bytes_histogram() -> Histogram {
    Histogram::new(CONNECTION_BYTES)
}

/// The histograms (each series created on first use).
#[derive(Debug, Clone)]
pub(crate) struct Latency {
    handshakes: Family<Labels, Histogram, fn() -> Histogram>,
    durations: Family<Labels, Histogram, fn() -> Histogram>,
    bytes: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            handshakes: Family::new_with_constructor(handshake_histogram),
            durations: Family::new_with_constructor(duration_histogram),
            bytes: Family::new_with_constructor(bytes_histogram),
        }
    }
}

/// How a handshake went, as the `kind` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeKind {
    /// A full handshake (with or without a HelloRetryRequest).
    Full,
    /// A resumed session (a ticket or session ID).
    Resumed,
}

impl HandshakeKind {
    fn as_str(self) -> &'static str {
        match self {
            HandshakeKind::Full => "full",
            HandshakeKind::Resumed => "resumed",
        }
    }
}

impl Latency {
    /// Adds the histograms to the `/metrics` registry.
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "tlsplice_handshake_duration_seconds",
            "Client TLS handshakes that completed, by listener and kind (full, resumed): from the client's first bytes to the handshake's end, waiting for a handshake place included",
            self.handshakes.clone(),
        );
        registry.register(
            "tlsplice_connection_duration_seconds",
            "Connections that got a data path, by listener and data path: from accept (or, for one moved at a takeover, its adoption) to its end",
            self.durations.clone(),
        );
        registry.register(
            "tlsplice_connection_bytes",
            "Bytes a connection carried, both directions together, by listener and data path",
            self.bytes.clone(),
        );
    }

    /// A client handshake of `listener` completed in `seconds`.
    pub(crate) fn handshake(&self, listener: &str, kind: HandshakeKind, seconds: f64) {
        let labels = vec![
            ("listener", listener.to_owned()),
            ("kind", kind.as_str().to_owned()),
        ];
        self.handshakes.get_or_create(&labels).observe(seconds);
    }

    /// A connection of `listener` on `data_path` ended after `seconds`, having carried `bytes`.
    pub(crate) fn connection(&self, listener: &str, data_path: &str, seconds: f64, bytes: u64) {
        let labels = vec![
            ("listener", listener.to_owned()),
            ("data_path", data_path.to_owned()),
        ];
        self.durations.get_or_create(&labels).observe(seconds);
        // f64 holds every byte count below 2^53 exactly; above it, to the nearest.
        #[allow(clippy::cast_precision_loss)]
        self.bytes.get_or_create(&labels).observe(bytes as f64);
    }
}
