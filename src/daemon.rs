//! `keyrotd run`: wires the inventory, state, engine, scheduler and HTTP endpoint together and
//! owns the single shutdown signal every task is given.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::alert::Alerter;
use crate::config::{Inventory, StateUrl};
use crate::engine::{Engine, EventSink};
use crate::http::{serve, Endpoint};
use crate::instrument::MeteredState;
use crate::metrics::Metrics;
use crate::scheduler::{Scheduler, Table};
use crate::state::{SqliteState, StateStore};

/// Opens the configured state backend.
pub fn open_state(inventory: &Inventory) -> anyhow::Result<Arc<dyn StateStore>> {
    match &inventory.daemon.state {
        StateUrl::Sqlite(path) => {
            Ok(Arc::new(SqliteState::open(path).with_context(|| {
                format!("opening state {}", path.display())
            })?))
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(inventory: Inventory) -> anyhow::Result<()> {
    let started = Instant::now();
    let shutdown = CancellationToken::new();
    let metrics = Metrics::new().context("registering metrics")?;
    let endpoint = Endpoint {
        metrics: metrics.clone(),
        table: Arc::new(OnceLock::new()),
        ready: Arc::new(AtomicBool::new(false)),
    };
    let http = serve(inventory.daemon.listen, endpoint.clone(), shutdown.clone()).await?;

    // The inventory was parsed and validated just before `run` was called.
    metrics.config.loaded();
    let state = MeteredState::wrap(open_state(&inventory)?, metrics.state.clone());
    let ids: Vec<String> = inventory.credentials.iter().map(|c| c.id.clone()).collect();
    state.ensure_credentials(&ids).await?;
    // Read before the records: a commit by another process after this point shows as a change.
    let data_version = state.external_version().await?;
    let records = state.credentials().await?;
    let open = state.open_rotations().await?;
    let table = Arc::new(Table::new(inventory.credentials, records, &open));
    release_freed_memory();
    // Alert delivery drains after the scheduler stops, so it gets its own token.
    let alerts_shutdown = CancellationToken::new();
    let (alerter, alert_task) = Alerter::start(
        &inventory.alerts,
        &metrics.registry,
        alerts_shutdown.clone(),
    )?;
    let events: Option<Arc<dyn EventSink>> = Some(Arc::new(alerter));
    let engine = Arc::new(Engine::new(
        state,
        metrics.engine.clone(),
        events.clone(),
        shutdown.clone(),
    ));
    let scheduler = Scheduler::new(
        table.clone(),
        engine,
        inventory.daemon.max_concurrent_rotations,
        events,
        inventory.alerts.warn_before,
        shutdown.clone(),
    );
    let (cron, rx, tx) = scheduler.start_cron().await?;
    let _ = endpoint.table.set(table.clone());
    endpoint.ready.store(true, Ordering::Release);
    info!(
        credentials = table.len(),
        open_rotations = open.len(),
        listen = %inventory.daemon.listen,
        ready_ms = started.elapsed().as_millis() as u64,
        "keyrotd ready"
    );
    tokio::spawn(signals(shutdown.clone()));
    scheduler.run(cron, rx, tx, data_version).await;
    shutdown.cancel();
    alerts_shutdown.cancel();
    let _ = alert_task.await;
    let _ = http.await;
    info!("keyrotd stopped");
    Ok(())
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

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop keyrotd with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    shutdown.cancel();
}
