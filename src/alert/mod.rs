//! Alert delivery: turns the engine's condition changes into email and webhook notifications.
//!
//! The engine calls [`Alerter::raise`] whenever a (credential, [`Condition`]) is active and
//! [`Alerter::clear`] when it is over. Both only put a command on a bounded queue and return: a
//! slow or broken mail server never delays or fails a rotation.
//!
//! One *dispatcher* task owns the set of active conditions. It sends one `firing` notification
//! when a condition becomes active, repeats it every `repeat_interval` while it stays active (a
//! timer per active condition, in a [`DelayQueue`](tokio_util::time::DelayQueue): nothing polls), and sends one `resolved`
//! notification when it is cleared. Raising an already-active condition sends nothing.
//!
//! Each channel has its own *delivery worker* and queue, so a channel that is down only delays
//! itself. A worker retries a failed delivery with exponential backoff up to `delivery_attempts`,
//! logs every failure, and counts each notification once in `keyrotd_alert_deliveries_total`
//! with `result` = `delivered`, `failed` (attempts exhausted or refused for good) or `dropped`
//! (a queue was full, or shutdown's flush deadline passed).
//!
//! Invariant: nothing in this module adds secret material to a notification, a log line or a
//! metric. Summaries come from the caller, who must keep them free of secrets; resolved secrets
//! (SMTP password, webhook URL and authorization) only go to the transport.
//!
//! Files: [`config`] (the `[alerts]` table and its validation), `notification` (what is
//! delivered: [`Notification`], [`DeliveryError`]), `router` (which channels a notification goes
//! to), `dispatcher` (the active set, repeats and resolutions), `delivery` (the per-channel
//! worker and its retries), `channel` (one attempt on one transport), [`email`] (SMTP via
//! lettre), [`webhook`] (generic JSON and Slack-compatible HTTP via reqwest). Here: the
//! [`Alerter`] handle, [`Condition`] and [`Severity`].

pub mod config;
pub mod email;
pub mod webhook;

mod channel;
mod delivery;
mod dispatcher;
mod notification;
mod router;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{AlertsConfig, ChannelConfig, RouteConfig};
pub use notification::{AlertStatus, DeliveryError, Notification};

use channel::Channel;
use delivery::{Deliveries, DeliveryRetry, Worker};
use dispatcher::{Command, Dispatcher};
use router::Router;

/// Commands waiting for the dispatcher. Far more than the engine produces in a burst; past it,
/// commands are dropped (and counted) rather than blocking the caller.
const COMMAND_QUEUE: usize = 4096;
/// Notifications waiting per channel.
const CHANNEL_QUEUE: usize = 1024;
/// How long shutdown waits for queued notifications to be delivered.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// How urgent a condition is. Routes can select on it; it is part of every notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Needs attention soon; consumers still work.
    Warning,
    /// Needs attention now: a credential is past its max age or automation has stopped.
    Critical,
}

impl Severity {
    /// The stable lowercase name used in configs and payloads.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A problem with one credential that the engine raises and later clears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Condition {
    /// A rotation failed after all its retries (the current credential is still in place).
    RotationFailed,
    /// The credential is older than its `max_age`.
    Stale,
    /// The credential will pass its `max_age` within `warn_before`.
    NearMaxAge,
    /// Revoking the previous credential failed: it is still valid at the provider.
    RevokeFailed,
    /// The credential is marked failed: automation stopped until an operator rotates it.
    AutomationStopped,
    /// The store holds a rotation the state database does not know: state lost or foreign.
    StateLost,
}

impl Condition {
    /// Every condition, in a stable order.
    pub const ALL: [Condition; 6] = [
        Self::RotationFailed,
        Self::Stale,
        Self::NearMaxAge,
        Self::RevokeFailed,
        Self::AutomationStopped,
        Self::StateLost,
    ];

    /// The stable snake_case name used in payloads and subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RotationFailed => "rotation_failed",
            Self::Stale => "stale",
            Self::NearMaxAge => "near_max_age",
            Self::RevokeFailed => "revoke_failed",
            Self::AutomationStopped => "automation_stopped",
            Self::StateLost => "state_lost",
        }
    }

    /// How urgent the condition is.
    pub fn severity(self) -> Severity {
        match self {
            Self::Stale | Self::AutomationStopped | Self::StateLost => Severity::Critical,
            Self::RotationFailed | Self::NearMaxAge | Self::RevokeFailed => Severity::Warning,
        }
    }

    /// A short human description, for subjects and chat messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::RotationFailed => "rotation failed after retries",
            Self::Stale => "credential is past its max age",
            Self::NearMaxAge => "credential is close to its max age",
            Self::RevokeFailed => "revoking the previous credential failed",
            Self::AutomationStopped => "credential marked failed; automatic rotation stopped",
            Self::StateLost => "state database lost or foreign; automatic rotation stopped",
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the [`Alerter`] handle, the dispatcher and the workers share.
struct Shared {
    commands: mpsc::Sender<Command>,
    router: Router,
    channel_names: Vec<String>,
    deliveries: Deliveries,
}

/// The handle the engine uses to raise and clear conditions. Cheap to clone.
#[derive(Clone)]
pub struct Alerter {
    shared: Arc<Shared>,
}

