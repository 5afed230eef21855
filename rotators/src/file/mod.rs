//! The `file` store: consumers read the credential from a local file.
//!
//! Files beside the configured `path`:
//! - `path`: the current value, the only file consumers read;
//! - `path.pending.<rotation id>`: a staged value, written completely before it appears;
//! - `path.previous`: the replaced value, kept until the old credential is revoked;
//! - `path.keyrotd`: which rotation each file belongs to (no secret material);
//! - `<name>.<16 random characters>.tmp`: a file being written, renamed over `<name>` once
//!   complete, and removed if writing it fails.
//!
//! Invariant: `path` is only ever replaced by an atomic `rename(2)` of a complete, fsynced file,
//! so a consumer reads either the old value or the new one, never a torn or missing file. The
//! directory may be writable by the consuming application: `dir` explains how every name in it
//! is handled so that a planted symlink, FIFO or device is refused rather than used.
//!
//! Files: `config` holds [`FileConfig`] and its validation, `encoding` how a credential is
//! written into a file ([`Encoding`]), `sidecar` the `path.keyrotd` bookkeeping, `dir` the file
//! operations a hostile neighbour cannot redirect, and this file the store and its [`Store`]
//! implementation.

mod config;
mod dir;
mod encoding;
mod sidecar;
#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::path::PathBuf;

use async_trait::async_trait;

pub use self::config::FileConfig;
pub use self::dir::MAX_FILE_BYTES;
use self::dir::{Perms, StoreDir};
pub use self::encoding::Encoding;
use self::sidecar::Meta;
use keyrotd_plugin::permissions::Permission;
use keyrotd_plugin::{Credential, Permissions, ProviderError, StepContext, Store};

/// The `file` store.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
    /// The directory holding `path`.
    dir: PathBuf,
    /// The file name of `path`.
    name: OsString,
    /// Applied to the current, pending and previous files: each holds a secret for consumers.
    perms: Perms,
    encoding: Encoding,
}

impl FileStore {
    /// Builds the store from a configuration that passed [`FileConfig::validate`]; owner and
    /// group names are looked up here.
    pub fn new(config: FileConfig) -> Result<Self, String> {
        let mode = config.validate()?;
        let (owner, group) = config.ids()?;
        Ok(Self {
            dir: config.dir().to_owned(),
            name: config.path.file_name().unwrap_or_default().to_os_string(),
            path: config.path,
            perms: Perms { mode, owner, group },
            encoding: config.format,
        })
    }

    fn sibling(&self, suffix: &str) -> OsString {
        let mut name = self.name.clone();
        name.push(suffix);
        name
    }

    fn pending_name(&self, rotation_id: &str) -> OsString {
        self.sibling(&format!(".pending.{rotation_id}"))
    }

    fn previous_name(&self) -> OsString {
        self.sibling(".previous")
    }

    /// The store's directory, which must exist for anything but reads.
    fn existing_dir(&self) -> Result<StoreDir, ProviderError> {
        StoreDir::open(&self.dir)?.ok_or_else(|| {
            ProviderError::permanent(format!("directory {} does not exist", self.dir.display()))
        })
    }

    fn read(
        &self,
        name: &OsString,
        secret_field: &str,
    ) -> Result<Option<Credential>, ProviderError> {
        let Some(dir) = StoreDir::open(&self.dir)? else {
            return Ok(None);
        };
        dir.read(name)?
            .map(|bytes| {
                self.encoding
                    .decode(&dir.path_of(name), secret_field, bytes)
            })
            .transpose()
    }

    fn stage_sync(
        &self,
        rotation_id: &str,
        secret_field: &str,
        new: &Credential,
    ) -> Result<(), ProviderError> {
        let dir = StoreDir::create(&self.dir)?;
        let pending = self.pending_name(rotation_id);
        if dir.has_file(&pending)? {
            return Ok(());
        }
        dir.write(
            &pending,
            &self.encoding.encode(secret_field, new),
            self.perms,
        )
    }

    fn promote_sync(&self, rotation_id: &str) -> Result<(), ProviderError> {
        let dir = self.existing_dir()?;
        let mut meta = self.read_meta(&dir)?;
        if meta.current.as_deref() == Some(rotation_id) {
            return Ok(());
        }
        let pending = self.pending_name(rotation_id);
        if !dir.has_file(&pending)? {
            if meta.promoting.as_deref() != Some(rotation_id) {
                return Err(ProviderError::permanent(format!(
                    "nothing is staged at {}",
                    dir.path_of(&pending).display()
                )));
            }
            // A crash hit between the rename and the bookkeeping below: the rename happened.
        } else {
            if let Some(old) = dir.read(&self.name)? {
                dir.write(&self.previous_name(), &old, self.perms)?;
            }
            meta.promoting = Some(rotation_id.to_owned());
            self.write_meta(&dir, &meta)?;
            dir.rename(&pending, &self.name)?;
            dir.sync()?;
        }
        let previous = meta.current.take();
        self.write_meta(
            &dir,
            &Meta {
                current: Some(rotation_id.to_owned()),
                previous,
                promoting: None,
            },
        )
    }

