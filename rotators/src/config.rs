//! The `kind`-tagged configuration of every rotator and store, and their construction.
//!
//! Adding a provider means adding a module with a `Config` struct and a variant here; the daemon
//! deserializes these enums straight out of the inventory, so a misspelt field or an unknown
//! `kind` is refused at load time.

use std::sync::Arc;

use serde::Deserialize;

use crate::aws::iam::{IamAccessKeyConfig, IamAccessKeyRotator};
use crate::aws::secrets_manager::{SecretsManagerConfig, SecretsManagerStore};
use crate::file::{FileConfig, FileStore};
use crate::http::{HttpConfig, HttpRotator};
use crate::postgres::{PostgresConfig, PostgresRotator};
use crate::random::{RandomConfig, RandomRotator};
use crate::reference::SecretRef;
use crate::{Rotator, Store};

/// The inventory's `[aws]` table: defaults for every AWS rotator and store.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsDefaults {
    /// Region for credentials that set none (else the standard chain: `AWS_REGION`, profile).
    pub region: Option<String>,
    /// Endpoint override for credentials that set none (a VPC endpoint, a test server).
    pub endpoint_url: Option<String>,
}

impl AwsDefaults {
    fn fill(&self, region: &mut Option<String>, endpoint_url: &mut Option<String>) {
        if region.is_none() {
            region.clone_from(&self.region);
        }
        if endpoint_url.is_none() {
            endpoint_url.clone_from(&self.endpoint_url);
        }
    }
}

/// The rotator kinds, as written in the inventory.
const ROTATOR_KINDS: &[&str] = &["random", "aws_iam_access_key", "postgres_password", "http"];

/// The store kinds, as written in the inventory.
const STORE_KINDS: &[&str] = &["file", "aws_secrets_manager"];

/// A credential's `rotator` table. Large variants are boxed: every credential pays for the
/// largest inline variant, and inventories hold 100,000 of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RotatorConfig {
    /// A generated password or token.
    Random(RandomConfig),
    /// An IAM user's access keys (dual-phase).
    AwsIamAccessKey(Box<IamAccessKeyConfig>),
    /// The password of a PostgreSQL role (single or alternating roles).
    PostgresPassword(Box<PostgresConfig>),
    /// An API key issued, verified and revoked through configured HTTP requests.
    Http(Box<HttpConfig>),
}

/// A credential's `store` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreConfig {
    /// A local file.
    File(FileConfig),
    /// An AWS Secrets Manager secret, versioned with AWS's staging labels.
    AwsSecretsManager(Box<SecretsManagerConfig>),
}

