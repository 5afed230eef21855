//! `exec` and `systemd` hooks: a program run without a shell, in its own process group, with a
//! cleared environment. On timeout the whole group is killed with SIGKILL.
//!
//! Output: stdout and stderr are drained and counted but never kept. A consumer's reload command
//! may print what it read, including the secret, so only the exit status and byte counts are
//! reported (and journaled); an operator who needs the output runs the command by hand.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::{HookError, HookInput};

/// The environment variable that carries public attribute `name`: `KEYROTD_ATTR_` and the name
/// upper-cased, each character other than A-Z 0-9 replaced by `_`.
pub fn env_name(name: &str) -> String {
    let upper: String = name
        .chars()
        .map(|c| match c.to_ascii_uppercase() {
            c @ ('A'..='Z' | '0'..='9') => c,
            _ => '_',
        })
        .collect();
    format!("KEYROTD_ATTR_{upper}")
}

/// The whole environment of an `exec` hook: the configured variables, the ids and the public
/// attributes of the new credential.
pub(super) fn environment(
    configured: &std::collections::BTreeMap<String, String>,
    input: HookInput<'_>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = configured
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.push(("KEYROTD_CREDENTIAL_ID".into(), input.credential_id.into()));
    env.push(("KEYROTD_ROTATION_ID".into(), input.rotation_id.into()));
    env.extend(input.attrs.iter().map(|(k, v)| (env_name(k), v.clone())));
    env
}

/// Runs `command` (program, then arguments) with exactly `env`, within `timeout`.
pub(super) async fn run(
    command: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<String, HookError> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| HookError::Failed("no command".into()))?;
    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| HookError::Failed(format!("cannot start {program}: {e}")))?;
    // Killed with its whole group if this attempt is dropped before the command exits (the
    // timeout, or shutdown interrupting the step).
    let mut group = Group(child.id().and_then(|id| i32::try_from(id).ok()));
    let mut stdout = Reader(tokio::spawn(count(child.stdout.take())));
    let mut stderr = Reader(tokio::spawn(count(child.stderr.take())));
    let Ok(status) = tokio::time::timeout(timeout, child.wait()).await else {
        drop(group);
        // Also the command itself, should it have left its group.
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Err(HookError::Timeout(timeout));
    };
    let status = status.map_err(|e| HookError::Failed(format!("waiting for {program}: {e}")))?;
    // It exited: whatever it left running in its group is its business.
    group.0 = None;
    // A child left behind may hold the pipes open: count what came within a moment, no longer.
    let grace = Duration::from_millis(200);
    let out = tokio::time::timeout(grace, &mut stdout.0)
        .await
        .ok()
        .and_then(Result::ok);
    let err = tokio::time::timeout(grace, &mut stderr.0)
        .await
        .ok()
        .and_then(Result::ok);
    let output = format!(
        "{} bytes on stdout, {} on stderr (not logged)",
        out.map_or("?".into(), |n| n.to_string()),
        err.map_or("?".into(), |n| n.to_string())
    );
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(format!("{program} exited 0; {output}")),
        (Some(code), _) => Err(HookError::Failed(format!(
            "{program} exited with status {code}; {output}"
        ))),
        (None, signal) => Err(HookError::Failed(format!(
            "{program} was killed by signal {}; {output}",
            signal.unwrap_or_default()
        ))),
    }
}

/// Drains `pipe`, returning how many bytes it carried.
async fn count(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> u64 {
    let mut total = 0u64;
    if let Some(mut pipe) = pipe {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = pipe.read(&mut buf).await {
            total += n as u64;
        }
    }
    total
}

/// The hook's process group, killed (SIGKILL) when dropped unless cleared.
struct Group(Option<i32>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.filter(|&g| g > 1) {
            // SAFETY: kill(2) with a negative pid signals that process group; no memory is
            // involved.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

/// A task draining one pipe, stopped when dropped.
struct Reader(tokio::task::JoinHandle<u64>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}
