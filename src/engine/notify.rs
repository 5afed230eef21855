//! Delivery hooks as protocol steps: after `stage ok` the `stage` hooks, after `promote ok` the
//! `promote` hooks, each attempt journaled as a `notify` step (`start`, then `ok` or `error`, the
//! detail naming the hook: `promote hook 0 (signal)`), counted in `keyrotd_hook_runs_total`.
//!
//! Invariants:
//! - a hook journaled `ok` (or `skip`, given up under `revoke_after_hook_failure`) for this
//!   rotation never runs again for it; one journaled `start` without `ok` runs again on resume,
//!   so hooks must be idempotent;
//! - while a rotation's promote hooks are pending its `revoke_at` is unset, so the revoke waits
//!   for them (and a restart runs them at once rather than after the grace period); once they
//!   are settled `revoke_at` becomes promotion time plus grace, never earlier;
//! - a failed promote hook never rolls back: the rotation stays promoted and the engine's retry
//!   runs the hooks not yet settled; a failed stage hook rolls back (nothing is promoted yet);
//! - a hook sees the new credential's public attributes and ids only, never its secret.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use keyrotd_plugin::{Attrs, ProviderError};
use tracing::{info, warn};

use super::failure::Failure;
use super::{Condition, Engine, Job};
use crate::config::{HookSpec, HookWhen};
use crate::hooks::{self, HookError, HookInput};
use crate::protocol::Step;
use crate::state::{JournalLine, StateError};

/// A hook's name in the journal: when it runs, its index in the credential's list and its kind.
pub fn hook_label(when: HookWhen, index: usize, kind: &str) -> String {
    format!("{} hook {index} ({kind})", when.as_str())
}

/// The hook a `notify` line's detail names: the label itself (`start`, `ok`), or the label
/// before `: ` and the error or reason (`error`, `skip`).
pub fn hook_of(detail: &str) -> &str {
    detail.split_once(": ").map_or(detail, |(label, _)| label)
}

impl Engine {
    /// Runs the `when` hooks this rotation has not settled yet, in order. Returns the first
    /// failure (after the hook's own attempts), unless `revoke_after_hook_failure` lets the
    /// revoke proceed past a promote hook whose attempts are exhausted.
    pub(super) async fn notify(&self, job: &mut Job<'_>, when: HookWhen) -> Result<(), Failure> {
        let spec = job.spec;
        let hooks: Vec<(usize, &HookSpec)> = spec
            .hooks
            .iter()
            .enumerate()
            .filter(|(_, h)| h.when == when)
            .collect();
        if hooks.is_empty() {
            return Ok(());
        }
        let settled = self.settled_hooks(job).await?;
        let mut gave_up = false;
        for (index, hook) in hooks {
            let label = hook_label(when, index, hook.action.kind());
            if settled.contains(&label) {
                continue;
            }
            let slot = format!("{}:{index}", when.as_str());
            match self.run_hook(job, hook, &label, &slot).await {
                Ok(()) => {}
                Err(Failure::Step(e))
                    if when == HookWhen::Promote && spec.revoke_after_hook_failure =>
                {
                    let why = format!(
                        "{label}: attempts exhausted; the revoke proceeds (revoke_after_hook_failure)"
                    );
                    self.journal_line(job, "skip", &why).await?;
                    warn!(credential = %spec.id, rotation = %job.rotation.id, hook = %label, "delivery hook gave up; the revoke proceeds without it");
                    let summary = format!("delivery hook failed, given up: {}", e.source);
                    self.raise(&spec.id, Condition::HookFailed, &summary);
                    gave_up = true;
                }
                Err(failure) => return Err(failure),
            }
        }
        if !gave_up {
            self.clear(&spec.id, Condition::HookFailed);
        }
        Ok(())
    }

