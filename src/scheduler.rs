//! The *when*: decides which credential needs the engine next and runs it, within the global
//! concurrency limit.
//!
//! Two sources of wake-ups, neither of which scans the inventory:
//! - cron schedules go to tokio-cron-scheduler, one job per distinct (expression, timezone), not
//!   one per credential: a fire enqueues every credential of its group;
//! - everything else (intervals, overdue rotations, retries, revocations after grace) waits in a
//!   due-time heap; the loop sleeps until the earliest entry.
//!
//! Besides, every 2 s it asks the state store one cheap question (SQLite's `data_version`): has
//! another process (`keyrotd rotate`) committed? Only a change costs a re-read of the records.
//!
//! Invariants: a credential is queued or running at most once in this process (the state store
//! stops other processes); at most `max_concurrent_rotations` engine runs are in flight; a rotation
//! triggered by a cron fire starts inside the schedule's window or waits for the next fire.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use tokio::sync::mpsc;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::CredentialSpec;
use crate::engine::{Engine, Event, EventSink, Outcome, Trigger};
use crate::schedule::{CronSchedule, Due};
use crate::state::{CredentialRecord, Phase, RotationRecord, StateError, Status};

/// How long to wait before looking again at a credential another process is rotating.
const BUSY_RETRY: i64 = 60;
/// How often the scheduler asks the state store whether another process (`keyrotd rotate`)
/// committed anything. The question is one `PRAGMA data_version` (shared memory in WAL mode);
/// only a change costs a read of the credential records.
const WATCH_EVERY: Duration = Duration::from_secs(2);

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

/// What the scheduling loop hears about.
pub enum Msg {
    /// A cron group fired at this instant.
    CronFired(usize, DateTime<Utc>),
    /// An engine run finished.
    Done(usize, Result<(Outcome, CredentialRecord), String>),
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
        let max_age = slot.spec.max_age.as_secs() as i64;
        let stale_at = issued + max_age;
        // Warn only once a rotation is overdue: a `warn_before` longer than the slack between
        // the schedule and max_age would warn about every healthy credential.
        let slack = max_age - slot.spec.period.as_secs().min(max_age as u64) as i64;
        let near_at = stale_at - self.warn_before.min(slack);
        let want = if now >= stale_at {
            STALE
        } else if now >= near_at {
            NEAR
        } else {
            0
        };
        let had = self.raised[i];
        let id = &slot.spec.id;
        for (bit, event) in [
            (NEAR, Event::NearMaxAge as fn(bool) -> Event),
            (STALE, Event::Stale),
        ] {
            match (had & bit != 0, want & bit != 0) {
                (false, true) => {
                    let summary = if bit == STALE {
                        format!(
                            "credential `{id}` is past its max age of {}",
                            crate::config::human(slot.spec.max_age)
                        )
                    } else {
                        format!(
                            "credential `{id}` reaches its max age at {}",
                            crate::cli::time(Some(stale_at))
                        )
                    };
                    events.event(id, event(true), &summary);
                }
                (true, false) => events.event(id, event(false), "credential renewed"),
                _ => {}
            }
        }
        self.raised[i] = want;
        [near_at, stale_at].into_iter().find(|t| *t > now)
    }
}

/// A queued run: which slot, why, and for cron runs the fire time its window counts from.
type Queued = (usize, Trigger, Option<DateTime<Utc>>);

impl Scheduler {
    /// Creates a scheduler over `table`.
    pub fn new(
        table: Arc<Table>,
        engine: Arc<Engine>,
        max_concurrent: usize,
        events: Option<Arc<dyn EventSink>>,
        warn_before: Duration,
        data_version: i64,
        shutdown: CancellationToken,
    ) -> Self {
        let ages = AgeWatch {
            events,
            warn_before: warn_before.as_secs() as i64,
            raised: vec![0; table.len()],
        };
        Self {
            table,
            engine,
            max_concurrent,
            shutdown,
            ages,
            data_version,
        }
    }

    /// The table this scheduler works on.
    pub fn table(&self) -> Arc<Table> {
        self.table.clone()
    }

    /// Registers the cron jobs. Returns the running cron scheduler and the channel its jobs
    /// report to; call before announcing readiness.
    pub async fn start_cron(
        &self,
    ) -> anyhow::Result<(JobScheduler, mpsc::Receiver<Msg>, mpsc::Sender<Msg>)> {
        let (tx, rx) = mpsc::channel(1024);
        let cron = JobScheduler::new().await?;
        for (g, group) in self.table.groups.iter().enumerate() {
            let tx = tx.clone();
            let job = Job::new_async_tz(
                group.schedule.expression.as_str(),
                group.schedule.timezone,
                move |_, _| {
                    let tx = tx.clone();
                    Box::pin(async move {
                        // The queue is bounded; a full one means the loop is gone (shutting down).
                        let _ = tx.send(Msg::CronFired(g, Utc::now())).await;
                    })
                },
            )?;
            cron.add(job).await?;
        }
        cron.start().await?;
        Ok((cron, rx, tx))
    }

