//! `frontdesk run`: opens the store, starts every task, serves HTTP, feeds the systemd watchdog,
//! reloads on SIGHUP and drains on SIGTERM/SIGINT.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, ChannelKind, Config, SourceKind, Storage};
use crate::health::Health;
use crate::http::{self, AppState};
use crate::store::Store;
use crate::store::lease::{LeaseName, Leases, Role, SharedLease};

/// What the daemon's long-running tasks share.
#[derive(Clone)]
pub struct Shared {
    /// The durable queue.
    pub store: Store,
    /// The configuration in force; replaced on a successful reload.
    pub config: watch::Receiver<Arc<Config>>,
    /// Task health for the watchdog, `/readyz` and `frontdesk sources`.
    pub health: Arc<Health>,
    /// Wakes the core loop when new messages are committed.
    pub wake_core: Arc<Notify>,
    /// Wakes the sender when the outbox has new items.
    pub wake_sender: Arc<Notify>,
    /// Cancelled when the daemon stops.
    pub shutdown: CancellationToken,
    /// This replica's leases (always held on SQLite).
    pub leases: Leases,
    /// The leader lease while running a leader-only task (`lead`).
    pub leader: Option<SharedLease>,
}

/// How often the main loop probes health when systemd asks for no watchdog.
const PROBE_EVERY: Duration = Duration::from_secs(10);
/// How often a leader proves its lease alive, and a follower tries to take it: a dead leader's
/// role moves within about this long once PostgreSQL has noticed its session is gone.
const LEADER_CHECK: Duration = Duration::from_secs(1);

/// Runs the daemon until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    let db_display = match &config.storage {
        Storage::Sqlite(db_path) => db_path.display().to_string(),
        Storage::Postgres(pg) => crate::store::redact_url(&pg.url),
    };
    let store = Store::open_storage(&config.storage).await?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {} (server.listen)", config.server.listen))?;
    let local = listener.local_addr().context("listener has no address")?;
    log_summary(&config, &local.to_string(), &db_display);
    let metrics = install_metrics();

    let config_path = config.file.clone();
    let (config_tx, config_rx) = watch::channel(Arc::new(config));
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let accepting = Arc::new(AtomicBool::new(true));
    let shared = Shared {
        store: store.clone(),
        config: config_rx.clone(),
        health: Arc::new(Health::new()),
        wake_core: Arc::new(Notify::new()),
        wake_sender: Arc::new(Notify::new()),
        shutdown: shutdown.clone(),
        leases: store.leases(&config_rx.borrow().server.replica),
        leader: None,
    };
    let state = AppState {
        store: store.clone(),
        config: config_rx.clone(),
        accepting: accepting.clone(),
        health: shared.health.clone(),
        metrics: metrics.clone(),
        wake_core: shared.wake_core.clone(),
    };

    // WAL checkpoints run beside the writer, not inside the commits acknowledgements wait for.
    tracker.spawn({
        let (store, shutdown) = (store.clone(), shutdown.clone());
        async move {
            store
                .run_checkpointer(
                    Duration::from_millis(250),
                    crate::store::WAL_RESTART_FRAMES,
                    shutdown,
                )
                .await
        }
    });

    // Build the channels once up front so a broken channel fails the start, not the first send.
    crate::notify::Sender::new(store.clone(), config_rx.borrow().clone())
        .context("cannot set up the output channels")?;
    tracker.spawn(lead(shared.clone(), Role::Sender, sender_task));

    // The core loop: the only writer of conversations and SLA targets. Its rules are checked
    // here so that a config the core cannot use fails the start.
    crate::core::Routing::from_config(&config_rx.borrow()).context("cannot build the sla rules")?;
    tracker.spawn(lead(shared.clone(), Role::Core, core_task));

    let app = http::router(state);
    let server_shutdown = shutdown.clone();
    let header_timeout = config_rx.borrow().server.header_timeout;
    let server = tokio::spawn(http::serve(listener, app, header_timeout, server_shutdown));

    tracker.spawn(imap_supervisor(shared.clone()));

    // READY only now: config valid, secrets read, store open and migrated, listener bound.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!(startup_ms = started.elapsed().as_millis() as u64, "ready");

    let watchdog = sd_notify::watchdog_enabled();
    let mut probe = tokio::time::interval(watchdog.map(|d| d / 2).unwrap_or(PROBE_EVERY));
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot install SIGHUP handler")?;

    let signal_name = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => reload(&config_path, &config_tx),
            _ = probe.tick() => {
                if let Some(m) = &metrics {
                    m.run_upkeep();
                }
                match probe_health(&shared).await {
                    Ok(status) => {
                        let mut states = vec![sd_notify::NotifyState::Status(&status)];
                        if watchdog.is_some() {
                            states.push(sd_notify::NotifyState::Watchdog);
                        }
                        let _ = sd_notify::notify(&states);
                    }
                    // No WATCHDOG=1: systemd restarts us if this lasts past WatchdogSec.
                    Err(problem) => {
                        tracing::error!(error = %problem, "health probe failed; withholding the watchdog ping");
                        let status = format!("unhealthy: {problem}");
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
                    }
                }
            }
        }
    };

    tracing::info!(signal = signal_name, "shutting down");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    accepting.store(false, Ordering::Relaxed);
    shutdown.cancel();
    tracker.close();

    let drain = config_rx.borrow().server.drain_timeout;
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

