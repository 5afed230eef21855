//! The embedded SQLite backend of [`StateStore`]: WAL mode, `synchronous=FULL`. Writes go to one
//! writer thread that commits whatever is queued in one transaction (group commit, `writer`);
//! reads use a second connection off the async worker threads, and see every committed write.
//!
//! Invariants:
//! - only the lease holder writes a rotation or its journal, checked in the same statement as the
//!   write (`... WHERE owner = me`), so a process that lost its lease cannot overwrite progress;
//! - journal rows are inserted by `rows::insert_step` alone, which hashes each into the chain
//!   (see `chain`) inside the write transaction that inserts it;
//! - a partial unique index allows at most one open rotation per credential, across processes;
//! - the database directory is 0700 and its files 0600, whatever the umask.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::audit::{self, AuditFilter, AuditLine, Pruned};
use super::chain::{self, Break, Intact};
use super::rows::{
    credential_record, insert_rotation, insert_step, query_rotations, records, save_rotation,
    upsert_credential, NewStep, CREDENTIAL_COLUMNS,
};
use super::writer::Writer;
use super::{
    migrate, Actor, Busy, Claim, CommitCounts, CredentialRecord, JournalLine, Phase,
    RotationRecord, StateError, StateStore, StepRecord,
};
use crate::liveness::Liveness;
use crate::protocol::Trigger;

/// The embedded SQLite backend.
#[derive(Clone)]
pub struct SqliteState {
    /// Reads; for a read-only handle, the only connection.
    reader: Arc<Mutex<Connection>>,
    /// Writes, committed in groups; `None` for a read-only handle.
    writer: Option<Arc<Writer>>,
    /// Who this process is as a lease owner; `None` for a read-only handle, which never leases.
    me: Option<Arc<Liveness>>,
    /// The database's instance id (see the `migrate` module).
    instance_id: Arc<str>,
    /// Who this process is in the audit trail: its row in `actors` and its description.
    actor: Option<(i64, Arc<str>)>,
}

/// Suffixes of the files SQLite keeps beside the database in WAL mode.
const SIDE_FILES: [&str; 2] = ["-wal", "-shm"];

impl SqliteState {
    /// Opens (creating if needed) the database at `path` and migrates it to the current schema.
    ///
    /// The database holds no secret, but its history tells an attacker which credentials exist
    /// and when they change: its directory is created 0700 and the database 0600, whatever the
    /// umask. SQLite creates `-wal` and `-shm` with the database file's mode; they are checked
    /// as well, in case an older keyrotd left them wider.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        Self::open_with(path, None)
    }

    /// [`SqliteState::open`], writing rotations and journal rows as `actor` (recorded once).
    pub fn open_as(path: &Path, actor: &Actor) -> Result<Self, StateError> {
        Self::open_with(path, Some(actor))
    }

    fn open_with(path: &Path, actor: Option<&Actor>) -> Result<Self, StateError> {
        let create = |p: &Path, source| StateError::Create {
            path: p.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| create(dir, e))?;
        }
        // All before SQLite opens them: closing any descriptor of a file drops every POSIX lock
        // this process holds on it, SQLite's included.
        private_file(path).map_err(|e| create(path, e))?;
        for suffix in SIDE_FILES {
            let mut side = path.as_os_str().to_owned();
            side.push(suffix);
            let side = std::path::PathBuf::from(side);
            narrow_if_present(&side).map_err(|e| create(&side, e))?;
        }
        let mut conn = connection(path, rusqlite::OpenFlags::default())?;
        // WAL lets `keyrotd status` read while the daemon writes; FULL sync makes every journal
        // write survive power loss, not only a process crash.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let migrated = migrate::migrate(&mut conn)?;
        if migrated.from != migrate::VERSION {
            tracing::info!(path = %path.display(), from = migrated.from, to = migrate::VERSION, instance = %migrated.instance_id, "state database schema migrated");
        }
        let me = Liveness::acquire(path).map_err(|source| StateError::Create {
            path: format!("{}.owners", path.display()),
            source,
        })?;
        let actor = match actor {
            Some(actor) => {
                let description = actor.to_json();
                let id = audit::register_actor(&mut conn, &description)?;
                Some((id, description.into()))
            }
            None => None,
        };
        // Opened after the journal mode is set: WAL lets it read while the writer commits.
        let reader = connection(path, rusqlite::OpenFlags::default())?;
        Ok(Self {
            reader: Arc::new(Mutex::new(reader)),
            writer: Some(Arc::new(Writer::start(conn)?)),
            me: Some(Arc::new(me)),
            instance_id: migrated.instance_id.into(),
            actor,
        })
    }

    /// Opens an existing database without changing it (for `keyrotd check`); `None` if absent.
    /// A database from a newer keyrotd is refused; an older one is read as it is (its rotations
    /// table has not changed), and `run` upgrades it.
    pub fn open_read_only(path: &Path) -> Result<Option<Self>, StateError> {
        if !path.exists() {
            return Ok(None);
        }
        let conn = connection(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        migrate::refuse_newer(migrate::version(&conn)?)?;
        let instance_id = migrate::instance_id(&conn)
            .ok()
            .flatten()
            .unwrap_or_default();
        Ok(Some(Self {
            reader: Arc::new(Mutex::new(conn)),
            writer: None,
            me: None,
            instance_id: instance_id.into(),
            actor: None,
        }))
    }

    /// The id created with this database; a copy of it elsewhere has the same one.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    fn me(&self) -> Result<Arc<Liveness>, StateError> {
        self.me
            .clone()
            .ok_or_else(|| StateError::Task("the state database is open read-only".into()))
    }

    /// Runs `f` on the read connection off the async worker threads.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        locked(self.reader.clone(), f).await
    }

    /// Queues `f` for the writer thread and returns once the transaction holding it has
    /// committed. `f` runs inside that transaction in a savepoint of its own: it must not begin
    /// or end a transaction, and an error undoes its changes only.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        match &self.writer {
            Some(writer) => writer.write(f).await,
            None => Err(StateError::Task(
                "the state database is open read-only".into(),
            )),
        }
    }
}

