//! What the alerter delivers: one [`Notification`] per firing, repeat or resolution, the same
//! for every channel, and the [`DeliveryError`] a channel answers with.
//!
//! Invariant: nothing here carries secret material. A notification's summary comes from the
//! caller, who keeps it free of secrets; a delivery error's message never contains a resolved
//! secret (SMTP password, webhook URL or authorization).

use std::fmt;

use chrono::{DateTime, Utc};

use super::Condition;

/// Whether a notification announces a problem or its end (`status` in every payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertStatus {
    /// The condition is active (first notification or a repeat).
    Firing,
    /// The condition is over.
    Resolved,
}

impl AlertStatus {
    /// `firing` or `resolved`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        }
    }
}

/// One message to deliver, the same for every channel.
#[derive(Debug, Clone)]
pub struct Notification {
    /// Firing or resolved.
    pub status: AlertStatus,
    /// The credential id.
    pub credential: String,
    /// What is wrong.
    pub condition: Condition,
    /// The caller's latest summary (never secret).
    pub summary: String,
    /// When the condition became active.
    pub started_at: DateTime<Utc>,
    /// When it was cleared (resolved notifications only).
    pub resolved_at: Option<DateTime<Utc>>,
    /// Whether this is a repeat of an earlier firing notification.
    pub repeat: bool,
}

/// Why one delivery attempt failed. The message never contains a secret.
#[derive(Debug)]
pub struct DeliveryError {
    /// A retry cannot help (e.g. HTTP 400, SMTP 5xx).
    pub permanent: bool,
    /// What went wrong, for the log.
    pub message: String,
}

impl DeliveryError {
    /// A failure a later attempt may not meet (a timeout, a 5xx, a refused connection).
    pub(crate) fn transient(message: impl Into<String>) -> Self {
        Self {
            permanent: false,
            message: message.into(),
        }
    }

    /// A failure every attempt would meet (a 4xx, an SMTP 5xx, a message that cannot be built).
    pub(crate) fn permanent(message: impl Into<String>) -> Self {
        Self {
            permanent: true,
            message: message.into(),
        }
    }
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Formats an instant as RFC 3339 UTC with second precision, as in every payload.
pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
