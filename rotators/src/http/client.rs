//! The `http` rotator's transport: which URLs it may reach, the HTTP client, sending one request
//! with its bounded retries, and classifying the answers.
//!
//! Invariants: requests go over HTTPS (rustls) except to loopback addresses, and redirects are
//! never followed, so the admin token cannot be carried elsewhere. A timed-out request is never
//! retried (a timed-out `issue` may have created a key); only a connection that was never made,
//! a 5xx or a 429 is, within the step's `timeout`. Error messages name the request and the HTTP
//! status, never a URL, a header or a response body, which may carry a secret.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::StatusCode;
use serde_json::Value;

use super::config::{HttpConfig, Request};
use super::template::{render, render_body, url_component, verbatim, Piece, Vars};
use super::HttpRotator;
use crate::timeouts;
use keyrotd_plugin::backoff::Backoff;
use keyrotd_plugin::{ErrorClass, ProviderError};

/// Checks that a URL template is absolute, that variables cannot change its origin, and that it
/// uses HTTPS unless it points at loopback.
pub(super) fn check_url(field: &str, pieces: &[Piece]) -> Result<(), String> {
    let sample = |v: &str| {
        let vars = Vars {
            credential_id: v,
            old_id: v,
            new_id: v,
            new_secret: None,
        };
        let text = render(pieces, &vars, url_component);
        url::Url::parse(&text).map_err(|e| format!("{field}: not an absolute URL ({e})"))
    };
    let (a, b) = (sample("a")?, sample("b")?);
    if a.origin() != b.origin() {
        return Err(format!(
            "{field}: template variables must not change the scheme, host or port"
        ));
    }
    match a.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(&a) => Ok(()),
        "http" => Err(format!(
            "{field}: must use https (plain http is only allowed to loopback addresses)"
        )),
        other => Err(format!("{field}: unsupported scheme `{other}`")),
    }
}

/// Checks a fixed URL (no template variables) by the rotator's URL rules: absolute, and HTTPS
/// unless it points at loopback. keyrotd's `http` delivery hooks follow the rotator's rules.
pub fn check_fixed_url(field: &str, url: &str) -> Result<(), String> {
    check_url(field, &[Piece::Text(url.to_owned())])
}

fn is_loopback(url: &url::Url) -> bool {
    url.host_str().is_some_and(keyrotd_plugin::is_loopback_host)
}

/// Builds the HTTP client: rustls, the configured timeouts, and no redirects.
pub(super) fn build(config: &HttpConfig) -> Result<reqwest::Client, String> {
    client(config.timeout, config.timeouts().connect)
}

/// The rotator's HTTP client for any caller: rustls, these timeouts, and no redirects (a redirect
/// could carry a token elsewhere). keyrotd's `http` delivery hooks use it too.
pub fn client(timeout: Duration, connect: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(timeout)
        .connect_timeout(connect)
        // A redirect could carry the token elsewhere; providers' APIs do not need one.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("keyrotd/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("http client: {e}"))
}

/// What a request answered: its status and, for JSON answers, the parsed body.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) json: Option<Value>,
}

