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
use keyrotd_rotators::{Attrs, Credential, ProviderError, Rotator, StepContext, Store};
use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec};
use rand::Rng;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{human, CredentialSpec};
use crate::instrument::{CallMetrics, TimedRotator, TimedStore};
use crate::state::{Busy, CredentialRecord, Phase, RotationRecord, StateError, StateStore, Status};

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
    Revoke,
    Rollback,
}

impl Step {
    /// Every step, for metric pre-registration.
    pub const ALL: [Step; 7] = [
        Self::Issue,
        Self::Stage,
        Self::Activate,
        Self::Verify,
        Self::Promote,
        Self::Revoke,
        Self::Rollback,
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
            Self::Rollback => "rollback",
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
    owner: String,
    metrics: EngineMetrics,
    events: Option<Arc<dyn EventSink>>,
    shutdown: CancellationToken,
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
            owner: owner_id().to_owned(),
            metrics,
            events,
            shutdown,
        }
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
        let now = Utc::now().timestamp();

        if !self
            .store_matches_state(spec, rotator.as_ref(), store.as_ref(), &mut record)
            .await?
        {
            return Ok((Outcome::Stopped, record));
        }
        if record.status == Status::Failed && trigger != Trigger::Manual {
            return Ok((Outcome::Stopped, record));
        }
        let open = self.state.open_rotation(&spec.id).await?;
        let resumed = open.is_some();
        let rotation = match open {
            Some(open) => {
                if open.phase == Phase::Promoted && open.revoke_at.is_some_and(|t| now < t) {
                    let revoke_at = open.revoke_at.unwrap_or(now);
                    return Ok((
                        Outcome::InGrace {
                            rotation: open.id,
                            revoke_at,
                        },
                        record,
                    ));
                }
                if !self.claim(&open, now).await? {
                    let owner = open.owner.clone().unwrap_or_default();
                    return Ok((
                        Outcome::Busy {
                            rotation: open.id,
                            owner,
                        },
                        record,
                    ));
                }
                info!(credential = %spec.id, rotation = %open.id, phase = open.phase.as_str(), "resuming rotation");
                RotationRecord {
                    owner: Some(self.owner.clone()),
                    lease_until: now + LEASE.as_secs() as i64,
                    ..open
                }
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
                    owner: Some(self.owner.clone()),
                    lease_until: now + LEASE.as_secs() as i64,
                    error: None,
                    finished_at: None,
                };
                if let Err(Busy(open)) = self.state.begin(&rotation).await? {
                    return Ok((
                        Outcome::Busy {
                            rotation: open.id,
                            owner: open.owner.unwrap_or_default(),
                        },
                        record,
                    ));
                }
                info!(credential = %spec.id, rotation = %rotation.id, trigger = trigger.as_str(), "rotation started");
                rotation
            }
        };
        if trigger == Trigger::Manual && record.status == Status::Failed {
            record.consecutive_failures = 0;
            self.emit(
                &spec.id,
                Event::AutomationStopped(false),
                "automation resumed by a manual rotation",
            );
        }
        if rotation.phase < Phase::Promoted {
            record.status = Status::Rotating;
        }
        let finishing_rollback = rotation.phase == Phase::RollingBack;
        let mut job = Job {
            spec,
            rotator,
            store,
            record,
            rotation,
            new: None,
            resumed,
        };
        // Make the new status visible (to `keyrotd status`) before any step runs.
        self.save(&mut job).await?;
        let outcome = self.drive(&mut job).await?;
        if finishing_rollback && job.rotation.phase == Phase::RolledBack {
            // That run only closed an earlier failure; the rotation the caller asked for (a
            // retry, a manual rotation) is still to do.
            info!(credential = %spec.id, rotation = %job.rotation.id, "finished rolling back the earlier rotation; starting a new one");
            return Box::pin(self.run_with(spec, job.rotator, job.store, trigger)).await;
        }
        Ok((outcome, job.record))
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
            started_at: std::time::SystemTime::now(),
        };
        let named = match store.last_rotation(ctx).await {
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

    async fn claim(&self, open: &RotationRecord, now: i64) -> Result<bool, StateError> {
        let dead = open.owner.as_deref().filter(|o| owner_is_dead(o));
        self.state
            .claim(
                &open.id,
                &self.owner,
                now + LEASE.as_secs() as i64,
                now,
                dead,
            )
            .await
    }

    /// Runs the protocol from the rotation's recorded phase until it finishes, fails, waits for
    /// its grace period, or shutdown parks it.
    async fn drive(&self, job: &mut Job<'_>) -> Result<Outcome, EngineError> {
        loop {
            if self.shutdown.is_cancelled() && job.rotation.phase != Phase::RollingBack {
                job.rotation.owner = None;
                job.rotation.lease_until = 0;
                self.save(job).await?;
                info!(credential = %job.spec.id, rotation = %job.rotation.id, phase = job.rotation.phase.as_str(), "rotation parked for shutdown");
                return Ok(Outcome::Parked {
                    rotation: job.rotation.id.clone(),
                });
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

    /// Runs one provider call as a journaled, timed step.
    async fn step<T>(
        &self,
        job: &Job<'_>,
        step: Step,
        call: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, Failure> {
        let rotation = &job.rotation.id;
        self.state
            .log_step(rotation, step.as_str(), "start", None)
            .await?;
        failpoint(step, "start").await;
        let started = Instant::now();
        let result = tokio::select! {
            result = call => result,
            never = self.keep_lease(job) => match never {},
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
    /// takes; never returns. If another process took the rotation over anyway, the next save
    /// fails with [`StateError::LeaseLost`] and this run stops.
    async fn keep_lease(&self, job: &Job<'_>) -> std::convert::Infallible {
        let mut every = tokio::time::interval(LEASE / 3);
        every.tick().await; // the first tick is immediate; the lease was just renewed
        loop {
            every.tick().await;
            if job.rotation.owner.is_none() {
                continue;
            }
            let now = Utc::now().timestamp();
            let until = now + LEASE.as_secs() as i64;
            match self
                .state
                .claim(&job.rotation.id, &self.owner, until, now, None)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    warn!(credential = %job.spec.id, rotation = %job.rotation.id, "lease lost to another process during a step")
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
        }
    }

    /// Reads the current value; a failure counts against `step`, but the read is not journaled.
    async fn current(&self, job: &Job<'_>, step: Step) -> Result<Option<Credential>, Failure> {
        let ctx = self.ctx(job);
        job.store.current(ctx).await.map_err(|source| {
            Failure::Step(StepError {
                credential: job.spec.id.clone(),
                step,
                source,
            })
        })
    }

    async fn issue_and_stage(&self, job: &mut Job<'_>) -> Result<(), Failure> {
        let ctx = self.ctx(job);
        if job.resumed && job.new.is_none() {
            // A crash hit between issuing and recording the stage. If the store has our value the
            // stage happened; otherwise the issued credential is lost and must be cleaned up.
            if let Some(mut staged) = self.step(job, Step::Stage, job.store.pending(ctx)).await? {
                merge_attrs(&mut staged.attrs, job.rotation.new_attrs.as_ref());
                job.rotation.new_attrs = Some(public_only(job.rotator.as_ref(), &staged.attrs));
                job.new = Some(staged);
                job.rotation.phase = Phase::Staged;
                return Ok(self.save(job).await?);
            }
            let current = self.current(job, Step::Rollback).await?;
            let issued = job.rotation.new_attrs.clone();
            self.step(
                job,
                Step::Rollback,
                job.rotator.abandon(ctx, issued.as_ref(), current.as_ref()),
            )
            .await?;
        }
        let current = self.current(job, Step::Issue).await?;
        let mut old_attrs = current
            .as_ref()
            .map(|c| public_only(job.rotator.as_ref(), &c.attrs));
        if let Some(old) = old_attrs.as_mut() {
            merge_attrs(
                old,
                self.last_promoted_attrs(&job.spec.id, &job.rotation.id)
                    .await?
                    .as_ref(),
            );
        }
        let new = self
            .step(job, Step::Issue, job.rotator.issue(ctx, current.as_ref()))
            .await?;
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

    /// The new credential: from memory, or read back from the store after a restart.
    async fn staged(&self, job: &mut Job<'_>) -> Result<Credential, Failure> {
        if let Some(new) = &job.new {
            return Ok(new.clone());
        }
        let ctx = self.ctx(job);
        let mut staged = self
            .step(job, Step::Stage, job.store.pending(ctx))
            .await?
            .ok_or_else(|| {
                Failure::Step(StepError {
                    credential: job.spec.id.clone(),
                    step: Step::Stage,
                    source: ProviderError::permanent("the staged value is no longer in the store"),
                })
            })?;
        merge_attrs(&mut staged.attrs, job.rotation.new_attrs.as_ref());
        job.new = Some(staged.clone());
        Ok(staged)
    }

    async fn activate(&self, job: &mut Job<'_>) -> Result<(), Failure> {
        let new = self.staged(job).await?;
        let current = self.current(job, Step::Activate).await?;
        let ctx = self.ctx(job);
        self.step(
            job,
            Step::Activate,
            job.rotator.activate(ctx, &new, current.as_ref()),
        )
        .await?;
        job.rotation.phase = Phase::Activated;
        Ok(self.save(job).await?)
    }

    async fn verify(&self, job: &mut Job<'_>) -> Result<(), Failure> {
        let new = self.staged(job).await?;
        let ctx = self.ctx(job);
        let (store, rotator) = (job.store.clone(), job.rotator.clone());
        let checks = async move {
            // Consumers will read the store, so the value there is the one that must work.
            match store.pending(ctx).await? {
                Some(c) if c.secret.expose_secret() == new.secret.expose_secret() => {}
                Some(_) => {
                    return Err(ProviderError::permanent(
                        "the staged value read back differs from the issued one",
                    ))
                }
                None => {
                    return Err(ProviderError::permanent(
                        "the staged value is missing from the store",
                    ))
                }
            }
            rotator.verify(ctx, &new).await
        };
        self.step(job, Step::Verify, checks).await?;
        job.rotation.phase = Phase::Verified;
        Ok(self.save(job).await?)
    }

    async fn promote(&self, job: &mut Job<'_>) -> Result<(), Failure> {
        let ctx = self.ctx(job);
        self.step(job, Step::Promote, job.store.promote(ctx))
            .await?;
        let now = Utc::now().timestamp();
        let revoke_at = now + job.spec.grace.as_secs() as i64;
        job.rotation.phase = Phase::Promoted;
        job.rotation.revoke_at = Some(revoke_at);
        job.rotation.error = None;
        job.record.issued_at = Some(now);
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
        self.step(job, Step::Revoke, job.store.release_previous(ctx))
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

    async fn roll_back(&self, job: &mut Job<'_>) -> Result<(), Failure> {
        let ctx = self.ctx(job);
        let current = self.current(job, Step::Rollback).await?;
        let issued = job.rotation.new_attrs.clone();
        self.step(
            job,
            Step::Rollback,
            job.rotator.abandon(ctx, issued.as_ref(), current.as_ref()),
        )
        .await?;
        self.step(job, Step::Rollback, job.store.discard(ctx))
            .await?;
        job.rotation.phase = Phase::RolledBack;
        job.rotation.finished_at = Some(Utc::now().timestamp());
        job.rotation.owner = None;
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
            Failure::Step(e) => e,
        };
        let message = err.to_string();
        warn!(credential = %job.spec.id, rotation = %job.rotation.id, step = err.step.as_str(), error = %err.source, "rotation step failed");
        job.rotation.error = Some(message.clone());
        let phase = job.rotation.phase;
        // Before verification nothing is promised to consumers: undo it. A rollback that fails
        // itself stays in phase RollingBack and is resumed by the retry.
        if phase < Phase::Verified {
            job.rotation.phase = Phase::RollingBack;
            self.save(job).await?;
            if let Err(Failure::State(e)) = self.roll_back(job).await {
                return Err(e.into());
            }
        }
        job.record.consecutive_failures += 1;
        job.record.last_error = Some(message.clone());
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
        if job.record.consecutive_failures >= policy.max_attempts {
            job.record.status = Status::Failed;
            job.record.next_attempt_at = None;
            warn!(credential = %job.spec.id, attempts = job.record.consecutive_failures, "retries exhausted: credential marked failed; rotate it by hand to resume");
        } else {
            let delay = backoff(
                policy.backoff,
                policy.max_backoff,
                job.record.consecutive_failures,
            );
            job.record.status = Status::Retrying;
            job.record.next_attempt_at =
                Some(Utc::now().timestamp() + delay.as_secs().max(1) as i64);
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
            error: message,
        })
    }

    async fn save(&self, job: &mut Job<'_>) -> Result<(), StateError> {
        if job.rotation.owner.is_some() {
            job.rotation.lease_until = Utc::now().timestamp() + LEASE.as_secs() as i64;
        }
        self.state
            .save(&job.rotation, &job.record, &self.owner)
            .await
    }

    /// Attributes of the credential promoted by the last finished or promoted rotation (a raw
    /// store keeps only the secret, so the key id comes from the journal).
    async fn last_promoted_attrs(
        &self,
        credential_id: &str,
        this: &str,
    ) -> Result<Option<Attrs>, StateError> {
        let history = self.state.history(Some(credential_id), 5).await?;
        Ok(history
            .into_iter()
            .map(|(r, _)| r)
            .find(|r| r.id != this && matches!(r.phase, Phase::Promoted | Phase::Done))
            .and_then(|r| r.new_attrs))
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

/// `host:pid:nonce`: unique per process, and tells a same-host successor whether we are gone.
fn owner_id() -> &'static str {
    static OWNER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    OWNER.get_or_init(|| {
        format!(
            "{}:{}:{}",
            hostname(),
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        )
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Whether `owner` is a process on this host that no longer runs.
fn owner_is_dead(owner: &str) -> bool {
    let mut parts = owner.splitn(3, ':');
    let (Some(host), Some(pid), Some(_nonce)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    if host != hostname() {
        return false;
    }
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    if pid == std::process::id() {
        // Our pid but not us: an earlier incarnation (a container's pid 1 restarting).
        return owner != owner_id();
    }
    !std::path::Path::new("/proc").join(pid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let (b, max) = (Duration::from_secs(10), Duration::from_secs(60));
        let first = backoff(b, max, 1);
        assert!(first >= Duration::from_secs(5) && first <= b);
        let late = backoff(b, max, 30);
        assert!(late >= Duration::from_secs(30) && late <= max);
    }

    #[test]
    fn a_live_owner_is_not_dead_and_a_gone_one_is() {
        assert!(
            !owner_is_dead(&format!("{}:1:x", hostname())),
            "pid 1 always exists"
        );
        assert!(
            owner_is_dead(&format!("{}:4194305:x", hostname())),
            "beyond pid_max"
        );
        assert!(
            !owner_is_dead("another-host:4194305:x"),
            "other hosts only by lease expiry"
        );
    }
}
