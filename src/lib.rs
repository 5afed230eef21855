//! keyrotd: a daemon that rotates credentials on a schedule.
//!
//! - [`config`]: the inventory, parsed once into validated types (the `[alerts]` table included);
//! - [`fmt`]: human-readable durations and times;
//! - [`schedule`]: cron expressions, intervals and windows;
//! - [`state`]: the durable journal (SQLite) behind the [`state::StateStore`] trait, with its
//!   versioned schema migrations; [`liveness`]: whether the process holding a rotation lease
//!   still runs;
//! - [`protocol`]: the protocol's phases, steps and triggers, and the decisions on them;
//! - [`engine`]: drives the rotation protocol (issue, stage, activate, verify, promote, revoke);
//! - [`event`]: the conditions the engine and scheduler raise and clear, and their sink;
//! - [`scheduler`]: decides when each credential needs the engine;
//! - [`metrics`] and [`http`]: the Prometheus exposition and health endpoints; [`instrument`]:
//!   metered wrappers around the plugins and the state store;
//! - [`daemon`]: `keyrotd run`, wiring everything to one shutdown signal;
//! - [`cli`]: `check`, `status`, `rotate`, `adopt` and `history`; [`logging`]: the log filter,
//!   which keeps client libraries' statement and body logs off at every level;
//! - [`alert`]: email and webhook notifications of credential conditions, without spam.
//!
//! The provider plugins (rotators and stores) live in the `keyrotd-providers` crate.

#![warn(missing_docs)]

pub mod alert;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod event;
pub mod fmt;
pub mod http;
pub mod instrument;
pub mod liveness;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod schedule;
pub mod scheduler;
pub mod state;

#[cfg(test)]
mod layers;
