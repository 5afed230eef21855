//! Versioned schema migrations of the SQLite state database.
//!
//! The schema version lives in SQLite's `PRAGMA user_version`. Version 1 is the layout keyrotd
//! shipped before versioning existed: its tables are there but `user_version` is 0, so it is
//! recognised by the presence of the `credentials` table. Every later version is one step in
//! [`STEPS`], applied in order.
//!
//! Invariants:
//! - a migration never drops or rewrites history: steps only add tables, columns and indexes;
//! - all pending steps and the new version number commit in one transaction, taken with the write
//!   lock (`BEGIN IMMEDIATE`), so a crash mid-upgrade leaves the old version intact and two
//!   processes opening at once cannot both migrate;
//! - a database written by a newer keyrotd is refused, never downgraded.
//!
//! To change the schema, append a step and raise [`VERSION`]; never edit a shipped step, since
//! databases in the field have already run it.

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::state::StateError;

/// The schema version this binary reads and writes.
pub const VERSION: i64 = 3;

/// One migration step: brings the schema from its index to its index + 1.
type Migration = fn(&Transaction<'_>) -> rusqlite::Result<()>;

/// Migration `i` migrates version `i` to `i + 1`.
const STEPS: [Migration; VERSION as usize] =
    [v1_initial_layout, v2_meta_and_current_attrs, v3_audit_trail];

/// The unversioned layout keyrotd shipped first. Frozen: databases in the field have it.
fn v1_initial_layout(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "
CREATE TABLE IF NOT EXISTS credentials (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    issued_at INTEGER,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS rotations (
    id TEXT PRIMARY KEY,
    credential_id TEXT NOT NULL,
    trigger TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    phase TEXT NOT NULL,
    new_attrs TEXT,
    old_attrs TEXT,
    revoke_at INTEGER,
    owner TEXT,
    lease_until INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    finished_at INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS one_open_rotation ON rotations(credential_id) WHERE finished_at IS NULL;
CREATE INDEX IF NOT EXISTS rotations_by_credential ON rotations(credential_id, started_at);
CREATE TABLE IF NOT EXISTS steps (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    rotation_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    step TEXT NOT NULL,
    event TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS steps_by_rotation ON steps(rotation_id, seq);
",
    )
}

/// Version 2: a `meta` table holding the database's instance id; on each credential's record,
/// the public attributes of its current value (so revocation never depends on how far back the
/// rotation history goes) and the unknown rotation its store named, while its state is lost.
fn v2_meta_and_current_attrs(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
ALTER TABLE credentials ADD COLUMN current_attrs TEXT;
ALTER TABLE credentials ADD COLUMN state_lost TEXT;
-- The current value is the one the newest promoted (or finished) rotation issued.
UPDATE credentials SET current_attrs = (
    SELECT r.new_attrs FROM rotations r
    WHERE r.credential_id = credentials.id AND r.phase IN ('promoted', 'done')
    ORDER BY r.started_at DESC, r.id DESC LIMIT 1
);
",
    )?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('instance_id', ?1)",
        [uuid::Uuid::now_v7().to_string()],
    )?;
    Ok(())
}

/// Version 3: the audit trail. Actors (stored once, referred to by id from each rotation and
/// journal row), each journal row's trigger and chain hash, and the retention checkpoint; the
/// rows already there are chained in `seq` order (see `chain`).
fn v3_audit_trail(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "
CREATE TABLE actors (
    id INTEGER PRIMARY KEY,
    actor TEXT NOT NULL UNIQUE
);
ALTER TABLE rotations ADD COLUMN actor INTEGER;
ALTER TABLE steps ADD COLUMN actor INTEGER;
ALTER TABLE steps ADD COLUMN trigger TEXT;
ALTER TABLE steps ADD COLUMN hash BLOB;
CREATE TABLE chain_checkpoint (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    pruned INTEGER NOT NULL,
    at INTEGER NOT NULL
);
",
    )?;
    super::chain::chain_existing(tx).map_err(|e| match e {
        StateError::Sqlite(e) => e,
        other => rusqlite::Error::ToSqlConversionFailure(Box::new(other)),
    })
}

/// What [`migrate`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The version the database had (0: empty, 1: the unversioned first layout).
    pub from: i64,
    /// The database's instance id, created with its `meta` table.
    pub instance_id: String,
}

/// Reads the schema version, counting the unversioned first layout as version 1.
pub fn version(conn: &Connection) -> Result<i64, StateError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version == 0 {
        let v1: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'credentials')",
            [],
            |r| r.get(0),
        )?;
        return Ok(i64::from(v1));
    }
    Ok(version)
}

/// Refuses a database written by a newer keyrotd.
pub fn refuse_newer(version: i64) -> Result<(), StateError> {
    if version > VERSION {
        return Err(StateError::TooNew {
            found: version,
            supported: VERSION,
        });
    }
    Ok(())
}

