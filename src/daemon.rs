//! `frontdesk run`: opens the store, starts every task, serves HTTP, drains on SIGTERM/SIGINT.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ChannelKind, Config, SourceKind, Storage};
use crate::http::{self, AppState};
use crate::store::Store;

/// Runs the daemon until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let Storage::Sqlite(db_path) = &config.storage;
    let store = Store::open(db_path).await?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {} (server.listen)", config.server.listen))?;
    let local = listener.local_addr().context("listener has no address")?;
    log_summary(&config, &local.to_string(), &db_path.display().to_string());

    let config = Arc::new(config);
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let accepting = Arc::new(AtomicBool::new(true));
    let state = AppState {
        store: store.clone(),
        config: config.clone(),
        accepting: accepting.clone(),
    };

    let app = http::router(state);
    let server_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { server_shutdown.cancelled().await })
            .await
    });

    // one task per IMAP source; `core` is woken after new rows are committed
    let core = Arc::new(tokio::sync::Notify::new());
    for source in crate::ingest::imap::sources(&config, &store, None) {
        tracker.spawn(crate::ingest::imap::run(
            source,
            core.clone(),
            shutdown.clone(),
        ));
    }

    // READY only now: config valid, store open and migrated, listener bound, secrets read.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    let signal_name = wait_for_signal().await?;
    tracing::info!(signal = signal_name, "shutting down");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    accepting.store(false, Ordering::Relaxed);
    shutdown.cancel();
    tracker.close();

    let drain = config.server.drain_timeout;
    let drained = tokio::time::timeout(drain, async {
        tracker.wait().await;
        let _ = server.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            timeout_secs = drain.as_secs(),
            "drain deadline passed; stopping anyway"
        );
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

fn log_summary(config: &Config, listen: &str, db: &str) {
    let sources: Vec<String> = config
        .sources
        .iter()
        .map(|s| match &s.kind {
            SourceKind::Imap(i) => format!("{} (imap {}:{})", s.name, i.host, i.port),
            SourceKind::Webhook(_) => format!("{} (webhook /hooks/{})", s.name, s.name),
        })
        .collect();
    let channels: Vec<String> = config
        .channels
        .iter()
        .map(|c| match &c.kind {
            ChannelKind::Email(_) => format!("{} (email)", c.name),
            ChannelKind::Webhook(_) => format!("{} (webhook)", c.name),
        })
        .collect();
    tracing::info!(
        config = %config.file.display(),
        store = db,
        listen,
        sources = %sources.join(", "),
        channels = %channels.join(", "),
        "frontdesk started"
    );
}
