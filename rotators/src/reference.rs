//! Secret references: how the configuration names a secret without containing it.
//!
//! A reference is `env:NAME` (an environment variable), `file:/path` (a file's content, trailing
//! newline trimmed), `credential:NAME` (a systemd credential in `$CREDENTIALS_DIRECTORY`) or
//! `aws-sm:SECRET_ID#field` (the `AWSCURRENT` version of an AWS Secrets Manager secret, or one
//! string member of it when it is a JSON object; `SECRET_ID` is a name or a full ARN).
//! Anything else is refused, so a literal password pasted into the config never gets used.
//!
//! `aws-sm:` needs the network: it resolves only through [`SecretRef::resolve_async`], with the
//! daemon's standard AWS credential chain, the region of the ARN or of the chain,
//! `AWS_ENDPOINT_URL` when set, and the connect timeout and deadline of the plugin (or alert
//! channel) that needs the secret, so a silent AWS endpoint fails its step instead of hanging it.
//! [`SecretRef::resolve`] handles the local schemes.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use secrecy::{ExposeSecret, SecretString};

use crate::{ErrorClass, Timeouts};

/// A parsed secret reference. `Display` prints the reference, never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// `env:NAME`
    Env(String),
    /// `file:/absolute/path`
    File(PathBuf),
    /// `credential:NAME`, read from `$CREDENTIALS_DIRECTORY/NAME`
    SystemdCredential(String),
    /// `aws-sm:SECRET_ID` or `aws-sm:SECRET_ID#field`: the `AWSCURRENT` value of a Secrets
    /// Manager secret, or the string member `field` of it (a JSON object).
    AwsSecretsManager {
        secret_id: String,
        field: Option<String>,
    },
}

/// Why a reference is invalid or cannot be resolved. Never contains the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RefError {
    #[error("expected a secret reference (env:NAME, file:/path, credential:NAME or aws-sm:SECRET_ID#field), found a literal value; secrets never belong in the config file")]
    Literal,
    #[error("`credential:` names a file in $CREDENTIALS_DIRECTORY, not a path")]
    CredentialPath,
    #[error("invalid secret reference `{reference}`: {why}")]
    Invalid { reference: String, why: String },
    #[error("`{0}` is read from AWS Secrets Manager and needs async resolution (resolve_async)")]
    NeedsAsync(String),
    #[error("cannot read `{reference}`: {message}")]
    Aws {
        reference: String,
        message: String,
        /// Whether AWS may answer a retry (a timeout, throttling) or not (access denied).
        class: ErrorClass,
    },
    #[error("secret reference `{0}` names nothing")]
    Empty(String),
    #[error("file reference must be an absolute path, got `{0}`")]
    RelativePath(String),
    #[error("environment variable `{0}` is not set")]
    EnvMissing(String),
    #[error("cannot read `{path}`: {kind}")]
    FileUnreadable { path: String, kind: String },
    #[error(
        "`credential:{0}` needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=), which is not set"
    )]
    NoCredentialsDirectory(String),
    #[error("secret referenced by `{0}` is empty")]
    EmptyValue(String),
}

impl RefError {
    /// Whether resolving again may succeed: only an AWS lookup that failed transiently (no
    /// answer, throttling); a missing variable or file needs an operator.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Aws { class, .. } => *class,
            _ => ErrorClass::Permanent,
        }
    }
}

impl FromStr for SecretRef {
    type Err = RefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((scheme, rest)) = s.split_once(':') else {
            return Err(RefError::Literal);
        };
        // Anything but a known scheme (a password containing a colon, a URL with credentials)
        // is a literal, and no part of it is repeated in the error.
        if !matches!(scheme, "env" | "file" | "credential" | "aws-sm") {
            return Err(RefError::Literal);
        }
        if rest.is_empty() {
            return Err(RefError::Empty(s.to_owned()));
        }
        match scheme {
            "env" => Ok(Self::Env(rest.to_owned())),
            "file" if rest.starts_with('/') => Ok(Self::File(PathBuf::from(rest))),
            "file" => Err(RefError::RelativePath(rest.to_owned())),
            "credential" if !rest.contains('/') => Ok(Self::SystemdCredential(rest.to_owned())),
            "credential" => Err(RefError::CredentialPath),
            _ => parse_aws_sm(s, rest),
        }
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(name) => write!(f, "env:{name}"),
            Self::File(path) => write!(f, "file:{}", path.display()),
            Self::SystemdCredential(name) => write!(f, "credential:{name}"),
            Self::AwsSecretsManager { secret_id, field } => match field {
                Some(field) => write!(f, "aws-sm:{secret_id}#{field}"),
                None => write!(f, "aws-sm:{secret_id}"),
            },
        }
    }
}

