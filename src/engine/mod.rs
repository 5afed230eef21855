//! The rotation protocol: issue, stage, activate, verify, promote, and after the grace period,
//! revoke. It decides nothing about *when*; the scheduler (or `keyrotd rotate`) calls
//! [`Engine::run`] and the engine does whatever the credential's state calls for next.
//!
//! Invariants:
//! - the old credential is revoked only in phase `Promoted` and only once `revoke_at` (promotion
//!   time plus grace) has passed, so never before the new one is stored, verified and promoted;
//!   with `revoke = "when_unused"` also only once the rotator says it is unused (or
//!   `max_revoke_delay` passed with `on_max_revoke_delay = "revoke"`), never after a failed check;
//!   `revoke_at` is set only once the promote delivery hooks are settled (`notify`);
//! - a failure before promotion rolls back: the rotator undoes what it did and the store drops the
//!   pending value, so the current value stays the one consumers read;
//! - a failure at or after promotion never rolls back (the new credential is proven good): the
//!   step is retried;
//! - the journal records each step before and after it runs, and a phase only after its step has
//!   completed; every step is idempotent, so resuming re-runs at most the step in flight;
//! - a step's `ok`, the phase it reached and the next step's `start` may share one commit, which
//!   is durable before the next step's provider call and before anything is reported;
//! - no secret value reaches the journal, a log line or an error: only public attributes do.
//!
//! Files: this one holds [`Engine`], its public API and the types it returns; `lease` takes,
//! renews and gives back a rotation's lease; `lost_state` checks that the state database knows
//! the store's value before a run; `steps` drives the protocol step by step up to the revoke;
//! `notify` runs the delivery hooks after stage and promote (the revoke waits for the promote
//! hooks); `failure` rolls back, schedules retries with backoff or stops a credential; `journal`
//! runs one plugin call as a journaled, timed step; `in_use` asks the rotator whether the old
//! credential is still used before revoking it (`revoke = "when_unused"`); `limits` bounds
//! plugin calls by their timeouts;
//! `failpoint` is the crash-test hook; `metrics` the engine's Prometheus metrics.

mod failpoint;
mod failure;
mod in_use;
mod journal;
mod lease;
mod limits;
mod lost_state;
mod metrics;
mod notify;
mod steps;

use std::sync::Arc;
use std::time::Duration;

use keyrotd_plugin::{Attrs, Credential, ProviderError, Rotator, Store};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::CredentialSpec;
use crate::event::{Condition, EventSink};
use crate::instrument::{TimedRotator, TimedStore};
use crate::protocol::{Phase, Step, Trigger};
use crate::state::{CredentialRecord, RotationRecord, StateError, StateStore};
use lease::Taken;

pub use in_use::waiting_reason;
pub use metrics::EngineMetrics;
pub use notify::{hook_label, hook_of};

/// How long a rotation's lease lasts; renewed at every step.
const LEASE: Duration = Duration::from_secs(300);

/// What [`Engine::run`] achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new credential is current; the old one is revoked at `revoke_at` (Unix seconds).
    Promoted {
        /// The rotation's id.
        rotation: String,
        /// When the old credential is revoked.
        revoke_at: i64,
    },
    /// The rotation is complete: the old credential is revoked.
    Completed {
        /// The rotation's id.
        rotation: String,
    },
    /// The rotation is in its grace period until `revoke_at`; nothing to do before.
    InGrace {
        /// The rotation's id.
        rotation: String,
        /// When the grace period ends.
        revoke_at: i64,
    },
    /// Another process holds this credential's rotation.
    Busy {
        /// The rotation's id.
        rotation: String,
        /// The process holding its lease.
        owner: String,
    },
    /// The credential is marked failed: retries ran out (a manual rotation restarts it), or its
    /// store names a rotation the state database does not know (only `keyrotd adopt` or the
    /// right database restarts it). The record's `last_error` says which.
    Stopped,
    /// A step failed; what happens next is in the credential record.
    Failed {
        /// The rotation's id.
        rotation: String,
        /// What failed (no secret).
        error: String,
    },
    /// The grace period is over but the old credential is still in use (`revoke =
    /// "when_unused"`): its revoke is deferred to `revoke_at`, the next check.
    RevokeDelayed {
        /// The rotation's id.
        rotation: String,
        /// When the old credential's use is checked again.
        revoke_at: i64,
        /// When the provider last saw it used (Unix seconds), if it knows.
        last_used: Option<i64>,
        /// Why the revoke waits (no secret).
        reason: String,
    },
    /// Shutdown arrived; the rotation is parked durably and resumes on the next start.
    Parked {
        /// The rotation's id.
        rotation: String,
    },
}

/// Errors that stop the engine itself (as opposed to a failed step, which is an [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The credential's rotator or store cannot be built from its configuration.
    #[error("credential `{credential}`: invalid configuration: {message}")]
    Config {
        /// The credential's id.
        credential: String,
        /// What is wrong with its rotator or store configuration.
        message: String,
    },
}

/// A step that failed, with everything an operator needs and no secret.
#[derive(Debug, thiserror::Error)]
#[error("credential `{credential}`: step {} failed: {source}", step.as_str())]
pub struct StepError {
    /// The credential's id.
    pub credential: String,
    /// The step that failed.
    pub step: Step,
    /// The provider's error.
    #[source]
    pub source: ProviderError,
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
    /// Why this run started (journaled with each step it runs).
    trigger: Trigger,
    /// Journal writes held back to share the commit of the rotation's next write.
    unwritten: std::sync::Mutex<journal::Unwritten>,
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

    /// Raises `condition` for `credential` with the sink, if there is one.
    fn raise(&self, credential: &str, condition: Condition, summary: &str) {
        if let Some(sink) = &self.events {
            sink.raise(credential, condition, summary);
        }
    }

    /// Clears `condition` for `credential` with the sink, if there is one.
    fn clear(&self, credential: &str, condition: Condition) {
        if let Some(sink) = &self.events {
            sink.clear(credential, condition);
        }
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

/// What an operator reads when a store names a rotation the state database does not know.
pub fn state_lost_message(credential: &str, location: &str, rotation: &str) -> String {
    format!(
        "state lost or foreign: the store {location} holds the value of rotation {rotation}, \
         which this state database does not know (it was lost, reset, restored from an older \
         backup, or belongs to another keyrotd); automation of `{credential}` is stopped. Restore \
         the right database, or run `keyrotd adopt {credential}` to accept the stored value"
    )
}
