//! The `aws_secrets_manager` store: consumers read the credential from a Secrets Manager secret.
//!
//! A rotation is one version of the secret whose version id is the rotation id (passed as
//! `ClientRequestToken`, which makes staging idempotent). The store uses AWS's staging labels:
//! - stage: the new version is written with the label `AWSPENDING`;
//! - promote: `AWSCURRENT` moves to the new version (AWS labels the old one `AWSPREVIOUS` by
//!   itself) and `AWSPENDING` is removed;
//! - discard: `AWSPENDING` is removed from the rotation's version, which AWS then deprecates.
//!
//! `AWSPENDING` on a version that is neither current nor this rotation's means another rotation
//! is in progress (perhaps AWS's own Lambda rotation): staging refuses to clobber it.
//!
//! Value format: without `field` the whole `SecretString` is the secret. With `field` the secret
//! is a JSON object; staging copies the current object, replaces `field` and the credential's
//! attributes, and keeps every other member (`host`, `port`, ...).
//!
//! Permissions: [`SECRETS_MANAGER_CALLS`] lists every call with the methods that make it, and
//! `keyrotd policy` prints it as a policy on the secret's ARN; keep it in step with the calls.
//!
//! Files: `config` holds [`SecretsManagerConfig`], the secret id rules and ARNs, and this file the store,
//! its [`Store`] implementation and the reads behind `aws-sm:` secret references.

mod config;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_secretsmanager::Client;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};

use self::config::secret_arns;
pub use self::config::SecretsManagerConfig;
use super::{aws_error, Connection};
use crate::timeouts::Timeouts;
use keyrotd_plugin::permissions::{AwsAction, AwsStatement, Permission};
use keyrotd_plugin::{Attrs, Credential, Permissions, ProviderError, StepContext, Store};

const CURRENT: &str = "AWSCURRENT";
const PENDING: &str = "AWSPENDING";

/// Every Secrets Manager action this store calls, with the [`Store`] methods that call it: the
/// whole policy of `keyrotd policy`, all on the configured secret.
pub const SECRETS_MANAGER_CALLS: &[AwsAction] = &[
    // versions(): every method reads the labels first.
    AwsAction {
        action: "secretsmanager:DescribeSecret",
        used_by: &[
            "current",
            "stage",
            "pending",
            "promote",
            "discard",
            "last_rotation",
        ],
    },
    // read(): current, pending, and stage with `field` (it copies the current object).
    AwsAction {
        action: "secretsmanager:GetSecretValue",
        used_by: &["current", "stage", "pending"],
    },
    AwsAction {
        action: "secretsmanager:PutSecretValue",
        used_by: &["stage"],
    },
    // move_label(): promote, discard, and stage putting back a lost AWSPENDING.
    AwsAction {
        action: "secretsmanager:UpdateSecretVersionStage",
        used_by: &["stage", "promote", "discard"],
    },
];

/// The `aws_secrets_manager` store.
#[derive(Debug)]
pub struct SecretsManagerStore {
    config: SecretsManagerConfig,
    connection: Connection,
}

/// Version id to staging labels, as `DescribeSecret` reports them.
type Versions = HashMap<String, Vec<String>>;

fn has(versions: &Versions, version: &str, label: &str) -> bool {
    versions
        .get(version)
        .is_some_and(|labels| labels.iter().any(|l| l == label))
}

fn labelled<'a>(versions: &'a Versions, label: &str) -> Option<&'a str> {
    versions
        .iter()
        .find(|(_, labels)| labels.iter().any(|l| l == label))
        .map(|(v, _)| v.as_str())
}

impl SecretsManagerStore {
    /// Builds the store from a validated configuration. Does not touch the network.
    pub fn new(config: SecretsManagerConfig) -> Result<Self, String> {
        config.validate()?;
        let connection = Connection::new(
            config.region.clone(),
            config.endpoint_url.clone(),
            config.timeouts(),
        );
        Ok(Self { config, connection })
    }

    async fn client(&self) -> Client {
        Client::new(self.connection.sdk_config().await)
    }

    fn target(&self) -> String {
        format!("secret `{}`", self.config.secret_id)
    }

    /// The secret's versions and their labels. Fails if the secret does not exist.
    async fn versions(&self, client: &Client) -> Result<Versions, ProviderError> {
        let out = client
            .describe_secret()
            .secret_id(&self.config.secret_id)
            .send()
            .await
            .map_err(|e| aws_error("Secrets Manager DescribeSecret", &self.target(), e))?;
        Ok(out.version_ids_to_stages().cloned().unwrap_or_default())
    }

