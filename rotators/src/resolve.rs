//! Reading secret references: the local schemes (`env:`, `file:`, `credential:`) here, and each
//! remote scheme through its provider (`aws-sm:` through AWS Secrets Manager, with the `aws`
//! feature). The syntax of references is the plugin API's ([`keyrotd_plugin::reference`]).
//!
//! `vault:` is read through the inventory's `[vault]` connection (`vault::reference`, feature
//! `vault`), with a short cache.
//!
//! `aws-sm:` needs the network: it resolves only through [`Resolve::resolve_async`], with the
//! daemon's standard AWS credential chain, the region of the ARN or of the chain,
//! `AWS_ENDPOINT_URL` when set, and the connect timeout and deadline of the plugin (or alert
//! channel) that needs the secret, so a silent AWS endpoint fails its step instead of hanging it.
//! [`Resolve::resolve`] handles the local schemes. A scheme whose provider is not compiled in
//! resolves to [`RefError::Unsupported`].

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use keyrotd_plugin::permissions::Permission;
use keyrotd_plugin::reference::{RefError, SecretRef, MAX_SECRET_BYTES};
use keyrotd_plugin::{Permissions, Timeouts};
use secrecy::{ExposeSecret, SecretString};

/// What reading `reference` needs besides keyrotd's environment, for `keyrotd policy`: read
/// access to a file, or `GetSecretValue` on a Secrets Manager secret. `field` names the plugin
/// field that holds the reference (`admin_dsn`).
pub fn permissions(reference: &SecretRef, field: &'static [&'static str]) -> Permissions {
    match reference {
        SecretRef::Env(_) | SecretRef::SystemdCredential(_) => Permissions::none(),
        SecretRef::File(path) => Permissions::none().need(Permission::Text(format!(
            "`{}` ({}) reads the file {}: keyrotd's user needs read access to it",
            field.join(", "),
            reference,
            path.display()
        ))),
        #[cfg(feature = "aws")]
        SecretRef::AwsSecretsManager { secret_id, .. } => {
            crate::aws::secrets_manager::read_current_permissions(secret_id, field)
        }
        #[cfg(not(feature = "aws"))]
        SecretRef::AwsSecretsManager { .. } => Permissions::none(),
        #[cfg(feature = "vault")]
        SecretRef::Vault { mount, path, .. } => {
            crate::vault::reference::read_permissions(mount, path, field)
        }
        #[cfg(not(feature = "vault"))]
        SecretRef::Vault { .. } => Permissions::none(),
    }
}

/// Makes the inventory's `[vault]` table the connection `vault:` references are read through
/// (a no-op without the `vault` feature). Called once the inventory is loaded.
pub fn set_vault_defaults(defaults: &crate::VaultDefaults) {
    #[cfg(feature = "vault")]
    crate::vault::reference::set_default(defaults);
    #[cfg(not(feature = "vault"))]
    let _ = defaults;
}

/// Reads what a [`SecretRef`] names. Implemented for `SecretRef`; import it to call the methods.
#[async_trait]
pub trait Resolve {
    /// Reads the referenced secret, whatever its scheme. `timeouts` bound the call of a remote
    /// scheme (`aws-sm:`): pass those of the plugin that needs the secret.
    async fn resolve_async(&self, timeouts: Timeouts) -> Result<SecretString, RefError>;

    /// Checks that the referenced secret is there (the variable is set, the file opens) without
    /// reading it, so `keyrotd check` can report a missing one before any rotation needs it.
    /// A remote reference needs its provider: it passes here and is checked when it is resolved,
    /// unless its provider is not compiled in.
    fn check_available(&self) -> Result<(), RefError>;

    /// Reads the referenced secret when that needs no network: `env:`, `file:` and
    /// `credential:`. A remote reference is [`RefError::NeedsAsync`].
    fn resolve(&self) -> Result<SecretString, RefError>;
}

#[async_trait]
impl Resolve for SecretRef {
    async fn resolve_async(&self, timeouts: Timeouts) -> Result<SecretString, RefError> {
        match self {
            #[cfg(not(feature = "aws"))]
            SecretRef::AwsSecretsManager { .. } => {
                let _ = timeouts;
                Err(RefError::Unsupported {
                    reference: self.to_string(),
                    feature: "aws",
                })
            }
            #[cfg(feature = "aws")]
            SecretRef::AwsSecretsManager { secret_id, field } => remote(
                self,
                crate::aws::secrets_manager::read_current(secret_id, field.as_deref(), timeouts)
                    .await,
            ),
            #[cfg(feature = "vault")]
            SecretRef::Vault { mount, path, field } => remote(
                self,
                crate::vault::reference::read(mount, path, field, timeouts).await,
            ),
            #[cfg(not(feature = "vault"))]
            SecretRef::Vault { .. } => Err(RefError::Unsupported {
                reference: self.to_string(),
                feature: "vault",
            }),
            _ => self.resolve(),
        }
    }

    fn check_available(&self) -> Result<(), RefError> {
        match self {
            SecretRef::Env(name) => match std::env::var_os(name) {
                Some(v) if !v.is_empty() => Ok(()),
                Some(_) => Err(RefError::EmptyValue(self.to_string())),
                None => Err(RefError::EnvMissing(name.clone())),
            },
            SecretRef::File(path) => open_secret_file(path).map(drop),
            SecretRef::SystemdCredential(name) => {
                open_secret_file(&credentials_directory(name)?.join(name)).map(drop)
            }
            SecretRef::AwsSecretsManager { .. } if cfg!(feature = "aws") => Ok(()),
            SecretRef::AwsSecretsManager { .. } => Err(RefError::Unsupported {
                reference: self.to_string(),
                feature: "aws",
            }),
            SecretRef::Vault { .. } if cfg!(feature = "vault") => Ok(()),
            SecretRef::Vault { .. } => Err(RefError::Unsupported {
                reference: self.to_string(),
                feature: "vault",
            }),
        }
    }

    fn resolve(&self) -> Result<SecretString, RefError> {
        let value = SecretString::from(match self {
            SecretRef::AwsSecretsManager { .. } | SecretRef::Vault { .. } => {
                return Err(RefError::NeedsAsync(self.to_string()))
            }
            SecretRef::Env(name) => {
                std::env::var(name).map_err(|_| RefError::EnvMissing(name.clone()))?
            }
            SecretRef::File(path) => read_file(path)?,
            SecretRef::SystemdCredential(name) => {
                read_file(&credentials_directory(name)?.join(name))?
            }
        });
        let value = value.expose_secret();
        let trimmed = value.strip_suffix('\n').unwrap_or(value);
        if trimmed.is_empty() {
            return Err(RefError::EmptyValue(self.to_string()));
        }
        Ok(SecretString::from(trimmed.to_owned()))
    }
}

/// The value a remote provider read for `reference`, or its failure as a [`RefError`].
#[cfg(any(feature = "aws", feature = "vault"))]
fn remote(
    reference: &SecretRef,
    read: Result<SecretString, keyrotd_plugin::ProviderError>,
) -> Result<SecretString, RefError> {
    let value = read.map_err(|e| RefError::Remote {
        reference: reference.to_string(),
        message: e.to_string(),
        class: e.class,
    })?;
    if value.expose_secret().is_empty() {
        return Err(RefError::EmptyValue(reference.to_string()));
    }
    Ok(value)
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
