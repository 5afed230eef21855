//! Alert delivery: turns the engine's condition changes into email and webhook notifications.
//!
//! The engine calls [`Alerter::raise`] whenever a (credential, [`Condition`]) is active and
//! [`Alerter::clear`] when it is over. Both only put an event on a bounded queue and return: a
//! slow or broken mail server never delays or fails a rotation.
//!
//! One *dispatcher* task owns the set of active conditions. It sends one `firing` notification
//! when a condition becomes active, repeats it every `repeat_interval` while it stays active (a
//! timer per active condition, in a [`DelayQueue`]: nothing polls), and sends one `resolved`
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
//! Modules: [`config`] (the `[alerts]` table and its validation), [`email`] (SMTP via lettre),
//! [`webhook`] (generic JSON and Slack-compatible HTTP via reqwest).

pub mod email;
pub mod webhook;

use std::collections::HashMap;
use std::fmt;
use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{delay_queue, DelayQueue};

pub use crate::config::alerts::{AlertsConfig, ChannelConfig, RouteConfig};
use crate::event::EventSink;
pub use crate::event::{Condition, Severity};

/// Events waiting for the dispatcher. Far more than the engine produces in a burst; past it,
/// events are dropped (and counted) rather than blocking the caller.
const EVENT_QUEUE: usize = 4096;
/// Notifications waiting per channel.
const CHANNEL_QUEUE: usize = 1024;
/// How long shutdown waits for queued notifications to be delivered.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between two delivery attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Whether a notification announces a problem or its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The condition is active (first notification or a repeat).
    Firing,
    /// The condition is over.
    Resolved,
}

impl Status {
    /// `firing` or `resolved`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        }
    }
}

/// One message to deliver, the same for every channel.
#[derive(Debug, Clone)]
pub struct Notification {
    /// Firing or resolved.
    pub status: Status,
    /// The credential id.
    pub credential: String,
    /// What is wrong.
    pub condition: Condition,
    /// The caller's latest summary (never secret).
    pub summary: String,
    /// When the condition became active.
    pub started_at: DateTime<Utc>,
    /// When it was cleared (resolved notifications only).
    pub resolved_at: Option<DateTime<Utc>>,
    /// Whether this is a repeat of an earlier firing notification.
    pub repeat: bool,
}

/// Why one delivery attempt failed. The message never contains a secret.
#[derive(Debug)]
pub struct DeliveryError {
    /// A retry cannot help (e.g. HTTP 400, SMTP 5xx).
    pub permanent: bool,
    /// What went wrong, for the log.
    pub message: String,
}

impl DeliveryError {
    fn transient(message: impl Into<String>) -> Self {
        Self {
            permanent: false,
            message: message.into(),
        }
    }

    fn permanent(message: impl Into<String>) -> Self {
        Self {
            permanent: true,
            message: message.into(),
        }
    }
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A built channel: knows how to deliver one notification once, within its attempt timeout.
struct Channel {
    transport: Transport,
    timeout: Duration,
}

enum Transport {
    Email(email::EmailChannel),
    Webhook(webhook::WebhookChannel),
}

impl Channel {
    fn build(config: &ChannelConfig) -> anyhow::Result<Self> {
        let timeouts = config.timeouts();
        let transport = match config {
            ChannelConfig::Email(c) => Transport::Email(email::EmailChannel::new(c, timeouts)?),
            ChannelConfig::Webhook(c) => {
                Transport::Webhook(webhook::WebhookChannel::generic(c, timeouts)?)
            }
            ChannelConfig::Slack(c) => {
                Transport::Webhook(webhook::WebhookChannel::slack(c, timeouts)?)
            }
        };
        Ok(Self {
            transport,
            timeout: timeouts.call,
        })
    }

