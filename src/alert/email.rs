//! The `email` channel: one plain-text message per notification, over SMTP with lettre.
//!
//! Subject: `[keyrotd] FIRING critical: db-main stale` or `[keyrotd] RESOLVED: db-main stale`.
//! The body repeats the fields of the generic webhook payload, one per line.
//!
//! The password is resolved from its secret reference at every attempt, so a rotated SMTP
//! password is picked up without a restart; it only ever goes to lettre's AUTH exchange.
//!
//! lettre's own timeout bounds connecting only: a server that accepts the connection and never
//! sends its greeting would hold an attempt forever, so the delivery worker bounds each whole
//! attempt (see `Channel::send` in `channel.rs`).

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;

use keyrotd_plugin::Timeouts;
use keyrotd_providers::resolve::Resolve;

use super::notification::{rfc3339, AlertStatus, DeliveryError, Notification};
use crate::config::alerts::{EmailConfig, SmtpTls};

/// A configured SMTP channel.
pub(crate) struct EmailChannel {
    config: EmailConfig,
    from: Mailbox,
    to: Vec<Mailbox>,
    timeouts: Timeouts,
}

impl EmailChannel {
    pub(crate) fn new(config: &EmailConfig, timeouts: Timeouts) -> anyhow::Result<Self> {
        if config.tls == SmtpTls::None && !keyrotd_plugin::is_loopback_host(&config.host) {
            anyhow::bail!("plain SMTP is only allowed to a loopback host");
        }
        let from = config.from.parse()?;
        let to = config
            .to
            .iter()
            .map(|t| t.parse())
            .collect::<Result<_, _>>()?;
        Ok(Self {
            config: config.clone(),
            from,
            to,
            timeouts,
        })
    }

    async fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, DeliveryError> {
        let host = self.config.host.as_str();
        let tls_error =
            |e: lettre::transport::smtp::Error| DeliveryError::permanent(format!("TLS setup: {e}"));
        let builder = match self.config.tls {
            // STARTTLS is required, never opportunistic: a server that does not offer it fails.
            SmtpTls::Starttls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host).map_err(tls_error)?
            }
            SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(host).map_err(tls_error)?,
            SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host),
        };
        let mut builder = builder
            .port(self.config.effective_port())
            .timeout(Some(self.timeouts.connect));
        if let (Some(user), Some(password)) = (&self.config.username, &self.config.password) {
            let secret = password
                .resolve_async(self.timeouts)
                .await
                .map_err(|e| DeliveryError::transient(format!("SMTP password: {e}")))?;
            builder = builder.credentials(Credentials::new(
                user.clone(),
                secret.expose_secret().to_owned(),
            ));
        }
        Ok(builder.build())
    }

    pub(crate) async fn send(&self, n: &Notification) -> Result<(), DeliveryError> {
        let message = self.message(n)?;
        let transport = self.transport().await?;
        match transport.send(message).await {
            Ok(_) => Ok(()),
            // A 5xx reply (bad recipient, refused AUTH) will not change on retry.
            Err(e) if e.is_permanent() => Err(DeliveryError::permanent(format!("SMTP: {e}"))),
            Err(e) => Err(DeliveryError::transient(format!("SMTP: {e}"))),
        }
    }

    fn message(&self, n: &Notification) -> Result<Message, DeliveryError> {
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(subject(n));
        for to in &self.to {
            builder = builder.to(to.clone());
        }
        builder
            .header(ContentType::TEXT_PLAIN)
            .body(body(n))
            .map_err(|e| DeliveryError::permanent(format!("building the message: {e}")))
    }
}

/// The subject line of a notification.
pub fn subject(n: &Notification) -> String {
    match n.status {
        AlertStatus::Firing => format!(
            "[keyrotd] FIRING {}: {} {}{}",
            n.condition.severity(),
            n.credential,
            n.condition,
            if n.repeat { " (still active)" } else { "" }
        ),
        AlertStatus::Resolved => format!("[keyrotd] RESOLVED: {} {}", n.credential, n.condition),
    }
}

/// The plain-text body of a notification.
pub fn body(n: &Notification) -> String {
    let mut text = format!(
        "status: {}\ncredential: {}\ncondition: {} ({})\nseverity: {}\nsummary: {}\nstarted_at: {}\n",
        n.status.as_str(),
        n.credential,
        n.condition,
        n.condition.describe(),
        n.condition.severity(),
        n.summary,
        rfc3339(n.started_at),
    );
    if let Some(resolved) = n.resolved_at {
        text.push_str(&format!("resolved_at: {}\n", rfc3339(resolved)));
    }
    text.push_str(
        "\nSent by keyrotd. Details: `keyrotd status` and `keyrotd history` on the daemon host.\n",
    );
    text
}
