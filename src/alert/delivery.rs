//! The per-channel delivery worker: delivers one channel's notifications in order, retrying a
//! failed attempt with exponential backoff, and counts each notification once.
//!
//! Invariants: a channel that is down only delays its own queue; every notification handed to a
//! worker is counted exactly once in `keyrotd_alert_deliveries_total`, as `delivered`, `failed`
//! (attempts exhausted or refused for good) or `dropped` (the shutdown flush deadline passed).

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounterVec;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::channel::Channel;
use super::notification::Notification;
use keyrotd_plugin::backoff::Backoff;

/// Longest wait between two delivery attempts.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Counts deliveries by channel and result.
#[derive(Clone)]
pub(super) struct Deliveries(pub(super) IntCounterVec);

impl Deliveries {
    /// One notification for `channel` ended as `result`.
    pub(super) fn count(&self, channel: &str, result: &str) {
        self.0.with_label_values(&[channel, result]).inc();
    }
}

/// How a worker retries one notification: `[alerts] delivery_attempts` and `delivery_backoff`.
#[derive(Clone, Copy)]
pub(super) struct DeliveryRetry {
    /// Attempts in all, at least one.
    pub(super) attempts: u32,
    /// The waits between attempts: from `delivery_backoff`, doubling up to [`MAX_BACKOFF`].
    pub(super) backoff: Backoff,
}

/// Delivers one channel's notifications in order, with retries.
pub(super) struct Worker {
    pub(super) name: String,
    pub(super) channel: Channel,
    pub(super) retry: DeliveryRetry,
    pub(super) deliveries: Deliveries,
    /// Cancelled when the shutdown flush deadline passes.
    pub(super) abort: CancellationToken,
}

/// How the delivery of one notification ended.
enum DeliveryResult {
    Delivered,
    Failed,
    Aborted,
}

impl DeliveryResult {
    /// The `result` label of `keyrotd_alert_deliveries_total`.
    fn label(&self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Aborted => "dropped",
        }
    }
}

impl Worker {
    /// Delivers until the queue is closed and drained, or until `abort`: what is still queued
    /// then is counted as dropped.
    pub(super) async fn run(self, mut queue: mpsc::Receiver<Arc<Notification>>) {
        loop {
            let next = tokio::select! {
                biased;
                () = self.abort.cancelled() => None,
                n = queue.recv() => n,
            };
            let Some(notification) = next else { break };
            let result = self.deliver(&notification).await;
            self.deliveries.count(&self.name, result.label());
        }
        queue.close();
        while queue.try_recv().is_ok() {
            self.deliveries.count(&self.name, "dropped");
        }
    }

    async fn deliver(&self, n: &Notification) -> DeliveryResult {
        for attempt in 1..=self.retry.attempts {
            let result = tokio::select! {
                biased;
                () = self.abort.cancelled() => return DeliveryResult::Aborted,
                r = self.channel.send(n) => r,
            };
            let error = match result {
                Ok(()) => {
                    tracing::debug!(channel = %self.name, credential = %n.credential, condition = %n.condition,
                        status = n.status.as_str(), attempt, "alert delivered");
                    return DeliveryResult::Delivered;
                }
                Err(e) => e,
            };
            if error.permanent || attempt == self.retry.attempts {
                tracing::error!(channel = %self.name, credential = %n.credential, condition = %n.condition,
                    attempt, permanent = error.permanent, error = %error, "alert delivery failed; giving up");
                return DeliveryResult::Failed;
            }
            let backoff = self.retry.backoff.delay(attempt);
            tracing::warn!(channel = %self.name, credential = %n.credential, condition = %n.condition,
                attempt, error = %error, retry_in = ?backoff, "alert delivery failed; will retry");
            tokio::select! {
                biased;
                () = self.abort.cancelled() => return DeliveryResult::Aborted,
                () = tokio::time::sleep(backoff) => {}
            }
        }
        DeliveryResult::Failed
    }
}
