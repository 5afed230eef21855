//! The `postgres_password` rotator's configuration: the admin DSN reference, the strategy and its
//! roles, where and how the target role logs in, and the timeouts.
//!
//! Invariant: a configuration that names its `host` passes [`PostgresConfig::validate`] only if
//! its `sslmode` cannot send a password in clear text over a network; without `host`, the admin
//! DSN's hosts are checked at every connection instead.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tokio_postgres::config::Host;

use super::connect::is_local;
use crate::timeouts::{self, Timeouts};
use keyrotd_plugin::reference::SecretRef;

/// Configuration of the `postgres_password` rotator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// The admin connection string (key/value or URL form), as a secret reference.
    pub admin_dsn: SecretRef,
    /// `single` (one role) or `alternating` (two roles, zero downtime).
    pub strategy: Strategy,
    /// The role whose password rotates (`single`).
    #[serde(default)]
    pub role: Option<String>,
    /// The two roles used in turn (`alternating`).
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    /// Host the target role logs in to; defaults to the admin DSN's host(s).
    #[serde(default)]
    pub host: Option<String>,
    /// Port the target role logs in to; defaults to the admin DSN's port.
    #[serde(default)]
    pub port: Option<u16>,
    /// Database the target role logs in to; defaults to the admin DSN's database.
    #[serde(default)]
    pub dbname: Option<String>,
    /// TLS for the target role's login (`require`, the default; `prefer` or `disable` only to
    /// a loopback host or a Unix socket).
    #[serde(default)]
    pub sslmode: SslMode,
    /// A PEM file of CA certificates trusted for TLS besides the public web roots.
    #[serde(default)]
    pub sslrootcert: Option<PathBuf>,
    /// A statement run by `verify` after logging in with the new password.
    #[serde(default)]
    pub probe_query: Option<String>,
    /// Length of generated passwords (16 to 1024).
    #[serde(default = "default_length")]
    pub length: usize,
    /// `alternating`: whether `revoke` sets the idle role's password to an unknown random value.
    #[serde(default = "default_true")]
    pub scramble_on_revoke: bool,
    /// How many admin connections the credentials sharing this admin DSN may hold open at once
    /// (1 to 64; the largest value among them applies). Idle ones close after a minute.
    #[serde(default = "default_admin_connections")]
    pub admin_connections: usize,
    /// The longest wait for one connection, TLS and login included (`"10s"`). A
    /// `connect_timeout` in the admin DSN may shorten it for the admin connection.
    #[serde(
        default = "timeouts::default_connect",
        deserialize_with = "timeouts::duration"
    )]
    pub connect_timeout: Duration,
    /// The longest one step may wait for the server (`"60s"`); also each statement's
    /// `statement_timeout`.
    #[serde(
        default = "timeouts::default_call",
        deserialize_with = "timeouts::duration"
    )]
    pub timeout: Duration,
}

fn default_length() -> usize {
    32
}

fn default_admin_connections() -> usize {
    4
}

fn default_true() -> bool {
    true
}

/// How a password is rotated.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// One role, password changed in place.
    Single,
    /// Two roles used in turn.
    Alternating,
}

/// TLS policy for the target role's login, with libpq's names.
///
/// `require` is the default and verifies the certificate and the host name (libpq's
/// `verify-full`), against the public web roots and `sslrootcert`. `prefer` and `disable` are
/// allowed only to a loopback host or a Unix socket: over a network, a client that accepts a
/// plain connection lets an attacker in the middle strip TLS and ask for the password in clear
/// text, during `verify` (the new password) as on the admin connection (the admin's).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SslMode {
    /// Never use TLS (loopback and Unix sockets only).
    Disable,
    /// Use TLS when the server offers it (loopback and Unix sockets only).
    Prefer,
    /// Refuse to log in without TLS, and verify the server's certificate and name.
    #[default]
    Require,
}

