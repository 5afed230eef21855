//! The `http` rotator: an API key at a SaaS provider, issued, verified and revoked through HTTP
//! requests described entirely in the configuration.
//!
//! Three requests, each a method, a URL, headers and an optional JSON body:
//! - `issue` creates a key; `secret_pointer` and `id_pointer` (JSON pointers) say where the new
//!   secret and its id are in the JSON response;
//! - `verify` is made *with the new secret* (by default sent as `auth_header: auth_prefix + secret`)
//!   and must answer `expect_status`, optionally with `expect_value` at `expect_pointer`;
//! - `revoke` deletes a key by id (`404` and `410` count as already revoked).
//!
//! The admin token (`auth`) is a secret reference, sent as `auth_header: auth_prefix + token` on
//! `issue` and `revoke`. Templates (`{{name}}`) may use only a fixed set of variables, checked at
//! load time: `credential_id` everywhere, `old_id` in `issue` (the published key, empty when there
//! is none) and `revoke` (the key being revoked), `new_id` and `new_secret` in `verify` only. The
//! environment is never reachable from a template.
//!
//! Requests go over HTTPS, except to loopback addresses. 5xx and 429 answers are retried a bounded
//! number of times, honouring `Retry-After` up to `max_retry_after_secs`; redirects are not followed.
//! A connection must be made within `connect_timeout`, and one step's requests, retries and waits
//! included, must finish within `timeout`: a retry that would end past it is not made.
//!
//! A connection that was never made is retried; a timeout is not, since a timed-out `issue` may
//! have created a key. A key whose `issue` answer lacks the secret is revoked at once when its id
//! is known. With `abandon(None, ..)` (a crash lost the issued id) nothing can be found: the
//! configuration has no listing request.
//!
//! Invariant: error messages name the request and the HTTP status, never a secret or a response
//! body (which may contain one).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;

use crate::reference::SecretRef;
use crate::resolve::Resolve;
use crate::timeouts::{self, Timeouts};
use crate::{Attrs, Credential, ErrorClass, ProviderError, Rotator, StepContext};

/// Attribute carrying the provider's id of a key.
pub const KEY_ID_ATTR: &str = "key_id";

/// Configuration of the `http` rotator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// The token `issue` and `revoke` authenticate with, as a secret reference.
    pub auth: SecretRef,
    /// Header carrying the token (and, in `verify`, the new secret).
    #[serde(default = "default_auth_header")]
    pub auth_header: String,
    /// Text put before the token in `auth_header`.
    #[serde(default = "default_auth_prefix")]
    pub auth_prefix: String,
    /// The request that creates a key.
    pub issue: RequestConfig,
    /// JSON pointer to the new secret in `issue`'s response (`/key/secret`).
    pub secret_pointer: String,
    /// JSON pointer to the new key's id in `issue`'s response (`/key/id`).
    pub id_pointer: String,
    /// The request that proves the new secret works.
    pub verify: VerifyConfig,
    /// The request that revokes a key by id (`{{old_id}}`).
    pub revoke: RequestConfig,
    /// Name of the secret's field in JSON stores.
    #[serde(default = "default_secret_field")]
    pub secret_field: String,
    /// The longest wait for a connection, TLS included (`"10s"`).
    #[serde(
        default = "timeouts::default_connect",
        deserialize_with = "timeouts::duration"
    )]
    pub connect_timeout: Duration,
    /// The longest one step may take, every request, retry and `Retry-After` wait included
    /// (`"60s"`).
    #[serde(
        default = "timeouts::default_call",
        deserialize_with = "timeouts::duration"
    )]
    pub timeout: Duration,
    /// How many times a 5xx or 429 answer, or a refused connection, is retried.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// The longest `Retry-After` waited for; a longer one fails the step as transient instead.
    #[serde(default = "default_max_retry_after")]
    pub max_retry_after_secs: u64,
}

fn default_auth_header() -> String {
    "Authorization".into()
}

fn default_auth_prefix() -> String {
    "Bearer ".into()
}

fn default_secret_field() -> String {
    "api_key".into()
}

fn default_retries() -> u32 {
    3
}

fn default_max_retry_after() -> u64 {
    60
}

fn default_method() -> String {
    "POST".into()
}

/// An `issue` or `revoke` request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestConfig {
    /// HTTP method (`POST`, `DELETE`, ...).
    #[serde(default = "default_method")]
    pub method: String,
    /// URL template.
    pub url: String,
    /// Extra headers (templates).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// JSON body; every string in it is a template.
    #[serde(default)]
    pub body: Option<Value>,
}