    /// Reads one version's `SecretString`, selected by label or by id.
    async fn read(
        &self,
        client: &Client,
        stage: Option<&str>,
        version: Option<&str>,
    ) -> Result<SecretString, ProviderError> {
        let out = client
            .get_secret_value()
            .secret_id(&self.config.secret_id)
            .set_version_stage(stage.map(str::to_owned))
            .set_version_id(version.map(str::to_owned))
            .send()
            .await
            .map_err(|e| aws_error("Secrets Manager GetSecretValue", &self.target(), e))?;
        match out.secret_string() {
            Some(s) => Ok(SecretString::from(s.to_owned())),
            None => Err(ProviderError::permanent(format!(
                "{} holds a binary value; keyrotd only handles SecretString",
                self.target()
            ))),
        }
    }

    fn parse_object(&self, value: &SecretString) -> Result<Map<String, Value>, ProviderError> {
        // serde_json's error category quotes no input, so it is safe to report.
        match serde_json::from_str::<Value>(value.expose_secret()) {
            Ok(Value::Object(object)) => Ok(object),
            Ok(_) => Err(ProviderError::permanent(format!(
                "{} is not a JSON object",
                self.target()
            ))),
            Err(e) => Err(ProviderError::permanent(format!(
                "{} is not a JSON object ({:?} error)",
                self.target(),
                e.classify()
            ))),
        }
    }

    fn decode(&self, value: SecretString) -> Result<Credential, ProviderError> {
        let Some(field) = &self.config.field else {
            return Ok(Credential {
                secret: value,
                attrs: Attrs::new(),
            });
        };
        let mut secret = None;
        let mut attrs = Attrs::new();
        for (key, member) in self.parse_object(&value)? {
            let Value::String(member) = member else {
                continue;
            };
            if &key == field {
                secret = Some(SecretString::from(member));
            } else {
                attrs.insert(key, member);
            }
        }
        let secret = secret.ok_or_else(|| {
            ProviderError::permanent(format!("{} has no string member `{field}`", self.target()))
        })?;
        Ok(Credential { secret, attrs })
    }

    /// The value to write for `new`: the secret alone, or the current object with `field` and
    /// the attributes replaced.
    async fn encode(
        &self,
        client: &Client,
        versions: &Versions,
        new: &Credential,
    ) -> Result<SecretString, ProviderError> {
        let Some(field) = &self.config.field else {
            return Ok(new.secret.clone());
        };
        let mut object = match labelled(versions, CURRENT) {
            Some(_) => self.parse_object(&self.read(client, Some(CURRENT), None).await?)?,
            None => Map::new(),
        };
        for (key, value) in &new.attrs {
            object.insert(key.clone(), Value::String(value.clone()));
        }
        object.insert(
            field.clone(),
            Value::String(new.secret.expose_secret().to_owned()),
        );
        Ok(SecretString::from(Value::Object(object).to_string()))
    }

    async fn move_label(
        &self,
        client: &Client,
        label: &str,
        to: Option<&str>,
        from: Option<&str>,
    ) -> Result<(), ProviderError> {
        client
            .update_secret_version_stage()
            .secret_id(&self.config.secret_id)
            .version_stage(label)
            .set_move_to_version_id(to.map(str::to_owned))
            .set_remove_from_version_id(from.map(str::to_owned))
            .send()
            .await
            .map_err(|e| {
                aws_error(
                    "Secrets Manager UpdateSecretVersionStage",
                    &self.target(),
                    e,
                )
            })?;
        Ok(())
    }
}

/// Reads the `AWSCURRENT` value of `secret_id` (or its string member `field`), for `aws-sm:`
/// secret references: the standard credential chain, the region of an ARN (else the chain's),
/// `AWS_ENDPOINT_URL` when set, and the `timeouts` of the plugin that resolves the reference.
pub(crate) async fn read_current(
    secret_id: &str,
    field: Option<&str>,
    timeouts: Timeouts,
) -> Result<SecretString, ProviderError> {
    let region = secret_id
        .strip_prefix("arn:")
        .and_then(|arn| arn.split(':').nth(2))
        .map(str::to_owned);
    let endpoint_url = std::env::var("AWS_ENDPOINT_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let store = SecretsManagerStore::new(SecretsManagerConfig {
        field: field.map(str::to_owned),
        region,
        endpoint_url,
        connect_timeout: timeouts.connect,
        timeout: timeouts.call,
        ..SecretsManagerConfig::new(secret_id)
    })
    .map_err(ProviderError::permanent)?;
    let client = store.client().await;
    let value = store.read(&client, Some(CURRENT), None).await?;
    store.decode(value).map(|c| c.secret)
}