impl PostgresConfig {
    /// Checks what can be checked without a connection; the error names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let check_role = |field: &str, role: &str| {
            if role.is_empty() || role.len() > 63 || role.contains('\0') {
                Err(format!(
                    "{field}: `{role}` is not a valid role name (1 to 63 bytes)"
                ))
            } else {
                Ok(())
            }
        };
        match self.strategy {
            Strategy::Single => {
                let role = self
                    .role
                    .as_deref()
                    .ok_or("role: required by strategy \"single\"")?;
                check_role("role", role)?;
                if self.roles.is_some() {
                    return Err("roles: only for strategy \"alternating\"; use `role`".into());
                }
            }
            Strategy::Alternating => {
                let roles = self
                    .roles
                    .as_deref()
                    .ok_or("roles: required by strategy \"alternating\"")?;
                if roles.len() != 2 || roles[0] == roles[1] {
                    return Err("roles: must name exactly two different roles".into());
                }
                for role in roles {
                    check_role("roles", role)?;
                }
                if self.role.is_some() {
                    return Err("role: only for strategy \"single\"; use `roles`".into());
                }
            }
        }
        if !(16..=1024).contains(&self.length) {
            return Err(format!(
                "length: must be between 16 and 1024, got {}",
                self.length
            ));
        }
        if !(1..=64).contains(&self.admin_connections) {
            return Err(format!(
                "admin_connections: must be between 1 and 64, got {}",
                self.admin_connections
            ));
        }
        if self.port == Some(0) {
            return Err("port: must not be 0".into());
        }
        if self.host.as_deref() == Some("") || self.dbname.as_deref() == Some("") {
            return Err("host/dbname: must not be empty when given".into());
        }
        if self
            .probe_query
            .as_deref()
            .is_some_and(|q| q.trim().is_empty())
        {
            return Err("probe_query: must not be empty when given".into());
        }
        if let Some(path) = &self.sslrootcert {
            if !path.is_absolute() {
                return Err(format!(
                    "sslrootcert: must be absolute, got `{}`",
                    path.display()
                ));
            }
        }
        // Without `host` the login goes to the admin DSN's hosts, known only once the secret is
        // read: `forbid_plain_text_over_network` checks them at every connection.
        if let Some(host) = self.host.as_deref() {
            if self.sslmode != SslMode::Require && !is_local(&Host::Tcp(host.to_owned())) {
                return Err(format!(
                    "sslmode: `{}` to `{host}` could send the password in clear text; \
                     `prefer` and `disable` are allowed only to a loopback host \
                     (127.0.0.0/8, ::1, localhost) or a Unix socket: use `require`",
                    self.sslmode.name()
                ));
            }
        }
        timeouts::validate(self.connect_timeout, self.timeout)
    }

    /// The configured `connect_timeout` and `timeout`.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts::new(self.connect_timeout, self.timeout)
    }
}

impl SslMode {
    /// The name as written in the inventory.
    fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml_strategy: &str) -> PostgresConfig {
        serde_json::from_str(toml_strategy).unwrap()
    }

    #[test]
    fn validates_roles_per_strategy() {
        let ok = config(r#"{"admin_dsn":"env:X","strategy":"single","role":"app"}"#);
        assert!(ok.validate().is_ok());
        let missing = config(r#"{"admin_dsn":"env:X","strategy":"single"}"#);
        assert!(missing.validate().unwrap_err().starts_with("role:"));
        let one = config(r#"{"admin_dsn":"env:X","strategy":"alternating","roles":["a"]}"#);
        assert!(one.validate().unwrap_err().starts_with("roles:"));
        let same = config(r#"{"admin_dsn":"env:X","strategy":"alternating","roles":["a","a"]}"#);
        assert!(same.validate().unwrap_err().starts_with("roles:"));
        let short = config(r#"{"admin_dsn":"env:X","strategy":"single","role":"a","length":8}"#);
        assert!(short.validate().unwrap_err().starts_with("length:"));
        assert!(serde_json::from_str::<PostgresConfig>(
            r#"{"admin_dsn":"postgres://u:p@h/db","strategy":"single","role":"a"}"#
        )
        .is_err());
    }

    #[test]
    fn plain_text_modes_only_to_loopback_at_check_time() {
        let with = |host: &str, sslmode: Option<&str>| {
            let mut c = config(&format!(
                r#"{{"admin_dsn":"env:X","strategy":"single","role":"a","host":"{host}"}}"#
            ));
            if let Some(mode) = sslmode {
                c.sslmode = serde_json::from_value(serde_json::json!(mode)).unwrap();
            }
            c.validate()
        };
        assert_eq!(
            config(r#"{"admin_dsn":"env:X","strategy":"single","role":"a"}"#).sslmode,
            SslMode::Require,
            "require is the default"
        );
        for host in ["db.example.com", "10.1.2.3", "::ffff:10.1.2.3"] {
            for mode in ["disable", "prefer"] {
                let e = with(host, Some(mode)).unwrap_err();
                assert!(
                    e.starts_with("sslmode:") && e.contains("clear text"),
                    "{host} {mode}: {e}"
                );
            }
            assert!(with(host, None).is_ok());
            assert!(with(host, Some("require")).is_ok());
        }
        for host in ["127.0.0.1", "localhost", "::1"] {
            assert!(with(host, Some("disable")).is_ok(), "{host}");
            assert!(with(host, Some("prefer")).is_ok(), "{host}");
        }
    }
}
