//! Human-readable durations and times, as the config writes them and as commands and logs show
//! them. A leaf: it imports nothing from the crate, so every layer may use it.

use std::time::Duration;

use chrono::{TimeZone, Utc};

/// A duration in the form the config uses (`40d`, `1h30m`, `10s`, `500ms`).
pub fn human(d: Duration) -> String {
    if d == Duration::MAX {
        return "never".into();
    }
    if d.is_zero() {
        return "0s".into();
    }
    let mut secs = d.as_secs();
    let mut out = String::new();
    for (unit, size) in [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    // A grace period may keep a fraction of a second; show it rather than round it away.
    let nanos = d.subsec_nanos();
    match nanos {
        0 => {}
        n if n % 1_000_000 == 0 => out.push_str(&format!("{}ms", n / 1_000_000)),
        n if n % 1_000 == 0 => out.push_str(&format!("{}us", n / 1_000)),
        n => out.push_str(&format!("{n}ns")),
    }
    out
}

/// A Unix time for people: `2026-01-31 03:00:00Z`, or `-`.
pub fn time(t: Option<i64>) -> String {
    t.and_then(|t| Utc.timestamp_opt(t, 0).single())
        .map_or_else(
            || "-".into(),
            |t| t.format("%Y-%m-%d %H:%M:%SZ").to_string(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_the_config_writes_them() {
        assert_eq!(human(Duration::from_millis(2500)), "2s500ms");
        assert_eq!(human(Duration::from_secs(90061)), "1d1h1m1s");
        assert_eq!(human(Duration::ZERO), "0s");
        assert_eq!(human(Duration::MAX), "never");
    }

    #[test]
    fn times_read_in_utc_or_as_a_dash() {
        assert_eq!(time(Some(0)), "1970-01-01 00:00:00Z");
        assert_eq!(time(None), "-");
    }
}
