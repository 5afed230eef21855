//! The start-of-run check that the state database knows the rotation that wrote the store's
//! current value. A database that does not (lost, restored from an older backup, or another
//! keyrotd's) stops the credential until `keyrotd adopt`.
//!
//! Invariant: the check is bounded by the store's `timeout`, like every other store call, and a
//! store that cannot answer does not stop the credential (its first step fails the same way).

use keyrotd_plugin::{ProviderError, Rotator, StepContext, Store};
use tracing::{error, warn};

use super::{state_lost_message, Condition, Engine, EngineError};
use crate::config::CredentialSpec;
use crate::state::{CredentialRecord, Status};

impl Engine {
    /// Checks, before anything else runs, that the state database knows the rotation that wrote
    /// the store's current value. If it does not, the database was lost (a 0-byte file, a WAL
    /// deleted after a crash), restored from an older backup, or belongs to another keyrotd:
    /// rotating now would overwrite a value whose old credential may still await revocation, and
    /// would erase the evidence. The credential is marked failed with the reason, logged, counted
    /// and alerted; only `keyrotd adopt` (or the right database) lets it run again.
    pub(super) async fn store_matches_state(
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
                    self.clear(&spec.id, Condition::StateLost);
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
        self.raise(&spec.id, Condition::StateLost, &message);
        Ok(false)
    }
}
