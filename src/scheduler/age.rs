//! The age conditions: raises and clears near max age and stale at their deadlines, from each
//! credential's last promotion and `max_age`.
//!
//! Invariants: each condition is raised once when its deadline passes and cleared once when a
//! rotation renews the credential; near max age is raised only once a rotation is overdue, so a
//! long `warn_before` never warns about a healthy credential.

use std::sync::Arc;

use crate::event::{Condition, EventSink};
use crate::fmt::human;
use crate::schedule::secs;

use super::table::{lock, Slot};

/// Raises and clears the age conditions (near max age, stale) at their deadlines.
pub(super) struct AgeWatch {
    /// Where the conditions go; `None`: nowhere (and no deadline is watched).
    pub(super) events: Option<Arc<dyn EventSink>>,
    /// How long before `max_age` near max age is raised, in seconds.
    pub(super) warn_before: i64,
    /// Per credential: what is raised now (bit 0 near max age, bit 1 stale).
    pub(super) raised: Vec<u8>,
}

const NEAR: u8 = 1;
const STALE: u8 = 2;

impl AgeWatch {
    /// Brings slot `i`'s age conditions up to date; returns the next deadline worth waking for.
    pub(super) fn check(&mut self, i: usize, slot: Slot<'_>, now: i64) -> Option<i64> {
        let events = self.events.as_ref()?;
        let live = *lock(slot.live);
        let issued = live.issued_at?;
        // A certificate is stale at its notAfter, if that comes before max_age.
        let stale_at = live.stale_at(slot.spec)?;
        let max_age = stale_at.saturating_sub(issued);
        // Warn only once a rotation is overdue: a `warn_before` longer than the slack between
        // the schedule and max_age would warn about every healthy credential.
        let slack = max_age.saturating_sub(secs(slot.spec.period).min(max_age));
        let near_at = stale_at.saturating_sub(self.warn_before.min(slack));
        let want = if now >= stale_at {
            STALE
        } else if now >= near_at {
            NEAR
        } else {
            0
        };
        let had = self.raised[i];
        let id = &slot.spec.id;
        for (bit, condition) in [(NEAR, Condition::NearMaxAge), (STALE, Condition::Stale)] {
            match (had & bit != 0, want & bit != 0) {
                (false, true) => {
                    let summary = if bit == STALE {
                        format!(
                            "credential `{id}` is past its max age of {}",
                            human(slot.spec.max_age)
                        )
                    } else {
                        format!(
                            "credential `{id}` reaches its max age at {}",
                            crate::fmt::time(Some(stale_at))
                        )
                    };
                    events.raise(id, condition, &summary);
                }
                (true, false) => events.clear(id, condition),
                _ => {}
            }
        }
        self.raised[i] = want;
        [near_at, stale_at].into_iter().find(|t| *t > now)
    }
}