/// Runs one task per IMAP source and restarts exactly the sources a reload changed.
///
/// Stopping a source mid-batch is safe: a batch and its cursor commit in one transaction, so an
/// interrupted batch is simply fetched again by the next task.
async fn imap_supervisor(shared: Shared) {
    use std::collections::HashMap;
    let mut config = shared.config.clone();
    let mut running: HashMap<
        String,
        (
            crate::ingest::imap::SourceCtx,
            CancellationToken,
            tokio::task::JoinHandle<()>,
        ),
    > = HashMap::new();
    loop {
        let current = config.borrow_and_update().clone();
        let wanted: HashMap<String, crate::ingest::imap::SourceCtx> =
            crate::ingest::imap::sources(&current, &shared.store, None)
                .into_iter()
                .map(|c| (c.name.clone(), c))
                .collect();
        let names: Vec<String> = running.keys().cloned().collect();
        for name in names {
            let keep = match (wanted.get(&name), running.get(&name)) {
                (Some(new), Some((old, _, _))) => new.cfg == old.cfg && new.team == old.team,
                _ => false,
            };
            if !keep && let Some((_, token, handle)) = running.remove(&name) {
                tracing::info!(source = %name, "stopping imap source (configuration changed)");
                token.cancel();
                let _ = handle.await;
            }
        }
        for (name, ctx) in wanted {
            if running.contains_key(&name) {
                continue;
            }
            let token = shared.shutdown.child_token();
            let handle = tokio::spawn(crate::ingest::imap::run(
                ctx.clone(),
                shared.wake_core.clone(),
                token.clone(),
            ));
            running.insert(name, (ctx, token, handle));
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            changed = config.changed() => if changed.is_err() { break },
        }
    }
    for (_, (_, token, handle)) in running {
        token.cancel();
        let _ = handle.await;
    }
}

/// Runs `task` only while this replica holds the lease of `role` (always, on SQLite).
///
/// A follower tries the lease every [`LEADER_CHECK`]; the leader proves it alive as often, and
/// when the proof fails it aborts the task at once: another replica may already hold the role.
/// Aborting between or inside transactions is safe, since every step commits atomically. With
/// shared leases the leader also wakes its loop every check, because messages committed by
/// other replicas do not reach this process's wake-up signal.
async fn lead<F, Fut>(shared: Shared, role: Role, task: F)
where
    F: Fn(Shared) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let lease: SharedLease = Arc::new(tokio::sync::Mutex::new(
        shared.leases.lease(LeaseName::Role(role)),
    ));
    let wake = match role {
        Role::Core => shared.wake_core.clone(),
        Role::Sender => shared.wake_sender.clone(),
    };
    loop {
        let taken = lease.lock().await.try_take().await;
        if let Err(e) = &taken {
            tracing::debug!(role = role.as_str(), error = %e, "leader lease not taken");
        }
        if !matches!(taken, Ok(true)) {
            tokio::select! {
                _ = tokio::time::sleep(LEADER_CHECK) => continue,
                _ = shared.shutdown.cancelled() => return,
            }
        }
        if shared.leases.shared() {
            tracing::info!(
                role = role.as_str(),
                replica = shared.leases.replica(),
                "leading"
            );
        }
        let generation = shared.shutdown.child_token();
        let mut handle = tokio::spawn(task(Shared {
            shutdown: generation.clone(),
            leader: Some(lease.clone()),
            ..shared.clone()
        }));
        let mut check = tokio::time::interval(LEADER_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        check.tick().await;
        loop {
            tokio::select! {
                _ = &mut handle => {
                    lease.lock().await.release().await;
                    if shared.shutdown.is_cancelled() {
                        return;
                    }
                    // The task stopped itself (the core found its lease lost before a step)
                    // or panicked: give the role up so any replica, this one included, can
                    // take it again.
                    shared.health.remove(role.as_str());
                    tracing::warn!(role = role.as_str(), "leader task stopped; competing for the role again");
                    tokio::time::sleep(LEADER_CHECK).await;
                    break;
                }
                _ = check.tick() => {
                    if !shared.leases.shared() {
                        continue;
                    }
                    if lease.lock().await.check().await.is_err() {
                        generation.cancel();
                        handle.abort();
                        let _ = handle.await;
                        shared.health.remove(role.as_str());
                        tracing::warn!(role = role.as_str(), "leadership lost; stopped");
                        break;
                    }
                    wake.notify_one();
                }
            }
        }
    }
}

