//! The longest time between two consecutive fires of a cron expression, whatever the day:
//! exact over the 400-year Gregorian cycle, plus the zone's largest fall-back.
//!
//! Invariant: the answer depends only on the expression and the zone, never on the day it is
//! computed.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// Days in the Gregorian cycle: the calendar repeats every 400 years, and 146,097 days are
/// exactly 20,871 weeks, so every combination of month, day of month, weekday, month length
/// and leap day recurs with this period.
const GREGORIAN_CYCLE_DAYS: i64 = 146_097;

/// The longest gap between two consecutive fire times on a wall clock without daylight saving,
/// over a full Gregorian cycle; `None` if the expression never fires.
pub(super) fn wall_clock_gap(cron: &Cron) -> Option<Duration> {
    let p = &cron.pattern;
    // The matching times of day, in seconds since midnight: first, last and the longest step.
    let (mut first, mut last, mut within_day) = (None, 0i64, 0i64);
    for h in (0..24).filter(|&h| p.hour_match(h).unwrap_or(false)) {
        for m in (0..60).filter(|&m| p.minute_match(m).unwrap_or(false)) {
            for s in (0..60).filter(|&s| p.second_match(s).unwrap_or(false)) {
                let t = i64::from(h * 3600 + m * 60 + s);
                match first {
                    None => first = Some(t),
                    Some(_) => within_day = within_day.max(t - last),
                }
                last = t;
            }
        }
    }
    let first = first?;
    let (mut first_day, mut previous_day, mut across_days) = (None, 0i64, 0i64);
    // In a matching month, whether a day matches depends only on the month's length and the
    // weekday of its first day (the `L`, `W` and `#` rules included): 4 × 7 month shapes, each
    // asked of croner once, rather than 146,097 days.
    let months: Vec<bool> = (0..=12)
        .map(|m| p.month_match(m).unwrap_or(false))
        .collect();
    // Indexed by length - 28 and weekday.
    let mut shapes: [[Option<MonthDays>; 7]; 4] = Default::default();
    let (mut day, mut weekday) = (0i64, 5u32); // 1 January 2000 was a Saturday
    for year in 2000..2400 {
        for month in 1..=12 {
            let length = month_length(year, month);
            let days = match months[month as usize] {
                true => *shapes[(length - 28) as usize][weekday as usize]
                    .get_or_insert_with(|| MonthDays::new(cron, year, month, length)),
                false => MonthDays::NONE,
            };
            if let Some((first_in_month, last_in_month)) = days.first_last {
                match first_day {
                    None => first_day = Some(day + first_in_month),
                    Some(_) => across_days = across_days.max(day + first_in_month - previous_day),
                }
                across_days = across_days.max(days.longest_step);
                previous_day = day + last_in_month;
            }
            day += i64::from(length);
            weekday = (weekday + length) % 7;
        }
    }
    debug_assert_eq!(day, GREGORIAN_CYCLE_DAYS);
    let first_day = first_day?;
    // The cycle wraps: its last matching day is followed by the first one of the next cycle.
    across_days = across_days.max(first_day + GREGORIAN_CYCLE_DAYS - previous_day);
    let gap = within_day.max(across_days * 86400 - last + first);
    Some(Duration::from_secs(u64::try_from(gap).ok()?))
}

/// The matching days of one month shape, as offsets from its first day.
#[derive(Clone, Copy)]
struct MonthDays {
    /// The first and last matching days, if any.
    first_last: Option<(i64, i64)>,
    /// The longest step, in days, between two matching days of the month.
    longest_step: i64,
}

impl MonthDays {
    const NONE: Self = Self {
        first_last: None,
        longest_step: 0,
    };

    /// The matching days of `month` of `year` (a month that matches), standing for every
    /// month of its length and first weekday.
    fn new(cron: &Cron, year: i32, month: u32, length: u32) -> Self {
        let mut days = (1..=length)
            .filter(|&d| cron.pattern.day_match(year, month, d).unwrap_or(false))
            .map(|d| i64::from(d) - 1);
        let Some(first) = days.next() else {
            return Self::NONE;
        };
        let (last, longest_step) = days.fold((first, 0), |(previous, longest), d| {
            (d, longest.max(d - previous))
        });
        Self {
            first_last: Some((first, last)),
            longest_step,
        }
    }
}

/// Days in `month` of `year`, by the Gregorian rules.
fn month_length(year: i32, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The largest single backward jump of `tz`'s UTC offset (a fall-back, or a zone moving west)
/// between 2000 and 2100: how much longer than on the wall clock a gap between two fires can
/// be. A fixed span, so the answer does not depend on the day it is asked; offsets are sampled
/// every two weeks: zones change them at most a few times a year, and the shortest spell
/// between two changes (Morocco's Ramadan pause) lasts about a month.
pub(super) fn largest_backward_jump(tz: Tz) -> Duration {
    let start = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).single();
    let Some(start) = start else {
        return Duration::ZERO;
    };
    let offset = |t: DateTime<Utc>| {
        use chrono::Offset;
        i64::from(
            tz.offset_from_utc_datetime(&t.naive_utc())
                .fix()
                .local_minus_utc(),
        )
    };
    let mut previous = offset(start);
    let mut largest = 0i64;
    for fortnight in 1..=2_609 {
        let now = offset(start + TimeDelta::weeks(2 * fortnight));
        largest = largest.max(previous - now);
        previous = now;
    }
    Duration::from_secs(largest.unsigned_abs())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono_tz::Tz;

    use crate::schedule::testing::{at, fires, tz};
    use crate::schedule::CronSchedule;

    #[test]
    fn the_longest_gap_does_not_depend_on_the_day_it_is_computed() {
        // Parsing takes no `now`; what matters is that the answer is the weekend, which
        // sampling from a Monday missed. Two fixed "now"s on either side of a weekend give
        // the same fires around it, and the gap matches them.
        let c = CronSchedule::parse("*/5 * * * 1-5", Tz::UTC).unwrap();
        assert_eq!(c.longest_gap(), Duration::from_secs(2885 * 60));
        for now in [at(2026, 6, 1, 9, 0), at(2026, 6, 5, 9, 0)] {
            let weekend = fires(&c, now, 3000)
                .windows(2)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap();
            assert_eq!(weekend.to_std().unwrap(), c.longest_gap(), "from {now}");
        }
        // Monthly: a 31-day month; yearly: a leap year; leap days: 8 years across 2100.
        for (expr, days) in [
            ("0 0 1 * *", 31),
            ("0 0 1 1 *", 366),
            ("0 0 29 2 *", 8 * 365 + 1),
        ] {
            let c = CronSchedule::parse(expr, Tz::UTC).unwrap();
            assert_eq!(c.longest_gap(), Duration::from_secs(days * 86400), "{expr}");
        }
        // Within a day: the longest step, here 20:00 to 06:00.
        let c = CronSchedule::parse("0 6-20/7 * * *", Tz::UTC).unwrap();
        assert_eq!(c.longest_gap(), Duration::from_secs(10 * 3600));
        // A zone with daylight saving adds its fall-back: an hour in Paris, 30 minutes on
        // Lord Howe Island.
        for (zone, extra) in [("Europe/Paris", 3600), ("Australia/Lord_Howe", 1800)] {
            let c = CronSchedule::parse("0 3 * * *", tz(zone)).unwrap();
            assert_eq!(
                c.longest_gap(),
                Duration::from_secs(86400 + extra),
                "{zone}"
            );
        }
    }
}