impl<'de> serde::Deserialize<'de> for SecretRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `aws-sm:SECRET_ID[#field]`: the secret id is checked like the store's `secret_id`.
fn parse_aws_sm(reference: &str, rest: &str) -> Result<SecretRef, RefError> {
    let invalid = |why: String| RefError::Invalid {
        reference: reference.to_owned(),
        why,
    };
    let (secret_id, field) = match rest.split_once('#') {
        Some((id, "")) => {
            return Err(invalid(format!(
                "`#` must be followed by a field name (or drop it to read `{id}` whole)"
            )))
        }
        Some((id, field)) => (id, Some(field.to_owned())),
        None => (rest, None),
    };
    crate::aws::secrets_manager::SecretsManagerConfig {
        field: field.clone(),
        ..crate::aws::secrets_manager::SecretsManagerConfig::new(secret_id)
    }
    .validate()
    .map_err(invalid)?;
    Ok(SecretRef::AwsSecretsManager {
        secret_id: secret_id.to_owned(),
        field,
    })
}

impl SecretRef {
    /// Whether resolving this reference needs the network ([`SecretRef::resolve_async`]).
    /// Configuration checks skip such references: they cannot be known statically.
    pub fn needs_async(&self) -> bool {
        matches!(self, Self::AwsSecretsManager { .. })
    }

    /// Reads the referenced secret, whatever its scheme. `timeouts` bound the AWS call of an
    /// `aws-sm:` reference: pass those of the plugin that needs the secret.
    pub async fn resolve_async(&self, timeouts: Timeouts) -> Result<SecretString, RefError> {
        match self {
            Self::AwsSecretsManager { secret_id, field } => {
                let value = crate::aws::secrets_manager::read_current(
                    secret_id,
                    field.as_deref(),
                    timeouts,
                )
                .await
                .map_err(|e| RefError::Aws {
                    reference: self.to_string(),
                    message: e.to_string(),
                    class: e.class,
                })?;
                if value.expose_secret().is_empty() {
                    return Err(RefError::EmptyValue(self.to_string()));
                }
                Ok(value)
            }
            _ => self.resolve(),
        }
    }

    /// Checks that the referenced secret is there (the variable is set, the file opens) without
    /// reading it, so `keyrotd check` can report a missing one before any rotation needs it.
    /// An `aws-sm:` reference needs AWS: it passes here and is checked when it is resolved.
    pub fn check_available(&self) -> Result<(), RefError> {
        let open = |path: &std::path::Path| {
            std::fs::File::open(path)
                .map(drop)
                .map_err(|e| RefError::FileUnreadable {
                    path: path.display().to_string(),
                    kind: e.kind().to_string(),
                })
        };
        match self {
            Self::Env(name) => match std::env::var_os(name) {
                Some(v) if !v.is_empty() => Ok(()),
                Some(_) => Err(RefError::EmptyValue(self.to_string())),
                None => Err(RefError::EnvMissing(name.clone())),
            },
            Self::File(path) => open(path),
            Self::SystemdCredential(name) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
                    .ok_or_else(|| RefError::NoCredentialsDirectory(name.clone()))?;
                open(&PathBuf::from(dir).join(name))
            }
            Self::AwsSecretsManager { .. } => Ok(()),
        }
    }

    /// Reads the referenced secret when that needs no network: `env:`, `file:` and
    /// `credential:`. An `aws-sm:` reference is [`RefError::NeedsAsync`].
    pub fn resolve(&self) -> Result<SecretString, RefError> {
        let value = match self {
            Self::AwsSecretsManager { .. } => return Err(RefError::NeedsAsync(self.to_string())),
            Self::Env(name) => {
                std::env::var(name).map_err(|_| RefError::EnvMissing(name.clone()))?
            }
            Self::File(path) => read_file(path)?,
            Self::SystemdCredential(name) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
                    .ok_or_else(|| RefError::NoCredentialsDirectory(name.clone()))?;
                read_file(&PathBuf::from(dir).join(name))?
            }
        };
        let trimmed = value.strip_suffix('\n').unwrap_or(&value);
        if trimmed.is_empty() {
            return Err(RefError::EmptyValue(self.to_string()));
        }
        Ok(SecretString::from(trimmed.to_owned()))
    }
}

