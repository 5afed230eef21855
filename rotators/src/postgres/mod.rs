//! The `postgres_password` rotator: the password of a PostgreSQL login role.
//!
//! keyrotd logs in with an admin connection string (always a secret reference) and changes the
//! target role's password with `ALTER ROLE "role" PASSWORD 'SCRAM-SHA-256$...'`. The SCRAM
//! verifier is computed here, so the plain password never travels to the server and never appears
//! in its statement log. Two strategies:
//!
//! - `single`: one role; its password changes in place. Consumers holding the old password fail
//!   until they re-read the store, so `abandon` puts the current password back.
//! - `alternating`: two roles (`roles = ["app_a", "app_b"]`); each rotation sets the password of
//!   the role that is *not* published, verifies it, and the store then publishes that role's user
//!   name and password together. Consumers never hold a password that stops working before they
//!   re-read the store. `revoke` may scramble the idle role's password after the grace period.
//!
//! `revoke` scrambles the role named by the *old* credential without checking the store: it relies
//! on the engine never starting the next rotation before the previous one's revoke is done (the
//! engine keeps a promoted rotation open through its grace period), since the next alternating
//! rotation gives that very role a new, published password.
//!
//! Every connection has `connect_timeout` for its TCP, TLS and login handshake, and each
//! operation (resolving the admin DSN, connecting, the statement) is bounded by `timeout`, which
//! the server also enforces as the `ALTER ROLE` session's `statement_timeout`, so a statement
//! stuck behind a lock is cancelled there too. A server that accepts the connection and never
//! answers fails the step as transient, and the dropped client closes its connection.
//!
//! TLS uses rustls with the public web roots plus `sslrootcert`; the certificate and host name
//! are always verified (libpq's `verify-full`), and an untrusted certificate is a permanent
//! error. `sslmode` defaults to `require`; `prefer` and `disable` are accepted only to a loopback
//! host or a Unix socket. The admin connection uses the admin DSN's own `sslmode` under the same
//! rule: to any other host its `prefer` (also libpq's default) is taken as `require`, and
//! `disable` is refused, so no password ever crosses a network in clear text.
//!
//! Invariant: neither the generated password nor the admin DSN's password is ever logged or put in
//! an error message; errors carry the operation, the role and the server's SQLSTATE.
//!
//! Admin connections are pooled per admin target (the resolved admin DSN and `sslrootcert`) and
//! shared by every credential using it: at most `admin_connections` (the largest asked for)
//! at once, closed after a minute unused, and one that fails is closed rather than reused. The
//! `verify` login as the rotated role is always a connection of its own.
//!
//! Files: `config` holds [`PostgresConfig`] and its validation, `connect` the connections (TLS,
//! timeouts, driver errors), `pool` the admin connection pools, `sql` the `ALTER ROLE` statement, `usage` the in-use check (`pg_stat_activity`), and this file the strategies and
//! the [`Rotator`] implementation.

mod config;
mod connect;
mod pool;
mod sql;
mod usage;

use std::time::Duration;

use async_trait::async_trait;
use tokio_postgres_rustls::MakeRustlsConnect;

pub use self::config::{PostgresConfig, SslMode, Strategy};
use self::connect::tls_config;
use crate::random::{generate, Alphabet};
use keyrotd_plugin::{
    Attrs, Credential, Permissions, ProviderError, Rotator, StepContext, UsageReport,
};

/// Attribute naming the role a credential logs in as.
pub const USERNAME_ATTR: &str = "username";

/// The `postgres_password` rotator.
pub struct PostgresRotator {
    config: PostgresConfig,
    tls: MakeRustlsConnect,
}

impl std::fmt::Debug for PostgresRotator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresRotator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PostgresRotator {
    /// Builds the rotator from a configuration; validates it and loads `sslrootcert`.
    pub fn new(config: PostgresConfig) -> Result<Self, String> {
        config.validate()?;
        let tls = MakeRustlsConnect::new(tls_config(config.sslrootcert.as_deref())?);
        Ok(Self { config, tls })
    }

    /// Sets `role`'s password to a random value nobody knows.
    async fn scramble(&self, op: &str, role: &str) -> Result<(), ProviderError> {
        self.set_password(
            op,
            role,
            &generate(self.config.length.max(32), Alphabet::Alphanumeric),
        )
        .await
    }

    fn single_role(&self) -> &str {
        self.config
            .role
            .as_deref()
            .expect("validated: single has a role")
    }

    fn alternating_roles(&self) -> (&str, &str) {
        let roles = self
            .config
            .roles
            .as_deref()
            .expect("validated: alternating has two roles");
        (&roles[0], &roles[1])
    }

    /// The role a new credential is for, given what the store holds now.
    fn next_role(&self, current: Option<&Credential>) -> &str {
        match self.config.strategy {
            Strategy::Single => self.single_role(),
            Strategy::Alternating => {
                let (a, b) = self.alternating_roles();
                let published = current
                    .and_then(|c| c.attrs.get(USERNAME_ATTR))
                    .map(String::as_str);
                if published == Some(a) {
                    b
                } else {
                    a
                }
            }
        }
    }

