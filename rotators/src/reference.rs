//! Secret references: how the configuration names a secret without containing it.
//!
//! A reference is `env:NAME` (an environment variable), `file:/path` (a file's content, trailing
//! newline trimmed) or `credential:NAME` (a systemd credential in `$CREDENTIALS_DIRECTORY`).
//! Anything else is refused, so a literal password pasted into the config never gets used.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use secrecy::SecretString;

/// A parsed secret reference. `Display` prints the reference, never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// `env:NAME`
    Env(String),
    /// `file:/absolute/path`
    File(PathBuf),
    /// `credential:NAME`, read from `$CREDENTIALS_DIRECTORY/NAME`
    SystemdCredential(String),
}

/// Why a reference is invalid or cannot be resolved. Never contains the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RefError {
    #[error("expected a secret reference (env:NAME, file:/path or credential:NAME), found a literal value; secrets never belong in the config file")]
    Literal,
    #[error("unknown secret reference scheme `{0}:` (expected env:, file: or credential:)")]
    UnknownScheme(String),
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

impl FromStr for SecretRef {
    type Err = RefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((scheme, rest)) = s.split_once(':') else {
            return Err(RefError::Literal);
        };
        // A scheme is a short lowercase word; anything else (a password containing a colon,
        // a URL with credentials) is a literal.
        if scheme.is_empty() || !scheme.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
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
            "credential" => Err(RefError::UnknownScheme("credential with a path".into())),
            other => Err(RefError::UnknownScheme(other.to_owned())),
        }
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(name) => write!(f, "env:{name}"),
            Self::File(path) => write!(f, "file:{}", path.display()),
            Self::SystemdCredential(name) => write!(f, "credential:{name}"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for SecretRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl SecretRef {
    /// Checks that the referenced secret is there (the variable is set, the file opens) without
    /// reading it, so `keyrotd check` can report a missing one before any rotation needs it.
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
        }
    }

    /// Reads the referenced secret.
    pub fn resolve(&self) -> Result<SecretString, RefError> {
        let value = match self {
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
    use secrecy::ExposeSecret;

    use super::*;

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
            Err(RefError::UnknownScheme("postgres".into()))
        );
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
