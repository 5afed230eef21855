//! The operator commands besides `run`: `check`, `status`, `rotate`, `adopt` and `history`. Each
//! prints for a person by default; `status --json` prints for a program.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use futures_util::StreamExt;
use keyrotd_plugin::{Rotator, StepContext};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

mod hooks;

use crate::config::{CredentialSpec, Inventory, StateUrl};
use crate::engine::{public_only, state_lost_message, waiting_reason, Engine, Outcome};
use crate::fmt::{human, time};
use crate::metrics::Metrics;
use crate::protocol::{Phase, Trigger};
use crate::scheduler::live_view;
use crate::state::{
    check_removed, open_state, open_state_as, Actor, Busy, CredentialRecord, RotationRecord,
    SqliteState, StateStore, Status,
};

/// Exit status: the operation failed (a rotation failed, a credential is busy).
pub const EXIT_FAILED: u8 = 1;

/// Exit status: a usage or configuration error (also an inventory that removes a credential
/// whose rotation is still open).
pub const EXIT_USAGE: u8 = 2;

/// `keyrotd check`: reads every `vault:` reference (reporting one it cannot read), then prints
/// each credential with its next three rotation times. Reads the state
/// database if it exists, never writes it. Refuses an inventory that removed a credential whose
/// rotation is still open (see [`check_removed`]).
pub async fn check(inventory: &Inventory) -> anyhow::Result<()> {
    crate::config::check_vault_references(inventory).await?;
    let records: HashMap<String, CredentialRecord> = match &inventory.daemon.state {
        StateUrl::Sqlite(path) => match SqliteState::open_read_only(path)? {
            Some(state) => {
                // An empty database (no tables yet) has no open rotation.
                if let Ok(open) = state.open_rotations().await {
                    check_removed(&inventory.credentials, &open)?;
                }
                state
                    .credentials()
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| (r.id.clone(), r))
                    .collect()
            }
            None => HashMap::new(),
        },
    };
    let now = Utc::now();
    println!(
        "{}: {} credential(s) OK",
        inventory.path.display(),
        inventory.credentials.len()
    );
    for spec in &inventory.credentials {
        let last = records
            .get(&spec.id)
            .and_then(|r| r.issued_at)
            .and_then(|t| Utc.timestamp_opt(t, 0).single());
        let next: Vec<String> = spec
            .schedule
            .upcoming(last, now, 3)
            .iter()
            .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
            .collect();
        let store = spec.store.build().map(|s| s.location()).unwrap_or_default();
        println!(
            "  {}  rotator={} store={}:{}  max_age={} grace={}  next: {}",
            spec.id,
            spec.rotator.kind(),
            spec.store.kind(),
            store,
            human(spec.max_age),
            human(spec.grace),
            next.join(", ")
        );
    }
    Ok(())
}

/// One row of `keyrotd status`.
#[derive(Serialize)]
struct StatusRow {
    id: String,
    rotator: &'static str,
    store: &'static str,
    state: &'static str,
    age_seconds: Option<i64>,
    max_age_seconds: u64,
    stale: bool,
    last_rotation: Option<DateTime<Utc>>,
    /// When the next rotation starts (or an unfinished one resumes); during grace, the next
    /// rotation after the pending revoke, never the revoke itself.
    next_rotation: Option<DateTime<Utc>>,
    /// When the old credential of a promoted rotation is revoked (the retry time after a failed
    /// revoke); `None` when no revoke is pending.
    revoke_at: Option<DateTime<Utc>>,
    consecutive_failures: u32,
    last_error: Option<String>,
    /// The store names a rotation the state database does not know: state lost or foreign.
    state_lost: bool,
    /// The rotation the store names, when it names one.
    store_rotation: Option<String>,
    /// While the revoke waits for the old credential to go unused: why, from the latest check.
    waiting: Option<String>,
    /// With `status ID`: the delivery hooks' latest results.
    #[serde(skip_serializing_if = "Option::is_none")]
    hooks: Option<Vec<hooks::HookResult>>,
}

/// How many stores `status` and `adopt` read at once.
const STORE_READS: usize = 16;

