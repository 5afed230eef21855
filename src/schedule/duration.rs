//! Every configured duration: parsing, the bounds it must respect, and saturating arithmetic on
//! instants and seconds.
//!
//! Invariant: a duration that passed [`parse_duration`] is at most [`MAX_DURATION`], so adding
//! it to any instant keyrotd computes cannot overflow; [`add`] and [`secs`] saturate anyway.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

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

#[cfg(test)]
mod tests {
    use super::*;

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
