//! Who this process is, and whether the process named in a rotation's lease still runs.
//!
//! A lease names its owner as `host:pid:nonce`. Expiry alone would make a successor wait out the
//! whole lease after a crash, so a successor on the same host asks whether the owner is alive.
//! `/proc/PID` cannot answer that: a `keyrotd rotate` run through `docker exec` lives in another
//! PID namespace and its pid means nothing to the daemon (or names an unrelated process). So every
//! process that may hold a lease holds an exclusive `flock` on its own file,
//! `STATE.owners/NONCE.lock`, for as long as it runs. The kernel drops the lock when the process
//! dies, however it dies, and a lock on a shared file is visible across PID namespaces.
//!
//! Invariants:
//! - an owner is reported dead only if it is on this host and its lock file is absent or can be
//!   locked by us; anything else (another host, an unreadable file) counts as alive, and the
//!   lease then ends only by expiry;
//! - the lock file holds nothing: it is a name to lock, never secret.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// This process's identity as a lease owner, kept alive by a held lock.
#[derive(Debug)]
pub struct Liveness {
    owner: String,
    host: String,
    dir: PathBuf,
    lock: PathBuf,
    /// Holds the exclusive lock for the life of the process (released when dropped).
    _held: File,
}

impl Liveness {
    /// Creates this process's lock file beside the state database at `state_path` and locks it;
    /// removes the files of owners that are gone.
    pub fn acquire(state_path: &Path) -> io::Result<Self> {
        let mut dir = state_path.as_os_str().to_owned();
        dir.push(".owners");
        let dir = PathBuf::from(dir);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let nonce = uuid::Uuid::now_v7().simple().to_string();
        let lock = dir.join(format!("{nonce}.lock"));
        let held = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock)?;
        if !try_lock(&held)? {
            return Err(io::Error::other("a fresh lock file is already locked"));
        }
        let host = hostname();
        let me = Self {
            owner: format!("{host}:{}:{nonce}", std::process::id()),
            host,
            dir,
            lock,
            _held: held,
        };
        me.sweep();
        Ok(me)
    }

    /// `host:pid:nonce`, unique to this process.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Whether `owner` is known to be gone: a process on this host whose lock is free.
    pub fn is_dead(&self, owner: &str) -> bool {
        if owner == self.owner {
            return false;
        }
        let mut parts = owner.splitn(3, ':');
        let (Some(host), Some(pid), Some(nonce)) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        if host != self.host || nonce.is_empty() || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return false;
        }
        let path = self.dir.join(format!("{nonce}.lock"));
        match open_existing(&path) {
            Ok(file) => match try_lock(&file) {
                Ok(true) => {
                    // Ours now, and nobody will ever lock it again: tidy up.
                    let _ = std::fs::remove_file(&path);
                    true
                }
                _ => false,
            },
            // No lock file: the owner exited (and removed it) or was swept. Only an owner written
            // by a release without lock files may still run; it is judged by its pid, as then.
            Err(e) if e.kind() == io::ErrorKind::NotFound => pid.parse::<u32>().is_ok_and(|pid| {
                pid == std::process::id() || !Path::new("/proc").join(pid.to_string()).exists()
            }),
            Err(_) => false,
        }
    }

    /// Removes the lock files of processes that are gone, so the directory does not grow with
    /// every `keyrotd rotate` that was killed.
    fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path == self.lock || path.extension().is_none_or(|e| e != "lock") {
                continue;
            }
            if let Ok(file) = open_existing(&path) {
                if try_lock(&file).unwrap_or(false) {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.lock);
    }
}

fn open_existing(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
}

/// Takes an exclusive lock without waiting: `Ok(false)` if another open file holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// This host's name (as the kernel has it), `unknown` if unreadable.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_owner_is_alive_and_a_dropped_one_is_dead() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let me = Liveness::acquire(&db).unwrap();
        let other = Liveness::acquire(&db).unwrap();
        assert!(!me.is_dead(other.owner()), "its lock is held");
        assert!(!me.is_dead(me.owner()));
        let gone = other.owner().to_owned();
        drop(other);
        assert!(me.is_dead(&gone), "its lock file is gone");
    }

    #[test]
    fn a_pid_that_exists_elsewhere_does_not_make_a_dead_owner_alive() {
        // A process killed without cleanup leaves its file; its pid (here: pid 1, which always
        // exists) may name an unrelated process in our namespace. The free lock decides.
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let me = Liveness::acquire(&db).unwrap();
        let owners = dir.path().join("state.db.owners");
        std::fs::write(owners.join("0123abcd.lock"), "").unwrap();
        let host = hostname();
        assert!(me.is_dead(&format!("{host}:1:0123abcd")));
        assert!(!owners.join("0123abcd.lock").exists(), "swept once dead");
    }

    #[test]
    fn other_hosts_and_odd_names_are_never_judged_dead() {
        let dir = tempfile::tempdir().unwrap();
        let me = Liveness::acquire(&dir.path().join("state.db")).unwrap();
        assert!(!me.is_dead("another-host:4194305:0123"));
        assert!(!me.is_dead(&format!("{}:1:../../etc/passwd", hostname())));
        assert!(!me.is_dead("garbage"));
    }

    #[test]
    fn acquiring_sweeps_the_files_of_dead_owners() {
        let dir = tempfile::tempdir().unwrap();
        let owners = dir.path().join("state.db.owners");
        std::fs::create_dir(&owners).unwrap();
        std::fs::write(owners.join("dead.lock"), "").unwrap();
        let _me = Liveness::acquire(&dir.path().join("state.db")).unwrap();
        assert!(!owners.join("dead.lock").exists());
    }
}
