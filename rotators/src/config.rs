//! The `kind`-tagged configuration of every rotator and store, and their construction.
//!
//! Adding a provider means adding a module with a `Config` struct and a variant here; the daemon
//! deserializes these enums straight out of the inventory, so a misspelt field or an unknown
//! `kind` is refused at load time.

use std::sync::Arc;

use serde::Deserialize;

use std::sync::OnceLock;

use keyrotd_plugin::reference::SecretRef;
use keyrotd_plugin::{Rotator, Store};

#[cfg(feature = "aws")]
use crate::aws::iam::{IamAccessKeyConfig, IamAccessKeyRotator};
#[cfg(feature = "aws")]
use crate::aws::secrets_manager::{SecretsManagerConfig, SecretsManagerStore};
use crate::file::{FileConfig, FileStore};
#[cfg(feature = "http")]
use crate::http::{HttpConfig, HttpRotator};
#[cfg(feature = "postgres")]
use crate::postgres::{PostgresConfig, PostgresRotator};
use crate::random::{RandomConfig, RandomRotator};
#[cfg(feature = "vault")]
use crate::vault::approle::{ApproleSecretIdConfig, ApproleSecretIdRotator};
#[cfg(feature = "vault")]
use crate::vault::kv::{v1::Kv1Store, v2::Kv2Store, VaultKvConfig};
#[cfg(feature = "vault")]
use crate::vault::pki::{PkiCertificateConfig, PkiCertificateRotator};

/// The inventory's `[aws]` table: defaults for every AWS rotator and store.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsDefaults {
    /// Region for credentials that set none (else the standard chain: `AWS_REGION`, profile).
    pub region: Option<String>,
    /// Endpoint override for credentials that set none (a VPC endpoint, a test server).
    pub endpoint_url: Option<String>,
    /// The AWS account of the IAM users and secrets, for the ARNs `keyrotd policy` prints
    /// (twelve digits). Calls never need it.
    pub account_id: Option<String>,
}

impl AwsDefaults {
    #[cfg(feature = "aws")]
    fn fill(
        &self,
        region: &mut Option<String>,
        endpoint_url: &mut Option<String>,
        account_id: &mut Option<String>,
    ) {
        if region.is_none() {
            region.clone_from(&self.region);
        }
        if endpoint_url.is_none() {
            endpoint_url.clone_from(&self.endpoint_url);
        }
        if account_id.is_none() {
            account_id.clone_from(&self.account_id);
        }
    }
}

/// The inventory's provider tables (`[aws]`, `[vault]`): what every credential of that
/// provider inherits where it sets nothing itself.
#[derive(Debug, Clone, Default)]
pub struct ProviderDefaults {
    /// The `[aws]` table.
    pub aws: AwsDefaults,
    /// The `[vault]` table.
    pub vault: VaultDefaults,
}

/// The `[vault]` table: the connection every Vault store, rotator and `vault:` reference
/// inherits field by field.
#[cfg(feature = "vault")]
pub type VaultDefaults = crate::vault::VaultConnection;

/// Without the `vault` feature, a `[vault]` table with any field is refused.
#[cfg(not(feature = "vault"))]
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultDefaults {}