/// Runs one generation of a task per configuration, replacing it when a reload changes the config.
///
/// `start` builds the generation from the config in force, or says why it cannot (the task then
/// waits for the next reload, and is reported unhealthy). A generation is stopped through its
/// token and awaited before the next starts; the tasks check the token only between committed
/// steps, so nothing in flight is lost.
async fn supervise<F, Fut, E>(shared: Shared, task: &'static str, start: F)
where
    F: Fn(Arc<Config>, CancellationToken) -> Result<Fut, E>,
    Fut: std::future::Future<Output = ()> + Send + 'static,
    E: std::fmt::Display,
{
    let mut config = shared.config.clone();
    loop {
        let current = config.borrow_and_update().clone();
        let generation = shared.shutdown.child_token();
        match start(current, generation.clone()) {
            Ok(run) => {
                let handle = tokio::spawn(run);
                tokio::select! {
                    _ = shared.shutdown.cancelled() => {
                        let _ = handle.await;
                        return;
                    }
                    changed = config.changed() => {
                        generation.cancel();
                        let _ = handle.await;
                        if changed.is_err() {
                            return;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(task, error = %e, "task not startable with this configuration; waiting for a reload");
                shared
                    .health
                    .failed(task, &e.to_string(), chrono::Utc::now());
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    changed = config.changed() => if changed.is_err() { return },
                }
            }
        }
    }
}

/// The core loop, its routing (clients, owners, policies, calendars) rebuilt on each reload; a
/// new generation recomputes open targets from the message log.
async fn core_task(shared: Shared) {
    let (store, wake, health) = (
        shared.store.clone(),
        shared.wake_core.clone(),
        shared.health.clone(),
    );
    let (leader, lost) = (shared.leader.clone(), shared.shutdown.clone());
    supervise(shared, "core", move |config, stop| {
        let routing = crate::core::Routing::from_config(&config)?;
        let mut core =
            crate::core::Core::new(store.clone(), Arc::new(routing)).with_health(health.clone());
        if let Some(lease) = &leader {
            // Cancelling the generation's parent makes `lead` give the role up.
            core = core.with_leader(lease.clone(), lost.clone());
        }
        let wake = wake.clone();
        Ok::<_, crate::core::RoutingError>(async move { core.run(wake, stop).await })
    })
    .await
}

/// The outbox sender, its channels rebuilt on each reload.
async fn sender_task(shared: Shared) {
    let (store, wake) = (shared.store.clone(), shared.wake_sender.clone());
    supervise(shared, "sender", move |config, stop| {
        let quiet = quiet_hours(&config);
        let mut sender = crate::notify::Sender::new(store.clone(), config)?.wake_on(wake.clone());
        if let Some(quiet) = quiet {
            sender = sender.quiet_hours(quiet);
        }
        Ok::<_, crate::notify::sender::SenderError>(sender.run(stop))
    })
    .await
}

/// `alerts.quiet_hours`: alerts are held while its calendar is closed (they go into the next
/// digest). `always` or an unusable calendar means never quiet; the latter is logged.
fn quiet_hours(config: &Config) -> Option<crate::notify::sender::QuietHours> {
    let name = config.alerts.quiet_calendar.as_ref()?;
    let spec = config.sla.calendars.get(name)?;
    match crate::core::build_calendar(name, spec) {
        Ok(calendar) => Some(Arc::new(move |t| !calendar.is_open(t))),
        Err(e) => {
            tracing::error!(error = %e, calendar = %name, "quiet hours ignored: calendar not usable");
            None
        }
    }
}

/// Re-reads the config file: a valid one replaces the old, an invalid one is logged and ignored.
fn reload(path: &std::path::Path, tx: &watch::Sender<Arc<Config>>) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
    match config::load(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                tracing::warn!("{w}");
            }
            let old = tx.borrow().clone();
            if old.storage != loaded.config.storage
                || old.server.listen != loaded.config.server.listen
            {
                tracing::warn!(
                    "storage and server.listen changes take effect only after a restart"
                );
            }
            tx.send_replace(Arc::new(loaded.config));
            tracing::info!(config = %path.display(), "configuration reloaded");
        }
        Err(e) => {
            for p in &e.problems {
                tracing::error!("{p}");
            }
            tracing::error!(
                problems = e.problems.len(),
                "configuration reload refused; the previous configuration stays in force"
            );
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
}

/// The watchdog's condition: the store takes a durable write and no task is stuck.
async fn probe_health(shared: &Shared) -> Result<String, String> {
    let probe = tokio::time::timeout(
        Duration::from_secs(5),
        shared.store.write_probe(chrono::Utc::now()),
    )
    .await;
    match probe {
        Err(_) => return Err("store write probe timed out".into()),
        Ok(Err(e)) => return Err(format!("store write probe failed: {e}")),
        Ok(Ok(())) => {}
    }
    let stuck = shared.health.stuck(Instant::now());
    if !stuck.is_empty() {
        return Err(format!("tasks past their deadline: {}", stuck.join(", ")));
    }
    let config = shared.config.borrow().clone();
    let (healthy, total) = shared.health.count("source:");
    let sources = config.sources.len().max(total);
    let queue = shared.store.pending_count().await.unwrap_or(-1);
    Ok(format!(
        "queue={queue} sources={}/{sources} healthy",
        healthy + sources.saturating_sub(total)
    ))
}

/// Installs the Prometheus recorder once per process; `None` if another recorder exists.
fn install_metrics() -> Option<PrometheusHandle> {
    match PrometheusBuilder::new().install_recorder() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed");
            None
        }
    }
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
