//! The audit trail read back and kept bounded: journal rows as the JSON lines `keyrotd audit
//! export` prints and the daemon appends to its audit log, and retention pruning that leaves a
//! checkpoint for the chain (see `chain`).
//!
//! Invariants:
//! - a line says only what the journal holds (ids, times, steps, the actor's identity, the
//!   trigger, the error text, which carries no secret by contract) and the row's chain hash;
//! - pruning removes a prefix of the chain made of whole rotations, each finished before the
//!   cut-off and superseded by a newer promoted or completed rotation of its credential (the
//!   store may still name the newest one), and records the checkpoint in the same transaction.

use rusqlite::{params, Connection, TransactionBehavior};
use serde::Serialize;

use super::chain::{self, Checkpoint};
use super::StateError;

/// One journal row as exported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditLine {
    /// The row's position in the chain.
    pub seq: i64,
    /// When, RFC 3339 in UTC with milliseconds.
    pub time: String,
    /// The credential.
    pub credential: String,
    /// The rotation.
    pub rotation: String,
    /// The step (`issue`, ..., or `adopt`).
    pub step: String,
    /// `start`, `ok`, `error`, `skip` or `interrupted`.
    pub event: String,
    /// Who wrote it (`null` on rows older than the audit trail).
    pub actor: Option<serde_json::Value>,
    /// Why the run that wrote it started.
    pub trigger: String,
    /// The error, on an `error` row.
    pub error: Option<String>,
    /// The provider's own error code (`AccessDenied`, `28P01`), when the error names one.
    pub error_code: Option<String>,
    /// The reason, on other rows that give one.
    pub detail: Option<String>,
    /// The row's chain hash (hex).
    pub hash: String,
}

/// Which rows to export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only rows after this `seq`.
    pub after_seq: i64,
    /// Only rows at or after this time (Unix milliseconds).
    pub since_ms: Option<i64>,
    /// Only this credential's rows.
    pub credential: Option<String>,
    /// At most this many rows.
    pub limit: usize,
}

/// The rows `filter` selects, in chain order.
pub fn lines(conn: &Connection, filter: &AuditFilter) -> Result<Vec<AuditLine>, StateError> {
    let mut stmt = conn.prepare_cached(
        "SELECT s.seq, s.at_ms, r.credential_id, s.rotation_id, s.step, s.event, a.actor,
                COALESCE(s.trigger, r.trigger), s.detail, s.hash
         FROM steps s JOIN rotations r ON r.id = s.rotation_id LEFT JOIN actors a ON a.id = s.actor
         WHERE s.seq > ?1 AND (?2 IS NULL OR s.at_ms >= ?2) AND (?3 IS NULL OR r.credential_id = ?3)
         ORDER BY s.seq LIMIT ?4",
    )?;
    let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
    let mut rows = stmt.query(params![
        filter.after_seq,
        filter.since_ms,
        filter.credential,
        limit
    ])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let at_ms: i64 = r.get(1)?;
        let event: String = r.get(5)?;
        let actor: Option<String> = r.get(6)?;
        let detail: Option<String> = r.get(8)?;
        let hash: Option<Vec<u8>> = r.get(9)?;
        let (error, detail) = if event == "error" {
            (detail, None)
        } else {
            (None, detail)
        };
        let error_code = error.as_deref().and_then(provider_code).map(str::to_owned);
        out.push(AuditLine {
            seq: r.get(0)?,
            time: chrono::DateTime::from_timestamp_millis(at_ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_default(),
            credential: r.get(2)?,
            rotation: r.get(3)?,
            step: r.get(4)?,
            event,
            actor: actor
                .map(|a| serde_json::from_str(&a))
                .transpose()
                .map_err(|e| StateError::Corrupt(format!("actor: {e}")))?,
            trigger: r.get(7)?,
            error,
            error_code,
            detail,
            hash: chain::hex(hash.as_deref().unwrap_or_default()),
        });
    }
    Ok(out)
}

