//! The *when*: decides which credential needs the engine next and runs it, within the global
//! concurrency limit.
//!
//! Everything waits in due-time heaps, none of which scans the inventory: one per credential
//! for intervals, overdue rotations, retries and revocations after grace; one entry per distinct
//! cron schedule (expression and timezone), not per credential, whose fire enqueues every
//! credential of its group; and the age alerts' deadlines. The loop sleeps until the earliest
//! entry. The heaps belong to the loop alone: an entry added by a finished run is seen at once,
//! because the loop itself adds it before it sleeps again.
//!
//! Cron fire times come from [`crate::schedule`], the one place that computes them (crontab
//! day rules, the zone's rules for every fire). Heap entries are wall-clock instants, but
//! sleeping is on tokio's monotonic clock, so a sleep lasts at most [`MAX_SLEEP`] and every
//! wake-up compares the heaps with the wall clock again: a clock jump is noticed within a
//! minute. After a jump forward past several fire times a group fires once; after a jump back,
//! a fire time already acted on does not fire again ([`CronCursor`](crate::schedule::CronCursor)).
//!
//! Besides, every 2 s it asks the state store one cheap question (SQLite's `data_version`): has
//! another process (`keyrotd rotate`) committed? Only a change costs a re-read of the records.
//!
//! Engine runs are tasks in a [`JoinSet`]: a run that panics is logged, counted, alerted, and
//! its credential released and retried with backoff, rather than left busy forever (which also
//! held shutdown, waiting for it).
//!
//! Invariants: a credential is queued or running at most once in this process (the state store
//! stops other processes); at most `max_concurrent_rotations` engine runs are in flight; a rotation
//! triggered by a cron fire starts inside the schedule's window or waits for the next fire.
//!
//! Files: `table` (the inventory and each credential's live view), `queue` (the loop's state:
//! heaps, generations, busy and running, cron cursors; every method takes `now`, so it is tested
//! on a fake clock), `age` (the age conditions), and here the async loop that ties them to engine
//! tasks, sleeping and the state store.

mod age;
mod queue;
mod table;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use keyrotd_plugin::{Rotator, Store};
use prometheus::IntCounter;
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::CredentialSpec;
use crate::engine::{Engine, EngineError, Outcome};
use crate::event::{Condition, EventSink};
use crate::fmt::human;
use crate::protocol::Trigger;
use crate::schedule::secs;
use crate::state::{CredentialRecord, RotationRecord, StateError, Status};

use age::AgeWatch;
use queue::Queue;
use table::{live_after_run, BUSY_RETRY};
pub use table::{live_view, lock, CronGroup, Live, Slot, Table};

/// How often the scheduler asks the state store whether another process (`keyrotd rotate`)
/// committed anything. The question is one `PRAGMA data_version` (shared memory in WAL mode);
/// only a change costs a read of the credential records.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// The longest sleep: heap entries are wall-clock instants and tokio sleeps on the monotonic
/// clock, so the loop looks at the wall clock at least this often to notice a jump.
pub const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Builds a credential's rotator and store for an engine run. The daemon builds them from the
/// inventory; tests hand in their own plugins (one that panics, for instance).
pub type Plugins = Arc<dyn Fn(&CredentialSpec) -> (Arc<dyn Rotator>, Arc<dyn Store>) + Send + Sync>;

/// The scheduler's own metrics, owned by the daemon's registry.
#[derive(Clone)]
pub struct SchedulerMetrics {
    /// Engine runs that panicked.
    pub panics: IntCounter,
}

impl SchedulerMetrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let panics = IntCounter::new(
            "keyrotd_rotation_panics_total",
            "Rotation tasks that panicked (a bug); each credential is released and retried.",
        )?;
        registry.register(Box::new(panics.clone()))?;
        Ok(Self { panics })
    }
}

/// What a [`Scheduler`] needs besides its table and engine.
pub struct Settings {
    /// How many engine runs may be in flight.
    pub max_concurrent: usize,
    /// Where age conditions and panics are reported.
    pub events: Option<Arc<dyn EventSink>>,
    /// How long before `max_age` the near-max-age condition is raised.
    pub warn_before: Duration,
    /// The state store's change counter, read before the table was built.
    pub data_version: i64,
    /// Where panics are counted.
    pub metrics: SchedulerMetrics,
    /// Given by the loop itself while it turns (the daemon's systemd watchdog), if any.
    pub heartbeat: Option<Heartbeat>,
}