fn read_file(path: &std::path::Path) -> Result<String, RefError> {
    std::fs::read_to_string(path).map_err(|e| RefError::FileUnreadable {
        path: path.display().to_string(),
        kind: e.kind().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_aws_secrets_manager_references() {
        let sm = |id: &str, field: Option<&str>| SecretRef::AwsSecretsManager {
            secret_id: id.into(),
            field: field.map(str::to_owned),
        };
        assert_eq!(
            "aws-sm:prod/db#password".parse(),
            Ok(sm("prod/db", Some("password")))
        );
        assert_eq!("aws-sm:prod/token".parse(), Ok(sm("prod/token", None)));
        let arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/db-AbCdEf";
        assert_eq!(
            format!("aws-sm:{arn}#password").parse(),
            Ok(sm(arn, Some("password")))
        );
        for text in ["aws-sm:prod/db#password", "aws-sm:prod/token"] {
            assert_eq!(text.parse::<SecretRef>().unwrap().to_string(), text);
        }
        assert!(sm("x", None).needs_async());
        assert!(!SecretRef::Env("X".into()).needs_async());
        for bad in [
            "aws-sm:prod/db#",
            "aws-sm:#password",
            "aws-sm:has space#password",
            "aws-sm:arn:aws:secretsmanager:eu-west-1:1234:secret:x#password",
            "aws-sm:arn:aws:s3:eu-west-1:123456789012:secret:x",
        ] {
            let err = bad.parse::<SecretRef>().unwrap_err();
            assert!(
                matches!(&err, RefError::Invalid { reference, .. } if reference == bad),
                "{bad}: {err:?}"
            );
        }
        assert_eq!(
            "aws-sm:".parse::<SecretRef>(),
            Err(RefError::Empty("aws-sm:".into()))
        );
        assert_eq!("aws:x".parse::<SecretRef>(), Err(RefError::Literal));
    }

    #[test]
    fn sync_resolution_refuses_aws_sm_and_async_resolution_handles_the_rest() {
        let r: SecretRef = "aws-sm:prod/db#password".parse().unwrap();
        let err = r.resolve().unwrap_err();
        assert_eq!(err, RefError::NeedsAsync("aws-sm:prod/db#password".into()));
        assert!(err.to_string().contains("needs async resolution"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "s3cret\n").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let value = rt
            .block_on(SecretRef::File(path).resolve_async(Timeouts::default()))
            .unwrap();
        assert_eq!(value.expose_secret(), "s3cret");
    }

    #[test]
    fn parses_each_scheme() {
        assert_eq!("env:DB_PASS".parse(), Ok(SecretRef::Env("DB_PASS".into())));
        assert_eq!("file:/run/s".parse(), Ok(SecretRef::File("/run/s".into())));
        assert_eq!(
            "credential:db".parse(),
            Ok(SecretRef::SystemdCredential("db".into()))
        );
    }

    #[test]
    fn refuses_literals_and_unknown_schemes() {
        assert_eq!("hunter2".parse::<SecretRef>(), Err(RefError::Literal));
        assert_eq!("P@ss:word".parse::<SecretRef>(), Err(RefError::Literal));
        assert_eq!(
            "postgres://u:p@h/db".parse::<SecretRef>(),
            Err(RefError::Literal)
        );
        assert_eq!("hunter:two".parse::<SecretRef>(), Err(RefError::Literal));
        assert!(!RefError::Literal.to_string().contains("hunter"));
        assert_eq!(
            "file:relative".parse::<SecretRef>(),
            Err(RefError::RelativePath("relative".into()))
        );
        assert_eq!(
            "env:".parse::<SecretRef>(),
            Err(RefError::Empty("env:".into()))
        );
    }

    #[test]
    fn resolves_files_without_the_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "s3cret\n").unwrap();
        let r = SecretRef::File(path);
        assert_eq!(r.resolve().unwrap().expose_secret(), "s3cret");
        let missing = SecretRef::File(dir.path().join("nope"));
        assert!(matches!(
            missing.resolve(),
            Err(RefError::FileUnreadable { .. })
        ));
    }
}
