//! A cron schedule's position in time, as the scheduler lives it.
//!
//! Invariant: after the wall clock jumps forward past several fire times, one fire; after it
//! jumps back, a fire time already acted on never fires again.

use chrono::{DateTime, Utc};

use super::CronSchedule;

/// A cron schedule's position in time, as the scheduler lives it: the next fire to wait for and
/// the last one acted on. Pure: the caller passes the wall-clock `now` each time.
#[derive(Debug, Clone)]
pub struct CronCursor {
    schedule: CronSchedule,
    next: Option<DateTime<Utc>>,
    last_fired: Option<DateTime<Utc>>,
}

impl CronCursor {
    /// Starts waiting for the first fire after `now`.
    pub fn new(schedule: CronSchedule, now: DateTime<Utc>) -> Self {
        let next = schedule.next_after(now);
        Self {
            schedule,
            next,
            last_fired: None,
        }
    }

    /// The next fire time to wake up for.
    pub fn next(&self) -> Option<DateTime<Utc>> {
        self.next
    }

    /// Called on a wake-up at wall-clock `now`: the fire time to act on, if one is due.
    ///
    /// The wall clock can jump. Forward past several fire times, this fires once, for the latest
    /// of them (a burst of rotations would be pointless). Backward, a fire time already acted on
    /// is not fired again: the next one counts from the last fire as well as from `now`.
    pub fn poll(&mut self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let due = self.next.filter(|next| *next <= now)?;
        let fire = self
            .schedule
            .latest_at_or_before(now)
            .filter(|f| *f >= due)
            .unwrap_or(due);
        self.last_fired = Some(fire);
        self.next = self.schedule.next_after(now.max(fire));
        Some(fire)
    }
}

#[cfg(test)]
mod tests {
    use chrono_tz::Tz;

    use super::*;
    use crate::schedule::testing::at;

    #[test]
    fn a_cursor_fires_once_after_a_forward_jump_and_never_twice_after_a_backward_one() {
        let c = CronSchedule::parse("0 3 * * *", Tz::UTC).unwrap();
        let mut cursor = CronCursor::new(c, at(2026, 6, 1, 12, 0));
        assert_eq!(cursor.next(), Some(at(2026, 6, 2, 3, 0)));
        assert_eq!(cursor.poll(at(2026, 6, 2, 2, 59)), None, "not yet");
        // The clock jumps forward three days: one fire, for the latest fire time.
        assert_eq!(
            cursor.poll(at(2026, 6, 5, 10, 0)),
            Some(at(2026, 6, 5, 3, 0))
        );
        assert_eq!(cursor.poll(at(2026, 6, 5, 10, 0)), None);
        assert_eq!(cursor.next(), Some(at(2026, 6, 6, 3, 0)));
        // The clock jumps back two days: the fire times in between were not acted on, but the
        // ones already fired (5 June 03:00) are not fired again.
        assert_eq!(cursor.poll(at(2026, 6, 3, 10, 0)), None);
        assert_eq!(cursor.poll(at(2026, 6, 4, 3, 0)), None);
        assert_eq!(cursor.poll(at(2026, 6, 5, 3, 0)), None);
        assert_eq!(
            cursor.poll(at(2026, 6, 6, 3, 0)),
            Some(at(2026, 6, 6, 3, 0))
        );
    }
}
