//! The `vault_approle_secret_id` rotator: a new secret-id for an AppRole role, the old one
//! destroyed after the grace period. Secret-ids of one role coexist, so consumers switch
//! without an outage.
//!
//! - issue: reads the role-id, then generates a secret-id (`POST auth/MOUNT/role/NAME/secret-id`)
//!   with the configured metadata, TTL, number of uses and CIDR bounds, plus the metadata
//!   `keyrotd_credential` and `keyrotd_rotation` (the rotation id) that let an orphan be found.
//!   The credential's secret is the secret-id; its public attributes are `role_id` and
//!   `secret_id_accessor`.
//! - verify: logs in with the role-id and the new secret-id in a request that carries no token
//!   (not keyrotd's), then revokes the token it got with `revoke-self`, as that token. A failed
//!   revoke is only a warning: the login has proved the secret-id, and the token expires with
//!   the role's `token_ttl`. With `num_uses`, verify spends one use of the new secret-id.
//! - revoke: destroys the old secret-id by its accessor. Vault answers 500 for an accessor that
//!   is already gone, so a failed destroy asks `lookup`, whose 404 means the work is done.
//! - abandon: destroys the issued secret-id; when a crash lost it, lists the role's accessors
//!   (404: none), looks each one up and destroys those whose metadata names this credential and
//!   rotation, never the current one or the one the rotation replaces.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Value};
use vaultrs::client::Client;

use super::calls::{check_mount, check_name, or_missing, Call};
use super::connection::optional_duration;
use super::error::classify;
use super::{VaultConnection, VaultSession};
use crate::timeouts::{self, Timeouts};
use keyrotd_plugin::permissions::Permission;
use keyrotd_plugin::{Attrs, Credential, Permissions, ProviderError, Rotator, StepContext};

/// The attribute naming the secret-id's accessor.
pub const ACCESSOR: &str = "secret_id_accessor";
/// The attribute holding the role-id, which consumers log in with beside the secret-id.
pub const ROLE_ID: &str = "role_id";
/// The metadata key holding the id of the rotation that generated a secret-id.
pub const ROTATION_KEY: &str = "keyrotd_rotation";
/// The metadata key holding the credential's id.
pub const CREDENTIAL_KEY: &str = "keyrotd_credential";

/// Configuration of the `vault_approle_secret_id` rotator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproleSecretIdConfig {
    /// Where the AppRole auth method is mounted (`approle`, for `auth/approle`).
    #[serde(default = "default_mount")]
    pub mount: String,
    /// The role whose secret-ids are rotated.
    pub role_name: String,
    /// Metadata put on every secret-id (shown in Vault's audit log of each login).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// How long a secret-id is valid (`"30d"`); by default the role's `secret_id_ttl`. Keep it
    /// longer than the rotation interval plus the grace period.
    #[serde(default, deserialize_with = "optional_duration")]
    pub ttl: Option<Duration>,
    /// How many logins a secret-id allows (verify spends one); by default the role's.
    pub num_uses: Option<u32>,
    /// The networks (CIDR) a secret-id may log in from; keyrotd's own address must be in them,
    /// since verify logs in with it.
    #[serde(default)]
    pub cidr_list: Vec<String>,
    /// The networks (CIDR) the tokens of a login with the secret-id may be used from.
    #[serde(default)]
    pub token_bound_cidrs: Vec<String>,
    /// Overrides of the `[vault]` table, field by field.
    #[serde(default)]
    pub vault: VaultConnection,
    /// The longest one step may take (`"60s"`).
    #[serde(
        default = "timeouts::default_call",
        deserialize_with = "timeouts::duration"
    )]
    pub timeout: Duration,
}

fn default_mount() -> String {
    "approle".into()
}

impl ApproleSecretIdConfig {
    /// Checks the configuration (after [`VaultConnection::fill`]); the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        check_mount("mount", &self.mount)?;
        check_name("role_name", &self.role_name)?;
        for key in [ROTATION_KEY, CREDENTIAL_KEY] {
            if self.metadata.contains_key(key) {
                return Err(format!("metadata: `{key}` is keyrotd's own key"));
            }
        }
        if self.ttl.is_some_and(|t| t < Duration::from_secs(60)) {
            return Err("ttl: must be at least 1m".into());
        }
        if self.num_uses == Some(1) {
            return Err(
                "num_uses: 1 would leave nothing for consumers: verify logs in once with the new \
                 secret-id (use 0 for unlimited, or 2 and more)"
                    .into(),
            );
        }
        for (field, cidrs) in [
            ("cidr_list", &self.cidr_list),
            ("token_bound_cidrs", &self.token_bound_cidrs),
        ] {
            if let Some(bad) = cidrs.iter().find(|c| !is_cidr(c)) {
                return Err(format!(
                    "{field}: `{bad}` is not a CIDR block like 10.0.0.0/8"
                ));
            }
        }
        timeouts::validate(timeouts::DEFAULT_CONNECT_TIMEOUT, self.timeout)?;
        self.vault.validate()
    }
}