impl HttpRotator {
    /// Sends `request` with retries on refused connections, 5xx and 429.
    pub(super) async fn send(
        &self,
        request: &Request,
        vars: &Vars<'_>,
        auth: HeaderValue,
    ) -> Result<Answer, ProviderError> {
        let op = request.kind.name();
        let url = render(&request.url, vars, url_component);
        let mut headers = HeaderMap::new();
        headers.insert(self.parsed.auth_header.clone(), auth);
        for (name, pieces) in &request.headers {
            let mut value =
                HeaderValue::from_str(&render(pieces, vars, verbatim)).map_err(|_| {
                    ProviderError::permanent(format!(
                        "{op}: header {name} renders to an invalid value"
                    ))
                })?;
            value.set_sensitive(pieces.contains(&Piece::Var("new_secret")));
            headers.insert(name.clone(), value);
        }
        let body = request.body.as_ref().map(|b| render_body(b, vars));
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        let mut attempt = 0;
        loop {
            let mut builder = self
                .client
                .request(request.method.clone(), &url)
                .headers(headers.clone())
                .timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
            if let Some(body) = &body {
                builder = builder.json(body);
            }
            let (error, retry_in) = match builder.send().await {
                Ok(response) => {
                    let status = response.status();
                    if status != StatusCode::TOO_MANY_REQUESTS && !status.is_server_error() {
                        let json = response.json::<Value>().await.ok();
                        return Ok(Answer { status, json });
                    }
                    let retry_after = response
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let fail = |why: &str| {
                        ProviderError::transient(format!("{op}: HTTP {status}{why}"))
                            .with_code(status.as_u16().to_string())
                    };
                    match retry_after {
                        Some(wait)
                            if wait > Duration::from_secs(self.config.max_retry_after_secs) =>
                        {
                            return Err(fail(&format!(
                                ", Retry-After {}s is longer than max_retry_after_secs",
                                wait.as_secs()
                            )));
                        }
                        Some(wait) => (fail(""), wait),
                        None => (fail(""), backoff(attempt)),
                    }
                }
                // A timed-out request is not retried: a timed-out issue may have created a key.
                Err(e) if e.is_timeout() => {
                    return Err(ProviderError::no_answer(
                        format!("{op}: request"),
                        self.config.timeout,
                    ))
                }
                // Only a connection that was never made is safe to retry.
                Err(e) if e.is_connect() => (
                    ProviderError::transient(format!(
                        "{op}: request cannot connect: {}",
                        root_cause(&e)
                    )),
                    backoff(attempt),
                ),
                Err(e) => {
                    return Err(ProviderError::transient(format!(
                        "{op}: request failed: {}",
                        root_cause(&e)
                    )))
                }
            };
            if attempt >= self.config.max_retries {
                return Err(with_note(error, &format!("after {} attempts", attempt + 1)));
            }
            if tokio::time::Instant::now() + retry_in >= deadline {
                return Err(with_note(
                    error,
                    &format!(
                        "a retry in {} would pass the timeout of {}",
                        timeouts::describe(retry_in),
                        timeouts::describe(self.config.timeout)
                    ),
                ));
            }
            attempt += 1;
            tokio::time::sleep(retry_in).await;
        }
    }
}

/// The innermost cause of a transport error (`Connection refused (os error 111)`). reqwest's own
/// message would name the URL, which can carry template values.
fn root_cause(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    if std::ptr::addr_eq(cause, e as &dyn std::error::Error) {
        return "no further detail".into();
    }
    cause.to_string()
}

/// Appends why a retryable failure is final (`HTTP 503 Service Unavailable (after 4 attempts)`).
fn with_note(mut error: ProviderError, note: &str) -> ProviderError {
    error.message.push_str(&format!(" ({note})"));
    error
}

/// The wait before retry number `attempt + 1` when the server names none: from 250 ms,
/// doubling up to 16 s, jittered.
fn backoff(attempt: u32) -> Duration {
    const RETRIES: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(16));
    RETRIES.delay(attempt + 1)
}

/// The error for an answer whose status is not the expected one: transient for 408, 429 and
/// 5xx, permanent otherwise.
pub(super) fn status_error(op: &str, status: StatusCode) -> ProviderError {
    let class = if status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
    {
        ErrorClass::Transient
    } else {
        ErrorClass::Permanent
    };
    ProviderError {
        class,
        code: Some(status.as_u16().to_string()),
        message: format!("{op}: HTTP {status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::template::{parse_template, RequestKind};

    #[test]
    fn urls_need_https_except_to_loopback() {
        let check = |u: &str| {
            check_url(
                "url",
                &parse_template(RequestKind::Revoke, "url", u).unwrap(),
            )
        };
        assert!(check("https://api.example.com/keys/{{old_id}}").is_ok());
        assert!(check("http://127.0.0.1:8080/keys").is_ok());
        assert!(check("http://127.3.4.5/keys").is_ok());
        assert!(check("http://[::1]:80/keys").is_ok());
        assert!(check("http://localhost/keys").is_ok());
        assert!(check("http://api.example.com/keys")
            .unwrap_err()
            .contains("must use https"));
        assert!(check("http://10.0.0.1/keys")
            .unwrap_err()
            .contains("must use https"));
        assert!(check("https://{{old_id}}.example.com/")
            .unwrap_err()
            .contains("must not change"));
        assert!(check("/keys").is_err());
    }
}