/// The `verify` request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// HTTP method.
    #[serde(default = "default_get")]
    pub method: String,
    /// URL template.
    pub url: String,
    /// Extra headers (templates). Unless one of them is `auth_header`, the new secret is sent as
    /// `auth_header: auth_prefix + new_secret`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// JSON body; every string in it is a template.
    #[serde(default)]
    pub body: Option<Value>,
    /// The status a working key gets.
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
    /// JSON pointer checked in the response.
    #[serde(default)]
    pub expect_pointer: Option<String>,
    /// The value expected at `expect_pointer`; strings in it are templates (`"{{new_id}}"`).
    #[serde(default)]
    pub expect_value: Option<Value>,
}

fn default_get() -> String {
    "GET".into()
}

fn default_expect_status() -> u16 {
    200
}

/// Which request a template belongs to; decides the variables it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Issue,
    Verify,
    Revoke,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Self::Issue => "issue",
            Self::Verify => "verify",
            Self::Revoke => "revoke",
        }
    }

    fn allowed(self) -> &'static [&'static str] {
        match self {
            Self::Issue => &["credential_id", "old_id"],
            Self::Verify => &["credential_id", "new_id", "new_secret"],
            Self::Revoke => &["credential_id", "old_id"],
        }
    }
}

/// A piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Var(&'static str),
}

/// Parses `text`, refusing unknown variables and variables not allowed in `step` (any known
/// variable when `step` is `None`: for templates already checked).
fn parse_template(
    step: impl Into<Option<Step>>,
    field: &str,
    text: &str,
) -> Result<Vec<Piece>, String> {
    let step = step.into();
    const KNOWN: [&str; 4] = ["credential_id", "old_id", "new_id", "new_secret"];
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            pieces.push(Piece::Text(rest[..start].to_owned()));
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("{field}: unclosed `{{{{` in template"))?;
        let name = after[..end].trim();
        let var = KNOWN.into_iter().find(|k| *k == name).ok_or_else(|| {
            format!(
                "{field}: unknown template variable `{name}` (known: {})",
                KNOWN.join(", ")
            )
        })?;
        if let Some(step) = step.filter(|s| !s.allowed().contains(&var)) {
            return Err(format!(
                "{field}: `{{{{{var}}}}}` cannot be used in the {} request (allowed: {})",
                step.name(),
                step.allowed().join(", ")
            ));
        }
        pieces.push(Piece::Var(var));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_owned()));
    }
    Ok(pieces)
}

/// The values template variables take in one request.
#[derive(Default)]
struct Vars<'a> {
    credential_id: &'a str,
    old_id: &'a str,
    new_id: &'a str,
    new_secret: Option<&'a SecretString>,
}

impl Vars<'_> {
    fn get(&self, name: &str) -> &str {
        match name {
            "credential_id" => self.credential_id,
            "old_id" => self.old_id,
            "new_id" => self.new_id,
            "new_secret" => self
                .new_secret
                .map(|s| s.expose_secret())
                .unwrap_or_default(),
            _ => unreachable!("templates are checked at load time"),
        }
    }
}

fn render(pieces: &[Piece], vars: &Vars<'_>, encode: fn(&str) -> String) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Text(t) => t.clone(),
            Piece::Var(v) => encode(vars.get(v)),
        })
        .collect()
}

