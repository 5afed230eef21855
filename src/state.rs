//! Durable state: schedule facts per credential, the rotation journal and its step log.
//!
//! Invariants:
//! - no secret value is ever written here: only ids, times, phases, public attributes (key ids,
//!   user names) and provider error messages, which carry no secret by contract;
//! - at most one rotation per credential is open (not finished) at any time, enforced by the
//!   database itself, so two processes (the daemon and `keyrotd rotate`) cannot both start one;
//! - a rotation's phase is written *after* the step that reaches it has completed, so after a crash
//!   the recorded phase is never ahead of reality.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use keyrotd_plugin::Attrs;
use rusqlite::{params, Connection, OptionalExtension};

use crate::liveness::Liveness;

/// What a state backend failed at.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state database: cannot create {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error("state database: corrupt record: {0}")]
    Corrupt(String),
    #[error("state database task failed: {0}")]
    Task(String),
    #[error("rotation {0} is no longer this process's to drive: its lease was lost or released")]
    LeaseLost(String),
    #[error("state database: schema version {found} is newer than this keyrotd understands ({supported}); refusing to open it rather than downgrade it: run the newer keyrotd or restore a backup")]
    TooNew { found: i64, supported: i64 },
}

/// Where a rotation is in the protocol. Stored as text. Decisions use the predicates below, never
/// the declaration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Begun; the new credential may or may not exist at the provider.
    Issuing,
    /// Issued (attributes recorded); maybe not staged yet.
    Issued,
    /// Written to the store beside the current value.
    Staged,
    /// Accepted by the provider.
    Activated,
    /// Proven to work.
    Verified,
    /// Current in the store; the old credential waits for its grace period to end.
    Promoted,
    /// The old credential is revoked: the rotation is complete.
    Done,
    /// Undoing an unfinished rotation after a failure.
    RollingBack,
    /// Undone: the pending credential is gone and the current one is unchanged.
    RolledBack,
}

impl Phase {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Issuing => "issuing",
            Self::Issued => "issued",
            Self::Staged => "staged",
            Self::Activated => "activated",
            Self::Verified => "verified",
            Self::Promoted => "promoted",
            Self::Done => "done",
            Self::RollingBack => "rolling_back",
            Self::RolledBack => "rolled_back",
        }
    }

    fn parse(s: &str) -> Result<Self, StateError> {
        Ok(match s {
            "issuing" => Self::Issuing,
            "issued" => Self::Issued,
            "staged" => Self::Staged,
            "activated" => Self::Activated,
            "verified" => Self::Verified,
            "promoted" => Self::Promoted,
            "done" => Self::Done,
            "rolling_back" => Self::RollingBack,
            "rolled_back" => Self::RolledBack,
            other => return Err(StateError::Corrupt(format!("unknown phase `{other}`"))),
        })
    }

    /// Whether nothing is promoted yet: consumers still read the old value.
    pub fn before_promotion(self) -> bool {
        matches!(
            self,
            Self::Issuing | Self::Issued | Self::Staged | Self::Activated | Self::Verified
        )
    }

    /// Whether a failure in this phase undoes the rotation: the new credential is not proven to
    /// work yet. From `Verified` on, a failure retries the same step instead.
    pub fn rolls_back_on_failure(self) -> bool {
        matches!(
            self,
            Self::Issuing | Self::Issued | Self::Staged | Self::Activated
        )
    }

    /// Whether the rotation is over.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::RolledBack)
    }
}

/// A credential's health as the daemon sees it; exported as `keyrotd_credential_status{state}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Waiting for its next rotation.
    Idle,
    /// A rotation is under way.
    Rotating,
    /// Promoted; the old credential is revoked when the grace period ends.
    Grace,
    /// The last attempt failed; a retry is scheduled.
    Retrying,
    /// Retries are exhausted: automation stopped until an operator rotates it by hand.
    Failed,
}

impl Status {
    /// Every status, in the order metrics list them.
    pub const ALL: [Status; 5] = [
        Self::Idle,
        Self::Rotating,
        Self::Grace,
        Self::Retrying,
        Self::Failed,
    ];

