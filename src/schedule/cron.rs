//! A parsed cron expression in its timezone: the next fire after an instant and the latest at
//! or before one.
//!
//! Invariants: crontab(5) day semantics (day of month and day of week are ORed only when both
//! are restricted); the zone's rules are looked up for every fire; a wall-clock time skipped by a
//! spring-forward gap fires once at the end of the gap, and one repeated by a fall-back overlap
//! fires once, at its first occurrence. An expression that never fires is refused at parse time.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

use super::gap::{largest_backward_jump, wall_clock_gap};

/// A parsed cron expression with its timezone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    /// The 6-field expression (seconds first), as written (5 fields get `0` seconds).
    pub expression: String,
    /// The timezone the expression is evaluated in.
    pub timezone: Tz,
    /// Shared: a parsed `Cron` takes about 6 KB (croner keeps a bitmap per field, years
    /// included), and large inventories reuse a handful of schedules.
    inner: Arc<Parsed>,
}

#[derive(Debug)]
struct Parsed {
    /// Evaluated on a clock without daylight saving (UTC standing for the local wall clock);
    /// the timezone is applied by [`CronSchedule::resolve`].
    cron: Cron,
    /// See [`CronSchedule::longest_gap`].
    longest_gap: Duration,
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.expression == other.expression && self.timezone == other.timezone
    }
}

impl CronSchedule {
    /// Parses a 5- or 6-field expression. Refuses one that never fires.
    pub fn parse(expression: &str, timezone: Tz) -> Result<Self, String> {
        let fields: Vec<&str> = expression.split_whitespace().collect();
        let mut fields: Vec<&str> = match fields.len() {
            5 => std::iter::once("0").chain(fields).collect(),
            6 => fields,
            n => return Err(format!("expected 5 fields (minute hour day month weekday) or 6 with seconds first, found {n}")),
        };
        let expression = fields.join(" ");
        // crontab(5): day of month and day of week are ORed only when both are restricted, and
        // a field starting with `*` (`*/2` included) is not restricted. croner ORs whenever
        // neither field is exactly `*`; its `+` prefix on the weekday field ANDs them instead,
        // which gives crontab's answer when one of them starts with `*`.
        let and_days = format!("+{}", fields[5]);
        if fields[3].starts_with(['*', '?']) || fields[5].starts_with(['*', '?']) {
            fields[5] = &and_days;
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .year(Year::Disallowed)
            .dom_and_dow(false)
            .build()
            .parse(&fields.join(" "))
            .map_err(|e| format!("invalid cron expression: {e}"))?;
        // An expression that never fires (`0 0 30 2 *`) would leave the credential unrotated.
        let wall_gap = wall_clock_gap(&cron).ok_or("cron expression never fires")?;
        Ok(Self {
            expression,
            timezone,
            inner: Arc::new(Parsed {
                cron,
                longest_gap: wall_gap.saturating_add(largest_backward_jump(timezone)),
            }),
        })
    }

    /// The first fire time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut wall = after.with_timezone(&self.timezone).naive_local();
        // Each round moves `wall` forward to the next fire time on the wall clock. A result not
        // after `after` is a time repeated by a fall-back overlap, whose first occurrence has
        // passed; the rounds are bounded by the fires inside one overlap.
        for _ in 0..100_000 {
            wall = self
                .inner
                .cron
                .find_next_occurrence(&Utc.from_utc_datetime(&wall), false)
                .ok()?
                .naive_utc();
            let at = self.resolve(wall);
            if at > after {
                return Some(at);
            }
        }
        None
    }

    /// The last fire time at or before `now`.
    pub fn latest_at_or_before(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut wall = now.with_timezone(&self.timezone).naive_local();
        let mut inclusive = true;
        for _ in 0..100_000 {
            wall = self
                .inner
                .cron
                .find_previous_occurrence(&Utc.from_utc_datetime(&wall), inclusive)
                .ok()?
                .naive_utc();
            let at = self.resolve(wall);
            if at <= now {
                return Some(at);
            }
            inclusive = false;
        }
        None
    }

