//! The `aws_secrets_manager` store's configuration: the secret (a name or an ARN), the JSON
//! member that holds the credential, the region, endpoint and account, the timeouts, and the
//! secret's ARN patterns for `keyrotd policy`.
//!
//! Invariant: secret ids are checked without calling AWS, and the reasons a check gives never
//! quote the id, so a secret reference holding a pasted secret is refused without echoing it.

use std::time::Duration;

use serde::Deserialize;

use crate::aws;
use crate::timeouts::{self, Timeouts};
use keyrotd_plugin::permissions::aws_partition;
use keyrotd_plugin::reference::check_secret_id;

/// Configuration of the `aws_secrets_manager` store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsManagerConfig {
    /// The secret's name or full ARN. The secret must exist; keyrotd never creates it.
    pub secret_id: String,
    /// When set, the secret is a JSON object and the credential's secret goes into this member
    /// (its attributes into members of their own names); other members are kept.
    #[serde(default)]
    pub field: Option<String>,
    /// AWS region; defaults to the standard chain (`AWS_REGION`, profile).
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint override (a VPC endpoint, a test server).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// The secret's AWS account (twelve digits), for the ARN `keyrotd policy` prints when
    /// `secret_id` is a name; defaults to the `[aws]` table's. Calls never need it.
    #[serde(default)]
    pub account_id: Option<String>,
    /// The longest wait for a connection to Secrets Manager (`"10s"`).
    #[serde(
        default = "timeouts::default_connect",
        deserialize_with = "timeouts::duration"
    )]
    pub connect_timeout: Duration,
    /// The longest one step may wait for Secrets Manager, SDK retries included (`"60s"`).
    #[serde(
        default = "timeouts::default_call",
        deserialize_with = "timeouts::duration"
    )]
    pub timeout: Duration,
}

impl SecretsManagerConfig {
    /// The secret this store writes, for the inventory's duplicate check: its id with the region
    /// it lives in (an ARN names its own) and the endpoint. The JSON `field` is left out on
    /// purpose: two credentials in one secret would fight over its `AWSPENDING` label.
    pub fn target(&self) -> String {
        let region = match self.secret_id.split(':').nth(3) {
            Some(region) if self.secret_id.starts_with("arn:") => Some(region),
            _ => self.region.as_deref(),
        };
        format!(
            "Secrets Manager secret `{}` in region {} at {}",
            self.secret_id,
            region.unwrap_or("(default)"),
            self.endpoint_url.as_deref().unwrap_or("AWS")
        )
    }

    /// A configuration for `secret_id` with every other field at its default.
    pub fn new(secret_id: impl Into<String>) -> Self {
        Self {
            secret_id: secret_id.into(),
            field: None,
            region: None,
            endpoint_url: None,
            account_id: None,
            connect_timeout: timeouts::DEFAULT_CONNECT_TIMEOUT,
            timeout: timeouts::DEFAULT_TIMEOUT,
        }
    }

    /// The configured `connect_timeout` and `timeout`.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts::new(self.connect_timeout, self.timeout)
    }

    /// Checks what can be known without calling AWS; the error names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let id = &self.secret_id;
        check_secret_id(id).map_err(|why| {
            if id.trim().is_empty() {
                format!("secret_id: {why}")
            } else {
                format!("secret_id: `{id}` is not a valid secret name or ARN: {why}")
            }
        })?;
        if self.field.as_deref().is_some_and(str::is_empty) {
            return Err("field: must not be empty when set".into());
        }
        aws::validate_region(self.region.as_deref())?;
        aws::validate_account_id(self.account_id.as_deref())?;
        aws::validate_endpoint_url(self.endpoint_url.as_deref())?;
        timeouts::validate(self.connect_timeout, self.timeout)
    }
}

/// The ARN patterns of `secret_id` for a policy's `Resource`, with a note for each part the
/// configuration left open. A name gets AWS's random six-character suffix as `-??????`, which
/// matches this secret and not one whose name merely starts with it.
pub(crate) fn secret_arns(
    secret_id: &str,
    region: Option<&str>,
    account_id: Option<&str>,
) -> (Vec<String>, Vec<String>) {
    if secret_id.starts_with("arn:") {
        // A complete ARN ends with the suffix; a partial one (AWS accepts both) gets it here.
        let name = secret_id.splitn(7, ':').nth(6).unwrap_or_default();
        let complete = name.rsplit_once('-').is_some_and(|(_, suffix)| {
            suffix.len() == 6 && suffix.bytes().all(|b| b.is_ascii_alphanumeric())
        });
        let arn = if complete {
            secret_id.to_owned()
        } else {
            format!("{secret_id}-??????")
        };
        return (vec![arn], vec![]);
    }
    let mut notes = Vec::new();
    let (account, note) = aws::account_or_wildcard(account_id);
    notes.extend(note);
    let region_part = region.unwrap_or_else(|| {
        notes.push(format!(
            "secret `{secret_id}` has no region configured, so its ARN matches any region (`*`)"
        ));
        "*"
    });
    let partition = aws_partition(region);
    (
        vec![format!(
            "arn:{partition}:secretsmanager:{region_part}:{account}:secret:{secret_id}-??????"
        )],
        notes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(secret_id: &str) -> SecretsManagerConfig {
        SecretsManagerConfig::new(secret_id)
    }

    #[test]
    fn validates_secret_ids_and_arns() {
        assert!(config("prod/db/app").validate().is_ok());
        assert!(
            config("arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/db-AbCdEf")
                .validate()
                .is_ok()
        );
        assert!(config("").validate().unwrap_err().starts_with("secret_id:"));
        assert!(config("has space")
            .validate()
            .unwrap_err()
            .starts_with("secret_id:"));
        for bad in [
            "arn:aws:secretsmanager:eu-west-1:123456789012:prod/db",
            "arn:aws:s3:eu-west-1:123456789012:secret:x",
            "arn:aws:secretsmanager:eu-west-1:1234:secret:x",
            "arn:aws:secretsmanager::123456789012:secret:x",
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:",
        ] {
            let err = config(bad).validate().unwrap_err();
            assert!(
                err.starts_with("secret_id:") && err.contains("ARN"),
                "{bad}: {err}"
            );
        }
        let mut c = config("x");
        c.field = Some(String::new());
        assert!(c.validate().unwrap_err().starts_with("field:"));
        c.field = None;
        c.endpoint_url = Some("localhost:4566".into());
        assert!(c.validate().unwrap_err().starts_with("endpoint_url:"));
    }

    #[test]
    fn secret_arns_match_the_secret_and_say_what_is_open() {
        let (arns, notes) = secret_arns("prod/db", Some("eu-west-1"), Some("123456789012"));
        assert_eq!(
            arns,
            ["arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/db-??????"]
        );
        assert!(notes.is_empty(), "{notes:?}");
        let (arns, notes) = secret_arns("prod/db", None, None);
        assert_eq!(arns, ["arn:aws:secretsmanager:*:*:secret:prod/db-??????"]);
        assert_eq!(notes.len(), 2, "{notes:?}");
        let partial = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/db";
        assert_eq!(
            secret_arns(partial, None, None).0,
            [format!("{partial}-??????")]
        );
        let complete = format!("{partial}-AbC123");
        assert_eq!(secret_arns(&complete, None, None), (vec![complete], vec![]));
    }
}