    /// The stored and exported name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Rotating => "rotating",
            Self::Grace => "grace",
            Self::Retrying => "retrying",
            Self::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Result<Self, StateError> {
        Self::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| StateError::Corrupt(format!("unknown status `{s}`")))
    }
}

/// What the daemon remembers about one credential between rotations. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRecord {
    pub id: String,
    pub status: Status,
    /// When the current credential was promoted.
    pub issued_at: Option<i64>,
    pub consecutive_failures: u32,
    /// When the next retry may start (status `retrying`).
    pub next_attempt_at: Option<i64>,
    /// The last failure, for `status` output (no secret by contract).
    pub last_error: Option<String>,
    /// Public attributes of the credential consumers use now (a key id, a user name), kept here
    /// so revoking it later never depends on how far back the rotation history reaches.
    pub current_attrs: Option<Attrs>,
    /// Set while the store names this rotation, which the database does not know (state lost
    /// or foreign): automation is stopped until `keyrotd adopt`.
    pub state_lost: Option<String>,
}

impl CredentialRecord {
    /// Records a successful step: `status`, no failures, no retry pending.
    pub fn succeed(&mut self, status: Status) {
        self.status = status;
        self.consecutive_failures = 0;
        self.next_attempt_at = None;
        self.last_error = None;
    }

    /// A credential the daemon has never rotated.
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            status: Status::Idle,
            issued_at: None,
            consecutive_failures: 0,
            next_attempt_at: None,
            last_error: None,
            current_attrs: None,
            state_lost: None,
        }
    }
}

/// One rotation of one credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationRecord {
    /// Also the idempotency token given to every step.
    pub id: String,
    pub credential_id: String,
    /// Why it started: `schedule`, `manual`, `retry`, `initial`.
    pub trigger: String,
    pub started_at: i64,
    pub phase: Phase,
    /// Public attributes of the new credential, once issued.
    pub new_attrs: Option<Attrs>,
    /// Public attributes of the credential it replaces; `None` when there was none.
    pub old_attrs: Option<Attrs>,
    /// When the old credential is to be revoked (set at promotion).
    pub revoke_at: Option<i64>,
    /// The process driving it, while one does.
    pub owner: Option<String>,
    pub lease_until: i64,
    pub error: Option<String>,
    pub finished_at: Option<i64>,
}

/// One line of the step log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord {
    pub at_ms: i64,
    pub step: String,
    /// `start`, `ok`, `error`, `skip`, or `interrupted` (shutdown ended the step; it resumes).
    pub event: String,
    pub detail: Option<String>,
}

/// Another rotation of the same credential is open.
#[derive(Debug, thiserror::Error)]
#[error("rotation {} of `{}` is still open (phase {})", .0.id, .0.credential_id, .0.phase.as_str())]
pub struct Busy(pub Box<RotationRecord>);

/// The answer to [`StateStore::claim`].
#[derive(Debug)]
pub enum Claim {
    /// The lease is ours; the rotation as it stands now.
    Taken(Box<RotationRecord>),
    /// A live process holds it.
    Held { owner: String },
    /// The rotation finished before we could claim it.
    Finished,
}

