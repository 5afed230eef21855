//! Whether an old credential is still used: the answer of [`Rotator::last_used`](crate::Rotator::last_used),
//! which the engine asks before revoking when a credential's `revoke = "when_unused"`.
//!
//! *Invariant:* a report carries times and a short reason (a key id, a role name, a session
//! count), never secret material.

use std::time::SystemTime;

/// What the provider can tell about the old credential's use since promotion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// Used since promotion (or connected right now): revoking it would cut a consumer off.
    InUse,
    /// Not used since promotion, as far as the provider records uses.
    Unused,
    /// The provider cannot tell now (or cannot tell at all: see [`UsageReport::unsupported`]).
    Unknown,
}

impl Usage {
    /// The stable name journaled and shown (`in use`, `unused`, `unknown`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InUse => "in use",
            Self::Unused => "unused",
            Self::Unknown => "unknown",
        }
    }
}

/// The answer of [`Rotator::last_used`](crate::Rotator::last_used).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReport {
    /// In use, unused or unknown.
    pub usage: Usage,
    /// When the provider last saw the credential used, when it knows (IAM's `LastUsedDate`).
    pub last_used: Option<SystemTime>,
    /// A short human reason without secret material (`3 sessions of role app_b`).
    pub reason: String,
}

impl UsageReport {
    /// The answer of a rotator that cannot tell whether a credential is used.
    pub fn unsupported(kind: &str) -> Self {
        Self {
            usage: Usage::Unknown,
            last_used: None,
            reason: format!("the `{kind}` rotator cannot tell whether a credential is in use"),
        }
    }

    /// A report of `usage`, with `reason`.
    pub fn new(usage: Usage, reason: impl Into<String>) -> Self {
        Self {
            usage,
            last_used: None,
            reason: reason.into(),
        }
    }

    /// The report for `what` (`old key AKIA…`), last used at `at` (`None`: never), judged
    /// against `since`: a use at or after it means in use. `detail` is added to an in-use
    /// reason (`service sts`).
    pub fn from_last_use(
        what: &str,
        at: Option<SystemTime>,
        since: SystemTime,
        detail: Option<&str>,
    ) -> Self {
        let since_text = humantime::format_rfc3339_seconds(since);
        match at {
            Some(t) if t >= since => Self::new(
                Usage::InUse,
                match detail {
                    Some(detail) => format!("{what} used since {since_text} ({detail})"),
                    None => format!("{what} used since {since_text}"),
                },
            ),
            Some(_) => Self::new(Usage::Unused, format!("{what} not used since {since_text}")),
            None => Self::new(Usage::Unused, format!("{what} never used")),
        }
        .used_at(at)
    }

    /// Attaches the last-used time.
    pub fn used_at(mut self, at: Option<SystemTime>) -> Self {
        self.last_used = at;
        self
    }
}
