//! Certificate lifecycle: each listener's TLS material (certificates by SNI, client CA,
//! upstream trust and client certificate) is rebuilt when the contents of its files change
//! and swapped in for new handshakes, while established connections keep what they started
//! with. A change that does not load keeps the old material serving, and says so.
//!
//! Files are compared by contents, not by modification time or inode, so a Kubernetes Secret
//! volume or cert-manager swapping a `..data` symlink is seen like an in-place write.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hasher;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use zeroize::Zeroize;

use crate::config::{CertsConfig, ListenerConfig};
use crate::identity::{self, CertInfo, MaterialError};
use crate::metrics::Telemetry;

/// One load of a listener's TLS material.
#[derive(Debug)]
pub struct ListenerTls {
    /// What clients handshake with (terminate, reencrypt).
    pub server: Option<Arc<ServerConfig>>,
    /// How to reach a TLS upstream (reencrypt, originate).
    pub upstream: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    /// Every certificate in it, with its expiry.
    pub certs: Vec<CertInfo>,
}

impl ListenerTls {
    /// Reads and checks every file of the listener's TLS material.
    pub fn load(l: &ListenerConfig) -> Result<Self, MaterialError> {
        let mut certs = Vec::new();
        let server = match identity::server_config(l)? {
            Some((config, infos)) => {
                certs.extend(infos);
                Some(config)
            }
            None => None,
        };
        let upstream = match &l.upstream_tls {
            Some(u) => {
                let (config, name, infos) = identity::upstream_client(u)?;
                certs.extend(infos);
                Some((config, name))
            }
            None => None,
        };
        Ok(Self {
            server,
            upstream,
            certs,
        })
    }
}

/// What a check of the files found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The files are as they were.
    Unchanged,
    /// New contents loaded; new handshakes use them.
    Reloaded,
    /// New contents did not load; the old material keeps serving.
    Failed(String),
    /// The contents that failed before are still there.
    StillFailing,
}

struct WatchState {
    /// Contents of the files now serving.
    serving: u64,
    /// Contents that failed to load, and why.
    failing: Option<(u64, String)>,
}

/// A listener's TLS material, reloaded when its files change.
pub struct WatchedTls {
    listener: ListenerConfig,
    files: Vec<PathBuf>,
    current: RwLock<Arc<ListenerTls>>,
    state: Mutex<WatchState>,
}

impl std::fmt::Debug for WatchedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedTls")
            .field("listener", &self.listener.name)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// A hash of the files' contents (a missing or unreadable file hashes as its error), so any
/// change, including a symlink pointing elsewhere, changes it.
fn fingerprint(files: &[PathBuf]) -> u64 {
    let mut h = DefaultHasher::new();
    for f in files {
        h.write(f.as_os_str().as_encoded_bytes());
        match std::fs::read(f) {
            Ok(mut bytes) => {
                h.write_u8(1);
                h.write(&bytes);
                // Key files pass through here too.
                bytes.zeroize();
            }
            Err(e) => {
                h.write_u8(0);
                h.write(e.kind().to_string().as_bytes());
            }
        }
    }
    h.finish()
}

/// How long to wait before loading changed files a second time: a writer replacing a
/// certificate and then its key in place is seen half-done by a check in between.
const SETTLE: Duration = Duration::from_millis(300);

impl WatchedTls {
    /// Loads the listener's TLS material.
    pub fn load(l: &ListenerConfig) -> Result<Self, MaterialError> {
        let files = identity::material_files(l);
        let serving = fingerprint(&files);
        let tls = ListenerTls::load(l)?;
        Ok(Self {
            listener: l.clone(),
            files,
            current: RwLock::new(Arc::new(tls)),
            state: Mutex::new(WatchState {
                serving,
                failing: None,
            }),
        })
    }

    /// The material new handshakes use.
    pub fn current(&self) -> Arc<ListenerTls> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why the newest contents of the files do not load, while they do not.
    pub fn failing(&self) -> Option<String> {
        self.lock().failing.as_ref().map(|(_, why)| why.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the files and swaps in new material when their contents changed and load.
    /// Blocking (file reads, and a short wait before a second try).
    pub fn check(&self) -> Reload {
        let now = fingerprint(&self.files);
        {
            let state = self.lock();
            if now == state.serving {
                drop(state);
                self.lock().failing = None;
                return Reload::Unchanged;
            }
            if state.failing.as_ref().is_some_and(|(f, _)| *f == now) {
                return Reload::StillFailing;
            }
        }
        let (contents, loaded) = match ListenerTls::load(&self.listener) {
            Ok(tls) => (now, Ok(tls)),
            Err(_) => {
                std::thread::sleep(SETTLE);
                let again = fingerprint(&self.files);
                (again, ListenerTls::load(&self.listener))
            }
        };
        match loaded {
            Ok(tls) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tls);
                let mut state = self.lock();
                state.serving = contents;
                state.failing = None;
                Reload::Reloaded
            }
            Err(e) => {
                let why = e.to_string();
                self.lock().failing = Some((contents, why.clone()));
                Reload::Failed(why)
            }
        }
    }
}

