//! The inventory as the running daemon holds it: each credential's spec, its cron group and
//! its live view (status, last promotion, failures, next wake-up), which metrics read at scrape
//! time and the scheduler updates after each run.
//!
//! Invariant: the specs stay in the vector the loader built, index for index with the live views
//! and cron groups; a slot's index never changes while the table lives (a reload builds a new
//! table).

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{TimeZone, Utc};

use crate::config::CredentialSpec;
use crate::engine::Outcome;
use crate::protocol::Phase;
use crate::schedule::{secs, CronSchedule, Due};
use crate::state::{CredentialRecord, RotationRecord, Status};

/// How long to wait before looking again at a credential another process is rotating (or whose
/// run could not reach the state store), in seconds.
pub(crate) const BUSY_RETRY: i64 = 60;

/// What the daemon knows of one credential now; read by metrics and updated after each run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    /// The credential's status (`rotating` while a run is in flight here).
    pub status: Status,
    /// When the current credential was promoted (Unix seconds).
    pub issued_at: Option<i64>,
    /// Failed attempts since the last success.
    pub consecutive_failures: u32,
    /// The next heap wake-up (retry, revocation, interval), if any.
    pub wake: Option<i64>,
    /// While the revoke waits for the old credential to go unused: when its provider last saw
    /// it used (Unix seconds), as the last check reported.
    pub old_last_used: Option<i64>,
    /// When the current credential stops working by itself: its public attribute `not_after`
    /// (RFC 3339; a certificate's notAfter), if it has one.
    pub expires_at: Option<i64>,
}

/// The attribute that dates a credential's expiry ([`Live::expires_at`]).
pub const NOT_AFTER: &str = "not_after";

impl Live {
    /// When the current credential goes stale: `max_age` after its promotion, or at its expiry
    /// if that comes first. A certificate is therefore stale at its notAfter at the latest.
    pub fn stale_at(&self, spec: &CredentialSpec) -> Option<i64> {
        let by_age = self.issued_at.map(|t| t.saturating_add(secs(spec.max_age)));
        match (by_age, self.expires_at) {
            (Some(age), Some(expiry)) => Some(age.min(expiry)),
            (age, expiry) => age.or(expiry),
        }
    }

    /// The max age in force, in seconds: `max_age`, shortened to end at the expiry. Metrics
    /// export it, so the stale alert (`time() - issued > max_age`) fires at the expiry.
    pub fn max_age_secs(&self, spec: &CredentialSpec) -> i64 {
        match (self.issued_at, self.stale_at(spec)) {
            (Some(issued), Some(stale)) => stale.saturating_sub(issued).max(0),
            _ => secs(spec.max_age),
        }
    }

    /// For a credential that expires, the latest time its rotation is due: before
    /// [`Self::stale_at`] by the slack the schedule leaves for retries (`max_age -
    /// rotate_every`), but by no more than a third of its lifetime, so that a certificate
    /// shorter than that slack is renewed at two thirds of its life rather than at once, again
    /// and again. A certificate Vault issued shorter than `max_age` is thus renewed in time.
    fn renew_by(&self, spec: &CredentialSpec) -> Option<i64> {
        self.expires_at?;
        let (issued, stale) = (self.issued_at?, self.stale_at(spec)?);
        let slack = secs(spec.max_age.saturating_sub(spec.period));
        let lead = slack.min(stale.saturating_sub(issued).max(0) / 3);
        Some(stale.saturating_sub(lead))
    }
}

/// The expiry a record's current attributes state ([`NOT_AFTER`]).
fn expiry(record: &CredentialRecord) -> Option<i64> {
    let text = record.current_attrs.as_ref()?.get(NOT_AFTER)?;
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp())
}

/// One inventory entry and its live view, as borrowed from the [`Table`].
#[derive(Clone, Copy)]
pub struct Slot<'a> {
    /// The credential as configured.
    pub spec: &'a CredentialSpec,
    /// Index of its cron group, if it has a cron schedule.
    pub group: Option<usize>,
    /// Its live view; lock it with [`lock`].
    pub live: &'a Mutex<Live>,
}

/// The inventory as the running daemon holds it. The specs stay in the vector the loader built
/// (copying 100,000 of them into another would double the start-up peak); the live views and
/// cron groups sit beside them, index for index.
pub struct Table {
    specs: Vec<CredentialSpec>,
    lives: Vec<Mutex<Live>>,
    group_of: Vec<Option<usize>>,
    /// Distinct cron schedules; each fires all its members.
    pub groups: Vec<CronGroup>,
}

/// Credentials sharing one cron schedule.
pub struct CronGroup {
    /// The schedule, parsed once (members share it).
    pub schedule: CronSchedule,
    /// The members' slot indexes, in inventory order.
    pub members: Vec<usize>,
}

impl Table {
    /// Builds the table from the inventory and the stored state.
    pub fn new(
        specs: Vec<CredentialSpec>,
        records: Vec<CredentialRecord>,
        open: &[RotationRecord],
    ) -> Self {
        Self::new_at(specs, records, open, Utc::now().timestamp())
    }

