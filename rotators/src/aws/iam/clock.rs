//! AWS's clock, for `abandon` after a crash: a key counts as an orphan of the rotation only if
//! IAM created it after the rotation started, and `CreateDate` is on AWS's clock, not ours.
//!
//! Invariant: the comparison never mixes clocks: the rotation's start is moved to AWS's time by
//! the elapsed time measured on the local clock (see [`started_in_aws_time`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_iam::config::interceptors::BeforeDeserializationInterceptorContextRef;
use aws_sdk_iam::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_iam::error::BoxError;
use aws_sdk_iam::primitives::{DateTime, DateTimeFormat};

/// Clock differences smaller than this are within the precision of the `Date` header and of
/// `CreateDate` (whole seconds) and are not corrected.
const NEGLIGIBLE_SKEW: Duration = Duration::from_secs(2);

/// The rotation's start in AWS's time, in whole seconds: the time AWS reported (`aws_now`) less
/// the time that passed on the local clock since the rotation started. Measuring the elapsed time
/// on one clock and the instant on the other makes the comparison with a key's `CreateDate`
/// immune to skew between the two: a local clock minutes ahead of AWS would otherwise hide a
/// fresh orphan, and one behind AWS would take a key made before the rotation for an orphan.
/// Without a usable `Date` header, or when the clocks agree within [`NEGLIGIBLE_SKEW`], the local
/// start time is used as it is.
pub(super) fn started_in_aws_time(
    started: SystemTime,
    local_now: SystemTime,
    aws_now: Option<i64>,
) -> i64 {
    let secs = |t: SystemTime| match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    let local_start = secs(started);
    let Some(aws_now) = aws_now else {
        return local_start;
    };
    let skew = aws_now - secs(local_now);
    if skew.unsigned_abs() <= NEGLIGIBLE_SKEW.as_secs() {
        return local_start;
    }
    // Local clock jumps during the rotation would make "elapsed" negative: count it as zero.
    let elapsed = secs(local_now).saturating_sub(local_start).max(0);
    aws_now.saturating_sub(elapsed)
}

/// Records the `Date` header of an AWS response: AWS's clock, to date `CreateDate` against.
#[derive(Debug, Clone, Default)]
pub(super) struct ResponseDate(Arc<Mutex<Option<i64>>>);

impl ResponseDate {
    /// AWS's time in the last response, in seconds since the epoch, if it had a `Date` header.
    pub(super) fn secs(&self) -> Option<i64> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Intercept for ResponseDate {
    fn name(&self) -> &'static str {
        "keyrotd::ResponseDate"
    }

    fn read_after_transmit(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let date = context
            .response()
            .headers()
            .get("date")
            .and_then(|d| DateTime::from_str(d, DateTimeFormat::HttpDate).ok())
            .map(|d| d.secs());
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = date;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_is_moved_to_aws_time_when_the_clocks_disagree() {
        let t = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let (start, now) = (t(1_000_000), t(1_000_030));
        // Clocks in agreement (within the header's precision), or no header: the local start.
        assert_eq!(started_in_aws_time(start, now, None), 1_000_000);
        assert_eq!(started_in_aws_time(start, now, Some(1_000_031)), 1_000_000);
        // The local clock 10 minutes ahead of AWS: the start was 30 s before AWS's now.
        assert_eq!(
            started_in_aws_time(start, now, Some(1_000_030 - 600)),
            999_400
        );
        // 10 minutes behind AWS.
        assert_eq!(started_in_aws_time(start, now, Some(1_000_630)), 1_000_600);
        // The local clock jumped back during the rotation: no negative elapsed time.
        assert_eq!(started_in_aws_time(now, start, Some(1_000_600)), 1_000_600);
    }
}
