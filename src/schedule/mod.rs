//! When a credential is due: cron expressions, intervals, rotation windows, and the bounds every
//! configured duration respects.
//!
//! This module is the only place that computes cron fire times; the scheduler and `check` both
//! ask it. Expressions are written as ops users write crontabs (5 fields, UTC unless a timezone
//! is given) or with a leading seconds field (6 fields), with crontab(5) semantics: when both
//! day of month and day of week are restricted, a day matching *either* fires.
//!
//! Times are computed on the wall clock of the schedule's timezone, with the zone's rules looked
//! up for every fire (never an offset captured once), and two rules for daylight-saving changes:
//! - a wall-clock time skipped by a spring-forward gap fires at the first instant after the gap
//!   (several skipped times fire once there);
//! - a wall-clock time repeated by a fall-back overlap fires once, at its first occurrence.
//!
//! An interval (`rotate_every`) counts from the last successful rotation, like AWS Secrets
//! Manager's `rate(...)`.
//!
//! Files: `duration` (parsing and bounds of every configured duration, saturating arithmetic on
//! instants), `cron` (a parsed cron expression in its timezone, with the daylight-saving rules),
//! `gap` (the longest time between two fires of an expression), `cursor` (a cron schedule's
//! position as the scheduler lives it, robust to clock jumps), and here [`Schedule`] and [`Due`]:
//! when one credential is due.

mod cron;
mod cursor;
mod duration;
mod gap;

use std::time::Duration;

use chrono::{DateTime, Utc};

pub use cron::CronSchedule;
pub use cursor::CronCursor;
pub use duration::{add, parse_duration, secs, Accepts, MAX_DURATION};

/// When a credential rotates.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Rotate at these times.
    pub cron: Option<CronSchedule>,
    /// Rotate this long after the last successful rotation.
    pub every: Option<Duration>,
    /// How long after a cron fire time a rotation may still start; a missed window waits for the
    /// next fire time. `None`: no limit.
    pub window: Option<Duration>,
}

/// Why a credential is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Due at this instant (which may be in the past: overdue).
    At(DateTime<Utc>),
    /// Due at a cron fire time, which the scheduler's cron cursor reports when it comes.
    NextCronFire,
}

impl Schedule {
    /// The longest time the schedule lets pass between two rotations, whatever the day.
    pub fn period(&self) -> Duration {
        let cron = self
            .cron
            .as_ref()
            .map_or(Duration::MAX, CronSchedule::longest_gap);
        cron.min(self.every.unwrap_or(Duration::MAX))
    }

    /// When the next rotation is due, given the last successful one.
    ///
    /// A credential never rotated is due now. The latest cron fire missed since the last
    /// rotation (the daemon was down) is due now if its window is still open; otherwise the
    /// next fire time counts.
    pub fn due(&self, last_success: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Due {
        let Some(last) = last_success else {
            return Due::At(now);
        };
        let interval = self.every.map(|every| add(last, every));
        let missed_fire = self
            .cron
            .as_ref()
            .and_then(|c| c.latest_at_or_before(now))
            .filter(|fire| *fire > last && self.in_window(*fire, now));
        match (interval, missed_fire) {
            (Some(i), Some(f)) => Due::At(i.min(f)),
            (Some(i), None) if self.cron.is_some() => {
                // Whichever comes first: the interval or the next cron fire.
                match self.next_fire(now) {
                    Some(fire) if fire < i => Due::NextCronFire,
                    _ => Due::At(i),
                }
            }
            (Some(i), None) => Due::At(i),
            (None, Some(f)) => Due::At(f),
            (None, None) => Due::NextCronFire,
        }
    }

    /// The next cron fire time after `now`, if there is a cron schedule.
    pub fn next_fire(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.as_ref().and_then(|c| c.next_after(now))
    }

    /// The next instant the credential is expected to rotate (for status and metrics).
    pub fn next_rotation(
        &self,
        last_success: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        match self.due(last_success, now) {
            Due::At(t) => Some(t),
            Due::NextCronFire => self.next_fire(now),
        }
    }

    /// The next `n` rotation times if every rotation succeeds at its due time.
    pub fn upcoming(
        &self,
        last_success: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        n: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let (mut last, mut clock) = (last_success, now);
        while out.len() < n {
            let Some(next) = self.next_rotation(last, clock) else {
                break;
            };
            let next = next.max(clock);
            if out.last() == Some(&next) {
                // The end of time: nothing later to show.
                break;
            }
            out.push(next);
            last = Some(next);
            clock = next;
        }
        out
    }

    /// Whether a rotation started at `now` for the cron fire at `fire` is still inside the window.
    pub fn in_window(&self, fire: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        self.window.is_none_or(|w| now <= add(fire, w))
    }
}

/// Instants and fire lists for the tests of this module and of the scheduler.
#[cfg(test)]
pub(crate) mod testing {
    use chrono::{DateTime, TimeZone, Utc};
    use chrono_tz::Tz;

