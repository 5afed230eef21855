//! `signal` hooks: the pid is read from a pid file that must be a regular file opened without
//! following a symlink, owned by root or by keyrotd's user and writable by nobody else, hold one
//! decimal number and name a process other than 0, 1, a group or keyrotd itself. Anyone who
//! could write the pid file could otherwise aim keyrotd's signal at any process.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::HookError;

/// The largest pid file read: a pid and a newline need far less.
const MAX_PID_FILE: u64 = 64;

/// Sends signal `number` (`name`) to the process named by `pid_file`.
pub(super) fn send(pid_file: &Path, name: &str, number: i32) -> Result<String, HookError> {
    let pid = read_pid(pid_file).map_err(HookError::Failed)?;
    if u32::try_from(pid).ok() == Some(std::process::id()) {
        return Err(HookError::Failed(format!(
            "pid file {} names keyrotd itself: refused",
            pid_file.display()
        )));
    }
    // SAFETY: kill(2) with a positive pid (checked > 1) and an allowed signal number.
    if unsafe { libc::kill(pid, number) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(HookError::Failed(format!("SIG{name} to pid {pid}: {e}")));
    }
    Ok(format!("SIG{name} sent to pid {pid}"))
}

/// Reads the pid in `path`: a regular file (never through a symlink, never a FIFO), one decimal
/// number greater than 1.
fn read_pid(path: &Path) -> Result<i32, String> {
    let shown = path.display();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => format!("pid file {shown} is a symlink: refused"),
            _ => format!("pid file {shown}: {e}"),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("pid file {shown}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("pid file {shown} is not a regular file: refused"));
    }
    // SAFETY: geteuid(2) has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "pid file {shown} is owned by uid {}, neither root nor keyrotd's user: refused",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "pid file {shown} is writable by its group or others (mode {:o}): refused",
            meta.mode() & 0o7777
        ));
    }
    let mut text = String::new();
    file.take(MAX_PID_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|_| format!("pid file {shown} does not hold a pid"))?;
    if text.len() as u64 > MAX_PID_FILE {
        return Err(format!("pid file {shown} is longer than a pid: refused"));
    }
    parse_pid(&text).ok_or_else(|| format!("pid file {shown} does not hold a pid greater than 1"))
}

/// One decimal number greater than 1 (0 and 1 are init and the caller's group, negative numbers
/// whole groups), surrounded by whitespace at most.
fn parse_pid(text: &str) -> Option<i32> {
    let digits = text.trim();
    if digits.is_empty() || digits.len() > 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<i32>().ok().filter(|&pid| pid > 1)
}

#[cfg(test)]
mod tests {
    use super::parse_pid;

    #[test]
    fn only_a_plain_pid_above_one_is_accepted() {
        assert_eq!(parse_pid("4242\n"), Some(4242));
        assert_eq!(parse_pid(" 17 "), Some(17));
        for bad in [
            "",
            "0",
            "1",
            "-1",
            "-4242",
            "+5",
            "12 13",
            "0x10",
            "99999999999",
            "2147483648",
            "4242abc",
            "\u{0}",
        ] {
            assert_eq!(parse_pid(bad), None, "{bad:?}");
        }
    }
}