/// The state backend. Today SQLite; a PostgreSQL backend for replicas fits the same calls.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Every credential record.
    async fn credentials(&self) -> Result<Vec<CredentialRecord>, StateError>;
    /// One credential record.
    async fn credential(&self, id: &str) -> Result<Option<CredentialRecord>, StateError>;
    /// Inserts or replaces a credential record.
    async fn put_credential(&self, record: &CredentialRecord) -> Result<(), StateError>;
    /// Inserts records for ids that have none (a new inventory), in one transaction.
    async fn ensure_credentials(&self, ids: &[String]) -> Result<(), StateError>;
    /// Every open rotation.
    async fn open_rotations(&self) -> Result<Vec<RotationRecord>, StateError>;
    /// The open rotation of a credential, if any.
    async fn open_rotation(
        &self,
        credential_id: &str,
    ) -> Result<Option<RotationRecord>, StateError>;
    /// Records a new rotation, unless the credential already has an open one.
    async fn begin(&self, rotation: &RotationRecord) -> Result<Result<(), Busy>, StateError>;
    /// The lease owner this process writes as (`host:pid:nonce`).
    fn owner(&self) -> &str;
    /// Takes the lease of an open rotation for this process if it is free, expired, already
    /// ours, or held by a process known to be gone. On success returns the rotation as it is
    /// *now*: whatever was read before the claim may be stale (another process may have moved it
    /// on), and only the record read under the lease may drive a step.
    async fn claim(
        &self,
        rotation_id: &str,
        lease_until: i64,
        now: i64,
    ) -> Result<Claim, StateError>;
    /// Extends this process's lease on a rotation it holds. Returns `false` if it no longer holds
    /// it: another process took it over, or the rotation finished.
    async fn renew(&self, rotation_id: &str, lease_until: i64) -> Result<bool, StateError>;
    /// Saves a rotation and, in the same transaction, its credential record. Only the lease
    /// holder may save: if this process does not hold the rotation's lease (another took over,
    /// or this one already released it), nothing is written and the call fails with
    /// [`StateError::LeaseLost`]. A save that clears `owner` releases the lease.
    async fn save(
        &self,
        rotation: &RotationRecord,
        credential: &CredentialRecord,
    ) -> Result<(), StateError>;
    /// Appends to the step log of a rotation whose lease this process holds; fails with
    /// [`StateError::LeaseLost`] (writing nothing) otherwise.
    async fn log_step(
        &self,
        rotation_id: &str,
        step: &str,
        event: &str,
        detail: Option<&str>,
    ) -> Result<(), StateError>;
    /// Recent rotations, newest first, with their step logs.
    async fn history(
        &self,
        credential_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(RotationRecord, Vec<StepRecord>)>, StateError>;
    /// A number that changes whenever another process (`keyrotd rotate`) commits a change, and
    /// stays the same after this process's own writes. Cheap: the daemon polls it to notice
    /// manual rotations within seconds instead of re-reading every record.
    async fn external_version(&self) -> Result<i64, StateError>;
    /// Whether the database has a rotation `rotation_id` of credential `credential_id`. A store
    /// naming a rotation this database never saw means the state was lost or belongs to another
    /// keyrotd (see the engine's start-of-run check).
    async fn knows_rotation(
        &self,
        credential_id: &str,
        rotation_id: &str,
    ) -> Result<bool, StateError>;
    /// Records `adopted` (a finished rotation standing for the value a store holds although this
    /// database never saw it written) and `credential` in one transaction, with a journal line
    /// saying so. An open rotation of the credential is closed as rolled back first, unless a
    /// live lease holds it (then [`Busy`]). Returns the rotation it closed, if any.
    async fn adopt(
        &self,
        adopted: &RotationRecord,
        credential: &CredentialRecord,
        now: i64,
    ) -> Result<Result<Option<RotationRecord>, Busy>, StateError>;
}

/// The embedded SQLite backend.
#[derive(Clone)]
pub struct SqliteState {
    conn: Arc<Mutex<Connection>>,
    /// Who this process is as a lease owner; `None` for a read-only handle, which never leases.
    me: Option<Arc<Liveness>>,
    /// The database's instance id (see [`crate::migrate`]).
    instance_id: Arc<str>,
}

const CREDENTIAL_COLUMNS: &str =
    "id, status, issued_at, consecutive_failures, next_attempt_at, last_error, current_attrs, state_lost";