/// Logs a warning for each certificate closer to its expiry than the threshold, once per
/// certificate (path and expiry) for the life of the agent.
fn warn_expiring(
    listener: &str,
    certs: &[CertInfo],
    threshold: Duration,
    warned: &mut BTreeSet<(PathBuf, i64)>,
) {
    let now = crate::identity::unix_now();
    let threshold = i64::try_from(threshold.as_secs()).unwrap_or(i64::MAX);
    for c in certs {
        let left = c.not_after.saturating_sub(now);
        if left < threshold && warned.insert((c.path.clone(), c.not_after)) {
            tracing::warn!(listener = %listener, cert = %c.path.display(), subject = %c.subject,
                seconds_left = left, days_left = left / 86_400,
                "certificate expires soon (or has expired)");
        }
    }
}

/// Every listener's TLS material by counter index, as the proxy keeps it across reloads.
pub type Registry = Arc<Mutex<BTreeMap<u16, Arc<WatchedTls>>>>;

/// Publishes every listener's certificates, then checks their files every
/// `config.reload_interval` and whenever `hup` is notified (SIGHUP), until dropped. Listeners
/// added or changed by a reload are picked up from `registry`.
pub async fn watch(
    registry: Registry,
    telemetry: Arc<Telemetry>,
    config: CertsConfig,
    hup: Arc<tokio::sync::Notify>,
) {
    let mut warned = BTreeSet::new();
    // Which material each index's certificates were last published from.
    let mut published: BTreeMap<u16, Arc<WatchedTls>> = BTreeMap::new();
    let mut why = "start";
    loop {
        let listeners: Vec<(u16, Arc<WatchedTls>)> = registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(i, t)| (*i, t.clone()))
            .collect();
        published.retain(|i, _| listeners.iter().any(|(j, _)| i == j));
        for (index, tls) in &listeners {
            if !published.get(index).is_some_and(|p| Arc::ptr_eq(p, tls)) {
                published.insert(*index, tls.clone());
                let certs = tls.current().certs.clone();
                warn_expiring(
                    &tls.listener.name,
                    &certs,
                    config.expiry_warning(),
                    &mut warned,
                );
                telemetry.set_certificates(*index, certs);
            }
        }
        if why != "start" {
            check(listeners, &registry, &telemetry, &config, why, &mut warned).await;
        }
        why = tokio::select! {
            () = tokio::time::sleep(config.reload_interval()) => "interval",
            () = hup.notified() => "SIGHUP",
        };
    }
}

/// One check of every listener's files.
async fn check(
    listeners: Vec<(u16, Arc<WatchedTls>)>,
    registry: &Registry,
    telemetry: &Telemetry,
    config: &CertsConfig,
    why: &str,
    warned: &mut BTreeSet<(PathBuf, i64)>,
) {
    let outcomes = match tokio::task::spawn_blocking(move || {
        listeners
            .iter()
            .map(|(index, tls)| (*index, tls.clone(), tls.check()))
            .collect::<Vec<_>>()
    })
    .await
    {
        Ok(outcomes) => outcomes,
        Err(e) => {
            tracing::error!(error = %e, "certificate check failed to run");
            return;
        }
    };
    let mut summary: BTreeMap<&str, usize> = BTreeMap::new();
    for (index, tls, outcome) in outcomes {
        // A reload may have replaced or removed this listener while its files were read.
        let current = registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&index)
            .is_some_and(|t| Arc::ptr_eq(t, &tls));
        if !current {
            continue;
        }
        let name = &tls.listener.name;
        match &outcome {
            Reload::Unchanged => *summary.entry("unchanged").or_default() += 1,
            Reload::StillFailing => *summary.entry("still failing").or_default() += 1,
            Reload::Reloaded => {
                *summary.entry("reloaded").or_default() += 1;
                let certs = tls.current().certs.clone();
                tracing::info!(listener = %name, trigger = %why,
                    certificates = certs.len(), "TLS material reloaded: new handshakes use it");
                telemetry.set_certificates(index, certs);
                telemetry.count_reload(index, true);
            }
            Reload::Failed(e) => {
                *summary.entry("failed").or_default() += 1;
                tracing::error!(listener = %name, trigger = %why, error = %e,
                    "TLS material changed but does not load: the previous material keeps serving");
                telemetry.count_reload(index, false);
            }
        }
        telemetry.set_reload_failing(index, tls.failing().is_some());
        let certs = tls.current().certs.clone();
        warn_expiring(name, &certs, config.expiry_warning(), warned);
    }
    if why == "SIGHUP" {
        tracing::info!(?summary, "SIGHUP: certificate files checked");
    }
}