    /// The instant a wall-clock fire time stands for, by the zone's rules for that date.
    fn resolve(&self, wall: NaiveDateTime) -> DateTime<Utc> {
        match self.timezone.from_local_datetime(&wall) {
            LocalResult::Single(t) => t.with_timezone(&Utc),
            // A fall-back overlap: the first occurrence only.
            LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc),
            LocalResult::None => self.end_of_gap(wall),
        }
    }

    /// The first instant whose wall-clock time is later than `wall`, a time that a
    /// spring-forward gap skips: the instant the gap ends.
    fn end_of_gap(&self, wall: NaiveDateTime) -> DateTime<Utc> {
        // UTC offsets lie within ±26 h, so the wall clock reads before `wall` at `lo` and after
        // it at `hi`; bisect to the second.
        let wall = wall.and_utc().timestamp();
        let (mut lo, mut hi) = (wall - 26 * 3600, wall + 26 * 3600);
        let later = |t: i64| {
            Utc.timestamp_opt(t, 0).single().is_none_or(|u| {
                u.with_timezone(&self.timezone)
                    .naive_local()
                    .and_utc()
                    .timestamp()
                    > wall
            })
        };
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if later(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Utc.timestamp_opt(hi, 0)
            .single()
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// The longest time between two consecutive fire times, whatever the day: used to check
    /// that `max_age` leaves room for the schedule.
    ///
    /// It is computed once, at parse time, over a full cycle of the expression rather than by
    /// sampling fires from today (which measured `*/5 * * * 1-5` as 5 minutes on a Monday and
    /// 2885 on a Friday). The time-of-day fields do not depend on the date, and the day fields
    /// repeat with the 400-year Gregorian cycle, so the wall-clock gap over that cycle is exact.
    /// The zone then adds at most its largest backward jump of the UTC offset (an hour for
    /// most zones, 30 minutes for Lord Howe), between two fires that straddle a fall-back.
    pub fn longest_gap(&self) -> Duration {
        self.inner.longest_gap
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Datelike, Timelike};

    use super::*;
    use crate::schedule::testing::{at, fires, local, tz};

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
        assert!(CronSchedule::parse("0 0 3 * * 1 2030", Tz::UTC).is_err());
        assert!(CronSchedule::parse("0 99 * * *", Tz::UTC).is_err());
        for never in ["0 0 30 2 *", "0 0 31 4,6,9,11 *"] {
            assert_eq!(
                CronSchedule::parse(never, Tz::UTC).unwrap_err(),
                "cron expression never fires"
            );
        }
    }

    #[test]
    fn cron_is_evaluated_in_its_timezone() {
        let c = CronSchedule::parse("0 3 * * *", tz("Europe/Paris")).unwrap();
        // 03:00 in Paris in winter is 02:00 UTC.
        assert_eq!(
            c.next_after(at(2026, 1, 10, 0, 0)),
            Some(at(2026, 1, 10, 2, 0))
        );
    }

    #[test]
    fn day_of_month_and_day_of_week_are_ored_when_both_are_restricted() {
        let c = CronSchedule::parse("0 3 1-7 * 1", Tz::UTC).unwrap();
        // June 2026: Monday the 1st; days 1-7, then the Mondays 8, 15, 22, 29.
        let days: Vec<u32> = fires(&c, at(2026, 5, 31, 12, 0), 11)
            .iter()
            .map(|t| t.day())
            .collect();
        assert_eq!(days, [1, 2, 3, 4, 5, 6, 7, 8, 15, 22, 29]);
        assert!(fires(&c, at(2026, 5, 31, 12, 0), 11)
            .iter()
            .all(|t| t.hour() == 3));
        // A field starting with `*` is not restricted: crontab ANDs then (odd days that are
        // Mondays), and a plain `*` leaves the other field alone.
        let odd_mondays = CronSchedule::parse("0 3 */2 * 1", Tz::UTC).unwrap();
        let days: Vec<u32> = fires(&odd_mondays, at(2026, 5, 31, 12, 0), 3)
            .iter()
            .map(|t| t.day())
            .collect();
        assert_eq!(days, [1, 15, 29]);
        let mondays = CronSchedule::parse("0 3 * * 1", Tz::UTC).unwrap();
        assert_eq!(
            fires(&mondays, at(2026, 5, 31, 12, 0), 2),
            [at(2026, 6, 1, 3, 0), at(2026, 6, 8, 3, 0)]
        );
    }

    #[test]
    fn weekdays_every_five_minutes_pause_over_the_weekend() {
        let c = CronSchedule::parse("*/5 * * * 1-5", Tz::UTC).unwrap();
        // Friday 2026-06-05 23:50 UTC.
        assert_eq!(
            fires(&c, at(2026, 6, 5, 23, 50), 3),
            [
                at(2026, 6, 5, 23, 55),
                at(2026, 6, 8, 0, 0),
                at(2026, 6, 8, 0, 5)
            ]
        );
        assert!(fires(&c, at(2026, 6, 1, 0, 0), 3000).iter().all(|t| t
            .weekday()
            .num_days_from_monday()
            < 5
            && t.minute() % 5 == 0));
    }

    #[test]
    fn a_fire_in_a_spring_forward_gap_moves_to_the_end_of_the_gap() {
        // (zone, daily fire time, the spring-forward date, the first instant after the gap)
        let cases = [
            // Paris: 02:00 CET becomes 03:00 CEST on 29 March 2026 (01:00 UTC).
            (
                "Europe/Paris",
                (2, 30),
                (2026, 3, 29),
                at(2026, 3, 29, 1, 0),
            ),
            // New York: 02:00 EST becomes 03:00 EDT on 8 March 2026 (07:00 UTC).
            (
                "America/New_York",
                (2, 30),
                (2026, 3, 8),
                at(2026, 3, 8, 7, 0),
            ),
            // Lord Howe: 02:00 becomes 02:30 (+11) on 4 October 2026 (15:30 UTC the day before).
            (
                "Australia/Lord_Howe",
                (2, 15),
                (2026, 10, 4),
                at(2026, 10, 3, 15, 30),
            ),
            // Sydney (southern hemisphere): 02:00 AEST becomes 03:00 AEDT on 4 October 2026.
            (
                "Australia/Sydney",
                (2, 30),
                (2026, 10, 4),
                at(2026, 10, 3, 16, 0),
            ),
        ];
        for (name, (h, mi), (y, mo, d), gap_end) in cases {
            let zone = tz(name);
            let c = CronSchedule::parse(&format!("{mi} {h} * * *"), zone).unwrap();
            let fired = fires(&c, local(zone, y, mo, d - 1, 12, 0), 2);
            // The day after, the same wall-clock time again, in the new offset.
            assert_eq!(fired, [gap_end, local(zone, y, mo, d + 1, h, mi)], "{name}");
        }
    }

    #[test]
    fn several_times_in_a_gap_fire_once_and_the_rest_of_the_hour_goes_on() {
        let paris = tz("Europe/Paris");
        let c = CronSchedule::parse("*/20 * * * *", paris).unwrap();
        // 01:40 CET, then 02:00-02:40 do not exist: one fire at 03:00 CEST, then 03:20.
        assert_eq!(
            fires(&c, at(2026, 3, 29, 0, 30), 4),
            [
                at(2026, 3, 29, 0, 40),
                at(2026, 3, 29, 1, 0),
                at(2026, 3, 29, 1, 20),
                at(2026, 3, 29, 1, 40)
            ]
        );
    }

    #[test]
    fn a_time_repeated_by_a_fall_back_fires_once() {
        // (zone, expression, instant before the overlap, expected next fires)
        let paris = tz("Europe/Paris");
        // 25 October 2026: 03:00 CEST becomes 02:00 CET; 02:30 happens twice, fires once
        // (00:30 UTC), and the next day at 02:30 CET (01:30 UTC).
        let c = CronSchedule::parse("30 2 * * *", paris).unwrap();
        assert_eq!(
            fires(&c, at(2026, 10, 24, 12, 0), 2),
            [at(2026, 10, 25, 0, 30), at(2026, 10, 26, 1, 30)]
        );
        // New York, 1 November 2026: 02:00 EDT becomes 01:00 EST (06:00 UTC).
        let ny = tz("America/New_York");
        let c = CronSchedule::parse("30 1 * * *", ny).unwrap();
        assert_eq!(
            fires(&c, at(2026, 10, 31, 12, 0), 2),
            [at(2026, 11, 1, 5, 30), at(2026, 11, 2, 6, 30)]
        );
        // An interval inside the overlap runs through the first pass and does not repeat the
        // second: 01:40 EDT, then 02:00 EST.
        let c = CronSchedule::parse("*/20 1-2 * * *", ny).unwrap();
        assert_eq!(
            fires(&c, at(2026, 11, 1, 5, 30), 2),
            [at(2026, 11, 1, 5, 40), at(2026, 11, 1, 7, 0)]
        );
        // Asked from inside the second pass (01:10 EST), the next fire is still 02:00 EST.
        assert_eq!(
            c.next_after(at(2026, 11, 1, 6, 10)),
            Some(at(2026, 11, 1, 7, 0))
        );
        // Lord Howe, 5 April 2026: 02:00 (+11) becomes 01:30 (+10:30); 01:45 fires once.
        let lh = tz("Australia/Lord_Howe");
        let c = CronSchedule::parse("45 1 * * *", lh).unwrap();
        assert_eq!(
            fires(&c, at(2026, 4, 4, 0, 0), 2),
            [at(2026, 4, 4, 14, 45), at(2026, 4, 5, 15, 15)]
        );
        // Santiago (southern hemisphere, changes at midnight): 5 April 2026, 00:00 -03
        // becomes 23:00 -04 on the 4th; 23:30 on the 4th happens twice and fires once.
        let scl = tz("America/Santiago");
        let c = CronSchedule::parse("30 23 * * *", scl).unwrap();
        assert_eq!(
            fires(&c, at(2026, 4, 4, 12, 0), 2),
            [at(2026, 4, 5, 2, 30), at(2026, 4, 6, 3, 30)]
        );
    }

    #[test]
    fn the_latest_fire_at_or_before_now_follows_the_same_rules() {
        let paris = tz("Europe/Paris");
        let c = CronSchedule::parse("30 2 * * *", paris).unwrap();
        assert_eq!(
            c.latest_at_or_before(at(2026, 3, 29, 1, 10)),
            Some(at(2026, 3, 29, 1, 0)),
            "in the gap: the end of the gap"
        );
        assert_eq!(
            c.latest_at_or_before(at(2026, 10, 25, 1, 45)),
            Some(at(2026, 10, 25, 0, 30)),
            "after the overlap: its first pass"
        );
        assert_eq!(
            c.latest_at_or_before(at(2026, 10, 25, 0, 30)),
            Some(at(2026, 10, 25, 0, 30)),
            "inclusive"
        );
    }
}