    /// One hook, up to its `retry.max_attempts` times with its backoff between attempts.
    async fn run_hook(
        &self,
        job: &mut Job<'_>,
        hook: &HookSpec,
        label: &str,
        slot: &str,
    ) -> Result<(), Failure> {
        let (id, kind) = (job.spec.id.clone(), hook.action.kind());
        let no_attrs = Attrs::new();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let input = HookInput {
                credential_id: &job.spec.id,
                rotation_id: &job.rotation.id,
                attrs: job.rotation.new_attrs.as_ref().unwrap_or(&no_attrs),
            };
            let call = async {
                hooks::run(hook, input).await.map_err(|e| {
                    let error = ProviderError::transient(format!("{label}: {e}"));
                    match e {
                        HookError::Timeout(_) => error.with_code("timeout"),
                        HookError::Failed(_) => error,
                    }
                })
            };
            let result = self.step_about(job, Step::Notify, Some(label), call).await;
            let now = Utc::now().timestamp();
            match result {
                Ok(summary) => {
                    // The `ok` line is durable before anything reports it.
                    self.flush(job).await?;
                    self.count_hook(&id, kind, slot, "ok", now);
                    info!(credential = %id, rotation = %job.rotation.id, hook = %label, result = %summary, "delivery hook ok");
                    return Ok(());
                }
                Err(Failure::Step(e)) => {
                    let timeout = e.source.code.as_deref() == Some("timeout");
                    self.count_hook(
                        &id,
                        kind,
                        slot,
                        if timeout { "timeout" } else { "error" },
                        now,
                    );
                    warn!(credential = %id, rotation = %job.rotation.id, hook = %label, attempt, error = %e.source, "delivery hook failed");
                    if attempt >= hook.retry.max_attempts {
                        return Err(Failure::Step(e));
                    }
                    let delay = hook.retry.delays().delay(attempt);
                    self.pause(delay).await?;
                    // Renews the lease after the wait.
                    self.save(job).await?;
                }
                Err(other) => return Err(other),
            }
        }
    }

    /// Waits `delay` between a hook's attempts; shutdown interrupts the wait (the hook runs
    /// again on resume).
    async fn pause(&self, delay: Duration) -> Result<(), Failure> {
        tokio::select! {
            () = tokio::time::sleep(delay) => Ok(()),
            () = self.shutdown.cancelled() => Err(Failure::Interrupted),
        }
    }

    /// Counts one attempt; the gauges are per hook (`slot`: `promote:0`), so that one failing
    /// hook is not hidden by another of the same kind that succeeds.
    fn count_hook(&self, credential: &str, kind: &str, slot: &str, result: &str, now: i64) {
        let m = &self.metrics;
        m.hook_runs
            .with_label_values(&[credential, kind, result])
            .inc();
        let gauge = if result == "ok" {
            &m.hook_last_success
        } else {
            &m.hook_last_failure
        };
        gauge.with_label_values(&[credential, kind, slot]).set(now);
    }

    /// Appends one `notify` line now (a hook given up).
    async fn journal_line(&self, job: &Job<'_>, event: &str, detail: &str) -> Result<(), Failure> {
        self.flush(job).await?;
        let line = JournalLine {
            at_ms: Utc::now().timestamp_millis(),
            step: Step::Notify.as_str().to_owned(),
            event: event.to_owned(),
            detail: Some(detail.to_owned()),
            trigger: job.trigger,
        };
        self.state.record(&job.rotation.id, &[line], None).await?;
        Ok(())
    }

    /// The hooks this rotation's journal shows `ok` or given up (`skip`).
    async fn settled_hooks(&self, job: &Job<'_>) -> Result<HashSet<String>, StateError> {
        self.flush(job).await?;
        let steps = self
            .state
            .steps(&job.rotation.id, Step::Notify.as_str())
            .await?;
        Ok(steps
            .into_iter()
            .filter(|s| matches!(s.event.as_str(), "ok" | "skip"))
            .filter_map(|s| s.detail.as_deref().map(|d| hook_of(d).to_owned()))
            .collect())
    }
}
