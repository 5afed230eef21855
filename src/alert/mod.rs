//! Alert delivery: turns the engine's condition changes into email and webhook notifications.
//!
//! The engine calls [`Alerter::raise`] whenever a (credential, [`Condition`]) is active and
//! [`Alerter::clear`] when it is over. Both only put a update on a bounded queue and return: a
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
//! The `[alerts]` table and its validation are config ([`crate::config::alerts`]). Files:
//! `notification` (what is
//! delivered: [`Notification`], [`DeliveryError`]), `router` (which channels a notification goes
//! to), `dispatcher` (the active set, repeats and resolutions), `delivery` (the per-channel
//! worker and its retries), `channel` (one attempt on one transport), [`email`] (SMTP via
//! lettre), [`webhook`] (generic JSON and Slack-compatible HTTP via reqwest). Here: the
//! [`Alerter`] handle and its [`EventSink`] implementation; [`Condition`] and [`Severity`] are
//! re-exported from [`crate::event`].

pub mod email;
pub mod webhook;

mod channel;
mod delivery;
mod dispatcher;
mod notification;
mod router;

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::config::alerts::{AlertsConfig, ChannelConfig, RouteConfig};
use crate::event::EventSink;
pub use crate::event::{Condition, Severity};
pub use notification::{AlertStatus, DeliveryError, Notification};

use channel::Channel;
use delivery::{Deliveries, DeliveryRetry, Worker};
use dispatcher::{Dispatcher, Update};
use keyrotd_plugin::backoff::Backoff;
use router::Router;

/// Commands waiting for the dispatcher. Far more than the engine produces in a burst; past it,
/// updates are dropped (and counted) rather than blocking the caller.
const UPDATE_QUEUE: usize = 4096;
/// Notifications waiting per channel.
const CHANNEL_QUEUE: usize = 1024;
/// How long shutdown waits for queued notifications to be delivered.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// What the [`Alerter`] handle, the dispatcher and the workers share.
struct Shared {
    updates: mpsc::Sender<Update>,
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
            backoff: Backoff::new(config.delivery_backoff, delivery::MAX_BACKOFF),
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

        let (updates, rx) = mpsc::channel(UPDATE_QUEUE);
        let shared = Arc::new(Shared {
            updates,
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
        self.push(Update::Raise {
            credential: credential.to_owned(),
            condition,
            summary: summary.to_owned(),
        });
    }

    /// Reports that `condition` is over for `credential`: a resolved notification if it was
    /// active, nothing otherwise. Never blocks, never fails.
    pub fn clear(&self, credential: &str, condition: Condition) {
        self.push(Update::Clear {
            credential: credential.to_owned(),
            condition,
        });
    }

    fn push(&self, update: Update) {
        let (credential, condition) = update.key();
        let credential = credential.to_owned();
        if let Err(e) = self.shared.updates.try_send(update) {
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

/// The engine and the scheduler report conditions through [`EventSink`]; the alerter queues them.
impl EventSink for Alerter {
    fn raise(&self, credential: &str, condition: Condition, summary: &str) {
        Alerter::raise(self, credential, condition, summary);
    }

    fn clear(&self, credential: &str, condition: Condition) {
        Alerter::clear(self, credential, condition);
    }
}