    use super::CronSchedule;

    /// `(y, mo, d, h, mi)` in UTC.
    pub(crate) fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    /// A timezone by its IANA name.
    pub(crate) fn tz(name: &str) -> Tz {
        name.parse().unwrap()
    }

    /// `(y, mo, d, h, mi)` in `zone`, as an instant; panics on a wall time that does not
    /// exist or is ambiguous (tests spell those out in UTC).
    pub(crate) fn local(zone: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        zone.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .unwrap()
            .with_timezone(&Utc)
    }

    /// The first `n` fires of `c` after `from`.
    pub(crate) fn fires(c: &CronSchedule, from: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        std::iter::successors(c.next_after(from), |t| c.next_after(*t))
            .take(n)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use chrono_tz::Tz;

    use super::testing::at;
    use super::*;

    #[test]
    fn never_rotated_is_due_now_and_intervals_count_from_the_last_success() {
        let s = Schedule {
            cron: None,
            every: Some(Duration::from_secs(3600)),
            window: None,
        };
        let now = at(2026, 1, 1, 12, 0);
        assert_eq!(s.due(None, now), Due::At(now));
        assert_eq!(
            s.due(Some(at(2026, 1, 1, 11, 30)), now),
            Due::At(at(2026, 1, 1, 12, 30))
        );
        assert_eq!(s.upcoming(Some(at(2026, 1, 1, 11, 30)), now, 3).len(), 3);
    }

    #[test]
    fn the_longest_intervals_neither_panic_nor_wrap() {
        let s = Schedule {
            cron: None,
            every: Some(MAX_DURATION),
            window: Some(MAX_DURATION),
        };
        let now = at(2026, 1, 1, 12, 0);
        assert!(matches!(s.due(Some(now), now), Due::At(t) if t > now));
        assert_eq!(s.upcoming(Some(now), now, 3).len(), 3);
        assert!(s.in_window(now, now));
        let end = DateTime::<Utc>::MAX_UTC;
        assert_eq!(add(end, Duration::MAX), end);
        assert_eq!(add(now, Duration::MAX), end);
        assert_eq!(secs(Duration::MAX), i64::MAX);
    }

    #[test]
    fn a_missed_cron_fire_is_due_only_inside_its_window() {
        let cron = CronSchedule::parse("0 3 * * *", Tz::UTC).unwrap();
        let s = Schedule {
            cron: Some(cron),
            every: None,
            window: Some(Duration::from_secs(2 * 3600)),
        };
        let last = at(2026, 1, 1, 3, 0);
        // Down at 03:00 on the 2nd, back at 04:00: inside the 2 h window.
        assert_eq!(
            s.due(Some(last), at(2026, 1, 2, 4, 0)),
            Due::At(at(2026, 1, 2, 3, 0))
        );
        // Back at 06:00: the window closed, the next fire counts.
        assert_eq!(s.due(Some(last), at(2026, 1, 2, 6, 0)), Due::NextCronFire);
        assert_eq!(
            s.next_rotation(Some(last), at(2026, 1, 2, 6, 0)),
            Some(at(2026, 1, 3, 3, 0))
        );
        // Down for three days, back at 04:00: the latest fire's window is open.
        assert_eq!(
            s.due(Some(last), at(2026, 1, 5, 4, 0)),
            Due::At(at(2026, 1, 5, 3, 0))
        );
    }
}