const ROTATION_COLUMNS: &str =
    "id, credential_id, trigger, started_at, phase, new_attrs, old_attrs, revoke_at, owner, lease_until, error, finished_at";

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
        let mut conn = Connection::open(path)?;
        // WAL lets `keyrotd status` read while the daemon writes; FULL sync makes every journal
        // write survive power loss, not only a process crash.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let migrated = crate::migrate::migrate(&mut conn)?;
        if migrated.from != crate::migrate::VERSION {
            tracing::info!(path = %path.display(), from = migrated.from, to = crate::migrate::VERSION, instance = %migrated.instance_id, "state database schema migrated");
        }
        let me = Liveness::acquire(path).map_err(|source| StateError::Create {
            path: format!("{}.owners", path.display()),
            source,
        })?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            me: Some(Arc::new(me)),
            instance_id: migrated.instance_id.into(),
        })
    }

    /// Opens an existing database without changing it (for `keyrotd check`); `None` if absent.
    /// A database from a newer keyrotd is refused; an older one is read as it is (its rotations
    /// table has not changed), and `run` upgrades it.
    pub fn open_read_only(path: &Path) -> Result<Option<Self>, StateError> {
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        crate::migrate::refuse_newer(crate::migrate::version(&conn)?)?;
        let instance_id = crate::migrate::instance_id(&conn)
            .ok()
            .flatten()
            .unwrap_or_default();
        Ok(Some(Self {
            conn: Arc::new(Mutex::new(conn)),
            me: None,
            instance_id: instance_id.into(),
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

    /// Runs `f` on the connection off the async worker threads.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
            // back), so a poisoned lock is safe to keep using.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StateError::Task(e.to_string()))?
    }
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

fn attrs_to_json(attrs: &Option<Attrs>) -> Option<String> {
    attrs
        .as_ref()
        .map(|a| serde_json::to_string(a).expect("a string map serializes"))
}

fn attrs_from_json(text: Option<String>) -> Result<Option<Attrs>, StateError> {
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| StateError::Corrupt(format!("attributes: {e}")))
    })
    .transpose()
}

fn credential_record(row: &rusqlite::Row<'_>) -> Result<CredentialRecord, StateError> {
    Ok(CredentialRecord {
        id: row.get(0)?,
        status: Status::parse(&row.get::<_, String>(1)?)?,
        issued_at: row.get(2)?,
        consecutive_failures: row.get(3)?,
        next_attempt_at: row.get(4)?,
        last_error: row.get(5)?,
        current_attrs: attrs_from_json(row.get(6)?)?,
        state_lost: row.get(7)?,
    })
}

fn rotation_record(row: &rusqlite::Row<'_>) -> Result<RotationRecord, StateError> {
    Ok(RotationRecord {
        id: row.get(0)?,
        credential_id: row.get(1)?,
        trigger: row.get(2)?,
        started_at: row.get(3)?,
        phase: Phase::parse(&row.get::<_, String>(4)?)?,
        new_attrs: attrs_from_json(row.get(5)?)?,
        old_attrs: attrs_from_json(row.get(6)?)?,
        revoke_at: row.get(7)?,
        owner: row.get(8)?,
        lease_until: row.get(9)?,
        error: row.get(10)?,
        finished_at: row.get(11)?,
    })
}

/// Runs a query and turns every row into a record.
fn records<T>(
    stmt: &mut rusqlite::Statement<'_>,
    args: &[&dyn rusqlite::ToSql],
    capacity: usize,
    record: fn(&rusqlite::Row<'_>) -> Result<T, StateError>,
) -> Result<Vec<T>, StateError> {
    let mut rows = stmt.query(args)?;
    let mut out = Vec::with_capacity(capacity);
    while let Some(row) = rows.next()? {
        out.push(record(row)?);
    }
    Ok(out)
}

fn upsert_credential(conn: &Connection, c: &CredentialRecord) -> rusqlite::Result<()> {
    conn.execute(
        &format!("INSERT INTO credentials ({CREDENTIAL_COLUMNS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT(id) DO UPDATE SET status = ?2, issued_at = ?3, consecutive_failures = ?4, next_attempt_at = ?5, last_error = ?6,
           current_attrs = ?7, state_lost = ?8"),
        params![c.id, c.status.as_str(), c.issued_at, c.consecutive_failures, c.next_attempt_at, c.last_error, attrs_to_json(&c.current_attrs), c.state_lost],
    )?;
    Ok(())
}

fn query_rotations(
    conn: &Connection,
    filter: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<RotationRecord>, StateError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ROTATION_COLUMNS} FROM rotations {filter}"
    ))?;
    records(&mut stmt, args, 0, rotation_record)
}

