//! A rotation's lease: taking the credential's open rotation (or beginning a new one) under this
//! process's lease, keeping it while a step runs, and giving it back to park for shutdown.
//!
//! Invariant: a job is built only from the rotation and credential records read *after* the
//! lease was taken; whatever was read before may be stale.

use std::sync::Arc;

use chrono::Utc;
use keyrotd_plugin::{Rotator, Store};
use tracing::{info, warn};

use super::{Condition, Engine, EngineError, Job, Outcome, LEASE};
use crate::config::CredentialSpec;
use crate::protocol::{Phase, Trigger};
use crate::state::{Busy, Claim, CredentialRecord, RotationRecord, StateError, Status};

/// What [`Engine::take`] found.
pub(super) enum Taken<'a> {
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

impl Engine {
    /// Takes the credential's open rotation (or begins a new one) under this process's lease,
    /// and reads the credential's record under it. Everything read before the lease may be
    /// stale; the job is built only from what was read after.
    pub(super) async fn take<'a>(
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
            self.clear(&spec.id, Condition::AutomationStopped);
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
            trigger,
            unwritten: Default::default(),
        };
        // Make the new status visible (to `keyrotd status`) before any step runs: the first
        // step's `start` carries it.
        self.save_later(&mut job);
        Ok(Taken::Job(Box::new(job)))
    }

    /// Releases the rotation for shutdown: the next start (or generation) resumes it at once.
    pub(super) async fn park(&self, job: &mut Job<'_>) -> Result<Outcome, EngineError> {
        job.rotation.owner = None;
        job.rotation.lease_until = 0;
        self.save(job).await?;
        info!(credential = %job.spec.id, rotation = %job.rotation.id, phase = job.rotation.phase.as_str(), "rotation parked for shutdown");
        Ok(Outcome::Parked {
            rotation: job.rotation.id.clone(),
        })
    }

    /// Renews the lease of the rotation `job` drives while a step runs, however long the provider
    /// takes. Returns only when the lease is lost (another process took the rotation over after
    /// our lease expired, say while the database was unreachable), so the step is cancelled.
    pub(super) async fn keep_lease(&self, job: &Job<'_>) -> StateError {
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
}
