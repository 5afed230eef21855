//! Driving the protocol: from the rotation's recorded phase, one step after another (issue,
//! stage, activate, verify, promote, and after the grace period revoke and release) until the
//! rotation finishes, fails, waits for its grace period, or shutdown parks it.
//!
//! Invariants: a phase is saved only after its step has completed; the new secret exists only in
//! memory between `issue` and `stage`; the old credential is revoked only in phase `Promoted`,
//! once `revoke_at` has passed. Up to `verified`, a phase is saved with the next step's `start`
//! (`save_later`); `promoted`, `done` and `rolled_back` are saved at once, before they are
//! reported.

use std::time::Duration;

use chrono::Utc;
use keyrotd_plugin::{Attrs, Credential, ProviderError, StepContext};
use secrecy::ExposeSecret;
use tracing::info;

use super::failure::Failure;
use super::limits::{within, Limit, PluginLimit};
use super::{public_only, Condition, Engine, EngineError, Job, Outcome};
use crate::config::HookWhen;
use crate::fmt::human;
use crate::protocol::{Phase, Step};
use crate::state::Status;

impl Engine {
    /// Runs the protocol from the rotation's recorded phase until it finishes, fails, waits for
    /// its grace period, or shutdown parks it.
    pub(super) async fn drive(&self, job: &mut Job<'_>) -> Result<Outcome, EngineError> {
        loop {
            if self.shutdown.is_cancelled() && job.rotation.phase != Phase::RollingBack {
                return self.park(job).await;
            }
            let result = match job.rotation.phase {
                Phase::Issuing | Phase::Issued => self.issue_and_stage(job).await,
                Phase::Staged => match self.notify(job, HookWhen::Stage).await {
                    Ok(()) => self.activate(job).await,
                    Err(failure) => Err(failure),
                },
                Phase::Activated => self.verify(job).await,
                Phase::Verified => self.promote(job).await,
                Phase::Promoted => {
                    if job.rotation.revoke_at.is_none() {
                        // Promote hooks pending: they run before the grace period may end.
                        if let Err(failure) = self.notify(job, HookWhen::Promote).await {
                            return self.fail(job, failure).await;
                        }
                        self.hooks_settled(job).await?;
                    }
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
                        _ => match self.check_use(job).await {
                            Ok(Some(deferred)) => return Ok(deferred),
                            Ok(None) => self.revoke(job).await,
                            Err(failure) => Err(failure),
                        },
                    }
                }
                Phase::RollingBack => self.roll_back(job).await,
                Phase::Done => {
                    self.flush(job).await?;
                    return Ok(Outcome::Completed {
                        rotation: job.rotation.id.clone(),
                    });
                }
                Phase::RolledBack => {
                    self.flush(job).await?;
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

    /// What every plugin call of `job`'s rotation is told: its ids, fields and start time.
    pub(super) fn ctx<'a>(&self, job: &'a Job<'_>) -> StepContext<'a> {
        StepContext {
            credential_id: &job.spec.id,
            rotation_id: &job.rotation.id,
            secret_field: job.rotator.secret_field(),
            started_at: std::time::UNIX_EPOCH
                + Duration::from_secs(job.rotation.started_at.max(0) as u64),
            old_attrs: job.rotation.old_attrs.as_ref(),
        }
    }

    /// Issues the new credential and stages it in the store (after a crash between the two,
    /// finds out which happened first).
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
                self.save_later(job);
                return Ok(());
            }
            self.abandon(job).await?;
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
        // Saved with the stage's `start`.
        self.save_later(job);
        // The secret exists only in memory now: store it before anything else happens.
        let ctx = self.ctx(job);
        self.step(job, Step::Stage, job.store.stage(ctx, &new))
            .await?;
        job.new = Some(new);
        job.rotation.phase = Phase::Staged;
        self.save_later(job);
        Ok(())
    }

    /// Makes the staged credential usable at the provider.
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
        self.save_later(job);
        Ok(())
    }

    /// Proves that the value consumers will read works.
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
        self.save_later(job);
        Ok(())
    }

    /// Makes the new value current in the store and starts the grace period.
    async fn promote(&self, job: &mut Job<'_>) -> Result<(), Failure> {
        let ctx = self.ctx(job);
        self.step(job, Step::Promote, job.store.promote(ctx))
            .await?;
        let now = Utc::now();
        let revoke_at = revoke_time(now, job.spec.grace);
        job.rotation.phase = Phase::Promoted;
        // With promote hooks, the revoke time is set once they are settled (`notify`).
        let hooks = job.spec.hooks.iter().any(|h| h.when == HookWhen::Promote);
        job.rotation.revoke_at = (!hooks).then_some(revoke_at);
        job.rotation.error = None;
        job.record.issued_at = Some(now.timestamp());
        job.record.current_attrs = job.rotation.new_attrs.clone();
        let was_failing = job.record.consecutive_failures > 0;
        job.record.succeed(Status::Grace);
        self.save(job).await?;
        self.metrics.rotations.with_label_values(&["success"]).inc();
        info!(credential = %job.spec.id, rotation = %job.rotation.id, grace = %human(job.spec.grace), "new credential promoted");
        if was_failing {
            self.clear(&job.spec.id, Condition::RotationFailed);
        }
        Ok(())
    }

    /// The promote hooks are settled: the revoke may come at promotion time plus grace (the
    /// promotion's whole second plus one, so the grace period is never cut short).
    async fn hooks_settled(&self, job: &mut Job<'_>) -> Result<(), crate::state::StateError> {
        let now = Utc::now();
        // Without a grace period the revoke may come at once.
        let late = i64::from(!job.spec.grace.is_zero());
        let promoted = job
            .record
            .issued_at
            .and_then(|t| chrono::DateTime::from_timestamp(t.saturating_add(late), 0))
            .unwrap_or(now);
        job.rotation.revoke_at = Some(revoke_time(promoted, job.spec.grace));
        if job.record.consecutive_failures > 0 {
            // Failed hooks had marked it retrying; it is in its grace period again.
            job.record.succeed(Status::Grace);
        }
        self.save(job).await
    }

    /// After the grace period: revokes the old credential and lets the store release it.
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
            self.clear(&job.spec.id, Condition::RevokeFailed);
        }
        if job.spec.revoke.when == crate::config::RevokeWhen::WhenUnused {
            self.clear(&job.spec.id, Condition::RevokeDelayed);
        }
        Ok(())
    }
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
}
