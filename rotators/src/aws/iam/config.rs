//! The `aws_iam_access_key` rotator's configuration: the IAM user, the region and endpoint, how
//! long `verify` waits for IAM to propagate a new key, and the timeouts.
//!
//! Invariant: [`IamAccessKeyConfig::validate`] checks everything that can be known without
//! calling AWS, and its error names the offending field.

use std::time::Duration;

use serde::Deserialize;

use crate::aws;
use crate::timeouts::{self, Timeouts};

/// Configuration of the `aws_iam_access_key` rotator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IamAccessKeyConfig {
    /// The IAM user whose keys are rotated.
    pub user_name: String,
    /// AWS region for the IAM and STS calls; defaults to the standard chain.
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint override for IAM and STS (a test server).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// The user's AWS account (twelve digits), for the ARN `keyrotd policy` prints; defaults to
    /// the `[aws]` table's. Calls never need it.
    #[serde(default)]
    pub account_id: Option<String>,
    /// How long verify keeps retrying while IAM propagates a new key (`"30s"`, `"2m"`).
    #[serde(default = "default_verify_timeout")]
    pub verify_timeout: String,
    /// Whether revoke deletes the key after deactivating it. When false the inactive key stays
    /// until the next rotation's issue deletes it.
    #[serde(default = "default_true")]
    pub delete_after_deactivate: bool,
    /// The longest wait for a connection to IAM or STS (`"10s"`).
    #[serde(
        default = "timeouts::default_connect",
        deserialize_with = "timeouts::duration"
    )]
    pub connect_timeout: Duration,
    /// The longest one step may wait for IAM and STS, SDK retries included (`"60s"`); verify may
    /// add `verify_timeout` to it.
    #[serde(
        default = "timeouts::default_call",
        deserialize_with = "timeouts::duration"
    )]
    pub timeout: Duration,
}

fn default_verify_timeout() -> String {
    "30s".into()
}

fn default_true() -> bool {
    true
}

impl IamAccessKeyConfig {
    /// Checks what can be known without calling AWS; the error names the offending field.
    pub fn validate(&self) -> Result<Duration, String> {
        let user = &self.user_name;
        if user.is_empty() || user.len() > 64 {
            return Err(format!(
                "user_name: must be 1 to 64 characters, got {}",
                user.len()
            ));
        }
        if !user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
        {
            return Err(format!(
                "user_name: `{user}` may only contain letters, digits and +=,.@_-"
            ));
        }
        aws::validate_account_id(self.account_id.as_deref())?;
        let timeout = humantime::parse_duration(&self.verify_timeout).map_err(|e| {
            format!(
                "verify_timeout: `{}` is not a duration like \"30s\": {e}",
                self.verify_timeout
            )
        })?;
        if timeout > Duration::from_secs(3600) {
            return Err("verify_timeout: must be at most 1h".into());
        }
        aws::validate_region(self.region.as_deref())?;
        aws::validate_endpoint_url(self.endpoint_url.as_deref())?;
        timeouts::validate(self.connect_timeout, self.timeout)?;
        Ok(timeout)
    }

    /// The configured `connect_timeout` and `timeout`.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts::new(self.connect_timeout, self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(user: &str) -> IamAccessKeyConfig {
        IamAccessKeyConfig {
            user_name: user.into(),
            region: None,
            endpoint_url: None,
            account_id: None,
            verify_timeout: default_verify_timeout(),
            delete_after_deactivate: true,
            connect_timeout: timeouts::DEFAULT_CONNECT_TIMEOUT,
            timeout: timeouts::DEFAULT_TIMEOUT,
        }
    }

    #[test]
    fn validates_user_names_and_durations() {
        assert_eq!(
            config("svc.deploy+ci@corp").validate(),
            Ok(Duration::from_secs(30))
        );
        assert!(config("").validate().unwrap_err().starts_with("user_name:"));
        assert!(config("has space")
            .validate()
            .unwrap_err()
            .starts_with("user_name:"));
        assert!(config(&"a".repeat(65))
            .validate()
            .unwrap_err()
            .starts_with("user_name:"));
        let mut c = config("app");
        c.verify_timeout = "soon".into();
        assert!(c.validate().unwrap_err().starts_with("verify_timeout:"));
        c.verify_timeout = "2m".into();
        assert_eq!(c.validate(), Ok(Duration::from_secs(120)));
    }

    #[test]
    fn registered_as_a_rotator_kind_refusing_unknown_fields() {
        let value = serde_json::json!({"kind": "aws_iam_access_key", "user_name": "ci-deployer"});
        let config: crate::RotatorConfig = serde_json::from_value(value).unwrap();
        assert_eq!(config.kind(), "aws_iam_access_key");
        let rotator = config.build().unwrap();
        assert_eq!(rotator.secret_field(), "SecretAccessKey");
        let crate::RotatorConfig::AwsIamAccessKey(c) = config else {
            panic!("wrong variant")
        };
        assert!(
            c.delete_after_deactivate,
            "deleting after deactivation is the default"
        );
        let typo = serde_json::json!({"kind": "aws_iam_access_key", "user_name": "x", "user": "y"});
        assert!(serde_json::from_value::<crate::RotatorConfig>(typo).is_err());
        let bad = serde_json::json!({"kind": "aws_iam_access_key", "user_name": "x", "verify_timeout": "1 fortnight"});
        let config: crate::RotatorConfig = serde_json::from_value(bad).unwrap();
        assert!(config
            .validate()
            .unwrap_err()
            .starts_with("verify_timeout:"));
    }
}
