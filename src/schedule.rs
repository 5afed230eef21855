//! When a credential is due: cron expressions, intervals and rotation windows.
//!
//! Cron expressions are written as ops users write crontabs (5 fields, UTC unless a timezone is
//! given) or with a leading seconds field (6 fields). They are normalised to the 6-field form that
//! tokio-cron-scheduler requires. An interval (`rotate_every`) counts from the last successful
//! rotation, like AWS Secrets Manager's `rate(...)`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;

/// A parsed cron expression with its timezone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    /// The 6-field expression (seconds first), as tokio-cron-scheduler wants it.
    pub expression: String,
    /// The timezone the expression is evaluated in.
    pub timezone: Tz,
    /// Shared: a parsed `Cron` takes about 6 KB (croner keeps a bitmap per field, years
    /// included), and large inventories reuse a handful of schedules.
    cron: Arc<Cron>,
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.expression == other.expression && self.timezone == other.timezone
    }
}

impl CronSchedule {
    /// Parses a 5- or 6-field expression.
    pub fn parse(expression: &str, timezone: Tz) -> Result<Self, String> {
        let fields: Vec<&str> = expression.split_whitespace().collect();
        let expression = match fields.len() {
            5 => format!("0 {}", fields.join(" ")),
            6 => fields.join(" "),
            n => return Err(format!("expected 5 fields (minute hour day month weekday) or 6 with seconds first, found {n}")),
        };
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .build()
            .parse(&expression)
            .map_err(|e| format!("invalid cron expression: {e}"))?;
        // An expression that never fires (`0 0 30 2 *`) would leave the credential unrotated forever.
        cron.find_next_occurrence(&Utc::now().with_timezone(&timezone), false)
            .map_err(|_| "cron expression never fires".to_owned())?;
        Ok(Self {
            expression,
            timezone,
            cron: Arc::new(cron),
        })
    }

    /// The first fire time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.timezone), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The longest gap between consecutive fire times over the coming year (bounded sample), used
    /// to check that `max_age` leaves room for the schedule.
    pub fn longest_gap(&self, from: DateTime<Utc>) -> Duration {
        let mut longest = Duration::ZERO;
        let mut previous = match self.next_after(from) {
            Some(t) => t,
            None => return Duration::MAX,
        };
        let horizon = from + chrono::Duration::days(366);
        for _ in 0..400 {
            let Some(next) = self.next_after(previous) else {
                break;
            };
            longest = longest.max((next - previous).to_std().unwrap_or_default());
            if next > horizon {
                break;
            }
            previous = next;
        }
        longest
    }
}

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
    /// Due at a cron fire time, which the cron job reports when it comes.
    NextCronFire,
}

impl Schedule {
    /// The longest time the schedule lets pass between two rotations.
    pub fn period(&self, now: DateTime<Utc>) -> Duration {
        let cron = self
            .cron
            .as_ref()
            .map(|c| c.longest_gap(now))
            .unwrap_or(Duration::MAX);
        cron.min(self.every.unwrap_or(Duration::MAX))
    }

    /// When the next rotation is due, given the last successful one.
    ///
    /// A credential never rotated is due now. A cron fire missed while the daemon was down is due
    /// now if its window is still open, otherwise the next fire time counts.
    pub fn due(&self, last_success: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Due {
        let Some(last) = last_success else {
            return Due::At(now);
        };
        let interval = self
            .every
            .map(|every| last + chrono::Duration::from_std(every).unwrap_or(chrono::Duration::MAX));
        let missed_fire = self
            .cron
            .as_ref()
            .and_then(|c| c.next_after(last))
            .filter(|fire| {
                *fire <= now
                    && self.window.is_none_or(|w| {
                        now <= *fire
                            + chrono::Duration::from_std(w).unwrap_or(chrono::Duration::MAX)
                    })
            });
        match (interval, missed_fire) {
            (Some(i), Some(f)) => Due::At(i.min(f)),
            (Some(i), None) if self.cron.is_some() => {
                // Whichever comes first: the interval or the next cron fire (reported by the job).
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
            out.push(next);
            last = Some(next);
            clock = next;
        }
        out
    }

    /// Whether a rotation started at `now` for the cron fire at `fire` is still inside the window.
    pub fn in_window(&self, fire: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        self.window.is_none_or(|w| {
            now <= fire + chrono::Duration::from_std(w).unwrap_or(chrono::Duration::MAX)
        })
    }
}

/// Parses a human duration (`90d`, `12h`, `30s`, `1h30m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration like 90d, 12h or 30s ({e})"))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn accepts_five_and_six_fields_and_refuses_others() {
        assert_eq!(
            CronSchedule::parse("0 3 * * 1", Tz::UTC)
                .unwrap()
                .expression,
            "0 0 3 * * 1"
        );
        assert_eq!(
            CronSchedule::parse("30 0 3 * * 1", Tz::UTC)
                .unwrap()
                .expression,
            "30 0 3 * * 1"
        );
        assert!(CronSchedule::parse("0 3 * *", Tz::UTC)
            .unwrap_err()
            .contains("found 4"));
        assert!(CronSchedule::parse("0 99 * * *", Tz::UTC).is_err());
        assert!(CronSchedule::parse("0 0 30 2 *", Tz::UTC).is_err());
    }

    #[test]
    fn cron_is_evaluated_in_its_timezone() {
        let c = CronSchedule::parse("0 3 * * *", "Europe/Paris".parse().unwrap()).unwrap();
        // 03:00 in Paris in winter is 02:00 UTC.
        assert_eq!(
            c.next_after(at(2026, 1, 10, 0, 0)),
            Some(at(2026, 1, 10, 2, 0))
        );
    }

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
    }

    #[test]
    fn longest_gap_of_a_monthly_schedule_is_31_days() {
        let c = CronSchedule::parse("0 0 1 * *", Tz::UTC).unwrap();
        assert_eq!(
            c.longest_gap(at(2026, 1, 15, 0, 0)),
            Duration::from_secs(31 * 86400)
        );
    }
}
