//! `keyrotd run`: wires the inventory, state, engine, scheduler and HTTP endpoint together and
//! owns the single shutdown signal every task is given.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::alert::{Alerter, AlertsConfig};
use crate::audit::Trail;
use crate::config::{Inventory, MetricsMode};
use crate::engine::Engine;
use crate::event::{Condition, EventSink};
use crate::http::{serve, Endpoint};
use crate::instrument::MeteredState;
use crate::metrics::Metrics;
use crate::scheduler::{Heartbeat, Scheduler, Settings, Table};
use crate::state::{check_removed, open_state_as, Actor, StateStore};
use crate::systemd::Notifier;

/// Runs the daemon until SIGTERM or SIGINT; SIGHUP reloads the inventory. Under systemd
/// (`Type=notify`) it reports readiness, reloads, shutdown and its status, and the scheduling loop
/// feeds the watchdog (see [`crate::systemd`]).
///
/// Each loaded inventory is a *generation* with its own token, a child of the shutdown token. A
/// reload that validates cancels the generation: in-flight rotations park at their next step
/// boundary, and the next generation resumes them at once. A reload that fails validation
/// changes nothing. `listen` and `state` are read at start only.
///
/// Neither SIGTERM nor SIGHUP waits for a provider that never answers: steps still in flight
/// `daemon.shutdown_timeout` after the generation is cancelled are interrupted, journaled as
/// such, and their rotations parked, to resume from the journal (every step is idempotent).
pub async fn run(inventory: Inventory) -> anyhow::Result<()> {
    let started = Instant::now();
    // What loading freed (each section's parse) goes back before the state is read.
    release_freed_memory();
    let shutdown = CancellationToken::new();
    let notifier = Notifier::start(&shutdown);
    let metrics = Metrics::new().context("registering metrics")?;
    let endpoint = Endpoint {
        metrics: metrics.clone(),
        table: Arc::new(RwLock::new(None)),
        ready: Arc::new(AtomicBool::new(false)),
        compact: Arc::new(AtomicBool::new(false)),
    };
    let http = serve(inventory.daemon.listen, endpoint.clone(), shutdown.clone()).await?;
    // The inventory was parsed and validated just before `run` was called.
    metrics.config.loaded();
    let state = open_state_as(&inventory, &Actor::daemon())?;
    let state = MeteredState::wrap(state, metrics.state.clone());
    check_removed(&inventory.credentials, &state.open_rotations().await?)?;
    // Stopped after the last generation, so the audit log gets the rows written while parking.
    let audit_stop = CancellationToken::new();
    let audit = Trail::open(&inventory.daemon, state.clone())
        .await?
        .start(audit_stop.clone());
    let reload = Arc::new(Notify::new());
    tokio::spawn(signals(shutdown.clone(), reload.clone()));

    let alerts_shutdown = CancellationToken::new();
    let mut alerts = start_alerts(&inventory.alerts, &metrics, &alerts_shutdown)?;
    let mut inventory = inventory;
    loop {
        let generation = shutdown.child_token();
        let abort = abort_after(&generation, inventory.daemon.shutdown_timeout);
        let scheduler = schedule(
            &mut inventory,
            &state,
            &metrics,
            &alerts.1,
            generation.clone(),
            abort.clone(),
            notifier.heartbeat(),
        )
        .await?;
        let table = scheduler.table();
        let compact = inventory.daemon.metrics == MetricsMode::Compact;
        endpoint.compact.store(compact, Ordering::Release);
        *endpoint.table.write().unwrap_or_else(|p| p.into_inner()) = Some(table.clone());
        endpoint.ready.store(true, Ordering::Release);
        notifier.ready(&table);
        info!(
            credentials = table.len(),
            listen = %inventory.daemon.listen,
            ready_ms = started.elapsed().as_millis() as u64,
            "keyrotd ready"
        );
        let next = async {
            tokio::select! {
                next = reloaded(&inventory, &metrics, &reload, &notifier) => {
                    generation.cancel();
                    Some(next)
                }
                _ = shutdown.cancelled() => {
                    notifier.stopping();
                    None
                }
            }
        };
        let stopped = async {
            tokio::select! {
                () = scheduler.run() => true,
                // Interrupted steps park at once; a run still busy long after is stuck outside
                // any step (a plugin blocking its thread, a wedged state store).
                () = async { abort.cancelled().await; tokio::time::sleep(STRAGGLER_GRACE).await } => false,
            }
        };
        let (stopped, next) = tokio::join!(stopped, next);
        if !stopped {
            error!(
                grace_secs = STRAGGLER_GRACE.as_secs(),
                "rotations still running after the shutdown deadline; their rotations resume from the journal at the next start"
            );
            if next.is_some() {
                // The next generation would resume rotations a stuck task may still drive.
                anyhow::bail!("cannot reload: rotations of the previous inventory are stuck");
            }
        }
        let Some(next) = next else { break };
        // Checked once the generation has stopped, so no rotation can open in between.
        if let Err(removed) = check_removed(&next.credentials, &state.open_rotations().await?) {
            for problem in &removed.0 {
                error!(error = %problem, "reload refused; keeping the running inventory");
            }
            metrics.config.reloaded(false);
            // The running specs moved into the table; a refused reload is rare enough to copy.
            inventory.credentials = table.slots().map(|s| s.spec.clone()).collect();
            continue;
        }
        if next.alerts != inventory.alerts {
            // New channels or routes: a fresh alerter (active alerts are raised again).
            alerts.0.cancel();
            let _ = alerts.2.await;
            alerts = start_alerts(&next.alerts, &metrics, &alerts_shutdown)?;
        }
        info!(credentials = next.credentials.len(), "inventory reloaded");
        inventory = next;
        metrics.config.reloaded(true);
    }
    alerts.0.cancel();
    let _ = alerts.2.await;
    audit_stop.cancel();
    let _ = audit.await;
    let _ = http.await;
    info!("keyrotd stopped");
    Ok(())
}