/// A beat the scheduling loop gives every `every` from inside its own `select!`, so a loop
/// stuck on an await (a wedged state store) stops beating. The daemon feeds it to systemd's
/// watchdog.
#[derive(Clone)]
pub struct Heartbeat {
    /// How often the loop beats.
    pub every: Duration,
    /// Called on each beat, on the loop itself: it must return at once (one datagram, say).
    pub beat: Arc<dyn Fn() + Send + Sync>,
}

/// Runs the schedule until `shutdown`.
pub struct Scheduler {
    table: Arc<Table>,
    engine: Arc<Engine>,
    max_concurrent: usize,
    shutdown: CancellationToken,
    ages: AgeWatch,
    /// The state store's change counter, read before the table was built.
    data_version: i64,
    metrics: SchedulerMetrics,
    plugins: Option<Plugins>,
    /// Per credential: whether its last run panicked (a failure alert to clear once it succeeds).
    panicked: Vec<bool>,
    heartbeat: Option<Heartbeat>,
}

/// What an engine run returns.
type RunResult = Result<(Outcome, CredentialRecord), String>;

/// The engine runs in flight, as tasks, with the slot each one runs for.
struct Runs {
    tasks: JoinSet<RunResult>,
    /// A panicked task returns no value, only its id.
    slot_of: HashMap<tokio::task::Id, usize>,
}

impl Runs {
    fn spawn(
        &mut self,
        i: usize,
        run: impl std::future::Future<Output = RunResult> + Send + 'static,
    ) {
        let task = self.tasks.spawn(run);
        self.slot_of.insert(task.id(), i);
    }

    fn len(&self) -> usize {
        self.tasks.len()
    }

    fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// The next run to end, with its slot: its result, or how it panicked. `None` when nothing
    /// runs. Cancel-safe, as [`JoinSet::join_next_with_id`].
    async fn join_next(&mut self) -> Option<(usize, Result<RunResult, JoinError>)> {
        loop {
            match self.tasks.join_next_with_id().await? {
                Ok((id, result)) => {
                    if let Some(i) = self.slot_of.remove(&id) {
                        return Some((i, Ok(result)));
                    }
                }
                Err(e) => {
                    if let Some(i) = self.slot_of.remove(&e.id()) {
                        return Some((i, Err(e)));
                    }
                }
            }
        }
    }
}

