//! The `[alerts]` table of the inventory: channels, routes and timing.
//!
//! ```toml
//! [alerts]
//! repeat_interval = "4h"   # re-send a still-active alert this often (default 4h)
//! warn_before = "7d"       # raise near_max_age this long before max_age (default 7d)
//!
//! [[alerts.channel]]
//! name = "ops-mail"
//! kind = "email"
//! host = "smtp.example.com"
//! tls = "starttls"          # "starttls" (default, port 587), "tls" (implicit, 465) or "none" (loopback only)
//! username = "keyrotd@example.com"
//! password = "env:SMTP_PASSWORD"
//! from = "keyrotd <keyrotd@example.com>"
//! to = ["ops@example.com"]
//! timeout = "30s"           # one delivery attempt, connection included (default 30s; 1s to 5m)
//!
//! [[alerts.channel]]
//! name = "pager"
//! kind = "webhook"          # generic JSON, see `alert::webhook::WebhookPayload`
//! url = "https://hooks.example.com/keyrotd"
//! authorization = "env:PAGER_TOKEN"   # sent verbatim as the Authorization header
//! timeout = "10s"           # one delivery attempt (default 10s; 1s to 5m)
//!
//! [[alerts.channel]]
//! name = "chat"
//! kind = "slack"            # Slack-compatible {"text": ...}; the URL is a secret, so a reference
//! url = "env:SLACK_WEBHOOK_URL"
//!
//! [[alerts.route]]          # critical alerts page; a route without filters matches everything
//! severity = "critical"
//! channels = ["pager", "ops-mail"]
//!
//! [[alerts.route]]
//! credentials = ["db-main"]
//! channels = ["chat"]
//! ```
//!
//! With no route at all, every channel receives every notification. With routes, a notification
//! goes to the union of the channels of every route that matches it.
//!
//! A delivery attempt that gets no answer within its channel's `timeout` (a server that accepts
//! the connection and stays silent) fails as transient and is retried with backoff; connections
//! are given at most 10s of it.
//!
//! The types here are pure configuration: the `alert` module delivers with them. `url.rs` holds
//! [`UrlSource`], a URL given literally or as a secret reference, and its checks.

use std::collections::HashSet;
use std::time::Duration;

use keyrotd_plugin::reference::SecretRef;
use keyrotd_plugin::timeouts::{describe, DEFAULT_CONNECT_TIMEOUT};
use keyrotd_plugin::Timeouts;
use keyrotd_providers::resolve::Resolve;
use serde::{Deserialize, Deserializer};

use crate::event::Severity;
use crate::schedule::{parse_duration, Accepts};

mod url;

pub use self::url::UrlSource;
pub(crate) use self::url::{resolve_url_async, validate_url};
use keyrotd_plugin::is_loopback_host;

/// Bounds of a channel's `timeout`.
const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(300);

/// The `[alerts]` table. Parse it with serde, then call [`AlertsConfig::validate`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// How often a notification is repeated while its condition stays active.
    #[serde(
        default = "default_repeat_interval",
        deserialize_with = "whole_seconds"
    )]
    pub repeat_interval: Duration,
    /// How long before `max_age` the engine raises [`crate::alert::Condition::NearMaxAge`].
    #[serde(
        default = "default_warn_before",
        deserialize_with = "whole_seconds_or_zero"
    )]
    pub warn_before: Duration,
    /// Delivery attempts per notification and channel (the first one included).
    #[serde(default = "default_delivery_attempts")]
    pub delivery_attempts: u32,
    /// Wait before the first retry; it doubles after every failed attempt (capped at 5 minutes).
    #[serde(default = "default_delivery_backoff", deserialize_with = "timer")]
    pub delivery_backoff: Duration,
    /// `[[alerts.channel]]`: where notifications can go.
    #[serde(default, rename = "channel")]
    pub channels: Vec<ChannelConfig>,
    /// `[[alerts.route]]`: which notifications go where.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            repeat_interval: default_repeat_interval(),
            warn_before: default_warn_before(),
            delivery_attempts: default_delivery_attempts(),
            delivery_backoff: default_delivery_backoff(),
            channels: Vec::new(),
            routes: Vec::new(),
        }
    }
}

fn default_repeat_interval() -> Duration {
    Duration::from_secs(4 * 3600)
}

