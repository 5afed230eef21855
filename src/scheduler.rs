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
//! a fire time already acted on does not fire again ([`CronCursor`]).
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

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use keyrotd_plugin::{Rotator, Store};
use prometheus::IntCounter;
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::CredentialSpec;
use crate::engine::{backoff, Engine, EngineError, Outcome};
use crate::event::{Condition, EventSink};
use crate::fmt::human;
use crate::protocol::{Phase, Trigger};
use crate::schedule::{secs, CronCursor, CronSchedule, Due};
use crate::state::{CredentialRecord, RotationRecord, StateError, Status};

/// How long to wait before looking again at a credential another process is rotating.
const BUSY_RETRY: i64 = 60;
/// How often the scheduler asks the state store whether another process (`keyrotd rotate`)
/// committed anything. The question is one `PRAGMA data_version` (shared memory in WAL mode);
/// only a change costs a read of the credential records.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// The longest sleep: heap entries are wall-clock instants and tokio sleeps on the monotonic
/// clock, so the loop looks at the wall clock at least this often to notice a jump.
pub const MAX_SLEEP: Duration = Duration::from_secs(60);

/// What the daemon knows of one credential now; read by metrics and updated after each run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    pub status: Status,
    pub issued_at: Option<i64>,
    pub consecutive_failures: u32,
    /// The next heap wake-up (retry, revocation, interval), if any.
    pub wake: Option<i64>,
}

/// One inventory entry and its live view, as borrowed from the [`Table`].
#[derive(Clone, Copy)]
pub struct Slot<'a> {
    pub spec: &'a CredentialSpec,
    /// Index of its cron group, if it has a cron schedule.
    pub group: Option<usize>,
    pub live: &'a Mutex<Live>,
}

/// The inventory as the running daemon holds it. The specs stay in the vector the loader built
/// (copying 100,000 of them into another would double the start-up peak); the live views and
/// cron groups sit beside them, index for index.
pub struct Table {
    specs: Vec<CredentialSpec>,
    lives: Vec<Mutex<Live>>,
    group_of: Vec<Option<usize>>,
    /// Distinct cron schedules; each fires all its members.
    pub groups: Vec<CronGroup>,
}

/// Credentials sharing one cron schedule.
pub struct CronGroup {
    /// The schedule, parsed once (members share it).
    pub schedule: CronSchedule,
    pub members: Vec<usize>,
}

impl Table {
    /// Builds the table from the inventory and the stored state.
    pub fn new(
        specs: Vec<CredentialSpec>,
        records: Vec<CredentialRecord>,
        open: &[RotationRecord],
    ) -> Self {
        let mut records: HashMap<String, CredentialRecord> =
            records.into_iter().map(|r| (r.id.clone(), r)).collect();
        let open: HashMap<&str, &RotationRecord> =
            open.iter().map(|r| (r.credential_id.as_str(), r)).collect();
        let mut groups: Vec<CronGroup> = Vec::new();
        let mut group_index: HashMap<(String, chrono_tz::Tz), usize> = HashMap::new();
        let now = Utc::now().timestamp();
        let mut lives = Vec::with_capacity(specs.len());
        let mut group_of = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            group_of.push(spec.schedule.cron.as_ref().map(|c| {
                let g = *group_index
                    .entry((c.expression.clone(), c.timezone))
                    .or_insert_with(|| {
                        groups.push(CronGroup {
                            schedule: c.clone(),
                            members: Vec::new(),
                        });
                        groups.len() - 1
                    });
                groups[g].members.push(i);
                g
            }));
            let record = records
                .remove(&spec.id)
                .unwrap_or_else(|| CredentialRecord::new(&spec.id));
            let live = live_view(spec, &record, open.get(spec.id.as_str()).copied(), now);
            lives.push(Mutex::new(live));
        }
        Self {
            specs,
            lives,
            group_of,
            groups,
        }
    }

    /// How many credentials.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// Whether the inventory is empty.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Credential `i`.
    pub fn slot(&self, i: usize) -> Slot<'_> {
        Slot {
            spec: &self.specs[i],
            group: self.group_of[i],
            live: &self.lives[i],
        }
    }

    /// Every credential, in inventory order.
    pub fn slots(&self) -> impl Iterator<Item = Slot<'_>> {
        (0..self.len()).map(|i| self.slot(i))
    }
}

