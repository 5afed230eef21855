//! The `http` rotator: an API key at a SaaS provider, issued, verified and revoked through HTTP
//! requests described entirely in the configuration.
//!
//! Three requests, each a method, a URL, headers and an optional JSON body:
//! - `issue` creates a key; `secret_pointer` and `id_pointer` (JSON pointers) say where the new
//!   secret and its id are in the JSON response;
//! - `verify` is made *with the new secret* (by default sent as `auth_header: auth_prefix + secret`)
//!   and must answer `expect_status`, optionally with `expect_value` at `expect_pointer`;
//! - `revoke` deletes a key by id (`404` and `410` count as already revoked);
//! - `last_used` (optional, for `revoke = "when_unused"`, in `usage`) asks when the old key was
//!   last used, at a JSON pointer of its answer.
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
//!
//! Files: `config` holds the configuration and its validation, `template` the `{{name}}`
//! engine, `client` the transport (client, URL rule, retries, answer classification), and this
//! file the rotator and its [`Rotator`] implementation.

mod client;
mod config;
mod template;
mod usage;

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use reqwest::header::HeaderValue;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use self::client::status_error;
pub use self::client::{check_fixed_url, client};
use self::config::Parsed;
pub use self::config::{HttpConfig, LastUsedConfig, RequestConfig, VerifyConfig};
use self::template::{render_body, Vars};
use crate::resolve::Resolve;
use keyrotd_plugin::permissions::Permission;
use keyrotd_plugin::{
    Attrs, Credential, ErrorClass, Permissions, ProviderError, Rotator, StepContext, UsageReport,
};

/// Attribute carrying the provider's id of a key.
pub const KEY_ID_ATTR: &str = "key_id";

/// The `http` rotator.
#[derive(Debug)]
pub struct HttpRotator {
    config: HttpConfig,
    parsed: Parsed,
    client: reqwest::Client,
}

impl HttpRotator {
    /// Builds the rotator from a configuration; validates it first.
    pub fn new(config: HttpConfig) -> Result<Self, String> {
        let parsed = config.parse()?;
        let client = client::build(&config)?;
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

    /// The admin token's rights at the provider, in words (no policy language is common to
    /// HTTP APIs), and reading `auth`.
    fn permissions(&self) -> Permissions {
        let (issue, revoke) = (&self.config.issue, &self.config.revoke);
        let mut permissions = Permissions::none().need(Permission::Text(format!(
            "the `auth` token must be allowed to create keys (issue: {} {}) and to delete them \
             (revoke, abandon: {} {}), and nothing else; verify uses the new key itself",
            issue.method, issue.url, revoke.method, revoke.url
        )));
        permissions.extend(crate::resolve::permissions(&self.config.auth, &["auth"]));
        permissions
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

    fn checks_use(&self) -> bool {
        self.config.last_used.is_some()
    }

    fn use_permissions(&self) -> Permissions {
        match &self.config.last_used {
            Some(l) => Permissions::none().need(Permission::Text(format!(
                "the `auth` token must be allowed to read a key's last use (last_used: {} {})",
                l.method, l.url
            ))),
            None => Permissions::none(),
        }
    }

    async fn last_used(
        &self,
        ctx: StepContext<'_>,
        old: &Attrs,
        since: SystemTime,
    ) -> Result<UsageReport, ProviderError> {
        self.key_last_used(ctx, old, since).await
    }
}