fn default_warn_before() -> Duration {
    Duration::from_secs(7 * 86400)
}

fn default_delivery_attempts() -> u32 {
    5
}

fn default_delivery_backoff() -> Duration {
    Duration::from_secs(2)
}

/// A duration within the bounds of every configured duration (see [`Accepts`]).
fn duration<'de, D: Deserializer<'de>>(d: D, accepts: Accepts) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s, accepts).map_err(serde::de::Error::custom)
}

fn whole_seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration(d, Accepts::SECONDS)
}

fn whole_seconds_or_zero<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration(d, Accepts::SECONDS_OR_ZERO)
}

fn timer<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration(d, Accepts::TIMER)
}

fn optional_timer<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    timer(d).map(Some)
}

/// One `[[alerts.channel]]`, selected by `kind`. Every kind has a unique `name`, used by routes
/// and as the `channel` label of the delivery metric.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ChannelConfig {
    /// `kind = "email"`: SMTP through lettre.
    Email(EmailConfig),
    /// `kind = "webhook"`: an HTTP POST of the generic JSON payload.
    Webhook(WebhookConfig),
    /// `kind = "slack"`: an HTTP POST of a Slack-compatible `{"text": ...}`.
    Slack(SlackConfig),
}

impl ChannelConfig {
    /// The channel's unique name.
    pub fn name(&self) -> &str {
        match self {
            Self::Email(c) => &c.name,
            Self::Webhook(c) => &c.name,
            Self::Slack(c) => &c.name,
        }
    }

    /// How long one delivery attempt may take, connection and any `aws-sm:` secret included:
    /// the configured `timeout`, or 30s for email and 10s for webhooks.
    pub fn attempt_timeout(&self) -> Duration {
        match self {
            Self::Email(c) => c.timeout.unwrap_or(Duration::from_secs(30)),
            Self::Webhook(WebhookConfig { timeout, .. })
            | Self::Slack(SlackConfig { timeout, .. }) => {
                timeout.unwrap_or(Duration::from_secs(10))
            }
        }
    }

    /// The timeouts a delivery attempt gives its connections and secret lookups.
    pub(crate) fn timeouts(&self) -> Timeouts {
        let call = self.attempt_timeout();
        Timeouts {
            connect: call.min(DEFAULT_CONNECT_TIMEOUT),
            call,
        }
    }
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (required, never optional). Default port 587.
    #[default]
    Starttls,
    /// TLS from the first byte ("SMTPS"). Default port 465.
    Tls,
    /// No TLS at all: only allowed to a loopback host. Default port 25.
    None,
}

/// `kind = "email"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// Unique channel name.
    pub name: String,
    /// SMTP server host name or address.
    pub host: String,
    /// SMTP port; defaults by `tls`: 587, 465 or 25.
    pub port: Option<u16>,
    /// Connection security.
    #[serde(default)]
    pub tls: SmtpTls,
    /// SMTP AUTH user name (not secret). Needs `password`.
    pub username: Option<String>,
    /// SMTP AUTH password, as a secret reference.
    pub password: Option<SecretRef>,
    /// The From: mailbox, e.g. `keyrotd <keyrotd@example.com>`.
    pub from: String,
    /// Recipients (at least one).
    pub to: Vec<String>,
    /// Timeout of one delivery attempt (default 30s).
    #[serde(default, deserialize_with = "optional_timer")]
    pub timeout: Option<Duration>,
}

impl EmailConfig {
    /// The port actually used.
    pub fn effective_port(&self) -> u16 {
        self.port.unwrap_or(match self.tls {
            SmtpTls::Starttls => 587,
            SmtpTls::Tls => 465,
            SmtpTls::None => 25,
        })
    }
}

/// `kind = "webhook"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Unique channel name.
    pub name: String,
    /// Where to POST: `https://`, plain `http://` only to loopback; or a secret reference to it.
    pub url: UrlSource,
    /// Optional secret reference whose value is sent verbatim as the `Authorization` header.
    pub authorization: Option<SecretRef>,
    /// Timeout of one delivery attempt (default 10s).
    #[serde(default, deserialize_with = "optional_timer")]
    pub timeout: Option<Duration>,
}

