//! The one statement the rotator runs: `ALTER ROLE ... PASSWORD` with a SCRAM-SHA-256 verifier
//! computed here, under a server-side `statement_timeout`.
//!
//! Invariants: the plain password never travels to the server nor appears in its statement log;
//! the server cancels a statement still waiting shortly *before* keyrotd gives up on it, so a
//! password is never set after the step was reported failed.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::connect::pg_error;
use super::PostgresRotator;
use keyrotd_plugin::ProviderError;

/// How long before the step's deadline the server must cancel an `ALTER ROLE` still waiting, so
/// its cancellation reaches keyrotd before keyrotd gives up on the statement.
const SERVER_CANCEL_MARGIN: Duration = Duration::from_millis(250);

impl PostgresRotator {
    /// Sets `role`'s password through the admin connection, as a client-side SCRAM verifier.
    pub(super) async fn set_password(
        &self,
        op: &str,
        role: &str,
        password: &SecretString,
    ) -> Result<(), ProviderError> {
        let what = format!("{op}: setting the password of role \"{role}\"");
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        self.bounded(&what, async {
            let admin = self.admin_config(op).await?;
            let client = self
                .connect(&admin, &format!("{what}: admin login"))
                .await?;
            let verifier =
                postgres_protocol::password::scram_sha_256(password.expose_secret().as_bytes());
            // The server cancels the statement itself, shortly *before* keyrotd gives up on it:
            // an ALTER ROLE queued behind a lock must never set the password after keyrotd
            // reported the step failed (and maybe rolled back), and closing the socket does not
            // stop a waiting backend.
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
            client
                .batch_execute(&sql)
                .await
                .map_err(|e| pg_error(&what, &e))
        })
        .await
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
