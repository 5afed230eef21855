//! A URL given literally or as a secret reference (`[[alerts.channel]]`'s `url`): parsing it,
//! checking its scheme and host, and resolving it when an alert is sent. Invariant: no error
//! contains a URL resolved from a secret reference, and plain `http://` goes only to a
//! loopback host.

use keyrotd_plugin::is_loopback_host;
use keyrotd_plugin::reference::SecretRef;
use keyrotd_plugin::Timeouts;
use keyrotd_providers::resolve::Resolve;
use serde::{Deserialize, Deserializer};

/// A URL given either literally (`https://...`) or as a secret reference (`env:HOOK_URL`), for
/// endpoints whose URL is itself a credential (Slack incoming webhooks).
#[derive(Debug, Clone, PartialEq)]
pub enum UrlSource {
    /// A literal `http://` or `https://` URL from the config file.
    Literal(String),
    /// A reference resolved when the channel is built.
    Secret(SecretRef),
}

impl<'de> Deserialize<'de> for UrlSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.starts_with("http://") || s.starts_with("https://") {
            return Ok(Self::Literal(s));
        }
        s.parse().map(Self::Secret).map_err(|e| {
            serde::de::Error::custom(format!(
                "expected an http(s):// URL or a secret reference: {e}"
            ))
        })
    }
}

/// Checks a URL source at configuration time: resolves and checks it, except an `aws-sm:`
/// reference, which needs AWS and is resolved (and checked) when an alert is sent.
pub(crate) fn validate_url(source: &UrlSource) -> Result<(), String> {
    match source {
        UrlSource::Secret(reference) if reference.needs_async() => Ok(()),
        _ => resolve_url(source).map(drop),
    }
}

/// [`resolve_url`] for every kind of reference, `aws-sm:` included.
pub(crate) async fn resolve_url_async(
    source: &UrlSource,
    timeouts: Timeouts,
) -> Result<reqwest::Url, String> {
    use secrecy::ExposeSecret;
    match source {
        UrlSource::Secret(reference) => {
            let secret = reference
                .resolve_async(timeouts)
                .await
                .map_err(|e| e.to_string())?;
            check_url(secret.expose_secret(), format!("the URL in `{reference}`"))
        }
        UrlSource::Literal(_) => resolve_url(source),
    }
}

/// Resolves a URL source and checks its scheme. Errors never contain a resolved (secret) URL.
pub(crate) fn resolve_url(source: &UrlSource) -> Result<reqwest::Url, String> {
    use secrecy::ExposeSecret;
    let (text, shown) = match source {
        UrlSource::Literal(url) => (url.clone(), format!("`{url}`")),
        UrlSource::Secret(reference) => (
            reference
                .resolve()
                .map_err(|e| e.to_string())?
                .expose_secret()
                .to_owned(),
            format!("the URL in `{reference}`"),
        ),
    };
    check_url(&text, shown)
}

/// Checks the scheme and host of a resolved URL; `shown` names it in errors without the value.
fn check_url(text: &str, shown: String) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("{shown} is not a URL: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if url.host_str().is_some_and(is_loopback_host) => {}
        "http" => {
            return Err(format!(
                "{shown}: plain http:// is only allowed to a loopback host; use https://"
            ))
        }
        other => return Err(format!("{shown}: unsupported scheme `{other}`")),
    }
    if url.host_str().is_none() {
        return Err(format!("{shown} has no host"));
    }
    Ok(url)
}
