//! The one HTTP server: `/healthz`, `/readyz`, and the webhook routes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::config::Config;
use crate::store::Store;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The durable queue.
    pub store: Store,
    /// The configuration in force.
    pub config: Arc<Config>,
    /// False once shutdown has begun: new work is refused with 503.
    pub accepting: Arc<AtomicBool>,
}

/// Builds the router with every route.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Liveness: the process is up and serving HTTP.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: accepting work and the store takes a durable write.
async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if !state.accepting.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    match state.store.write_probe(chrono::Utc::now()).await {
        Ok(()) => (StatusCode::OK, "ready\n"),
        Err(e) => {
            tracing::warn!(error = %e, "readiness probe failed");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
        }
    }
}
