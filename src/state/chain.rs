//! The journal's hash chain: what makes the step log tamper-evident.
//!
//! Every journal row (`steps`) carries `hash = SHA-256(domain ‖ previous hash ‖ canonical
//! content)`, where the content is the row's own fields plus the two facts it points at that an
//! auditor reads with it: its rotation's credential id and its actor's description. The first
//! row chains to [`GENESIS`], or to the retention checkpoint once older rows were pruned.
//!
//! Invariants:
//! - rows are numbered `seq` = 1, 2, 3, ... without gaps: each insert takes the head's `seq` + 1
//!   inside the transaction that inserts it, so a gap means rows were deleted;
//! - `hash(row n) = link(content(n), hash(row n - 1))`, so editing, deleting or reordering any row
//!   breaks the chain at that row or the next, unless every later hash is recomputed as well;
//! - pruning removes only a prefix of the chain and records the last pruned row's `seq` and hash
//!   (and how many rows were pruned) as the checkpoint the remaining rows chain to;
//! - the encoding is canonical: each field is typed and length-prefixed, so no two different
//!   contents encode alike.
//!
//! The chain proves order and integrity, not authorship: anyone who can write the database can
//! also recompute every hash after an edit. Anchor it by keeping the head hash elsewhere (the
//! exported lines carry each row's hash; `keyrotd audit verify` prints the head).

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use super::StateError;

/// A row's hash.
pub type Hash = [u8; 32];

/// What the first row chains to.
pub const GENESIS: Hash = [0; 32];

/// Separates these hashes from any other SHA-256 use; bumped if the encoding ever changes.
const DOMAIN: &[u8] = b"keyrotd journal v1\0";

/// The content of one journal row, as hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    /// The rotation the row belongs to.
    pub rotation_id: &'a str,
    /// That rotation's credential.
    pub credential_id: &'a str,
    /// When, in Unix milliseconds.
    pub at_ms: i64,
    /// The step's name.
    pub step: &'a str,
    /// `start`, `ok`, `error`, ...
    pub event: &'a str,
    /// The error or reason, if any.
    pub detail: Option<&'a str>,
    /// The actor's canonical description (JSON); `None` on rows older than the audit trail.
    pub actor: Option<&'a str>,
    /// Why the run that wrote it started; `None` on rows older than the audit trail.
    pub trigger: Option<&'a str>,
}

impl Line<'_> {
    /// The hash of this content as row `seq`, chained to `prev`.
    pub fn link(&self, seq: i64, prev: &Hash) -> Hash {
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update(prev);
        h.update(seq.to_be_bytes());
        text(&mut h, self.rotation_id);
        text(&mut h, self.credential_id);
        h.update(self.at_ms.to_be_bytes());
        text(&mut h, self.step);
        text(&mut h, self.event);
        for field in [self.detail, self.actor, self.trigger] {
            match field {
                None => h.update([0]),
                Some(s) => {
                    h.update([1]);
                    text(&mut h, s);
                }
            }
        }
        h.finalize().into()
    }
}

/// A length-prefixed string.
fn text(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_be_bytes());
    h.update(s.as_bytes());
}

/// Lower-case hex, as hashes are printed and exported.
pub fn hex(hash: &[u8]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the chain starts: the last pruned row, or nothing pruned yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The last pruned row's `seq` (0: nothing pruned).
    pub seq: i64,
    /// Its hash ([`GENESIS`] when nothing was pruned).
    pub hash: Hash,
    /// How many rows were pruned in all.
    pub pruned: i64,
}

impl Checkpoint {
    /// The start of a chain nothing was pruned from.
    pub const START: Checkpoint = Checkpoint {
        seq: 0,
        hash: GENESIS,
        pruned: 0,
    };
}

/// Reads a stored hash; anything but 32 bytes is `None` (a row edited behind keyrotd's back).
fn stored(bytes: Option<Vec<u8>>) -> Option<Hash> {
    bytes.and_then(|b| b.try_into().ok())
}

/// The retention checkpoint, or [`Checkpoint::START`].
pub fn checkpoint(conn: &Connection) -> Result<Checkpoint, StateError> {
    let row: Option<(i64, Option<Vec<u8>>, i64)> = conn
        .prepare_cached("SELECT seq, hash, pruned FROM chain_checkpoint WHERE id = 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    match row {
        None => Ok(Checkpoint::START),
        Some((seq, hash, pruned)) => Ok(Checkpoint {
            seq,
            hash: stored(hash)
                .ok_or_else(|| StateError::Corrupt("the chain checkpoint's hash".into()))?,
            pruned,
        }),
    }
}

