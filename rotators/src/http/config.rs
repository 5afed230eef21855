//! The `http` rotator's configuration: the three requests as written in the inventory, and their
//! validation into a [`Parsed`] form whose templates, methods, header names and URLs are known to
//! be well-formed.
//!
//! Invariant: a configuration that passes [`HttpConfig::validate`] renders every request without
//! an error that depends on the configuration; only values (ids, secrets) can still fail at
//! request time.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;

use super::client::check_url;
use super::template::{
    body_uses, check_body, parse_template, render, verbatim, Piece, RequestKind, Vars,
};
use crate::timeouts::{self, Timeouts};
use keyrotd_plugin::reference::SecretRef;

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
    /// The optional in-use check (`revoke = "when_unused"`): a request about the old key
    /// (`{{old_id}}`) whose JSON answer has its last use at `pointer`.
    #[serde(default)]
    pub last_used: Option<LastUsedConfig>,
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

/// The `last_used` request: made with the admin token, about the old key (`{{old_id}}`); its
/// JSON answer holds the key's last use at `pointer`, as RFC 3339 in UTC
/// (`2026-11-30T05:00:00Z`) or Unix seconds; `null` or absent means never used.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastUsedConfig {
    /// The HTTP method (`GET` by default).
    #[serde(default = "default_get")]
    pub method: String,
    /// The URL template.
    pub url: String,
    /// Extra headers (templates).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A JSON body (templates in its strings).
    #[serde(default)]
    pub body: Option<Value>,
    /// Where the answer has the last-used time (a JSON pointer).
    pub pointer: String,
}

fn default_get() -> String {
    "GET".into()
}

fn default_expect_status() -> u16 {
    200
}

/// A request with its templates parsed.
#[derive(Debug, Clone)]
pub(super) struct Request {
    pub(super) kind: RequestKind,
    pub(super) method: Method,
    pub(super) url: Vec<Piece>,
    pub(super) headers: Vec<(HeaderName, Vec<Piece>)>,
    pub(super) body: Option<Value>,
}

impl Request {
    fn parse(
        kind: RequestKind,
        method: &str,
        url: &str,
        headers: &BTreeMap<String, String>,
        body: &Option<Value>,
    ) -> Result<Self, String> {
        let s = kind.name();
        let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("{s}.method: `{method}` is not an HTTP method"))?;
        let url_pieces = parse_template(kind, &format!("{s}.url"), url)?;
        check_url(&format!("{s}.url"), &url_pieces)?;
        let mut parsed_headers = Vec::new();
        for (name, value) in headers {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{s}.headers: `{name}` is not a valid header name"))?;
            let pieces = parse_template(kind, &format!("{s}.headers.{name}"), value)?;
            let sample = render(&pieces, &Vars::default(), verbatim);
            HeaderValue::from_str(&sample)
                .map_err(|_| format!("{s}.headers.{name}: not a valid header value"))?;
            parsed_headers.push((header, pieces));
        }
        if let Some(body) = body {
            check_body(kind, &format!("{s}.body"), body)?;
        }
        Ok(Self {
            kind,
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
pub(super) struct Parsed {
    pub(super) issue: Request,
    pub(super) verify: Request,
    pub(super) revoke: Request,
    pub(super) last_used: Option<Request>,
    pub(super) auth_header: HeaderName,
}

impl HttpConfig {
    /// Validates the configuration into its parsed form; the error names the offending field.
    pub(super) fn parse(&self) -> Result<Parsed, String> {
        let auth_header = HeaderName::from_bytes(self.auth_header.as_bytes()).map_err(|_| {
            format!(
                "auth_header: `{}` is not a valid header name",
                self.auth_header
            )
        })?;
        HeaderValue::from_str(&self.auth_prefix)
            .map_err(|_| "auth_prefix: not a valid header value".to_owned())?;
        let i = &self.issue;
        let issue = Request::parse(RequestKind::Issue, &i.method, &i.url, &i.headers, &i.body)?;
        let v = &self.verify;
        let verify = Request::parse(RequestKind::Verify, &v.method, &v.url, &v.headers, &v.body)?;
        let r = &self.revoke;
        let revoke = Request::parse(RequestKind::Revoke, &r.method, &r.url, &r.headers, &r.body)?;
        if !revoke.uses("old_id") {
            return Err(
                "revoke: the request must name the key with `{{old_id}}` (in url, headers or body)"
                    .into(),
            );
        }
        let last_used = match &self.last_used {
            Some(l) => {
                let request = Request::parse(
                    RequestKind::LastUsed,
                    &l.method,
                    &l.url,
                    &l.headers,
                    &l.body,
                )?;
                if !request.uses("old_id") {
                    return Err("last_used: the request must name the key with `{{old_id}}` (in url, headers or body)".into());
                }
                check_pointer("last_used.pointer", &l.pointer)?;
                Some(request)
            }
            None => None,
        };
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
            check_body(RequestKind::Verify, "verify.expect_value", expected)?;
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
            last_used,
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