/// The live view of a credential, with its next heap wake-up.
pub fn live_view(
    spec: &CredentialSpec,
    record: &CredentialRecord,
    open: Option<&RotationRecord>,
    now: i64,
) -> Live {
    let wake = match (record.status, open) {
        (Status::Failed, _) => None,
        (_, Some(r)) if r.phase == Phase::Promoted => match (record.next_attempt_at, r.revoke_at) {
            (Some(retry), Some(revoke)) => Some(retry.max(revoke)),
            (retry, revoke) => retry.or(revoke).or(Some(now)),
        },
        // An unfinished rotation (a crash or shutdown interrupted it) resumes now, or at its retry.
        (_, Some(_)) => Some(record.next_attempt_at.unwrap_or(now)),
        (Status::Retrying, None) => record.next_attempt_at.or(Some(now)),
        (_, None) => {
            let last = record
                .issued_at
                .and_then(|t| Utc.timestamp_opt(t, 0).single());
            match spec.schedule.due(
                last,
                Utc.timestamp_opt(now, 0).single().unwrap_or_else(Utc::now),
            ) {
                Due::At(t) => Some(t.timestamp()),
                Due::NextCronFire => None,
            }
        }
    };
    Live {
        status: record.status,
        issued_at: record.issued_at,
        consecutive_failures: record.consecutive_failures,
        wake,
    }
}

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
    pub metrics: SchedulerMetrics,
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
}

/// Raises and clears the age conditions (near max age, stale) at their deadlines.
struct AgeWatch {
    events: Option<Arc<dyn EventSink>>,
    warn_before: i64,
    /// Per credential: what is raised now (bit 0 near max age, bit 1 stale).
    raised: Vec<u8>,
}

const NEAR: u8 = 1;
const STALE: u8 = 2;

impl AgeWatch {
    /// Brings slot `i`'s age conditions up to date; returns the next deadline worth waking for.
    fn check(&mut self, i: usize, slot: Slot<'_>, now: i64) -> Option<i64> {
        let events = self.events.as_ref()?;
        let issued = lock(slot.live).issued_at?;
        let max_age = secs(slot.spec.max_age);
        let stale_at = issued.saturating_add(max_age);
        // Warn only once a rotation is overdue: a `warn_before` longer than the slack between
        // the schedule and max_age would warn about every healthy credential.
        let slack = max_age.saturating_sub(secs(slot.spec.period).min(max_age));
        let near_at = stale_at.saturating_sub(self.warn_before.min(slack));
        let want = if now >= stale_at {
            STALE
        } else if now >= near_at {
            NEAR
        } else {
            0
        };
        let had = self.raised[i];
        let id = &slot.spec.id;
        for (bit, condition) in [(NEAR, Condition::NearMaxAge), (STALE, Condition::Stale)] {
            match (had & bit != 0, want & bit != 0) {
                (false, true) => {
                    let summary = if bit == STALE {
                        format!(
                            "credential `{id}` is past its max age of {}",
                            human(slot.spec.max_age)
                        )
                    } else {
                        format!(
                            "credential `{id}` reaches its max age at {}",
                            crate::fmt::time(Some(stale_at))
                        )
                    };
                    events.raise(id, condition, &summary);
                }
                (true, false) => events.clear(id, condition),
                _ => {}
            }
        }
        self.raised[i] = want;
        [near_at, stale_at].into_iter().find(|t| *t > now)
    }
}

/// A queued run: which slot, why, and for cron runs the fire time its window counts from.
type Queued = (usize, Trigger, Option<DateTime<Utc>>);