/// What the store says about a credential, for `status`.
struct StoreCheck {
    rotation: Option<String>,
    /// The store names a rotation the state database does not know.
    lost: Option<String>,
}

/// Asks every credential's store which rotation wrote its value, and the state database whether
/// it knows that rotation. A store that cannot be read is reported on stderr and left out.
async fn check_stores(
    inventory: &Inventory,
    state: &Arc<dyn StateStore>,
) -> anyhow::Result<HashMap<String, StoreCheck>> {
    let checks = futures_util::stream::iter(&inventory.credentials)
        .map(|spec| async move {
            let plugins = spec
                .rotator
                .build()
                .and_then(|r| spec.store.build().map(|s| (r, s)));
            let result = match plugins {
                Ok((rotator, store)) => store
                    .last_rotation(context(spec, rotator.as_ref()))
                    .await
                    .map(|named| (named, store.location()))
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            (spec, result)
        })
        .buffer_unordered(STORE_READS)
        .collect::<Vec<_>>()
        .await;
    let mut out = HashMap::new();
    for (spec, result) in checks {
        match result {
            Ok((rotation, location)) => {
                let lost = match &rotation {
                    Some(r) if !state.knows_rotation(&spec.id, r).await? => {
                        Some(state_lost_message(&spec.id, &location, r))
                    }
                    _ => None,
                };
                out.insert(spec.id.clone(), StoreCheck { rotation, lost });
            }
            Err(e) => eprintln!(
                "warning: credential `{}`: cannot read which rotation wrote its store's value: {e}",
                spec.id
            ),
        }
    }
    Ok(out)
}

/// A step context for reading a store outside any rotation.
fn context<'a>(spec: &'a CredentialSpec, rotator: &'a dyn Rotator) -> StepContext<'a> {
    StepContext {
        credential_id: &spec.id,
        rotation_id: "",
        secret_field: rotator.secret_field(),
        old_attrs: None,
        started_at: std::time::SystemTime::now(),
    }
}

/// `keyrotd status [--json]`. Also reads every store, to tell whether the state database knows
/// the rotation that wrote it. Returns [`EXIT_FAILED`] when a credential's state is lost or
/// foreign, so that scripts and monitoring notice.
pub async fn status(inventory: &Inventory, json: bool, only: Option<&str>) -> anyhow::Result<u8> {
    let filtered = only.map(|id| hooks::only(inventory, id)).transpose()?;
    let inventory = filtered.as_ref().unwrap_or(inventory);
    let state = open_state(inventory)?;
    let mut stores = check_stores(inventory, &state).await?;
    let records: HashMap<String, CredentialRecord> = state
        .credentials()
        .await?
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    let open = state.open_rotations().await?;
    let mut waiting = HashMap::new();
    for record in records.values() {
        if record.status == Status::RevokeDelayed {
            waiting.insert(
                record.id.clone(),
                waiting_reason(state.as_ref(), &record.id).await?,
            );
        }
    }
    let now = Utc::now();
    let mut rows: Vec<StatusRow> = inventory
        .credentials
        .iter()
        .map(|spec| {
            let record = records
                .get(&spec.id)
                .cloned()
                .unwrap_or_else(|| CredentialRecord::new(&spec.id));
            let open = open.iter().find(|r| r.credential_id == spec.id);
            let live = live_view(spec, &record, open, now.timestamp());
            let last = record
                .issued_at
                .and_then(|t| Utc.timestamp_opt(t, 0).single());
            let (next, revoke_at) = next_and_revoke(spec, open, live.wake, last, now);
            let age = record.issued_at.map(|t| now.timestamp() - t);
            let store = stores.remove(&spec.id);
            // An unreadable store: what the last run found.
            let lost = match &store {
                Some(s) => s.lost.clone(),
                None => record.state_lost.as_ref().and(record.last_error.clone()),
            };
            StatusRow {
                id: spec.id.clone(),
                rotator: spec.rotator.kind(),
                store: spec.store.kind(),
                state: if lost.is_some() {
                    Status::Failed.as_str()
                } else {
                    record.status.as_str()
                },
                age_seconds: age,
                // A certificate's max age ends at its notAfter.
                max_age_seconds: live.max_age_secs(spec) as u64,
                stale: age.is_none_or(|a| a > live.max_age_secs(spec)),
                last_rotation: last,
                next_rotation: next,
                revoke_at,
                consecutive_failures: record.consecutive_failures,
                state_lost: lost.is_some(),
                last_error: lost.or(record.last_error),
                store_rotation: store.and_then(|s| s.rotation),
                waiting: waiting.remove(&spec.id).flatten(),
                hooks: None,
            }
        })
        .collect();
    if only.is_some() {
        for (row, spec) in rows.iter_mut().zip(&inventory.credentials) {
            row.hooks = Some(hooks::latest(&state, spec).await?);
        }
    }
    let code = if rows.iter().any(|r| r.state_lost) {
        EXIT_FAILED
    } else {
        0
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(code);
    }
    println!(
        "{:<24} {:<20} {:<20} {:>10} {:>10} {:<21} {:<21} {:<21} STATE",
        "ID", "ROTATOR", "STORE", "AGE", "MAX AGE", "LAST ROTATION", "NEXT ROTATION", "REVOKE AT"
    );
    for r in &rows {
        let age = r.age_seconds.map_or_else(
            || "-".into(),
            |a| human(std::time::Duration::from_secs(a.max(0) as u64)),
        );
        let state = if r.state_lost {
            format!("{} (state lost or foreign)", r.state)
        } else if r.stale {
            format!("{} (stale)", r.state)
        } else if let Some(why) = &r.waiting {
            format!("{} ({why})", r.state)
        } else {
            r.state.to_owned()
        };
        println!(
            "{:<24} {:<20} {:<20} {:>10} {:>10} {:<21} {:<21} {:<21} {}",
            r.id,
            r.rotator,
            r.store,
            age,
            human(std::time::Duration::from_secs(r.max_age_seconds)),
            time(r.last_rotation.map(|t| t.timestamp())),
            time(r.next_rotation.map(|t| t.timestamp())),
            time(r.revoke_at.map(|t| t.timestamp())),
            state
        );
    }
    for hooks in rows.iter().filter_map(|r| r.hooks.as_deref()) {
        hooks::print(hooks);
    }
    for r in rows.iter().filter(|r| r.state_lost) {
        eprintln!(
            "error: credential `{}`: {}",
            r.id,
            r.last_error.as_deref().unwrap_or_default()
        );
    }
    Ok(code)
}

/// The next rotation and the pending revoke of a credential, for `status`. `wake` is when the
/// scheduler next acts on it ([`live_view`]): for a promoted rotation that is the revoke (or its
/// retry), and the next rotation is the schedule's, but no earlier than the revoke, since a
/// credential starts no rotation during its grace period. Otherwise `wake` is the next rotation
/// (or the resumption of an unfinished one) and no revoke is pending.
fn next_and_revoke(
    spec: &CredentialSpec,
    open: Option<&RotationRecord>,
    wake: Option<i64>,
    last: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let at = |t: i64| Utc.timestamp_opt(t, 0).single();
    match open.filter(|r| r.phase == Phase::Promoted) {
        Some(promoted) => {
            // A credential marked failed has no wake-up: its revoke waits at the planned time.
            // No revoke time while delivery hooks are pending (`revoke_at` unset).
            let revoke = promoted
                .revoke_at
                .and(wake.or(promoted.revoke_at))
                .and_then(at);
            let next = spec
                .schedule
                .next_rotation(last, now)
                .map(|next| revoke.map_or(next, |revoke| next.max(revoke)));
            (next, revoke)
        }
        None => (
            wake.and_then(at)
                .or_else(|| spec.schedule.next_rotation(last, now)),
            None,
        ),
    }
}

/// `keyrotd rotate ID [--dry-run]`. Returns the exit status.
pub async fn rotate(inventory: &Inventory, id: &str, dry_run: bool) -> anyhow::Result<u8> {
    let spec = find(inventory, id)?;
    if dry_run {
        return dry_run_plan(spec).await;
    }
    let state = open_state_as(inventory, &Actor::cli())?;
    state
        .ensure_credentials(std::slice::from_ref(&spec.id))
        .await?;
    let metrics = Metrics::new()?;
    let engine = Engine::new(state, metrics.engine, None, CancellationToken::new());
    let (outcome, record) = engine.run(spec, Trigger::Manual).await?;
    let (code, message) = match outcome {
        Outcome::Promoted { rotation, revoke_at } => {
            (0, format!("{id}: rotation {rotation} promoted; the old credential is revoked at {} by the daemon", time(Some(revoke_at))))
        }
        Outcome::Completed { rotation } => (0, format!("{id}: rotation {rotation} complete; the old credential is revoked")),
        Outcome::InGrace { rotation, revoke_at } => {
            (EXIT_FAILED, format!("{id}: rotation {rotation} is in its grace period until {}; try again after", time(Some(revoke_at))))
        }
        Outcome::Busy { rotation, owner } => (EXIT_FAILED, format!("{id}: rotation {rotation} is being run by {owner}")),
        Outcome::Stopped => (EXIT_FAILED, format!("{id}: marked failed: {}", record.last_error.unwrap_or_default())),
        Outcome::Failed { rotation, error } => (EXIT_FAILED, format!("rotation {rotation} failed: {error}")),
        Outcome::Parked { rotation } => (EXIT_FAILED, format!("{id}: rotation {rotation} parked")),
        Outcome::RevokeDelayed { rotation, revoke_at, reason, .. } => {
            (EXIT_FAILED, format!("{id}: the old credential of rotation {rotation} is still in use ({reason}); no rotation starts before it is revoked; the daemon checks again at {}", time(Some(revoke_at))))
        }
    };
    if code == 0 {
        report(format_args!("{message}"));
    } else {
        report_error(format_args!("error: {message}"));
    }
    Ok(code)
}

/// Prints a line of `rotate`'s output. The rotation is over by then and the exit status carries
/// its outcome, so a reader that went away (`keyrotd rotate db | head -0`) is not an error.
fn report(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// [`report`] on stderr.
fn report_error(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Shows what a rotation would do and checks the store is readable; changes nothing.
async fn dry_run_plan(spec: &CredentialSpec) -> anyhow::Result<u8> {
    let rotator = spec.rotator.build().map_err(anyhow::Error::msg)?;
    let store = spec.store.build().map_err(anyhow::Error::msg)?;
    let ctx = StepContext {
        credential_id: &spec.id,
        rotation_id: "dry-run",
        secret_field: rotator.secret_field(),
        started_at: std::time::SystemTime::now(),
        old_attrs: None,
    };
    match store.current(ctx).await {
        Ok(current) => {
            report(format_args!(
                "{}: would rotate with {} into {} {}",
                spec.id,
                rotator.kind(),
                store.kind(),
                store.location()
            ));
            report(format_args!(
                "  current value: {}",
                if current.is_some() {
                    "present"
                } else {
                    "none yet (first issuance)"
                }
            ));
            report(format_args!("  steps: issue, stage, activate, verify, promote; revoke the old one {} after promotion", human(spec.grace)));
            Ok(0)
        }
        Err(e) => {
            report_error(format_args!(
                "error: credential `{}`: reading the current value from the store failed: {e}",
                spec.id
            ));
            Ok(EXIT_FAILED)
        }
    }
}

/// `keyrotd adopt ID`: accepts the value the store holds, written by a rotation the state
/// database does not know, as the credential's current value. Issues and revokes nothing: it
/// records that rotation as finished (trigger `adopt`), so the engine's start-of-run check passes
/// and automation resumes. The value's age is unknown, so the credential is due at once. An
/// unfinished rotation the database still has open is closed as rolled back, and what it may
/// have left at the provider is printed for the operator to check.
pub async fn adopt(inventory: &Inventory, id: &str) -> anyhow::Result<u8> {
    let spec = find(inventory, id)?;
    let rotator = spec.rotator.build().map_err(anyhow::Error::msg)?;
    let store = spec.store.build().map_err(anyhow::Error::msg)?;
    let location = store.location();
    let state = open_state_as(inventory, &Actor::cli())?;
    let ctx = context(spec, rotator.as_ref());
    let read = |what: &str, e| {
        anyhow::anyhow!("credential `{id}`: reading {what} from the store {location} failed: {e}")
    };
    let Some(rotation) = store
        .last_rotation(ctx)
        .await
        .map_err(|e| read("which rotation wrote its value", e))?
    else {
        eprintln!("error: {id}: the store {location} names no rotation: nothing to adopt");
        return Ok(EXIT_FAILED);
    };
    if state.knows_rotation(id, &rotation).await? {
        println!("{id}: rotation {rotation} in {location} is already known; nothing to adopt");
        return Ok(0);
    }
    let attrs = store
        .current(ctx)
        .await
        .map_err(|e| read("the current value", e))?
        .map(|c| public_only(rotator.as_ref(), &c.attrs));
    let now = Utc::now().timestamp();
    let adopted = RotationRecord {
        id: rotation.clone(),
        credential_id: id.to_owned(),
        trigger: "adopt".into(),
        started_at: now,
        phase: Phase::Done,
        new_attrs: attrs.clone(),
        old_attrs: None,
        revoke_at: None,
        owner: None,
        lease_until: 0,
        error: None,
        finished_at: Some(now),
    };
    let mut record = state
        .credential(id)
        .await?
        .unwrap_or_else(|| CredentialRecord::new(id));
    record.succeed(Status::Idle);
    record.issued_at = None;
    record.current_attrs = attrs;
    record.state_lost = None;
    match state.adopt(&adopted, &record, now).await? {
        Err(Busy(open)) => {
            eprintln!(
                "error: {id}: rotation {} is being run by {}; try again once it stops",
                open.id,
                open.owner.unwrap_or_default()
            );
            return Ok(EXIT_FAILED);
        }
        Ok(Some(closed)) => eprintln!(
            "warning: {id}: closed the unfinished rotation {} (phase {}); check the provider for \
             the credential it may have issued ({:?}) and for the one it replaced ({:?}), and \
             remove them by hand if they are not the adopted value",
            closed.id,
            closed.phase.as_str(),
            closed.new_attrs.unwrap_or_default(),
            closed.old_attrs.unwrap_or_default()
        ),
        Ok(None) => {}
    }
    println!(
        "{id}: adopted rotation {rotation} found in {location}; nothing was issued or revoked. \
         Its age is unknown, so it is due for rotation now"
    );
    Ok(0)
}

/// `keyrotd history [ID]`. A credential removed from the inventory keeps its history; an id
/// that is neither in the inventory nor in the database is a usage error.
pub async fn history(inventory: &Inventory, id: Option<&str>, limit: usize) -> anyhow::Result<u8> {
    let state: Arc<dyn StateStore> = open_state(inventory)?;
    let rotations = state.history(id, limit).await?;
    if let Some(id) = id.filter(|_| rotations.is_empty()) {
        if find(inventory, id).is_err() {
            eprintln!(
                "error: no credential `{id}` in {} and no history for it",
                inventory.path.display()
            );
            return Ok(EXIT_USAGE);
        }
    }
    for (r, steps) in rotations {
        println!(
            "{}  {}  {}  trigger={} started={} finished={}{}",
            r.id,
            r.credential_id,
            r.phase.as_str(),
            r.trigger,
            time(Some(r.started_at)),
            time(r.finished_at),
            r.error
                .as_deref()
                .map(|e| format!("\n    error: {e}"))
                .unwrap_or_default()
        );
        for s in steps {
            let at = Utc
                .timestamp_millis_opt(s.at_ms)
                .single()
                .map_or_else(String::new, |t| t.format("%H:%M:%S%.3f").to_string());
            println!(
                "    {at} {:<9} {:<5} {}",
                s.step,
                s.event,
                s.detail.unwrap_or_default()
            );
        }
    }
    Ok(0)
}

fn find<'a>(inventory: &'a Inventory, id: &str) -> anyhow::Result<&'a CredentialSpec> {
    inventory
        .credentials
        .iter()
        .find(|c| c.id == id)
        .ok_or_else(|| anyhow::anyhow!("no credential `{id}` in {}", inventory.path.display()))
}