    /// One attempt. It is bounded here as a whole, whatever the client bounds itself: a server
    /// that accepts the connection and never answers must not hold the channel's queue.
    async fn send(&self, notification: &Notification) -> Result<(), DeliveryError> {
        let attempt = async {
            match &self.transport {
                Transport::Email(c) => c.send(notification).await,
                Transport::Webhook(c) => c.send(notification).await,
            }
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(DeliveryError::transient(format!(
                    "no answer within {}",
                    keyrotd_plugin::timeouts::describe(self.timeout)
                )))
            })
    }
}

enum Event {
    Raise {
        credential: String,
        condition: Condition,
        summary: String,
    },
    Clear {
        credential: String,
        condition: Condition,
    },
}

/// Which channels (by index) a notification goes to.
struct Router {
    routes: Vec<(RouteConfig, Vec<usize>)>,
    all: Vec<usize>,
}

impl Router {
    fn new(config: &AlertsConfig) -> Self {
        let index = |name: &String| config.channels.iter().position(|c| c.name() == name);
        let routes = config
            .routes
            .iter()
            .map(|r| (r.clone(), r.channels.iter().filter_map(index).collect()))
            .collect();
        Self {
            routes,
            all: (0..config.channels.len()).collect(),
        }
    }

    fn channels_for(&self, credential: &str, severity: Severity) -> Vec<usize> {
        if self.routes.is_empty() {
            return self.all.clone();
        }
        let mut out: Vec<usize> = Vec::new();
        for (route, channels) in &self.routes {
            if route.matches(credential, severity) {
                for &c in channels {
                    if !out.contains(&c) {
                        out.push(c);
                    }
                }
            }
        }
        out
    }
}

/// Counts deliveries by channel and result.
#[derive(Clone)]
struct Deliveries(IntCounterVec);

impl Deliveries {
    fn count(&self, channel: &str, result: &str) {
        self.0.with_label_values(&[channel, result]).inc();
    }
}

