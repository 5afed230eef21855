//! Refusing an inventory that drops a credential whose rotation is still open (by `check`, at
//! start and on reload).
//!
//! Invariant: such an inventory is never run: without the credential's rotator and store,
//! nothing could revoke its old credential after the grace period or roll back its rotation.

use crate::config::CredentialSpec;
use crate::protocol::Phase;

use super::RotationRecord;

/// Credentials removed from the inventory while one of their rotations is still open. Such an
/// inventory is refused (by `check`, at start and on reload) rather than run: without the
/// credential's rotator and store nothing can revoke the old credential after its grace period
/// (it would stay valid for ever) or roll back an unfinished one, and revoking it at once would
/// cut off consumers before the grace period they were promised.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct RemovedWhileOpen(
    /// One error line per removed credential.
    pub Vec<String>,
);

/// Refuses `specs` if a credential missing from it has an open rotation in `open`.
pub fn check_removed(
    specs: &[CredentialSpec],
    open: &[RotationRecord],
) -> Result<(), RemovedWhileOpen> {
    let ids: std::collections::HashSet<&str> = specs.iter().map(|s| s.id.as_str()).collect();
    let problems: Vec<String> = open
        .iter()
        .filter(|r| !ids.contains(r.credential_id.as_str()))
        .map(|r| {
            let (id, rotation) = (&r.credential_id, &r.id);
            let why = match (r.phase, r.revoke_at) {
                (Phase::Promoted, Some(at)) => format!(
                    "is in its grace period until {}: the credential it replaced is still valid \
                     and is revoked only then",
                    crate::fmt::time(Some(at))
                ),
                (phase, _) => format!(
                    "is unfinished (phase {}): it must finish or roll back",
                    phase.as_str()
                ),
            };
            format!(
                "error: credential `{id}` was removed from the inventory while its rotation \
                 {rotation} {why}; keep `{id}` in the inventory until `keyrotd status` shows it \
                 idle, then remove it"
            )
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(RemovedWhileOpen(problems))
    }
}
