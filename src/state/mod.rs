//! Durable state: schedule facts per credential, the rotation journal and its step log.
//!
//! Invariants:
//! - no secret value is ever written here: only ids, times, phases, public attributes (key ids,
//!   user names) and provider error messages, which carry no secret by contract;
//! - at most one rotation per credential is open (not finished) at any time, enforced by the
//!   database itself, so two processes (the daemon and `keyrotd rotate`) cannot both start one;
//! - a rotation's phase is written *after* the step that reaches it has completed, so after a crash
//!   the recorded phase is never ahead of reality;
//! - a write call returns only once what it wrote is durable (committed, fsynced), however many
//!   concurrent writes share that commit.

//!
//! Files: this one holds the [`StateStore`] trait, its records and errors, and [`open_state`];
//! `sqlite` the SQLite backend ([`SqliteState`]), `rows` its row mapping and statements, `writer`
//! its group commit, `migrate` its versioned schema migrations; `removed` refuses an inventory that drops a credential whose rotation is
//! still open ([`check_removed`]).

mod actor;
pub mod audit;
pub mod chain;
mod migrate;
mod removed;
mod rows;
mod sqlite;
#[cfg(test)]
mod tests;
mod writer;

use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use keyrotd_plugin::Attrs;

use crate::config::{Inventory, StateUrl};
use crate::protocol::{Phase, Trigger};
pub use actor::Actor;
use audit::{AuditFilter, AuditLine, Pruned};
use chain::{Break, Intact};
pub use removed::{check_removed, RemovedWhileOpen};
pub use sqlite::SqliteState;

/// Opens the configured state backend (`daemon.state`), creating and migrating it if needed.
pub fn open_state(inventory: &Inventory) -> anyhow::Result<Arc<dyn StateStore>> {
    open(inventory, None)
}

/// [`open_state`] for a process that writes rotations: `actor` is recorded in the audit trail
/// of every rotation it begins and every journal row it writes.
pub fn open_state_as(inventory: &Inventory, actor: &Actor) -> anyhow::Result<Arc<dyn StateStore>> {
    open(inventory, Some(actor))
}

fn open(inventory: &Inventory, actor: Option<&Actor>) -> anyhow::Result<Arc<dyn StateStore>> {
    match &inventory.daemon.state {
        StateUrl::Sqlite(path) => {
            let state = match actor {
                Some(actor) => SqliteState::open_as(path, actor),
                None => SqliteState::open(path),
            }
            .with_context(|| format!("opening state {}", path.display()))?;
            tracing::debug!(path = %path.display(), instance = state.instance_id(), "state database opened");
            Ok(Arc::new(state))
        }
    }
}

/// What a state backend failed at.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// SQLite refused a statement.
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state database: cannot create {path}: {source}")]
    /// The database, its directory or its owners' lock directory cannot be created.
    Create {
        /// The path that could not be created.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A stored value this keyrotd cannot read (an unknown phase or status, bad JSON).
    #[error("state database: corrupt record: {0}")]
    Corrupt(String),
    /// The blocking task or the group commit running the query failed, or the handle is
    /// read-only.
    #[error("state database task failed: {0}")]
    Task(String),
    /// This process no longer holds the rotation's lease: nothing was written.
    #[error("rotation {0} is no longer this process's to drive: its lease was lost or released")]
    LeaseLost(String),
    #[error("state database: schema version {found} is newer than this keyrotd understands ({supported}); refusing to open it rather than downgrade it: run the newer keyrotd or restore a backup")]
    /// The database was written by a newer keyrotd.
    TooNew {
        /// Its schema version.
        found: i64,
        /// The newest this binary understands.
        supported: i64,
    },
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
    /// Promoted and past the grace period, but the old credential is still in use
    /// (`revoke = "when_unused"`): its revoke waits for the next check.
    RevokeDelayed,
}

impl Status {
    /// Every status, in the order metrics list them.
    pub const ALL: [Status; 6] = [
        Self::Idle,
        Self::Rotating,
        Self::Grace,
        Self::Retrying,
        Self::Failed,
        Self::RevokeDelayed,
    ];

