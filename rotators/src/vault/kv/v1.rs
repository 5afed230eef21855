//! The `vault_kv1` store: a KV version 1 secret (a plain map: no versions, no `cas`).
//!
//! Calls, in the order of a rotation (every one a single HTTP request):
//! - `current`, `last_rotation`: read `PATH`;
//! - stage: read `PATH.pending` (a re-run finds its own rotation there and stops), read `PATH`,
//!   write `PATH.pending` with the SHA-256 fingerprint of the object read at `PATH` in the
//!   member `keyrotd_base`;
//! - `pending`: read `PATH.pending`;
//! - promote: read `PATH.pending`, read `PATH` (naming this rotation: done already; else its
//!   fingerprint must still be `keyrotd_base`, or someone else wrote it and the rotation fails,
//!   permanent), write `PATH.previous` (the replaced object, for rollback), write `PATH`,
//!   delete `PATH.pending`;
//! - discard: read and delete `PATH.pending` if it is this rotation's;
//! - release: delete `PATH.pending` (a no-op unless promote could not) and `PATH.previous`.
//!
//! Without `cas`, a writer that lands between promote's read of `PATH` and its write is
//! overwritten; its value is then in `PATH.previous`. Use KV v2 where writers race.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keyrotd_plugin::permissions::Permission;
use keyrotd_plugin::{Credential, Permissions, ProviderError, StepContext, Store};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{decode, encode, field, is_not_found, rotation_of, VaultKvConfig, PENDING_SUFFIX};
use crate::vault::VaultSession;

/// The suffix of the sibling path keeping the replaced value until release.
pub const PREVIOUS_SUFFIX: &str = ".previous";

/// The member of the staged object holding the fingerprint of the object it replaces.
const BASE_MEMBER: &str = "keyrotd_base";

/// The `vault_kv1` store.
pub struct Kv1Store {
    config: VaultKvConfig,
    session: Arc<VaultSession>,
}

impl std::fmt::Debug for Kv1Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kv1Store")
            .field("config", &self.config)
            .finish()
    }
}

/// A fingerprint of `object` (absent: `none`). serde_json's map is ordered, so equal objects
/// give equal fingerprints. It names no value: SHA-256 of an object holding a random secret.
fn fingerprint(object: Option<&Map<String, Value>>) -> String {
    match object {
        None => "none".into(),
        Some(object) => {
            let digest = Sha256::digest(Value::Object(object.clone()).to_string().as_bytes());
            digest.iter().map(|b| format!("{b:02x}")).collect()
        }
    }
}

impl Kv1Store {
    /// Builds the store from a configuration whose `vault` table is filled in. No network.
    pub fn new(config: VaultKvConfig) -> Result<Self, String> {
        config.validate(false)?;
        let session = VaultSession::shared(&config.connection())?;
        Ok(Self { config, session })
    }