#[async_trait]
impl StateStore for SqliteState {
    async fn credentials(&self) -> Result<Vec<CredentialRecord>, StateError> {
        self.with(|c| {
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
        self.with(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id = ?1"
            ))?;
            Ok(records(&mut stmt, &[&id], 1, credential_record)?.pop())
        })
        .await
    }

    async fn put_credential(&self, record: &CredentialRecord) -> Result<(), StateError> {
        let record = record.clone();
        self.with(move |c| Ok(upsert_credential(c, &record)?)).await
    }

    async fn ensure_credentials(&self, ids: &[String]) -> Result<(), StateError> {
        let ids = ids.to_vec();
        self.with(move |c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare(
                    "INSERT OR IGNORE INTO credentials (id, status) VALUES (?1, 'idle')",
                )?;
                for id in &ids {
                    stmt.execute([id])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn open_rotations(&self) -> Result<Vec<RotationRecord>, StateError> {
        self.with(|c| query_rotations(c, "WHERE finished_at IS NULL", &[]))
            .await
    }

    async fn external_version(&self) -> Result<i64, StateError> {
        // SQLite's data_version is per connection and moves only on other connections' commits;
        // every call of this process shares one connection. In WAL mode it reads shared memory.
        self.with(|c| Ok(c.query_row("PRAGMA data_version", [], |r| r.get(0))?))
            .await
    }

    async fn knows_rotation(
        &self,
        credential_id: &str,
        rotation_id: &str,
    ) -> Result<bool, StateError> {
        let (cred, id) = (credential_id.to_owned(), rotation_id.to_owned());
        self.with(move |c| {
            Ok(c.query_row(
                "SELECT EXISTS (SELECT 1 FROM rotations WHERE id = ?1 AND credential_id = ?2)",
                params![id, cred],
                |r| r.get(0),
            )?)
        })
        .await
    }

    async fn adopt(
        &self,
        adopted: &RotationRecord,
        credential: &CredentialRecord,
        now: i64,
    ) -> Result<Result<Option<RotationRecord>, Busy>, StateError> {
        let (r, credential) = (adopted.clone(), credential.clone());
        self.with(move |c| {
            let tx = c.transaction()?;
            let open = query_rotations(
                &tx,
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
                tx.execute(
                    "UPDATE rotations SET phase = ?2, error = COALESCE(error || '; ' || ?3, ?3), owner = NULL,
                       lease_until = 0, finished_at = ?4 WHERE id = ?1",
                    params![open.id, Phase::RolledBack.as_str(), error, now],
                )?;
                tx.execute(
                    "INSERT INTO steps (rotation_id, at_ms, step, event, detail) VALUES (?1, ?2, 'adopt', 'skip', ?3)",
                    params![open.id, now * 1000, error],
                )?;
            }
            tx.execute(
                &format!("INSERT INTO rotations ({ROTATION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
                params![
                    r.id, r.credential_id, r.trigger, r.started_at, r.phase.as_str(), attrs_to_json(&r.new_attrs),
                    attrs_to_json(&r.old_attrs), r.revoke_at, r.owner, r.lease_until, r.error, r.finished_at
                ],
            )?;
            tx.execute(
                "INSERT INTO steps (rotation_id, at_ms, step, event, detail) VALUES (?1, ?2, 'adopt', 'ok', 'the value in the store was adopted by an operator; nothing was issued')",
                params![r.id, now * 1000],
            )?;
            upsert_credential(&tx, &credential)?;
            tx.commit()?;
            Ok(Ok(open))
        })
        .await
    }

    async fn open_rotation(
        &self,
        credential_id: &str,
    ) -> Result<Option<RotationRecord>, StateError> {
        let id = credential_id.to_owned();
        self.with(move |c| {
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
        let r = rotation.clone();
        self.with(move |c| {
            let inserted = c.execute(
                &format!("INSERT INTO rotations ({ROTATION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
                params![
                    r.id, r.credential_id, r.trigger, r.started_at, r.phase.as_str(), attrs_to_json(&r.new_attrs),
                    attrs_to_json(&r.old_attrs), r.revoke_at, r.owner, r.lease_until, r.error, r.finished_at
                ],
            );
            match inserted {
                Ok(_) => Ok(Ok(())),
                Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                    let open = query_rotations(c, "WHERE finished_at IS NULL AND credential_id = ?1", &[&r.credential_id])?
                        .pop()
                        .ok_or_else(|| StateError::Corrupt(format!("rotation id {} already used", r.id)))?;
                    Ok(Err(Busy(Box::new(open))))
                }
                Err(e) => Err(e.into()),
            }
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
        self.with(move |c| {
            // One write transaction: the read, the liveness verdict and the update see the same
            // row, so two claimants cannot both win.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let row: Option<(Option<String>, i64, Option<i64>)> = tx
                .query_row(
                    "SELECT owner, lease_until, finished_at FROM rotations WHERE id = ?1",
                    [&id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
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
            tx.execute(
                "UPDATE rotations SET owner = ?2, lease_until = ?3 WHERE id = ?1",
                params![id, me.owner(), lease_until],
            )?;
            let fresh = query_rotations(&tx, "WHERE id = ?1", &[&id])?
                .pop()
                .ok_or_else(|| StateError::Corrupt(format!("rotation {id} vanished")))?;
            tx.commit()?;
            Ok(Claim::Taken(Box::new(fresh)))
        })
        .await
    }

    async fn renew(&self, rotation_id: &str, lease_until: i64) -> Result<bool, StateError> {
        let (id, me) = (rotation_id.to_owned(), self.me()?);
        self.with(move |c| {
            let n = c.execute(
                "UPDATE rotations SET lease_until = ?3 WHERE id = ?1 AND owner = ?2 AND finished_at IS NULL",
                params![id, me.owner(), lease_until],
            )?;
            Ok(n == 1)
        })
        .await
    }

    async fn save(
        &self,
        r: &RotationRecord,
        credential: &CredentialRecord,
    ) -> Result<(), StateError> {
        let (r, credential, me) = (r.clone(), credential.clone(), self.me()?);
        self.with(move |c| {
            let tx = c.transaction()?;
            let updated = tx.execute(
                "UPDATE rotations SET phase = ?2, new_attrs = ?3, old_attrs = ?4, revoke_at = ?5, owner = ?6,
                   lease_until = ?7, error = ?8, finished_at = ?9
                 WHERE id = ?1 AND owner = ?10",
                params![
                    r.id, r.phase.as_str(), attrs_to_json(&r.new_attrs), attrs_to_json(&r.old_attrs), r.revoke_at, r.owner,
                    r.lease_until, r.error, r.finished_at, me.owner()
                ],
            )?;
            if updated == 0 {
                return Err(StateError::LeaseLost(r.id));
            }
            upsert_credential(&tx, &credential)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn log_step(
        &self,
        rotation_id: &str,
        step: &str,
        event: &str,
        detail: Option<&str>,
    ) -> Result<(), StateError> {
        let (id, step, event, detail) = (
            rotation_id.to_owned(),
            step.to_owned(),
            event.to_owned(),
            detail.map(str::to_owned),
        );
        let at_ms = chrono::Utc::now().timestamp_millis();
        let me = self.me()?;
        self.with(move |c| {
            let mut insert = c.prepare_cached(
                "INSERT INTO steps (rotation_id, at_ms, step, event, detail)
                 SELECT ?1, ?2, ?3, ?4, ?5 FROM rotations WHERE id = ?1 AND owner = ?6",
            )?;
            if insert.execute(params![id, at_ms, step, event, detail, me.owner()])? == 0 {
                return Err(StateError::LeaseLost(id));
            }
            Ok(())
        })
        .await
    }

    async fn history(
        &self,
        credential_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(RotationRecord, Vec<StepRecord>)>, StateError> {
        let id = credential_id.map(str::to_owned);
        self.with(move |c| {
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
                        .query_map([&r.id], |row| {
                            Ok(StepRecord {
                                at_ms: row.get(0)?,
                                step: row.get(1)?,
                                event: row.get(2)?,
                                detail: row.get(3)?,
                            })
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok((r, steps))
                })
                .collect()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotation(id: &str, cred: &str) -> RotationRecord {
        RotationRecord {
            id: id.into(),
            credential_id: cred.into(),
            trigger: "manual".into(),
            started_at: 1,
            phase: Phase::Issuing,
            new_attrs: None,
            old_attrs: Some(Attrs::from([("AccessKeyId".into(), "AKIA1".into())])),
            revoke_at: None,
            owner: Some("me".into()),
            lease_until: 100,
            error: None,
            finished_at: None,
        }
    }

    #[tokio::test]
    async fn only_one_open_rotation_per_credential() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteState::open(&dir.path().join("s.db")).unwrap();
        let mut r1 = rotation("r1", "db");
        r1.owner = Some(s.owner().into());
        s.begin(&r1).await.unwrap().unwrap();
        let busy = s.begin(&rotation("r2", "db")).await.unwrap().unwrap_err();
        assert_eq!(busy.0.id, "r1");
        s.begin(&rotation("r3", "other")).await.unwrap().unwrap();

        let mut r1 = s.open_rotation("db").await.unwrap().unwrap();
        assert_eq!(r1.old_attrs.as_ref().unwrap()["AccessKeyId"], "AKIA1");
        r1.phase = Phase::Done;
        r1.finished_at = Some(5);
        s.save(&r1, &CredentialRecord::new("db")).await.unwrap();
        s.begin(&rotation("r2", "db")).await.unwrap().unwrap();
        assert_eq!(s.history(Some("db"), 10).await.unwrap().len(), 2);
    }

    /// Two handles on one database stand for two processes, each with its own liveness lock.
    #[tokio::test]
    async fn leases_are_taken_only_when_free_expired_or_dead() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let me = SqliteState::open(&path).unwrap();
        let you = SqliteState::open(&path).unwrap();
        let mut r1 = rotation("r1", "db");
        r1.owner = Some(me.owner().into());
        me.begin(&r1).await.unwrap().unwrap();
        assert!(
            matches!(you.claim("r1", 200, 50).await.unwrap(), Claim::Held { .. }),
            "lease held by a live owner until 100"
        );
        assert!(
            matches!(you.claim("r1", 300, 101).await.unwrap(), Claim::Taken(_)),
            "expired"
        );
        // "me" held it for a while; its writes now fail instead of overwriting "you"'s progress.
        let mut r = me.open_rotation("db").await.unwrap().unwrap();
        r.phase = Phase::Staged;
        let lost = me.save(&r, &CredentialRecord::new("db")).await;
        assert!(matches!(lost, Err(StateError::LeaseLost(_))), "{lost:?}");
        let lost = me.log_step("r1", "stage", "start", None).await;
        assert!(matches!(lost, Err(StateError::LeaseLost(_))), "{lost:?}");
        assert!(!me.renew("r1", 400).await.unwrap());
        assert_eq!(
            me.open_rotation("db").await.unwrap().unwrap().phase,
            Phase::Issuing
        );
        you.save(&r, &CredentialRecord::new("db")).await.unwrap();
        you.log_step("r1", "stage", "start", None).await.unwrap();
        assert!(you.renew("r1", 400).await.unwrap());
    }

    #[tokio::test]
    async fn a_claim_returns_the_rotation_as_it_is_now_and_a_dead_owner_loses_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let me = SqliteState::open(&path).unwrap();
        let gone = SqliteState::open(&path).unwrap();
        let mut r = rotation("r1", "db");
        r.owner = Some(gone.owner().into());
        r.lease_until = i64::MAX;
        gone.begin(&r).await.unwrap().unwrap();
        r.phase = Phase::Promoted;
        gone.save(&r, &CredentialRecord::new("db")).await.unwrap();
        drop(gone);
        let Claim::Taken(fresh) = me.claim("r1", 200, 50).await.unwrap() else {
            panic!("the owner's lock is free: it is gone");
        };
        assert_eq!(fresh.phase, Phase::Promoted);
        assert_eq!(fresh.owner.as_deref(), Some(me.owner()));
        let mut done = *fresh;
        done.finished_at = Some(60);
        done.owner = None;
        me.save(&done, &CredentialRecord::new("db")).await.unwrap();
        assert!(matches!(
            me.claim("r1", 200, 50).await.unwrap(),
            Claim::Finished
        ));
        // Released: not even the last holder may write to it any more.
        let late = me.save(&done, &CredentialRecord::new("db")).await;
        assert!(matches!(late, Err(StateError::LeaseLost(_))), "{late:?}");
    }
}
