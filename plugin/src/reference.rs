//! Secret references: how the configuration names a secret without containing it.
//!
//! A reference is `env:NAME` (an environment variable), `file:/path` (a file's content, trailing
//! newline trimmed), `credential:NAME` (a systemd credential in `$CREDENTIALS_DIRECTORY`) or
//! `aws-sm:SECRET_ID#field` (the `AWSCURRENT` version of an AWS Secrets Manager secret, or one
//! string member of it when it is a JSON object; `SECRET_ID` is a name or a full ARN) or
//! `vault:MOUNT/PATH#field` (the field `field` of the latest version of a Vault KV secret: `MOUNT`
//! is the first path segment, the KV engine's mount; `PATH` the secret's path in it).
//! Anything else is refused, so a literal password pasted into the config never gets used.
//!
//! This module is the syntax and the errors of references. Reading one is I/O and, for
//! `aws-sm:`, a provider's SDK: that lives in the providers crate (`keyrotd_providers::resolve`),
//! so that this crate stays free of both.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::ErrorClass;

/// A parsed secret reference. `Display` prints the reference, never the value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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
        /// The secret's name or full ARN.
        secret_id: String,
        /// The string member of a JSON secret to read, or `None` for the whole value.
        field: Option<String>,
    },
    /// `vault:MOUNT/PATH#field`: one field of a Vault (or OpenBao) KV secret, read through the
    /// inventory's `[vault]` connection.
    Vault {
        /// The KV engine's mount (one path segment).
        mount: String,
        /// The secret's path inside the mount.
        path: String,
        /// The field of the secret's data to read.
        field: String,
    },
}

/// The largest secret a `file:` or `credential:` reference may hold. Secrets are short (a DSN,
/// a token); the cap keeps a reference to a huge file or a device from exhausting memory.
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Why a reference is invalid or cannot be resolved. Never contains the secret.
///
/// A reference that does not parse may be a secret pasted where a reference belongs
/// (`env:PGPASS=S3cr3t`, `file:S3cr3t`), so the errors about malformed references say what is
/// wrong in general terms and never repeat any part of the text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RefError {
    /// Not a reference at all: a literal value (or an unknown scheme).
    #[error("expected a secret reference (env:NAME, file:/path, credential:NAME, aws-sm:SECRET_ID#field or vault:MOUNT/PATH#field), found a literal value; secrets never belong in the config file")]
    Literal,
    /// `env:` followed by something that is not a variable name.
    #[error("`env:` must be followed by a variable name (letters, digits and _, not starting with a digit); the text given is not one and is not repeated here in case it is a secret")]
    EnvName,
    /// `credential:` followed by something that is not a credential name.
    #[error("`credential:` must be followed by a credential name (letters, digits and ._-@, no path); the text given is not one and is not repeated here in case it is a secret")]
    CredentialName,
    /// `file:` followed by something that is not an absolute path.
    #[error("`file:` must be followed by an absolute path; the text given is not one and is not repeated here in case it is a secret")]
    RelativePath,
    /// A malformed `aws-sm:` reference, with the reason.
    #[error("invalid `aws-sm:` reference: {0}; the text given is not repeated here in case it is a secret")]
    AwsSmInvalid(&'static str),
    /// A malformed `vault:` reference, with the reason.
    #[error("invalid `vault:` reference: {0}; the text given is not repeated here in case it is a secret")]
    VaultInvalid(&'static str),
    /// A remote reference asked for synchronously.
    #[error("`{0}` is read from a remote secret store and needs async resolution (resolve_async)")]
    NeedsAsync(String),
    /// A remote reference whose provider is not compiled into this build.
    #[error(
        "`{reference}` cannot be read: this keyrotd was built without the `{feature}` feature"
    )]
    Unsupported {
        /// The reference, which is not secret.
        reference: String,
        /// The cargo feature that would read it.
        feature: &'static str,
    },
    /// The provider of a remote reference refused or did not answer.
    #[error("cannot read `{reference}`: {message}")]
    Remote {
        /// The reference, which is not secret.
        reference: String,
        /// What the provider said.
        message: String,
        /// Whether the provider may answer a retry (a timeout, throttling) or not (access denied).
        class: ErrorClass,
    },
    /// A scheme with nothing after it.
    #[error("secret reference `{0}:` names nothing")]
    Empty(&'static str),
    /// The environment variable is not set.
    #[error("environment variable `{0}` is not set")]
    EnvMissing(String),
    /// The file cannot be opened or read.
    #[error("cannot read `{path}`: {kind}")]
    FileUnreadable {
        /// The file.
        path: String,
        /// Why it cannot be read.
        kind: String,
    },
    /// The path names a directory, FIFO, device or socket.
    #[error("`{path}` is {what}, not a regular file")]
    NotRegularFile {
        /// The path.
        path: String,
        /// What it is instead.
        what: &'static str,
    },
    /// The file exceeds [`MAX_SECRET_BYTES`].
    #[error("`{path}` is larger than {MAX_SECRET_BYTES} bytes, too large for a secret")]
    TooLarge {
        /// The file.
        path: String,
    },
    /// `credential:` outside systemd (no `$CREDENTIALS_DIRECTORY`).
    #[error(
        "`credential:{0}` needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=), which is not set"
    )]
    NoCredentialsDirectory(String),
    /// The reference names an empty value.
    #[error("secret referenced by `{0}` is empty")]
    EmptyValue(String),
}

