//! The rotation protocol: issue, stage, activate, verify, promote, and after the grace period,
//! revoke. It decides nothing about *when*; the scheduler (or `keyrotd rotate`) calls
//! [`Engine::run`] and the engine does whatever the credential's state calls for next.
//!
//! Invariants:
//! - the old credential is revoked only in phase `Promoted` and only once `revoke_at` (promotion
//!   time plus grace) has passed, so never before the new one is stored, verified and promoted;
//! - a failure before promotion rolls back: the rotator undoes what it did and the store drops the
//!   pending value, so the current value stays the one consumers read;
//! - a failure at or after promotion never rolls back (the new credential is proven good): the
//!   step is retried;
//! - the journal records each step before and after it runs, and a phase only after its step has
//!   completed; every step is idempotent, so resuming re-runs at most the step in flight;
//! - no secret value reaches the journal, a log line or an error: only public attributes do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use keyrotd_plugin::{Attrs, Credential, ErrorClass, ProviderError, Rotator, StepContext, Store};
use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec};
use rand::Rng;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::CredentialSpec;
use crate::fmt::human;
use crate::instrument::{CallMetrics, TimedRotator, TimedStore};
use crate::state::{
    Busy, Claim, CredentialRecord, Phase, RotationRecord, StateError, StateStore, Status,
};

/// How long a rotation's lease lasts; renewed at every step.
const LEASE: Duration = Duration::from_secs(300);

/// A protocol step, as journaled and exported (`keyrotd_rotation_step_duration_seconds{step}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Issue,
    Stage,
    Activate,
    Verify,
    Promote,
    /// The rotator revokes the old credential at the provider.
    Revoke,
    /// The store lets go of the previous value (after [`Step::Revoke`]).
    Release,
    /// The rotator undoes an unfinished rotation at the provider.
    Rollback,
    /// The store drops the pending value (after [`Step::Rollback`]).
    Discard,
}

impl Step {
    /// Every step, for metric pre-registration.
    pub const ALL: [Step; 9] = [
        Self::Issue,
        Self::Stage,
        Self::Activate,
        Self::Verify,
        Self::Promote,
        Self::Revoke,
        Self::Release,
        Self::Rollback,
        Self::Discard,
    ];

    /// The journaled name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issue => "issue",
            Self::Stage => "stage",
            Self::Activate => "activate",
            Self::Verify => "verify",
            Self::Promote => "promote",
            Self::Revoke => "revoke",
            Self::Release => "release",
            Self::Rollback => "rollback",
            Self::Discard => "discard",
        }
    }
}

/// Why a rotation was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Its schedule said so (or it was overdue at start-up).
    Schedule,
    /// A retry after a failure.
    Retry,
    /// An operator ran `keyrotd rotate`: also restarts a credential marked failed.
    Manual,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Schedule => "schedule",
            Self::Retry => "retry",
            Self::Manual => "manual",
        }
    }
}

/// What [`Engine::run`] achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new credential is current; the old one is revoked at `revoke_at` (Unix seconds).
    Promoted { rotation: String, revoke_at: i64 },
    /// The rotation is complete: the old credential is revoked.
    Completed { rotation: String },
    /// The rotation is in its grace period until `revoke_at`; nothing to do before.
    InGrace { rotation: String, revoke_at: i64 },
    /// Another process holds this credential's rotation.
    Busy { rotation: String, owner: String },
    /// The credential is marked failed: retries ran out (a manual rotation restarts it), or its
    /// store names a rotation the state database does not know (only `keyrotd adopt` or the
    /// right database restarts it). The record's `last_error` says which.
    Stopped,
    /// A step failed; what happens next is in the credential record.
    Failed { rotation: String, error: String },
    /// Shutdown arrived; the rotation is parked durably and resumes on the next start.
    Parked { rotation: String },
}

/// Errors that stop the engine itself (as opposed to a failed step, which is an [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("credential `{credential}`: invalid configuration: {message}")]
    Config { credential: String, message: String },
}

/// A step that failed, with everything an operator needs and no secret.
#[derive(Debug, thiserror::Error)]
#[error("credential `{credential}`: step {} failed: {source}", step.as_str())]
pub struct StepError {
    pub credential: String,
    pub step: Step,
    #[source]
    pub source: ProviderError,
}

/// The engine's metrics, owned by the daemon's registry.
#[derive(Clone)]
pub struct EngineMetrics {
    pub rotations: IntCounterVec,
    pub step_seconds: HistogramVec,
    /// Provider and store call latency.
    pub calls: CallMetrics,
    /// 1 for each credential whose store names a rotation the state database does not know.
    pub state_mismatch: IntGaugeVec,
}

impl EngineMetrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let rotations = IntCounterVec::new(
            prometheus::Opts::new(
                "keyrotd_rotations_total",
                "Rotations finished, by result (success, failed, rolled_back).",
            ),
            &["result"],
        )?;
        let step_seconds = HistogramVec::new(
            prometheus::HistogramOpts::new(
                "keyrotd_rotation_step_duration_seconds",
                "Duration of rotation protocol steps.",
            )
            .buckets(vec![0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0]),
            &["step"],
        )?;
        for result in ["success", "failed", "rolled_back"] {
            rotations.with_label_values(&[result]);
        }
        for step in Step::ALL {
            step_seconds.with_label_values(&[step.as_str()]);
        }
        let state_mismatch = IntGaugeVec::new(
            prometheus::Opts::new(
                "keyrotd_state_mismatch",
                "1 while the credential's store names a rotation the state database does not know (state lost or foreign); automation is stopped until `keyrotd adopt`.",
            ),
            &["credential"],
        )?;
        registry.register(Box::new(rotations.clone()))?;
        registry.register(Box::new(step_seconds.clone()))?;
        registry.register(Box::new(state_mismatch.clone()))?;
        Ok(Self {
            rotations,
            step_seconds,
            calls: CallMetrics::register(registry)?,
            state_mismatch,
        })
    }
}