impl Alerter {
    /// Builds the channels, registers `keyrotd_alert_deliveries_total` on `registry` and spawns
    /// the delivery tasks. The returned task ends after `shutdown` is cancelled and the queued
    /// notifications are delivered, or after a flush deadline of a few seconds.
    ///
    /// Call [`AlertsConfig::validate`] first; this fails only on what validation would refuse.
    /// Calling it again on the same registry (a config reload) replaces the delivery counter.
    /// Must be called inside a tokio runtime.
    pub fn start(
        config: &AlertsConfig,
        registry: &Registry,
        shutdown: CancellationToken,
    ) -> anyhow::Result<(Alerter, JoinHandle<()>)> {
        let metric = IntCounterVec::new(
            Opts::new(
                "keyrotd_alert_deliveries_total",
                "Alert notifications by channel and final result (delivered, failed after retries, dropped).",
            ),
            &["channel", "result"],
        )?;
        // A config reload starts a new Alerter on the same registry: the new counter replaces the
        // old one (a counter reset, which rate() and increase() handle).
        if let Err(prometheus::Error::AlreadyReg) = registry.register(Box::new(metric.clone())) {
            registry.unregister(Box::new(metric.clone()))?;
            registry.register(Box::new(metric.clone()))?;
        }
        let deliveries = Deliveries(metric);

        let mut workers = Vec::new();
        let mut senders = Vec::new();
        let abort = CancellationToken::new();
        let retry = DeliveryRetry {
            attempts: config.delivery_attempts.max(1),
            backoff: config.delivery_backoff,
        };
        for channel_config in &config.channels {
            let name = channel_config.name().to_owned();
            let channel = Channel::build(channel_config)
                .map_err(|e| e.context(format!("alert channel `{name}`")))?;
            for result in ["delivered", "failed", "dropped"] {
                deliveries.0.with_label_values(&[&name, result]);
            }
            let (tx, rx) = mpsc::channel(CHANNEL_QUEUE);
            senders.push(tx);
            let worker = Worker {
                name,
                channel,
                retry,
                deliveries: deliveries.clone(),
                abort: abort.clone(),
            };
            workers.push(tokio::spawn(worker.run(rx)));
        }

        let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
        let shared = Arc::new(Shared {
            commands,
            router: Router::new(config),
            channel_names: config
                .channels
                .iter()
                .map(|c| c.name().to_owned())
                .collect(),
            deliveries,
        });
        let dispatcher = Dispatcher::new(Arc::clone(&shared), senders, config.repeat_interval);
        let task = tokio::spawn(async move {
            dispatcher.run(rx, shutdown).await;
            // The dispatcher dropped the channel senders: workers drain their queues and stop.
            let mut workers = workers;
            let flushed = tokio::time::timeout(FLUSH_TIMEOUT, async {
                for w in &mut workers {
                    let _ = w.await;
                }
            })
            .await;
            if flushed.is_err() {
                tracing::warn!(
                    "alert flush deadline passed; undelivered notifications are dropped"
                );
                abort.cancel();
                for w in workers {
                    let _ = w.await;
                }
            }
        });
        Ok((Alerter { shared }, task))
    }

    /// Reports that `condition` is active for `credential`. Sends a notification only if it was
    /// not active already; the latest `summary` is used by repeats. Never blocks, never fails.
    /// `summary` must not contain secret material.
    pub fn raise(&self, credential: &str, condition: Condition, summary: &str) {
        self.push(Command::Raise {
            credential: credential.to_owned(),
            condition,
            summary: summary.to_owned(),
        });
    }

    /// Reports that `condition` is over for `credential`: a resolved notification if it was
    /// active, nothing otherwise. Never blocks, never fails.
    pub fn clear(&self, credential: &str, condition: Condition) {
        self.push(Command::Clear {
            credential: credential.to_owned(),
            condition,
        });
    }

    fn push(&self, command: Command) {
        let (credential, condition) = command.key();
        let credential = credential.to_owned();
        if let Err(e) = self.shared.commands.try_send(command) {
            let reason = match e {
                mpsc::error::TrySendError::Full(_) => "queue full",
                mpsc::error::TrySendError::Closed(_) => "alerter stopped",
            };
            tracing::warn!(%credential, %condition, reason, "alert event dropped");
            for c in self
                .shared
                .router
                .channels_for(&credential, condition.severity())
            {
                self.shared
                    .deliveries
                    .count(&self.shared.channel_names[c], "dropped");
            }
        }
    }
}

/// The engine's and scheduler's events map onto conditions: `true` raises, `false` clears.
impl crate::engine::EventSink for Alerter {
    fn event(&self, credential: &str, event: crate::engine::Event, summary: &str) {
        use crate::engine::Event;
        let (condition, active) = match event {
            Event::RotationFailed(active) => (Condition::RotationFailed, active),
            Event::RevokeFailed(active) => (Condition::RevokeFailed, active),
            Event::AutomationStopped(active) => (Condition::AutomationStopped, active),
            Event::Stale(active) => (Condition::Stale, active),
            Event::NearMaxAge(active) => (Condition::NearMaxAge, active),
            Event::StateLost(active) => (Condition::StateLost, active),
        };
        if active {
            self.raise(credential, condition, summary);
        } else {
            self.clear(credential, condition);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_names_are_stable() {
        let names: Vec<_> = Condition::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            names,
            [
                "rotation_failed",
                "stale",
                "near_max_age",
                "revoke_failed",
                "automation_stopped",
                "state_lost"
            ]
        );
        assert_eq!(Condition::Stale.severity(), Severity::Critical);
        assert_eq!(Condition::NearMaxAge.severity(), Severity::Warning);
    }
}
