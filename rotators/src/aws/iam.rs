//! The `aws_iam_access_key` rotator: dual-phase rotation of an IAM user's access keys.
//!
//! IAM allows two keys per user, which is exactly what a zero-downtime rotation needs: the new
//! key is created and published while the old one keeps working, and the old one is deactivated
//! and deleted only after the grace period.
//!
//! - issue: `CreateAccessKey`. If the user already has two keys, the non-current one is deleted
//!   when it is *inactive* (the leftover of the previous rotation, kept because
//!   `delete_after_deactivate = false` or a crash); two active keys make issue fail untouched.
//! - verify: STS `GetCallerIdentity` signed with the new key, retried for `verify_timeout`
//!   while IAM propagates the key, and the caller must be the configured user. Its step may
//!   therefore last `verify_timeout` longer than `timeout`.
//! - revoke: `UpdateAccessKey` to `Inactive`, then `DeleteAccessKey`.
//! - abandon: deletes the issued key, or, when a crash lost it, every key of the user that is
//!   neither the current one nor the one the rotation replaces and was created since the rotation
//!   started, on AWS's clock (see [`started_in_aws_time`]).
//!
//! The credential's secret is the `SecretAccessKey`; its attribute `AccessKeyId` identifies it,
//! so its store should write JSON (file `format = "json"`, Secrets Manager with `field`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_iam::config::interceptors::BeforeDeserializationInterceptorContextRef;
use aws_sdk_iam::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_iam::error::BoxError;
use aws_sdk_iam::primitives::{DateTime, DateTimeFormat};
use aws_sdk_iam::types::{AccessKeyMetadata, StatusType};
use aws_sdk_sts::config::Credentials;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{aws_error, has_code, Connection};
use crate::timeouts::{self, Timeouts};
use crate::{Attrs, Credential, ProviderError, Rotator, StepContext};

/// The attribute naming the access key id.
pub const ACCESS_KEY_ID: &str = "AccessKeyId";
const NO_SUCH_ENTITY: &str = "NoSuchEntity";

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
        let timeout = humantime::parse_duration(&self.verify_timeout).map_err(|e| {
            format!(
                "verify_timeout: `{}` is not a duration like \"30s\": {e}",
                self.verify_timeout
            )
        })?;
        if timeout > Duration::from_secs(3600) {
            return Err("verify_timeout: must be at most 1h".into());
        }
        super::validate_region(self.region.as_deref())?;
        super::validate_endpoint_url(self.endpoint_url.as_deref())?;
        timeouts::validate(self.connect_timeout, self.timeout)?;
        Ok(timeout)
    }

    /// The configured `connect_timeout` and `timeout`.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts::new(self.connect_timeout, self.timeout)
    }
}

/// The `aws_iam_access_key` rotator.
#[derive(Debug)]
pub struct IamAccessKeyRotator {
    config: IamAccessKeyConfig,
    verify_timeout: Duration,
    connection: Connection,
}

fn key_id(key: &AccessKeyMetadata) -> &str {
    key.access_key_id().unwrap_or_default()
}

fn attr<'a>(attrs: &'a Attrs, what: &str) -> Result<&'a str, ProviderError> {
    attrs.get(ACCESS_KEY_ID).map(String::as_str).ok_or_else(|| {
        ProviderError::permanent(format!(
            "the {what} credential has no {ACCESS_KEY_ID} attribute (its store must keep attributes: \
             file format = \"json\" or Secrets Manager with a field)"
        ))
    })
}

impl IamAccessKeyRotator {
    /// Builds the rotator from a configuration. Does not touch the network.
    pub fn new(config: IamAccessKeyConfig) -> Result<Self, String> {
        let verify_timeout = config.validate()?;
        let connection = Connection::new(
            config.region.clone(),
            config.endpoint_url.clone(),
            config.timeouts(),
        );
        Ok(Self {
            config,
            verify_timeout,
            connection,
        })
    }

    async fn iam(&self) -> aws_sdk_iam::Client {
        aws_sdk_iam::Client::new(self.connection.sdk_config().await)
    }

    fn target(&self) -> String {
        format!("IAM user `{}`", self.config.user_name)
    }

    async fn list_keys(
        &self,
        iam: &aws_sdk_iam::Client,
    ) -> Result<Vec<AccessKeyMetadata>, ProviderError> {
        // A user has at most two keys: one page is always enough.
        let out = iam
            .list_access_keys()
            .user_name(&self.config.user_name)
            .send()
            .await
            .map_err(|e| aws_error("IAM ListAccessKeys", &self.target(), e))?;
        Ok(out.access_key_metadata().to_vec())
    }

