//! systemd's `Type=notify` protocol (`sd_notify(3)`, through the `sd-notify` crate): `READY=1`
//! once an inventory is loaded and scheduled, a `STATUS=` line, `RELOADING=1` and `READY=1`
//! around a reload, `STOPPING=1` on shutdown, and `WATCHDOG=1` for `WatchdogSec=`.
//!
//! The watchdog is fed by the scheduling loop itself, through its [`Heartbeat`], at half of
//! `WATCHDOG_USEC` (and only when `WATCHDOG_PID` is unset or names this process): a loop stuck on
//! an await stops feeding it, and systemd restarts the service. A timer task of its own would
//! keep a wedged daemon alive.
//!
//! Invariant: with `NOTIFY_SOCKET` unset, nothing is sent, no task runs and the scheduler gets
//! no heartbeat. Messages are written by the caller, as `libsystemd` does: one datagram, which
//! blocks only while the service manager's queue is full.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::scheduler::{lock, Heartbeat, Table};
use crate::state::Status;

/// How often the status line is recomputed; it is sent only when it changed, so systemd sees at
/// most one update per this interval.
pub const STATUS_EVERY: Duration = Duration::from_secs(3);

/// The daemon's link to the service manager; every method is a no-op outside `Type=notify`.
#[derive(Clone, Default)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    /// `WATCHDOG_USEC`, when the watchdog is enabled for this process.
    watchdog: Option<Duration>,
    /// The inventory being scheduled, which the status line summarises.
    table: Mutex<Option<Arc<Table>>>,
    /// The last status line sent.
    status: Mutex<String>,
    /// Whether a failed send was logged as a warning (later ones are logged at debug level).
    warned: AtomicBool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. When systemd is listening,
    /// starts the task that keeps the status line current until `shutdown`.
    pub fn start(shutdown: &CancellationToken) -> Self {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Self::default();
        }
        let inner = Arc::new(Inner {
            watchdog: sd_notify::watchdog_enabled().filter(|d| !d.is_zero()),
            table: Mutex::new(None),
            status: Mutex::new(String::new()),
            warned: AtomicBool::new(false),
        });
        tokio::spawn(keep_status(inner.clone(), shutdown.clone()));
        Self { inner: Some(inner) }
    }

    /// `READY=1` with the status line: `table` is loaded and scheduled.
    pub fn ready(&self, table: &Arc<Table>) {
        let Some(inner) = &self.inner else { return };
        *unpoisoned(&inner.table) = Some(table.clone());
        let status = summary(table);
        inner.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        *unpoisoned(&inner.status) = status;
    }

    /// `RELOADING=1`: a SIGHUP arrived and the new inventory is being read. `MONOTONIC_USEC`
    /// goes with it, which systemd 253 and later require.
    pub fn reloading(&self) {
        let Some(inner) = &self.inner else { return };
        let mut states = vec![
            NotifyState::Reloading,
            NotifyState::Status("reloading the inventory"),
        ];
        match NotifyState::monotonic_usec_now() {
            Ok(now) => states.insert(1, now),
            Err(e) => warn!(error = %e, "cannot read the monotonic clock for systemd"),
        }
        inner.send(&states);
        unpoisoned(&inner.status).clear();
    }

    /// `READY=1` again after a reload that was refused: the running inventory goes on.
    pub fn reload_refused(&self) {
        let Some(inner) = &self.inner else { return };
        let table = unpoisoned(&inner.table).clone();
        match table {
            Some(table) => self.ready(&table),
            None => inner.send(&[NotifyState::Ready]),
        }
    }

    /// `STOPPING=1`: shutdown began; in-flight rotations finish or park.
    pub fn stopping(&self) {
        let Some(inner) = &self.inner else { return };
        inner.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: in-flight rotations finish or park"),
        ]);
    }

    /// The scheduler's heartbeat when systemd's watchdog is on: `WATCHDOG=1` every half
    /// `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)` recommends.
    pub fn heartbeat(&self) -> Option<Heartbeat> {
        let inner = self.inner.as_ref()?;
        let every = beat_interval(inner.watchdog?);
        let inner = inner.clone();
        Some(Heartbeat {
            every,
            beat: Arc::new(move || inner.send(&[NotifyState::Watchdog])),
        })
    }
}

impl Inner {
    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            if self.warned.swap(true, Ordering::Relaxed) {
                debug!(error = %e, "notifying systemd failed");
            } else {
                warn!(error = %e, "notifying systemd failed (further failures are logged at debug level)");
            }
        }
    }
}

/// The fastest and slowest watchdog beats. `WATCHDOG_USEC` comes from the environment: a value of
/// a microsecond would spin the loop, a year would overflow a timer. Beating more often than
/// half the interval is harmless; a watchdog shorter than twice the floor cannot be met by any
/// beat rate and gets the floor.
const BEAT_BOUNDS: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(60));

/// Half of `WATCHDOG_USEC` (as `sd_watchdog_enabled(3)` recommends), within [`BEAT_BOUNDS`].
fn beat_interval(watchdog: Duration) -> Duration {
    (watchdog / 2).clamp(BEAT_BOUNDS.0, BEAT_BOUNDS.1)
}

/// Recomputes the status line every [`STATUS_EVERY`] and sends it when it changed.
async fn keep_status(inner: Arc<Inner>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(STATUS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Some(table) = unpoisoned(&inner.table).clone() else {
            continue;
        };
        let status = summary(&table);
        let mut sent = unpoisoned(&inner.status);
        // Empty while a reload runs: the reload's own line stays until READY=1.
        if !sent.is_empty() && *sent != status {
            inner.send(&[NotifyState::Status(&status)]);
            *sent = status;
        }
    }
}

/// The one-line summary systemd shows: `12 credentials: 1 rotating, 0 retrying, 2 failed`.
fn summary(table: &Table) -> String {
    let (mut rotating, mut retrying, mut failed) = (0, 0, 0);
    for slot in table.slots() {
        match lock(slot.live).status {
            Status::Rotating => rotating += 1,
            Status::Retrying => retrying += 1,
            Status::Failed => failed += 1,
            Status::Idle | Status::Grace | Status::RevokeDelayed => {}
        }
    }
    let n = table.len();
    let noun = if n == 1 { "credential" } else { "credentials" };
    format!("{n} {noun}: {rotating} rotating, {retrying} retrying, {failed} failed")
}

fn unpoisoned<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_are_half_the_watchdog_within_bounds() {
        assert_eq!(
            beat_interval(Duration::from_secs(60)),
            Duration::from_secs(30)
        );
        assert_eq!(
            beat_interval(Duration::from_micros(1)),
            Duration::from_millis(100)
        );
        assert_eq!(
            beat_interval(Duration::from_micros(u64::MAX)),
            Duration::from_secs(60)
        );
    }
}
