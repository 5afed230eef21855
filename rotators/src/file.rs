//! The `file` store: consumers read the credential from a local file.
//!
//! Files beside the configured `path`:
//! - `path`: the current value, the only file consumers read;
//! - `path.pending.<rotation id>`: a staged value, written completely before it appears;
//! - `path.previous`: the replaced value, kept until the old credential is revoked;
//! - `path.keyrotd`: which rotation each file belongs to (no secret material).
//!
//! Invariant: `path` is only ever replaced by an atomic `rename(2)` of a complete, fsynced file,
//! so a consumer reads either the old value or the new one, never a torn or missing file.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::{Attrs, Credential, ProviderError, StepContext, Store};

/// Configuration of the `file` store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Absolute path of the file consumers read.
    pub path: PathBuf,
    /// Permission bits, in octal (`"0600"`).
    #[serde(default = "default_mode")]
    pub mode: String,
    /// `raw`: the file holds the secret alone; `json`: an object with the secret and attributes.
    #[serde(default)]
    pub format: Format,
}

fn default_mode() -> String {
    "0600".into()
}

/// How the credential is written into the file.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The secret value and nothing else.
    #[default]
    Raw,
    /// `{"<secret field>": "...", "<attr>": "...", ...}`
    Json,
}

impl FileConfig {
    /// Checks the configuration; the error names the offending field.
    pub fn validate(&self) -> Result<u32, String> {
        if !self.path.is_absolute() {
            return Err(format!(
                "path: must be absolute, got `{}`",
                self.path.display()
            ));
        }
        if self.path.file_name().is_none() {
            return Err("path: must name a file".into());
        }
        let mode = u32::from_str_radix(&self.mode, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                format!(
                    "mode: `{}` is not an octal permission like \"0600\"",
                    self.mode
                )
            })?;
        if mode & 0o600 != 0o600 {
            return Err(format!(
                "mode: {} must let the owner read and write",
                self.mode
            ));
        }
        Ok(mode)
    }
}

/// Non-secret bookkeeping kept in `path.keyrotd`.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Meta {
    current: Option<String>,
    previous: Option<String>,
    promoting: Option<String>,
}

/// The `file` store.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
    mode: u32,
    format: Format,
}

impl FileStore {
    /// Builds the store from a configuration that passed [`FileConfig::validate`].
    pub fn new(config: FileConfig) -> Result<Self, String> {
        let mode = config.validate()?;
        Ok(Self {
            path: config.path,
            mode,
            format: config.format,
        })
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(suffix);
        self.path.with_file_name(name)
    }

    fn pending_path(&self, rotation_id: &str) -> PathBuf {
        self.sibling(&format!(".pending.{rotation_id}"))
    }

    fn previous_path(&self) -> PathBuf {
        self.sibling(".previous")
    }

    fn meta_path(&self) -> PathBuf {
        self.sibling(".keyrotd")
    }