    /// [`Table::new`] with the live views computed at `now` (Unix seconds).
    pub(crate) fn new_at(
        specs: Vec<CredentialSpec>,
        mut records: Vec<CredentialRecord>,
        open: &[RotationRecord],
        now: i64,
    ) -> Self {
        // Sorted in place and searched, rather than moved into a map keyed by a copy of each id:
        // at 100,000 credentials the map and the vector it was built from would coexist, the
        // largest transient of start-up.
        records.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let open: HashMap<&str, &RotationRecord> =
            open.iter().map(|r| (r.credential_id.as_str(), r)).collect();
        let mut groups: Vec<CronGroup> = Vec::new();
        let mut group_index: HashMap<(String, chrono_tz::Tz), usize> = HashMap::new();
        let mut lives = Vec::with_capacity(specs.len());
        let mut group_of = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            group_of.push(spec.schedule.cron.as_ref().map(|c| {
                let g = *group_index
                    .entry((c.expression.clone(), c.timezone))
                    .or_insert_with(|| {
                        groups.push(CronGroup {
                            schedule: c.clone(),
                            members: Vec::new(),
                        });
                        groups.len() - 1
                    });
                groups[g].members.push(i);
                g
            }));
            let fresh;
            let record = match records.binary_search_by(|r| r.id.as_str().cmp(&spec.id)) {
                Ok(at) => &records[at],
                Err(_) => {
                    fresh = CredentialRecord::new(&spec.id);
                    &fresh
                }
            };
            let live = live_view(spec, record, open.get(spec.id.as_str()).copied(), now);
            lives.push(Mutex::new(live));
        }
        Self {
            specs,
            lives,
            group_of,
            groups,
        }
    }

    /// How many credentials.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// Whether the inventory is empty.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Credential `i`.
    pub fn slot(&self, i: usize) -> Slot<'_> {
        Slot {
            spec: &self.specs[i],
            group: self.group_of[i],
            live: &self.lives[i],
        }
    }

    /// Every credential, in inventory order.
    pub fn slots(&self) -> impl Iterator<Item = Slot<'_>> {
        (0..self.len()).map(|i| self.slot(i))
    }
}

/// The live view of a credential, with its next heap wake-up.
pub fn live_view(
    spec: &CredentialSpec,
    record: &CredentialRecord,
    open: Option<&RotationRecord>,
    now: i64,
) -> Live {
    let wake = match (record.status, open) {
        (Status::Failed, _) => None,
        (_, Some(r)) if r.phase == Phase::Promoted => match (record.next_attempt_at, r.revoke_at) {
            (Some(retry), Some(revoke)) => Some(retry.max(revoke)),
            (retry, revoke) => retry.or(revoke).or(Some(now)),
        },
        // An unfinished rotation (a crash or shutdown interrupted it) resumes now, or at its retry.
        (_, Some(_)) => Some(record.next_attempt_at.unwrap_or(now)),
        (Status::Retrying, None) => record.next_attempt_at.or(Some(now)),
        (_, None) => {
            let last = record
                .issued_at
                .and_then(|t| Utc.timestamp_opt(t, 0).single());
            match spec.schedule.due(
                last,
                Utc.timestamp_opt(now, 0).single().unwrap_or_else(Utc::now),
            ) {
                Due::At(t) => Some(t.timestamp()),
                Due::NextCronFire => None,
            }
        }
    };
    let mut live = Live {
        status: record.status,
        issued_at: record.issued_at,
        consecutive_failures: record.consecutive_failures,
        wake,
        old_last_used: None,
        expires_at: expiry(record),
    };
    if let (Status::Idle, None, Some(renew_by)) = (record.status, open, live.renew_by(spec)) {
        live.wake = Some(live.wake.map_or(renew_by, |w| w.min(renew_by)));
    }
    live
}

/// The live view of a credential after an engine run that ended with `outcome` and left
/// `record`, with its next heap wake-up: the revocation time while in grace, a later look at a
/// credential another process holds, nothing while parked or stopped, the retry time after a
/// failure, and otherwise what the schedule says.
pub(crate) fn live_after_run(
    spec: &CredentialSpec,
    outcome: &Outcome,
    record: &CredentialRecord,
    now: i64,
) -> Live {
    let open_wake = match outcome {
        Outcome::Promoted { revoke_at, .. }
        | Outcome::InGrace { revoke_at, .. }
        | Outcome::RevokeDelayed { revoke_at, .. } => Some(Some(*revoke_at)),
        Outcome::Busy { .. } => Some(Some(now + BUSY_RETRY)),
        Outcome::Parked { .. } | Outcome::Stopped => Some(None),
        Outcome::Completed { .. } | Outcome::Failed { .. } => None,
    };
    let mut live = live_view(spec, record, None, now);
    if let Some(wake) = open_wake {
        live.wake = wake;
    }
    if let Outcome::RevokeDelayed { last_used, .. } = outcome {
        live.old_last_used = *last_used;
    }
    if let Outcome::Failed { .. } = outcome {
        // A failure at or after promotion leaves the rotation open: retry it when due.
        live.wake = record.next_attempt_at;
    }
    live
}

/// Locks a live view; a poisoned lock still holds plain data that is safe to read.
pub fn lock(m: &Mutex<Live>) -> std::sync::MutexGuard<'_, Live> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