/// Opens a connection with the settings every handle shares.
fn connection(path: &Path, flags: rusqlite::OpenFlags) -> Result<Connection, StateError> {
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // Room for every statement the backend runs, so none is parsed twice.
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Runs `f` on `conn` off the async worker threads.
async fn locked<T: Send + 'static>(
    conn: Arc<Mutex<Connection>>,
    f: impl FnOnce(&mut Connection) -> Result<T, StateError> + Send + 'static,
) -> Result<T, StateError> {
    tokio::task::spawn_blocking(move || {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back), so a poisoned lock is safe to keep using.
        let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    })
    .await
    .map_err(|e| StateError::Task(e.to_string()))?
}

/// Creates `path` with mode 0600 if it is missing (the umask can only narrow that), and narrows
/// an existing one to 0600.
fn private_file(path: &Path) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    if file.metadata()?.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Narrows `path` to 0600 if it exists with wider bits (a `-wal` left by an older keyrotd).
fn narrow_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o077 != 0 => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[async_trait]
impl StateStore for SqliteState {
    async fn credentials(&self) -> Result<Vec<CredentialRecord>, StateError> {
        self.read(|c| {
            let mut stmt = c.prepare(&format!("SELECT {CREDENTIAL_COLUMNS} FROM credentials"))?;
            // Sized up front: growing a 100,000-record vector among the rows' string allocations
            // fragments the heap (measured: +14 MiB resident at 100k credentials).
            let count: usize = c.query_row("SELECT COUNT(*) FROM credentials", [], |r| r.get(0))?;
            records(&mut stmt, &[], count, credential_record)
        })
        .await
    }