impl Scheduler {
    /// Creates a scheduler over `table`.
    pub fn new(
        table: Arc<Table>,
        engine: Arc<Engine>,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> Self {
        let ages = AgeWatch {
            events: settings.events,
            warn_before: secs(settings.warn_before),
            raised: vec![0; table.len()],
        };
        Self {
            panicked: vec![false; table.len()],
            table,
            engine,
            max_concurrent: settings.max_concurrent,
            shutdown,
            ages,
            data_version: settings.data_version,
            metrics: settings.metrics,
            plugins: None,
            heartbeat: settings.heartbeat,
        }
    }

    /// Runs the engine with these plugins instead of building them from each credential's
    /// configuration.
    pub fn with_plugins(mut self, plugins: Plugins) -> Self {
        self.plugins = Some(plugins);
        self
    }

    /// The table this scheduler works on.
    pub fn table(&self) -> Arc<Table> {
        self.table.clone()
    }

    /// The scheduling loop. Returns after shutdown once every in-flight run has finished,
    /// parked its rotation, or panicked.
    pub async fn run(mut self) {
        let started = Utc::now();
        let mut queue = Queue::new(&self.table, self.max_concurrent, started);
        let now = started.timestamp();
        for (i, slot) in self.table.slots().enumerate() {
            queue.watch_age(i, self.ages.check(i, slot, now));
        }
        let mut runs = Runs {
            tasks: JoinSet::new(),
            slot_of: HashMap::new(),
        };
        info!(
            credentials = self.table.len(),
            cron_groups = self.table.groups.len(),
            queued = queue.pending(),
            "scheduler running"
        );
        let mut watch =
            tokio::time::interval_at(tokio::time::Instant::now() + WATCH_EVERY, WATCH_EVERY);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen_version = self.data_version;
        // Without a heartbeat the timer never fires (its branch is disabled), so one type serves.
        let heartbeat = self.heartbeat.take();
        let mut beats = tokio::time::interval(heartbeat.as_ref().map_or(MAX_SLEEP, |h| h.every));
        beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            while let Some((i, trigger)) = queue.next_run(&self.table, Utc::now()) {
                lock(self.table.slot(i).live).status = Status::Rotating;
                runs.spawn(i, self.engine_run(i, trigger));
            }
            if self.shutdown.is_cancelled() && runs.is_empty() {
                break;
            }
            let sleep = until(queue.next_wake(), Utc::now().timestamp_millis());
            tokio::select! {
                _ = self.shutdown.cancelled(), if !self.shutdown.is_cancelled() => {
                    info!(running = runs.len(), "shutdown: letting in-flight rotations finish or park");
                    queue.drop_queued();
                }
                Some((i, joined)) = runs.join_next() => {
                    let wake = match joined {
                        Ok(result) => self.finished(i, result),
                        Err(e) => self.panicked(i, e),
                    };
                    queue.finished(i, wake);
                    queue.watch_age(i, self.ages.check(i, self.table.slot(i), Utc::now().timestamp()));
                }
                _ = tokio::time::sleep(sleep), if !self.shutdown.is_cancelled() => {
                    let wall = Utc::now();
                    let now = wall.timestamp();
                    for i in queue.due_ages(now) {
                        queue.watch_age(i, self.ages.check(i, self.table.slot(i), now));
                    }
                    queue.enqueue_due(&self.table, wall);
                }
                // Also while shutting down: parking in-flight runs can take a while.
                _ = beats.tick(), if heartbeat.is_some() => {
                    if let Some(h) = &heartbeat { (h.beat)(); }
                }
                _ = watch.tick(), if !self.shutdown.is_cancelled() => {
                    let version = match self.engine.state().external_version().await {
                        Ok(v) => v,
                        Err(e) => { warn!(error = %e, "asking the state store for changes failed"); continue; }
                    };
                    if seen_version == version { continue; }
                    match self.refresh(queue.busy()).await {
                        Ok(changed) => {
                            seen_version = version;
                            let now = Utc::now().timestamp();
                            for (i, wake) in changed {
                                queue.reschedule(i, wake);
                                queue.watch_age(i, self.ages.check(i, self.table.slot(i), now));
                            }
                        }
                        Err(e) => warn!(error = %e, "re-reading credential records failed"),
                    }
                }
            }
        }
        info!("scheduler stopped");
    }