    /// The role of a credential this rotator issued; checks that it is one of the configured ones.
    fn role_of<'a>(&'a self, op: &str, attrs: &'a Attrs) -> Result<&'a str, ProviderError> {
        let role = attrs.get(USERNAME_ATTR).ok_or_else(|| {
            ProviderError::permanent(format!(
                "{op}: the credential has no `{USERNAME_ATTR}` attribute"
            ))
        })?;
        let known = match self.config.strategy {
            Strategy::Single => role == self.single_role(),
            Strategy::Alternating => {
                let (a, b) = self.alternating_roles();
                role == a || role == b
            }
        };
        if !known {
            return Err(ProviderError::permanent(format!(
                "{op}: role \"{role}\" is not one this rotator manages"
            )));
        }
        Ok(role)
    }
}

#[async_trait]
impl Rotator for PostgresRotator {
    fn kind(&self) -> &'static str {
        "postgres_password"
    }

    fn secret_field(&self) -> &str {
        "password"
    }

    fn public_attrs(&self) -> &'static [&'static str] {
        &[USERNAME_ATTR]
    }

    fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// The admin role's SQL privileges on the rotated roles (see `sql`), and reading `admin_dsn`.
    fn permissions(&self) -> Permissions {
        let roles = match self.config.strategy {
            Strategy::Single => vec![self.single_role()],
            Strategy::Alternating => {
                let (a, b) = self.alternating_roles();
                vec![a, b]
            }
        };
        let mut permissions = self.sql_permissions(&roles);
        permissions.extend(crate::resolve::permissions(
            &self.config.admin_dsn,
            &["admin_dsn"],
        ));
        permissions
    }

    async fn issue(
        &self,
        _ctx: StepContext<'_>,
        current: Option<&Credential>,
    ) -> Result<Credential, ProviderError> {
        let role = self.next_role(current);
        Ok(Credential {
            secret: generate(self.config.length, Alphabet::Alphanumeric),
            attrs: Attrs::from([(USERNAME_ATTR.to_owned(), role.to_owned())]),
        })
    }

    async fn activate(
        &self,
        _ctx: StepContext<'_>,
        new: &Credential,
        current: Option<&Credential>,
    ) -> Result<(), ProviderError> {
        let role = self.role_of("activate", &new.attrs)?;
        if self.config.strategy == Strategy::Alternating
            && current
                .and_then(|c| c.attrs.get(USERNAME_ATTR))
                .map(String::as_str)
                == Some(role)
        {
            // Changing the published role's password would cut its consumers off.
            return Err(ProviderError::permanent(format!(
                "activate: role \"{role}\" is the published one; alternating rotation only changes the idle role"
            )));
        }
        // Setting the same password again is harmless, so a re-run simply repeats the ALTER ROLE.
        self.set_password("activate", role, &new.secret).await
    }

    async fn verify(&self, _ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError> {
        let role = self.role_of("verify", &new.attrs)?;
        self.try_login("verify", role, &new.secret).await
    }

    async fn abandon(
        &self,
        _ctx: StepContext<'_>,
        issued: Option<&Attrs>,
        current: Option<&Credential>,
    ) -> Result<(), ProviderError> {
        match self.config.strategy {
            Strategy::Single => {
                let role = self.single_role();
                match current {
                    // Consumers hold `current`: make it work again, whatever activate did.
                    Some(current) => self.set_password("abandon", role, &current.secret).await,
                    // Nobody holds a working password; make sure the discarded one stops working.
                    None => self.scramble("abandon", role).await,
                }
            }
            Strategy::Alternating => {
                let published = current
                    .and_then(|c| c.attrs.get(USERNAME_ATTR))
                    .map(String::as_str);
                let idle = match issued.and_then(|a| a.get(USERNAME_ATTR)) {
                    Some(_) => self.role_of("abandon", issued.expect("checked above"))?,
                    None => self.next_role(current),
                };
                if Some(idle) == published {
                    // Never touch the role consumers use.
                    return Ok(());
                }
                self.scramble("abandon", idle).await
            }
        }
    }

    async fn revoke(&self, _ctx: StepContext<'_>, old: &Attrs) -> Result<(), ProviderError> {
        // A single role's old password is already gone: activate replaced it in place.
        if self.config.strategy == Strategy::Single || !self.config.scramble_on_revoke {
            return Ok(());
        }
        let role = self.role_of("revoke", old)?;
        self.scramble("revoke", role).await
    }

    /// Only `alternating` has an old role to look at.
    fn checks_use(&self) -> bool {
        self.config.strategy == Strategy::Alternating
    }

    fn use_permissions(&self) -> Permissions {
        self.sessions_permissions()
    }

    async fn last_used(
        &self,
        _ctx: StepContext<'_>,
        old: &Attrs,
        _since: std::time::SystemTime,
    ) -> Result<UsageReport, ProviderError> {
        self.sessions(old).await
    }
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;

    #[test]
    fn alternating_picks_the_idle_role() {
        let r = PostgresRotator::new(
            serde_json::from_str(
                r#"{"admin_dsn":"env:X","strategy":"alternating","roles":["a","b"]}"#,
            )
            .unwrap(),
        )
        .unwrap();
        let cred = |u: &str| Credential {
            secret: SecretString::from("x".to_owned()),
            attrs: Attrs::from([(USERNAME_ATTR.to_owned(), u.to_owned())]),
        };
        assert_eq!(r.next_role(None), "a");
        assert_eq!(r.next_role(Some(&cred("a"))), "b");
        assert_eq!(r.next_role(Some(&cred("b"))), "a");
    }
}
