//! The dispatcher: the one task that owns the set of active conditions and turns raise and
//! clear updates and repeat timers into notifications for the channels' queues.
//!
//! Invariants: one `firing` notification when a condition becomes active, one repeat every
//! `repeat_interval` while it stays active (a timer per active condition, in a [`DelayQueue`]:
//! nothing polls), one `resolved` when it is cleared; raising an active condition only updates
//! its summary, clearing an inactive one sends nothing. A full channel queue drops (and counts)
//! rather than blocks.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{delay_queue, DelayQueue};

use super::notification::{AlertStatus, Notification};
use super::{Condition, Shared};

/// What the [`Alerter`](super::Alerter) asks of the dispatcher.
pub(super) enum Update {
    /// A condition is active, with the caller's latest summary.
    Raise {
        credential: String,
        condition: Condition,
        summary: String,
    },
    /// A condition is over.
    Clear {
        credential: String,
        condition: Condition,
    },
}

impl Update {
    /// The credential and condition the update is about.
    pub(super) fn key(&self) -> (&str, Condition) {
        match self {
            Update::Raise {
                credential,
                condition,
                ..
            }
            | Update::Clear {
                credential,
                condition,
            } => (credential, *condition),
        }
    }
}

/// An active condition.
struct Active {
    summary: String,
    started_at: DateTime<Utc>,
    repeat: delay_queue::Key,
}

type Key = (String, Condition);

/// Owns the active set; turns updates and repeat timers into notifications.
pub(super) struct Dispatcher {
    shared: Arc<Shared>,
    senders: Vec<mpsc::Sender<Arc<Notification>>>,
    active: HashMap<Key, Active>,
    repeats: DelayQueue<Key>,
    repeat_interval: Duration,
}

impl Dispatcher {
    /// A dispatcher with nothing active, sending to the channels' queues (indexed as in the
    /// config).
    pub(super) fn new(
        shared: Arc<Shared>,
        senders: Vec<mpsc::Sender<Arc<Notification>>>,
        repeat_interval: Duration,
    ) -> Self {
        Self {
            shared,
            senders,
            active: HashMap::new(),
            repeats: DelayQueue::new(),
            repeat_interval,
        }
    }

    /// Runs until `shutdown` or until every sender of `updates` is gone, then handles the
    /// updates already queued. Dropping `self` at the end closes the channels' queues.
    pub(super) async fn run(
        mut self,
        mut updates: mpsc::Receiver<Update>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                update = updates.recv() => match update {
                    Some(update) => self.handle(update),
                    None => break,
                },
                // `poll_expired` is ready with `None` when no timer is set: the branch is then
                // disabled for this round, and the loop sleeps on the other two.
                Some(expired) = poll_fn(|cx| self.repeats.poll_expired(cx)) => {
                    self.repeat(expired.into_inner());
                }
            }
        }
        // Conditions raised before shutdown still get their notifications (within the flush
        // deadline).
        updates.close();
        while let Ok(update) = updates.try_recv() {
            self.handle(update);
        }
    }

    fn handle(&mut self, update: Update) {
        match update {
            Update::Raise {
                credential,
                condition,
                summary,
            } => {
                let key = (credential, condition);
                if let Some(active) = self.active.get_mut(&key) {
                    active.summary = summary;
                    return;
                }
                let started_at = Utc::now();
                let repeat = self.repeats.insert(key.clone(), self.repeat_interval);
                tracing::info!(credential = %key.0, %condition, "alert firing");
                self.send(Notification {
                    status: AlertStatus::Firing,
                    credential: key.0.clone(),
                    condition,
                    summary: summary.clone(),
                    started_at,
                    resolved_at: None,
                    repeat: false,
                });
                self.active.insert(
                    key,
                    Active {
                        summary,
                        started_at,
                        repeat,
                    },
                );
            }
            Update::Clear {
                credential,
                condition,
            } => {
                let key = (credential, condition);
                let Some(active) = self.active.remove(&key) else {
                    return;
                };
                self.repeats.remove(&active.repeat);
                tracing::info!(credential = %key.0, %condition, "alert resolved");
                self.send(Notification {
                    status: AlertStatus::Resolved,
                    credential: key.0,
                    condition,
                    summary: active.summary,
                    started_at: active.started_at,
                    resolved_at: Some(Utc::now()),
                    repeat: false,
                });
            }
        }
    }

    fn repeat(&mut self, key: Key) {
        let Some(active) = self.active.get_mut(&key) else {
            return;
        };
        active.repeat = self.repeats.insert(key.clone(), self.repeat_interval);
        let notification = Notification {
            status: AlertStatus::Firing,
            credential: key.0,
            condition: key.1,
            summary: active.summary.clone(),
            started_at: active.started_at,
            resolved_at: None,
            repeat: true,
        };
        self.send(notification);
    }

    fn send(&self, notification: Notification) {
        let channels = self
            .shared
            .router
            .channels_for(&notification.credential, notification.condition.severity());
        if channels.is_empty() && !self.senders.is_empty() {
            tracing::warn!(
                credential = %notification.credential,
                condition = %notification.condition,
                "no alert route matches; notification not sent"
            );
            return;
        }
        let notification = Arc::new(notification);
        for c in channels {
            if self.senders[c].try_send(Arc::clone(&notification)).is_err() {
                let channel = &self.shared.channel_names[c];
                tracing::warn!(channel, credential = %notification.credential, "alert channel queue full; dropped");
                self.shared.deliveries.count(channel, "dropped");
            }
        }
    }
}
