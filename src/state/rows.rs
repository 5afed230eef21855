//! How the SQLite backend maps records to rows: the column lists, the (de)serialization of
//! public attributes as JSON, and the statements shared by several calls.
//!
//! Invariants: the column lists and the row readers agree index by index; a value the database
//! holds but this keyrotd cannot read (an unknown phase or status, bad JSON) is
//! [`StateError::Corrupt`], never a panic; a journal row is inserted by [`insert_step`] only,
//! which hashes it into the chain in its transaction;
//! every statement is prepared once per connection (`prepare_cached`).

use std::sync::Arc;

use keyrotd_plugin::Attrs;
use rusqlite::{params, Connection, OptionalExtension};

use super::chain::{self, Line};
use super::writer::uncommitted_failpoint;
use super::{CredentialRecord, RotationRecord, StateError, Status};
use crate::protocol::Phase;

pub(super) const CREDENTIAL_COLUMNS: &str =
    "id, status, issued_at, consecutive_failures, next_attempt_at, last_error, current_attrs, state_lost";

pub(super) const ROTATION_COLUMNS: &str =
    "id, credential_id, trigger, started_at, phase, new_attrs, old_attrs, revoke_at, owner, lease_until, error, finished_at";

pub(super) fn attrs_to_json(attrs: &Option<Attrs>) -> Option<String> {
    attrs
        .as_ref()
        .map(|a| serde_json::to_string(a).expect("a string map serializes"))
}

pub(super) fn attrs_from_json(text: Option<String>) -> Result<Option<Attrs>, StateError> {
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| StateError::Corrupt(format!("attributes: {e}")))
    })
    .transpose()
}

pub(super) fn credential_record(row: &rusqlite::Row<'_>) -> Result<CredentialRecord, StateError> {
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

pub(super) fn rotation_record(row: &rusqlite::Row<'_>) -> Result<RotationRecord, StateError> {
    Ok(RotationRecord {
        id: row.get(0)?,
        credential_id: row.get(1)?,
        trigger: row.get(2)?,
        started_at: row.get(3)?,
        phase: phase(&row.get::<_, String>(4)?)?,
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
pub(super) fn records<T>(
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

pub(super) fn upsert_credential(conn: &Connection, c: &CredentialRecord) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO credentials (id, status, issued_at, consecutive_failures, next_attempt_at, last_error, current_attrs, state_lost)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT(id) DO UPDATE SET status = ?2, issued_at = ?3, consecutive_failures = ?4, next_attempt_at = ?5, last_error = ?6,
           current_attrs = ?7, state_lost = ?8",
    )?
    .execute(params![c.id, c.status.as_str(), c.issued_at, c.consecutive_failures, c.next_attempt_at, c.last_error, attrs_to_json(&c.current_attrs), c.state_lost])?;
    Ok(())
}

/// Inserts a new rotation, begun by `actor` (its row in `actors`).
pub(super) fn insert_rotation(
    conn: &Connection,
    r: &RotationRecord,
    actor: Option<i64>,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO rotations (id, credential_id, trigger, started_at, phase, new_attrs, old_attrs, revoke_at, owner, lease_until, error, finished_at, actor)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        r.id, r.credential_id, r.trigger, r.started_at, r.phase.as_str(), attrs_to_json(&r.new_attrs),
        attrs_to_json(&r.old_attrs), r.revoke_at, r.owner, r.lease_until, r.error, r.finished_at, actor
    ])?;
    Ok(())
}

/// Saves a rotation and its credential record, if `owner` holds the rotation's lease; otherwise
/// writes nothing and fails with [`StateError::LeaseLost`].
pub(super) fn save_rotation(
    conn: &Connection,
    r: &RotationRecord,
    credential: &CredentialRecord,
    owner: &str,
) -> Result<(), StateError> {
    let updated = conn
        .prepare_cached(
            "UPDATE rotations SET phase = ?2, new_attrs = ?3, old_attrs = ?4, revoke_at = ?5, owner = ?6,
               lease_until = ?7, error = ?8, finished_at = ?9
             WHERE id = ?1 AND owner = ?10",
        )?
        .execute(params![
            r.id, r.phase.as_str(), attrs_to_json(&r.new_attrs), attrs_to_json(&r.old_attrs), r.revoke_at, r.owner,
            r.lease_until, r.error, r.finished_at, owner
        ])?;
    if updated == 0 {
        return Err(StateError::LeaseLost(r.id.clone()));
    }
    Ok(upsert_credential(conn, credential)?)
}

/// One journal row to append.
pub(super) struct NewStep<'a> {
    pub(super) rotation_id: &'a str,
    pub(super) at_ms: i64,
    pub(super) step: &'a str,
    pub(super) event: &'a str,
    pub(super) detail: Option<&'a str>,
    pub(super) trigger: &'a str,
}

/// Appends one journal row, chained to the head (see `chain`), as `actor`, inside the caller's
/// write transaction: the one place a journal row is inserted, so every row is hashed in the
/// transaction that inserts it. With `lease_owner`, writes only if that process holds the
/// rotation's lease; returns whether a row was written.
pub(super) fn insert_step(
    conn: &Connection,
    row: &NewStep<'_>,
    lease_owner: Option<&str>,
    actor: Option<&(i64, Arc<str>)>,
) -> Result<bool, StateError> {
    let credential: Option<String> = conn
        .prepare_cached(
            "SELECT credential_id FROM rotations WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)",
        )?
        .query_row(params![row.rotation_id, lease_owner], |r| r.get(0))
        .optional()?;
    let Some(credential_id) = credential else {
        return Ok(false);
    };
    let (head, prev) = chain::head(conn)?;
    let seq = head + 1;
    let hash = Line {
        rotation_id: row.rotation_id,
        credential_id: &credential_id,
        at_ms: row.at_ms,
        step: row.step,
        event: row.event,
        detail: row.detail,
        actor: actor.map(|(_, a)| &**a),
        trigger: Some(row.trigger),
    }
    .link(seq, &prev);
    let (actor, hash) = (actor.map(|(id, _)| *id), &hash[..]);
    conn.prepare_cached(
        "INSERT INTO steps (seq, rotation_id, at_ms, step, event, detail, actor, trigger, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        seq,
        row.rotation_id,
        row.at_ms,
        row.step,
        row.event,
        row.detail,
        actor,
        row.trigger,
        hash
    ])?;
    uncommitted_failpoint(row.step, row.event);
    Ok(true)
}

pub(super) fn query_rotations(
    conn: &Connection,
    filter: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<RotationRecord>, StateError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ROTATION_COLUMNS} FROM rotations {filter}"
    ))?;
    records(&mut stmt, args, 0, rotation_record)
}

/// The phase stored as `name`.
fn phase(name: &str) -> Result<Phase, StateError> {
    Phase::from_name(name).ok_or_else(|| StateError::Corrupt(format!("unknown phase `{name}`")))
}