/// The newest row's `seq` and hash, which the next row chains to: the checkpoint when no row
/// is left. Call it inside the write transaction that inserts the next row.
pub fn head(conn: &Connection) -> Result<(i64, Hash), StateError> {
    let last: Option<(i64, Option<Vec<u8>>)> = conn
        .prepare_cached("SELECT seq, hash FROM steps ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    match last {
        // A head with a damaged hash still numbers the next row; verification reports it.
        Some((seq, hash)) => Ok((seq, stored(hash).unwrap_or(GENESIS))),
        None => checkpoint(conn).map(|c| (c.seq, c.hash)),
    }
}

/// The first place the chain breaks. Every variant names a row by its `seq`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Break {
    /// The row's content (or its rotation's credential, or its actor) no longer matches its
    /// hash, or rows were swapped.
    #[error("journal row {seq} was edited or moved: its content does not match its hash (rows edited, swapped or reordered)")]
    Edited {
        /// The row.
        seq: i64,
    },
    /// Rows `first..=last` are gone from the middle of the chain.
    #[error("journal row {first} was deleted: the chain jumps from row {before} to row {next} ({} row(s) missing)", .next - .first)]
    Deleted {
        /// The first missing row.
        first: i64,
        /// The row before the gap (the checkpoint's row if it is the first after pruning).
        before: i64,
        /// The row after the gap.
        next: i64,
    },
    /// The newest rows are gone: the database numbered rows up to `last`.
    #[error("journal row {first} was deleted: rows {first} to {last} were written, the chain ends at row {}", .first - 1)]
    Truncated {
        /// The first missing row.
        first: i64,
        /// The last row ever written.
        last: i64,
    },
}

/// An intact chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intact {
    /// Rows present.
    pub rows: i64,
    /// The checkpoint they chain to.
    pub checkpoint: Checkpoint,
    /// The newest row's `seq`.
    pub head_seq: i64,
    /// The newest row's hash (the checkpoint's when no row is left).
    pub head: Hash,
}

/// Checks rows one by one in `seq` order, starting from a checkpoint.
#[derive(Debug)]
pub struct Walk {
    checkpoint: Checkpoint,
    seq: i64,
    prev: Hash,
    rows: i64,
}

impl Walk {
    /// A walk starting at `checkpoint`.
    pub fn new(checkpoint: Checkpoint) -> Self {
        Self {
            checkpoint,
            seq: checkpoint.seq,
            prev: checkpoint.hash,
            rows: 0,
        }
    }

    /// Checks the next row, `seq` with content `line` and stored hash `hash`.
    pub fn next(&mut self, seq: i64, line: &Line<'_>, hash: Option<&[u8]>) -> Result<(), Break> {
        if seq <= self.seq {
            // Below the checkpoint or a repeat: a row put back or moved.
            return Err(Break::Edited { seq });
        }
        if seq != self.seq + 1 {
            return Err(Break::Deleted {
                first: self.seq + 1,
                before: self.seq,
                next: seq,
            });
        }
        let expected = line.link(seq, &self.prev);
        if hash != Some(&expected[..]) {
            return Err(Break::Edited { seq });
        }
        self.seq = seq;
        self.prev = expected;
        self.rows += 1;
        Ok(())
    }

    /// Ends the walk; `last_written` is the highest `seq` the database ever gave out.
    pub fn finish(self, last_written: i64) -> Result<Intact, Break> {
        if last_written > self.seq {
            return Err(Break::Truncated {
                first: self.seq + 1,
                last: last_written,
            });
        }
        Ok(Intact {
            rows: self.rows,
            checkpoint: self.checkpoint,
            head_seq: self.seq,
            head: self.prev,
        })
    }
}

/// The rows as the chain hashes them, in `seq` order: the row, its rotation's credential and its
/// actor's description. A row whose rotation is gone hashes with an empty credential, so it fails.
const ROWS: &str =
    "SELECT s.seq, s.rotation_id, COALESCE(r.credential_id, ''), s.at_ms, s.step, s.event,
        s.detail, a.actor, s.trigger, s.hash
    FROM steps s LEFT JOIN rotations r ON r.id = s.rotation_id LEFT JOIN actors a ON a.id = s.actor
    WHERE s.seq > ?1 ORDER BY s.seq LIMIT ?2";

