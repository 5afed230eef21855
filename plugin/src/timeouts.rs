//! How long a plugin waits for its server: the meaning and bounds of the `connect_timeout` and
//! `timeout` fields of every plugin that talks to one (`aws_iam_access_key`,
//! `aws_secrets_manager`, `postgres_password`, `http`).
//!
//! A provider behind a silent network partition accepts the TCP connection and never answers.
//! Without a bound, the step waiting for it, and the rotation, would hang for good. Two bounds
//! apply to each plugin:
//!
//! - `connect_timeout` (default 10s): establishing one connection, TLS and the protocol's
//!   handshake included;
//! - `timeout` (default 60s): one protocol step at this plugin, every call and retry in it
//!   included. A `aws-sm:` secret reference the plugin resolves during the step shares it.
//!
//! The plugin sets both on its client, so a call that gets no answer fails and closes its
//! connection. The daemon's engine also enforces [`Rotator::timeout`](crate::Rotator::timeout)
//! and [`Store::timeout`](crate::Store::timeout) around each step, so the deadline holds even
//! for a plugin that forgets its own: the step fails as a transient error and is retried with
//! backoff. Local plugins (`random`, `file`) take no fields and get [`DEFAULT_TIMEOUT`].

use std::time::Duration;

/// The default `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default `timeout`: the deadline of one step at one plugin.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The shortest accepted value of either field: a remote call has no useful deadline below it.
const MIN: Duration = Duration::from_secs(1);
/// The longest accepted `connect_timeout`.
const MAX_CONNECT: Duration = Duration::from_secs(300);
/// The longest accepted `timeout`: a rotation step that needs longer is stuck.
const MAX_CALL: Duration = Duration::from_secs(3600);

/// A plugin's connect timeout and step deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// The longest wait for one connection (`connect_timeout`).
    pub connect: Duration,
    /// The longest one step may wait for the plugin's server (`timeout`).
    pub call: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: DEFAULT_CONNECT_TIMEOUT,
            call: DEFAULT_TIMEOUT,
        }
    }
}

impl Timeouts {
    /// The timeouts of a plugin's `connect_timeout` and `timeout` fields. A connection is part of
    /// a step, so the connect timeout is capped at the step's deadline (`timeout = "5s"` alone
    /// also connects within 5s).
    pub fn new(connect: Duration, call: Duration) -> Self {
        Self {
            connect: connect.min(call),
            call,
        }
    }
}

/// Checks a plugin's `connect_timeout` and `timeout` fields as written (before any capping); the
/// error starts with the offending field's name.
pub fn validate(connect: Duration, call: Duration) -> Result<(), String> {
    let check = |field: &str, value: Duration, max: Duration| {
        if value < MIN || value > max {
            Err(format!(
                "{field}: must be between {} and {}, got {}",
                describe(MIN),
                describe(max),
                describe(value)
            ))
        } else {
            Ok(())
        }
    };
    check("connect_timeout", connect, MAX_CONNECT)?;
    check("timeout", call, MAX_CALL)
}

/// A duration as the messages print it: `60s`, `1500ms`.
pub fn describe(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_name_the_field() {
        let t = |connect: u64, call: u64| {
            validate(Duration::from_millis(connect), Duration::from_millis(call))
        };
        assert!(t(10_000, 60_000).is_ok());
        assert!(t(1000, 1000).is_ok());
        assert_eq!(
            t(500, 60_000).unwrap_err(),
            "connect_timeout: must be between 1s and 300s, got 500ms"
        );
        assert!(t(10_000, 7_200_000)
            .unwrap_err()
            .starts_with("timeout: must be between 1s and 3600s"));
        let capped = Timeouts::new(Duration::from_secs(10), Duration::from_secs(5));
        assert_eq!(capped.connect, Duration::from_secs(5));
    }
}