/// How long past the shutdown deadline the daemon still waits for rotation tasks to return.
const STRAGGLER_GRACE: Duration = Duration::from_secs(5);

/// A token cancelled `deadline` after `stop` is: steps in flight get that long to finish before
/// they are interrupted.
fn abort_after(stop: &CancellationToken, deadline: Duration) -> CancellationToken {
    let abort = CancellationToken::new();
    let (stop, fire) = (stop.clone(), abort.clone());
    tokio::spawn(async move {
        stop.cancelled().await;
        tokio::time::sleep(deadline).await;
        fire.cancel();
    });
    abort
}

/// A running alerter: its own stop token (a child of `parent`), the sink, its task.
type Alerts = (CancellationToken, Arc<dyn EventSink>, JoinHandle<()>);

fn start_alerts(
    config: &AlertsConfig,
    metrics: &Metrics,
    parent: &CancellationToken,
) -> anyhow::Result<Alerts> {
    // Delivery drains after the scheduler stops, so it does not share the shutdown token.
    let token = parent.child_token();
    let (alerter, task) = Alerter::start(config, &metrics.registry, token.clone())?;
    Ok((token, Arc::new(alerter), task))
}

/// Builds the scheduler for one generation from the inventory and the stored state. The
/// credentials move into the scheduler's table (100,000 specs are not worth a copy).
async fn schedule(
    inventory: &mut Inventory,
    state: &Arc<dyn StateStore>,
    metrics: &Metrics,
    events: &Arc<dyn EventSink>,
    generation: CancellationToken,
    abort: CancellationToken,
    heartbeat: Option<Heartbeat>,
) -> anyhow::Result<Scheduler> {
    let ids: Vec<String> = inventory.credentials.iter().map(|c| c.id.clone()).collect();
    state.ensure_credentials(&ids).await?;
    drop(ids);
    // Read before the records: a commit by another process after this point shows as a change.
    let data_version = state.external_version().await?;
    let records = state.credentials().await?;
    // Credentials whose state an earlier run (maybe `keyrotd rotate`) found lost or foreign are
    // not run again (their status is failed) but stay flagged and alerted until adopted.
    for lost in records.iter().filter(|r| r.state_lost.is_some()) {
        let Some(spec) = inventory.credentials.iter().find(|c| c.id == lost.id) else {
            continue;
        };
        let location = spec.store.build().map(|s| s.location()).unwrap_or_default();
        let rotation = lost.state_lost.as_deref().unwrap_or_default();
        error!(credential = %lost.id, store = %location, rotation, "state lost or foreign: the store names a rotation the state database does not know; automation stays stopped until `keyrotd adopt`");
        metrics
            .engine
            .state_mismatch
            .with_label_values(&[&lost.id])
            .set(1);
        if let Some(why) = &lost.last_error {
            events.raise(&lost.id, Condition::StateLost, why);
        }
    }
    let open = state.open_rotations().await?;
    let specs = std::mem::take(&mut inventory.credentials);
    let table = Arc::new(Table::new(specs, records, &open));
    release_freed_memory();
    let events = Some(events.clone());
    let engine = Arc::new(
        Engine::new(
            state.clone(),
            metrics.engine.clone(),
            events.clone(),
            generation.clone(),
        )
        .abort_steps_on(abort),
    );
    let settings = Settings {
        max_concurrent: inventory.daemon.max_concurrent_rotations,
        events,
        warn_before: inventory.alerts.warn_before,
        data_version,
        metrics: metrics.scheduler.clone(),
        heartbeat,
    };
    Ok(Scheduler::new(table, engine, settings, generation))
}