/// What an engine run returns, with the slot it ran for.
type RunResult = (usize, Result<(Outcome, CredentialRecord), String>);

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
        let n = self.table.len();
        let mut age_heap: BinaryHeap<Reverse<(i64, usize)>> = BinaryHeap::new();
        let started = Utc::now();
        let now = started.timestamp();
        for (i, slot) in self.table.slots().enumerate() {
            if let Some(at) = self.ages.check(i, slot, now) {
                age_heap.push(Reverse((at, i)));
            }
        }
        let mut heap: BinaryHeap<Reverse<(i64, usize, u64)>> = BinaryHeap::with_capacity(n);
        let mut generation = vec![0u64; n];
        let mut busy = vec![false; n];
        let mut ready: VecDeque<Queued> = VecDeque::new();
        let mut runs: JoinSet<RunResult> = JoinSet::new();
        // Which slot each task runs: a panicked task returns no value, only its id.
        let mut run_slot: HashMap<tokio::task::Id, usize> = HashMap::new();
        for (i, slot) in self.table.slots().enumerate() {
            if let Some(at) = lock(slot.live).wake {
                heap.push(Reverse((at, i, 0)));
            }
        }
        let mut crons: Vec<CronCursor> = self
            .table
            .groups
            .iter()
            .map(|g| CronCursor::new(g.schedule.clone(), started))
            .collect();
        let mut cron_heap: BinaryHeap<Reverse<(i64, usize)>> = crons
            .iter()
            .enumerate()
            .filter_map(|(g, c)| Some(Reverse((c.next()?.timestamp(), g))))
            .collect();
        info!(
            credentials = n,
            cron_groups = self.table.groups.len(),
            queued = heap.len(),
            "scheduler running"
        );
        let mut watch =
            tokio::time::interval_at(tokio::time::Instant::now() + WATCH_EVERY, WATCH_EVERY);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen_version = self.data_version;

        loop {
            while runs.len() < self.max_concurrent {
                let Some((i, trigger, fire)) = ready.pop_front() else {
                    break;
                };
                let spec = self.table.slot(i).spec;
                if let Some(fire) = fire.filter(|f| !spec.schedule.in_window(*f, Utc::now())) {
                    info!(credential = %spec.id, fire = %fire, "rotation window missed; waiting for the next fire time");
                    busy[i] = false;
                    continue;
                }
                lock(self.table.slot(i).live).status = Status::Rotating;
                let task = runs.spawn(self.engine_run(i, trigger));
                run_slot.insert(task.id(), i);
            }
            if self.shutdown.is_cancelled() && runs.is_empty() {
                break;
            }
            let next = [
                heap.peek().map(|Reverse((at, _, _))| *at),
                age_heap.peek().map(|Reverse((at, _))| *at),
                cron_heap.peek().map(|Reverse((at, _))| *at),
            ]
            .into_iter()
            .flatten()
            .min();
            let sleep = until(next, Utc::now().timestamp_millis());
            tokio::select! {
                _ = self.shutdown.cancelled(), if !self.shutdown.is_cancelled() => {
                    info!(running = runs.len(), "shutdown: letting in-flight rotations finish or park");
                    for (i, _, _) in ready.drain(..) {
                        busy[i] = false;
                    }
                }
                Some(joined) = runs.join_next_with_id() => {
                    let (i, wake) = match joined {
                        Ok((id, (i, result))) => {
                            run_slot.remove(&id);
                            (i, self.finished(i, result))
                        }
                        Err(e) => {
                            let Some(i) = run_slot.remove(&e.id()) else { continue };
                            (i, self.panicked(i, e))
                        }
                    };
                    busy[i] = false;
                    generation[i] += 1;
                    if let Some(at) = wake {
                        heap.push(Reverse((at, i, generation[i])));
                    }
                    if let Some(at) = self.ages.check(i, self.table.slot(i), Utc::now().timestamp()) {
                        age_heap.push(Reverse((at, i)));
                    }
                }
                _ = tokio::time::sleep(sleep), if !self.shutdown.is_cancelled() => {
                    let wall = Utc::now();
                    let now = wall.timestamp();
                    while let Some(Reverse((at, i))) = age_heap.peek().copied() {
                        if at > now { break; }
                        age_heap.pop();
                        if let Some(next) = self.ages.check(i, self.table.slot(i), now) {
                            age_heap.push(Reverse((next, i)));
                        }
                    }
                    while let Some(Reverse((at, i, g))) = heap.peek().copied() {
                        if at > now { break; }
                        heap.pop();
                        if g != generation[i] || busy[i] { continue; }
                        busy[i] = true;
                        let trigger = if lock(self.table.slot(i).live).status == Status::Retrying { Trigger::Retry } else { Trigger::Schedule };
                        ready.push_back((i, trigger, None));
                    }
                    while let Some(Reverse((at, g))) = cron_heap.peek().copied() {
                        if at > now { break; }
                        cron_heap.pop();
                        if let Some(fire) = crons[g].poll(wall) {
                            debug!(group = g, fire = %fire, "cron fired");
                            for &i in &self.table.groups[g].members {
                                let live = *lock(self.table.slot(i).live);
                                // A retrying credential waits for its backoff (a heap entry), not the cron.
                                if !busy[i] && !matches!(live.status, Status::Failed | Status::Retrying) {
                                    busy[i] = true;
                                    ready.push_back((i, Trigger::Schedule, Some(fire)));
                                }
                            }
                        }
                        if let Some(next) = crons[g].next() {
                            cron_heap.push(Reverse((next.timestamp(), g)));
                        }
                    }
                }
                _ = watch.tick(), if !self.shutdown.is_cancelled() => {
                    let version = match self.engine.state().external_version().await {
                        Ok(v) => v,
                        Err(e) => { warn!(error = %e, "asking the state store for changes failed"); continue; }
                    };
                    if seen_version == version { continue; }
                    match self.refresh(&busy).await {
                        Ok(changed) => {
                            seen_version = version;
                            let now = Utc::now().timestamp();
                            for (i, wake) in changed {
                                generation[i] += 1;
                                if let Some(at) = wake {
                                    heap.push(Reverse((at, i, generation[i])));
                                }
                                if let Some(at) = self.ages.check(i, self.table.slot(i), now) {
                                    age_heap.push(Reverse((at, i)));
                                }
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
            (i, result.map_err(|e: EngineError| e.to_string()))
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
        let delay = backoff(retry.backoff, retry.max_backoff, live.consecutive_failures);
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
    fn finished(
        &mut self,
        i: usize,
        result: Result<(Outcome, CredentialRecord), String>,
    ) -> Option<i64> {
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
        let open_wake = match &outcome {
            Outcome::Promoted { revoke_at, .. } | Outcome::InGrace { revoke_at, .. } => {
                Some(Some(*revoke_at))
            }
            Outcome::Busy { .. } => Some(Some(now + BUSY_RETRY)),
            Outcome::Parked { .. } | Outcome::Stopped => Some(None),
            Outcome::Completed { .. } | Outcome::Failed { .. } => None,
        };
        if self.panicked[i]
            && matches!(
                outcome,
                Outcome::Promoted { .. } | Outcome::Completed { .. } | Outcome::InGrace { .. }
            )
        {
            self.panicked[i] = false;
            if let Some(events) = &self.ages.events {
                events.clear(&slot.spec.id, Condition::RotationFailed);
            }
        }
        let mut live = live_view(slot.spec, &record, None, now);
        if let Some(wake) = open_wake {
            live.wake = wake;
        }
        if let Outcome::Failed { .. } = outcome {
            // A failure at or after promotion leaves the rotation open: retry it when due.
            live.wake = record.next_attempt_at;
        }
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

/// Locks a live view; a poisoned lock still holds plain data that is safe to read.
pub fn lock(m: &Mutex<Live>) -> std::sync::MutexGuard<'_, Live> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