#[cfg(not(feature = "vault"))]
impl VaultDefaults {
    /// Nothing to check: the table has no fields in this build.
    pub fn validate_fields(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Every rotator kind, as written in the inventory, with the cargo feature that compiles its
/// provider in (`None`: always there).
const ROTATOR_KINDS: &[(&str, Option<&str>)] = &[
    ("random", None),
    ("aws_iam_access_key", Some("aws")),
    ("postgres_password", Some("postgres")),
    ("http", Some("http")),
    ("vault_approle_secret_id", Some("vault")),
    ("vault_pki_certificate", Some("vault")),
];

/// Every store kind, as [`ROTATOR_KINDS`].
const STORE_KINDS: &[(&str, Option<&str>)] = &[
    ("file", None),
    ("aws_secrets_manager", Some("aws")),
    ("vault_kv2", Some("vault")),
    ("vault_kv1", Some("vault")),
];

/// Whether this build has the provider of `feature`.
fn compiled_in(feature: Option<&str>) -> bool {
    match feature {
        None => true,
        Some("aws") => cfg!(feature = "aws"),
        Some("postgres") => cfg!(feature = "postgres"),
        Some("http") => cfg!(feature = "http"),
        Some("vault") => cfg!(feature = "vault"),
        Some(_) => false,
    }
}

/// The error for a `kind` this build cannot deserialize. A kind whose provider was left out of
/// the build says which feature it needs, rather than that it does not exist. The message starts
/// with serde's `unknown variant`, which the inventory loader attributes to the `kind` field.
fn unknown_kind<E: serde::de::Error>(
    kind: &str,
    all: &'static [(&'static str, Option<&'static str>)],
    compiled: &'static OnceLock<Vec<&'static str>>,
) -> E {
    if let Some((_, Some(feature))) = all.iter().find(|(name, _)| *name == kind) {
        return E::custom(format!(
            "unknown variant `{kind}`: its provider is not compiled into this keyrotd (built \
             without the `{feature}` cargo feature)"
        ));
    }
    let names = compiled.get_or_init(|| {
        all.iter()
            .filter(|(_, feature)| compiled_in(*feature))
            .map(|(name, _)| *name)
            .collect()
    });
    E::unknown_variant(kind, names)
}

static COMPILED_ROTATORS: OnceLock<Vec<&'static str>> = OnceLock::new();
static COMPILED_STORES: OnceLock<Vec<&'static str>> = OnceLock::new();

/// A credential's `rotator` table. Large variants are boxed: every credential pays for the
/// largest inline variant, and inventories hold 100,000 of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RotatorConfig {
    /// A generated password or token.
    Random(RandomConfig),
    /// An IAM user's access keys (dual-phase).
    #[cfg(feature = "aws")]
    AwsIamAccessKey(Box<IamAccessKeyConfig>),
    /// The password of a PostgreSQL role (single or alternating roles).
    #[cfg(feature = "postgres")]
    PostgresPassword(Box<PostgresConfig>),
    /// An API key issued, verified and revoked through configured HTTP requests.
    #[cfg(feature = "http")]
    Http(Box<HttpConfig>),
    /// A secret-id of a Vault AppRole role.
    #[cfg(feature = "vault")]
    VaultApproleSecretId(Box<ApproleSecretIdConfig>),
    /// A TLS certificate and key from a Vault PKI role.
    #[cfg(feature = "vault")]
    VaultPkiCertificate(Box<PkiCertificateConfig>),
}

/// A credential's `store` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreConfig {
    /// A local file.
    File(FileConfig),
    /// An AWS Secrets Manager secret, versioned with AWS's staging labels.
    #[cfg(feature = "aws")]
    AwsSecretsManager(Box<SecretsManagerConfig>),
    /// A Vault (OpenBao) KV version 2 secret, promoted with check-and-set.
    #[cfg(feature = "vault")]
    VaultKv2(Box<VaultKvConfig>),
    /// A Vault (OpenBao) KV version 1 secret.
    #[cfg(feature = "vault")]
    VaultKv1(Box<VaultKvConfig>),
}