/// Waits for SIGHUP and a valid inventory at the same path; invalid ones are logged, counted and
/// ignored (systemd hears `RELOADING=1`, then `READY=1` again for the running inventory).
async fn reloaded(
    current: &Inventory,
    metrics: &Metrics,
    reload: &Notify,
    notifier: &Notifier,
) -> Inventory {
    loop {
        reload.notified().await;
        notifier.reloading();
        let path = current.path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let inventory = crate::config::load(&path)?;
            crate::config::check_references(&inventory)?;
            Ok::<_, crate::config::ConfigErrors>(inventory)
        })
        .await;
        match loaded {
            Ok(Ok(next))
                if next.daemon.listen != current.daemon.listen
                    || next.daemon.state != current.daemon.state
                    || next.vault != current.vault =>
            {
                // The `[vault]` connection is process-wide (`vault:` references are read
                // through it), and the new inventory's references were checked through the
                // running one.
                warn!("reload refused: `listen`, `state` and `[vault]` only change with a restart");
                metrics.config.reloaded(false);
                notifier.reload_refused();
            }
            Ok(Ok(next)) => return next,
            Ok(Err(errors)) => {
                for e in &errors.0 {
                    error!(error = %e, "reload refused: the inventory is invalid; keeping the running one");
                }
                metrics.config.reloaded(false);
                notifier.reload_refused();
            }
            Err(e) => {
                error!(error = %e, "reload failed");
                metrics.config.reloaded(false);
                notifier.reload_refused();
            }
        }
    }
}

/// Hands the heap pages freed after loading back to the OS. glibc keeps freed pages resident
/// when live allocations are scattered among them (only the top of the heap is trimmed on its
/// own); `malloc_trim` also releases whole free pages inside the heap. Called once at start-up;
/// a no-op outside glibc.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim only returns free memory to the OS; it has no preconditions.
        unsafe { malloc_trim(0) };
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT; notifies `reload` on each SIGHUP.
async fn signals(shutdown: CancellationToken, reload: Arc<Notify>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop keyrotd with SIGKILL");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM received"); break; }
            _ = int.recv() => { info!("SIGINT received"); break; }
            _ = hup.recv() => { info!("SIGHUP received: reloading the inventory"); reload.notify_one(); }
        }
    }
    shutdown.cancel();
}