impl RefError {
    /// Whether resolving again may succeed: only a provider lookup that failed transiently (no
    /// answer, throttling); a missing variable or file needs an operator.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Remote { class, .. } => *class,
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
        let scheme = match scheme {
            "env" => "env",
            "file" => "file",
            "credential" => "credential",
            "aws-sm" => "aws-sm",
            "vault" => "vault",
            _ => return Err(RefError::Literal),
        };
        if rest.is_empty() {
            return Err(RefError::Empty(scheme));
        }
        match scheme {
            "env" if is_env_name(rest) => Ok(Self::Env(rest.to_owned())),
            "env" => Err(RefError::EnvName),
            "file" if rest.starts_with('/') && !rest.contains('\0') => {
                Ok(Self::File(PathBuf::from(rest)))
            }
            "file" => Err(RefError::RelativePath),
            "credential" if is_credential_name(rest) => {
                Ok(Self::SystemdCredential(rest.to_owned()))
            }
            "credential" => Err(RefError::CredentialName),
            "vault" => parse_vault(rest),
            _ => parse_aws_sm(rest),
        }
    }
}

/// A POSIX environment variable name: what a reference can name, and what a pasted secret
/// (with `=`, spaces or punctuation) almost never is.
fn is_env_name(name: &str) -> bool {
    name.len() <= 255
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A systemd credential name: a file name in `$CREDENTIALS_DIRECTORY`.
fn is_credential_name(name: &str) -> bool {
    name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
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
            Self::Vault { mount, path, field } => write!(f, "vault:{mount}/{path}#{field}"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for SecretRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `aws-sm:SECRET_ID[#field]`: the secret id is checked like the store's `secret_id`, but the
/// error never quotes it.
fn parse_aws_sm(rest: &str) -> Result<SecretRef, RefError> {
    let (secret_id, field) = match rest.split_once('#') {
        Some((_, "")) => {
            return Err(RefError::AwsSmInvalid(
                "`#` must be followed by a field name (or drop it to read the secret whole)",
            ))
        }
        Some((id, field)) => (id, Some(field.to_owned())),
        None => (rest, None),
    };
    check_secret_id(secret_id).map_err(RefError::AwsSmInvalid)?;
    Ok(SecretRef::AwsSecretsManager {
        secret_id: secret_id.to_owned(),
        field,
    })
}

/// `vault:MOUNT/PATH#field`: segments of letters, digits and `-_.@+=` (no `.` or `..`), a
/// field without spaces or control characters. The reason never quotes the text.
fn parse_vault(rest: &str) -> Result<SecretRef, RefError> {
    let Some((location, field)) = rest.split_once('#') else {
        return Err(RefError::VaultInvalid(
            "expected vault:MOUNT/PATH#field (the field to read is required)",
        ));
    };
    if field.is_empty()
        || field.len() > 256
        || field
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '#')
    {
        return Err(RefError::VaultInvalid(
            "the field after `#` must be a non-empty name without spaces",
        ));
    }
    let Some((mount, path)) = location.split_once('/') else {
        return Err(RefError::VaultInvalid(
            "expected vault:MOUNT/PATH#field (a mount, then the secret's path)",
        ));
    };
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@+=".contains(c))
    };
    if location.len() > 1024 || !segment_ok(mount) || !path.split('/').all(segment_ok) {
        return Err(RefError::VaultInvalid(
            "the mount and path are segments of letters, digits and -_.@+= separated by /",
        ));
    }
    Ok(SecretRef::Vault {
        mount: mount.to_owned(),
        path: path.to_owned(),
        field: field.to_owned(),
    })
}

impl SecretRef {
    /// Whether resolving this reference needs the network (the providers crate's
    /// `Resolve::resolve_async`). Configuration checks skip such references: they cannot be
    /// known statically.
    pub fn needs_async(&self) -> bool {
        matches!(self, Self::AwsSecretsManager { .. } | Self::Vault { .. })
    }
}

/// Checks an AWS Secrets Manager secret id (a name or an ARN), as the `aws-sm:` reference and the
/// `aws_secrets_manager` store accept it. The reason never quotes the id, so a secret reference
/// that holds a pasted secret instead of an id can be refused without echoing it.
pub fn check_secret_id(id: &str) -> Result<(), &'static str> {
    if id.trim().is_empty() {
        return Err("must not be empty");
    }
    if id.len() > 2048 {
        return Err("longer than 2048 characters");
    }
    if id.starts_with("arn:") {
        validate_secret_arn(id)
    } else if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/_+=.@-".contains(c))
    {
        Err("a secret name may only contain letters, digits and /_+=.@-")
    } else {
        Ok(())
    }
}

