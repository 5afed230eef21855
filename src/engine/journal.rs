//! One plugin call as a protocol step: journaled before (`start`) and after (`ok`, `error` or
//! `interrupted`), timed into `keyrotd_rotation_step_duration_seconds`, bounded by its plugins'
//! deadline, and abandoned if this process loses the rotation's lease meanwhile.

use std::time::Instant;

use keyrotd_plugin::ProviderError;
use tracing::warn;

use super::failpoint::failpoint;
use super::failure::Failure;
use super::{Engine, Job, StepError};
use crate::protocol::Step;

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
        if self.abort.is_cancelled() {
            return Err(Failure::Interrupted);
        }
        let rotation = &job.rotation.id;
        self.state
            .log_step(rotation, step.as_str(), "start", None, job.trigger)
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
                    job.trigger,
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
                    .log_step(rotation, step.as_str(), "ok", None, job.trigger)
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
                        job.trigger,
                    )
                    .await?;
                Err(Failure::Step(err))
            }
        }
    }
}
