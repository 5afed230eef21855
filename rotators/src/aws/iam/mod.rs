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
//! - a `DeleteAccessKey` or `UpdateAccessKey` answered `NoSuchEntity` asks `ListAccessKeys`
//!   whether the user exists (the key is then already gone).
//! - last_used (the in-use check of `revoke = "when_unused"`, in `usage`): `GetAccessKeyLastUsed`
//!   on the old key; a use at or after the promotion means it is still in use.
//! - abandon: deletes the issued key, or, when a crash lost it, every key of the user that is
//!   neither the current one nor the one the rotation replaces and was created since the rotation
//!   started, on AWS's clock (see `clock::started_in_aws_time`).
//!
//! The credential's secret is the `SecretAccessKey`; its attribute `AccessKeyId` identifies it,
//! so its store should write JSON (file `format = "json"`, Secrets Manager with `field`).
//!
//! Permissions: [`IAM_CALLS`] lists every IAM call above with the methods that make it, and
//! `keyrotd policy` prints it as a policy on the user's ARN; keep it in step with the calls. STS
//! `GetCallerIdentity` needs no permission, and `verify` signs it with the new key anyway.
//!
//! Files: `config` holds [`IamAccessKeyConfig`] and its validation, `clock` AWS's time for
//! dating orphaned keys, and this file the rotator and its [`Rotator`] implementation.

mod clock;
mod config;
mod usage;

use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use aws_sdk_iam::types::{AccessKeyMetadata, StatusType};
use aws_sdk_sts::config::Credentials;
use secrecy::{ExposeSecret, SecretString};

use self::clock::{started_in_aws_time, ResponseDate};
pub use self::config::IamAccessKeyConfig;
use super::{aws_error, has_code, Connection};
use keyrotd_plugin::backoff::Backoff;
use keyrotd_plugin::permissions::{aws_partition, AwsAction, AwsStatement, Permission};
use keyrotd_plugin::{
    Attrs, Credential, Permissions, ProviderError, Rotator, StepContext, UsageReport,
};

/// The attribute naming the access key id.
pub const ACCESS_KEY_ID: &str = "AccessKeyId";

/// Every IAM action this rotator calls, with the [`Rotator`] methods that call it: the whole
/// policy of `keyrotd policy`, all on the configured user.
pub const IAM_CALLS: &[AwsAction] = &[
    // list_keys: issue (room for a new key), abandon (orphans), user_exists (after NoSuchEntity).
    AwsAction {
        action: "iam:ListAccessKeys",
        used_by: &["issue", "abandon", "revoke"],
    },
    AwsAction {
        action: "iam:CreateAccessKey",
        used_by: &["issue"],
    },
    // delete_key: issue (an inactive leftover), abandon, revoke (delete_after_deactivate).
    AwsAction {
        action: "iam:DeleteAccessKey",
        used_by: &["issue", "abandon", "revoke"],
    },
    AwsAction {
        action: "iam:UpdateAccessKey",
        used_by: &["revoke"],
    },
];
const NO_SUCH_ENTITY: &str = "NoSuchEntity";

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

    /// Tells a missing key from a missing user, which both answer `NoSuchEntity`. Asks with
    /// `ListAccessKeys`, which the policy allows anyway, rather than `GetUser`, which it would
    /// need only for this.
    async fn user_exists(&self, iam: &aws_sdk_iam::Client) -> Result<bool, ProviderError> {
        match self.list_keys(iam).await {
            Ok(_) => Ok(true),
            Err(e) if e.code.as_deref() == Some(NO_SUCH_ENTITY) => Ok(false),
            Err(e) => Err(e),
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

    /// [`IAM_CALLS`] on the user's ARN, at any IAM path (user names are unique in an account,
    /// whatever their path).
    fn permissions(&self) -> Permissions {
        let region = self.config.region.as_deref();
        let partition = aws_partition(region);
        let (account, note) = super::account_or_wildcard(self.config.account_id.as_deref());
        let user = &self.config.user_name;
        let statement = AwsStatement {
            sid: "KeyrotdIamAccessKeys".into(),
            actions: IAM_CALLS.to_vec(),
            resources: vec![
                format!("arn:{partition}:iam::{account}:user/{user}"),
                format!("arn:{partition}:iam::{account}:user/*/{user}"),
            ],
        };
        let permissions = Permissions::none().need(Permission::Aws(statement));
        match note {
            Some(note) => permissions.note(note),
            None => permissions,
        }
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
        let waits = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
        let mut attempt = 1;
        let mut pause = waits.delay(attempt);
        let out = loop {
            match sts.get_caller_identity().send().await {
                Ok(out) => break out,
                // IAM is eventually consistent: a fresh key may not be known to STS yet. Retry
                // until `verify_timeout`, the last time at the deadline itself.
                Err(e) if has_code(&e, "InvalidClientTokenId") && Instant::now() < deadline => {
                    tracing::debug!(
                        access_key_id = id,
                        "new key not accepted by STS yet; retrying"
                    );
                    let left = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(pause.min(left)).await;
                    attempt += 1;
                    pause = waits.delay(attempt);
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

    fn checks_use(&self) -> bool {
        true
    }

    fn use_permissions(&self) -> Permissions {
        self.last_used_permissions()
    }

    async fn last_used(
        &self,
        _ctx: StepContext<'_>,
        old: &Attrs,
        since: SystemTime,
    ) -> Result<UsageReport, ProviderError> {
        self.key_last_used(old, since).await
    }
}