/// `arn:PARTITION:secretsmanager:REGION:ACCOUNT:secret:NAME`
fn validate_secret_arn(arn: &str) -> Result<(), &'static str> {
    let parts: Vec<&str> = arn.splitn(7, ':').collect();
    let [_, partition, service, region, account, kind, name] = parts[..] else {
        return Err("expected arn:PARTITION:secretsmanager:REGION:ACCOUNT:secret:NAME");
    };
    if !partition.starts_with("aws") {
        return Err("the partition must be aws, aws-cn, aws-us-gov, ...");
    }
    if service != "secretsmanager" {
        return Err("the service must be secretsmanager");
    }
    if region.is_empty()
        || !region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err("the region is missing or malformed");
    }
    if account.len() != 12 || !account.chars().all(|c| c.is_ascii_digit()) {
        return Err("the account id must be 12 digits");
    }
    if kind != "secret" {
        return Err("the resource type must be secret");
    }
    if name.is_empty() {
        return Err("the secret name is missing");
    }
    Ok(())
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
            assert!(matches!(&err, RefError::AwsSmInvalid(_)), "{bad}: {err:?}");
        }
        assert_eq!(
            "aws-sm:".parse::<SecretRef>(),
            Err(RefError::Empty("aws-sm"))
        );
        assert_eq!("aws:x".parse::<SecretRef>(), Err(RefError::Literal));
    }

    #[test]
    fn parses_vault_references() {
        let r: SecretRef = "vault:secret/team/app#password".parse().unwrap();
        assert_eq!(
            r,
            SecretRef::Vault {
                mount: "secret".into(),
                path: "team/app".into(),
                field: "password".into()
            }
        );
        assert_eq!(r.to_string(), "vault:secret/team/app#password");
        assert!(r.needs_async());
        for bad in [
            "vault:secret/app",
            "vault:secret/app#",
            "vault:secret#password",
            "vault:/app#password",
            "vault:secret//app#password",
            "vault:secret/../app#password",
            "vault:secret/a b#password",
            "vault:secret/app#pass word",
        ] {
            let err = bad.parse::<SecretRef>().unwrap_err();
            assert!(matches!(&err, RefError::VaultInvalid(_)), "{bad}: {err:?}");
        }
        assert_eq!("vault:".parse::<SecretRef>(), Err(RefError::Empty("vault")));
        assert!(RefError::Literal
            .to_string()
            .contains("vault:MOUNT/PATH#field"));
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
            Err(RefError::RelativePath)
        );
        assert_eq!("env:".parse::<SecretRef>(), Err(RefError::Empty("env")));
    }

    /// Every substring of `secret` of 4 characters or more, for leak checks.
    fn pieces(secret: &str) -> Vec<&str> {
        let ends: Vec<usize> = (0..=secret.len())
            .filter(|&i| secret.is_char_boundary(i))
            .collect();
        let mut out = Vec::new();
        for (n, &a) in ends.iter().enumerate() {
            for &b in &ends[n + 1..] {
                if secret[a..b].chars().count() >= 4 {
                    out.push(&secret[a..b]);
                }
            }
        }
        out
    }

    #[test]
    fn a_refused_reference_echoes_no_part_of_its_value() {
        let secret = "S3cr3t-Pa55w0rd!x";
        for text in [
            format!("env:PGPASS={secret}"),
            format!("env:{secret}"),
            format!("env:9{secret}"),
            format!("file:{secret}"),
            format!("file:~/{secret}"),
            format!("credential:{secret}"),
            format!("credential:../{secret}"),
            format!("credential:dir/{secret}"),
            format!("aws-sm:{secret} x#password"),
            format!("aws-sm:{secret}#"),
            format!("vault:{secret}"),
            format!("vault:secret/{secret} x#f"),
            format!("vault:secret/x#{secret} x"),
            format!("aws-sm:arn:aws:secretsmanager:x:{secret}"),
            format!("aws-sm:arn:aws:s3:eu-west-1:123456789012:secret:{secret}"),
            secret.to_owned(),
            format!("postgres://u:{secret}@h/db"),
            format!("{secret}:x"),
        ] {
            let err = text
                .parse::<SecretRef>()
                .expect_err(&format!("`{text}` must be refused"));
            let shown = format!("{err} {err:?}");
            for piece in pieces(secret) {
                assert!(
                    !shown.contains(piece),
                    "the error for a refused reference repeats `{piece}`: {shown}"
                );
            }
        }
    }
}