/// Something worth telling an operator about, raised or cleared as conditions change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A rotation attempt failed (`true`) or a rotation succeeded (`false`).
    RotationFailed(bool),
    /// Revocation of an old credential failed (`true`) or succeeded (`false`).
    RevokeFailed(bool),
    /// Retries are exhausted (`true`) or automation resumed (`false`).
    AutomationStopped(bool),
    /// The credential is past its max age (`true`) or was renewed (`false`). Raised by the scheduler.
    Stale(bool),
    /// The credential is within `warn_before` of its max age (`true`) or was renewed (`false`).
    NearMaxAge(bool),
    /// The store names a rotation the state database does not know (`true`: state lost or
    /// foreign, automation stopped) or the database knows it again (`false`, after adoption).
    StateLost(bool),
}

/// Receives [`Event`]s; the alerting module implements it.
pub trait EventSink: Send + Sync {
    /// Called after the state change is durable. Must not block.
    fn event(&self, credential: &str, event: Event, summary: &str);
}

/// Drives rotations. One per process; cheap to share.
pub struct Engine {
    state: Arc<dyn StateStore>,
    metrics: EngineMetrics,
    events: Option<Arc<dyn EventSink>>,
    shutdown: CancellationToken,
    /// Cancelled when in-flight steps may no longer finish (the shutdown deadline passed).
    abort: CancellationToken,
}

/// How long one plugin may take to answer one call (its `timeout`), and its name for the error.
type Limit = (Duration, String);

trait PluginLimit {
    fn rotator(job: &Job<'_>) -> Limit;
    fn store(job: &Job<'_>) -> Limit;
}

impl PluginLimit for Limit {
    fn rotator(job: &Job<'_>) -> Limit {
        let kind = job.rotator.kind();
        (job.rotator.timeout(), format!("rotator `{kind}`"))
    }
    fn store(job: &Job<'_>) -> Limit {
        (job.store.timeout(), format!("store `{}`", job.store.kind()))
    }
}

/// Runs one plugin call for at most its plugin's limit: a step that calls both plugins is bounded
/// call by call, so a hung rotator fails after the rotator's `timeout`, not after the sum.
async fn within<T>(
    (limit, plugin): Limit,
    call: impl std::future::Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| Err(ProviderError::no_answer(plugin, limit)))
}

/// What [`Engine::take`] found.
enum Taken<'a> {
    /// A rotation to drive, under our lease.
    Job(Box<Job<'a>>),
    /// Nothing to drive now, for the reason given.
    Not(Outcome, Box<CredentialRecord>),
    /// The open rotation finished while we looked: look again.
    Finished,
}

/// The grace period's end, if `rotation` is promoted and still in it at `now`.
fn in_grace(rotation: &RotationRecord, now: i64) -> Option<i64> {
    rotation
        .revoke_at
        .filter(|&at| rotation.phase == Phase::Promoted && now < at)
}

/// Everything a rotation of one credential needs.
struct Job<'a> {
    spec: &'a CredentialSpec,
    rotator: Arc<dyn Rotator>,
    store: Arc<dyn Store>,
    record: CredentialRecord,
    rotation: RotationRecord,
    /// The issued credential, while this process holds it.
    new: Option<Credential>,
    /// Whether this run took over a rotation that an earlier run (maybe a crashed one) began.
    resumed: bool,
}

