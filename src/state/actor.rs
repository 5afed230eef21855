//! Who writes a rotation and its journal: the daemon, or a person through the command line.
//!
//! An actor is stored once, as its canonical JSON in the `actors` table, and each rotation and
//! journal row refers to it by id: a few bytes per row, whatever the description's length.
//!
//! Invariant: an actor holds identities only (host, pid, version, uid, user names, tty), never
//! the environment or anything secret; `SUDO_USER` is the one variable read.

use serde::Serialize;

/// The process writing to the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Actor {
    /// `keyrotd run`.
    Daemon {
        /// The host name.
        host: String,
        /// The daemon's process id.
        pid: u32,
        /// keyrotd's version.
        version: String,
    },
    /// A person running `keyrotd rotate` or `keyrotd adopt`.
    Cli {
        /// The host name.
        host: String,
        /// The real user id.
        uid: u32,
        /// That user's name, if the password database knows it.
        user: Option<String>,
        /// `SUDO_USER`, when the command runs under sudo: the person behind root.
        sudo_user: Option<String>,
        /// The terminal on stdin, if any (`/dev/pts/3`).
        tty: Option<String>,
    },
}

impl Actor {
    /// This process as the daemon.
    pub fn daemon() -> Self {
        Self::Daemon {
            host: crate::liveness::hostname(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// This process as a command run by a person.
    pub fn cli() -> Self {
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        Self::Cli {
            host: crate::liveness::hostname(),
            uid,
            user: user_name(uid),
            sudo_user: std::env::var("SUDO_USER").ok().filter(|u| !u.is_empty()),
            tty: tty(),
        }
    }

    /// The canonical description stored and hashed: JSON with fields in declaration order.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an actor serializes")
    }
}

/// The user name of `uid` from the password database.
fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: an all-zero passwd is a valid value to be overwritten.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the call and `buf.len()` is its size.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

/// The terminal on stdin, if it is one.
fn tty() -> Option<String> {
    let mut buf = [0 as libc::c_char; 256];
    // SAFETY: `buf` is valid for `buf.len()` bytes; ttyname_r fails cleanly on a non-terminal.
    let rc = unsafe { libc::ttyname_r(0, buf.as_mut_ptr(), buf.len()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated path.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actors_serialize_canonically_with_their_kind() {
        let daemon = Actor::daemon().to_json();
        assert!(
            daemon.starts_with(r#"{"kind":"daemon","host":"#),
            "{daemon}"
        );
        assert!(daemon.contains(&format!(r#""pid":{}"#, std::process::id())));
        let cli = Actor::cli();
        let Actor::Cli { uid, .. } = &cli else {
            panic!("a cli actor")
        };
        // SAFETY: getuid has no preconditions.
        assert_eq!(*uid, unsafe { libc::getuid() });
        assert!(cli.to_json().starts_with(r#"{"kind":"cli","host":"#));
        assert_eq!(cli.to_json(), cli.clone().to_json(), "stable");
    }
}
