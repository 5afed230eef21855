//! The in-use check before a revoke (`revoke = "when_unused"`): once the grace period has
//! passed, the rotator says whether the old credential was used since the promotion. Unused:
//! the revoke goes ahead. In use (or unknown, or unused for less than `revoke_min_quiet`): the
//! revoke is deferred to the next check, `revoke_check_every` from now, by moving the rotation's
//! `revoke_at`, saved with the check's journal line, so a restart (even after kill -9) resumes
//! the wait where it was. Past `max_revoke_delay` after the grace period, the `revoke_delayed`
//! alert is raised, and the revoke keeps waiting or, with `on_max_revoke_delay = "revoke"`, goes
//! ahead anyway.
//!
//! Invariants: a failed check never leads to a revoke (it fails the step and is retried with
//! backoff like any step after promotion); each check is journaled as a `check_use` step whose
//! `ok` line carries the answer and its reason (public attributes and times, never a secret).

use std::time::{Duration, SystemTime};

use chrono::{TimeZone, Utc};
use keyrotd_plugin::{Usage, UsageReport};
use tracing::{info, warn};

use super::failure::Failure;
use super::limits::{within, Limit, PluginLimit};
use super::{Condition, Engine, Job, Outcome};
use crate::config::{OnMaxRevokeDelay, RevokeWhen};
use crate::fmt::human;
use crate::protocol::Step;
use crate::schedule::secs;
use crate::state::{StateError, StateStore, Status};

/// The journal detail of a check that found the old credential in use starts with this.
const IN_USE: &str = "in use";

impl Engine {
    /// Whether the revoke of `job`'s promoted rotation, whose grace period has passed, may go
    /// ahead now: `None` when it may (after-grace policy, unused, or past `max_revoke_delay`
    /// with `on_max_revoke_delay = "revoke"`), the outcome of the deferral otherwise.
    pub(super) async fn check_use(&self, job: &mut Job<'_>) -> Result<Option<Outcome>, Failure> {
        let policy = job.spec.revoke;
        let Some(old) = job.rotation.old_attrs.clone() else {
            return Ok(None);
        };
        if policy.when != RevokeWhen::WhenUnused {
            return Ok(None);
        }
        let promoted = job.record.issued_at.unwrap_or(job.rotation.started_at);
        // A use counts from the promotion, then from the last check that found one: a consumer
        // that switched stops adding uses, however recently it used the old credential before.
        let seen = self.last_seen_in_use(job).await?;
        let since_secs = promoted.max(seen.unwrap_or(i64::MIN));
        let since = SystemTime::UNIX_EPOCH + Duration::from_secs(since_secs.max(0) as u64);
        let ctx = self.ctx(job);
        let (rotator, limit) = (job.rotator.clone(), Limit::rotator(job));
        let report = self
            .step(
                job,
                Step::CheckUse,
                within(limit, rotator.last_used(ctx, &old, since)),
            )
            .await?;
        let now = Utc::now().timestamp();
        let last_used = report.last_used.map(unix);
        let quiet_since = since_secs.max(last_used.unwrap_or(i64::MIN));
        let quiet = now.saturating_sub(quiet_since);
        let wait = match report.usage {
            Usage::Unused if quiet >= secs(policy.min_quiet) => None,
            Usage::Unused => Some(format!(
                "unused, but quiet for only {} of revoke_min_quiet {}: {}",
                human(Duration::from_secs(quiet.max(0) as u64)),
                human(policy.min_quiet),
                report.reason
            )),
            Usage::InUse => Some(format!("{IN_USE}: {}", describe(&report, now))),
            Usage::Unknown => Some(format!("unknown: {}", report.reason)),
        };
        let Some(why) = wait else {
            self.annotate(job, &format!("unused: {}", describe(&report, now)));
            info!(credential = %job.spec.id, rotation = %job.rotation.id, reason = %report.reason, "old credential unused; revoking it");
            return Ok(None);
        };
        let deadline = policy.deadline(promoted, job.spec.grace);
        if now >= deadline {
            let summary = format!(
                "the old credential is still not revocable {} after the grace period ended ({why})",
                human(policy.max_delay)
            );
            self.raise(&job.spec.id, Condition::RevokeDelayed, &summary);
            if policy.on_max_delay == OnMaxRevokeDelay::Revoke {
                self.annotate(
                    job,
                    &format!("{why}; max_revoke_delay passed: revoking anyway (on_max_revoke_delay = \"revoke\")"),
                );
                warn!(credential = %job.spec.id, rotation = %job.rotation.id, "max_revoke_delay passed with the old credential in use; revoking it as configured");
                return Ok(None);
            }
        }
        let next = now.saturating_add(secs(policy.check_every).max(1));
        self.annotate(job, &format!("{why}; next check at {}", at(next)));
        info!(credential = %job.spec.id, rotation = %job.rotation.id, reason = %why, next_check = %at(next), "old credential still in use; revoke deferred");
        job.rotation.revoke_at = Some(next);
        job.rotation.owner = None;
        job.rotation.lease_until = 0;
        // A check that answered is a success: failed checks before it no longer count towards
        // `max_attempts`, and their alert resolves.
        job.record.succeed(Status::RevokeDelayed);
        self.clear(&job.spec.id, Condition::RevokeFailed);
        self.save(job).await?;
        Ok(Some(Outcome::RevokeDelayed {
            rotation: job.rotation.id.clone(),
            revoke_at: next,
            last_used,
            reason: why,
        }))
    }

    /// When the latest check of this rotation that found the old credential in use began (its
    /// journal's `start` line), if one did: the next check counts uses from there.
    async fn last_seen_in_use(&self, job: &Job<'_>) -> Result<Option<i64>, Failure> {
        let checks = self
            .state
            .steps(&job.rotation.id, Step::CheckUse.as_str())
            .await?;
        let mut started = None;
        let mut seen = None;
        for step in checks {
            match step.event.as_str() {
                "start" => started = Some(step.at_ms.div_euclid(1000)),
                "ok" if step
                    .detail
                    .as_deref()
                    .is_some_and(|d| d.starts_with(IN_USE)) =>
                {
                    seen = started.or(seen)
                }
                _ => {}
            }
        }
        Ok(seen)
    }
}

/// Why the revoke of credential `id`'s open rotation waits, for `keyrotd status`: the latest
/// in-use check's answer and how long ago it was made.
pub async fn waiting_reason(
    state: &dyn StateStore,
    id: &str,
) -> Result<Option<String>, StateError> {
    let history = state.history(Some(id), 1).await?;
    let now_ms = Utc::now().timestamp_millis();
    Ok(history
        .into_iter()
        .flat_map(|(_, steps)| steps)
        .rev()
        .find(|s| s.step == Step::CheckUse.as_str() && s.event == "ok")
        .and_then(|s| {
            let ago = (now_ms - s.at_ms).max(0) / 1000;
            Some(format!("waiting: {} (checked {ago} s ago)", s.detail?))
        }))
}

/// The report's reason with its last-used time, for the journal.
fn describe(report: &UsageReport, now: i64) -> String {
    match report.last_used.map(unix) {
        Some(t) => format!(
            "{}; last used {} ({} s before the check)",
            report.reason,
            at(t),
            now.saturating_sub(t).max(0)
        ),
        None => report.reason.clone(),
    }
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => secs(d),
        Err(e) => -secs(e.duration()),
    }
}

fn at(t: i64) -> String {
    Utc.timestamp_opt(t, 0).single().map_or_else(
        || t.to_string(),
        |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}
