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
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
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
    #[error("expected a secret reference (env:NAME, file:/path, credential:NAME or aws-sm:SECRET_ID#field), found a literal value; secrets never belong in the config file")]
    Literal,
    #[error("`env:` must be followed by a variable name (letters, digits and _, not starting with a digit); the text given is not one and is not repeated here in case it is a secret")]
    EnvName,
    #[error("`credential:` must be followed by a credential name (letters, digits and ._-@, no path); the text given is not one and is not repeated here in case it is a secret")]
    CredentialName,
    #[error("`file:` must be followed by an absolute path; the text given is not one and is not repeated here in case it is a secret")]
    RelativePath,
    #[error("invalid `aws-sm:` reference: {0}; the text given is not repeated here in case it is a secret")]
    AwsSmInvalid(&'static str),
    #[error("`{0}` is read from AWS Secrets Manager and needs async resolution (resolve_async)")]
    NeedsAsync(String),
    #[error("cannot read `{reference}`: {message}")]
    Aws {
        reference: String,
        message: String,
        /// Whether AWS may answer a retry (a timeout, throttling) or not (access denied).
        class: ErrorClass,
    },
    #[error("secret reference `{0}:` names nothing")]
    Empty(&'static str),
    #[error("environment variable `{0}` is not set")]
    EnvMissing(String),
    #[error("cannot read `{path}`: {kind}")]
    FileUnreadable { path: String, kind: String },
    #[error("`{path}` is {what}, not a regular file")]
    NotRegularFile { path: String, what: &'static str },
    #[error("`{path}` is larger than {MAX_SECRET_BYTES} bytes, too large for a secret")]
    TooLarge { path: String },
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
        let scheme = match scheme {
            "env" => "env",
            "file" => "file",
            "credential" => "credential",
            "aws-sm" => "aws-sm",
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
    crate::aws::secrets_manager::check_secret_id(secret_id).map_err(RefError::AwsSmInvalid)?;
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
        match self {
            Self::Env(name) => match std::env::var_os(name) {
                Some(v) if !v.is_empty() => Ok(()),
                Some(_) => Err(RefError::EmptyValue(self.to_string())),
                None => Err(RefError::EnvMissing(name.clone())),
            },
            Self::File(path) => open_secret_file(path).map(drop),
            Self::SystemdCredential(name) => {
                open_secret_file(&credentials_directory(name)?.join(name)).map(drop)
            }
            Self::AwsSecretsManager { .. } => Ok(()),
        }
    }

    /// Reads the referenced secret when that needs no network: `env:`, `file:` and
    /// `credential:`. An `aws-sm:` reference is [`RefError::NeedsAsync`].
    pub fn resolve(&self) -> Result<SecretString, RefError> {
        let value = SecretString::from(match self {
            Self::AwsSecretsManager { .. } => return Err(RefError::NeedsAsync(self.to_string())),
            Self::Env(name) => {
                std::env::var(name).map_err(|_| RefError::EnvMissing(name.clone()))?
            }
            Self::File(path) => read_file(path)?,
            Self::SystemdCredential(name) => read_file(&credentials_directory(name)?.join(name))?,
        });
        let value = value.expose_secret();
        let trimmed = value.strip_suffix('\n').unwrap_or(value);
        if trimmed.is_empty() {
            return Err(RefError::EmptyValue(self.to_string()));
        }
        Ok(SecretString::from(trimmed.to_owned()))
    }
}

fn credentials_directory(name: &str) -> Result<PathBuf, RefError> {
    std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(PathBuf::from)
        .ok_or_else(|| RefError::NoCredentialsDirectory(name.to_owned()))
}

/// Opens a secret file for reading, refusing anything but a regular file of at most
/// [`MAX_SECRET_BYTES`]. The open is non-blocking, so a FIFO planted at the path is refused
/// instead of hanging the process until a writer appears; a device or a directory is refused
/// before a single byte is read.
fn open_secret_file(path: &Path) -> Result<File, RefError> {
    let unreadable = |e: std::io::Error| RefError::FileUnreadable {
        path: path.display().to_string(),
        kind: e.kind().to_string(),
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    let kind = meta.file_type();
    let what = if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_char_device() || kind.is_block_device() {
        Some("a device")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("a special file")
    };
    if let Some(what) = what {
        return Err(RefError::NotRegularFile {
            path: path.display().to_string(),
            what,
        });
    }
    if meta.len() > MAX_SECRET_BYTES {
        return Err(RefError::TooLarge {
            path: path.display().to_string(),
        });
    }
    Ok(file)
}

/// Reads a secret file, at most [`MAX_SECRET_BYTES`] of it even if it grows while being read.
fn read_file(path: &Path) -> Result<String, RefError> {
    let file = open_secret_file(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| RefError::FileUnreadable {
            path: path.display().to_string(),
            kind: e.kind().to_string(),
        })?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(RefError::TooLarge {
            path: path.display().to_string(),
        });
    }
    String::from_utf8(bytes).map_err(|_| RefError::FileUnreadable {
        path: path.display().to_string(),
        kind: "not UTF-8 text".to_owned(),
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
            assert!(matches!(&err, RefError::AwsSmInvalid(_)), "{bad}: {err:?}");
        }
        assert_eq!(
            "aws-sm:".parse::<SecretRef>(),
            Err(RefError::Empty("aws-sm"))
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

    #[test]
    fn file_references_must_be_small_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let as_ref = |p: &Path| SecretRef::File(p.to_owned());
        let err = as_ref(dir.path()).check_available().unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
        assert!(as_ref(dir.path()).resolve().is_err());

        // A FIFO with no writer: a blocking open would hang here for good.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = as_ref(&fifo).check_available().unwrap_err();
        assert!(err.to_string().contains("is a FIFO"), "{err}");
        assert!(matches!(
            as_ref(&fifo).resolve(),
            Err(RefError::NotRegularFile { .. })
        ));

        for device in ["/dev/zero", "/dev/null"] {
            let err = as_ref(Path::new(device)).resolve().unwrap_err();
            assert!(err.to_string().contains("is a device"), "{err}");
        }

        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; MAX_SECRET_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            as_ref(&big).check_available(),
            Err(RefError::TooLarge { .. })
        ));
        assert!(matches!(
            as_ref(&big).resolve(),
            Err(RefError::TooLarge { .. })
        ));
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