/// Whether `text` is an IPv4 or IPv6 CIDR block (`10.0.0.0/8`, `2001:db8::/32`), or a single
/// address, which Vault takes as a /32 or /128.
fn is_cidr(text: &str) -> bool {
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let Ok(addr) = addr.parse::<std::net::IpAddr>() else {
        return false;
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    prefix.is_none_or(|p| {
        p.len() <= 3
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u8>().is_ok_and(|p| p <= max)
    })
}

/// The `vault_approle_secret_id` rotator.
pub struct ApproleSecretIdRotator {
    config: ApproleSecretIdConfig,
    session: Arc<VaultSession>,
}

impl ApproleSecretIdRotator {
    /// Builds the rotator from a configuration whose connection is filled in. Does not touch
    /// the network.
    pub fn new(config: ApproleSecretIdConfig) -> Result<Self, String> {
        config.validate()?;
        let session = VaultSession::shared(&config.vault)?;
        Ok(Self { config, session })
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts::new(timeouts::DEFAULT_CONNECT_TIMEOUT, self.config.timeout)
    }

    /// `auth/MOUNT/role/NAME`, the prefix of every path but the login's.
    fn role_path(&self) -> String {
        format!("auth/{}/role/{}", self.config.mount, self.config.role_name)
    }

    /// One call through keyrotd's session; `doing` says what for, `capability` and `path` what
    /// the policy must allow, and all three are in its errors.
    async fn call<R: serde::de::DeserializeOwned + Send + Sync>(
        &self,
        doing: &str,
        capability: &str,
        path: String,
        body: Option<Value>,
    ) -> Result<R, ProviderError> {
        let what = format!("{doing} ({capability} on {path})");
        self.session
            .call(&what, self.timeouts(), |client| {
                let call = match (capability, &body) {
                    ("list", _) => Call::list(path.clone()),
                    (_, Some(body)) => Call::write(path.clone(), body.clone()),
                    (_, None) => Call::read(path.clone()),
                };
                async move { vaultrs::api::exec_with_result(&*client, call).await }
            })
            .await
    }

    /// Destroys the secret-id of `accessor`; one that is already gone is fine.
    async fn destroy(&self, accessor: &str) -> Result<(), ProviderError> {
        let path = format!("{}/secret-id-accessor/destroy", self.role_path());
        let body = json!({ "secret_id_accessor": accessor });
        let destroyed = self
            .session
            .call(
                &format!("destroy secret-id {accessor} (update on {path})"),
                self.timeouts(),
                |client| {
                    let call = Call::<Value>::write(path.clone(), body.clone());
                    async move { vaultrs::api::exec_with_empty(&*client, call).await }
                },
            )
            .await;
        match destroyed {
            Ok(()) => {
                tracing::info!(role = %self.config.role_name, secret_id_accessor = accessor, "destroyed AppRole secret-id");
                Ok(())
            }
            // Vault answers 500 for an accessor it does not know: ask whether it is gone.
            Err(e) => match self.lookup(accessor).await? {
                None => Ok(()),
                Some(_) => Err(e),
            },
        }
    }

    /// The metadata of the secret-id of `accessor`, `None` when there is no such secret-id.
    async fn lookup(
        &self,
        accessor: &str,
    ) -> Result<Option<BTreeMap<String, String>>, ProviderError> {
        let path = format!("{}/secret-id-accessor/lookup", self.role_path());
        let body = json!({ "secret_id_accessor": accessor });
        let what = format!("look up secret-id {accessor} (update on {path})");
        let found = self
            .session
            .call(&what, self.timeouts(), |client| {
                let call = Call::<Value>::write(path.clone(), body.clone());
                async move { or_missing(vaultrs::api::exec_with_result(&*client, call).await) }
            })
            .await?;
        Ok(found.map(|data: Value| {
            serde_json::from_value(data["metadata"].clone()).unwrap_or_default()
        }))
    }

    /// The accessors of the role's secret-ids (Vault answers 404 when there are none).
    async fn accessors(&self) -> Result<Vec<String>, ProviderError> {
        let path = format!("{}/secret-id", self.role_path());
        let what = format!(
            "list the secret-ids of role {} (list on {path})",
            self.config.role_name
        );
        let keys: Option<Value> = self
            .session
            .call(&what, self.timeouts(), |client| {
                let call = Call::<Value>::list(path.clone());
                async move { or_missing(vaultrs::api::exec_with_result(&*client, call).await) }
            })
            .await?;
        Ok(keys
            .and_then(|k| serde_json::from_value(k["keys"].clone()).ok())
            .unwrap_or_default())
    }

    /// The body of the secret-id request.
    fn generate_body(&self, ctx: StepContext<'_>) -> Value {
        let mut metadata = self.config.metadata.clone();
        metadata.insert(CREDENTIAL_KEY.into(), ctx.credential_id.into());
        metadata.insert(ROTATION_KEY.into(), ctx.rotation_id.into());
        let mut body = json!({
            // Vault takes the metadata as a JSON-encoded string.
            "metadata": serde_json::to_string(&metadata).expect("a map of strings serializes"),
        });
        if let Some(ttl) = self.config.ttl {
            body["ttl"] = format!("{}s", ttl.as_secs()).into();
        }
        if let Some(uses) = self.config.num_uses {
            body["num_uses"] = uses.into();
        }
        if !self.config.cidr_list.is_empty() {
            body["cidr_list"] = self.config.cidr_list.clone().into();
        }
        if !self.config.token_bound_cidrs.is_empty() {
            body["token_bound_cidrs"] = self.config.token_bound_cidrs.clone().into();
        }
        body
    }
}

fn accessor_of(attrs: Option<&Attrs>) -> Option<&str> {
    attrs.and_then(|a| a.get(ACCESSOR)).map(String::as_str)
}

#[async_trait]
impl Rotator for ApproleSecretIdRotator {
    fn kind(&self) -> &'static str {
        "vault_approle_secret_id"
    }

    fn secret_field(&self) -> &str {
        "secret_id"
    }

    fn public_attrs(&self) -> &'static [&'static str] {
        &[ROLE_ID, ACCESSOR]
    }

    fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// Every path below the role, with the methods that call it. Verify's login and the test
    /// token's `revoke-self` are not made with keyrotd's token.
    fn permissions(&self) -> Permissions {
        let role = self.role_path();
        Permissions::none()
            .need(Permission::vault(
                format!("{role}/role-id"),
                &["read"],
                &["issue"],
            ))
            .need(Permission::vault(
                format!("{role}/secret-id"),
                &["update", "list"],
                &["issue", "abandon"],
            ))
            .need(Permission::vault(
                format!("{role}/secret-id-accessor/lookup"),
                &["update"],
                &["abandon", "revoke"],
            ))
            .need(Permission::vault(
                format!("{role}/secret-id-accessor/destroy"),
                &["update"],
                &["abandon", "revoke"],
            ))
            .note(format!(
                "verify logs in at auth/{}/login (no policy needed) and revokes the token it \
                 got with auth/token/revoke-self, which the role's tokens may call through the \
                 `default` policy",
                self.config.mount
            ))
    }

    async fn issue(
        &self,
        ctx: StepContext<'_>,
        _current: Option<&Credential>,
    ) -> Result<Credential, ProviderError> {
        let role = self.role_path();
        let data: Value = self
            .call("read the role-id", "read", format!("{role}/role-id"), None)
            .await?;
        let role_id = data[ROLE_ID].as_str().unwrap_or_default().to_owned();
        let data: Value = self
            .call(
                "generate a secret-id",
                "update",
                format!("{role}/secret-id"),
                Some(self.generate_body(ctx)),
            )
            .await?;
        let (Some(secret), Some(accessor)) = (data["secret_id"].as_str(), data[ACCESSOR].as_str())
        else {
            return Err(ProviderError::transient(format!(
                "generate a secret-id for role {}: Vault's answer held no secret-id",
                self.config.role_name
            )));
        };
        tracing::info!(role = %self.config.role_name, secret_id_accessor = accessor, "generated AppRole secret-id");
        Ok(Credential {
            secret: SecretString::from(secret.to_owned()),
            attrs: Attrs::from([
                (ROLE_ID.to_owned(), role_id),
                (ACCESSOR.to_owned(), accessor.to_owned()),
            ]),
        })
    }

    async fn verify(&self, _ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError> {
        let role_id = new.attrs.get(ROLE_ID).ok_or_else(|| {
            ProviderError::permanent(format!("the new secret-id has no {ROLE_ID} attribute"))
        })?;
        let path = format!("auth/{}/login", self.config.mount);
        let what = format!("log in at {path} with the new secret-id");
        // No token: the login must work on the secret-id alone.
        let mut client = self.session.client_with_token("")?;
        let body = json!({ "role_id": role_id, "secret_id": new.secret.expose_secret() });
        let login = tokio::time::timeout(
            self.config.timeout,
            vaultrs::api::auth(&client, Call::<()>::write(path, body)),
        )
        .await
        .map_err(|_| ProviderError::no_answer(&what, self.config.timeout))?
        .map_err(|e| classify(&what, &e))?;
        client.set_token(&login.client_token);
        let revoked =
            tokio::time::timeout(self.config.timeout, vaultrs::token::revoke_self(&client)).await;
        match revoked {
            Ok(Ok(())) => {
                tracing::debug!(token_accessor = %login.accessor, "revoked verify's login token")
            }
            Ok(Err(e)) => {
                tracing::warn!(token_accessor = %login.accessor, ttl_secs = login.lease_duration,
                error = %classify("revoke-self", &e), "could not revoke the token of verify's test login; it expires with its TTL")
            }
            Err(_) => {
                tracing::warn!(token_accessor = %login.accessor, ttl_secs = login.lease_duration,
                "revoke-self of verify's test login got no answer; the token expires with its TTL")
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
        let current = accessor_of(current.map(|c| &c.attrs));
        let old = accessor_of(ctx.old_attrs);
        let keep = |accessor: &str| Some(accessor) == current || Some(accessor) == old;
        if let Some(issued) = accessor_of(issued) {
            if keep(issued) {
                // Never destroy what consumers use, whatever the journal says.
                return Ok(());
            }
            return self.destroy(issued).await;
        }
        // The issued secret-id is lost: find what this rotation generated by its metadata.
        for accessor in self.accessors().await? {
            if keep(&accessor) {
                continue;
            }
            let Some(metadata) = self.lookup(&accessor).await? else {
                continue;
            };
            let ours = metadata.get(ROTATION_KEY).map(String::as_str) == Some(ctx.rotation_id)
                && metadata.get(CREDENTIAL_KEY).map(String::as_str) == Some(ctx.credential_id);
            if ours {
                tracing::warn!(role = %self.config.role_name, secret_id_accessor = %accessor,
                    "destroying the orphaned secret-id of an interrupted rotation");
                self.destroy(&accessor).await?;
            }
        }
        Ok(())
    }

    async fn revoke(&self, _ctx: StepContext<'_>, old: &Attrs) -> Result<(), ProviderError> {
        match accessor_of(Some(old)) {
            Some(accessor) => self.destroy(accessor).await,
            None => {
                // A secret-id keyrotd did not generate (the value the store held before the
                // first rotation): its accessor is unknown here.
                tracing::warn!(role = %self.config.role_name,
                    "the replaced secret-id has no {ACCESSOR} attribute (keyrotd did not generate it): destroy it by hand");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> ApproleSecretIdConfig {
        toml::from_str(&format!(
            "role_name = \"app\"\nvault = {{ address = \"http://127.0.0.1:8200\", auth = {{ method = \"token\", token = \"env:T\" }} }}\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn validates_cidrs_uses_metadata_and_names() {
        config("cidr_list = [\"10.0.0.0/8\", \"2001:db8::/32\", \"127.0.0.1\"]")
            .validate()
            .unwrap();
        for (extra, field) in [
            ("cidr_list = [\"10.0.0.0/33\"]", "cidr_list: "),
            (
                "token_bound_cidrs = [\"example.com/8\"]",
                "token_bound_cidrs: ",
            ),
            ("cidr_list = [\"10.0.0.0/+8\"]", "cidr_list: "),
            ("num_uses = 1", "num_uses: "),
            ("metadata = { keyrotd_rotation = \"x\" }", "metadata: "),
            ("mount = \"../sys\"", "mount: "),
            ("ttl = \"10s\"", "ttl: "),
        ] {
            let err = config(extra).validate().unwrap_err();
            assert!(err.starts_with(field), "{extra}: {err}");
        }
        let err = toml::from_str::<ApproleSecretIdConfig>("role_name = \"a\"")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.starts_with("vault.address: "), "{err}");
    }
}
