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

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

/// The longest duration the inventory accepts in any field: 100 years (of 365.25 days, as
/// `humantime` counts a `y`). Every instant keyrotd computes is then a few centuries from now
/// at most, far inside what `chrono` and an `i64` of seconds represent, so no addition can
/// overflow or wrap.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// What one duration field of the inventory accepts, besides the [`MAX_DURATION`] ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepts {
    /// Whether `0s` means something for this field.
    pub zero: bool,
    /// Whether a fraction of a second is honoured. The schedule, the state store and the
    /// engine count whole seconds, so a fraction there would be silently dropped: refused.
    pub fractions: bool,
}

impl Accepts {
    /// Positive whole seconds: intervals, windows, ages, retry delays, alert repeats.
    pub const SECONDS: Self = Self {
        zero: false,
        fractions: false,
    };
    /// Zero or whole seconds (`warn_before`).
    pub const SECONDS_OR_ZERO: Self = Self {
        zero: true,
        fractions: false,
    };
    /// Zero or any precision: a grace period. The engine rounds a revocation time *up* to the
    /// next whole second, so a fraction is honoured as at least that long.
    pub const GRACE: Self = Self {
        zero: true,
        fractions: true,
    };
    /// Positive, any precision: timeouts and delivery backoff, which only ever arm a timer.
    pub const TIMER: Self = Self {
        zero: false,
        fractions: true,
    };
}

/// Parses a human duration (`90d`, `12h`, `30s`, `1h30m`, `500ms`) and checks it against the
/// bounds: at most [`MAX_DURATION`], zero and fractions of a second only where `accepts` says.
pub fn parse_duration(text: &str, accepts: Accepts) -> Result<Duration, String> {
    let d = match humantime::parse_duration(text) {
        Ok(d) => d,
        Err(humantime::DurationError::NumberOverflow) => {
            return Err(format!("`{text}` is too long: at most 100y"))
        }
        Err(e) => {
            return Err(format!(
                "`{text}` is not a duration like 90d, 12h or 30s ({e})"
            ))
        }
    };
    if d > MAX_DURATION {
        return Err(format!("`{text}` is too long: at most 100y"));
    }
    if d.is_zero() && !accepts.zero {
        return Err("must be longer than zero".into());
    }
    if d.subsec_nanos() != 0 && !accepts.fractions {
        return Err(format!(
            "`{text}` must be a whole number of seconds (keyrotd schedules in seconds)"
        ));
    }
    Ok(d)
}

/// `t + d`, or the last representable instant: an instant beyond it is "never", which is the
/// safe reading of a deadline (never "at once", which a wrapped addition would give).
pub fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Whole seconds of `d` as an `i64`, saturating (for arithmetic on Unix timestamps).
pub fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Days in the Gregorian cycle: the calendar repeats every 400 years, and 146,097 days are
/// exactly 20,871 weeks, so every combination of month, day of month, weekday, month length
/// and leap day recurs with this period.
const GREGORIAN_CYCLE_DAYS: i64 = 146_097;

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

/// The longest gap between two consecutive fire times on a wall clock without daylight saving,
/// over a full Gregorian cycle; `None` if the expression never fires.
fn wall_clock_gap(cron: &Cron) -> Option<Duration> {
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
fn largest_backward_jump(tz: Tz) -> Duration {
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

#[cfg(test)]
mod tests {
    use chrono::{Datelike, Timelike};

    use super::*;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn tz(name: &str) -> Tz {
        name.parse().unwrap()
    }

    /// `(y, mo, d, h, mi)` in `zone`, as an instant; panics on a wall time that does not
    /// exist or is ambiguous (tests spell those out in UTC).
    fn local(zone: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        zone.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .unwrap()
            .with_timezone(&Utc)
    }

    fn fires(c: &CronSchedule, from: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        std::iter::successors(c.next_after(from), |t| c.next_after(*t))
            .take(n)
            .collect()
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

    #[test]
    fn durations_are_bounded_and_fractions_refused_where_seconds_are_counted() {
        use Accepts as A;
        for (text, accepts) in [
            ("99999999999d", A::SECONDS),
            ("300000y", A::SECONDS),
            ("101y", A::GRACE),
            ("99999999999999999999s", A::TIMER),
        ] {
            let e = parse_duration(text, accepts).unwrap_err();
            assert!(e.contains("too long: at most 100y"), "{text}: {e}");
        }
        assert_eq!(
            parse_duration("100y", A::SECONDS),
            Ok(MAX_DURATION),
            "the ceiling itself is accepted"
        );
        assert_eq!(
            parse_duration("0s", A::SECONDS).unwrap_err(),
            "must be longer than zero"
        );
        assert_eq!(parse_duration("0s", A::GRACE), Ok(Duration::ZERO));
        for text in ["1ns", "1500ms"] {
            let e = parse_duration(text, A::SECONDS).unwrap_err();
            assert!(e.contains("whole number of seconds"), "{text}: {e}");
        }
        assert_eq!(parse_duration("1ns", A::GRACE), Ok(Duration::from_nanos(1)));
        assert_eq!(
            parse_duration("500ms", A::TIMER),
            Ok(Duration::from_millis(500))
        );
        assert!(parse_duration("soon", A::SECONDS)
            .unwrap_err()
            .contains("not a duration"));
    }
}
