//! The one statement the rotator runs: `ALTER ROLE ... PASSWORD` with a SCRAM-SHA-256 verifier
//! computed here, under a server-side `statement_timeout`, on a pooled admin connection.
//!
//! Invariants: the plain password never travels to the server nor appears in its statement log;
//! the server cancels a statement still waiting shortly *before* keyrotd gives up on it, so a
//! password is never set after the step was reported failed.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::connect::pg_error;
use super::pool;
use super::PostgresRotator;
use keyrotd_plugin::permissions::{Permission, SqlGrant};
use keyrotd_plugin::{Permissions, ProviderError};

/// How long before the step's deadline the server must cancel an `ALTER ROLE` still waiting, so
/// its cancellation reaches keyrotd before keyrotd gives up on the statement.
const SERVER_CANCEL_MARGIN: Duration = Duration::from_millis(250);

impl PostgresRotator {
    /// Sets `role`'s password through a pooled admin connection, as a client-side SCRAM
    /// verifier.
    pub(super) async fn set_password(
        &self,
        op: &str,
        role: &str,
        password: &SecretString,
    ) -> Result<(), ProviderError> {
        let what = format!("{op}: setting the password of role \"{role}\"");
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        self.bounded(&what, async {
            let (admin, target) = self.admin_target(op).await?;
            let pool = pool::pool(target, self.config.admin_connections);
            let login = format!("{what}: admin login");
            let verifier =
                postgres_protocol::password::scram_sha_256(password.expose_secret().as_bytes());
            loop {
                let conn = pool.checkout(self.connect(&admin, &login)).await?;
                // The server cancels the statement itself, shortly *before* keyrotd gives up on
                // it: an ALTER ROLE queued behind a lock must never set the password after
                // keyrotd reported the step failed (and maybe rolled back), and closing the
                // socket does not stop a waiting backend. Set on every use: the connection is
                // shared.
                let left = deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .saturating_sub(SERVER_CANCEL_MARGIN);
                if left.is_zero() {
                    return Err(ProviderError::no_answer(&what, self.config.timeout));
                }
                let sql = format!(
                    "SET statement_timeout = {}; ALTER ROLE {} PASSWORD {}",
                    left.as_millis().max(1),
                    quote_ident(role),
                    quote_literal(&verifier)
                );
                match conn.client().batch_execute(&sql).await {
                    Ok(()) => {
                        conn.release();
                        return Ok(());
                    }
                    // A pooled connection may have died while idle (terminated by an operator,
                    // a server restart): try again on a new one, within the same deadline.
                    // ALTER ROLE to the same verifier is idempotent, so a repeat is harmless.
                    Err(e) if conn.reused && connection_lost(&e) => {
                        conn.release();
                        pool.discard_idle();
                        tracing::debug!("{what}: a pooled admin connection was lost; reconnecting");
                    }
                    // Dropping the connection closes it: only a successful one is reused.
                    Err(e) => return Err(pg_error(&what, &e)),
                }
            }
        })
        .await
    }
}

/// The role keyrotd's admin connection logs in as, in the SQL of `keyrotd policy`: a psql
/// variable, since its name is in the admin DSN, a secret `policy` does not read.
const ADMIN_ROLE: &str = ":\"admin_role\"";

impl PostgresRotator {
    /// What [`PostgresRotator::set_password`] needs of the admin role, for `keyrotd policy`: the
    /// privilege to set the password of each of `roles` and nothing else. The rotator runs no
    /// other statement as the admin role.
    pub(super) fn sql_permissions(&self, roles: &[&str]) -> Permissions {
        let names: Vec<String> = roles.iter().map(|r| quote_ident(r)).collect();
        let mut permissions = Permissions::none().need(Permission::Sql(SqlGrant {
            statement: format!("ALTER ROLE {ADMIN_ROLE} WITH LOGIN CREATEROLE;"),
            versions: None,
            why: format!(
                "activate, abandon and revoke set the password of {} with ALTER ROLE ... PASSWORD, \
                 which needs CREATEROLE; LOGIN for the admin connection itself",
                names.join(" and ")
            ),
        }));
        for name in &names {
            permissions = permissions.need(Permission::Sql(SqlGrant {
                statement: format!(
                    "GRANT {name} TO {ADMIN_ROLE} WITH ADMIN OPTION, INHERIT FALSE, SET FALSE;"
                ),
                versions: Some("PostgreSQL 16 and newer"),
                why: format!(
                    "since PostgreSQL 16, CREATEROLE changes only roles it has ADMIN OPTION on; \
                     INHERIT FALSE and SET FALSE keep {name}'s own privileges from the admin role"
                ),
            }));
        }
        permissions
            .need(Permission::Text(
                "the admin role needs CONNECT on the admin DSN's database (PUBLIC has it by \
                 default)"
                    .into(),
            ))
            .need(Permission::Text(format!(
                "verify logs in as {} with the new password: it needs LOGIN and CONNECT on the \
                 database it logs in to{}",
                names.join(" and "),
                if self.config.probe_query.is_some() {
                    ", and whatever `probe_query` reads"
                } else {
                    ""
                }
            )))
            .note(
                "on PostgreSQL 15 and older, CREATEROLE alone can change the password of any role \
                 that is not a superuser: no narrower grant exists there",
            )
    }
}

/// Whether `e` says the connection is gone (rather than the statement failing): a closed socket,
/// or the server's connection-exception and shutdown codes. Not `57014` (a cancelled statement:
/// the deadline, which must fail the step).
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        None => true,
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        }
    }
}

/// `"name"` with embedded quotes doubled: safe for any role name.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'value'` with embedded quotes doubled (a SCRAM verifier has none, but be safe).
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers_and_literals() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