fn verbatim(s: &str) -> String {
    s.to_owned()
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so a value stays one segment.
fn url_component(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A request with its templates parsed.
#[derive(Debug, Clone)]
struct Request {
    step: Step,
    method: Method,
    url: Vec<Piece>,
    headers: Vec<(HeaderName, Vec<Piece>)>,
    body: Option<Value>,
}

impl Request {
    fn parse(
        step: Step,
        method: &str,
        url: &str,
        headers: &BTreeMap<String, String>,
        body: &Option<Value>,
    ) -> Result<Self, String> {
        let s = step.name();
        let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("{s}.method: `{method}` is not an HTTP method"))?;
        let url_pieces = parse_template(step, &format!("{s}.url"), url)?;
        check_url(&format!("{s}.url"), &url_pieces)?;
        let mut parsed_headers = Vec::new();
        for (name, value) in headers {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{s}.headers: `{name}` is not a valid header name"))?;
            let pieces = parse_template(step, &format!("{s}.headers.{name}"), value)?;
            let sample = render(&pieces, &Vars::default(), verbatim);
            HeaderValue::from_str(&sample)
                .map_err(|_| format!("{s}.headers.{name}: not a valid header value"))?;
            parsed_headers.push((header, pieces));
        }
        if let Some(body) = body {
            check_body(step, &format!("{s}.body"), body)?;
        }
        Ok(Self {
            step,
            method,
            url: url_pieces,
            headers: parsed_headers,
            body: body.clone(),
        })
    }

    /// Whether any template of the request (url, headers, body) refers to `var`.
    fn uses(&self, var: &'static str) -> bool {
        let piece = Piece::Var(var);
        self.url.contains(&piece)
            || self.headers.iter().any(|(_, p)| p.contains(&piece))
            || self.body.as_ref().is_some_and(|b| body_uses(b, &piece))
    }
}

fn body_uses(value: &Value, piece: &Piece) -> bool {
    match value {
        Value::String(s) => parse_template(None, "", s).is_ok_and(|p| p.contains(piece)),
        Value::Array(items) => items.iter().any(|v| body_uses(v, piece)),
        Value::Object(map) => map.values().any(|v| body_uses(v, piece)),
        _ => false,
    }
}

fn check_body(step: Step, field: &str, value: &Value) -> Result<(), String> {
    match value {
        Value::String(s) => parse_template(step, field, s).map(drop),
        Value::Array(items) => items.iter().try_for_each(|v| check_body(step, field, v)),
        Value::Object(map) => map.values().try_for_each(|v| check_body(step, field, v)),
        _ => Ok(()),
    }
}

fn render_body(value: &Value, vars: &Vars<'_>) -> Value {
    match value {
        Value::String(s) => {
            let pieces = parse_template(None, "", s).expect("checked at load time");
            Value::String(render(&pieces, vars, verbatim))
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| render_body(v, vars)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), render_body(v, vars)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Checks that a URL template is absolute, that variables cannot change its origin, and that it
/// uses HTTPS unless it points at loopback.
fn check_url(field: &str, pieces: &[Piece]) -> Result<(), String> {
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

fn is_loopback(url: &url::Url) -> bool {
    url.host_str().is_some_and(crate::is_loopback_host)
}

fn check_pointer(field: &str, pointer: &str) -> Result<(), String> {
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return Err(format!(
            "{field}: `{pointer}` is not a JSON pointer (it must start with `/`)"
        ));
    }
    Ok(())
}

/// The parsed, validated form of an [`HttpConfig`].
#[derive(Debug, Clone)]
struct Parsed {
    issue: Request,
    verify: Request,
    revoke: Request,
    auth_header: HeaderName,
}

impl HttpConfig {
    fn parse(&self) -> Result<Parsed, String> {
        let auth_header = HeaderName::from_bytes(self.auth_header.as_bytes()).map_err(|_| {
            format!(
                "auth_header: `{}` is not a valid header name",
                self.auth_header
            )
        })?;
        HeaderValue::from_str(&self.auth_prefix)
            .map_err(|_| "auth_prefix: not a valid header value".to_owned())?;
        let i = &self.issue;
        let issue = Request::parse(Step::Issue, &i.method, &i.url, &i.headers, &i.body)?;
        let v = &self.verify;
        let verify = Request::parse(Step::Verify, &v.method, &v.url, &v.headers, &v.body)?;
        let r = &self.revoke;
        let revoke = Request::parse(Step::Revoke, &r.method, &r.url, &r.headers, &r.body)?;
        if !revoke.uses("old_id") {
            return Err(
                "revoke: the request must name the key with `{{old_id}}` (in url, headers or body)"
                    .into(),
            );
        }
        check_pointer("secret_pointer", &self.secret_pointer)?;
        check_pointer("id_pointer", &self.id_pointer)?;
        // The id is journaled and sent in revoke URLs: it must not be (part of) the secret.
        let overlaps = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}/"));
        if overlaps(&self.id_pointer, &self.secret_pointer)
            || overlaps(&self.secret_pointer, &self.id_pointer)
        {
            return Err(
                "id_pointer: must not point at or inside secret_pointer (or contain it)".into(),
            );
        }
        if let Some(p) = &v.expect_pointer {
            check_pointer("verify.expect_pointer", p)?;
        }
        if let Some(expected) = &v.expect_value {
            check_body(Step::Verify, "verify.expect_value", expected)?;
        }
        if v.expect_pointer.is_some() != v.expect_value.is_some() {
            return Err(
                "verify.expect_pointer: needs verify.expect_value, and the other way round".into(),
            );
        }
        StatusCode::from_u16(v.expect_status).map_err(|_| {
            format!(
                "verify.expect_status: {} is not an HTTP status",
                v.expect_status
            )
        })?;
        if self.secret_field.is_empty() {
            return Err("secret_field: must not be empty".into());
        }
        timeouts::validate(self.connect_timeout, self.timeout)?;
        if self.max_retries > 10 {
            return Err("max_retries: at most 10".into());
        }
        if self.max_retry_after_secs > 3600 {
            return Err("max_retry_after_secs: at most 3600".into());
        }
        Ok(Parsed {
            issue,
            verify,
            revoke,
            auth_header,
        })
    }

    /// Checks the configuration without any request; the error names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        self.parse().map(drop)
    }

    /// The configured `connect_timeout` and `timeout`.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts::new(self.connect_timeout, self.timeout)
    }
}