    fn read_meta(&self) -> Result<Meta, ProviderError> {
        let path = self.meta_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                ProviderError::permanent(format!("{} is corrupt: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Meta::default()),
            Err(e) => Err(ProviderError::io(format!("reading {}", path.display()), &e)),
        }
    }

    fn write_meta(&self, meta: &Meta) -> Result<(), ProviderError> {
        let bytes = serde_json::to_vec(meta).expect("Meta serializes");
        self.write_atomically(&self.meta_path(), &bytes)
    }

    /// Writes `bytes` to a temporary file, fsyncs it, renames it over `dest` and fsyncs the
    /// directory, so `dest` holds either its old content or all of `bytes`.
    fn write_atomically(&self, dest: &Path, bytes: &[u8]) -> Result<(), ProviderError> {
        let mut tmp = dest.as_os_str().to_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let io = |what: &str, e: std::io::Error| {
            ProviderError::io(format!("{what} {}", tmp.display()), &e)
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(self.mode)
            .open(&tmp)
            .map_err(|e| io("creating", e))?;
        file.write_all(bytes).map_err(|e| io("writing", e))?;
        file.sync_all().map_err(|e| io("syncing", e))?;
        fs::rename(&tmp, dest).map_err(|e| io("renaming", e))?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), ProviderError> {
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| ProviderError::io(format!("syncing directory {}", dir.display()), &e))
    }

    fn encode(&self, secret_field: &str, credential: &Credential) -> Vec<u8> {
        match self.format {
            Format::Raw => credential.secret.expose_secret().as_bytes().to_vec(),
            Format::Json => {
                let mut object: serde_json::Map<String, serde_json::Value> = credential
                    .attrs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone().into()))
                    .collect();
                object.insert(
                    secret_field.to_owned(),
                    credential.secret.expose_secret().into(),
                );
                serde_json::to_vec(&object).expect("a map of strings serializes")
            }
        }
    }

    fn decode(
        &self,
        path: &Path,
        secret_field: &str,
        bytes: Vec<u8>,
    ) -> Result<Credential, ProviderError> {
        let bad = |what: &str| ProviderError::permanent(format!("{} {what}", path.display()));
        let text = String::from_utf8(bytes).map_err(|_| bad("is not UTF-8"))?;
        match self.format {
            Format::Raw => Ok(Credential {
                secret: SecretString::from(text),
                attrs: Attrs::new(),
            }),
            Format::Json => {
                // serde_json's errors quote no input, so they are safe to report.
                let object: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(&text)
                        .map_err(|e| bad(&format!("is not a JSON object ({:?})", e.classify())))?;
                let mut attrs = Attrs::new();
                let mut secret = None;
                for (key, value) in object {
                    let serde_json::Value::String(value) = value else {
                        continue;
                    };
                    if key == secret_field {
                        secret = Some(SecretString::from(value));
                    } else {
                        attrs.insert(key, value);
                    }
                }
                let secret =
                    secret.ok_or_else(|| bad(&format!("has no string field `{secret_field}`")))?;
                Ok(Credential { secret, attrs })
            }
        }
    }

    fn read(&self, path: &Path, secret_field: &str) -> Result<Option<Credential>, ProviderError> {
        match fs::read(path) {
            Ok(bytes) => self.decode(path, secret_field, bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ProviderError::io(format!("reading {}", path.display()), &e)),
        }
    }

    fn stage_sync(
        &self,
        rotation_id: &str,
        secret_field: &str,
        new: &Credential,
    ) -> Result<(), ProviderError> {
        let pending = self.pending_path(rotation_id);
        if pending.exists() {
            return Ok(());
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.exists()) {
            // Only the owner may list a directory that holds secrets.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    ProviderError::io(format!("creating directory {}", dir.display()), &e)
                })?;
        }
        self.write_atomically(&pending, &self.encode(secret_field, new))
    }

    fn promote_sync(&self, rotation_id: &str) -> Result<(), ProviderError> {
        let mut meta = self.read_meta()?;
        if meta.current.as_deref() == Some(rotation_id) {
            return Ok(());
        }
        let pending = self.pending_path(rotation_id);
        if !pending.exists() {
            if meta.promoting.as_deref() != Some(rotation_id) {
                return Err(ProviderError::permanent(format!(
                    "nothing is staged at {}",
                    pending.display()
                )));
            }
            // A crash hit between the rename and the bookkeeping below: the rename happened.
        } else {
            match fs::read(&self.path) {
                Ok(old) => self.write_atomically(&self.previous_path(), &old)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ProviderError::io(
                        format!("reading {}", self.path.display()),
                        &e,
                    ))
                }
            }
            meta.promoting = Some(rotation_id.to_owned());
            self.write_meta(&meta)?;
            fs::rename(&pending, &self.path).map_err(|e| {
                ProviderError::io(format!("renaming {} into place", pending.display()), &e)
            })?;
            self.sync_dir()?;
        }
        let previous = meta.current.take();
        self.write_meta(&Meta {
            current: Some(rotation_id.to_owned()),
            previous,
            promoting: None,
        })
    }

    fn discard_sync(&self, rotation_id: &str) -> Result<(), ProviderError> {
        let pending = self.pending_path(rotation_id);
        if !pending.exists() {
            return Ok(());
        }
        remove_if_present(&pending)?;
        self.sync_dir()
    }

    fn release_previous_sync(&self, rotation_id: &str) -> Result<(), ProviderError> {
        let mut meta = self.read_meta()?;
        // Only the rotation that made `previous` may drop it; a later one owns a newer previous.
        if meta.current.as_deref() != Some(rotation_id) {
            return Ok(());
        }
        remove_if_present(&self.previous_path())?;
        if meta.previous.take().is_some() {
            self.write_meta(&meta)?;
        }
        Ok(())
    }
}

