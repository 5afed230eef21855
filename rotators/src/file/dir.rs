//! File operations inside the store's directory that a hostile neighbour cannot redirect.
//!
//! The directory often belongs to the consuming application, so any name in it may have been
//! planted by someone else: a symlink to a file the attacker reads, a FIFO that blocks a reader
//! forever, a device that never ends. Every operation therefore goes through one directory file
//! descriptor:
//! - names are looked at with `fstatat(AT_SYMLINK_NOFOLLOW)` and opened with `openat(O_NOFOLLOW)`,
//!   so a symlink at any name is refused rather than followed;
//! - only regular files are read, never more than [`MAX_FILE_BYTES`], and a name is looked at
//!   before it is opened, so a FIFO or a device is never opened for reading at all;
//! - new content goes into a temporary file with an unpredictable name, created with `O_EXCL`
//!   (which never follows a symlink either), given its owner and exact mode with `fchown` and
//!   `fchmod`, and moved into place with `renameat`, which replaces a name and never writes
//!   through it. A [`TempFile`] that is not moved into place is removed when it is dropped.
//!
//! The directory itself is reached through its configured path (symlinks on the way there are
//! the operator's configuration), but it is refused when others may write to it, unless it is
//! sticky and owned by root or by the service user (see [`check_directory_mode`]).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag};
use nix::sys::stat::{self, FileStat, Mode, SFlag};
use nix::unistd::{self, Gid, Uid, UnlinkatFlags};
use rand::distr::{Alphanumeric, SampleString};

use keyrotd_plugin::ProviderError;

/// The largest file keyrotd reads from a store directory (1 MiB). A secret, even inside a JSON
/// object with its attributes, is a few kilobytes at most; anything larger is not a store file,
/// and reading it whole could exhaust the daemon's memory.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// How many random temporary names are tried before giving up. Sixteen random alphanumerics
/// make a collision practically impossible unless someone is planting names on purpose.
const TEMP_ATTEMPTS: usize = 8;

/// Owner, group and mode given to a file keyrotd writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    /// Permission bits, applied exactly (the umask does not apply to `fchmod`).
    pub mode: u32,
    /// The owner, when it is not the service user.
    pub owner: Option<Uid>,
    /// The group, when it is not the service user's.
    pub group: Option<Gid>,
}

impl Perms {
    /// Read and write for the service user only: for files no consumer needs (the sidecar).
    pub const PRIVATE: Self = Self {
        mode: 0o600,
        owner: None,
        group: None,
    };
}

/// Refuses a directory that others may write to, unless it is sticky and owned by root or by the
/// service user: in such a directory anyone could replace or remove the store's files between
/// two steps. In a sticky directory only a file's owner (or the directory's) may do that.
pub fn check_directory_mode(dir: &Path, mode: u32, owner: u32) -> Result<(), String> {
    let euid = unistd::geteuid().as_raw();
    let writable_by_others = mode & 0o022 != 0;
    let sticky_and_trusted = mode & 0o1000 != 0 && (owner == 0 || owner == euid);
    if !writable_by_others || sticky_and_trusted {
        return Ok(());
    }
    Err(format!(
        "directory {} is writable by group or others (mode {:04o}, owner uid {owner}): refused, \
         because anyone who can write there can replace the store's files; make it writable by \
         its owner only, or sticky (chmod +t) and owned by root or uid {euid}",
        dir.display(),
        mode & 0o7777
    ))
}

/// Refuses anything but a regular file at `path`, described by its `st_mode`.
pub fn check_regular(path: &Path, mode: u32) -> Result<(), String> {
    let kind = match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => return Ok(()),
        SFlag::S_IFLNK => {
            return Err(format!(
                "{} is a symbolic link: refused, keyrotd never follows a symlink in a store \
                 directory",
                path.display()
            ))
        }
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFIFO => "FIFO",
        SFlag::S_IFSOCK => "socket",
        SFlag::S_IFCHR => "character device",
        SFlag::S_IFBLK => "block device",
        _ => "special file",
    };
    Err(format!(
        "{} is a {kind}, not a regular file: refused",
        path.display()
    ))
}

