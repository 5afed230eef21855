//! `http` hooks (with the `http` feature): one request to a consumer's reload endpoint; a 2xx
//! answer is success. The URL passed the `http` rotator's rules at load time (HTTPS unless
//! loopback) and the request goes through the rotator's client, which follows no redirect, so a
//! secret header cannot be carried elsewhere. Errors name the status, never the
//! URL, a header or the body.

use std::collections::BTreeMap;
use std::time::Duration;

use keyrotd_plugin::reference::SecretRef;
use keyrotd_plugin::Timeouts;
use keyrotd_providers::resolve::Resolve;
use reqwest::header::{HeaderName, HeaderValue};
use secrecy::ExposeSecret;

use super::HookError;

/// One configured request.
pub(super) struct Request<'a> {
    pub(super) method: &'a str,
    pub(super) url: &'a str,
    pub(super) headers: &'a BTreeMap<String, String>,
    pub(super) secret_headers: &'a BTreeMap<String, SecretRef>,
}

/// Sends `request` within `timeout`.
pub(super) async fn send(request: &Request<'_>, timeout: Duration) -> Result<String, HookError> {
    let failed = |what: &str| HookError::Failed(what.to_owned());
    let connect = timeout.min(Duration::from_secs(10));
    let client = keyrotd_providers::http::client(timeout, connect).map_err(HookError::Failed)?;
    let method = reqwest::Method::from_bytes(request.method.as_bytes())
        .map_err(|_| failed("invalid method"))?;
    let mut builder = client.request(method, request.url);
    for (name, value) in request.headers {
        let value = HeaderValue::from_str(value)
            .map_err(|_| HookError::Failed(format!("header {name}: invalid value")))?;
        builder = builder.header(header_name(name)?, value);
    }
    let timeouts = Timeouts::new(connect, timeout);
    for (name, reference) in request.secret_headers {
        let secret = reference
            .resolve_async(timeouts)
            .await
            .map_err(|e| HookError::Failed(format!("header {name}: {e}")))?;
        let mut value = HeaderValue::from_str(secret.expose_secret())
            .map_err(|_| HookError::Failed(format!("header {name}: invalid value")))?;
        value.set_sensitive(true);
        builder = builder.header(header_name(name)?, value);
    }
    let answer = tokio::time::timeout(timeout, builder.send())
        .await
        .map_err(|_| HookError::Timeout(timeout))?
        .map_err(|e| {
            if e.is_timeout() {
                HookError::Timeout(timeout)
            } else if e.is_connect() {
                failed("could not connect")
            } else {
                failed("request failed")
            }
        })?;
    let status = answer.status();
    if status.is_success() {
        Ok(format!("answered {}", status.as_u16()))
    } else {
        Err(HookError::Failed(format!("answered {}", status.as_u16())))
    }
}

fn header_name(name: &str) -> Result<HeaderName, HookError> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| HookError::Failed(format!("header {name}: invalid name")))
}