impl RotatorConfig {
    /// The configured kind, as written in the inventory.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Random(_) => "random",
            #[cfg(feature = "aws")]
            Self::AwsIamAccessKey(_) => "aws_iam_access_key",
            #[cfg(feature = "postgres")]
            Self::PostgresPassword(_) => "postgres_password",
            #[cfg(feature = "http")]
            Self::Http(_) => "http",
            #[cfg(feature = "vault")]
            Self::VaultApproleSecretId(_) => "vault_approle_secret_id",
            #[cfg(feature = "vault")]
            Self::VaultPkiCertificate(_) => "vault_pki_certificate",
        }
    }

    /// Checks what can be checked without talking to the provider. The error starts with the
    /// offending field's name.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Random(c) => c.validate(),
            #[cfg(feature = "aws")]
            Self::AwsIamAccessKey(c) => c.validate().map(drop),
            #[cfg(feature = "postgres")]
            Self::PostgresPassword(c) => c.validate(),
            #[cfg(feature = "http")]
            Self::Http(c) => c.validate(),
            #[cfg(feature = "vault")]
            Self::VaultApproleSecretId(c) => c.validate(),
            #[cfg(feature = "vault")]
            Self::VaultPkiCertificate(c) => c.validate(),
        }
    }

    /// Whether the rotator can tell if an old credential is still in use (its
    /// [`Rotator::last_used`]), as configured: `revoke = "when_unused"` needs it.
    pub fn checks_use(&self) -> bool {
        match self {
            Self::Random(_) => false,
            #[cfg(feature = "aws")]
            Self::AwsIamAccessKey(_) => true,
            #[cfg(feature = "postgres")]
            Self::PostgresPassword(c) => c.strategy == crate::postgres::Strategy::Alternating,
            #[cfg(feature = "http")]
            Self::Http(c) => c.last_used.is_some(),
            // Vault records no last use of a secret-id (only `last_updated_time`, which moves
            // with `num_uses`), nor of a certificate.
            #[cfg(feature = "vault")]
            Self::VaultApproleSecretId(_) | Self::VaultPkiCertificate(_) => false,
        }
    }

    /// Fills what the credential leaves unset from the inventory's provider tables: the AWS
    /// region and endpoint from `[aws]`, the Vault connection from `[vault]`.
    pub fn inherit(&mut self, defaults: &ProviderDefaults) {
        #[cfg(feature = "aws")]
        if let Self::AwsIamAccessKey(c) = self {
            defaults
                .aws
                .fill(&mut c.region, &mut c.endpoint_url, &mut c.account_id);
        }
        #[cfg(feature = "vault")]
        match self {
            Self::VaultApproleSecretId(c) => c.vault.fill(&defaults.vault),
            Self::VaultPkiCertificate(c) => c.vault.fill(&defaults.vault),
            _ => {}
        }
        #[cfg(not(any(feature = "aws", feature = "vault")))]
        let _ = defaults;
    }

    /// What this rotator changes at its provider, as identities that are equal exactly when two
    /// credentials would change the same thing (see [`StoreConfig::targets`]). A PostgreSQL role
    /// is identified by the admin connection's reference, since the server it names is secret.
    pub fn targets(&self) -> Vec<String> {
        match self {
            Self::Random(_) => vec![],
            #[cfg(feature = "http")]
            Self::Http(_) => vec![],
            // Secret-ids of one role, and certificates of one PKI role, coexist: each
            // credential revokes only what it issued (found by accessor, rotation metadata or
            // serial), so two credentials may share a role.
            #[cfg(feature = "vault")]
            Self::VaultApproleSecretId(_) | Self::VaultPkiCertificate(_) => vec![],
            #[cfg(feature = "aws")]
            Self::AwsIamAccessKey(c) => vec![format!(
                "IAM user `{}` at {}",
                c.user_name,
                c.endpoint_url.as_deref().unwrap_or("AWS")
            )],
            #[cfg(feature = "postgres")]
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
            Self::Random(_) => vec![],
            #[cfg(feature = "aws")]
            Self::AwsIamAccessKey(_) => vec![],
            #[cfg(feature = "postgres")]
            Self::PostgresPassword(c) => vec![("admin_dsn", &c.admin_dsn)],
            #[cfg(feature = "http")]
            Self::Http(c) => vec![("auth", &c.auth)],
            #[cfg(feature = "vault")]
            Self::VaultApproleSecretId(c) => c.vault.secret_refs(),
            #[cfg(feature = "vault")]
            Self::VaultPkiCertificate(c) => c.vault.secret_refs(),
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
            #[cfg(feature = "aws")]
            "aws_iam_access_key" => IamAccessKeyConfig::deserialize(d).map(drop),
            #[cfg(feature = "postgres")]
            "postgres_password" => PostgresConfig::deserialize(d).map(drop),
            #[cfg(feature = "http")]
            "http" => HttpConfig::deserialize(d).map(drop),
            #[cfg(feature = "vault")]
            "vault_approle_secret_id" => ApproleSecretIdConfig::deserialize(d).map(drop),
            #[cfg(feature = "vault")]
            "vault_pki_certificate" => PkiCertificateConfig::deserialize(d).map(drop),
            other => Err(unknown_kind(other, ROTATOR_KINDS, &COMPILED_ROTATORS)),
        }
    }

    /// Builds the rotator. Call [`RotatorConfig::validate`] first.
    pub fn build(&self) -> Result<Arc<dyn Rotator>, String> {
        self.validate()?;
        Ok(match self {
            Self::Random(c) => Arc::new(RandomRotator::new(c.clone())),
            #[cfg(feature = "aws")]
            Self::AwsIamAccessKey(c) => Arc::new(IamAccessKeyRotator::new((**c).clone())?),
            #[cfg(feature = "postgres")]
            Self::PostgresPassword(c) => Arc::new(PostgresRotator::new((**c).clone())?),
            #[cfg(feature = "http")]
            Self::Http(c) => Arc::new(HttpRotator::new((**c).clone())?),
            #[cfg(feature = "vault")]
            Self::VaultApproleSecretId(c) => Arc::new(ApproleSecretIdRotator::new((**c).clone())?),
            #[cfg(feature = "vault")]
            Self::VaultPkiCertificate(c) => Arc::new(PkiCertificateRotator::new((**c).clone())?),
        })
    }
}

