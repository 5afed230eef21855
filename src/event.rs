//! The one event type: a [`Condition`] of one credential that the engine or the scheduler raises
//! while it lasts and clears when it is over, and the [`EventSink`] that receives it (the
//! alerter in the daemon, a recorder in tests).
//!
//! A leaf: it imports nothing from the crate, so the engine and the alerting module can both
//! depend on it without depending on each other.
//!
//! Invariants: raising or clearing never blocks and never fails the caller; summaries carry no
//! secret material (the caller's duty); the names are stable (payloads, subjects, configs).

use std::fmt;

/// How urgent a condition is. Routes can select on it; it is part of every notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Needs attention soon; consumers still work.
    Warning,
    /// Needs attention now: a credential is past its max age or automation has stopped.
    Critical,
}

impl Severity {
    /// The stable lowercase name used in configs and payloads.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A problem with one credential that the engine or the scheduler raises and later clears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Condition {
    /// A rotation failed after all its retries (the current credential is still in place).
    RotationFailed,
    /// The credential is older than its `max_age`.
    Stale,
    /// The credential will pass its `max_age` within `warn_before`.
    NearMaxAge,
    /// Revoking the previous credential failed: it is still valid at the provider.
    RevokeFailed,
    /// The credential is marked failed: automation stopped until an operator rotates it.
    AutomationStopped,
    /// The store holds a rotation the state database does not know: state lost or foreign.
    StateLost,
    /// The old credential is still in use `max_revoke_delay` after the grace period ended: its
    /// revoke waits (or, with `on_max_revoke_delay = "revoke"`, goes ahead anyway).
    RevokeDelayed,
    /// A delivery hook failed all its attempts: consumers may still use the old value.
    HookFailed,
}

impl Condition {
    /// Every condition, in a stable order.
    pub const ALL: [Condition; 8] = [
        Self::RotationFailed,
        Self::Stale,
        Self::NearMaxAge,
        Self::RevokeFailed,
        Self::AutomationStopped,
        Self::StateLost,
        Self::RevokeDelayed,
        Self::HookFailed,
    ];

    /// The stable snake_case name used in payloads and subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RotationFailed => "rotation_failed",
            Self::Stale => "stale",
            Self::NearMaxAge => "near_max_age",
            Self::RevokeFailed => "revoke_failed",
            Self::AutomationStopped => "automation_stopped",
            Self::StateLost => "state_lost",
            Self::RevokeDelayed => "revoke_delayed",
            Self::HookFailed => "hook_failed",
        }
    }

    /// How urgent the condition is.
    pub fn severity(self) -> Severity {
        match self {
            Self::Stale | Self::AutomationStopped | Self::StateLost => Severity::Critical,
            Self::RotationFailed
            | Self::NearMaxAge
            | Self::RevokeFailed
            | Self::RevokeDelayed
            | Self::HookFailed => Severity::Warning,
        }
    }

    /// A short human description, for subjects and chat messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::RotationFailed => "rotation failed after retries",
            Self::Stale => "credential is past its max age",
            Self::NearMaxAge => "credential is close to its max age",
            Self::RevokeFailed => "revoking the previous credential failed",
            Self::AutomationStopped => "credential marked failed; automatic rotation stopped",
            Self::StateLost => "state database lost or foreign; automatic rotation stopped",
            Self::RevokeDelayed => "the previous credential is still in use past max_revoke_delay",
            Self::HookFailed => "a delivery hook failed; consumers may not have the new value",
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Receives condition changes; the alerting module implements it. Both calls come after the
/// state change they report is durable, and must not block.
pub trait EventSink: Send + Sync {
    /// `condition` is active for `credential`; `summary` (no secret in it) says why.
    fn raise(&self, credential: &str, condition: Condition, summary: &str);
    /// `condition` is over for `credential`. Clearing one that is not active does nothing.
    fn clear(&self, credential: &str, condition: Condition);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_names_are_stable() {
        let names: Vec<_> = Condition::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            names,
            [
                "rotation_failed",
                "stale",
                "near_max_age",
                "revoke_failed",
                "automation_stopped",
                "state_lost",
                "revoke_delayed",
                "hook_failed"
            ]
        );
        assert_eq!(Condition::Stale.severity(), Severity::Critical);
        assert_eq!(Condition::NearMaxAge.severity(), Severity::Warning);
    }
}
