//! The one retry delay policy of keyrotd: exponential backoff with equal jitter.
//!
//! Every retry loop uses it: the engine between failed rotation attempts, the scheduler after a
//! panicked run, the alert worker between delivery attempts, and plugins between calls inside one
//! step (the `http` rotator's retries, IAM's wait for a new key to reach STS). One policy means
//! one place that guarantees the two properties retries need:
//!
//! - *bounded*: the delay never exceeds `max`, and no attempt number overflows it;
//! - *spread*: half of each delay is random, so many credentials that failed together (a
//!   provider outage) do not retry in lockstep.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Exponential backoff: `initial`, doubling per attempt, capped at `max`, with equal jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay before the first retry (before jitter).
    pub initial: Duration,
    /// The longest delay, whatever the attempt.
    pub max: Duration,
}

impl Backoff {
    /// A policy starting at `initial` and capped at `max`.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The capped exponential delay after failed attempt number `attempt` (1-based), before
    /// jitter: `initial × 2^(attempt-1)`, at most `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1).min(31))
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay after failed attempt number `attempt` (1-based): half of [`Backoff::ceiling`]
    /// fixed, half random, so it lies in `[ceiling/2, ceiling]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let half = self.ceiling(attempt) / 2;
        half + half.mul_f64(unit_random())
    }
}

/// A random number in `[0, 1)`. Jitter needs no cryptographic quality, only different values in
/// different processes and calls: std's randomly keyed hasher gives that without a dependency.
fn unit_random() -> f64 {
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_is_capped_and_never_overflows() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(b.ceiling(0), Duration::from_secs(1));
        assert_eq!(b.ceiling(1), Duration::from_secs(1));
        assert_eq!(b.ceiling(3), Duration::from_secs(4));
        assert_eq!(b.ceiling(7), Duration::from_secs(60));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(60));
        let huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.ceiling(40), Duration::MAX);
        for attempt in [1, 2, 5, 30, u32::MAX] {
            let d = b.delay(attempt);
            let ceiling = b.ceiling(attempt);
            assert!(d >= ceiling / 2 && d <= ceiling, "{attempt}: {d:?}");
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let delays: std::collections::HashSet<_> = (0..20).map(|_| b.delay(1)).collect();
        assert!(delays.len() > 10, "{delays:?}");
        assert_eq!(
            Backoff::new(Duration::ZERO, Duration::from_secs(1)).delay(5),
            Duration::ZERO
        );
    }
}
