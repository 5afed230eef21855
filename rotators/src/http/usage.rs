//! The `http` rotator's in-use check: the configured `last_used` request about the old key, and
//! the key's last use at `last_used.pointer` in its JSON answer. A use at or after the promotion
//! means the old key is still in use; `null` or no member means it was never used.
//!
//! Invariant: as everywhere in this rotator, errors name the request and the HTTP status, never
//! the answer's body.

use std::time::{Duration, SystemTime};

use keyrotd_plugin::{Attrs, ProviderError, StepContext, Usage, UsageReport};
use serde_json::Value;

use super::client::status_error;
use super::template::Vars;
use super::{HttpRotator, KEY_ID_ATTR};

impl HttpRotator {
    /// Asks the provider when the old key was last used.
    pub(super) async fn key_last_used(
        &self,
        ctx: StepContext<'_>,
        old: &Attrs,
        since: SystemTime,
    ) -> Result<UsageReport, ProviderError> {
        let (Some(request), Some(config)) = (&self.parsed.last_used, &self.config.last_used) else {
            return Ok(UsageReport::unsupported("http (without `last_used`)"));
        };
        let id = old.get(KEY_ID_ATTR).ok_or_else(|| {
            ProviderError::permanent(format!(
                "last_used: the old credential has no `{KEY_ID_ATTR}` attribute"
            ))
        })?;
        let vars = Vars {
            credential_id: ctx.credential_id,
            old_id: id,
            ..Vars::default()
        };
        let token = self.admin_token("last_used").await?;
        let answer = self.send(request, &vars, token).await?;
        // Gone, as `revoke` counts it: a revoke that went through before a crash must not leave
        // the check failing for good.
        if matches!(answer.status.as_u16(), 404 | 410) {
            return Ok(UsageReport::new(
                Usage::Unused,
                format!(
                    "old key {id} no longer exists (HTTP {})",
                    answer.status.as_u16()
                ),
            ));
        }
        if !answer.status.is_success() {
            return Err(status_error("last_used", answer.status));
        }
        let json = answer.json.ok_or_else(|| {
            ProviderError::permanent(format!(
                "last_used: HTTP {} answer is not JSON",
                answer.status
            ))
        })?;
        let pointer = &config.pointer;
        let at = match json.pointer(pointer) {
            None | Some(Value::Null) => None,
            Some(value) => Some(timestamp(value).ok_or_else(|| {
                // The value itself is not quoted: an answer could hold anything.
                ProviderError::permanent(format!(
                    "last_used: the value at `{pointer}` is neither RFC 3339 in UTC nor Unix seconds"
                ))
            })?),
        };
        Ok(UsageReport::from_last_use(
            &format!("old key {id}"),
            at,
            since,
            None,
        ))
    }
}

/// A time written as RFC 3339 in UTC or as (fractional) Unix seconds.
fn timestamp(value: &Value) -> Option<SystemTime> {
    match value {
        // Strict: a time without a zone (`2026-11-30 03:28:09`) could be local time, and
        // reading it as UTC could revoke a key still in use.
        Value::String(s) => humantime::parse_rfc3339(s).ok(),
        Value::Number(n) => n
            .as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e12)
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(s)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rfc3339_and_unix_seconds() {
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        assert_eq!(
            timestamp(&v("\"2026-11-30T05:00:00Z\"")),
            Some(at(1_796_014_800))
        );
        assert_eq!(timestamp(&v("1796014800")), Some(at(1_796_014_800)));
        assert_eq!(timestamp(&v("\"yesterday\"")), None);
        assert_eq!(timestamp(&v("-5")), None);
        assert_eq!(timestamp(&v("true")), None);
    }
}