/// The `http` rotator.
#[derive(Debug)]
pub struct HttpRotator {
    config: HttpConfig,
    parsed: Parsed,
    client: reqwest::Client,
}

/// What a request answered: its status and, for JSON answers, the parsed body.
struct Answer {
    status: StatusCode,
    json: Option<Value>,
}

impl HttpRotator {
    /// Builds the rotator from a configuration; validates it first.
    pub fn new(config: HttpConfig) -> Result<Self, String> {
        let parsed = config.parse()?;
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(config.timeout)
            .connect_timeout(config.timeouts().connect)
            // A redirect could carry the token elsewhere; providers' APIs do not need one.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("keyrotd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        Ok(Self {
            config,
            parsed,
            client,
        })
    }

    fn auth_value(&self, op: &str, secret: &SecretString) -> Result<HeaderValue, ProviderError> {
        let mut value = HeaderValue::from_str(&format!(
            "{}{}",
            self.config.auth_prefix,
            secret.expose_secret()
        ))
        .map_err(|_| {
            ProviderError::permanent(format!("{op}: the secret is not a valid header value"))
        })?;
        value.set_sensitive(true);
        Ok(value)
    }

    async fn admin_token(&self, op: &str) -> Result<HeaderValue, ProviderError> {
        let token = self
            .config
            .auth
            .resolve_async(self.config.timeouts())
            .await
            .map_err(|e| ProviderError {
                class: e.class(),
                code: None,
                message: format!("{op}: auth {}: {e}", self.config.auth),
            })?;
        self.auth_value(op, &token)
    }

    /// Sends `request` with retries on refused connections, 5xx and 429.
    async fn send(
        &self,
        request: &Request,
        vars: &Vars<'_>,
        auth: HeaderValue,
    ) -> Result<Answer, ProviderError> {
        let op = request.step.name();
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

    async fn revoke_id(&self, ctx: StepContext<'_>, id: &str) -> Result<(), ProviderError> {
        let vars = Vars {
            credential_id: ctx.credential_id,
            old_id: id,
            ..Vars::default()
        };
        let answer = self
            .send(
                &self.parsed.revoke,
                &vars,
                self.admin_token("revoke").await?,
            )
            .await?;
        match answer.status {
            s if s.is_success() => Ok(()),
            // Already gone: revoking again is a no-op.
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(()),
            s => Err(status_error("revoke", s)),
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

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250u64 << attempt.min(6))
}

fn status_error(op: &str, status: StatusCode) -> ProviderError {
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

/// A string (or number, for ids) at `pointer`.
fn string_at(json: &Value, pointer: &str) -> Option<String> {
    match json.pointer(pointer)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[async_trait]
impl Rotator for HttpRotator {
    fn kind(&self) -> &'static str {
        "http"
    }

    fn secret_field(&self) -> &str {
        &self.config.secret_field
    }

    fn public_attrs(&self) -> &'static [&'static str] {
        &[KEY_ID_ATTR]
    }

    fn timeout(&self) -> Duration {
        self.config.timeout
    }

    async fn issue(
        &self,
        ctx: StepContext<'_>,
        current: Option<&Credential>,
    ) -> Result<Credential, ProviderError> {
        let old_id = current
            .and_then(|c| c.attrs.get(KEY_ID_ATTR))
            .map(String::as_str)
            .unwrap_or("");
        let vars = Vars {
            credential_id: ctx.credential_id,
            old_id,
            ..Vars::default()
        };
        let answer = self
            .send(&self.parsed.issue, &vars, self.admin_token("issue").await?)
            .await?;
        if !answer.status.is_success() {
            return Err(status_error("issue", answer.status));
        }
        let json = answer.json.ok_or_else(|| {
            ProviderError::permanent(format!("issue: HTTP {} answer is not JSON", answer.status))
        })?;
        let id = string_at(&json, &self.config.id_pointer);
        let secret = string_at(&json, &self.config.secret_pointer);
        match (id, secret) {
            (Some(id), Some(secret)) => Ok(Credential {
                secret: SecretString::from(secret),
                attrs: Attrs::from([(KEY_ID_ATTR.to_owned(), id)]),
            }),
            (id, _) => {
                let missing = if id.is_none() {
                    &self.config.id_pointer
                } else {
                    &self.config.secret_pointer
                };
                // A key we cannot use must not stay live: revoke it if we know its id.
                let cleanup = match &id {
                    Some(id) => match self.revoke_id(ctx, id).await {
                        Ok(()) => format!("; key {id} was revoked"),
                        Err(e) => format!("; revoking key {id} failed too: {e}"),
                    },
                    None => String::new(),
                };
                Err(ProviderError::permanent(format!(
                    "issue: the response has no string at `{missing}` (malformed answer){cleanup}"
                )))
            }
        }
    }

    async fn verify(&self, ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError> {
        let new_id = new.attrs.get(KEY_ID_ATTR).map(String::as_str).unwrap_or("");
        let vars = Vars {
            credential_id: ctx.credential_id,
            new_id,
            new_secret: Some(&new.secret),
            ..Vars::default()
        };
        let answer = self
            .send(
                &self.parsed.verify,
                &vars,
                self.auth_value("verify", &new.secret)?,
            )
            .await?;
        let v = &self.config.verify;
        if answer.status.as_u16() != v.expect_status {
            let mut e = status_error("verify", answer.status);
            e.message
                .push_str(&format!(" (expected {})", v.expect_status));
            if answer.status.is_success() {
                e.class = ErrorClass::Permanent;
            }
            return Err(e);
        }
        if let (Some(pointer), Some(expected)) = (&v.expect_pointer, &v.expect_value) {
            let expected = render_body(expected, &vars);
            if answer.json.as_ref().and_then(|j| j.pointer(pointer)) != Some(&expected) {
                // The actual value is not quoted: it could be secret.
                return Err(ProviderError::permanent(format!(
                    "verify: the response does not have the expected value at `{pointer}`"
                )));
            }
        }
        Ok(())
    }

    async fn abandon(
        &self,
        ctx: StepContext<'_>,
        issued: Option<&Attrs>,
        current: Option<&Credential>,
    ) -> Result<(), ProviderError> {
        let Some(id) = issued.and_then(|a| a.get(KEY_ID_ATTR)) else {
            // Without a listing request there is no way to find a key whose id was lost.
            tracing::warn!(
                credential = ctx.credential_id,
                "abandon: the issued key's id is unknown; nothing to revoke"
            );
            return Ok(());
        };
        if current.and_then(|c| c.attrs.get(KEY_ID_ATTR)) == Some(id) {
            return Ok(());
        }
        self.revoke_id(ctx, id).await
    }

    async fn revoke(&self, ctx: StepContext<'_>, old: &Attrs) -> Result<(), ProviderError> {
        let id = old.get(KEY_ID_ATTR).ok_or_else(|| {
            ProviderError::permanent(format!(
                "revoke: the old credential has no `{KEY_ID_ATTR}` attribute; revoke it by hand"
            ))
        })?;
        self.revoke_id(ctx, id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_accept_only_known_variables_in_their_request() {
        assert_eq!(
            parse_template(Step::Revoke, "f", "/keys/{{old_id}}").unwrap(),
            vec![Piece::Text("/keys/".into()), Piece::Var("old_id")]
        );
        assert!(parse_template(Step::Issue, "f", "{{HOME}}")
            .unwrap_err()
            .contains("unknown template variable `HOME`"));
        assert!(parse_template(Step::Issue, "f", "{{new_secret}}")
            .unwrap_err()
            .contains("cannot be used in the issue"));
        assert!(parse_template(Step::Verify, "f", "{{new_secret}}").is_ok());
        assert!(parse_template(Step::Issue, "f", "{{old_id")
            .unwrap_err()
            .contains("unclosed"));
    }

    #[test]
    fn urls_need_https_except_to_loopback() {
        let check = |u: &str| check_url("url", &parse_template(Step::Revoke, "url", u).unwrap());
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

    #[test]
    fn url_values_are_encoded_as_one_component() {
        assert_eq!(url_component("a/b c?d"), "a%2Fb%20c%3Fd");
    }
}
