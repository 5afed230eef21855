//! The operator commands besides `run`: `check`, `status`, `rotate` and `history`. Each prints
//! for a person by default; `status --json` prints for a program.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use keyrotd_rotators::StepContext;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{human, CredentialSpec, Inventory, StateUrl};
use crate::daemon::open_state;
use crate::engine::{Engine, Outcome, Trigger};
use crate::metrics::Metrics;
use crate::scheduler::live_view;
use crate::state::{CredentialRecord, SqliteState, StateStore};

/// Exit status: the operation failed (a rotation failed, a credential is busy).
pub const EXIT_FAILED: u8 = 1;

/// A Unix time for people: `2026-01-31 03:00:00Z`, or `-`.
pub fn time(t: Option<i64>) -> String {
    t.and_then(|t| Utc.timestamp_opt(t, 0).single())
        .map_or_else(
            || "-".into(),
            |t| t.format("%Y-%m-%d %H:%M:%SZ").to_string(),
        )
}

/// `keyrotd check`: prints each credential with its next three rotation times. Reads the state
/// database if it exists, never writes it.
pub async fn check(inventory: &Inventory) -> anyhow::Result<()> {
    let records: HashMap<String, CredentialRecord> = match &inventory.daemon.state {
        StateUrl::Sqlite(path) => match SqliteState::open_read_only(path)? {
            Some(state) => state
                .credentials()
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|r| (r.id.clone(), r))
                .collect(),
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
    next_rotation: Option<DateTime<Utc>>,
    consecutive_failures: u32,
    last_error: Option<String>,
}

/// `keyrotd status [--json]`.
pub async fn status(inventory: &Inventory, json: bool) -> anyhow::Result<()> {
    let state = open_state(inventory)?;
    let records: HashMap<String, CredentialRecord> = state
        .credentials()
        .await?
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    let open = state.open_rotations().await?;
    let now = Utc::now();
    let rows: Vec<StatusRow> = inventory
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
            let next = live
                .wake
                .and_then(|t| Utc.timestamp_opt(t, 0).single())
                .or_else(|| spec.schedule.next_rotation(last, now));
            let age = record.issued_at.map(|t| now.timestamp() - t);
            StatusRow {
                id: spec.id.clone(),
                rotator: spec.rotator.kind(),
                store: spec.store.kind(),
                state: record.status.as_str(),
                age_seconds: age,
                max_age_seconds: spec.max_age.as_secs(),
                stale: age.is_none_or(|a| a > spec.max_age.as_secs() as i64),
                last_rotation: last,
                next_rotation: next,
                consecutive_failures: record.consecutive_failures,
                last_error: record.last_error,
            }
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<20} {:<20} {:>10} {:>10} {:<21} {:<21} STATE",
        "ID", "ROTATOR", "STORE", "AGE", "MAX AGE", "LAST ROTATION", "NEXT ROTATION"
    );
    for r in &rows {
        let age = r.age_seconds.map_or_else(
            || "-".into(),
            |a| human(std::time::Duration::from_secs(a.max(0) as u64)),
        );
        let state = if r.stale {
            format!("{} (stale)", r.state)
        } else {
            r.state.to_owned()
        };
        println!(
            "{:<24} {:<20} {:<20} {:>10} {:>10} {:<21} {:<21} {}",
            r.id,
            r.rotator,
            r.store,
            age,
            human(std::time::Duration::from_secs(r.max_age_seconds)),
            time(r.last_rotation.map(|t| t.timestamp())),
            time(r.next_rotation.map(|t| t.timestamp())),
            state
        );
    }
    Ok(())
}

/// `keyrotd rotate ID [--dry-run]`. Returns the exit status.
pub async fn rotate(inventory: &Inventory, id: &str, dry_run: bool) -> anyhow::Result<u8> {
    let spec = find(inventory, id)?;
    if dry_run {
        return dry_run_plan(spec).await;
    }
    let state = open_state(inventory)?;
    state
        .ensure_credentials(std::slice::from_ref(&spec.id))
        .await?;
    let metrics = Metrics::new()?;
    let engine = Engine::new(state, metrics.engine, None, CancellationToken::new());
    let (outcome, _) = engine.run(spec, Trigger::Manual).await?;
    let (code, message) = match outcome {
        Outcome::Promoted { rotation, revoke_at } => {
            (0, format!("{id}: rotation {rotation} promoted; the old credential is revoked at {} by the daemon", time(Some(revoke_at))))
        }
        Outcome::Completed { rotation } => (0, format!("{id}: rotation {rotation} complete; the old credential is revoked")),
        Outcome::InGrace { rotation, revoke_at } => {
            (EXIT_FAILED, format!("{id}: rotation {rotation} is in its grace period until {}; try again after", time(Some(revoke_at))))
        }
        Outcome::Busy { rotation, owner } => (EXIT_FAILED, format!("{id}: rotation {rotation} is being run by {owner}")),
        Outcome::Stopped => (EXIT_FAILED, format!("{id}: marked failed")),
        Outcome::Failed { rotation, error } => (EXIT_FAILED, format!("rotation {rotation} failed: {error}")),
        Outcome::Parked { rotation } => (EXIT_FAILED, format!("{id}: rotation {rotation} parked")),
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

/// `keyrotd history [ID]`.
pub async fn history(inventory: &Inventory, id: Option<&str>, limit: usize) -> anyhow::Result<()> {
    if let Some(id) = id {
        find(inventory, id)?;
    }
    let state: Arc<dyn StateStore> = open_state(inventory)?;
    for (r, steps) in state.history(id, limit).await? {
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
    Ok(())
}

fn find<'a>(inventory: &'a Inventory, id: &str) -> anyhow::Result<&'a CredentialSpec> {
    inventory
        .credentials
        .iter()
        .find(|c| c.id == id)
        .ok_or_else(|| anyhow::anyhow!("no credential `{id}` in {}", inventory.path.display()))
}
