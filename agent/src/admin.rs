//! The admin HTTP server: `/metrics` (Prometheus text, read from the counters at scrape time),
//! `/healthz` (the process answers), `/readyz` (listeners bound and the eBPF decision made; 503
//! while starting and draining) and `/config` (the effective configuration as JSON).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::metrics::{self, Telemetry};

/// Errors starting the admin server.
#[derive(Debug, thiserror::Error)]
#[error("admin server: bind {addr}: {source}")]
pub struct AdminError {
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    pub source: std::io::Error,
}

/// The OpenMetrics text content type prometheus-client writes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn scrape(registry: Arc<Registry>) -> impl IntoResponse {
    match metrics::encode(&registry) {
        Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, OPENMETRICS)], text),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "encoding metrics failed\n".to_owned(),
        ),
    }
}

/// Where the agent is in its life, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Binding listeners, loading eBPF, measuring data paths.
    Starting,
    /// Serving; the text says what (listeners, eBPF state).
    Ready(String),
    /// SIGTERM received: listeners closed, connections draining.
    Draining,
}

/// What the admin server reports besides the counters.
#[derive(Debug)]
pub struct AdminState {
    readiness: std::sync::Mutex<Readiness>,
    /// The effective configuration, rendered at start and after each reload.
    config_json: std::sync::Mutex<String>,
}

fn render(config: &crate::config::Config) -> String {
    serde_json::to_string_pretty(config)
        .unwrap_or_else(|e| format!("{{\"error\": \"rendering the configuration: {e}\"}}"))
        + "\n"
}

impl AdminState {
    /// Starting, with the effective configuration (file, flags and environment merged).
    pub fn new(config: &crate::config::Config) -> Self {
        Self {
            readiness: std::sync::Mutex::new(Readiness::Starting),
            config_json: std::sync::Mutex::new(render(config)),
        }
    }

    /// The effective configuration after a reload.
    pub fn set_config(&self, config: &crate::config::Config) {
        *self.config_json.lock().unwrap_or_else(|p| p.into_inner()) = render(config);
    }

    /// Moves to `r`.
    pub fn set(&self, r: Readiness) {
        *self.readiness.lock().unwrap_or_else(|p| p.into_inner()) = r;
    }

    fn get(&self) -> Readiness {
        self.readiness
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

async fn readyz(state: Arc<AdminState>) -> impl IntoResponse {
    match state.get() {
        Readiness::Ready(what) => (StatusCode::OK, format!("ready: {what}\n")),
        Readiness::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting\n".to_owned()),
        Readiness::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_owned()),
    }
}

/// A bound admin server.
pub struct Admin {
    /// Bound, not yet registered with a runtime (see [`crate::privileges`]).
    listener: std::net::TcpListener,
    router: Router,
}

impl Admin {
    /// Binds the admin address.
    pub async fn bind(
        addr: SocketAddr,
        telemetry: Arc<Telemetry>,
        state: Arc<AdminState>,
    ) -> Result<Self, AdminError> {
        let listener =
            std::net::TcpListener::bind(addr).map_err(|source| AdminError { addr, source })?;
        Self::on(listener, telemetry, state)
    }

    /// Serves on a socket already listening (one a running agent handed over).
    pub fn on(
        listener: std::net::TcpListener,
        telemetry: Arc<Telemetry>,
        state: Arc<AdminState>,
    ) -> Result<Self, AdminError> {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        listener
            .set_nonblocking(true)
            .map_err(|source| AdminError { addr, source })?;
        let registry = Arc::new(metrics::registry(telemetry));
        let router = Router::new()
            .route("/metrics", get(move || scrape(registry.clone())))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", {
                let state = state.clone();
                get(move || readyz(state.clone()))
            })
            .route(
                "/config",
                get(move || {
                    let text = state
                        .config_json
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    async move { ([(header::CONTENT_TYPE, "application/json")], text) }
                }),
            );
        Ok(Self { listener, router })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// A copy of the listening socket, for a new agent taking over.
    pub fn socket_copy(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        self.listener.try_clone().map(std::os::fd::OwnedFd::from)
    }

    /// Serves until the task is dropped.
    pub async fn run(self) {
        let listener = match TcpListener::from_std(self.listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "admin server: registering its socket failed");
                return;
            }
        };
        if let Err(e) = axum::serve(listener, self.router).await {
            tracing::warn!(error = %e, "admin server stopped");
        }
    }
}