    /// The user's keys and AWS's own time when it listed them (the response's `Date` header),
    /// which dates the keys' `CreateDate` on the same clock.
    async fn list_keys_with_time(
        &self,
        iam: &aws_sdk_iam::Client,
    ) -> Result<(Vec<AccessKeyMetadata>, Option<i64>), ProviderError> {
        let date = ResponseDate::default();
        let out = iam
            .list_access_keys()
            .user_name(&self.config.user_name)
            .customize()
            .interceptor(date.clone())
            .send()
            .await
            .map_err(|e| aws_error("IAM ListAccessKeys", &self.target(), e))?;
        Ok((out.access_key_metadata().to_vec(), date.secs()))
    }

    /// Deletes a key; a key that is already gone is fine.
    async fn delete_key(&self, iam: &aws_sdk_iam::Client, id: &str) -> Result<(), ProviderError> {
        match iam
            .delete_access_key()
            .user_name(&self.config.user_name)
            .access_key_id(id)
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(user = %self.config.user_name, access_key_id = id, "deleted IAM access key");
                Ok(())
            }
            Err(e) if has_code(&e, NO_SUCH_ENTITY) && self.user_exists(iam).await? => Ok(()),
            Err(e) => Err(aws_error(
                "IAM DeleteAccessKey",
                &format!("key {id} of {}", self.target()),
                e,
            )),
        }
    }

    /// Tells a missing key from a missing user, which both answer `NoSuchEntity`.
    async fn user_exists(&self, iam: &aws_sdk_iam::Client) -> Result<bool, ProviderError> {
        match iam
            .get_user()
            .user_name(&self.config.user_name)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if has_code(&e, NO_SUCH_ENTITY) => Ok(false),
            Err(e) => Err(aws_error("IAM GetUser", &self.target(), e)),
        }
    }

    /// Makes room for a new key: IAM refuses a third one.
    async fn make_room(
        &self,
        iam: &aws_sdk_iam::Client,
        keys: &[AccessKeyMetadata],
        current_id: Option<&str>,
    ) -> Result<(), ProviderError> {
        if keys.len() < 2 {
            return Ok(());
        }
        let leftover = keys
            .iter()
            .filter(|k| Some(key_id(k)) != current_id)
            .find(|k| k.status() == Some(&StatusType::Inactive));
        match leftover {
            Some(key) => {
                tracing::info!(user = %self.config.user_name, access_key_id = key_id(key),
                    "deleting the inactive leftover key of an earlier rotation to make room");
                self.delete_key(iam, key_id(key)).await
            }
            None => {
                let listed: Vec<String> = keys
                    .iter()
                    .map(|k| {
                        let status = k.status().map(StatusType::as_str).unwrap_or("unknown");
                        let role = if Some(key_id(k)) == current_id {
                            ", current"
                        } else {
                            ""
                        };
                        format!("{} ({status}{role})", key_id(k))
                    })
                    .collect();
                Err(ProviderError::permanent(format!(
                    "{} already has two access keys [{}] and neither is an inactive leftover of an \
                     earlier rotation; nothing was changed: deactivate or delete the key that is not \
                     in use, then retry",
                    self.target(),
                    listed.join(", ")
                )))
            }
        }
    }
}