    /// The scheduling loop. Returns after shutdown once every in-flight run has finished or
    /// parked its rotation.
    pub async fn run(
        mut self,
        mut cron: JobScheduler,
        mut rx: mpsc::Receiver<Msg>,
        tx: mpsc::Sender<Msg>,
    ) {
        let n = self.table.len();
        let mut age_heap: BinaryHeap<Reverse<(i64, usize)>> = BinaryHeap::new();
        let now = Utc::now().timestamp();
        for (i, slot) in self.table.slots().enumerate() {
            if let Some(at) = self.ages.check(i, slot, now) {
                age_heap.push(Reverse((at, i)));
            }
        }
        let mut heap: BinaryHeap<Reverse<(i64, usize, u64)>> = BinaryHeap::with_capacity(n);
        let mut generation = vec![0u64; n];
        let mut busy = vec![false; n];
        let mut ready: VecDeque<Queued> = VecDeque::new();
        let mut running = 0usize;
        for (i, slot) in self.table.slots().enumerate() {
            if let Some(at) = lock(slot.live).wake {
                heap.push(Reverse((at, i, 0)));
            }
        }
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
            while running < self.max_concurrent {
                let Some((i, trigger, fire)) = ready.pop_front() else {
                    break;
                };
                let spec = self.table.slot(i).spec;
                if let Some(fire) = fire.filter(|f| !spec.schedule.in_window(*f, Utc::now())) {
                    info!(credential = %spec.id, fire = %fire, "rotation window missed; waiting for the next fire time");
                    busy[i] = false;
                    continue;
                }
                running += 1;
                lock(self.table.slot(i).live).status = Status::Rotating;
                let (engine, table, tx) = (self.engine.clone(), self.table.clone(), tx.clone());
                tokio::spawn(async move {
                    let result = engine
                        .run(table.slot(i).spec, trigger)
                        .await
                        .map_err(|e| e.to_string());
                    let _ = tx.send(Msg::Done(i, result)).await;
                });
            }
            if self.shutdown.is_cancelled() && running == 0 {
                break;
            }
            let next_age = age_heap.peek().map(|Reverse((at, _))| *at);
            let next = heap
                .peek()
                .map(|Reverse((at, _, _))| *at)
                .into_iter()
                .chain(next_age)
                .min();
            let sleep = next.map(|at| {
                Duration::from_millis((at * 1000 - Utc::now().timestamp_millis()).max(0) as u64)
            });
            tokio::select! {
                _ = self.shutdown.cancelled(), if !self.shutdown.is_cancelled() => {
                    info!(running, "shutdown: letting in-flight rotations finish or park");
                    ready.clear();
                    let _ = cron.shutdown().await;
                }
                Some(msg) = rx.recv() => match msg {
                    Msg::CronFired(g, fire) => {
                        if self.shutdown.is_cancelled() { continue; }
                        debug!(group = g, "cron fired");
                        for &i in &self.table.groups[g].members {
                            let live = *lock(self.table.slot(i).live);
                            // A retrying credential waits for its backoff (a heap entry), not the cron.
                            if !busy[i] && !matches!(live.status, Status::Failed | Status::Retrying) {
                                busy[i] = true;
                                ready.push_back((i, Trigger::Schedule, Some(fire)));
                            }
                        }
                    }
                    Msg::Done(i, result) => {
                        running -= 1;
                        busy[i] = false;
                        let wake = self.finished(i, result);
                        generation[i] += 1;
                        if let Some(at) = wake {
                            heap.push(Reverse((at, i, generation[i])));
                        }
                        if let Some(at) = self.ages.check(i, self.table.slot(i), Utc::now().timestamp()) {
                            age_heap.push(Reverse((at, i)));
                        }
                    }
                },
                _ = sleep_for(sleep), if !self.shutdown.is_cancelled() => {
                    let now = Utc::now().timestamp();
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

    /// Updates the live view after a run and returns the next heap wake-up.
    fn finished(
        &self,
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
                    events.event(
                        id,
                        Event::AutomationStopped(false),
                        "automation resumed by a manual rotation",
                    );
                }
                // Clearing a condition that is not active sends nothing, so no need to know
                // whether a failure alert was raised before.
                if record.consecutive_failures == 0
                    && matches!(record.status, Status::Idle | Status::Grace)
                {
                    events.event(id, Event::RotationFailed(false), "rotation succeeded");
                    events.event(id, Event::RevokeFailed(false), "old credential revoked");
                }
            }
            changed.push((i, live.wake));
        }
        Ok(changed)
    }
}

async fn sleep_for(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Locks a live view; a poisoned lock still holds plain data that is safe to read.
pub fn lock(m: &Mutex<Live>) -> std::sync::MutexGuard<'_, Live> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
