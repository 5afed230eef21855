//! A built channel: one transport (SMTP or HTTP) that delivers one notification once.
//!
//! Invariant: an attempt is bounded here as a whole, by the channel's call timeout, whatever the
//! client bounds itself; retries are the delivery worker's business, not the channel's.

use std::time::Duration;

use super::notification::{DeliveryError, Notification};
use super::ChannelConfig;
use super::{email, webhook};

/// Knows how to deliver one notification once, within its attempt timeout.
pub(super) struct Channel {
    transport: Transport,
    timeout: Duration,
}

enum Transport {
    Email(email::EmailChannel),
    Webhook(webhook::WebhookChannel),
}

impl Channel {
    /// Builds the transport a validated channel config describes.
    pub(super) fn build(config: &ChannelConfig) -> anyhow::Result<Self> {
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
    pub(super) async fn send(&self, notification: &Notification) -> Result<(), DeliveryError> {
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