    fn discard_sync(&self, rotation_id: &str) -> Result<(), ProviderError> {
        let Some(dir) = StoreDir::open(&self.dir)? else {
            return Ok(());
        };
        if dir.remove(&self.pending_name(rotation_id))? {
            dir.sync()?;
        }
        Ok(())
    }

    fn release_previous_sync(&self, rotation_id: &str) -> Result<(), ProviderError> {
        let Some(dir) = StoreDir::open(&self.dir)? else {
            return Ok(());
        };
        let mut meta = self.read_meta(&dir)?;
        // Only the rotation that made `previous` may drop it; a later one owns a newer previous.
        if meta.current.as_deref() != Some(rotation_id) {
            return Ok(());
        }
        dir.remove(&self.previous_name())?;
        if meta.previous.take().is_some() {
            self.write_meta(&dir, &meta)?;
        }
        Ok(())
    }
}

/// Runs blocking file work off the async runtime's worker threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ProviderError> + Send + 'static,
) -> Result<T, ProviderError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ProviderError::transient(format!("file task failed: {e}"))))
}

#[async_trait]
impl Store for FileStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    /// The directory's write access (every write is a new file renamed into place), and the
    /// right to hand the files to their owner or group.
    fn permissions(&self) -> Permissions {
        let mut permissions = Permissions::none().need(Permission::Text(format!(
            "keyrotd's user needs write and search access to the directory {} (stage, promote, \
             discard and release create, rename and remove files beside {}), and read access \
             to the files it writes there",
            self.dir.display(),
            self.path.display()
        )));
        if self.perms.owner.is_some() {
            permissions = permissions.need(Permission::Text(
                "`owner` is set: giving the files to another user needs CAP_CHOWN (root, or \
                 AmbientCapabilities=CAP_CHOWN in the unit)"
                    .into(),
            ));
        }
        if self.perms.group.is_some() {
            permissions = permissions.need(Permission::Text(
                "`group` is set: keyrotd's user must be a member of that group (or have \
                 CAP_CHOWN)"
                    .into(),
            ));
        }
        permissions
    }

    async fn current(&self, ctx: StepContext<'_>) -> Result<Option<Credential>, ProviderError> {
        let (this, field) = (self.clone(), ctx.secret_field.to_owned());
        blocking(move || this.read(&this.name, &field)).await
    }

    async fn stage(&self, ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError> {
        let (this, id, field, new) = (
            self.clone(),
            ctx.rotation_id.to_owned(),
            ctx.secret_field.to_owned(),
            new.clone(),
        );
        blocking(move || this.stage_sync(&id, &field, &new)).await
    }

    async fn pending(&self, ctx: StepContext<'_>) -> Result<Option<Credential>, ProviderError> {
        let (this, id, field) = (
            self.clone(),
            ctx.rotation_id.to_owned(),
            ctx.secret_field.to_owned(),
        );
        blocking(move || this.read(&this.pending_name(&id), &field)).await
    }

    async fn promote(&self, ctx: StepContext<'_>) -> Result<(), ProviderError> {
        let (this, id) = (self.clone(), ctx.rotation_id.to_owned());
        blocking(move || this.promote_sync(&id)).await
    }

    async fn discard(&self, ctx: StepContext<'_>) -> Result<(), ProviderError> {
        let (this, id) = (self.clone(), ctx.rotation_id.to_owned());
        blocking(move || this.discard_sync(&id)).await
    }

    async fn release_previous(&self, ctx: StepContext<'_>) -> Result<(), ProviderError> {
        let (this, id) = (self.clone(), ctx.rotation_id.to_owned());
        blocking(move || this.release_previous_sync(&id)).await
    }

    /// The rotation the sidecar names as current.
    async fn last_rotation(&self, _ctx: StepContext<'_>) -> Result<Option<String>, ProviderError> {
        let this = self.clone();
        blocking(move || match StoreDir::open(&this.dir)? {
            // No directory yet: nothing was ever written here.
            None => Ok(None),
            Some(dir) => Ok(this.read_meta(&dir)?.current),
        })
        .await
    }
}
