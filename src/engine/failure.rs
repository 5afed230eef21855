//! What a failed step leads to: a rollback while nothing is promoted, then a retry after an
//! exponential backoff with jitter, or, once retries run out (or one confirmation retry of a
//! permanent error), the credential marked failed until an operator rotates it by hand.
//!
//! Invariant: a failure at or after promotion never rolls back, except a promotion the store
//! refused as a conflict (someone else wrote the value since the stage: nothing was
//! promoted); the rotation keeps the failure that stopped it, even when rolling it back fails
//! too.

use chrono::Utc;
use keyrotd_plugin::ErrorClass;
use tracing::{info, warn};

use super::limits::{within, Limit, PluginLimit};
use super::{Condition, Engine, EngineError, Job, Outcome, StepError};
use crate::protocol::{Phase, Step};
use crate::state::{StateError, Status};

impl Engine {
    /// Undoes an unfinished rotation. Keeps the lease: the caller records the outcome and then
    /// releases it.
    pub(super) async fn roll_back(&self, job: &mut Job<'_>) -> Result<(), Failure> {
        let ctx = self.ctx(job);
        self.abandon(job).await?;
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

    /// The rollback step: the rotator abandons what it issued, given the store's current value.
    pub(super) async fn abandon(&self, job: &Job<'_>) -> Result<(), Failure> {
        let ctx = self.ctx(job);
        let (rotator, store) = (job.rotator.clone(), job.store.clone());
        let (rl, sl) = (Limit::rotator(job), Limit::store(job));
        let issued = job.rotation.new_attrs.as_ref();
        self.step(job, Step::Rollback, async {
            let current = within(sl, store.current(ctx)).await?;
            within(rl, rotator.abandon(ctx, issued, current.as_ref())).await
        })
        .await
    }

    /// Records a failed step: rolls back what is not yet promoted, schedules a retry with backoff
    /// and jitter, or marks the credential failed once retries are exhausted.
    pub(super) async fn fail(
        &self,
        job: &mut Job<'_>,
        failure: Failure,
    ) -> Result<Outcome, EngineError> {
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
        // Before verification nothing is promised to consumers: undo it. Nor after it when the
        // store refused the promotion for a value someone else wrote since the stage: nothing
        // was promoted, and retrying can never succeed. A rollback that fails itself stays in
        // phase RollingBack and is resumed by the retry.
        let refused =
            phase == Phase::Verified && err.step == Step::Promote && err.source.is_conflict();
        if phase.rolls_back_on_failure() || refused {
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
        let (condition, summary) = match err.step {
            Step::Revoke => (
                Condition::RevokeFailed,
                format!("revoking the old credential failed: {message}"),
            ),
            // The revoke waits for a check that works: it never goes ahead on an error.
            Step::CheckUse => (
                Condition::RevokeFailed,
                format!(
                    "checking whether the old credential is still in use failed (its revoke waits): {message}"
                ),
            ),
            Step::Notify => (
                Condition::HookFailed,
                format!("delivery hook failed: {message}"),
            ),
            _ => (
                Condition::RotationFailed,
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
            let delay = policy.delays().delay(job.record.consecutive_failures);
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
        self.raise(&job.spec.id, condition, &summary);
        if job.record.status == Status::Failed {
            self.raise(
                &job.spec.id,
                Condition::AutomationStopped,
                "retries exhausted; automation stopped until an operator rotates it by hand",
            );
        }
        Ok(Outcome::Failed {
            rotation: job.rotation.id.clone(),
            error: outcome_error,
        })
    }
}

/// A step failure or a state failure, inside the engine.
pub(super) enum Failure {
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