#[async_trait]
impl Rotator for IamAccessKeyRotator {
    fn kind(&self) -> &'static str {
        "aws_iam_access_key"
    }

    fn secret_field(&self) -> &str {
        "SecretAccessKey"
    }

    fn public_attrs(&self) -> &'static [&'static str] {
        &[ACCESS_KEY_ID]
    }

    /// A step may take `timeout`, and verify may also wait `verify_timeout` for propagation.
    fn timeout(&self) -> Duration {
        self.config.timeout + self.verify_timeout
    }

    async fn issue(
        &self,
        _ctx: StepContext<'_>,
        current: Option<&Credential>,
    ) -> Result<Credential, ProviderError> {
        let iam = self.iam().await;
        let current_id = current
            .and_then(|c| c.attrs.get(ACCESS_KEY_ID))
            .map(String::as_str);
        let keys = self.list_keys(&iam).await?;
        self.make_room(&iam, &keys, current_id).await?;
        let out = iam
            .create_access_key()
            .user_name(&self.config.user_name)
            .send()
            .await
            .map_err(|e| aws_error("IAM CreateAccessKey", &self.target(), e))?;
        let key = out.access_key().ok_or_else(|| {
            ProviderError::transient(format!(
                "IAM CreateAccessKey on {} returned no key",
                self.target()
            ))
        })?;
        tracing::info!(user = %self.config.user_name, access_key_id = key.access_key_id(), "created IAM access key");
        Ok(Credential {
            secret: SecretString::from(key.secret_access_key().to_owned()),
            attrs: Attrs::from([(ACCESS_KEY_ID.to_owned(), key.access_key_id().to_owned())]),
        })
    }

    async fn verify(&self, _ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError> {
        let id = attr(&new.attrs, "new")?;
        // `Credentials`' Debug redacts the secret key.
        let credentials =
            Credentials::new(id, new.secret.expose_secret(), None, None, "keyrotd-verify");
        let config = aws_sdk_sts::config::Builder::from(self.connection.sdk_config().await)
            .credentials_provider(credentials)
            .build();
        let sts = aws_sdk_sts::Client::from_conf(config);
        let target = format!("key {id} of {}", self.target());
        let deadline = Instant::now() + self.verify_timeout;
        let mut pause = Duration::from_millis(250);
        let out = loop {
            match sts.get_caller_identity().send().await {
                Ok(out) => break out,
                // IAM is eventually consistent: a fresh key may not be known to STS yet.
                Err(e)
                    if has_code(&e, "InvalidClientTokenId")
                        && Instant::now() + pause < deadline =>
                {
                    tracing::debug!(
                        access_key_id = id,
                        "new key not accepted by STS yet; retrying"
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(aws_error("STS GetCallerIdentity", &target, e)),
            }
        };
        let arn = out.arn().unwrap_or_default();
        let user_suffix = format!("/{}", self.config.user_name);
        if !(arn.contains(":user/") && arn.ends_with(&user_suffix)) {
            return Err(ProviderError::permanent(format!(
                "STS GetCallerIdentity with {target} answered as `{arn}`, not as the user"
            )));
        }
        Ok(())
    }

    async fn abandon(
        &self,
        ctx: StepContext<'_>,
        issued: Option<&Attrs>,
        current: Option<&Credential>,
    ) -> Result<(), ProviderError> {
        let iam = self.iam().await;
        let current_id = current
            .and_then(|c| c.attrs.get(ACCESS_KEY_ID))
            .map(String::as_str);
        if let Some(issued) = issued {
            let id = attr(issued, "issued")?;
            if Some(id) == current_id {
                // Never delete what consumers use, whatever the journal says.
                return Ok(());
            }
            return self.delete_key(&iam, id).await;
        }
        // The issued key is lost: orphans are keys this rotation created, that is keys created
        // since it started, other than the current key and the key it replaces (which consumers
        // may still use, whatever the clocks say).
        let old_id = ctx
            .old_attrs
            .and_then(|a| a.get(ACCESS_KEY_ID))
            .map(String::as_str);
        let (keys, aws_now) = self.list_keys_with_time(&iam).await?;
        let started = started_in_aws_time(ctx.started_at, SystemTime::now(), aws_now);
        for key in keys {
            let id = key_id(&key);
            if Some(id) == current_id || Some(id) == old_id {
                continue;
            }
            let created = key.create_date().map(|d| d.secs()).unwrap_or(i64::MIN);
            if created >= started {
                tracing::warn!(user = %self.config.user_name, access_key_id = id,
                    "deleting orphaned IAM access key of an interrupted rotation");
                self.delete_key(&iam, id).await?;
            }
        }
        Ok(())
    }

    async fn revoke(&self, _ctx: StepContext<'_>, old: &Attrs) -> Result<(), ProviderError> {
        let id = attr(old, "old")?;
        let iam = self.iam().await;
        let target = format!("key {id} of {}", self.target());
        match iam
            .update_access_key()
            .user_name(&self.config.user_name)
            .access_key_id(id)
            .status(StatusType::Inactive)
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(user = %self.config.user_name, access_key_id = id, "deactivated IAM access key")
            }
            // Already deleted by an earlier run of this step.
            Err(e) if has_code(&e, NO_SUCH_ENTITY) && self.user_exists(&iam).await? => {
                return Ok(())
            }
            Err(e) => return Err(aws_error("IAM UpdateAccessKey", &target, e)),
        }
        if self.config.delete_after_deactivate {
            self.delete_key(&iam, id).await?;
        }
        Ok(())
    }
}

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
fn started_in_aws_time(started: SystemTime, local_now: SystemTime, aws_now: Option<i64>) -> i64 {
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
struct ResponseDate(Arc<Mutex<Option<i64>>>);

impl ResponseDate {
    fn secs(&self) -> Option<i64> {
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

    fn config(user: &str) -> IamAccessKeyConfig {
        IamAccessKeyConfig {
            user_name: user.into(),
            region: None,
            endpoint_url: None,
            verify_timeout: default_verify_timeout(),
            delete_after_deactivate: true,
            connect_timeout: timeouts::DEFAULT_CONNECT_TIMEOUT,
            timeout: timeouts::DEFAULT_TIMEOUT,
        }
    }

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