impl Engine {
    /// Creates an engine that journals into `state` and stops between steps once `shutdown` fires.
    pub fn new(
        state: Arc<dyn StateStore>,
        metrics: EngineMetrics,
        events: Option<Arc<dyn EventSink>>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            state,
            metrics,
            events,
            shutdown,
            abort: CancellationToken::new(),
        }
    }

    /// Makes `abort` interrupt a step in flight: the step is abandoned where it is, journaled as
    /// `interrupted`, and its rotation parked, to resume from the journal (every step is
    /// idempotent). The daemon cancels it once the shutdown deadline has passed after
    /// `shutdown`, so a provider that never answers cannot hold up SIGTERM or SIGHUP.
    pub fn abort_steps_on(mut self, abort: CancellationToken) -> Self {
        self.abort = abort;
        self
    }

    /// The state backend.
    pub fn state(&self) -> &Arc<dyn StateStore> {
        &self.state
    }

    /// Does what the credential needs now: resumes an open rotation, revokes after grace, or
    /// starts a new rotation. Returns the outcome and the credential's record afterwards.
    pub async fn run(
        &self,
        spec: &CredentialSpec,
        trigger: Trigger,
    ) -> Result<(Outcome, CredentialRecord), EngineError> {
        let config_error = |message: String| EngineError::Config {
            credential: spec.id.clone(),
            message,
        };
        let rotator = spec.rotator.build().map_err(config_error)?;
        let store = spec.store.build().map_err(config_error)?;
        self.run_with(spec, rotator, store, trigger).await
    }

    /// [`Engine::run`] with the rotator and store given rather than built from the spec.
    pub async fn run_with(
        &self,
        spec: &CredentialSpec,
        rotator: Arc<dyn Rotator>,
        store: Arc<dyn Store>,
        trigger: Trigger,
    ) -> Result<(Outcome, CredentialRecord), EngineError> {
        let rotator = TimedRotator::wrap(rotator, &self.metrics.calls);
        let store = TimedStore::wrap(store, &self.metrics.calls);
        let mut record = self
            .state
            .credential(&spec.id)
            .await?
            .unwrap_or_else(|| CredentialRecord::new(&spec.id));
        if !self
            .store_matches_state(spec, rotator.as_ref(), store.as_ref(), &mut record)
            .await?
        {
            return Ok((Outcome::Stopped, record));
        }
        loop {
            let mut job = match self.take(spec, &rotator, &store, trigger).await? {
                Taken::Job(job) => job,
                Taken::Not(outcome, record) => return Ok((outcome, *record)),
                Taken::Finished => continue,
            };
            let resumed_phase = job.resumed.then_some(job.rotation.phase);
            let outcome = match self.drive(&mut job).await {
                Ok(outcome) => outcome,
                Err(EngineError::State(StateError::LeaseLost(rotation))) => {
                    warn!(credential = %spec.id, rotation = %rotation, "another process took this rotation over; this run stopped");
                    let owner = "another process".to_owned();
                    return Ok((Outcome::Busy { rotation, owner }, job.record));
                }
                Err(e) => return Err(e),
            };
            // A run that only finished an earlier rotation (its rollback, or its revoke after
            // the grace period) has not done what was asked: a retry or a manual rotation wants
            // a new credential.
            let finished_earlier = match (resumed_phase, job.rotation.phase) {
                (Some(Phase::RollingBack), Phase::RolledBack) => true,
                (Some(Phase::Promoted), Phase::Done) => trigger == Trigger::Manual,
                _ => false,
            };
            if !finished_earlier {
                return Ok((outcome, job.record));
            }
            info!(credential = %spec.id, rotation = %job.rotation.id, "finished the earlier rotation; starting the one asked for");
        }
    }

    /// Takes the credential's open rotation (or begins a new one) under this process's lease,
    /// and reads the credential's record under it. Everything read before the lease may be
    /// stale; the job is built only from what was read after.
    async fn take<'a>(
        &self,
        spec: &'a CredentialSpec,
        rotator: &Arc<dyn Rotator>,
        store: &Arc<dyn Store>,
        trigger: Trigger,
    ) -> Result<Taken<'a>, EngineError> {
        let record =
            |r: Option<CredentialRecord>| r.unwrap_or_else(|| CredentialRecord::new(&spec.id));
        let before = record(self.state.credential(&spec.id).await?);
        if before.status == Status::Failed && trigger != Trigger::Manual {
            return Ok(Taken::Not(Outcome::Stopped, Box::new(before)));
        }
        let now = Utc::now().timestamp();
        let lease_until = now.saturating_add(LEASE.as_secs() as i64);
        let not = |outcome, record| Ok(Taken::Not(outcome, Box::new(record)));
        let open = self.state.open_rotation(&spec.id).await?;
        let resumed = open.is_some();
        let rotation = match open {
            Some(open) => {
                if let Some(revoke_at) = in_grace(&open, now) {
                    let rotation = open.id;
                    return not(
                        Outcome::InGrace {
                            rotation,
                            revoke_at,
                        },
                        before,
                    );
                }
                let mut fresh = match self.state.claim(&open.id, lease_until, now).await? {
                    Claim::Taken(fresh) => *fresh,
                    Claim::Held { owner } => {
                        let rotation = open.id;
                        return not(Outcome::Busy { rotation, owner }, before);
                    }
                    Claim::Finished => return Ok(Taken::Finished),
                };
                if let Some(revoke_at) = in_grace(&fresh, now) {
                    // Promoted by another process since we looked: give the lease back.
                    let record = record(self.state.credential(&spec.id).await?);
                    fresh.owner = None;
                    fresh.lease_until = 0;
                    self.state.save(&fresh, &record).await?;
                    let rotation = fresh.id;
                    return not(
                        Outcome::InGrace {
                            rotation,
                            revoke_at,
                        },
                        record,
                    );
                }
                info!(credential = %spec.id, rotation = %fresh.id, phase = fresh.phase.as_str(), "resuming rotation");
                fresh
            }
            None => {
                let rotation = RotationRecord {
                    id: uuid::Uuid::now_v7().to_string(),
                    credential_id: spec.id.clone(),
                    trigger: trigger.as_str().into(),
                    started_at: now,
                    phase: Phase::Issuing,
                    new_attrs: None,
                    old_attrs: None,
                    revoke_at: None,
                    owner: Some(self.state.owner().to_owned()),
                    lease_until,
                    error: None,
                    finished_at: None,
                };
                if let Err(Busy(open)) = self.state.begin(&rotation).await? {
                    let (rotation, owner) = (open.id, open.owner.unwrap_or_default());
                    return not(Outcome::Busy { rotation, owner }, before);
                }
                info!(credential = %spec.id, rotation = %rotation.id, trigger = trigger.as_str(), "rotation started");
                rotation
            }
        };
        let mut record = record(self.state.credential(&spec.id).await?);
        if trigger == Trigger::Manual && record.status == Status::Failed {
            record.consecutive_failures = 0;
            self.emit(
                &spec.id,
                Event::AutomationStopped(false),
                "automation resumed by a manual rotation",
            );
        }
        if rotation.phase.before_promotion() {
            record.status = Status::Rotating;
        }
        let mut job = Job {
            spec,
            rotator: rotator.clone(),
            store: store.clone(),
            record,
            rotation,
            new: None,
            resumed,
        };
        // Make the new status visible (to `keyrotd status`) before any step runs.
        self.save(&mut job).await?;
        Ok(Taken::Job(Box::new(job)))
    }

    /// Checks, before anything else runs, that the state database knows the rotation that wrote
    /// the store's current value. If it does not, the database was lost (a 0-byte file, a WAL
    /// deleted after a crash), restored from an older backup, or belongs to another keyrotd:
    /// rotating now would overwrite a value whose old credential may still await revocation, and
    /// would erase the evidence. The credential is marked failed with the reason, logged, counted
    /// and alerted; only `keyrotd adopt` (or the right database) lets it run again.
    async fn store_matches_state(
        &self,
        spec: &CredentialSpec,
        rotator: &dyn Rotator,
        store: &dyn Store,
        record: &mut CredentialRecord,
    ) -> Result<bool, EngineError> {
        let ctx = StepContext {
            credential_id: &spec.id,
            rotation_id: "",
            secret_field: rotator.secret_field(),
            old_attrs: None,
            started_at: std::time::SystemTime::now(),
        };
        // Bounded like every other store call: a silent store must not hang the run here,
        // before any step (and its deadline) has started.
        let limit = store.timeout();
        let asked = tokio::time::timeout(limit, store.last_rotation(ctx)).await;
        let named = match asked.unwrap_or_else(|_| {
            Err(ProviderError::no_answer(
                format!("store `{}`", store.kind()),
                limit,
            ))
        }) {
            Ok(named) => named,
            Err(e) => {
                // Every store step reads the same bookkeeping first (`current` before `issue`),
                // so a store that cannot answer fails the rotation at its first step, journaled,
                // counted and retried like any failure, before anything is written.
                warn!(credential = %spec.id, store = %store.location(), error = %e, "cannot read which rotation wrote the store's value; the rotation's first step will fail the same way");
                // A credential already found lost stays stopped.
                return Ok(record.state_lost.is_none());
            }
        };
        let unknown = match named {
            Some(rotation) if !self.state.knows_rotation(&spec.id, &rotation).await? => rotation,
            _ => {
                let flagged = self
                    .metrics
                    .state_mismatch
                    .remove_label_values(&[&spec.id])
                    .is_ok();
                if record.state_lost.take().is_some() {
                    // The store holds a known rotation again (its file was put back): the
                    // marker goes; a failed status stays until an operator rotates by hand.
                    self.state.put_credential(record).await?;
                }
                if flagged {
                    self.emit(
                        &spec.id,
                        Event::StateLost(false),
                        "the state database knows the store's rotation again",
                    );
                }
                return Ok(true);
            }
        };
        let location = store.location();
        let message = state_lost_message(&spec.id, &location, &unknown);
        error!(credential = %spec.id, store = %location, rotation = %unknown, "state lost or foreign: the store names a rotation the state database does not know; automation stopped until `keyrotd adopt`");
        self.metrics
            .state_mismatch
            .with_label_values(&[&spec.id])
            .set(1);
        record.status = Status::Failed;
        record.next_attempt_at = None;
        record.last_error = Some(message.clone());
        record.state_lost = Some(unknown);
        self.state.put_credential(record).await?;
        self.emit(&spec.id, Event::StateLost(true), &message);
        Ok(false)
    }

    /// Runs the protocol from the rotation's recorded phase until it finishes, fails, waits for
    /// its grace period, or shutdown parks it.
    async fn drive(&self, job: &mut Job<'_>) -> Result<Outcome, EngineError> {
        loop {
            if self.shutdown.is_cancelled() && job.rotation.phase != Phase::RollingBack {
                return self.park(job).await;
            }
            let result = match job.rotation.phase {
                Phase::Issuing | Phase::Issued => self.issue_and_stage(job).await,
                Phase::Staged => self.activate(job).await,
                Phase::Activated => self.verify(job).await,
                Phase::Verified => self.promote(job).await,
                Phase::Promoted => {
                    let now = Utc::now().timestamp();
                    match job.rotation.revoke_at {
                        Some(at) if now < at => {
                            job.rotation.owner = None;
                            job.rotation.lease_until = 0;
                            self.save(job).await?;
                            return Ok(Outcome::Promoted {
                                rotation: job.rotation.id.clone(),
                                revoke_at: at,
                            });
                        }
                        _ => self.revoke(job).await,
                    }
                }
                Phase::RollingBack => self.roll_back(job).await,
                Phase::Done => {
                    return Ok(Outcome::Completed {
                        rotation: job.rotation.id.clone(),
                    })
                }
                Phase::RolledBack => {
                    if job.rotation.owner.is_some() {
                        job.rotation.owner = None;
                        job.rotation.lease_until = 0;
                        self.save(job).await?;
                    }
                    let error = job.rotation.error.clone().unwrap_or_default();
                    return Ok(Outcome::Failed {
                        rotation: job.rotation.id.clone(),
                        error,
                    });
                }
            };
            if let Err(failure) = result {
                return self.fail(job, failure).await;
            }
        }
    }

    /// Releases the rotation for shutdown: the next start (or generation) resumes it at once.
    async fn park(&self, job: &mut Job<'_>) -> Result<Outcome, EngineError> {
        job.rotation.owner = None;
        job.rotation.lease_until = 0;
        self.save(job).await?;
        info!(credential = %job.spec.id, rotation = %job.rotation.id, phase = job.rotation.phase.as_str(), "rotation parked for shutdown");
        Ok(Outcome::Parked {
            rotation: job.rotation.id.clone(),
        })
    }

    /// How long `step` may wait for the plugins it calls (their `timeout`s), and which they are.
    fn deadline(job: &Job<'_>, step: Step) -> (Duration, String) {
        let (rotator, store) = (Limit::rotator(job), Limit::store(job));
        match step {
            Step::Revoke => rotator,
            Step::Stage | Step::Promote | Step::Release | Step::Discard => store,
            // These steps call both: each reads the store (the current or the staged value)
            // before it calls the rotator, each call within its own plugin's limit.
            Step::Issue | Step::Activate | Step::Verify | Step::Rollback => (
                rotator.0.saturating_add(store.0),
                format!("{} and {}", rotator.1, store.1),
            ),
        }
    }

    /// Runs a call to `plugins` for at most `deadline`: past it the call is dropped (closing its
    /// connections) and fails as transient, so a provider that accepts the connection and never
    /// answers cannot hang a rotation, whatever its plugin does itself. `None` when the abort
    /// token interrupted it.
    async fn bounded<T>(
        &self,
        (deadline, plugins): (Duration, String),
        call: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Option<Result<T, ProviderError>> {
        tokio::select! {
            biased;
            () = self.abort.cancelled() => None,
            result = tokio::time::timeout(deadline, call) => Some(
                result.unwrap_or_else(|_| Err(ProviderError::no_answer(plugins, deadline))),
            ),
        }
    }

    /// Runs one provider call as a journaled, timed step, bounded by the plugins' deadline. The
    /// call is abandoned (dropped) if this process loses the rotation's lease while it runs: from
    /// then on another process drives.
    async fn step<T>(
        &self,
        job: &Job<'_>,
        step: Step,
        call: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, Failure> {
        if self.abort.is_cancelled() {
            return Err(Failure::Interrupted);
        }
        let rotation = &job.rotation.id;
        self.state
            .log_step(rotation, step.as_str(), "start", None)
            .await?;
        failpoint(step, "start").await;
        let started = Instant::now();
        let result = tokio::select! {
            result = self.bounded(Self::deadline(job, step), call) => result,
            lost = self.keep_lease(job) => return Err(Failure::State(lost)),
        };
        let Some(result) = result else {
            warn!(credential = %job.spec.id, rotation = %rotation, step = step.as_str(), "shutdown deadline passed: step interrupted; it resumes from the journal");
            self.state
                .log_step(
                    rotation,
                    step.as_str(),
                    "interrupted",
                    Some("the shutdown deadline passed; the step resumes at the next start"),
                )
                .await?;
            return Err(Failure::Interrupted);
        };
        self.metrics
            .step_seconds
            .with_label_values(&[step.as_str()])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(v) => {
                failpoint(step, "done").await;
                self.state
                    .log_step(rotation, step.as_str(), "ok", None)
                    .await?;
                failpoint(step, "ok").await;
                Ok(v)
            }
            Err(source) => {
                let err = StepError {
                    credential: job.spec.id.clone(),
                    step,
                    source,
                };
                self.state
                    .log_step(
                        rotation,
                        step.as_str(),
                        "error",
                        Some(&err.source.to_string()),
                    )
                    .await?;
                Err(Failure::Step(err))
            }
        }
    }

    /// Renews the lease of the rotation `job` drives while a step runs, however long the provider
    /// takes. Returns only when the lease is lost (another process took the rotation over after
    /// our lease expired, say while the database was unreachable), so the step is cancelled.
    async fn keep_lease(&self, job: &Job<'_>) -> StateError {
        let mut every = tokio::time::interval(LEASE / 3);
        every.tick().await; // the first tick is immediate; the lease was just renewed
        loop {
            every.tick().await;
            let until = Utc::now()
                .timestamp()
                .saturating_add(LEASE.as_secs() as i64);
            match self.state.renew(&job.rotation.id, until).await {
                Ok(true) => {}
                Ok(false) => {
                    warn!(credential = %job.spec.id, rotation = %job.rotation.id, "lease lost to another process during a step; abandoning the step");
                    return StateError::LeaseLost(job.rotation.id.clone());
                }
                Err(e) => {
                    warn!(credential = %job.spec.id, error = %e, "renewing the rotation's lease failed")
                }
            }
        }
    }

    fn ctx<'a>(&self, job: &'a Job<'_>) -> StepContext<'a> {
        StepContext {
            credential_id: &job.spec.id,
            rotation_id: &job.rotation.id,
            secret_field: job.rotator.secret_field(),
            started_at: std::time::UNIX_EPOCH
                + Duration::from_secs(job.rotation.started_at.max(0) as u64),
            old_attrs: job.rotation.old_attrs.as_ref(),
        }
    }

    async fn issue_and_stage(&self, job: &mut Job<'_>) -> Result<(), Failure> {
        let ctx = self.ctx(job);
        let (rotator, store) = (job.rotator.clone(), job.store.clone());
        let (rl, sl) = (Limit::rotator(job), Limit::store(job));
        if job.resumed && job.new.is_none() {
            // A crash hit between issuing and recording the stage. If the store has our value the
            // stage happened; otherwise the issued credential is lost and must be cleaned up.
            if let Some(mut staged) = self.step(job, Step::Stage, store.pending(ctx)).await? {
                merge_attrs(&mut staged.attrs, job.rotation.new_attrs.as_ref());
                job.rotation.new_attrs = Some(public_only(job.rotator.as_ref(), &staged.attrs));
                job.new = Some(staged);
                job.rotation.phase = Phase::Staged;
                return Ok(self.save(job).await?);
            }
            let issued = job.rotation.new_attrs.clone();
            self.step(job, Step::Rollback, async {
                let current = within(sl.clone(), store.current(ctx)).await?;
                within(
                    rl.clone(),
                    rotator.abandon(ctx, issued.as_ref(), current.as_ref()),
                )
                .await
            })
            .await?;
        }
        let (new, current) = self
            .step(job, Step::Issue, async {
                let current = within(sl.clone(), store.current(ctx)).await?;
                let new = within(rl.clone(), rotator.issue(ctx, current.as_ref())).await?;
                Ok((new, current))
            })
            .await?;
        let mut old_attrs = current
            .as_ref()
            .map(|c| public_only(job.rotator.as_ref(), &c.attrs));
        if let Some(old) = old_attrs.as_mut() {
            // A raw store keeps only the secret: the key id is on the credential's record.
            merge_attrs(old, job.record.current_attrs.as_ref());
        }
        job.rotation.old_attrs = old_attrs;
        job.rotation.new_attrs = Some(new.attrs.clone());
        job.rotation.phase = Phase::Issued;
        self.save(job).await?;
        // The secret exists only in memory now: store it before anything else happens.
        let ctx = self.ctx(job);
        self.step(job, Step::Stage, job.store.stage(ctx, &new))
            .await?;
        job.new = Some(new);
        job.rotation.phase = Phase::Staged;
        Ok(self.save(job).await?)
    }

    async fn activate(&self, job: &mut Job<'_>) -> Result<(), Failure> {
        let ctx = self.ctx(job);
        let (rotator, store) = (job.rotator.clone(), job.store.clone());
        let (rl, sl) = (Limit::rotator(job), Limit::store(job));
        let (known, issued) = (job.new.clone(), job.rotation.new_attrs.as_ref());
        let new = self
            .step(job, Step::Activate, async {
                // After a restart the new value is only in the store.
                let new = match known {
                    Some(new) => new,
                    None => staged(within(sl.clone(), store.pending(ctx)).await?, issued)?,
                };
                let current = within(sl.clone(), store.current(ctx)).await?;
                within(rl.clone(), rotator.activate(ctx, &new, current.as_ref())).await?;
                Ok(new)
            })
            .await?;
        job.new = Some(new);
        job.rotation.phase = Phase::Activated;
        Ok(self.save(job).await?)
    }

    async fn verify(&self, job: &mut Job<'_>) -> Result<(), Failure> {
        let ctx = self.ctx(job);
        let (rotator, store) = (job.rotator.clone(), job.store.clone());
        let (rl, sl) = (Limit::rotator(job), Limit::store(job));
        let (known, issued) = (job.new.clone(), job.rotation.new_attrs.as_ref());
        let new = self
            .step(job, Step::Verify, async {
                // Consumers will read the store, so the value there is the one that must work.
                let pending = staged(within(sl.clone(), store.pending(ctx)).await?, issued)?;
                if known.is_some_and(|k| k.secret.expose_secret() != pending.secret.expose_secret())
                {
                    return Err(ProviderError::permanent(
                        "the staged value read back differs from the issued one",
                    ));
                }
                within(rl.clone(), rotator.verify(ctx, &pending)).await?;
                Ok(pending)
            })
            .await?;
        job.new = Some(new);
        job.rotation.phase = Phase::Verified;
        Ok(self.save(job).await?)
    }

    async fn promote(&self, job: &mut Job<'_>) -> Result<(), Failure> {
        let ctx = self.ctx(job);
        self.step(job, Step::Promote, job.store.promote(ctx))
            .await?;
        let now = Utc::now();
        let revoke_at = revoke_time(now, job.spec.grace);
        job.rotation.phase = Phase::Promoted;
        job.rotation.revoke_at = Some(revoke_at);
        job.rotation.error = None;
        job.record.issued_at = Some(now.timestamp());
        job.record.current_attrs = job.rotation.new_attrs.clone();
        let was_failing = job.record.consecutive_failures > 0;
        job.record.succeed(Status::Grace);
        self.save(job).await?;
        self.metrics.rotations.with_label_values(&["success"]).inc();
        info!(credential = %job.spec.id, rotation = %job.rotation.id, grace = %human(job.spec.grace), "new credential promoted");
        if was_failing {
            self.emit(
                &job.spec.id,
                Event::RotationFailed(false),
                "rotation succeeded",
            );
        }
        Ok(())
    }

    async fn revoke(&self, job: &mut Job<'_>) -> Result<(), Failure> {
        let ctx = self.ctx(job);
        if let Some(old) = job.rotation.old_attrs.clone() {
            self.step(job, Step::Revoke, job.rotator.revoke(ctx, &old))
                .await?;
        }
        self.step(job, Step::Release, job.store.release_previous(ctx))
            .await?;
        let had_failures = job.record.consecutive_failures > 0;
        job.rotation.phase = Phase::Done;
        job.rotation.finished_at = Some(Utc::now().timestamp());
        job.rotation.owner = None;
        job.record.succeed(Status::Idle);
        self.save(job).await?;
        info!(credential = %job.spec.id, rotation = %job.rotation.id, "old credential revoked; rotation complete");
        if had_failures {
            self.emit(
                &job.spec.id,
                Event::RevokeFailed(false),
                "old credential revoked",
            );
        }
        Ok(())
    }

    /// Undoes an unfinished rotation. Keeps the lease: the caller records the outcome and then
    /// releases it.
    async fn roll_back(&self, job: &mut Job<'_>) -> Result<(), Failure> {
        let ctx = self.ctx(job);
        let (rotator, store) = (job.rotator.clone(), job.store.clone());
        let (rl, sl) = (Limit::rotator(job), Limit::store(job));
        let issued = job.rotation.new_attrs.clone();
        self.step(job, Step::Rollback, async {
            let current = within(sl.clone(), store.current(ctx)).await?;
            within(
                rl.clone(),
                rotator.abandon(ctx, issued.as_ref(), current.as_ref()),
            )
            .await
        })
        .await?;
        self.step(job, Step::Discard, job.store.discard(ctx))
            .await?;
        job.rotation.phase = Phase::RolledBack;
        job.rotation.finished_at = Some(Utc::now().timestamp());
        job.new = None;
        self.save(job).await?;
        self.metrics
            .rotations
            .with_label_values(&["rolled_back"])
            .inc();
        info!(credential = %job.spec.id, rotation = %job.rotation.id, "rotation rolled back; the current credential is unchanged");
        Ok(())
    }

    /// Records a failed step: rolls back what is not yet promoted, schedules a retry with backoff
    /// and jitter, or marks the credential failed once retries are exhausted.
    async fn fail(&self, job: &mut Job<'_>, failure: Failure) -> Result<Outcome, EngineError> {
        let err = match failure {
            Failure::State(e) => return Err(e.into()),
            Failure::Interrupted => return self.park(job).await,
            Failure::Step(e) => e,
        };
        let message = err.to_string();
        warn!(credential = %job.spec.id, rotation = %job.rotation.id, step = err.step.as_str(), error = %err.source, "rotation step failed");
        let phase = job.rotation.phase;
        // The rotation keeps the failure that stopped it: a rollback that fails afterwards (now,
        // or when a retry resumes it) is journaled as its own step error and logged, and does
        // not replace it.
        let outcome_error = match job.rotation.error.as_deref() {
            Some(original) if phase == Phase::RollingBack => {
                format!("{original} (rolling it back failed too: {message})")
            }
            _ => {
                job.rotation.error = Some(message.clone());
                message.clone()
            }
        };
        // Before verification nothing is promised to consumers: undo it. A rollback that fails
        // itself stays in phase RollingBack and is resumed by the retry.
        if phase.rolls_back_on_failure() {
            job.rotation.phase = Phase::RollingBack;
            self.save(job).await?;
            match self.roll_back(job).await {
                Ok(()) => {}
                Err(Failure::State(e)) => return Err(e.into()),
                Err(Failure::Interrupted) => return self.park(job).await,
                Err(Failure::Step(e)) => {
                    warn!(credential = %job.spec.id, rotation = %job.rotation.id, step = e.step.as_str(), error = %e.source, "rolling back the failed rotation failed too; a retry resumes the rollback")
                }
            }
        }
        job.record.consecutive_failures += 1;
        job.record.last_error = job.rotation.error.clone();
        if job.rotation.phase == Phase::RolledBack {
            self.metrics.rotations.with_label_values(&["failed"]).inc();
        }
        let policy = job.spec.retry;
        let (event, summary) = match err.step {
            Step::Revoke => (
                Event::RevokeFailed(true),
                format!("revoking the old credential failed: {message}"),
            ),
            _ => (
                Event::RotationFailed(true),
                format!("rotation failed: {message}"),
            ),
        };
        // A permanent error (access denied, not found) will not heal by waiting: one retry
        // confirms it, then automation stops and an operator is needed.
        let permanent = err.source.class == ErrorClass::Permanent;
        let max_attempts = if permanent {
            policy.max_attempts.min(2)
        } else {
            policy.max_attempts
        };
        if job.record.consecutive_failures >= max_attempts {
            job.record.status = Status::Failed;
            job.record.next_attempt_at = None;
            warn!(credential = %job.spec.id, attempts = job.record.consecutive_failures, permanent, "retries exhausted: credential marked failed; rotate it by hand to resume");
        } else {
            let delay = backoff(
                policy.backoff,
                policy.max_backoff,
                job.record.consecutive_failures,
            );
            job.record.status = Status::Retrying;
            job.record.next_attempt_at = Some(
                Utc::now()
                    .timestamp()
                    .saturating_add(delay.as_secs().clamp(1, i64::MAX as u64) as i64),
            );
        }
        job.rotation.owner = None;
        job.rotation.lease_until = 0;
        self.save(job).await?;
        self.emit(&job.spec.id, event, &summary);
        if job.record.status == Status::Failed {
            self.emit(
                &job.spec.id,
                Event::AutomationStopped(true),
                "retries exhausted; automation stopped until an operator rotates it by hand",
            );
        }
        Ok(Outcome::Failed {
            rotation: job.rotation.id.clone(),
            error: outcome_error,
        })
    }

    async fn save(&self, job: &mut Job<'_>) -> Result<(), StateError> {
        if job.rotation.owner.is_some() {
            job.rotation.lease_until = Utc::now()
                .timestamp()
                .saturating_add(LEASE.as_secs() as i64);
        }
        self.state.save(&job.rotation, &job.record).await
    }

    fn emit(&self, credential: &str, event: Event, summary: &str) {
        if let Some(sink) = &self.events {
            sink.event(credential, event, summary);
        }
    }
}