    async fn credential(&self, id: &str) -> Result<Option<CredentialRecord>, StateError> {
        let id = id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id = ?1"
            ))?;
            Ok(records(&mut stmt, &[&id], 1, credential_record)?.pop())
        })
        .await
    }

    async fn put_credential(&self, record: &CredentialRecord) -> Result<(), StateError> {
        let record = record.clone();
        self.write(move |c| Ok(upsert_credential(c, &record)?))
            .await
    }

    async fn ensure_credentials(&self, ids: &[String]) -> Result<(), StateError> {
        let ids = ids.to_vec();
        self.write(move |c| {
            let mut stmt = c.prepare_cached(
                "INSERT OR IGNORE INTO credentials (id, status) VALUES (?1, 'idle')",
            )?;
            for id in &ids {
                stmt.execute([id])?;
            }
            Ok(())
        })
        .await
    }

    async fn open_rotations(&self) -> Result<Vec<RotationRecord>, StateError> {
        self.read(|c| query_rotations(c, "WHERE finished_at IS NULL", &[]))
            .await
    }

    async fn external_version(&self) -> Result<i64, StateError> {
        // SQLite's data_version is per connection and moves only on other connections' commits,
        // so it is read on the connection this process writes with (between two batches). In
        // WAL mode it reads shared memory.
        let conn = match &self.writer {
            Some(writer) => writer.connection().clone(),
            None => self.reader.clone(),
        };
        locked(conn, |c| {
            Ok(c.query_row("PRAGMA data_version", [], |r| r.get(0))?)
        })
        .await
    }

    fn commit_counts(&self) -> CommitCounts {
        self.writer
            .as_ref()
            .map_or_else(CommitCounts::default, |w| w.counts())
    }

    async fn knows_rotation(
        &self,
        credential_id: &str,
        rotation_id: &str,
    ) -> Result<bool, StateError> {
        let (cred, id) = (credential_id.to_owned(), rotation_id.to_owned());
        self.read(move |c| {
            Ok(c.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM rotations WHERE id = ?1 AND credential_id = ?2)",
            )?
            .query_row(params![id, cred], |r| r.get(0))?)
        })
        .await
    }

    async fn adopt(
        &self,
        adopted: &RotationRecord,
        credential: &CredentialRecord,
        now: i64,
    ) -> Result<Result<Option<RotationRecord>, Busy>, StateError> {
        let (r, credential, actor) = (adopted.clone(), credential.clone(), self.actor.clone());
        self.write(move |c| {
            let manual = Trigger::Manual.as_str();
            let open = query_rotations(
                c,
                "WHERE finished_at IS NULL AND credential_id = ?1",
                &[&r.credential_id],
            )?
            .pop();
            if let Some(open) = &open {
                if open.owner.is_some() && open.lease_until >= now {
                    return Ok(Err(Busy(Box::new(open.clone()))));
                }
                let error = format!(
                    "closed unfinished by `keyrotd adopt`, which adopted rotation {} found in the store",
                    r.id
                );
                c.execute(
                    "UPDATE rotations SET phase = ?2, error = COALESCE(error || '; ' || ?3, ?3), owner = NULL,
                       lease_until = 0, finished_at = ?4 WHERE id = ?1",
                    params![open.id, Phase::RolledBack.as_str(), error, now],
                )?;
                let row = NewStep {
                    rotation_id: &open.id,
                    at_ms: now * 1000,
                    step: "adopt",
                    event: "skip",
                    detail: Some(&error),
                    trigger: manual,
                };
                insert_step(c, &row, None, actor.as_ref())?;
            }
            insert_rotation(c, &r, actor.as_ref().map(|a| a.0))?;
            let row = NewStep {
                rotation_id: &r.id,
                at_ms: now * 1000,
                step: "adopt",
                event: "ok",
                detail: Some("the value in the store was adopted by an operator; nothing was issued"),
                trigger: manual,
            };
            insert_step(c, &row, None, actor.as_ref())?;
            upsert_credential(c, &credential)?;
            Ok(Ok(open))
        })
        .await
    }

    async fn open_rotation(
        &self,
        credential_id: &str,
    ) -> Result<Option<RotationRecord>, StateError> {
        let id = credential_id.to_owned();
        self.read(move |c| {
            Ok(query_rotations(
                c,
                "WHERE finished_at IS NULL AND credential_id = ?1",
                &[&id],
            )?
            .pop())
        })
        .await
    }

    async fn begin(&self, rotation: &RotationRecord) -> Result<Result<(), Busy>, StateError> {
        let (r, actor) = (rotation.clone(), self.actor.as_ref().map(|a| a.0));
        self.write(move |c| match insert_rotation(c, &r, actor) {
            Ok(()) => Ok(Ok(())),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                let open = query_rotations(
                    c,
                    "WHERE finished_at IS NULL AND credential_id = ?1",
                    &[&r.credential_id],
                )?
                .pop()
                .ok_or_else(|| StateError::Corrupt(format!("rotation id {} already used", r.id)))?;
                Ok(Err(Busy(Box::new(open))))
            }
            Err(e) => Err(e.into()),
        })
        .await
    }

    fn owner(&self) -> &str {
        self.me.as_deref().map_or("read-only", Liveness::owner)
    }

    async fn claim(
        &self,
        rotation_id: &str,
        lease_until: i64,
        now: i64,
    ) -> Result<Claim, StateError> {
        let (id, me) = (rotation_id.to_owned(), self.me()?);
        // The writer's transaction holds the write lock: the read, the liveness verdict and the
        // update see the same row, so two claimants cannot both win.
        self.write(move |c| {
            let row: Option<(Option<String>, i64, Option<i64>)> = c
                .prepare_cached(
                    "SELECT owner, lease_until, finished_at FROM rotations WHERE id = ?1",
                )?
                .query_row([&id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            let Some((owner, until, finished)) = row else {
                return Err(StateError::Corrupt(format!("rotation {id} does not exist")));
            };
            if finished.is_some() {
                return Ok(Claim::Finished);
            }
            let free = match owner.as_deref() {
                None => true,
                Some(o) => o == me.owner() || until < now || me.is_dead(o),
            };
            if !free {
                return Ok(Claim::Held {
                    owner: owner.unwrap_or_default(),
                });
            }
            c.prepare_cached("UPDATE rotations SET owner = ?2, lease_until = ?3 WHERE id = ?1")?
                .execute(params![id, me.owner(), lease_until])?;
            let fresh = query_rotations(c, "WHERE id = ?1", &[&id])?
                .pop()
                .ok_or_else(|| StateError::Corrupt(format!("rotation {id} vanished")))?;
            Ok(Claim::Taken(Box::new(fresh)))
        })
        .await
    }

    async fn renew(&self, rotation_id: &str, lease_until: i64) -> Result<bool, StateError> {
        let (id, me) = (rotation_id.to_owned(), self.me()?);
        self.write(move |c| {
            let n = c.prepare_cached(
                "UPDATE rotations SET lease_until = ?3 WHERE id = ?1 AND owner = ?2 AND finished_at IS NULL",
            )?
            .execute(params![id, me.owner(), lease_until])?;
            Ok(n == 1)
        })
        .await
    }

    async fn save(
        &self,
        rotation: &RotationRecord,
        credential: &CredentialRecord,
    ) -> Result<(), StateError> {
        self.record(&rotation.id, &[], Some((rotation, credential)))
            .await
    }

    async fn record(
        &self,
        rotation_id: &str,
        lines: &[JournalLine],
        save: Option<(&RotationRecord, &CredentialRecord)>,
    ) -> Result<(), StateError> {
        let (id, lines, me) = (rotation_id.to_owned(), lines.to_vec(), self.me()?);
        let save = save.map(|(r, c)| (r.clone(), c.clone()));
        let actor = self.actor.clone();
        self.write(move |c| {
            // Lines first: a save that releases the lease comes after them.
            for l in &lines {
                let row = NewStep {
                    rotation_id: &id,
                    at_ms: l.at_ms,
                    step: &l.step,
                    event: &l.event,
                    detail: l.detail.as_deref(),
                    trigger: l.trigger.as_str(),
                };
                if !insert_step(c, &row, Some(me.owner()), actor.as_ref())? {
                    return Err(StateError::LeaseLost(id));
                }
            }
            if let Some((rotation, credential)) = &save {
                save_rotation(c, rotation, credential, me.owner())?;
            }
            Ok(())
        })
        .await
    }

    async fn audit_lines(&self, filter: &AuditFilter) -> Result<Vec<AuditLine>, StateError> {
        let filter = filter.clone();
        self.read(move |c| audit::lines(c, &filter)).await
    }

    async fn verify_journal(&self) -> Result<Result<Intact, Break>, StateError> {
        self.read(chain::verify).await
    }

    async fn prune(&self, before: i64) -> Result<Pruned, StateError> {
        let now = chrono::Utc::now().timestamp();
        self.write(move |c| audit::prune(c, before, now)).await
    }

    async fn history(
        &self,
        credential_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(RotationRecord, Vec<StepRecord>)>, StateError> {
        let id = credential_id.map(str::to_owned);
        self.read(move |c| {
            let limit = limit as i64;
            let rotations = match &id {
                Some(id) => query_rotations(
                    c,
                    "WHERE credential_id = ?1 ORDER BY started_at DESC, id DESC LIMIT ?2",
                    &[id, &limit],
                )?,
                None => {
                    query_rotations(c, "ORDER BY started_at DESC, id DESC LIMIT ?1", &[&limit])?
                }
            };
            let mut stmt = c.prepare_cached(
                "SELECT at_ms, step, event, detail FROM steps WHERE rotation_id = ?1 ORDER BY seq",
            )?;
            rotations
                .into_iter()
                .map(|r| {
                    let steps = stmt
                        .query_map([&r.id], step_record)?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok((r, steps))
                })
                .collect()
        })
        .await
    }

    async fn steps(&self, rotation_id: &str, step: &str) -> Result<Vec<StepRecord>, StateError> {
        let (id, step) = (rotation_id.to_owned(), step.to_owned());
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT at_ms, step, event, detail FROM steps \
                 WHERE rotation_id = ?1 AND step = ?2 ORDER BY seq",
            )?;
            let steps = stmt
                .query_map([&id, &step], step_record)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(steps)
        })
        .await
    }
}

/// A `steps` row selected as `at_ms, step, event, detail`.
fn step_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<StepRecord> {
    Ok(StepRecord {
        at_ms: row.get(0)?,
        step: row.get(1)?,
        event: row.get(2)?,
        detail: row.get(3)?,
    })
}
