//! Delivery hook runners: one attempt of one configured hook ([`HookSpec`]), bounded by its
//! `timeout`. `exec.rs` runs a command (also `systemctl` for `systemd` hooks), `signal.rs` signals
//! the process of a pid file, `http.rs` calls a reload endpoint. The engine (`engine/notify.rs`)
//! decides when they run, journals them and retries them.
//!
//! Invariants: no secret value reaches a hook's environment, arguments or error; a command's
//! output is counted, never logged or returned (a consumer may print what it read); an attempt
//! never outlives its timeout: on timeout its whole process group is killed. A command that
//! exits in time may leave processes behind (a service it restarted, which may not have left
//! the group); keyrotd does not touch those.

mod exec;
#[cfg(feature = "http")]
mod http;
mod signal;

use std::time::Duration;

use keyrotd_plugin::Attrs;

use crate::config::{HookAction, HookSpec};

pub use exec::env_name;

/// What a hook is told about the rotation: ids and the new credential's public attributes.
#[derive(Debug, Clone, Copy)]
pub struct HookInput<'a> {
    /// The credential's id (`KEYROTD_CREDENTIAL_ID`).
    pub credential_id: &'a str,
    /// The rotation's id (`KEYROTD_ROTATION_ID`).
    pub rotation_id: &'a str,
    /// The new credential's public attributes (`KEYROTD_ATTR_NAME`).
    pub attrs: &'a Attrs,
}

/// Why one attempt of a hook failed. The message names no secret and no output of the hook.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The attempt ran past the hook's timeout (a command's process group is killed).
    #[error("timed out after {0:?} (process group killed where there was one)")]
    Timeout(Duration),
    /// The attempt failed.
    #[error("{0}")]
    Failed(String),
}

/// Runs one attempt of `hook`. Returns a short description of what happened (an exit status and
/// how many bytes of output, a pid, an HTTP status), never the output itself.
pub async fn run(hook: &HookSpec, input: HookInput<'_>) -> Result<String, HookError> {
    match &hook.action {
        HookAction::Exec { command, env } => {
            let env = exec::environment(env, input);
            exec::run(command, &env, hook.timeout).await
        }
        HookAction::Systemd {
            unit,
            action,
            systemctl,
        } => {
            let command = [
                systemctl.display().to_string(),
                (*action).to_owned(),
                "--".to_owned(),
                unit.clone(),
            ];
            exec::run(&command, &[], hook.timeout).await
        }
        HookAction::Signal {
            pid_file,
            name,
            number,
        } => {
            // Reading the pid file is blocking file I/O (a hung network filesystem): off the
            // runtime's workers, and bounded by the hook's timeout.
            let (path, name, number) = (pid_file.clone(), (*name).to_owned(), *number);
            let send = tokio::task::spawn_blocking(move || signal::send(&path, &name, number));
            match tokio::time::timeout(hook.timeout, send).await {
                Ok(Ok(result)) => result,
                Ok(Err(e)) => Err(HookError::Failed(format!("signal hook: {e}"))),
                Err(_) => Err(HookError::Timeout(hook.timeout)),
            }
        }
        HookAction::Http {
            method,
            url,
            headers,
            secret_headers,
        } => {
            #[cfg(feature = "http")]
            {
                let request = http::Request {
                    method,
                    url,
                    headers,
                    secret_headers,
                };
                // One deadline for the whole attempt: reading the secret headers and the request.
                tokio::time::timeout(hook.timeout, http::send(&request, hook.timeout))
                    .await
                    .unwrap_or(Err(HookError::Timeout(hook.timeout)))
            }
            // Refused at load time without the feature.
            #[cfg(not(feature = "http"))]
            {
                let _ = (method, url, headers, secret_headers);
                Err(HookError::Failed(
                    "http hooks need the `http` feature".into(),
                ))
            }
        }
    }
}
