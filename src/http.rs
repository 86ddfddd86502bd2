//! The one HTTP server: `/healthz`, `/readyz`, `/metrics`, and the webhook routes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::{Notify, watch};

use crate::config::Config;
use crate::health::Health;
use crate::store::Store;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The durable queue.
    pub store: Store,
    /// The configuration in force (replaced on reload).
    pub config: watch::Receiver<Arc<Config>>,
    /// False once shutdown has begun: new work is refused with 503.
    pub accepting: Arc<AtomicBool>,
    /// Task health.
    pub health: Arc<Health>,
    /// The Prometheus recorder, if installed.
    pub metrics: Option<PrometheusHandle>,
    /// Wakes the core loop after a commit.
    pub wake_core: Arc<Notify>,
}

/// Builds the router with every route.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Liveness: the process is up and serving HTTP.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: accepting work, the store takes a durable write, and every source is healthy.
async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    if !state.accepting.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    if let Err(e) = state.store.write_probe(chrono::Utc::now()).await {
        tracing::warn!(error = %e, "readiness probe failed");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "store unavailable\n".into(),
        );
    }
    let unhealthy: Vec<String> = state
        .health
        .snapshot()
        .into_iter()
        .filter(|(name, t)| name.starts_with("source:") && !t.healthy)
        .map(|(name, _)| name)
        .collect();
    if unhealthy.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {}\n", unhealthy.join(", ")),
        )
    }
}

/// Prometheus text exposition.
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let body = state
        .metrics
        .as_ref()
        .map(|m| m.render())
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}
