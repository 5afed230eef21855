//! One plugin call as a protocol step: journaled before (`start`) and after (`ok`, `error` or
//! `interrupted`), timed into `keyrotd_rotation_step_duration_seconds`, bounded by its plugins'
//! deadline, and abandoned if this process loses the rotation's lease meanwhile; and the journal
//! writes held back to share one commit with the next.
//!
//! Invariants: a step's provider call starts only after its `start` line is durable; a line or a
//! save held back is written, ahead of anything else, by the rotation's next write, and nothing
//! is reported (an outcome, a log line, a metric) before that write.

use std::sync::{MutexGuard, PoisonError};
use std::time::Instant;

use keyrotd_plugin::ProviderError;
use tracing::warn;

use super::failpoint::failpoint;
use super::failure::Failure;
use super::{Engine, Job, StepError, LEASE};
use crate::protocol::Step;
use crate::state::{CredentialRecord, JournalLine, RotationRecord, StateError};

/// Journal writes of one rotation held back to share the commit of its next write: a step's `ok`
/// line, and the save of the phase it reached, go out with the next step's `start` line.
#[derive(Default)]
pub(super) struct Unwritten {
    lines: Vec<JournalLine>,
    save: Option<(RotationRecord, CredentialRecord)>,
}

fn line(job: &Job<'_>, step: Step, event: &str, detail: Option<&str>) -> JournalLine {
    JournalLine {
        at_ms: chrono::Utc::now().timestamp_millis(),
        step: step.as_str().to_owned(),
        event: event.to_owned(),
        detail: detail.map(str::to_owned),
        trigger: job.trigger,
    }
}

fn held<'j>(job: &'j Job<'_>) -> MutexGuard<'j, Unwritten> {
    // The guard is never held across an await or a panic-prone call.
    job.unwritten.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Engine {
    /// Saves the job's rotation and credential record now, with whatever is held back, renewing
    /// the lease while this process holds it.
    pub(super) async fn save(&self, job: &mut Job<'_>) -> Result<(), StateError> {
        renew_in_record(job);
        self.write(job, None, true).await
    }

    /// Saves the job's rotation and credential record as they are now, with the rotation's next
    /// write: use only where that write comes before anything is reported.
    pub(super) fn save_later(&self, job: &mut Job<'_>) {
        renew_in_record(job);
        held(job).save = Some((job.rotation.clone(), job.record.clone()));
    }

    /// Puts `detail` (a reason, no secret) on the `ok` line of the step that just succeeded,
    /// which is still held back.
    pub(super) fn annotate(&self, job: &Job<'_>, detail: &str) {
        if let Some(ok) = held(job).lines.last_mut().filter(|l| l.event == "ok") {
            ok.detail = Some(detail.to_owned());
        }
    }

    /// Writes whatever is held back.
    pub(super) async fn flush(&self, job: &Job<'_>) -> Result<(), StateError> {
        self.write(job, None, false).await
    }

    /// Writes what is held back, then `line`; with `save_now`, the job's current records instead
    /// of a save held back. One commit; returns once it is durable.
    async fn write(
        &self,
        job: &Job<'_>,
        line: Option<JournalLine>,
        save_now: bool,
    ) -> Result<(), StateError> {
        let Unwritten { mut lines, save } = std::mem::take(&mut *held(job));
        lines.extend(line);
        let save = match (save_now, &save) {
            (true, _) => Some((&job.rotation, &job.record)),
            (false, Some((rotation, record))) => Some((rotation, record)),
            (false, None) => None,
        };
        if lines.is_empty() && save.is_none() {
            return Ok(());
        }
        self.state.record(&job.rotation.id, &lines, save).await?;
        for done in lines.iter().filter(|l| l.event == "ok") {
            failpoint(&done.step, "ok").await;
        }
        Ok(())
    }
}

impl Engine {
    /// Runs one provider call as a journaled, timed step, bounded by the plugins' deadline. The
    /// call is abandoned (dropped) if this process loses the rotation's lease while it runs: from
    /// then on another process drives.
    pub(super) async fn step<T>(
        &self,
        job: &Job<'_>,
        step: Step,
        call: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, Failure> {
        self.step_about(job, step, None, call).await
    }

    /// [`Engine::step`] with `about` (no secret) in its `start` and `ok` lines: which of several
    /// runs of one step this is (`promote hook 0 (exec)`; the call's errors name it themselves).
    pub(super) async fn step_about<T>(
        &self,
        job: &Job<'_>,
        step: Step,
        about: Option<&str>,
        call: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, Failure> {
        if self.abort.is_cancelled() {
            return Err(Failure::Interrupted);
        }
        let rotation = &job.rotation.id;
        self.write(job, Some(line(job, step, "start", about)), false)
            .await?;
        failpoint(step.as_str(), "start").await;
        let started = Instant::now();
        let result = tokio::select! {
            result = self.bounded(Self::deadline(job, step), call) => result,
            lost = self.keep_lease(job) => return Err(Failure::State(lost)),
        };
        let Some(result) = result else {
            warn!(credential = %job.spec.id, rotation = %rotation, step = step.as_str(), "shutdown deadline passed: step interrupted; it resumes from the journal");
            let why = "the shutdown deadline passed; the step resumes at the next start";
            self.write(job, Some(line(job, step, "interrupted", Some(why))), false)
                .await?;
            return Err(Failure::Interrupted);
        };
        self.metrics
            .step_seconds
            .with_label_values(&[step.as_str()])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(v) => {
                failpoint(step.as_str(), "done").await;
                // Written with the rotation's next write (the phase this step reached, the next
                // step's start), which comes before anything reports the step done.
                held(job).lines.push(line(job, step, "ok", about));
                Ok(v)
            }
            Err(source) => {
                let err = StepError {
                    credential: job.spec.id.clone(),
                    step,
                    source,
                };
                let detail = err.source.to_string();
                self.write(job, Some(line(job, step, "error", Some(&detail))), false)
                    .await?;
                Err(Failure::Step(err))
            }
        }
    }
}

/// Extends the lease in the job's rotation record while this process holds it.
fn renew_in_record(job: &mut Job<'_>) {
    if job.rotation.owner.is_some() {
        job.rotation.lease_until = chrono::Utc::now()
            .timestamp()
            .saturating_add(LEASE.as_secs() as i64);
    }
}
