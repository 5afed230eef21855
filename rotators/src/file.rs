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
//! directory may be writable by the consuming application: [`dir`] explains how every name in it
//! is handled so that a planted symlink, FIFO or device is refused rather than used.

mod dir;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use nix::unistd::{Gid, Group, Uid, User};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

pub use self::dir::MAX_FILE_BYTES;
use self::dir::{Perms, StoreDir};
use crate::{Attrs, Credential, ProviderError, StepContext, Store};

/// Configuration of the `file` store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Absolute path of the file consumers read.
    pub path: PathBuf,
    /// Permission bits, in octal (`"0600"`), applied exactly whatever the umask. Others may not
    /// read or write: give consumers access with `group`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Owner of the file, a user name or a numeric uid; by default the service user.
    #[serde(default)]
    pub owner: Option<String>,
    /// Group of the file, a group name or a numeric gid; by default the service user's.
    #[serde(default)]
    pub group: Option<String>,
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

/// The suffixes of the files keyrotd keeps beside `path` for as long as the store lives.
const SIDE_SUFFIXES: [&str; 2] = [".previous", ".keyrotd"];

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
        if mode & 0o007 != 0 {
            return Err(format!(
                "mode: {} gives every user on the host access to the secret; use a group \
                 (for example mode = \"0640\" with group = \"app\")",
                self.mode
            ));
        }
        for (field, value) in [("owner", &self.owner), ("group", &self.group)] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(format!("{field}: must not be empty"));
            }
        }
        Ok(mode)
    }

    /// The owner and group as ids, looking names up in the host's user database.
    fn ids(&self) -> Result<(Option<Uid>, Option<Gid>), String> {
        let owner = self
            .owner
            .as_deref()
            .map(|name| match name.parse() {
                Ok(uid) => Ok(Uid::from_raw(uid)),
                Err(_) => match User::from_name(name) {
                    Ok(Some(user)) => Ok(user.uid),
                    Ok(None) => Err(format!("owner: no user `{name}` on this host")),
                    Err(e) => Err(format!("owner: looking up user `{name}`: {e}")),
                },
            })
            .transpose()?;
        let group = self
            .group
            .as_deref()
            .map(|name| match name.parse() {
                Ok(gid) => Ok(Gid::from_raw(gid)),
                Err(_) => match Group::from_name(name) {
                    Ok(Some(group)) => Ok(group.gid),
                    Ok(None) => Err(format!("group: no group `{name}` on this host")),
                    Err(e) => Err(format!("group: looking up group `{name}`: {e}")),
                },
            })
            .transpose()?;
        Ok((owner, group))
    }

    fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("/"))
    }

    /// The names keyrotd keeps in the directory: the file itself, then its side files.
    fn names(&self) -> Vec<OsString> {
        let name = self.path.file_name().unwrap_or_default();
        std::iter::once(name.to_os_string())
            .chain(SIDE_SUFFIXES.iter().map(|suffix| {
                let mut side = name.to_os_string();
                side.push(suffix);
                side
            }))
            .collect()
    }

    /// Checks the host as it is now: the owner and group exist, the directory (if it exists) is
    /// not writable by others, and each of the store's files that exists is a regular file.
    /// Nothing is opened or written; every step checks again.
    pub fn check_location(&self) -> Result<(), String> {
        self.ids()?;
        dir::check_existing(self.dir(), &self.names()).map_err(|e| format!("path: {e}"))
    }

    /// What this store writes, one identity per file: the path with its directory canonicalized
    /// (so `/run/app/../app/x` and a symlinked directory name the same file), and each side
    /// file, so that one credential's `path` cannot be another's `path.previous`.
    pub fn targets(&self) -> Vec<String> {
        let dir = self.dir();
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
        self.names()
            .iter()
            .map(|name| format!("file {}", dir.join(name).display()))
            .collect()
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
    /// The directory holding `path`.
    dir: PathBuf,
    /// The file name of `path`.
    name: OsString,
    /// Applied to the current, pending and previous files: each holds a secret for consumers.
    perms: Perms,
    format: Format,
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
            format: config.format,
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

    fn meta_name(&self) -> OsString {
        self.sibling(".keyrotd")
    }

    /// The store's directory, which must exist for anything but reads.
    fn existing_dir(&self) -> Result<StoreDir, ProviderError> {
        StoreDir::open(&self.dir)?.ok_or_else(|| {
            ProviderError::permanent(format!("directory {} does not exist", self.dir.display()))
        })
    }

    fn read_meta(&self, dir: &StoreDir) -> Result<Meta, ProviderError> {
        let name = self.meta_name();
        match dir.read(&name)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                ProviderError::permanent(format!(
                    "{} is corrupt: {e}",
                    dir.path_of(&name).display()
                ))
            }),
            None => Ok(Meta::default()),
        }
    }

    /// The sidecar holds no secret, so only the service user needs it.
    fn write_meta(&self, dir: &StoreDir, meta: &Meta) -> Result<(), ProviderError> {
        let bytes = serde_json::to_vec(meta).expect("Meta serializes");
        dir.write(&self.meta_name(), &bytes, Perms::PRIVATE)
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

    fn read(
        &self,
        name: &OsString,
        secret_field: &str,
    ) -> Result<Option<Credential>, ProviderError> {
        let Some(dir) = StoreDir::open(&self.dir)? else {
            return Ok(None);
        };
        dir.read(name)?
            .map(|bytes| self.decode(&dir.path_of(name), secret_field, bytes))
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
        dir.write(&pending, &self.encode(secret_field, new), self.perms)
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

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn store(dir: &Path, format: Format) -> FileStore {
        FileStore::new(FileConfig {
            path: dir.join("db.pass"),
            mode: "0600".into(),
            owner: None,
            group: None,
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
            old_attrs: None,
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
        let d = s.existing_dir().unwrap();
        s.write_meta(
            &d,
            &Meta {
                current: None,
                previous: None,
                promoting: Some("r1".into()),
            },
        )
        .unwrap();
        d.rename(&s.pending_name("r1"), &s.name).unwrap();
        s.promote(ctx("r1")).await.unwrap();
        assert_eq!(s.read_meta(&d).unwrap().current.as_deref(), Some("r1"));
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

    /// Every file in `dir` whose content contains `needle`, symlinks not followed.
    fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .filter(|e| String::from_utf8_lossy(&fs::read(e.path()).unwrap()).contains(needle))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A directory anyone may write to, as `/tmp` is: world-writable, sticky, owned by root (the
    /// tests run as root) and so accepted by the directory rule.
    fn shared_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        dir
    }

    #[tokio::test]
    async fn a_symlink_at_any_name_is_refused_and_nothing_goes_through_it() {
        // The names keyrotd uses, and the fixed temporary names it used to write through.
        let planted = [
            ("db.pass", true),
            ("db.pass.previous", true),
            ("db.pass.keyrotd", true),
            ("db.pass.pending.r2", true),
            ("db.pass.tmp", false),
            ("db.pass.previous.tmp", false),
            ("db.pass.keyrotd.tmp", false),
            ("db.pass.pending.r2.tmp", false),
        ];
        for (name, used) in planted {
            let elsewhere = tempfile::tempdir().unwrap();
            let victim = elsewhere.path().join("victim");
            fs::write(&victim, "victim-data").unwrap();
            fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
            let dir = shared_dir();
            let s = store(dir.path(), Format::Raw);
            s.stage(ctx("r1"), &cred("one")).await.unwrap();
            s.promote(ctx("r1")).await.unwrap();
            let _ = fs::remove_file(dir.path().join(name));
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();

            let mut errors = Vec::new();
            for result in [
                s.current(ctx("r2")).await.map(drop),
                s.stage(ctx("r2"), &cred("two")).await,
                s.pending(ctx("r2")).await.map(drop),
                s.promote(ctx("r2")).await,
                s.release_previous(ctx("r2")).await,
            ] {
                errors.extend(result.err().map(|e| e.message));
            }

            assert_eq!(
                fs::read_to_string(&victim).unwrap(),
                "victim-data",
                "{name}: written through"
            );
            assert!(
                files_containing(dir.path(), "victim-data").is_empty(),
                "{name}: the symlink's target was read into a store file"
            );
            assert!(
                files_containing(elsewhere.path(), "one").is_empty()
                    && files_containing(elsewhere.path(), "two").is_empty(),
                "{name}: a secret went through the symlink"
            );
            let named = dir.path().join(name).display().to_string();
            if used {
                assert!(
                    errors
                        .iter()
                        .any(|e| e.contains(&named) && e.contains("symbolic link")),
                    "{name}: no error names the symlink: {errors:?}"
                );
            } else {
                assert!(errors.is_empty(), "{name}: {errors:?}");
                assert_eq!(
                    fs::read_to_string(dir.path().join("db.pass")).unwrap(),
                    "two"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_directory_others_can_write_is_refused_unless_sticky_and_trusted() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("shared");
        fs::create_dir(&dir).unwrap();
        let config = |mode: &str| FileConfig {
            path: dir.join("db.pass"),
            mode: mode.into(),
            owner: None,
            group: None,
            format: Format::Raw,
        };
        let cases = [
            (0o777, None, false),
            (0o770, None, false),
            (0o757, None, false),
            (0o1777, Some(4242), false),
            (0o1777, None, true),
            (0o1770, None, true),
            (0o750, Some(4242), true),
            (0o700, None, true),
        ];
        for (mode, owner, accepted) in cases {
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
            std::os::unix::fs::chown(&dir, Some(owner.unwrap_or(0)), None).unwrap();
            let s = FileStore::new(config("0600")).unwrap();
            let staged = s.stage(ctx("r1"), &cred("one")).await;
            let checked = config("0600").check_location();
            let what = format!("mode {mode:o} owner {owner:?}");
            if accepted {
                staged.unwrap_or_else(|e| panic!("{what}: {e}"));
                checked.unwrap_or_else(|e| panic!("{what}: {e}"));
                s.discard(ctx("r1")).await.unwrap();
            } else {
                let e = staged.expect_err(&what).message;
                assert!(
                    e.contains(&dir.display().to_string())
                        && e.contains("writable by group or others"),
                    "{what}: {e}"
                );
                assert!(checked.is_err(), "{what}: check passed");
                assert!(names_in(&dir).is_empty(), "{what}: {:?}", names_in(&dir));
            }
        }
    }

    #[tokio::test]
    async fn the_mode_is_exact_under_a_restrictive_umask_and_owner_and_group_apply() {
        // The shipped unit runs with UMask=0077. Other tests in this process only create
        // files for themselves, which a stricter umask does not disturb.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::new(FileConfig {
            path: dir.path().join("db.pass"),
            mode: "0640".into(),
            owner: Some("nobody".into()),
            group: Some("4242".into()),
            format: Format::Raw,
        })
        .unwrap();
        for id in ["r1", "r2"] {
            s.stage(ctx(id), &cred(id)).await.unwrap();
            s.promote(ctx(id)).await.unwrap();
        }
        nix::sys::stat::umask(old);
        let nobody = User::from_name("nobody").unwrap().unwrap().uid.as_raw();
        for name in ["db.pass", "db.pass.previous"] {
            let meta = fs::metadata(dir.path().join(name)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o7777, 0o640, "{name}");
            use std::os::unix::fs::MetadataExt;
            assert_eq!((meta.uid(), meta.gid()), (nobody, 4242), "{name}");
        }
        let sidecar = fs::metadata(dir.path().join("db.pass.keyrotd")).unwrap();
        assert_eq!(sidecar.permissions().mode() & 0o7777, 0o600);

        let refused = |mode: &str, owner: Option<&str>, group: Option<&str>| {
            FileConfig {
                path: "/run/app/db.pass".into(),
                mode: mode.into(),
                owner: owner.map(Into::into),
                group: group.map(Into::into),
                format: Format::Raw,
            }
            .validate()
            .and_then(|_| {
                FileStore::new(FileConfig {
                    path: "/run/app/db.pass".into(),
                    mode: mode.into(),
                    owner: owner.map(Into::into),
                    group: group.map(Into::into),
                    format: Format::Raw,
                })
                .map(drop)
            })
            .err()
        };
        for mode in ["0644", "0604", "0602", "0666", "0601"] {
            let e = refused(mode, None, None).unwrap_or_else(|| panic!("{mode} accepted"));
            assert!(e.starts_with("mode:"), "{e}");
        }
        assert!(refused("0660", Some("0"), Some("root")).is_none());
        let e = refused("0640", Some("no-such-user-here"), None).unwrap();
        assert!(e.starts_with("owner: no user `no-such-user-here`"), "{e}");
        let e = refused("0640", None, Some("no-such-group-here")).unwrap();
        assert!(e.starts_with("group: no group `no-such-group-here`"), "{e}");
    }

    /// Puts something that is not a store file at a path.
    type MakeFile = fn(&Path);

    #[tokio::test]
    async fn special_and_oversized_files_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.pass");
        let s = store(dir.path(), Format::Raw);
        let deadline = std::time::Duration::from_secs(10);
        let kinds: [(&str, MakeFile); 4] = [
            ("FIFO", |p| {
                nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()
            }),
            ("socket", |p| {
                drop(std::os::unix::net::UnixListener::bind(p).unwrap())
            }),
            ("directory", |p| fs::create_dir(p).unwrap()),
            ("larger than", |p| {
                fs::write(p, vec![b'x'; MAX_FILE_BYTES as usize + 1]).unwrap()
            }),
        ];
        for (kind, make) in kinds {
            for name in ["db.pass", "db.pass.keyrotd"] {
                let at = dir.path().join(name);
                make(&at);
                s.stage(ctx("r1"), &cred("one")).await.unwrap();
                let current = tokio::time::timeout(deadline, s.current(ctx("r1")))
                    .await
                    .unwrap_or_else(|_| panic!("{kind} at {name}: reading blocked"));
                let promoted = tokio::time::timeout(deadline, s.promote(ctx("r1")))
                    .await
                    .unwrap_or_else(|_| panic!("{kind} at {name}: promote blocked"));
                let e = if name == "db.pass" {
                    current.expect_err(kind).message
                } else {
                    promoted.expect_err(kind).message
                };
                assert!(
                    e.contains(&at.display().to_string()) && e.contains(kind),
                    "{kind} at {name}: {e}"
                );
                let config = FileConfig {
                    path: path.clone(),
                    mode: "0600".into(),
                    owner: None,
                    group: None,
                    format: Format::Raw,
                };
                if kind != "larger than" {
                    let e = config.check_location().expect_err(kind);
                    assert!(e.contains(kind), "{e}");
                }
                s.discard(ctx("r1")).await.unwrap();
                if at.is_dir() {
                    fs::remove_dir(&at).unwrap();
                } else {
                    fs::remove_file(&at).unwrap();
                }
            }
        }

        // A device is never opened: /dev/full would otherwise be read until memory runs out.
        let dev = FileStore::new(FileConfig {
            path: "/dev/full".into(),
            mode: "0600".into(),
            owner: None,
            group: None,
            format: Format::Raw,
        })
        .unwrap();
        let e = tokio::time::timeout(deadline, dev.current(ctx("r1")))
            .await
            .expect("reading /dev/full stopped")
            .expect_err("a device is refused")
            .message;
        assert_eq!(
            e,
            "/dev/full is a character device, not a regular file: refused"
        );
    }

    /// Mounts a 16 KiB tmpfs (the tests run as root) and unmounts it when dropped.
    struct TinyFs(tempfile::TempDir);

    impl TinyFs {
        fn mount() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs"])
                .arg(dir.path())
                .status()
                .expect("running mount");
            assert!(status.success(), "mounting a tmpfs needs root: {status}");
            Self(dir)
        }
    }

    impl Drop for TinyFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.0.path())
                .status();
        }
    }

    #[tokio::test]
    async fn a_failed_write_leaves_no_temporary_file() {
        let fs_ = TinyFs::mount();
        let dir = fs_.0.path();
        let s = store(dir, Format::Json);
        s.stage(ctx("r1"), &cred("one")).await.unwrap();
        s.promote(ctx("r1")).await.unwrap();
        let before = names_in(dir);

        // Fill the file system to the last byte.
        let mut filler = fs::File::create(dir.join("filler")).unwrap();
        loop {
            use std::io::Write;
            if filler.write_all(&[0; 512]).is_err() {
                break;
            }
        }
        let mut full = before.clone();
        full.push("filler".into());
        full.sort();

        let e = s.stage(ctx("r2"), &cred("two")).await.expect_err("ENOSPC");
        assert!(e.message.contains("db.pass.pending.r2"), "{}", e.message);
        assert_eq!(names_in(dir), full, "a failed stage leaves files behind");

        drop(filler);
        fs::remove_file(dir.join("filler")).unwrap();
        s.stage(ctx("r2"), &cred("two")).await.unwrap();
        // Now fill it again so the copy to `previous` fails during promote.
        let mut filler = fs::File::create(dir.join("filler")).unwrap();
        loop {
            use std::io::Write;
            if filler.write_all(&[0; 512]).is_err() {
                break;
            }
        }
        assert!(s.promote(ctx("r2")).await.is_err());
        let leftovers: Vec<String> = names_in(dir)
            .into_iter()
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        assert_eq!(
            fs::read_to_string(dir.join("db.pass")).unwrap(),
            r#"{"password":"one","user":"app"}"#
        );
    }
}
