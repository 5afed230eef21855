//! The `file` store's configuration: where the file is, its mode, owner and group, and how the
//! credential is encoded; checked without touching the file system, except [`FileConfig::ids`]
//! (the user database) and [`FileConfig::check_location`] (looks, never opens or writes).
//!
//! Invariant: a validated mode lets the owner read and write and gives others no access.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};
use serde::Deserialize;

use super::dir;
use super::encoding::Encoding;

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
    /// `raw`: the file holds the secret alone; `json`: an object with the secret and attributes;
    /// `pem_bundle`: a certificate, its chain and its private key as PEM (for
    /// `vault_pki_certificate`).
    #[serde(default)]
    pub format: Encoding,
}

fn default_mode() -> String {
    "0600".into()
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
    pub(super) fn ids(&self) -> Result<(Option<Uid>, Option<Gid>), String> {
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

    pub(super) fn dir(&self) -> &Path {
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
