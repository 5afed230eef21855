//! `keyrotd status ID`: one credential's row, with its delivery hooks' latest results read from
//! the journal (the newest `notify` line naming each configured hook).

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;

use crate::config::{CredentialSpec, Inventory};
use crate::engine::{hook_label, hook_of};
use crate::fmt::time;
use crate::protocol::Step;
use crate::state::StateStore;

/// How many recent rotations are searched for a hook's latest line.
const ROTATIONS: usize = 5;

/// The latest journaled result of one configured hook.
#[derive(Serialize)]
pub(super) struct HookResult {
    /// `promote hook 0 (signal)`.
    hook: String,
    /// `ok`, `error`, `start` (running, or interrupted by a crash), `skip` (given up), or
    /// `never` (not run in the recent rotations).
    result: String,
    /// When, and in which rotation.
    at: Option<DateTime<Utc>>,
    rotation: Option<String>,
    /// The error, if it failed (no secret, no output of the hook).
    detail: Option<String>,
}

/// The inventory reduced to credential `id`.
pub(super) fn only(inventory: &Inventory, id: &str) -> anyhow::Result<Inventory> {
    let spec = super::find(inventory, id)?;
    Ok(Inventory {
        credentials: vec![spec.clone()],
        ..inventory.clone()
    })
}

/// The latest result of each of `spec`'s hooks.
pub(super) async fn latest(
    state: &Arc<dyn StateStore>,
    spec: &CredentialSpec,
) -> anyhow::Result<Vec<HookResult>> {
    let history = state.history(Some(&spec.id), ROTATIONS).await?;
    let results = spec.hooks.iter().enumerate().map(|(i, hook)| {
        let label = hook_label(hook.when, i, hook.action.kind());
        let found = history.iter().find_map(|(rotation, steps)| {
            let step = steps.iter().rev().find(|s| {
                s.step == Step::Notify.as_str()
                    && s.detail.as_deref().is_some_and(|d| hook_of(d) == label)
            })?;
            Some((rotation.id.clone(), step))
        });
        match found {
            Some((rotation, step)) => HookResult {
                hook: label,
                result: step.event.clone(),
                at: Utc.timestamp_millis_opt(step.at_ms).single(),
                rotation: Some(rotation),
                detail: step
                    .detail
                    .clone()
                    .filter(|_| step.event != "ok" && step.event != "start"),
            },
            None => HookResult {
                hook: label,
                result: "never".into(),
                at: None,
                rotation: None,
                detail: None,
            },
        }
    });
    Ok(results.collect())
}

/// Prints the hook results under the status table.
pub(super) fn print(results: &[HookResult]) {
    if results.is_empty() {
        println!("\nno delivery hooks");
        return;
    }
    println!("\n{:<28} {:<7} {:<21} ROTATION", "HOOK", "RESULT", "AT");
    for r in results {
        println!(
            "{:<28} {:<7} {:<21} {}{}",
            r.hook,
            r.result,
            time(r.at.map(|t| t.timestamp())),
            r.rotation.as_deref().unwrap_or("-"),
            r.detail
                .as_deref()
                .map(|d| format!("\n    {d}"))
                .unwrap_or_default()
        );
    }
}