impl RotatorConfig {
    /// The configured kind, as written in the inventory.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Random(_) => "random",
            Self::AwsIamAccessKey(_) => "aws_iam_access_key",
            Self::PostgresPassword(_) => "postgres_password",
            Self::Http(_) => "http",
        }
    }

    /// Checks what can be checked without talking to the provider. The error starts with the
    /// offending field's name.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Random(c) => c.validate(),
            Self::AwsIamAccessKey(c) => c.validate().map(drop),
            Self::PostgresPassword(c) => c.validate(),
            Self::Http(c) => c.validate(),
        }
    }

    /// Fills the AWS region and endpoint from the inventory's `[aws]` table where the credential
    /// sets none.
    pub fn inherit_aws(&mut self, defaults: &AwsDefaults) {
        if let Self::AwsIamAccessKey(c) = self {
            defaults.fill(&mut c.region, &mut c.endpoint_url);
        }
    }

    /// What this rotator changes at its provider, as identities that are equal exactly when two
    /// credentials would change the same thing (see [`StoreConfig::targets`]). A PostgreSQL role
    /// is identified by the admin connection's reference, since the server it names is secret.
    pub fn targets(&self) -> Vec<String> {
        match self {
            Self::Random(_) | Self::Http(_) => vec![],
            Self::AwsIamAccessKey(c) => vec![format!(
                "IAM user `{}` at {}",
                c.user_name,
                c.endpoint_url.as_deref().unwrap_or("AWS")
            )],
            Self::PostgresPassword(c) => c
                .role
                .iter()
                .chain(c.roles.iter().flatten())
                .map(|role| format!("PostgreSQL role `{role}` of the server at {}", c.admin_dsn))
                .collect(),
        }
    }

    /// The secret references this rotator reads (for `keyrotd check`), each with the name of
    /// the field that holds it.
    pub fn secret_refs(&self) -> Vec<(&'static str, &SecretRef)> {
        match self {
            Self::Random(_) | Self::AwsIamAccessKey(_) => vec![],
            Self::PostgresPassword(c) => vec![("admin_dsn", &c.admin_dsn)],
            Self::Http(c) => vec![("auth", &c.auth)],
        }
    }

    /// Deserializes the fields of the variant `kind` (the table without its `kind` key) straight
    /// from `d`, and throws the result away.
    ///
    /// serde buffers an internally tagged enum before it reads the variant, so an error inside
    /// a variant loses its path (`rotator` instead of `rotator.length`). The inventory loader
    /// runs a table that failed through this again, with a path-tracking deserializer, to name
    /// the field. An unknown kind is the same error the enum reports.
    pub fn check_fields<'de, D: serde::Deserializer<'de>>(
        kind: &str,
        d: D,
    ) -> Result<(), D::Error> {
        match kind {
            "random" => RandomConfig::deserialize(d).map(drop),
            "aws_iam_access_key" => IamAccessKeyConfig::deserialize(d).map(drop),
            "postgres_password" => PostgresConfig::deserialize(d).map(drop),
            "http" => HttpConfig::deserialize(d).map(drop),
            other => Err(serde::de::Error::unknown_variant(other, ROTATOR_KINDS)),
        }
    }

    /// Builds the rotator. Call [`RotatorConfig::validate`] first.
    pub fn build(&self) -> Result<Arc<dyn Rotator>, String> {
        self.validate()?;
        Ok(match self {
            Self::Random(c) => Arc::new(RandomRotator::new(c.clone())),
            Self::AwsIamAccessKey(c) => Arc::new(IamAccessKeyRotator::new((**c).clone())?),
            Self::PostgresPassword(c) => Arc::new(PostgresRotator::new((**c).clone())?),
            Self::Http(c) => Arc::new(HttpRotator::new((**c).clone())?),
        })
    }
}

impl StoreConfig {
    /// The configured kind, as written in the inventory.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::AwsSecretsManager(_) => "aws_secrets_manager",
        }
    }

    /// Checks what can be checked without touching the store. The error starts with the offending
    /// field's name.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::File(c) => c.validate().map(drop),
            Self::AwsSecretsManager(c) => c.validate(),
        }
    }

    /// Checks the store's location as it is now, without writing anything: for a file, that its
    /// directory is not writable by others and that no special file or symlink sits at any of its
    /// names. Run by `check`, `run` and `rotate`; every step checks again.
    pub fn check_location(&self) -> Result<(), String> {
        match self {
            Self::File(c) => c.check_location(),
            Self::AwsSecretsManager(_) => Ok(()),
        }
    }

    /// Where this store writes, as identities that are equal exactly when two credentials would
    /// overwrite each other: the inventory refuses two credentials with a common target.
    pub fn targets(&self) -> Vec<String> {
        match self {
            Self::File(c) => c.targets(),
            Self::AwsSecretsManager(c) => vec![c.target()],
        }
    }

    /// Fills the AWS region and endpoint from the inventory's `[aws]` table where the credential
    /// sets none.
    pub fn inherit_aws(&mut self, defaults: &AwsDefaults) {
        if let Self::AwsSecretsManager(c) = self {
            defaults.fill(&mut c.region, &mut c.endpoint_url);
        }
    }

    /// [`RotatorConfig::check_fields`] for stores.
    pub fn check_fields<'de, D: serde::Deserializer<'de>>(
        kind: &str,
        d: D,
    ) -> Result<(), D::Error> {
        match kind {
            "file" => FileConfig::deserialize(d).map(drop),
            "aws_secrets_manager" => SecretsManagerConfig::deserialize(d).map(drop),
            other => Err(serde::de::Error::unknown_variant(other, STORE_KINDS)),
        }
    }

    /// Builds the store.
    pub fn build(&self) -> Result<Arc<dyn Store>, String> {
        Ok(match self {
            Self::File(c) => Arc::new(FileStore::new(c.clone())?),
            Self::AwsSecretsManager(c) => Arc::new(SecretsManagerStore::new((**c).clone())?),
        })
    }
}
