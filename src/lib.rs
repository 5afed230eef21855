//! keyrotd: a daemon that rotates credentials on a schedule.
//!
//! The modules are layered, bottom first; a module uses only modules of lower layers (the rule
//! is checked by a test in `layers.rs`, and ARCHITECTURE.md explains it):
//!
//! 0. leaves: [`protocol`] (phases, steps, triggers and the decisions on them), [`event`] (the
//!    conditions raised and cleared, and their sink), [`schedule`] (cron, intervals, windows),
//!    [`fmt`] (human-readable durations and times), [`liveness`] (whether a lease's owner still
//!    runs), [`logging`] (the log filter, which keeps client libraries' statement and body logs
//!    off at every level);
//! 1. [`config`]: the inventory, parsed once into validated types (the `[alerts]` table
//!    included);
//! 2. [`state`]: the durable journal (SQLite) behind the [`state::StateStore`] trait, with its
//!    versioned schema migrations;
//! 3. [`instrument`]: metered wrappers around the plugins and the state store; [`hooks`]: the
//!    delivery hook runners (exec, systemd, signal, http);
//! 4. [`engine`]: drives the rotation protocol; [`alert`]: email and webhook notifications;
//! 5. [`scheduler`]: decides when each credential needs the engine;
//! 6. [`metrics`], 7. [`http`]: the Prometheus exposition and health endpoints; [`systemd`]:
//!    readiness, status, reload, stop and watchdog notifications (`Type=notify`); [`audit`]:
//!    `keyrotd audit verify|export`, the daemon's audit log and history pruning;
//! 8. [`daemon`] (`keyrotd run`, wired to one shutdown signal), [`cli`] (`check`, `status`,
//!    `rotate`, `adopt`, `history`) and [`policy`] (`keyrotd policy`, the least privilege).
//!
//! The plugin API lives in the `keyrotd-plugin` crate, the rotators and stores in
//! `keyrotd-providers`.

#![warn(missing_docs)]

pub mod alert;
pub mod audit;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod event;
pub mod fmt;
pub mod hooks;
pub mod http;
pub mod instrument;
pub mod liveness;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod protocol;
pub mod schedule;
pub mod scheduler;
pub mod state;
pub mod systemd;

#[cfg(test)]
mod layers;