/// Crash testing: with `KEYROTD_FAILPOINT=STEP:EVENT` (`stage:start`, `stage:done` — the step ran
/// but is not journaled yet — or `stage:ok`), the process announces the point on stderr and
/// hangs there, so a test can `kill -9` it at exactly that point. Unset, this costs one load.
async fn failpoint(step: Step, event: &str) {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let point = POINT.get_or_init(|| std::env::var("KEYROTD_FAILPOINT").ok());
    if point
        .as_deref()
        .is_some_and(|p| p.split_once(':') == Some((step.as_str(), event)))
    {
        eprintln!(
            "keyrotd: failpoint {}:{event} reached; hanging until killed",
            step.as_str()
        );
        std::future::pending::<()>().await;
    }
}

/// A step failure or a state failure, inside the engine.
enum Failure {
    Step(StepError),
    State(StateError),
    /// The abort token interrupted a step; the rotation parks and resumes from the journal.
    Interrupted,
}

impl From<StateError> for Failure {
    fn from(e: StateError) -> Self {
        Self::State(e)
    }
}

/// The attributes of a value read from a store that may be journaled: only those the rotator
/// declares public. Other members of a JSON secret may be secret themselves.
pub fn public_only(rotator: &dyn Rotator, attrs: &Attrs) -> Attrs {
    let public = rotator.public_attrs();
    attrs
        .iter()
        .filter(|(k, _)| public.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The staged value read back from the store, with the attributes journaled at issue (a raw
/// store keeps only the secret). Its absence is permanent: nothing will bring it back.
fn staged(
    pending: Option<Credential>,
    issued: Option<&Attrs>,
) -> Result<Credential, ProviderError> {
    let mut staged = pending
        .ok_or_else(|| ProviderError::permanent("the staged value is no longer in the store"))?;
    merge_attrs(&mut staged.attrs, issued);
    Ok(staged)
}

/// When the old credential may be revoked: `promoted` plus `grace`, rounded *up* to the whole
/// second the journal stores, so the grace period is never cut short (a 500 ms grace waits at
/// least 500 ms, never 0). Without a grace period, any time after promotion will do.
fn revoke_time(promoted: chrono::DateTime<Utc>, grace: Duration) -> i64 {
    if grace.is_zero() {
        return promoted.timestamp();
    }
    let grace_ms = i64::try_from(grace.as_nanos().div_ceil(1_000_000)).unwrap_or(i64::MAX);
    let at_ms = promoted.timestamp_millis().saturating_add(grace_ms);
    at_ms.div_euclid(1000) + i64::from(at_ms.rem_euclid(1000) != 0)
}

fn merge_attrs(into: &mut Attrs, from: Option<&Attrs>) {
    for (k, v) in from.into_iter().flatten() {
        into.entry(k.clone()).or_insert_with(|| v.clone());
    }
}

/// What an operator reads when a store names a rotation the state database does not know.
pub fn state_lost_message(credential: &str, location: &str, rotation: &str) -> String {
    format!(
        "state lost or foreign: the store {location} holds the value of rotation {rotation}, \
         which this state database does not know (it was lost, reset, restored from an older \
         backup, or belongs to another keyrotd); automation of `{credential}` is stopped. Restore \
         the right database, or run `keyrotd adopt {credential}` to accept the stored value"
    )
}

/// Exponential backoff with equal jitter: half the delay fixed, half random.
pub fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = initial.saturating_mul(
        1u32.checked_shl(attempt.saturating_sub(1).min(31))
            .unwrap_or(u32::MAX),
    );
    let capped = exp.min(max);
    let half = capped / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoke_time_never_cuts_the_grace_period_short() {
        let at = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap();
        let secs = Duration::from_secs;
        assert_eq!(revoke_time(at(10_000), secs(2)), 12);
        assert_eq!(revoke_time(at(10_001), secs(2)), 13, "12.001 rounds up");
        assert_eq!(revoke_time(at(10_999), Duration::from_millis(500)), 12);
        assert_eq!(
            revoke_time(at(10_000), Duration::from_millis(500)),
            11,
            "never 0 s"
        );
        assert_eq!(revoke_time(at(10_000), Duration::from_nanos(1)), 11);
        assert_eq!(revoke_time(at(10_999), secs(0)), 10, "no grace: at once");
        assert!(
            revoke_time(at(10_000), Duration::MAX) > 10,
            "saturates, never wraps"
        );
        for ms in (0..3000).step_by(7) {
            for grace in [1, 499, 500, 999, 1000, 1001, 2000] {
                let grace = Duration::from_millis(grace);
                let promoted = 1_700_000_000_000 + ms;
                assert!(
                    revoke_time(at(promoted), grace) * 1000 >= promoted + grace.as_millis() as i64
                );
            }
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let (b, max) = (Duration::from_secs(10), Duration::from_secs(60));
        let first = backoff(b, max, 1);
        assert!(first >= Duration::from_secs(5) && first <= b);
        let late = backoff(b, max, 30);
        assert!(late >= Duration::from_secs(30) && late <= max);
    }
}
