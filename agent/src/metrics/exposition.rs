//! Reading the counters back: named, labelled samples ([`samples`]), the Prometheus collector
//! behind `/metrics` ([`registry`]), and `tlsplice stats` output ([`table`], [`json`]). Every
//! label comes from a typed code (`tlsplice-common`), never from parsing text.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tlsplice_common::{Reason, data_path_label, direction, metric};

use super::Telemetry;
use crate::bpf::PinnedSnapshot;
use crate::config::GroupName;
use crate::ktls::TlsStat;

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
        "TLS handshakes on the client leg, by outcome, version, cipher suite and key exchange group",
    ),
    (
        "tlsplice_upstream_handshakes",
        "TLS handshakes on the upstream leg, by outcome, version, cipher suite and key exchange group",
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

/// A key exchange group's name as the configuration writes it (`X25519MLKEM768`, `P-256`).
fn group_label(g: u16) -> String {
    if g == 0 {
        return "none".into();
    }
    GroupName::from_wire(g).map_or_else(|| format!("0x{g:04x}"), |g| g.as_str().to_owned())
}

/// An alert description's name (RFC 8446 / RFC 5246), from the table the eBPF programs count
/// by; a number otherwise.
fn alert_label(code: u16) -> String {
    tlsplice_common::alert_name(code).map_or_else(|| code.to_string(), str::to_owned)
}

/// A direction code's label.
fn direction_label(code: u16) -> String {
    direction::NAMES
        .get(usize::from(code))
        .map_or_else(|| code.to_string(), |s| (*s).to_owned())
}

/// A data path code's label.
fn path_label(code: u16) -> String {
    data_path_label(code).map_or_else(|| code.to_string(), str::to_owned)
}

/// An outcome code's label.
fn reason_label(code: u16) -> String {
    Reason::from_code(code).map_or_else(|| code.to_string(), |r| r.as_str().to_owned())
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
                labels.push(("data_path", path_label(key.a)));
                labels.push(("outcome", reason_label(key.b)));
                FAMILIES[2].0
            }
            metric::HANDSHAKE | metric::UPSTREAM_HANDSHAKE => {
                labels.push(("outcome", reason_label(key.a)));
                labels.push(("version", version_name(key.b)));
                labels.push(("cipher", suite_name(key.c)));
                labels.push(("group", group_label(key.d)));
                if key.metric == metric::HANDSHAKE {
                    FAMILIES[3].0
                } else {
                    FAMILIES[4].0
                }
            }
            metric::BYTES => {
                labels.push(("data_path", path_label(key.a)));
                labels.push(("direction", direction_label(key.b)));
                FAMILIES[5].0
            }
            metric::KEY_UPDATES => FAMILIES[6].0,
            metric::TLS_RECORD => {
                labels.push(("direction", direction_label(key.a)));
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
                    labels.push(("description", alert_label(key.c & 0xff)));
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
        let active = self.0.active_counts();
        if !active.is_empty() {
            let names = self.0.listener_names();
            let mut metric = encoder.encode_descriptor(
                "tlsplice_active_connections",
                "Connections open now, by listener and the data path chosen for them (a connection moved to another agent counts there)",
                None,
                MetricType::Gauge,
            )?;
            for ((listener, path), n) in active {
                let listener = names.get(&listener).cloned().unwrap_or_default();
                metric
                    .encode_family(&[
                        ("listener", listener.as_str()),
                        ("data_path", path.as_str()),
                    ])?
                    .encode_gauge(&n)?;
            }
        }
        encoder
            .encode_descriptor(
                "tlsplice_parked_connections",
                "Idle connections parked without a task of their own (sockmap at once, splice and kTLS after a second without bytes): the kernel holds their state, and their listener's epoll set says when one needs the agent",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&self.0.parked())?;
        if let Some(pipes) = self.0.pipe_counts() {
            let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            let mut metric = encoder.encode_descriptor(
                "tlsplice_splice_pipes",
                "Pipes of the splice pool: lent to a direction with bytes in flight, or idle and kept for reuse (two descriptors each; idle connections hold none)",
                None,
                MetricType::Gauge,
            )?;
            for (state, n) in [("in_use", pipes.in_use), ("idle", pipes.idle)] {
                metric
                    .encode_family(&[("state", state)])?
                    .encode_gauge(&gauge(n))?;
            }
            encoder
                .encode_descriptor(
                    "tlsplice_splice_pipes_limit",
                    "The most pipes the splice pool lends at once (limits.max_splice_pipes)",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&gauge(pipes.max))?;
            encoder
                .encode_descriptor(
                    "tlsplice_splice_pipe_waits",
                    "Times a spliced direction waited for a pipe because the pool's limit was lent",
                    None,
                    MetricType::Counter,
                )?
                .encode_counter::<NoLabelSet, _, u64>(&pipes.waits, None)?;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            encoder
                .encode_descriptor(
                    "tlsplice_runtime_tasks",
                    "Tasks alive in the agent's runtime: a connection being set up or moving bytes holds one, a parked one none; the accept loops and the admin server one each",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&i64::try_from(runtime.metrics().num_alive_tasks()).unwrap_or(i64::MAX))?;
        }
        if let Some(heap) = crate::memory::heap() {
            let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            let mut metric = encoder.encode_descriptor(
                "tlsplice_heap_bytes",
                "The agent's heap (jemalloc): allocated; resident (allocated, the allocator's own, and freed pages not yet given back to the kernel); metadata (the allocator's own)",
                None,
                MetricType::Gauge,
            )?;
            for (state, n) in [
                ("allocated", heap.allocated),
                ("resident", heap.resident),
                ("metadata", heap.metadata),
            ] {
                metric
                    .encode_family(&[("state", state)])?
                    .encode_gauge(&gauge(n))?;
            }
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
        let takeovers = self.0.takeover_stats();
        encoder
            .encode_descriptor(
                "tlsplice_takeovers_refused",
                "Live upgrades this agent refused or that did not complete (it went on serving)",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&takeovers.refused, None)?;
        if let Some(seconds) = takeovers.took_seconds {
            encoder
                .encode_descriptor(
                    "tlsplice_takeover_seconds",
                    "This agent took the listening sockets over from the one before: seconds from its start to serving on them",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&seconds)?;
            let mut sockets = encoder.encode_descriptor(
                "tlsplice_takeover_sockets",
                "Listening sockets at this agent's takeover: adopted from the agent before, or bound anew",
                None,
                MetricType::Gauge,
            )?;
            for (how, n) in [
                ("adopted", takeovers.adopted),
                ("bound_anew", takeovers.bound_anew),
            ] {
                sockets
                    .encode_family(&[("how", how)])?
                    .encode_gauge(&i64::try_from(n).unwrap_or(i64::MAX))?;
            }
        }
        if let Some((summary, seconds)) = takeovers.connections {
            let mut connections = encoder.encode_descriptor(
                "tlsplice_takeover_connections",
                "Established connections at this agent's takeover: moved here, lost (closed), or staying with the agent before to end or drain there",
                None,
                MetricType::Gauge,
            )?;
            for (how, n) in [
                ("moved", summary.moved),
                ("lost", summary.lost),
                ("staying", summary.staying),
            ] {
                connections
                    .encode_family(&[("how", how)])?
                    .encode_gauge(&i64::try_from(n).unwrap_or(i64::MAX))?;
            }
            encoder
                .encode_descriptor(
                    "tlsplice_takeover_move_seconds",
                    "How long the established connections' moves took at this agent's takeover",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&seconds)?;
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
        let now = crate::identity::unix_now();
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
        let stapling: Vec<(String, String, bool)> = certs
            .iter()
            .flat_map(|(i, c)| {
                let listener = name(i);
                c.serving.iter().filter_map(move |cert| {
                    let stale = cert.ocsp_stale(now)?;
                    Some((listener.clone(), cert.path.display().to_string(), stale))
                })
            })
            .collect();
        if !stapling.is_empty() {
            let mut ocsp = encoder.encode_descriptor(
                "tlsplice_ocsp_response_stale",
                "1 while a certificate's configured OCSP response is not stapled (its nextUpdate passed, it failed to parse, or it does not say good), by listener and certificate file",
                None,
                MetricType::Gauge,
            )?;
            for (listener, cert, stale) in &stapling {
                ocsp.encode_family(&[("listener", listener.as_str()), ("cert", cert.as_str())])?
                    .encode_gauge(&i64::from(*stale))?;
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
    telemetry.latency.register(&mut registry);
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
    use std::collections::BTreeMap;

    use tlsplice_common::{DataPath, NO_DATA_PATH, StatKey};

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
            d: 0,
        };
        counters.insert(key(metric::CONN_ACCEPTED, 0, 0, 0), 5);
        counters.insert(
            StatKey {
                d: 0x11ec,
                ..key(metric::HANDSHAKE, 0, 0x0304, 0x1301)
            },
            4,
        );
        counters.insert(
            key(metric::BYTES, DataPath::Ktls.code(), direction::DOWN, 0),
            99,
        );
        counters.insert(key(metric::TLS_RECORD, direction::UP, 22, 1), 7);
        counters.insert(
            key(metric::TLS_RECORD, direction::DOWN, 21, (2 << 8) | 50),
            2,
        );
        let refused = Reason::UpstreamCertificateRefused.code();
        counters.insert(key(metric::UPSTREAM_HANDSHAKE, refused, 0, 0), 1);
        counters.insert(key(metric::REDIRECT_FAILED, 0, 0, 0), 10);
        counters.insert(key(metric::CONN_CLOSED, 0, 0, 0), 5);
        counters.insert(
            key(
                metric::CONN_OUTCOME,
                NO_DATA_PATH,
                Reason::UnknownSni.code(),
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
            text.contains(
                "outcome=ok version=TLSv1.3 cipher=TLS13_AES_128_GCM_SHA256 group=X25519MLKEM768"
            ),
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