    fn sibling(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.config.secret_path())
    }

    fn api_path(&self, path: &str) -> String {
        format!("{}/{path}", self.config.mount())
    }

    async fn read(&self, path: &str) -> Result<Option<Map<String, Value>>, ProviderError> {
        let what = format!("read {} (capability `read`)", self.api_path(path));
        let (mount, owned) = (self.config.mount().to_owned(), path.to_owned());
        let read = self
            .session
            .call(&what, self.config.timeouts(), |client| {
                let (mount, path) = (mount.clone(), owned.clone());
                async move { vaultrs::kv1::get::<Map<String, Value>>(&*client, &mount, &path).await }
            })
            .await;
        match read {
            Ok(object) => Ok(Some(object)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn write(&self, path: &str, object: &Map<String, Value>) -> Result<(), ProviderError> {
        let what = format!(
            "write {} (capability `create` or `update`)",
            self.api_path(path)
        );
        let (mount, owned) = (self.config.mount().to_owned(), path.to_owned());
        let data: HashMap<&str, &Value> = object.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let data = &data;
        self.session
            .call(&what, self.config.timeouts(), |client| {
                let (mount, path) = (mount.clone(), owned.clone());
                async move { vaultrs::kv1::set(&*client, &mount, &path, data).await }
            })
            .await
    }

    async fn delete(&self, path: &str) -> Result<(), ProviderError> {
        let what = format!("delete {} (capability `delete`)", self.api_path(path));
        let (mount, owned) = (self.config.mount().to_owned(), path.to_owned());
        self.session
            .call(&what, self.config.timeouts(), |client| {
                let (mount, path) = (mount.clone(), owned.clone());
                async move { vaultrs::kv1::delete(&*client, &mount, &path).await }
            })
            .await
    }

    async fn staged(&self, rotation: &str) -> Result<Option<Map<String, Value>>, ProviderError> {
        Ok(self
            .read(&self.sibling(PENDING_SUFFIX))
            .await?
            .filter(|object| rotation_of(object) == Some(rotation)))
    }
}

#[async_trait]
impl Store for Kv1Store {
    fn kind(&self) -> &'static str {
        "vault_kv1"
    }

    fn location(&self) -> String {
        self.config.location()
    }

    fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// Exactly the paths and capabilities of the calls above.
    fn permissions(&self) -> Permissions {
        Permissions::none()
            .need(Permission::vault(
                self.api_path(self.config.secret_path()),
                &["create", "read", "update"],
                &["current", "stage", "promote", "last_rotation"],
            ))
            .need(Permission::vault(
                self.api_path(&self.sibling(PENDING_SUFFIX)),
                &["create", "delete", "read", "update"],
                &["stage", "pending", "promote", "discard", "release_previous"],
            ))
            .need(Permission::vault(
                self.api_path(&self.sibling(PREVIOUS_SUFFIX)),
                &["create", "delete", "update"],
                &["promote", "release_previous"],
            ))
    }

    async fn current(&self, ctx: StepContext<'_>) -> Result<Option<Credential>, ProviderError> {
        let path = self.config.secret_path();
        match self.read(path).await? {
            Some(object) => {
                decode(&object, field(&self.config, &ctx), &self.api_path(path)).map(Some)
            }
            None => Ok(None),
        }
    }

    async fn stage(&self, ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError> {
        if self.staged(ctx.rotation_id).await?.is_some() {
            return Ok(());
        }
        let current = self.read(self.config.secret_path()).await?;
        let base = fingerprint(current.as_ref());
        let mut object = encode(
            current.unwrap_or_default(),
            field(&self.config, &ctx),
            new,
            ctx.rotation_id,
        );
        object.insert(BASE_MEMBER.into(), Value::String(base));
        self.write(&self.sibling(PENDING_SUFFIX), &object).await
    }

    async fn pending(&self, ctx: StepContext<'_>) -> Result<Option<Credential>, ProviderError> {
        match self.staged(ctx.rotation_id).await? {
            Some(object) => decode(
                &object,
                field(&self.config, &ctx),
                &self.api_path(&self.sibling(PENDING_SUFFIX)),
            )
            .map(Some),
            None => Ok(None),
        }
    }

    async fn promote(&self, ctx: StepContext<'_>) -> Result<(), ProviderError> {
        let path = self.config.secret_path();
        let ours = ctx.rotation_id;
        let staged = self.staged(ours).await?;
        let current = self.read(path).await?;
        let promoted = current
            .as_ref()
            .is_some_and(|object| rotation_of(object) == Some(ours));
        let Some(mut object) = staged else {
            if promoted {
                return Ok(());
            }
            return Err(ProviderError::permanent(format!(
                "{}: nothing is staged for rotation {ours}",
                self.api_path(&self.sibling(PENDING_SUFFIX))
            )));
        };
        if !promoted {
            let base = object.remove(BASE_MEMBER);
            if base.as_ref().and_then(Value::as_str) != Some(&fingerprint(current.as_ref())) {
                return Err(ProviderError::conflict(format!(
                    "{}: written by someone else since the stage; not overwritten, the \
                     rotation is rolled back",
                    self.api_path(path)
                )));
            }
            if let Some(current) = &current {
                self.write(&self.sibling(PREVIOUS_SUFFIX), current).await?;
            }
            self.write(path, &object).await?;
        }
        // The promotion stands once `PATH` is written (see the v2 store); release deletes it.
        if let Err(e) = self.delete(&self.sibling(PENDING_SUFFIX)).await {
            tracing::warn!(credential = ctx.credential_id, error = %e, "the staged copy stays until release");
        }
        Ok(())
    }

    async fn discard(&self, ctx: StepContext<'_>) -> Result<(), ProviderError> {
        if self.staged(ctx.rotation_id).await?.is_some() {
            self.delete(&self.sibling(PENDING_SUFFIX)).await?;
        }
        Ok(())
    }

    /// Deletes `PATH.previous` and whatever promote left at `PATH.pending`.
    async fn release_previous(&self, _ctx: StepContext<'_>) -> Result<(), ProviderError> {
        self.delete(&self.sibling(PENDING_SUFFIX)).await?;
        self.delete(&self.sibling(PREVIOUS_SUFFIX)).await
    }

    async fn last_rotation(&self, _ctx: StepContext<'_>) -> Result<Option<String>, ProviderError> {
        Ok(self
            .read(self.config.secret_path())
            .await?
            .and_then(|object| rotation_of(&object).map(str::to_owned)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_follow_content_not_order() {
        let a: Map<String, Value> = serde_json::from_str(r#"{"a":"1","b":"2"}"#).unwrap();
        let b: Map<String, Value> = serde_json::from_str(r#"{"b":"2","a":"1"}"#).unwrap();
        let c: Map<String, Value> = serde_json::from_str(r#"{"a":"1","b":"3"}"#).unwrap();
        assert_eq!(fingerprint(Some(&a)), fingerprint(Some(&b)));
        assert_ne!(fingerprint(Some(&a)), fingerprint(Some(&c)));
        assert_eq!(fingerprint(None), "none");
        assert_eq!(fingerprint(Some(&a)).len(), 64);
    }
}