/// `kind = "slack"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// Unique channel name.
    pub name: String,
    /// The incoming-webhook URL. It embeds a token, so it must be a secret reference.
    pub url: UrlSource,
    /// Timeout of one delivery attempt (default 10s).
    #[serde(default, deserialize_with = "optional_timer")]
    pub timeout: Option<Duration>,
}

/// One `[[alerts.route]]`. Omitted filters match everything.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Match only notifications of this severity.
    pub severity: Option<Severity>,
    /// Match only these credential ids.
    pub credentials: Option<Vec<String>>,
    /// Channel names to deliver to.
    pub channels: Vec<String>,
}

impl RouteConfig {
    /// Whether this route takes a notification about `credential` with `severity`.
    pub fn matches(&self, credential: &str, severity: Severity) -> bool {
        self.severity.is_none_or(|s| s == severity)
            && self
                .credentials
                .as_ref()
                .is_none_or(|ids| ids.iter().any(|id| id == credential))
    }
}

impl AlertsConfig {
    /// Checks everything that can be checked without sending: the error starts with the field path.
    ///
    /// Secret references must resolve, channel names must be unique, routes must name existing
    /// channels, and unencrypted SMTP or HTTP is only allowed to a loopback host.
    pub fn validate(&self) -> Result<(), String> {
        if self.repeat_interval < Duration::from_secs(1) {
            return Err("repeat_interval: must be at least 1s".into());
        }
        if self.delivery_attempts == 0 {
            return Err("delivery_attempts: must be at least 1".into());
        }
        let mut names = HashSet::new();
        for (i, channel) in self.channels.iter().enumerate() {
            let at = |field: &str, msg: String| format!("channel[{i}].{field}: {msg}");
            let name = channel.name();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(at(
                    "name",
                    format!("`{name}` must be non-empty ASCII letters, digits, - _ ."),
                ));
            }
            if !names.insert(name) {
                return Err(at("name", format!("duplicate channel name `{name}`")));
            }
            let timeout = channel.attempt_timeout();
            if !(MIN_ATTEMPT_TIMEOUT..=MAX_ATTEMPT_TIMEOUT).contains(&timeout) {
                return Err(at(
                    "timeout",
                    format!(
                        "must be between {} and {}",
                        describe(MIN_ATTEMPT_TIMEOUT),
                        describe(MAX_ATTEMPT_TIMEOUT)
                    ),
                ));
            }
            match channel {
                ChannelConfig::Email(email) => validate_email(email).map_err(|(f, m)| at(f, m))?,
                ChannelConfig::Webhook(hook) => {
                    validate_url(&hook.url).map_err(|m| at("url", m))?;
                    // An aws-sm: reference needs AWS: it is checked when an alert is sent.
                    if let Some(auth) = hook.authorization.as_ref().filter(|a| !a.needs_async()) {
                        auth.resolve()
                            .map_err(|e| at("authorization", e.to_string()))?;
                    }
                }
                ChannelConfig::Slack(slack) => {
                    if matches!(slack.url, UrlSource::Literal(_)) {
                        return Err(at(
                            "url",
                            "a Slack-style webhook URL embeds its token: give it as a secret reference \
                             (env:NAME, file:/path or credential:NAME)"
                                .into(),
                        ));
                    }
                    validate_url(&slack.url).map_err(|m| at("url", m))?;
                }
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            if route.channels.is_empty() {
                return Err(format!(
                    "route[{i}].channels: must name at least one channel"
                ));
            }
            if let Some(unknown) = route.channels.iter().find(|c| !names.contains(c.as_str())) {
                return Err(format!("route[{i}].channels: no channel named `{unknown}`"));
            }
            if route.credentials.as_ref().is_some_and(Vec::is_empty) {
                return Err(format!(
                    "route[{i}].credentials: empty list matches nothing; omit it to match all"
                ));
            }
        }
        Ok(())
    }
}