/// What [`read_current`] needs: `GetSecretValue` on the secret (region and account from an
/// ARN, else any), for `keyrotd policy`. `used_by` names the plugin field holding the reference.
pub(crate) fn read_current_permissions(
    secret_id: &str,
    used_by: &'static [&'static str],
) -> Permissions {
    let (resources, notes) = secret_arns(secret_id, None, None);
    let statement = AwsStatement {
        sid: "KeyrotdSecretReference".into(),
        actions: vec![AwsAction {
            action: "secretsmanager:GetSecretValue",
            used_by,
        }],
        resources,
    };
    let mut permissions = Permissions::none().need(Permission::Aws(statement));
    permissions.notes.extend(notes);
    permissions
}

#[async_trait]
impl Store for SecretsManagerStore {
    fn kind(&self) -> &'static str {
        "aws_secrets_manager"
    }

    fn location(&self) -> String {
        match &self.config.field {
            Some(field) => format!("aws-sm:{}#{field}", self.config.secret_id),
            None => format!("aws-sm:{}", self.config.secret_id),
        }
    }

    fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// [`SECRETS_MANAGER_CALLS`] on the secret's ARN.
    fn permissions(&self) -> Permissions {
        let (resources, notes) = secret_arns(
            &self.config.secret_id,
            self.config.region.as_deref(),
            self.config.account_id.as_deref(),
        );
        let statement = AwsStatement {
            sid: "KeyrotdSecretsManagerStore".into(),
            actions: SECRETS_MANAGER_CALLS.to_vec(),
            resources,
        };
        let mut permissions = Permissions::none().need(Permission::Aws(statement));
        permissions.notes.extend(notes);
        permissions.note(format!(
            "if secret `{}` is encrypted with a customer-managed KMS key, also allow \
             kms:Decrypt and kms:GenerateDataKey on that key (the default aws/secretsmanager \
             key needs nothing)",
            self.config.secret_id
        ))
    }

    async fn current(&self, _ctx: StepContext<'_>) -> Result<Option<Credential>, ProviderError> {
        let client = self.client().await;
        // A secret created without a value has no AWSCURRENT version: nothing is current yet.
        if labelled(&self.versions(&client).await?, CURRENT).is_none() {
            return Ok(None);
        }
        // Ask for AWSCURRENT explicitly: moto may answer an unqualified read with a stale version.
        let value = self.read(&client, Some(CURRENT), None).await?;
        self.decode(value).map(Some)
    }

    async fn stage(&self, ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError> {
        let client = self.client().await;
        let versions = self.versions(&client).await?;
        let ours = ctx.rotation_id;
        if !(32..=64).contains(&ours.len()) {
            // AWS's ClientRequestToken limits; the engine's UUIDs fit.
            return Err(ProviderError::permanent(format!(
                "rotation id `{ours}` cannot be a Secrets Manager version id: it needs 32 to 64 characters"
            )));
        }
        let other = versions.iter().find(|(v, labels)| {
            *v != ours
                && labels.iter().any(|l| l == PENDING)
                && !labels.iter().any(|l| l == CURRENT)
        });
        if let Some((other, _)) = other {
            return Err(ProviderError::permanent(format!(
                "{}: another rotation is in progress (version {other} is AWSPENDING); finish or \
                 cancel it (remove its AWSPENDING label) before rotating again",
                self.target()
            )));
        }
        if versions.contains_key(ours) {
            // Already written by this rotation (re-run after a crash). Put the label back if it
            // was lost, unless the version has been promoted meanwhile.
            if !has(&versions, ours, PENDING) && !has(&versions, ours, CURRENT) {
                let stale = labelled(&versions, PENDING);
                self.move_label(&client, PENDING, Some(ours), stale).await?;
            }
            return Ok(());
        }
        let value = self.encode(&client, &versions, new).await?;
        client
            .put_secret_value()
            .secret_id(&self.config.secret_id)
            .client_request_token(ours)
            .secret_string(value.expose_secret())
            .version_stages(PENDING)
            .send()
            .await
            .map_err(|e| aws_error("Secrets Manager PutSecretValue", &self.target(), e))?;
        Ok(())
    }

    async fn pending(&self, ctx: StepContext<'_>) -> Result<Option<Credential>, ProviderError> {
        let client = self.client().await;
        let versions = self.versions(&client).await?;
        if !has(&versions, ctx.rotation_id, PENDING) || has(&versions, ctx.rotation_id, CURRENT) {
            return Ok(None);
        }
        let value = self.read(&client, None, Some(ctx.rotation_id)).await?;
        self.decode(value).map(Some)
    }

    async fn promote(&self, ctx: StepContext<'_>) -> Result<(), ProviderError> {
        let client = self.client().await;
        let versions = self.versions(&client).await?;
        let ours = ctx.rotation_id;
        if !versions.contains_key(ours) {
            return Err(ProviderError::permanent(format!(
                "{}: nothing is staged for rotation {ours}",
                self.target()
            )));
        }
        if !has(&versions, ours, CURRENT) {
            let old = labelled(&versions, CURRENT);
            self.move_label(&client, CURRENT, Some(ours), old).await?;
        }
        if has(&versions, ours, PENDING) {
            self.move_label(&client, PENDING, None, Some(ours)).await?;
        }
        Ok(())
    }

    async fn discard(&self, ctx: StepContext<'_>) -> Result<(), ProviderError> {
        let client = self.client().await;
        let versions = self.versions(&client).await?;
        if has(&versions, ctx.rotation_id, PENDING) {
            self.move_label(&client, PENDING, None, Some(ctx.rotation_id))
                .await?;
        }
        Ok(())
    }

    async fn release_previous(&self, _ctx: StepContext<'_>) -> Result<(), ProviderError> {
        // AWSPREVIOUS belongs to AWS: it moves by itself at the next promotion, and AWS
        // deprecates versions without labels. Keeping it lets an operator roll back.
        Ok(())
    }

    /// The `AWSCURRENT` version id when keyrotd wrote it: the engine's rotation ids are UUIDv7
    /// and become version ids through `ClientRequestToken`. Versions written by anything else
    /// (the console, the CLI, AWS's own Lambda rotation) get random UUIDv4 ids and name no
    /// rotation.
    async fn last_rotation(&self, _ctx: StepContext<'_>) -> Result<Option<String>, ProviderError> {
        let client = self.client().await;
        let versions = self.versions(&client).await?;
        Ok(labelled(&versions, CURRENT)
            .filter(|v| is_uuid_v7(v))
            .map(str::to_owned))
    }
}

