//! Counters: where each connection's outcome is recorded, and how every counter is read back
//! (Prometheus text at `/metrics`, and `tlsplice stats` as a table or JSON).
//!
//! With eBPF on, the counters live in the pinned per-CPU BPF map (see [`crate::bpf`]): the
//! sock_ops program counts accepted and closed connections there, and the agent adds what only
//! user space knows (handshake outcomes, data paths, bytes). With eBPF off the agent keeps its
//! own counts in memory, and the kernel-side families are absent.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tlsplice_common::{REASONS, StatKey, direction, metric, path, reason_index};

use crate::bpf::{BpfError, LoadedBpf, PinnedSnapshot};
use crate::ktls::TlsStat;
use crate::proxy::{ConnectionReport, DataPath, HandshakeOutcome};

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

fn path_code(p: DataPath) -> u16 {
    match p {
        DataPath::Ktls => path::KTLS,
        DataPath::Splice => path::SPLICE,
        DataPath::Userspace => path::USERSPACE,
        DataPath::Sockmap => path::SOCKMAP,
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
            },
            Err(e) => Self::memory(listeners, e.to_string()),
        }
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

    /// Counts one finished connection of listener `listener`.
    pub fn record(&self, listener: u16, r: &ConnectionReport) {
        let key = |metric, a, b, c| StatKey {
            metric,
            listener,
            a,
            b,
            c,
            pad: 0,
        };
        let data_path = r.data_path.map_or(path::NONE, path_code);
        let outcome = match (r.data_path, &r.error) {
            (Some(_), None) => 0,
            // A relay the agent ended on purpose counts under why; any other error mid-relay
            // is a relay error.
            (Some(_), Some(_)) if r.reason.starts_with("idle timeout") => reason_index(&r.reason),
            (Some(_), Some(_)) => reason_index("relay error"),
            (None, _) => reason_index(&r.reason),
        };
        let mut counts = Vec::with_capacity(6);
        for (m, h) in [
            (metric::HANDSHAKE, &r.client_handshake),
            (metric::UPSTREAM_HANDSHAKE, &r.upstream_handshake),
        ] {
            if let Some(h) = h {
                let outcome = match &h.failure {
                    None => 0,
                    Some(reason) => reason_index(reason),
                };
                counts.push((key(m, outcome, h.version, h.suite), 1));
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
        counts.push((key(metric::CONN_OUTCOME, data_path, outcome, 0), 1));
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

/// A handshake's outcome as counted.
impl HandshakeOutcome {
    /// A completed handshake.
    pub fn completed(common: &rustls::CommonState) -> Self {
        Self {
            failure: None,
            version: common.protocol_version().map_or(0, u16::from),
            suite: common
                .negotiated_cipher_suite()
                .map_or(0, |s| u16::from(s.suite())),
        }
    }

    /// A failed handshake and the reason it is counted under.
    pub fn failed(reason: &str) -> Self {
        Self {
            failure: Some(reason.to_owned()),
            version: 0,
            suite: 0,
        }
    }
}

/// One counter value with its name and labels.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Sample {
    /// Metric family name, without the `_total` suffix of counters.
    pub name: &'static str,
    /// Label names and values.
    pub labels: Vec<(&'static str, String)>,
    /// The value.
    pub value: u64,
}

/// The counter families, in output order: name and help.
const FAMILIES: [(&str, &str); 10] = [
    (
        "tlsplice_connections_accepted",
        "TCP connections accepted on a listener's port (sock_ops)",
    ),
    (
        "tlsplice_connections_closed",
        "Accepted TCP connections that reached TCP_CLOSE (sock_ops)",
    ),
    (
        "tlsplice_connections",
        "Connections ended, by data path and outcome",
    ),
    (
        "tlsplice_handshakes",
        "TLS handshakes on the client leg, by outcome, version and cipher suite",
    ),
    (
        "tlsplice_upstream_handshakes",
        "TLS handshakes on the upstream leg, by outcome, version and cipher suite",
    ),
    (
        "tlsplice_bytes",
        "Plaintext bytes relayed, by data path and direction, counted when a connection ends",
    ),
    (
        "tlsplice_key_updates",
        "TLS 1.3 key updates followed or made under kTLS",
    ),
    (
        "tlsplice_tls_handshake_records",
        "Cleartext ClientHello and ServerHello records seen in the kernel on listener sockets, by direction (up = from the client)",
    ),
    (
        "tlsplice_tls_alerts",
        "Cleartext TLS alerts seen in the kernel on listener sockets, by direction, level and description",
    ),
    (
        "tlsplice_sockmap_redirect_failed_bytes",
        "Bytes the sockmap verdict could not redirect (no peer entry) and passed to the agent, which forwarded them",
    ),
];

fn version_name(v: u16) -> String {
    match v {
        0 => "none".into(),
        0x0303 => "TLSv1.2".into(),
        0x0304 => "TLSv1.3".into(),
        other => format!("0x{other:04x}"),
    }
}

fn suite_name(s: u16) -> String {
    if s == 0 {
        return "none".into();
    }
    match rustls::CipherSuite::from(s).as_str() {
        Some(name) => name.to_owned(),
        None => format!("0x{s:04x}"),
    }
}

/// RFC 8446 / RFC 5246 alert description names.
fn alert_name(code: u16) -> String {
    match code {
        0 => "close_notify",
        10 => "unexpected_message",
        20 => "bad_record_mac",
        22 => "record_overflow",
        40 => "handshake_failure",
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired",
        46 => "certificate_unknown",
        47 => "illegal_parameter",
        48 => "unknown_ca",
        49 => "access_denied",
        50 => "decode_error",
        51 => "decrypt_error",
        70 => "protocol_version",
        71 => "insufficient_security",
        80 => "internal_error",
        86 => "inappropriate_fallback",
        90 => "user_canceled",
        109 => "missing_extension",
        110 => "unsupported_extension",
        112 => "unrecognized_name",
        113 => "bad_certificate_status_response",
        115 => "unknown_psk_identity",
        116 => "certificate_required",
        120 => "no_application_protocol",
        other => return other.to_string(),
    }
    .to_owned()
}

fn label(table: &[&str], code: u16) -> String {
    table
        .get(usize::from(code))
        .map_or_else(|| format!("{code}"), |s| (*s).to_owned())
}

/// Turns raw counters into named, labelled samples, sorted by family.
pub fn samples(snapshot: &PinnedSnapshot) -> Vec<Sample> {
    let mut out = Vec::new();
    for (key, &value) in &snapshot.counters {
        let listener = match snapshot.listeners.get(&key.listener) {
            Some(name) => name.clone(),
            None if key.listener == tlsplice_common::NO_LISTENER => "none".to_owned(),
            None => format!("#{}", key.listener),
        };
        let mut labels = vec![("listener", listener)];
        let name = match key.metric {
            metric::CONN_ACCEPTED => FAMILIES[0].0,
            metric::CONN_CLOSED => FAMILIES[1].0,
            metric::CONN_OUTCOME => {
                labels.push(("data_path", label(&path::NAMES, key.a)));
                labels.push(("outcome", label(&REASONS, key.b)));
                FAMILIES[2].0
            }
            metric::HANDSHAKE | metric::UPSTREAM_HANDSHAKE => {
                labels.push(("outcome", label(&REASONS, key.a)));
                labels.push(("version", version_name(key.b)));
                labels.push(("cipher", suite_name(key.c)));
                if key.metric == metric::HANDSHAKE {
                    FAMILIES[3].0
                } else {
                    FAMILIES[4].0
                }
            }
            metric::BYTES => {
                labels.push(("data_path", label(&path::NAMES, key.a)));
                labels.push(("direction", label(&direction::NAMES, key.b)));
                FAMILIES[5].0
            }
            metric::KEY_UPDATES => FAMILIES[6].0,
            metric::TLS_RECORD => {
                labels.push(("direction", label(&direction::NAMES, key.a)));
                if key.b == 22 {
                    labels.push((
                        "message",
                        match key.c {
                            1 => "ClientHello".to_owned(),
                            2 => "ServerHello".to_owned(),
                            other => other.to_string(),
                        },
                    ));
                    FAMILIES[7].0
                } else {
                    let level = key.c >> 8;
                    labels.push((
                        "level",
                        match level {
                            1 => "warning".to_owned(),
                            2 => "fatal".to_owned(),
                            other => other.to_string(),
                        },
                    ));
                    labels.push(("description", alert_name(key.c & 0xff)));
                    FAMILIES[8].0
                }
            }
            metric::REDIRECT_FAILED => FAMILIES[9].0,
            _ => continue,
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    let order = |name: &str| FAMILIES.iter().position(|f| f.0 == name);
    out.sort_by(|x, y| (order(x.name), &x.labels).cmp(&(order(y.name), &y.labels)));
    out
}

/// Reads the agent's counters at scrape time.
#[derive(Debug)]
struct TelemetryCollector(Arc<Telemetry>);

impl Collector for TelemetryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        // A failed read fails the scrape (HTTP 500) rather than looking like no traffic.
        let snapshot = self.0.snapshot().map_err(|e| {
            tracing::warn!(error = %e, "reading counters for /metrics failed");
            fmt::Error
        })?;
        let samples = samples(&snapshot);
        for (name, help) in FAMILIES {
            let family: Vec<&Sample> = samples.iter().filter(|s| s.name == name).collect();
            if family.is_empty() {
                continue;
            }
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in family {
                let labels: Vec<(&str, &str)> =
                    s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                metric
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&s.value, None)?;
            }
        }
        let loaded = i64::from(self.0.ebpf().is_ok());
        encoder
            .encode_descriptor(
                "tlsplice_ebpf_loaded",
                "1 when the eBPF programs are loaded and counting, 0 when the agent runs without them (the log and `tlsplice probe` say why)",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&loaded)?;
        if let Some(sockets) = snapshot.sockmap_sockets {
            encoder
                .encode_descriptor(
                    "tlsplice_sockmap_sockets",
                    "Sockets in the sockmap relay right now (two per connection)",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&i64::try_from(sockets).unwrap_or(i64::MAX))?;
        }
        self.encode_certs(&mut encoder)?;
        let (applied, refused) = *self
            .0
            .config_reloads
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut reloads = encoder.encode_descriptor(
            "tlsplice_config_reloads",
            "Configuration reloads on SIGHUP, by whether they were applied",
            None,
            MetricType::Counter,
        )?;
        for (outcome, n) in [("applied", applied), ("refused", refused)] {
            reloads
                .encode_family(&[("outcome", outcome)])?
                .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }
        if let Ok(Some(stats)) = TlsStat::read() {
            let mut metric = encoder.encode_descriptor(
                "tlsplice_kernel_tls_stat",
                "The kernel's kTLS counters from /proc/net/tls_stat, by name",
                None,
                MetricType::Gauge,
            )?;
            for (name, value) in &stats.counters {
                let value = i64::try_from(*value).unwrap_or(i64::MAX);
                metric
                    .encode_family(&[("stat", name.as_str())])?
                    .encode_gauge(&value)?;
            }
        }
        Ok(())
    }
}

impl TelemetryCollector {
    fn encode_certs(&self, encoder: &mut DescriptorEncoder) -> Result<(), fmt::Error> {
        let certs = self
            .0
            .certs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if certs.is_empty() {
            return Ok(());
        }
        let names = self.0.listener_names();
        let name = |i: &u16| names.get(i).cloned().unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let mut expiry = encoder.encode_descriptor(
            "tlsplice_certificate_expiry_seconds",
            "Seconds until each served certificate expires (negative: expired), by listener and file",
            None,
            MetricType::Gauge,
        )?;
        for (i, c) in &certs {
            let listener = name(i);
            for cert in &c.serving {
                let path = cert.path.display().to_string();
                expiry
                    .encode_family(&[
                        ("listener", listener.as_str()),
                        ("cert", path.as_str()),
                        ("subject", cert.subject.as_str()),
                    ])?
                    .encode_gauge(&cert.not_after.saturating_sub(now))?;
            }
        }
        let mut reloads = encoder.encode_descriptor(
            "tlsplice_certificate_reloads",
            "Changes of a listener's certificate, key or CA files, by whether they loaded",
            None,
            MetricType::Counter,
        )?;
        for (i, c) in &certs {
            let listener = name(i);
            for (outcome, n) in [("loaded", c.reloads_ok), ("failed", c.reloads_failed)] {
                reloads
                    .encode_family(&[("listener", listener.as_str()), ("outcome", outcome)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        let mut failing = encoder.encode_descriptor(
            "tlsplice_certificate_reload_failing",
            "1 while a listener's newest TLS files do not load and the previous material serves",
            None,
            MetricType::Gauge,
        )?;
        for (i, c) in &certs {
            failing
                .encode_family(&[("listener", name(i).as_str())])?
                .encode_gauge(&i64::from(c.failing))?;
        }
        Ok(())
    }
}

/// A Prometheus registry whose collector reads `telemetry` at each scrape.
pub fn registry(telemetry: Arc<Telemetry>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(TelemetryCollector(telemetry)));
    registry
}

/// The Prometheus text exposition of `registry`.
pub fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// `tlsplice stats` output: one line per counter.
pub fn table(snapshot: &PinnedSnapshot) -> String {
    let samples = samples(snapshot);
    let mut out = String::new();
    if samples.is_empty() {
        out.push_str("(no counters yet)\n");
    }
    if let Some(sockets) = snapshot.sockmap_sockets {
        out.push_str(&format!(
            "{:32} {:>14}\n",
            "tlsplice_sockmap_sockets", sockets
        ));
    }
    for s in samples {
        let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!(
            "{:32} {:>14}  {}\n",
            s.name,
            s.value,
            labels.join(" ")
        ));
    }
    out
}

/// `tlsplice stats --json` output.
pub fn json(snapshot: &PinnedSnapshot) -> serde_json::Value {
    let samples: Vec<serde_json::Value> = samples(snapshot)
        .into_iter()
        .map(|s| {
            let labels: serde_json::Map<String, serde_json::Value> = s
                .labels
                .into_iter()
                .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
                .collect();
            serde_json::json!({ "name": s.name, "labels": labels, "value": s.value })
        })
        .collect();
    serde_json::json!({
        "listeners": snapshot.listeners,
        "sockmap_sockets": snapshot.sockmap_sockets,
        "sockmap_peers": snapshot.sockmap_peers,
        "counters": samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_name_and_label_every_counter_kind() {
        let mut counters = BTreeMap::new();
        let key = |metric, a, b, c| StatKey {
            metric,
            listener: 0,
            a,
            b,
            c,
            pad: 0,
        };
        counters.insert(key(metric::CONN_ACCEPTED, 0, 0, 0), 5);
        counters.insert(key(metric::HANDSHAKE, 0, 0x0304, 0x1301), 4);
        counters.insert(key(metric::BYTES, path::KTLS, direction::DOWN, 0), 99);
        counters.insert(key(metric::TLS_RECORD, direction::UP, 22, 1), 7);
        counters.insert(
            key(metric::TLS_RECORD, direction::DOWN, 21, (2 << 8) | 50),
            2,
        );
        let refused = reason_index("upstream certificate refused");
        counters.insert(key(metric::UPSTREAM_HANDSHAKE, refused, 0, 0), 1);
        counters.insert(key(metric::REDIRECT_FAILED, 0, 0, 0), 10);
        counters.insert(key(metric::CONN_CLOSED, 0, 0, 0), 5);
        counters.insert(
            key(
                metric::CONN_OUTCOME,
                path::NONE,
                reason_index("unknown SNI"),
                0,
            ),
            1,
        );
        let snapshot = PinnedSnapshot {
            counters,
            listeners: BTreeMap::from([(0, "web".to_owned())]),
            sockmap_sockets: None,
            sockmap_peers: None,
        };
        let text = table(&snapshot);
        assert!(
            text.contains("listener=web data_path=none outcome=unknown SNI"),
            "{text}"
        );
        assert!(
            text.contains("outcome=ok version=TLSv1.3 cipher=TLS13_AES_128_GCM_SHA256"),
            "{text}"
        );
        assert!(text.contains("data_path=ktls direction=down"), "{text}");
        assert!(text.contains("direction=up message=ClientHello"), "{text}");
        assert!(
            text.contains("direction=down level=fatal description=decode_error"),
            "{text}"
        );
        assert!(
            text.contains("outcome=upstream certificate refused"),
            "{text}"
        );
        assert!(
            text.contains("tlsplice_sockmap_redirect_failed_bytes"),
            "{text}"
        );
        assert!(text.contains("tlsplice_connections_closed"), "{text}");
        let registry = registry(Arc::new(Telemetry::memory(
            snapshot.listeners.clone(),
            "test".into(),
        )));
        let text = encode(&registry).expect("encode");
        assert!(text.contains("tlsplice_ebpf_loaded 0"), "{text}");
    }
}