struct Shared {
    events: mpsc::Sender<Event>,
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
        let policy = RetryPolicy {
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
                policy,
                deliveries: deliveries.clone(),
                abort: abort.clone(),
            };
            workers.push(tokio::spawn(worker.run(rx)));
        }

        let (events, rx) = mpsc::channel(EVENT_QUEUE);
        let shared = Arc::new(Shared {
            events,
            router: Router::new(config),
            channel_names: config
                .channels
                .iter()
                .map(|c| c.name().to_owned())
                .collect(),
            deliveries,
        });
        let dispatcher = Dispatcher {
            shared: Arc::clone(&shared),
            senders,
            active: HashMap::new(),
            repeats: DelayQueue::new(),
            repeat_interval: config.repeat_interval,
        };
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
        self.push(Event::Raise {
            credential: credential.to_owned(),
            condition,
            summary: summary.to_owned(),
        });
    }

    /// Reports that `condition` is over for `credential`: a resolved notification if it was
    /// active, nothing otherwise. Never blocks, never fails.
    pub fn clear(&self, credential: &str, condition: Condition) {
        self.push(Event::Clear {
            credential: credential.to_owned(),
            condition,
        });
    }

    fn push(&self, event: Event) {
        let (credential, condition) = match &event {
            Event::Raise {
                credential,
                condition,
                ..
            }
            | Event::Clear {
                credential,
                condition,
            } => (credential.clone(), *condition),
        };
        if let Err(e) = self.shared.events.try_send(event) {
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

struct Active {
    summary: String,
    started_at: DateTime<Utc>,
    repeat: delay_queue::Key,
}

type Key = (String, Condition);

/// Owns the active set; turns events and repeat timers into notifications.
struct Dispatcher {
    shared: Arc<Shared>,
    senders: Vec<mpsc::Sender<Arc<Notification>>>,
    active: HashMap<Key, Active>,
    repeats: DelayQueue<Key>,
    repeat_interval: Duration,
}

impl Dispatcher {
    async fn run(mut self, mut events: mpsc::Receiver<Event>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                event = events.recv() => match event {
                    Some(event) => self.handle(event),
                    None => break,
                },
                // `poll_expired` is ready with `None` when no timer is set: the branch is then
                // disabled for this round, and the loop sleeps on the other two.
                Some(expired) = poll_fn(|cx| self.repeats.poll_expired(cx)) => {
                    self.repeat(expired.into_inner());
                }
            }
        }
        // Events raised before shutdown still get their notifications (within the flush deadline).
        events.close();
        while let Ok(event) = events.try_recv() {
            self.handle(event);
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Raise {
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
                    status: Status::Firing,
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
            Event::Clear {
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
                    status: Status::Resolved,
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
            status: Status::Firing,
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

#[derive(Clone, Copy)]
struct RetryPolicy {
    attempts: u32,
    backoff: Duration,
}

/// Delivers one channel's notifications in order, with retries.
struct Worker {
    name: String,
    channel: Channel,
    policy: RetryPolicy,
    deliveries: Deliveries,
    /// Cancelled when the shutdown flush deadline passes.
    abort: CancellationToken,
}

enum Outcome {
    Delivered,
    Failed,
    Aborted,
}

impl Worker {
    async fn run(self, mut queue: mpsc::Receiver<Arc<Notification>>) {
        loop {
            let next = tokio::select! {
                biased;
                () = self.abort.cancelled() => None,
                n = queue.recv() => n,
            };
            let Some(notification) = next else { break };
            let result = match self.deliver(&notification).await {
                Outcome::Delivered => "delivered",
                Outcome::Failed => "failed",
                Outcome::Aborted => "dropped",
            };
            self.deliveries.count(&self.name, result);
        }
        queue.close();
        while queue.try_recv().is_ok() {
            self.deliveries.count(&self.name, "dropped");
        }
    }

    async fn deliver(&self, n: &Notification) -> Outcome {
        let mut backoff = self.policy.backoff;
        for attempt in 1..=self.policy.attempts {
            let result = tokio::select! {
                biased;
                () = self.abort.cancelled() => return Outcome::Aborted,
                r = self.channel.send(n) => r,
            };
            let error = match result {
                Ok(()) => {
                    tracing::debug!(channel = %self.name, credential = %n.credential, condition = %n.condition,
                        status = n.status.as_str(), attempt, "alert delivered");
                    return Outcome::Delivered;
                }
                Err(e) => e,
            };
            if error.permanent || attempt == self.policy.attempts {
                tracing::error!(channel = %self.name, credential = %n.credential, condition = %n.condition,
                    attempt, permanent = error.permanent, error = %error, "alert delivery failed; giving up");
                return Outcome::Failed;
            }
            tracing::warn!(channel = %self.name, credential = %n.credential, condition = %n.condition,
                attempt, error = %error, retry_in = ?backoff, "alert delivery failed; will retry");
            tokio::select! {
                biased;
                () = self.abort.cancelled() => return Outcome::Aborted,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        Outcome::Failed
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

/// Formats an instant as RFC 3339 UTC with second precision, as in every payload.
pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_is_the_union_of_matching_routes() {
        let config: AlertsConfig = toml::from_str(
            r#"
            [[channel]]
            name = "a"
            kind = "webhook"
            url = "https://a.example"
            [[channel]]
            name = "b"
            kind = "webhook"
            url = "https://b.example"
            [[route]]
            severity = "critical"
            channels = ["a", "b"]
            [[route]]
            credentials = ["db"]
            channels = ["a"]
            "#,
        )
        .unwrap();
        let router = Router::new(&config);
        assert_eq!(router.channels_for("db", Severity::Critical), [0, 1]);
        assert_eq!(router.channels_for("db", Severity::Warning), [0]);
        assert!(router.channels_for("other", Severity::Warning).is_empty());
        let no_routes = AlertsConfig {
            routes: vec![],
            ..config
        };
        assert_eq!(
            Router::new(&no_routes).channels_for("x", Severity::Warning),
            [0, 1]
        );
    }
}