/// Checks, as they are now, the directory `dir` (if it exists) and the files `names` in it (those
/// that exist), without opening any of them. Used by `keyrotd check`; each step checks again.
pub fn check_existing(dir: &Path, names: &[OsString]) -> Result<(), String> {
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        // Created by the first stage (0700).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("directory {}: {e}", dir.display())),
    };
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    check_directory_mode(dir, meta.mode(), meta.uid())?;
    for name in names {
        let path = dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => check_regular(&path, meta.mode())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Ok(())
}

/// Turns a failed system call on `path` into a provider error. A symlink met by `O_NOFOLLOW`
/// gets its own message: it is an attack or a misconfiguration, never a passing fault.
fn fs_error(what: &str, path: &Path, errno: Errno) -> ProviderError {
    if errno == Errno::ELOOP {
        return ProviderError::permanent(format!(
            "{what} {}: it is a symbolic link: refused, keyrotd never follows a symlink in a \
             store directory",
            path.display()
        ));
    }
    ProviderError::io(
        format!("{what} {}", path.display()),
        &std::io::Error::from(errno),
    )
}

/// An open store directory: every name below is resolved relative to it.
#[derive(Debug)]
pub struct StoreDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl StoreDir {
    /// Opens the directory at `path`, or returns `None` if it does not exist.
    pub fn open(path: &Path) -> Result<Option<Self>, ProviderError> {
        let dir = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags((OFlag::O_DIRECTORY | OFlag::O_CLOEXEC).bits())
            .open(path)
        {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(ProviderError::io(
                    format!("opening directory {}", path.display()),
                    &e,
                ))
            }
        };
        let fd = OwnedFd::from(dir);
        let st = stat::fstat(&fd).map_err(|e| fs_error("inspecting directory", path, e))?;
        check_directory_mode(path, st.st_mode, st.st_uid).map_err(ProviderError::permanent)?;
        Ok(Some(Self {
            fd,
            path: path.to_owned(),
        }))
    }

    /// Opens the directory at `path`, creating it (and its parents) first if it is missing.
    pub fn create(path: &Path) -> Result<Self, ProviderError> {
        if let Some(dir) = Self::open(path)? {
            return Ok(dir);
        }
        // Only the owner may list a directory that holds secrets.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| ProviderError::io(format!("creating directory {}", path.display()), &e))?;
        Self::open(path)?.ok_or_else(|| {
            ProviderError::transient(format!("directory {} vanished", path.display()))
        })
    }

    /// The full path of `name`, for messages.
    pub fn path_of(&self, name: &OsStr) -> PathBuf {
        self.path.join(name)
    }

    fn lstat(&self, name: &OsStr) -> Result<Option<FileStat>, ProviderError> {
        match stat::fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(fs_error("inspecting", &self.path_of(name), e)),
        }
    }

    /// Whether `name` exists; an error if it exists and is not a regular file.
    pub fn has_file(&self, name: &OsStr) -> Result<bool, ProviderError> {
        match self.lstat(name)? {
            Some(st) => check_regular(&self.path_of(name), st.st_mode)
                .map(|()| true)
                .map_err(ProviderError::permanent),
            None => Ok(false),
        }
    }

    /// Reads the regular file `name` whole (at most [`MAX_FILE_BYTES`]); `None` if it does not
    /// exist.
    pub fn read(&self, name: &OsStr) -> Result<Option<Vec<u8>>, ProviderError> {
        let path = self.path_of(name);
        // Looked at before opening: opening a FIFO or a device can block or have side effects.
        if !self.has_file(name)? {
            return Ok(None);
        }
        let flags = OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC;
        let fd = match fcntl::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(fs_error("opening", &path, e)),
        };
        // The name may have been replaced since it was looked at: the open file decides.
        let st = stat::fstat(&fd).map_err(|e| fs_error("inspecting", &path, e))?;
        check_regular(&path, st.st_mode).map_err(ProviderError::permanent)?;
        let too_large = || {
            ProviderError::permanent(format!(
                "{} is larger than {MAX_FILE_BYTES} bytes, the most keyrotd reads from a store: \
                 refused",
                path.display()
            ))
        };
        if u64::try_from(st.st_size).unwrap_or(u64::MAX) > MAX_FILE_BYTES {
            return Err(too_large());
        }
        // The size can grow after fstat: the cap holds while reading too.
        let mut bytes = Vec::new();
        File::from(fd)
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| ProviderError::io(format!("reading {}", path.display()), &e))?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(too_large());
        }
        Ok(Some(bytes))
    }

    /// Replaces `name` with `bytes`, atomically: a reader sees the old content or all of the
    /// new one, with `perms` already applied. Nothing is left behind if any part fails.
    pub fn write(&self, name: &OsStr, bytes: &[u8], perms: Perms) -> Result<(), ProviderError> {
        // The rename would replace a symlink harmlessly, but one planted at a store name is an
        // attack or a mistake that an operator must hear about.
        self.has_file(name)?;
        let mut tmp = self.create_temp(name)?;
        let path = self.path_of(&tmp.name);
        if perms.owner.is_some() || perms.group.is_some() {
            unistd::fchown(&tmp.file, perms.owner, perms.group)
                .map_err(|e| fs_error("setting the owner of", &path, e))?;
        }
        // Set explicitly: the mode given to open(2) is masked by the umask.
        stat::fchmod(&tmp.file, Mode::from_bits_truncate(perms.mode))
            .map_err(|e| fs_error("setting the mode of", &path, e))?;
        tmp.file
            .write_all(bytes)
            .and_then(|()| tmp.file.sync_all())
            .map_err(|e| ProviderError::io(format!("writing {}", path.display()), &e))?;
        self.rename(&tmp.name, name)?;
        tmp.placed = true;
        self.sync()
    }

    /// Creates an empty temporary file beside `name`, readable by the service user only until
    /// [`StoreDir::write`] sets its permissions.
    fn create_temp(&self, name: &OsStr) -> Result<TempFile<'_>, ProviderError> {
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        for _ in 0..TEMP_ATTEMPTS {
            let mut tmp = name.to_os_string();
            tmp.push(".");
            tmp.push(Alphanumeric.sample_string(&mut rand::rng(), 16));
            tmp.push(".tmp");
            match fcntl::openat(
                &self.fd,
                tmp.as_os_str(),
                flags,
                Mode::from_bits_truncate(0o600),
            ) {
                Ok(fd) => {
                    return Ok(TempFile {
                        dir: self,
                        name: tmp,
                        file: File::from(fd),
                        placed: false,
                    })
                }
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(fs_error("creating", &self.path_of(&tmp), e)),
            }
        }
        Err(ProviderError::permanent(format!(
            "creating a temporary file beside {}: {TEMP_ATTEMPTS} random names were all taken",
            self.path_of(name).display()
        )))
    }

    /// Renames `from` to `to`. A symlink at `to` would be replaced, never written through.
    pub fn rename(&self, from: &OsStr, to: &OsStr) -> Result<(), ProviderError> {
        fcntl::renameat(&self.fd, from, &self.fd, to).map_err(|e| {
            fs_error(
                &format!("renaming {} to", self.path_of(from).display()),
                &self.path_of(to),
                e,
            )
        })
    }

    /// Removes `name` if it is there; whether it was. A symlink is removed, not followed.
    pub fn remove(&self, name: &OsStr) -> Result<bool, ProviderError> {
        match unistd::unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(fs_error("removing", &self.path_of(name), e)),
        }
    }

    /// Makes renames and removals in the directory durable.
    pub fn sync(&self) -> Result<(), ProviderError> {
        unistd::fsync(&self.fd).map_err(|e| fs_error("syncing directory", &self.path, e))
    }
}

/// A temporary file that is removed when dropped, unless it was renamed into place.
struct TempFile<'a> {
    dir: &'a StoreDir,
    name: OsString,
    file: File,
    placed: bool,
}

impl Drop for TempFile<'_> {
    fn drop(&mut self) {
        if !self.placed {
            // Best effort: the step already failed with the error that matters.
            let _ = self.dir.remove(&self.name);
        }
    }
}
