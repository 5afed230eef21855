//! The in-use check of the `alternating` strategy: sessions of the old role in
//! `pg_stat_activity`, counted on a pooled admin connection. `single` has nothing to check: its
//! old password stops working at `activate`, so its revoke follows the grace period as before.
//!
//! On PostgreSQL 15, checked: a role without `pg_read_all_stats` (nor superuser) sees other
//! roles' sessions in `pg_stat_activity` (their `pid` and `usename`) but with `state`,
//! `backend_start` and `state_change` NULL. Counting works either way; the time of the
//! sessions' last activity needs the grant, which `keyrotd policy` prints.
//!
//! A session is a use right now, whether it runs a query or sits idle: revoking (scrambling) the
//! password does not end it, but its next login would fail.

use std::time::{Duration, SystemTime};

use keyrotd_plugin::permissions::{Permission, SqlGrant};
use keyrotd_plugin::{Attrs, Permissions, ProviderError, Usage, UsageReport};

use super::connect::pg_error;
use super::{pool, PostgresRotator, Strategy};

/// The one statement of the check: the old role's sessions and their latest activity.
const SESSIONS: &str = "SELECT count(*), \
     extract(epoch FROM max(coalesce(state_change, backend_start)))::float8 \
     FROM pg_stat_activity WHERE usename = $1";

impl PostgresRotator {
    /// What the check needs: `pg_read_all_stats` for the sessions' times.
    pub(super) fn sessions_permissions(&self) -> Permissions {
        Permissions::none().need(Permission::Sql(SqlGrant {
            statement: "GRANT pg_read_all_stats TO :\"admin_role\";".into(),
            versions: None,
            why: "last_used (revoke = \"when_unused\") reads the old role's sessions in \
                  pg_stat_activity; without pg_read_all_stats (or superuser) PostgreSQL hides \
                  their state and times from other roles"
                .into(),
        }))
    }

    /// Whether the old role has sessions now.
    pub(super) async fn sessions(&self, old: &Attrs) -> Result<UsageReport, ProviderError> {
        if self.config.strategy == Strategy::Single {
            return Ok(UsageReport::unsupported(
                "postgres_password (strategy single)",
            ));
        }
        let role = self.role_of("last_used", old)?.to_owned();
        let what = format!("last_used: the sessions of role \"{role}\"");
        let (count, latest) = self
            .bounded(&what, async {
                let (admin, target) = self.admin_target("last_used").await?;
                let pool = pool::pool(target, self.config.admin_connections);
                let login = format!("{what}: admin login");
                let conn = pool.checkout(self.connect(&admin, &login)).await?;
                let row = conn
                    .client()
                    .query_one(SESSIONS, &[&role])
                    .await
                    .map_err(|e| pg_error(&what, &e))?;
                conn.release();
                Ok((row.get::<_, i64>(0), row.get::<_, Option<f64>>(1)))
            })
            .await?;
        if count == 0 {
            return Ok(UsageReport::new(
                Usage::Unused,
                format!("no session of role \"{role}\""),
            ));
        }
        let sessions = if count == 1 { "session" } else { "sessions" };
        let active = match latest.filter(|s| s.is_finite() && *s >= 0.0) {
            Some(at) => {
                let at = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(at);
                let ago = SystemTime::now().duration_since(at).unwrap_or_default();
                format!(", last active {} s ago", ago.as_secs())
            }
            None => String::new(),
        };
        // A connected session is a use now, however idle: its next login would fail.
        Ok(UsageReport::new(
            Usage::InUse,
            format!("{count} {sessions} of role \"{role}\" connected{active}"),
        )
        .used_at(Some(SystemTime::now())))
    }
}
