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
    let hooks = crate::ingest::webhook::routes(&state);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(hooks)
}

/// Liveness: the process is up and serving HTTP.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: accepting work, the store takes a durable write, every source is healthy and no
/// task is past its deadline.
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
    // A task past its deadline (a wedged source, a dead webhook writer) is as unready as a
    // failing source: the watchdog will restart the daemon for it.
    let stuck = state.health.stuck(std::time::Instant::now());
    let unhealthy: Vec<String> = state
        .health
        .snapshot()
        .into_iter()
        .filter(|(name, t)| (name.starts_with("source:") && !t.healthy) || stuck.contains(name))
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

/// Prometheus text exposition: figures from the store, then the in-process histograms.
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut body = match state.store.metrics_samples().await {
        Ok(samples) => crate::store::metrics::render(&samples),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: store figures unavailable");
            String::new()
        }
    };
    let replica = state.config.borrow().server.replica.clone();
    match state.store.lease_holders().await {
        Ok(holders) => body.push_str(&crate::store::metrics::render(
            &crate::store::lease::lease_samples(holders.as_deref(), &replica),
        )),
        Err(e) => tracing::warn!(error = %e, "metrics: lease holders unavailable"),
    }
    let (healthy, total) = state.health.count("");
    body.push_str(&format!(
        "# HELP frontdesk_tasks Daemon tasks reporting health.\n# TYPE frontdesk_tasks gauge\nfrontdesk_tasks {total}\n\
         # HELP frontdesk_tasks_healthy Daemon tasks whose last unit of work succeeded.\n# TYPE frontdesk_tasks_healthy gauge\nfrontdesk_tasks_healthy {healthy}\n"
    ));
    if let Some(m) = &state.metrics {
        body.push_str(&m.render());
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// Serves `app` until `shutdown`, then lets open connections finish their current request.
///
/// Unlike `axum::serve`, request headers must arrive within `header_timeout` (a 1-byte-per-second
/// client is cut off), and accept errors such as EMFILE pause the loop instead of ending it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    header_timeout: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; pausing");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    graceful.shutdown().await;
}
