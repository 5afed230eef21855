//! The `webhook` and `slack` channels: one HTTP POST per notification, with reqwest.
//!
//! A 2xx answer is delivered; 429 and 5xx answers and network errors are retried; any other
//! answer is a permanent failure. Redirects are not followed, so the authorization header never
//! reaches another host, and error messages are stripped of the URL (a Slack-style URL is a
//! secret). Each attempt has the channel's connect timeout and `timeout`.

use reqwest::header::{HeaderValue, AUTHORIZATION};
use secrecy::ExposeSecret;
use serde::Serialize;

use super::notification::{rfc3339, AlertStatus, DeliveryError, Notification};
use crate::config::alerts::{
    resolve_url_async, validate_url, SlackConfig, UrlSource, WebhookConfig,
};
use keyrotd_plugin::reference::SecretRef;
use keyrotd_plugin::Timeouts;
use keyrotd_providers::resolve::Resolve;

/// The generic webhook body (`Content-Type: application/json`), one object per notification.
///
/// ```json
/// {
///   "version": 1,
///   "status": "firing",
///   "credential": "db-main",
///   "condition": "stale",
///   "severity": "critical",
///   "description": "credential is past its max age",
///   "summary": "age 92d exceeds max_age 90d",
///   "repeat": false,
///   "started_at": "2025-01-31T03:00:00Z",
///   "resolved_at": null,
///   "sent_at": "2025-01-31T03:00:01Z"
/// }
/// ```
///
/// - `version`: schema version, `1`. Fields may be added within a version, never removed or changed.
/// - `status`: `firing` (the condition is active) or `resolved` (it is over).
/// - `credential`: the credential id from the inventory.
/// - `condition`: `rotation_failed`, `stale`, `near_max_age`, `revoke_failed`, `automation_stopped`
///   or `state_lost`.
/// - `severity`: `warning` or `critical` (fixed per condition).
/// - `description`: a fixed human description of the condition.
/// - `summary`: the daemon's one-line summary of this occurrence (never secret).
/// - `repeat`: `true` for a reminder sent every `repeat_interval` while the condition lasts.
/// - `started_at`, `resolved_at` (null while firing), `sent_at`: RFC 3339 UTC instants.
///
/// Receivers should deduplicate on (`credential`, `condition`, `started_at`).
#[derive(Debug, Serialize)]
pub struct WebhookPayload<'a> {
    /// The payload format's version: 1.
    pub version: u32,
    /// `firing` or `resolved`.
    pub status: &'static str,
    /// The credential id.
    pub credential: &'a str,
    /// The condition's stable name.
    pub condition: &'static str,
    /// `warning` or `critical`.
    pub severity: &'static str,
    /// The condition's fixed description.
    pub description: &'static str,
    /// This occurrence's one-line summary.
    pub summary: &'a str,
    /// Whether this is a reminder.
    pub repeat: bool,
    /// When the condition started (RFC 3339).
    pub started_at: String,
    /// When it was resolved, `None` while firing.
    pub resolved_at: Option<String>,
    /// When this notification was sent.
    pub sent_at: String,
}

impl<'a> WebhookPayload<'a> {
    /// The payload for a notification, stamped now.
    pub fn new(n: &'a Notification) -> Self {
        Self {
            version: 1,
            status: n.status.as_str(),
            credential: &n.credential,
            condition: n.condition.as_str(),
            severity: n.condition.severity().as_str(),
            description: n.condition.describe(),
            summary: &n.summary,
            repeat: n.repeat,
            started_at: rfc3339(n.started_at),
            resolved_at: n.resolved_at.map(rfc3339),
            sent_at: rfc3339(chrono::Utc::now()),
        }
    }
}

/// The Slack-compatible body: `{"text": "..."}` (Slack, Mattermost, Rocket.Chat, ...).
#[derive(Debug, Serialize)]
pub struct SlackPayload {
    /// The message, one line of mrkdwn.
    pub text: String,
}

impl SlackPayload {
    /// One line of mrkdwn, e.g. `:rotating_light: *FIRING* [critical] `db-main` stale: ...`.
    pub fn new(n: &Notification) -> Self {
        let head = match (n.status, n.repeat) {
            (AlertStatus::Firing, false) => {
                format!(":rotating_light: *FIRING* [{}]", n.condition.severity())
            }
            (AlertStatus::Firing, true) => format!(
                ":rotating_light: *STILL FIRING* [{}]",
                n.condition.severity()
            ),
            (AlertStatus::Resolved, _) => ":white_check_mark: *RESOLVED*".to_owned(),
        };
        let text = format!(
            "{head} `{}` {}: {} ({}; since {})",
            slack_escape(&n.credential),
            n.condition,
            n.condition.describe(),
            slack_escape(&n.summary),
            rfc3339(n.started_at)
        );
        Self { text }
    }
}

/// Slack treats `&`, `<` and `>` as control characters in text.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Which JSON body a channel sends.
#[derive(Clone, Copy)]
enum Dialect {
    /// [`WebhookPayload`].
    Generic,
    /// [`SlackPayload`].
    Slack,
}

/// A configured HTTP channel.
pub(crate) struct WebhookChannel {
    client: reqwest::Client,
    url: UrlSource,
    authorization: Option<SecretRef>,
    dialect: Dialect,
    timeouts: Timeouts,
}

impl WebhookChannel {
    pub(crate) fn generic(config: &WebhookConfig, timeouts: Timeouts) -> anyhow::Result<Self> {
        Self::new(
            &config.url,
            config.authorization.clone(),
            timeouts,
            Dialect::Generic,
        )
    }

    pub(crate) fn slack(config: &SlackConfig, timeouts: Timeouts) -> anyhow::Result<Self> {
        Self::new(&config.url, None, timeouts, Dialect::Slack)
    }

    fn new(
        url: &UrlSource,
        authorization: Option<SecretRef>,
        timeouts: Timeouts,
        dialect: Dialect,
    ) -> anyhow::Result<Self> {
        validate_url(url).map_err(anyhow::Error::msg)?;
        let client = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.call)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("keyrotd/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            url: url.clone(),
            authorization,
            dialect,
            timeouts,
        })
    }

    pub(crate) async fn send(&self, n: &Notification) -> Result<(), DeliveryError> {
        // Resolved per attempt: a rotated token or URL is used without a restart.
        let url = resolve_url_async(&self.url, self.timeouts)
            .await
            .map_err(DeliveryError::transient)?;
        let mut request = self.client.post(url);
        request = match self.dialect {
            Dialect::Generic => request.json(&WebhookPayload::new(n)),
            Dialect::Slack => request.json(&SlackPayload::new(n)),
        };
        if let Some(reference) = &self.authorization {
            let secret = reference
                .resolve_async(self.timeouts)
                .await
                .map_err(|e| DeliveryError::transient(format!("authorization: {e}")))?;
            let mut value = HeaderValue::from_str(secret.expose_secret()).map_err(|_| {
                DeliveryError::permanent(format!(
                    "authorization from `{reference}` is not a valid header value"
                ))
            })?;
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| DeliveryError::transient(format!("HTTP: {}", e.without_url())))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            Err(DeliveryError::transient(format!("HTTP status {status}")))
        } else {
            Err(DeliveryError::permanent(format!("HTTP status {status}")))
        }
    }
}