impl StoreConfig {
    /// The configured kind, as written in the inventory.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            #[cfg(feature = "aws")]
            Self::AwsSecretsManager(_) => "aws_secrets_manager",
            #[cfg(feature = "vault")]
            Self::VaultKv2(_) => "vault_kv2",
            #[cfg(feature = "vault")]
            Self::VaultKv1(_) => "vault_kv1",
        }
    }

    /// Checks what can be checked without touching the store. The error starts with the offending
    /// field's name.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::File(c) => c.validate().map(drop),
            #[cfg(feature = "aws")]
            Self::AwsSecretsManager(c) => c.validate(),
            #[cfg(feature = "vault")]
            Self::VaultKv2(c) => c.validate(true),
            #[cfg(feature = "vault")]
            Self::VaultKv1(c) => c.validate(false),
        }
    }

    /// Checks the store's location as it is now, without writing anything: for a file, that its
    /// directory is not writable by others and that no special file or symlink sits at any of its
    /// names. Run by `check`, `run` and `rotate`; every step checks again.
    pub fn check_location(&self) -> Result<(), String> {
        match self {
            Self::File(c) => c.check_location(),
            #[cfg(feature = "aws")]
            Self::AwsSecretsManager(_) => Ok(()),
            #[cfg(feature = "vault")]
            Self::VaultKv2(_) | Self::VaultKv1(_) => Ok(()),
        }
    }

    /// Where this store writes, as identities that are equal exactly when two credentials would
    /// overwrite each other: the inventory refuses two credentials with a common target.
    pub fn targets(&self) -> Vec<String> {
        match self {
            Self::File(c) => c.targets(),
            #[cfg(feature = "aws")]
            Self::AwsSecretsManager(c) => vec![c.target()],
            #[cfg(feature = "vault")]
            Self::VaultKv2(c) | Self::VaultKv1(c) => vec![c.target()],
        }
    }

    /// [`RotatorConfig::inherit`] for stores.
    pub fn inherit(&mut self, defaults: &ProviderDefaults) {
        #[cfg(feature = "aws")]
        if let Self::AwsSecretsManager(c) = self {
            defaults
                .aws
                .fill(&mut c.region, &mut c.endpoint_url, &mut c.account_id);
        }
        #[cfg(feature = "vault")]
        if let Self::VaultKv2(c) | Self::VaultKv1(c) = self {
            c.vault
                .get_or_insert_with(Default::default)
                .fill(&defaults.vault);
        }
        #[cfg(not(any(feature = "aws", feature = "vault")))]
        let _ = defaults;
    }

    /// [`RotatorConfig::check_fields`] for stores.
    pub fn check_fields<'de, D: serde::Deserializer<'de>>(
        kind: &str,
        d: D,
    ) -> Result<(), D::Error> {
        match kind {
            "file" => FileConfig::deserialize(d).map(drop),
            #[cfg(feature = "aws")]
            "aws_secrets_manager" => SecretsManagerConfig::deserialize(d).map(drop),
            #[cfg(feature = "vault")]
            "vault_kv2" | "vault_kv1" => VaultKvConfig::deserialize(d).map(drop),
            other => Err(unknown_kind(other, STORE_KINDS, &COMPILED_STORES)),
        }
    }

    /// Builds the store.
    pub fn build(&self) -> Result<Arc<dyn Store>, String> {
        Ok(match self {
            Self::File(c) => Arc::new(FileStore::new(c.clone())?),
            #[cfg(feature = "aws")]
            Self::AwsSecretsManager(c) => Arc::new(SecretsManagerStore::new((**c).clone())?),
            #[cfg(feature = "vault")]
            Self::VaultKv2(c) => Arc::new(Kv2Store::new((**c).clone())?),
            #[cfg(feature = "vault")]
            Self::VaultKv1(c) => Arc::new(Kv1Store::new((**c).clone())?),
        })
    }
}