/// Whether `id` is a hyphenated UUID of version 7, as the engine's rotation ids are.
fn is_uuid_v7(id: &str) -> bool {
    let bytes = id.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
        && bytes[14] == b'7'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_uuid_v7_version_ids_name_a_rotation() {
        assert!(is_uuid_v7("019ad0a1-7b2c-7d3e-8f40-123456789abc"));
        for other in [
            "6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b",
            "019ad0a1-7b2c-7d3e-8f40-123456789ab",
            "019ad0a17b2c7d3e8f40123456789abcdef0",
            "",
        ] {
            assert!(!is_uuid_v7(other), "{other}");
        }
    }

    #[test]
    fn registered_as_a_store_kind_refusing_unknown_fields() {
        let value = serde_json::json!({
            "kind": "aws_secrets_manager", "secret_id": "prod/db", "field": "password",
            "region": "eu-west-1", "endpoint_url": "http://127.0.0.1:4566"
        });
        let config: crate::StoreConfig = serde_json::from_value(value).unwrap();
        assert_eq!(config.kind(), "aws_secrets_manager");
        config.validate().unwrap();
        assert_eq!(
            config.build().unwrap().location(),
            "aws-sm:prod/db#password"
        );
        let typo = serde_json::json!({"kind": "aws_secrets_manager", "secret_id": "x", "feild": "password"});
        assert!(serde_json::from_value::<crate::StoreConfig>(typo).is_err());
        let bad_arn = serde_json::json!({"kind": "aws_secrets_manager", "secret_id": "arn:aws:secretsmanager:x"});
        let config: crate::StoreConfig = serde_json::from_value(bad_arn).unwrap();
        assert!(config.validate().unwrap_err().starts_with("secret_id:"));
    }
}