/// Brings the database up to [`VERSION`] in one transaction and returns its instance id.
pub fn migrate(conn: &mut Connection) -> Result<Migrated, StateError> {
    // The common case, a current database, takes no write lock: every `status` and `history`
    // opens the database, and must not contend with a running daemon's writes.
    let found = version(conn)?;
    refuse_newer(found)?;
    if found == VERSION {
        if let Some(instance_id) = instance_id(conn)? {
            return Ok(Migrated {
                from: found,
                instance_id,
            });
        }
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let from = version(&tx)?;
    refuse_newer(from)?;
    for step in &STEPS[from as usize..] {
        step(&tx)?;
    }
    if from < VERSION {
        tx.pragma_update(None, "user_version", VERSION)?;
    }
    let instance_id = instance_id(&tx)?
        .ok_or_else(|| StateError::Corrupt("the meta table has no instance_id".into()))?;
    tx.commit()?;
    Ok(Migrated { from, instance_id })
}

/// The instance id, if the database has one.
pub fn instance_id(conn: &Connection) -> Result<Option<String>, StateError> {
    Ok(conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'instance_id'",
            [],
            |r| r.get(0),
        )
        .optional()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{SqliteState, StateStore};

    /// The exact layout of a database written before versioning, with some history in it.
    fn v1_database(path: &std::path::Path) {
        let mut conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        let tx = conn.transaction().unwrap();
        v1_initial_layout(&tx).unwrap();
        tx.execute_batch(
            "
INSERT INTO credentials (id, status, issued_at, consecutive_failures) VALUES ('db', 'grace', 1700000000, 0);
INSERT INTO rotations (id, credential_id, trigger, started_at, phase, new_attrs, old_attrs, finished_at)
    VALUES ('r1', 'db', 'schedule', 1690000000, 'done', '{\"user\":\"app\"}', NULL, 1690000005);
INSERT INTO rotations (id, credential_id, trigger, started_at, phase, new_attrs, old_attrs, revoke_at)
    VALUES ('r2', 'db', 'manual', 1700000000, 'promoted', '{\"user\":\"app2\"}', '{\"user\":\"app\"}', 1700000600);
INSERT INTO steps (rotation_id, at_ms, step, event) VALUES ('r1', 1690000000000, 'issue', 'start');
INSERT INTO steps (rotation_id, at_ms, step, event) VALUES ('r1', 1690000001000, 'issue', 'ok');
INSERT INTO steps (rotation_id, at_ms, step, event) VALUES ('r2', 1700000000000, 'promote', 'ok');
",
        )
        .unwrap();
        tx.commit().unwrap();
    }

    #[tokio::test]
    async fn a_v1_database_is_upgraded_with_its_history_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        v1_database(&path);

        let state = SqliteState::open(&path).unwrap();
        let history = state.history(Some("db"), 10).await.unwrap();
        assert_eq!(history.len(), 2);
        let (r2, steps2) = &history[0];
        assert_eq!((r2.id.as_str(), r2.revoke_at), ("r2", Some(1700000600)));
        assert_eq!(r2.old_attrs.as_ref().unwrap()["user"], "app");
        assert_eq!(steps2.len(), 1);
        assert_eq!(history[1].1.len(), 2);
        assert_eq!(state.open_rotations().await.unwrap().len(), 1);
        let record = state.credential("db").await.unwrap().unwrap();
        assert_eq!(record.issued_at, Some(1700000000));
        assert_eq!(
            record.current_attrs.unwrap()["user"],
            "app2",
            "the newest promoted rotation's attributes: its old key stays revocable"
        );

        let conn = Connection::open(&path).unwrap();
        assert_eq!(version(&conn).unwrap(), VERSION);
        let instance = instance_id(&conn).unwrap().expect("an instance id");
        assert_eq!(instance, state.instance_id());
        let chained = again_verified(&state).await;
        assert_eq!(chained, 3, "the rows already there are chained");
        drop(state);
        let again = SqliteState::open(&path).unwrap();
        assert_eq!(
            again.instance_id(),
            instance,
            "opening again migrates nothing"
        );
    }

    #[tokio::test]
    async fn a_long_history_is_chained_in_batches_across_their_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        v1_database(&path);
        let mut conn = Connection::open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        for i in 0..10_001 {
            tx.execute(
                "INSERT INTO steps (rotation_id, at_ms, step, event) VALUES ('r1', ?1, 'issue', 'ok')",
                [i],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        drop(conn);
        let state = SqliteState::open(&path).unwrap();
        assert_eq!(again_verified(&state).await, 10_004);
    }

    async fn again_verified(state: &SqliteState) -> i64 {
        state.verify_journal().await.unwrap().unwrap().rows
    }

    #[test]
    fn empty_and_zero_byte_files_get_the_current_schema_and_a_new_instance() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.db");
        std::fs::write(&a, b"").unwrap();
        let mut conn = Connection::open(&a).unwrap();
        let first = migrate(&mut conn).unwrap();
        assert_eq!(first.from, 0);
        assert_eq!(version(&conn).unwrap(), VERSION);
        let mut other = Connection::open(dir.path().join("b.db")).unwrap();
        assert_ne!(migrate(&mut other).unwrap().instance_id, first.instance_id);
    }

    #[test]
    fn a_database_from_a_newer_keyrotd_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        drop(SqliteState::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", VERSION + 1)
            .unwrap();
        let err = SqliteState::open(&path).err().expect("refused");
        assert!(
            err.to_string()
                .contains(&format!("schema version {}", VERSION + 1)),
            "{err}"
        );
        assert!(SqliteState::open_read_only(&path).is_err());
        let conn = Connection::open(&path).unwrap();
        assert_eq!(version(&conn).unwrap(), VERSION + 1, "never downgraded");
    }
}