fn remove_if_present(path: &Path) -> Result<(), ProviderError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ProviderError::io(
            format!("removing {}", path.display()),
            &e,
        )),
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

    async fn current(&self, ctx: StepContext<'_>) -> Result<Option<Credential>, ProviderError> {
        let (this, field) = (self.clone(), ctx.secret_field.to_owned());
        blocking(move || this.read(&this.path, &field)).await
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
        blocking(move || this.read(&this.pending_path(&id), &field)).await
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
        blocking(move || Ok(this.read_meta()?.current)).await
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn store(dir: &Path, format: Format) -> FileStore {
        FileStore::new(FileConfig {
            path: dir.join("db.pass"),
            mode: "0600".into(),
            format,
        })
        .unwrap()
    }

    fn ctx(rotation_id: &str) -> StepContext<'_> {
        StepContext {
            credential_id: "db",
            rotation_id,
            secret_field: "password",
            started_at: std::time::SystemTime::now(),
        }
    }

    fn cred(secret: &str) -> Credential {
        Credential {
            secret: SecretString::from(secret.to_owned()),
            attrs: Attrs::from([("user".into(), "app".into())]),
        }
    }

    #[tokio::test]
    async fn stage_promote_release_keeps_a_readable_current_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), Format::Raw);
        s.stage(ctx("r1"), &cred("one")).await.unwrap();
        assert!(s.current(ctx("r1")).await.unwrap().is_none());
        s.promote(ctx("r1")).await.unwrap();
        s.promote(ctx("r1")).await.unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("db.pass")).unwrap(),
            "one"
        );
        let mode = fs::metadata(dir.path().join("db.pass"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        s.stage(ctx("r2"), &cred("two")).await.unwrap();
        s.stage(ctx("r2"), &cred("ignored: already staged"))
            .await
            .unwrap();
        assert_eq!(
            s.pending(ctx("r2"))
                .await
                .unwrap()
                .unwrap()
                .secret
                .expose_secret(),
            "two"
        );
        s.promote(ctx("r2")).await.unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("db.pass")).unwrap(),
            "two"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("db.pass.previous")).unwrap(),
            "one"
        );
        s.release_previous(ctx("r1")).await.unwrap();
        assert!(
            dir.path().join("db.pass.previous").exists(),
            "an older rotation must not drop a newer previous"
        );
        s.release_previous(ctx("r2")).await.unwrap();
        assert!(!dir.path().join("db.pass.previous").exists());
    }

    #[tokio::test]
    async fn promote_finishes_after_a_crash_between_rename_and_bookkeeping() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), Format::Raw);
        s.stage(ctx("r1"), &cred("one")).await.unwrap();
        // Simulate the crash: bookkeeping says "promoting", the rename happened.
        s.write_meta(&Meta {
            current: None,
            previous: None,
            promoting: Some("r1".into()),
        })
        .unwrap();
        fs::rename(s.pending_path("r1"), &s.path).unwrap();
        s.promote(ctx("r1")).await.unwrap();
        assert_eq!(s.read_meta().unwrap().current.as_deref(), Some("r1"));
        assert!(
            s.promote(ctx("other")).await.is_err(),
            "promoting an unstaged rotation fails"
        );
    }

    #[tokio::test]
    async fn json_format_round_trips_attributes_and_discard_keeps_current() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), Format::Json);
        s.stage(ctx("r1"), &cred("one")).await.unwrap();
        s.promote(ctx("r1")).await.unwrap();
        s.stage(ctx("r2"), &cred("two")).await.unwrap();
        s.discard(ctx("r2")).await.unwrap();
        assert!(s.pending(ctx("r2")).await.unwrap().is_none());
        let current = s.current(ctx("r3")).await.unwrap().unwrap();
        assert_eq!(current.secret.expose_secret(), "one");
        assert_eq!(current.attrs["user"], "app");
    }
}