    /// The engine run for slot `i`, as a task of its own.
    fn engine_run(
        &self,
        i: usize,
        trigger: Trigger,
    ) -> impl std::future::Future<Output = RunResult> + Send + 'static {
        let (engine, table, plugins) = (
            self.engine.clone(),
            self.table.clone(),
            self.plugins.clone(),
        );
        async move {
            let spec = table.slot(i).spec;
            let result = match plugins {
                Some(build) => {
                    let (rotator, store) = build(spec);
                    engine.run_with(spec, rotator, store, trigger).await
                }
                None => engine.run(spec, trigger).await,
            };
            result.map_err(|e: EngineError| e.to_string())
        }
    }

    /// An engine run panicked (a bug in keyrotd or a plugin): reports it and schedules a retry
    /// with the credential's backoff. The rotation stays open in the state store under this
    /// process's lease, which the retry takes over at once, resuming from the journal.
    fn panicked(&mut self, i: usize, e: JoinError) -> Option<i64> {
        let slot = self.table.slot(i);
        let why = match e.try_into_panic() {
            Ok(payload) => payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into()),
            Err(e) => e.to_string(),
        };
        self.metrics.panics.inc();
        let mut live = lock(slot.live);
        live.status = Status::Retrying;
        live.consecutive_failures = live.consecutive_failures.saturating_add(1);
        let retry = slot.spec.retry;
        let delay = retry.delays().delay(live.consecutive_failures);
        live.wake = Some(Utc::now().timestamp().saturating_add(secs(delay).max(1)));
        error!(credential = %slot.spec.id, panic = %why, retry_in = %human(delay), "rotation task panicked; the credential is released and retried");
        if let Some(events) = &self.ages.events {
            events.raise(
                &slot.spec.id,
                Condition::RotationFailed,
                &format!(
                    "the rotation task panicked (a bug; the daemon log has the details); retrying in {}",
                    human(delay)
                ),
            );
        }
        self.panicked[i] = true;
        live.wake
    }

    /// Updates the live view after a run and returns the next heap wake-up.
    fn finished(&mut self, i: usize, result: RunResult) -> Option<i64> {
        let slot = self.table.slot(i);
        let now = Utc::now().timestamp();
        let (outcome, record) = match result {
            Ok(r) => r,
            Err(e) => {
                // The state store failed: nothing durable changed; try again after a pause.
                error!(credential = %slot.spec.id, error = %e, "rotation could not run");
                let mut live = lock(slot.live);
                live.status = Status::Retrying;
                live.wake = Some(now + BUSY_RETRY);
                return live.wake;
            }
        };
        if self.panicked[i]
            && matches!(
                outcome,
                Outcome::Promoted { .. }
                    | Outcome::Completed { .. }
                    | Outcome::InGrace { .. }
                    | Outcome::RevokeDelayed { .. }
            )
        {
            self.panicked[i] = false;
            if let Some(events) = &self.ages.events {
                events.clear(&slot.spec.id, Condition::RotationFailed);
            }
        }
        let live = live_after_run(slot.spec, &outcome, &record, now);
        *lock(slot.live) = live;
        live.wake
    }

    /// Another process changed the state database (`keyrotd rotate`, which also restarts a failed
    /// credential): re-reads the records and updates the live view of every idle slot whose
    /// record differs. Clears the failure alerts a successful manual rotation ended, since that
    /// process has no alerter. Returns the changed slots with their next heap wake-up.
    async fn refresh(&self, busy: &[bool]) -> Result<Vec<(usize, Option<i64>)>, StateError> {
        let state = self.engine.state();
        let records = state.credentials().await?;
        let open = state.open_rotations().await?;
        let open: HashMap<&str, &RotationRecord> =
            open.iter().map(|r| (r.credential_id.as_str(), r)).collect();
        let index: HashMap<&str, usize> = self
            .table
            .slots()
            .enumerate()
            .map(|(i, s)| (s.spec.id.as_str(), i))
            .collect();
        let now = Utc::now().timestamp();
        let mut changed = Vec::new();
        for record in &records {
            let Some(&i) = index.get(record.id.as_str()) else {
                continue;
            };
            if busy[i] {
                // Queued or running here: its run's result updates the view.
                continue;
            }
            let slot = self.table.slot(i);
            let old = *lock(slot.live);
            if (old.status, old.issued_at, old.consecutive_failures)
                == (record.status, record.issued_at, record.consecutive_failures)
            {
                continue;
            }
            let live = live_view(
                slot.spec,
                record,
                open.get(record.id.as_str()).copied(),
                now,
            );
            *lock(slot.live) = live;
            info!(credential = %record.id, status = record.status.as_str(), "credential changed by another process");
            if let Some(events) = &self.ages.events {
                let id = &slot.spec.id;
                if old.status == Status::Failed && record.status != Status::Failed {
                    events.clear(id, Condition::AutomationStopped);
                }
                // Clearing a condition that is not active sends nothing, so no need to know
                // whether a failure alert was raised before.
                if record.consecutive_failures == 0
                    && matches!(record.status, Status::Idle | Status::Grace)
                {
                    events.clear(id, Condition::RotationFailed);
                    events.clear(id, Condition::RevokeFailed);
                    events.clear(id, Condition::RevokeDelayed);
                }
            }
            changed.push((i, live.wake));
        }
        Ok(changed)
    }
}

/// How long to sleep, from the wall clock in milliseconds, until the wall-clock second `next`:
/// never longer than [`MAX_SLEEP`], and never negative.
fn until(next: Option<i64>, now_ms: i64) -> Duration {
    let ms = next.map_or(i64::MAX, |at| {
        at.saturating_mul(1000).saturating_sub(now_ms)
    });
    Duration::from_millis(u64::try_from(ms).unwrap_or(0)).min(MAX_SLEEP)
}