/// Visits the rows after `after` as `(seq, line, stored hash)`, in `seq` order, at most `limit`
/// of them (-1: all).
fn each_row(
    conn: &Connection,
    after: i64,
    limit: i64,
    mut visit: impl FnMut(i64, &Line<'_>, Option<&[u8]>) -> Result<(), StateError>,
) -> Result<(), StateError> {
    let mut stmt = conn.prepare(ROWS)?;
    let mut rows = stmt.query([after, limit])?;
    while let Some(r) = rows.next()? {
        let (rotation_id, credential_id): (String, String) = (r.get(1)?, r.get(2)?);
        let (step, event): (String, String) = (r.get(4)?, r.get(5)?);
        let (detail, actor, trigger): (Option<String>, Option<String>, Option<String>) =
            (r.get(6)?, r.get(7)?, r.get(8)?);
        let hash: Option<Vec<u8>> = r.get(9)?;
        let line = Line {
            rotation_id: &rotation_id,
            credential_id: &credential_id,
            at_ms: r.get(3)?,
            step: &step,
            event: &event,
            detail: detail.as_deref(),
            actor: actor.as_deref(),
            trigger: trigger.as_deref(),
        };
        visit(r.get(0)?, &line, hash.as_deref())?;
    }
    Ok(())
}

/// Walks the whole chain in one read transaction (one snapshot while the daemon appends): the
/// first break, or the intact chain's size and head.
pub fn verify(conn: &mut Connection) -> Result<Result<Intact, Break>, StateError> {
    let tx = conn.transaction()?;
    let conn = &*tx;
    let mut walk = Walk::new(checkpoint(conn)?);
    let mut broken = None;
    each_row(conn, i64::MIN, -1, |seq, line, hash| {
        if broken.is_none() {
            broken = walk.next(seq, line, hash).err();
        }
        Ok(())
    })?;
    if let Some(b) = broken {
        return Ok(Err(b));
    }
    let last_written: i64 = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'steps'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    Ok(walk.finish(last_written))
}

/// Hashes every row in `seq` order from the start (the migration that introduced the chain).
/// A batch at a time, so a long history never sits in memory whole.
pub fn chain_existing(conn: &Connection) -> Result<(), StateError> {
    let (mut after, mut prev) = (i64::MIN, GENESIS);
    let mut update = conn.prepare("UPDATE steps SET hash = ?2 WHERE seq = ?1")?;
    loop {
        let mut hashes = Vec::new();
        each_row(conn, after, 10_000, |seq, line, _| {
            prev = line.link(seq, &prev);
            hashes.push((seq, prev));
            Ok(())
        })?;
        let Some(&(last, _)) = hashes.last() else {
            return Ok(());
        };
        for (seq, hash) in hashes {
            update.execute(params![seq, &hash[..]])?;
        }
        after = last;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: &str) -> Line<'_> {
        Line {
            rotation_id: "r1",
            credential_id: "db",
            at_ms: 1_700_000_000_000,
            step,
            event: "ok",
            detail: None,
            actor: Some(r#"{"kind":"daemon","host":"h","pid":1,"version":"0.1.0"}"#),
            trigger: Some("schedule"),
        }
    }

    /// A chain of `n` rows from `start`: (seq, step name, hash).
    fn chain(start: Checkpoint, steps: &[&'static str]) -> Vec<(i64, &'static str, Hash)> {
        let mut prev = start.hash;
        let mut out = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            let seq = start.seq + 1 + i as i64;
            prev = line(step).link(seq, &prev);
            out.push((seq, *step, prev));
        }
        out
    }

    fn walk(start: Checkpoint, rows: &[(i64, &str, Hash)], written: i64) -> Result<Intact, Break> {
        let mut w = Walk::new(start);
        for (seq, step, hash) in rows {
            w.next(*seq, &line(step), Some(&hash[..]))?;
        }
        w.finish(written)
    }

    const STEPS: [&str; 4] = ["issue", "stage", "activate", "verify"];

    #[test]
    fn every_field_and_the_previous_hash_change_the_hash() {
        let base = line("issue");
        let h = base.link(1, &GENESIS);
        assert_eq!(h, base.link(1, &GENESIS), "deterministic");
        let variants = [
            Line {
                rotation_id: "r2",
                ..base
            },
            Line {
                credential_id: "dc",
                ..base
            },
            Line {
                at_ms: base.at_ms + 1,
                ..base
            },
            Line {
                step: "stage",
                ..base
            },
            Line {
                event: "error",
                ..base
            },
            Line {
                detail: Some("x"),
                ..base
            },
            Line {
                actor: None,
                ..base
            },
            Line {
                trigger: Some("manual"),
                ..base
            },
            // Length prefixes: moving a character between fields is another content.
            Line {
                rotation_id: "r1d",
                credential_id: "b",
                ..base
            },
            Line {
                detail: Some(""),
                ..base
            },
        ];
        for v in variants {
            assert_ne!(v.link(1, &GENESIS), h, "{v:?}");
        }
        assert_ne!(base.link(2, &GENESIS), h, "the position");
        assert_ne!(base.link(1, &[1; 32]), h, "the previous row");
        assert_eq!(hex(&h).len(), 64);
    }

    #[test]
    fn an_intact_chain_reports_its_size_and_head() {
        let rows = chain(Checkpoint::START, &STEPS);
        let ok = walk(Checkpoint::START, &rows, 4).unwrap();
        assert_eq!((ok.rows, ok.head_seq, ok.head), (4, 4, rows[3].2));
        let empty = walk(Checkpoint::START, &[], 0).unwrap();
        assert_eq!((empty.rows, empty.head), (0, GENESIS));
    }

    #[test]
    fn an_edited_row_is_named() {
        let rows = chain(Checkpoint::START, &STEPS);
        let mut edited = rows.clone();
        edited[2].1 = "promote";
        assert_eq!(
            walk(Checkpoint::START, &edited, 4),
            Err(Break::Edited { seq: 3 })
        );
        let mut rehashed = rows.clone();
        rehashed[1].2 = [7; 32];
        assert_eq!(
            walk(Checkpoint::START, &rehashed, 4),
            Err(Break::Edited { seq: 2 })
        );
    }

    #[test]
    fn a_deleted_row_is_named_in_the_middle_and_at_the_end() {
        let rows = chain(Checkpoint::START, &STEPS);
        let mut gap = rows.clone();
        gap.remove(1);
        let err = walk(Checkpoint::START, &gap, 4).unwrap_err();
        assert_eq!(
            err,
            Break::Deleted {
                first: 2,
                before: 1,
                next: 3
            }
        );
        assert!(
            err.to_string().contains("journal row 2 was deleted"),
            "{err}"
        );
        let err = walk(Checkpoint::START, &rows[..3], 4).unwrap_err();
        assert_eq!(err, Break::Truncated { first: 4, last: 4 });
        assert!(
            err.to_string().contains("journal row 4 was deleted"),
            "{err}"
        );
    }

    #[test]
    fn swapped_rows_are_caught_with_or_without_their_hashes() {
        let rows = chain(Checkpoint::START, &STEPS);
        // Rows 2 and 3 trade places, each taking its stored hash along (seq stays in order).
        let mut moved = rows.clone();
        (moved[1].1, moved[2].1) = (rows[2].1, rows[1].1);
        (moved[1].2, moved[2].2) = (rows[2].2, rows[1].2);
        assert_eq!(
            walk(Checkpoint::START, &moved, 4),
            Err(Break::Edited { seq: 2 })
        );
        // ... or only their contents trade places.
        let mut contents = rows.clone();
        (contents[1].1, contents[2].1) = (rows[2].1, rows[1].1);
        assert_eq!(
            walk(Checkpoint::START, &contents, 4),
            Err(Break::Edited { seq: 2 })
        );
    }

    #[test]
    fn a_checkpoint_continues_the_chain_and_the_row_after_it_is_guarded() {
        let all = chain(Checkpoint::START, &STEPS);
        let checkpoint = Checkpoint {
            seq: 2,
            hash: all[1].2,
            pruned: 2,
        };
        let kept = &all[2..];
        let ok = walk(checkpoint, kept, 4).unwrap();
        assert_eq!((ok.rows, ok.head, ok.checkpoint.pruned), (2, all[3].2, 2));
        let err = walk(checkpoint, &kept[1..], 4).unwrap_err();
        assert_eq!(
            err,
            Break::Deleted {
                first: 3,
                before: 2,
                next: 4
            }
        );
        // A pruned row put back below the checkpoint.
        assert_eq!(
            walk(checkpoint, &all[1..], 4),
            Err(Break::Edited { seq: 2 })
        );
        // A wrong checkpoint hash breaks the first kept row.
        let forged = Checkpoint {
            hash: [9; 32],
            ..checkpoint
        };
        assert_eq!(walk(forged, kept, 4), Err(Break::Edited { seq: 3 }));
    }
}
