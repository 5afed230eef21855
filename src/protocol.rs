//! The rotation protocol's vocabulary: where a rotation is ([`Phase`]), what it does next
//! ([`Step`]) and why it started ([`Trigger`]), with the decisions that depend only on them.
//!
//! A leaf: it imports nothing from the crate. The state store persists these values by their
//! names (`as_str`), the engine drives them, metrics and the journal label with them.
//!
//! Invariants:
//! - every decision is a predicate on a variant, spelled out by `matches!`: none depends on the
//!   declaration order of an enum (no `PartialOrd`, no `<` between phases), so adding or moving
//!   a variant cannot silently change what the engine does;
//! - the names are stable: they are stored in the journal and exported as metric labels.

/// Where a rotation is in the protocol. Stored as text. Decisions use the predicates below, never
/// the declaration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Begun; the new credential may or may not exist at the provider.
    Issuing,
    /// Issued (attributes recorded); maybe not staged yet.
    Issued,
    /// Written to the store beside the current value.
    Staged,
    /// Accepted by the provider.
    Activated,
    /// Proven to work.
    Verified,
    /// Current in the store; the old credential waits for its grace period to end.
    Promoted,
    /// The old credential is revoked: the rotation is complete.
    Done,
    /// Undoing an unfinished rotation after a failure.
    RollingBack,
    /// Undone: the pending credential is gone and the current one is unchanged.
    RolledBack,
}

impl Phase {
    /// Every phase.
    pub const ALL: [Phase; 9] = [
        Self::Issuing,
        Self::Issued,
        Self::Staged,
        Self::Activated,
        Self::Verified,
        Self::Promoted,
        Self::Done,
        Self::RollingBack,
        Self::RolledBack,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issuing => "issuing",
            Self::Issued => "issued",
            Self::Staged => "staged",
            Self::Activated => "activated",
            Self::Verified => "verified",
            Self::Promoted => "promoted",
            Self::Done => "done",
            Self::RollingBack => "rolling_back",
            Self::RolledBack => "rolled_back",
        }
    }

    /// The phase stored as `name`, if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// Whether nothing is promoted yet: consumers still read the old value.
    pub fn before_promotion(self) -> bool {
        matches!(
            self,
            Self::Issuing | Self::Issued | Self::Staged | Self::Activated | Self::Verified
        )
    }

    /// Whether a failure in this phase undoes the rotation: the new credential is not proven to
    /// work yet. From `Verified` on, a failure retries the same step instead.
    pub fn rolls_back_on_failure(self) -> bool {
        matches!(
            self,
            Self::Issuing | Self::Issued | Self::Staged | Self::Activated
        )
    }

    /// Whether the rotation is over.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::RolledBack)
    }
}

/// A protocol step, as journaled and exported (`keyrotd_rotation_step_duration_seconds{step}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The rotator creates the new credential (after reading the store's current value).
    Issue,
    /// The store keeps the new value beside the current one.
    Stage,
    /// The rotator makes the new credential usable at the provider.
    Activate,
    /// The rotator proves that the staged value works.
    Verify,
    /// The store makes the new value the current one.
    Promote,
    /// The rotator revokes the old credential at the provider.
    Revoke,
    /// The store lets go of the previous value (after [`Step::Revoke`]).
    Release,
    /// The rotator undoes an unfinished rotation at the provider.
    Rollback,
    /// The store drops the pending value (after [`Step::Rollback`]).
    Discard,
    /// The rotator says whether the old credential is still in use (before [`Step::Revoke`],
    /// with `revoke = "when_unused"`).
    CheckUse,
    /// A delivery hook tells consumers about the new value (after `stage` or `promote`); its
    /// journal lines name the hook (`promote hook 0 (signal)`).
    Notify,
}

impl Step {
    /// Every step, for metric pre-registration.
    pub const ALL: [Step; 11] = [
        Self::Issue,
        Self::Stage,
        Self::Activate,
        Self::Verify,
        Self::Promote,
        Self::Revoke,
        Self::Release,
        Self::Rollback,
        Self::Discard,
        Self::CheckUse,
        Self::Notify,
    ];

    /// The journaled name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issue => "issue",
            Self::Stage => "stage",
            Self::Activate => "activate",
            Self::Verify => "verify",
            Self::Promote => "promote",
            Self::Revoke => "revoke",
            Self::Release => "release",
            Self::Rollback => "rollback",
            Self::Discard => "discard",
            Self::CheckUse => "check_use",
            Self::Notify => "notify",
        }
    }
}

/// Why a rotation was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A cron fire time came (or a grace period ended, so the old credential is revoked).
    Schedule,
    /// `rotate_every` passed since the last rotation.
    Interval,
    /// It was already due when the daemon took it on: never rotated, or its due time passed
    /// while the daemon was down.
    Overdue,
    /// A retry after a failure.
    Retry,
    /// An operator ran `keyrotd rotate`: also restarts a credential marked failed.
    Manual,
}

impl Trigger {
    /// The journaled name (a rotation record's `trigger`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Schedule => "schedule",
            Self::Interval => "interval",
            Self::Overdue => "overdue",
            Self::Retry => "retry",
            Self::Manual => "manual",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_names_round_trip_and_decisions_are_per_variant() {
        for phase in Phase::ALL {
            assert_eq!(Phase::from_name(phase.as_str()), Some(phase));
            // A phase that rolls back is before promotion; a final one is neither.
            assert!(!phase.rolls_back_on_failure() || phase.before_promotion());
            assert!(!phase.is_final() || !phase.before_promotion());
        }
        assert_eq!(Phase::from_name("promoting"), None);
        assert!(Phase::Verified.before_promotion() && !Phase::Verified.rolls_back_on_failure());
        assert!(!Phase::RollingBack.rolls_back_on_failure());
    }
}
