//! The admin HTTP server: `/metrics` (Prometheus text, read from the counters at scrape time)
//! and `/healthz`.

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

/// A bound admin server.
pub struct Admin {
    listener: TcpListener,
    router: Router,
}

impl Admin {
    /// Binds the admin address.
    pub async fn bind(addr: SocketAddr, telemetry: Arc<Telemetry>) -> Result<Self, AdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError { addr, source })?;
        let registry = Arc::new(metrics::registry(telemetry));
        let router = Router::new()
            .route("/metrics", get(move || scrape(registry.clone())))
            .route("/healthz", get(|| async { "ok\n" }));
        Ok(Self { listener, router })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until the task is dropped.
    pub async fn run(self) {
        if let Err(e) = axum::serve(self.listener, self.router).await {
            tracing::warn!(error = %e, "admin server stopped");
        }
    }
}