/// The provider's code in a journaled error: `ProviderError` displays it as a trailing
/// ` (provider code CODE)`.
fn provider_code(error: &str) -> Option<&str> {
    let (_, code) = error.rsplit_once(" (provider code ")?;
    code.strip_suffix(')')
        .filter(|c| !c.is_empty() && !c.contains(' '))
}

/// What [`prune`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// Rotations deleted.
    pub rotations: usize,
    /// Journal rows deleted.
    pub rows: i64,
    /// The checkpoint now in place.
    pub checkpoint: Checkpoint,
}

/// A rotation prunable at cut-off `?1`: finished before it and superseded by a newer promoted
/// or completed rotation of the same credential (the store names the newest such one).
const PRUNABLE: &str = "r.finished_at IS NOT NULL AND r.finished_at < ?1 AND EXISTS (
    SELECT 1 FROM rotations n WHERE n.credential_id = r.credential_id
      AND n.phase IN ('promoted', 'done')
      AND (n.started_at, n.id) > (r.started_at, r.id))";

/// Deletes the rotations finished before `before` (Unix seconds) that form a prefix of the
/// chain, with their journal rows, and moves the checkpoint to the last row deleted, inside the
/// caller's write transaction.
pub fn prune(conn: &Connection, before: i64, now: i64) -> Result<Pruned, StateError> {
    let start = chain::checkpoint(conn)?;
    // Each rotation's span in the chain, in chain order, and whether it may go.
    let spans: Vec<(i64, i64, bool)> = conn
        .prepare(&format!(
            "SELECT MIN(s.seq), MAX(s.seq), COALESCE(({PRUNABLE}), 0)
             FROM steps s LEFT JOIN rotations r ON r.id = s.rotation_id
             GROUP BY s.rotation_id ORDER BY MIN(s.seq)"
        ))?
        .query_map([before], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    // The longest prefix of whole prunable rotations: cut after a rotation only where no later
    // rotation has a row before the cut.
    let (mut cut, mut reach) = (start.seq, start.seq);
    for (i, &(_, last, prunable)) in spans.iter().enumerate() {
        if !prunable {
            break;
        }
        reach = reach.max(last);
        if spans.get(i + 1).is_none_or(|&(next, _, _)| next > reach) {
            cut = reach;
        }
    }
    let mut pruned = Pruned {
        rotations: 0,
        rows: 0,
        checkpoint: start,
    };
    if cut > start.seq {
        let (hash, rows): (Option<Vec<u8>>, i64) = conn.query_row(
            "SELECT (SELECT hash FROM steps WHERE seq = ?1), COUNT(*) FROM steps WHERE seq <= ?1",
            [cut],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let hash = hash
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| StateError::Corrupt(format!("journal row {cut} has no hash")))?;
        pruned.rotations += conn.execute(
            "DELETE FROM rotations WHERE id IN (SELECT rotation_id FROM steps WHERE seq <= ?1)",
            [cut],
        )?;
        conn.execute("DELETE FROM steps WHERE seq <= ?1", [cut])?;
        pruned.rows = rows;
        pruned.checkpoint = Checkpoint {
            seq: cut,
            hash,
            pruned: start.pruned + rows,
        };
        conn.execute(
            "INSERT INTO chain_checkpoint (id, seq, hash, pruned, at) VALUES (1, ?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET seq = ?1, hash = ?2, pruned = ?3, at = ?4",
            params![cut, &hash[..], pruned.checkpoint.pruned, now],
        )?;
    }
    // Rotations that never wrote a row are outside the chain.
    pruned.rotations += conn.execute(
        &format!(
            "DELETE FROM rotations AS r WHERE {PRUNABLE}
               AND NOT EXISTS (SELECT 1 FROM steps s WHERE s.rotation_id = r.id)"
        ),
        [before],
    )?;
    Ok(pruned)
}

/// The row id of `actor` (its canonical JSON), added if new.
pub fn register_actor(conn: &mut Connection, actor: &str) -> Result<i64, StateError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute("INSERT OR IGNORE INTO actors (actor) VALUES (?1)", [actor])?;
    let id = tx.query_row("SELECT id FROM actors WHERE actor = ?1", [actor], |r| {
        r.get(0)
    })?;
    tx.commit()?;
    Ok(id)
}