    /// The stored and exported name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Rotating => "rotating",
            Self::Grace => "grace",
            Self::Retrying => "retrying",
            Self::Failed => "failed",
            Self::RevokeDelayed => "revoke_delayed",
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
    /// The credential's id in the inventory.
    pub id: String,
    /// Its health.
    pub status: Status,
    /// When the current credential was promoted.
    pub issued_at: Option<i64>,
    /// Failed attempts since the last success.
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
    /// The credential it rotates.
    pub credential_id: String,
    /// Why it started: `schedule`, `manual`, `retry`, `initial`.
    pub trigger: String,
    /// When it began.
    pub started_at: i64,
    /// Where it is in the protocol.
    pub phase: Phase,
    /// Public attributes of the new credential, once issued.
    pub new_attrs: Option<Attrs>,
    /// Public attributes of the credential it replaces; `None` when there was none.
    pub old_attrs: Option<Attrs>,
    /// When the old credential is to be revoked (set at promotion).
    pub revoke_at: Option<i64>,
    /// The process driving it, while one does.
    pub owner: Option<String>,
    /// When the owner's lease expires, unless renewed.
    pub lease_until: i64,
    /// The failure that stopped it, if one did.
    pub error: Option<String>,
    /// When it finished (done or rolled back); `None` while it is open.
    pub finished_at: Option<i64>,
}

/// One line of the step log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord {
    /// When, in Unix milliseconds.
    pub at_ms: i64,
    /// The step's name (a [`crate::protocol::Step`], or `adopt`).
    pub step: String,
    /// `start`, `ok`, `error`, `skip`, or `interrupted` (shutdown ended the step; it resumes).
    pub event: String,
    /// The error or the reason, if any (no secret by contract).
    pub detail: Option<String>,
}

/// A line to append to a rotation's step log (see [`StateStore::record`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalLine {
    /// When the event happened, in Unix milliseconds (not when it is written).
    pub at_ms: i64,
    /// The step's name.
    pub step: String,
    /// `start`, `ok`, `error`, `skip` or `interrupted`.
    pub event: String,
    /// The error or the reason, if any (no secret by contract).
    pub detail: Option<String>,
    /// Why the run that writes it started (the audit trail records it on every row).
    pub trigger: Trigger,
}

/// How many write transactions a handle has committed, and how many writes they carried: with
/// group commit many writes share one commit, and each commit is one fsync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitCounts {
    /// Transactions committed.
    pub commits: u64,
    /// Writes (calls) they carried.
    pub writes: u64,
}

/// Another rotation of the same credential is open.
#[derive(Debug, thiserror::Error)]
#[error("rotation {} of `{}` is still open (phase {})", .0.id, .0.credential_id, .0.phase.as_str())]
pub struct Busy(
    /// The open rotation.
    pub Box<RotationRecord>,
);

/// The answer to [`StateStore::claim`].
#[derive(Debug)]
pub enum Claim {
    /// The lease is ours; the rotation as it stands now.
    Taken(Box<RotationRecord>),
    /// A live process holds it.
    Held {
        /// The holder, `host:pid:nonce`.
        owner: String,
    },
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
    /// Appends `lines` to the step log of rotation `rotation_id`, then, if `save` is given, saves
    /// that rotation and credential record as [`StateStore::save`] does: one write, all or
    /// nothing, and only while this process holds the lease (otherwise nothing is written and the
    /// call fails with [`StateError::LeaseLost`]). The engine writes a step's `ok`, the phase it
    /// reached and the next step's `start` this way, in one commit.
    async fn record(
        &self,
        rotation_id: &str,
        lines: &[JournalLine],
        save: Option<(&RotationRecord, &CredentialRecord)>,
    ) -> Result<(), StateError>;
    /// The write transactions this handle has committed since it was opened.
    fn commit_counts(&self) -> CommitCounts;
    /// Recent rotations, newest first, with their step logs.
    async fn history(
        &self,
        credential_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(RotationRecord, Vec<StepRecord>)>, StateError>;
    /// One rotation's journal lines of one step (`notify`, `check_use`), in order: what the
    /// engine reads back about a rotation it drives, without its other steps.
    async fn steps(&self, rotation_id: &str, step: &str) -> Result<Vec<StepRecord>, StateError>;
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
    /// The journal rows `filter` selects, as audit lines, in chain order.
    async fn audit_lines(&self, filter: &AuditFilter) -> Result<Vec<AuditLine>, StateError>;
    /// Walks the journal's hash chain: its first break, or its size and head.
    async fn verify_journal(&self) -> Result<Result<Intact, Break>, StateError>;
    /// Deletes the rotations finished before `before` (Unix seconds) that are superseded and
    /// form a prefix of the journal, moving the chain's checkpoint past their rows.
    async fn prune(&self, before: i64) -> Result<Pruned, StateError>;
}