fn validate_email(email: &EmailConfig) -> Result<(), (&'static str, String)> {
    if email.host.is_empty() {
        return Err(("host", "must not be empty".into()));
    }
    if email.tls == SmtpTls::None && !is_loopback_host(&email.host) {
        return Err((
            "tls",
            format!(
                "plain SMTP (tls = \"none\") is only allowed to a loopback host, not `{}`",
                email.host
            ),
        ));
    }
    match (&email.username, &email.password) {
        (Some(_), None) => return Err(("password", "required with username".into())),
        (None, Some(_)) => return Err(("username", "required with password".into())),
        // An aws-sm: reference needs AWS: it is resolved when a mail is sent.
        (Some(_), Some(password)) if password.needs_async() => {}
        (Some(_), Some(password)) => {
            password
                .resolve()
                .map_err(|e| ("password", e.to_string()))?;
        }
        (None, None) => {}
    }
    email
        .from
        .parse::<lettre::message::Mailbox>()
        .map_err(|e| ("from", format!("`{}` is not a mailbox: {e}", email.from)))?;
    if email.to.is_empty() {
        return Err(("to", "must list at least one recipient".into()));
    }
    for to in &email.to {
        to.parse::<lettre::message::Mailbox>()
            .map_err(|e| ("to", format!("`{to}` is not a mailbox: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> AlertsConfig {
        toml::from_str(toml_text).expect("config parses")
    }

    #[test]
    fn defaults_apply() {
        let c = parse("");
        assert_eq!(c.repeat_interval, Duration::from_secs(4 * 3600));
        assert_eq!(c.warn_before, Duration::from_secs(7 * 86400));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = toml::from_str::<AlertsConfig>("repeat = \"1h\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = toml::from_str::<AlertsConfig>(
            "[[channel]]\nname = \"x\"\nkind = \"webhook\"\nurl = \"https://a.example\"\nbogus = 1",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn plain_transports_only_to_loopback() {
        let c =
            parse("[[channel]]\nname = \"h\"\nkind = \"webhook\"\nurl = \"http://example.com/x\"");
        let err = c.validate().unwrap_err();
        assert!(err.starts_with("channel[0].url: "), "{err}");
        let c =
            parse("[[channel]]\nname = \"h\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9/x\"");
        c.validate().unwrap();
        let email = "[[channel]]\nname = \"m\"\nkind = \"email\"\nfrom = \"a@b.c\"\nto = [\"d@e.f\"]\ntls = \"none\"\n";
        let err = parse(&format!("{email}host = \"mail.example.com\""))
            .validate()
            .unwrap_err();
        assert!(err.starts_with("channel[0].tls: "), "{err}");
        parse(&format!("{email}host = \"::1\"")).validate().unwrap();
        parse(&format!("{email}host = \"localhost\""))
            .validate()
            .unwrap();
    }

    #[test]
    fn names_routes_and_references_are_checked() {
        let hook = "[[channel]]\nname = \"h\"\nkind = \"webhook\"\nurl = \"https://a.example\"\n";
        let err = parse(&format!("{hook}{hook}")).validate().unwrap_err();
        assert!(err.starts_with("channel[1].name: duplicate"), "{err}");
        let err = parse(&format!("{hook}[[route]]\nchannels = [\"nope\"]"))
            .validate()
            .unwrap_err();
        assert!(err.starts_with("route[0].channels: "), "{err}");
        let err = parse(&format!(
            "{hook}authorization = \"env:KEYROTD_TEST_SURELY_UNSET_VAR\""
        ))
        .validate()
        .unwrap_err();
        assert!(err.starts_with("channel[0].authorization: "), "{err}");
        let err =
            toml::from_str::<AlertsConfig>(&format!("{hook}authorization = \"Bearer hunter2\""))
                .unwrap_err()
                .to_string();
        assert!(err.contains("literal") && !err.contains("hunter2"), "{err}");
        let slack = "[[channel]]\nname = \"s\"\nkind = \"slack\"\nurl = \"https://hooks.slack.com/services/T/B/X\"";
        let err = parse(slack).validate().unwrap_err();
        assert!(
            err.starts_with("channel[0].url: ") && !err.contains("services/T"),
            "{err}"
        );
    }

    #[test]
    fn routes_match_by_severity_and_credential() {
        let r = RouteConfig {
            severity: Some(Severity::Critical),
            credentials: None,
            channels: vec![],
        };
        assert!(r.matches("a", Severity::Critical));
        assert!(!r.matches("a", Severity::Warning));
        let r = RouteConfig {
            severity: None,
            credentials: Some(vec!["a".into()]),
            channels: vec![],
        };
        assert!(r.matches("a", Severity::Warning));
        assert!(!r.matches("b", Severity::Warning));
    }
}
