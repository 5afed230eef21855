//! The in-use check of the `aws_iam_access_key` rotator: `GetAccessKeyLastUsed` on the old key.
//! A `LastUsedDate` at or after `since` (the promotion, then the last check that saw a use)
//! means a consumer still signs with the old key.
//!
//! IAM records a key's last use late (AWS documents no freshness; in practice minutes to hours)
//! and coarsely, so "not used since promotion" is only as good as that record: the engine's
//! `revoke_min_quiet` covers the lag. moto updates the date at once, to the microsecond.

use std::time::{Duration, SystemTime};

use keyrotd_plugin::permissions::{aws_partition, AwsAction, AwsStatement, Permission};
use keyrotd_plugin::{Attrs, Permissions, ProviderError, Usage, UsageReport};

use super::{attr, IamAccessKeyRotator, NO_SUCH_ENTITY};
use crate::aws::{aws_error, has_code};

/// The one IAM action of the in-use check.
pub const USE_CALLS: &[AwsAction] = &[AwsAction {
    action: "iam:GetAccessKeyLastUsed",
    used_by: &["last_used"],
}];

impl IamAccessKeyRotator {
    /// [`USE_CALLS`] on the user's ARN, as [`IamAccessKeyRotator::permissions`] scopes its own.
    pub(super) fn last_used_permissions(&self) -> Permissions {
        let partition = aws_partition(self.config.region.as_deref());
        let (account, _) = crate::aws::account_or_wildcard(self.config.account_id.as_deref());
        let user = &self.config.user_name;
        Permissions::none().need(Permission::Aws(AwsStatement {
            sid: "KeyrotdIamAccessKeyLastUsed".into(),
            actions: USE_CALLS.to_vec(),
            resources: vec![
                format!("arn:{partition}:iam::{account}:user/{user}"),
                format!("arn:{partition}:iam::{account}:user/*/{user}"),
            ],
        }))
    }

    /// Whether the old key was used since `since`.
    pub(super) async fn key_last_used(
        &self,
        old: &Attrs,
        since: SystemTime,
    ) -> Result<UsageReport, ProviderError> {
        let id = attr(old, "old")?;
        let iam = self.iam().await;
        let out = match iam
            .get_access_key_last_used()
            .access_key_id(id)
            .send()
            .await
        {
            Ok(out) => out,
            // The key is gone (revoked by an earlier run): nobody can use it.
            Err(e) if has_code(&e, NO_SUCH_ENTITY) => {
                return Ok(UsageReport::new(
                    Usage::Unused,
                    format!("old key {id} no longer exists"),
                ))
            }
            Err(e) => {
                let target = format!("key {id} of {}", self.target());
                return Err(aws_error("IAM GetAccessKeyLastUsed", &target, e));
            }
        };
        let used = out.access_key_last_used();
        let at = used.and_then(|u| u.last_used_date()).map(|d| {
            let nanos = u64::try_from(d.as_nanos().max(0)).unwrap_or(u64::MAX);
            SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos)
        });
        let service = used.map(|u| u.service_name()).unwrap_or("N/A");
        let detail = format!("service {service}");
        Ok(UsageReport::from_last_use(
            &format!("old key {id}"),
            at,
            since,
            Some(&detail),
        ))
    }
}
