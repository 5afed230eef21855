//! The `vault_kv2` store: a KV version 2 secret.
//!
//! Calls, in the order of a rotation (every one a single HTTP request):
//! - `current`, `last_rotation`: read `data/PATH` (latest version);
//! - stage: read `data/PATH` (the object and version `B` consumers have), write
//!   `data/PATH.pending` with `cas=0` (create only); the staged object carries `B` in the
//!   member `keyrotd_cas`. A `cas` refusal means a pending value exists: a re-run finds its
//!   own rotation there and stops, a stale one of another rotation is replaced;
//! - `pending`: read `data/PATH.pending`;
//! - promote: read `data/PATH.pending`, write `data/PATH` with `cas=B`, delete
//!   `metadata/PATH.pending`. A `cas` refusal is either this promotion already done (`PATH`
//!   names this rotation) or a concurrent writer: the rotation then fails, permanent, and the
//!   other value stays. Once `PATH` is written the promotion stands: a failed delete only
//!   leaves the staged copy for release;
//! - discard: read and delete `PATH.pending` if it is this rotation's;
//! - release: delete `metadata/PATH.pending` (a no-op unless promote could not), read
//!   `metadata/PATH` and destroy the versions older than the newest `keep_versions`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keyrotd_plugin::permissions::Permission;
use keyrotd_plugin::{Credential, Permissions, ProviderError, StepContext, Store};
use serde_json::{Map, Value};
use vaultrs::api::kv2::requests::{ReadSecretRequest, SetSecretRequestOptions};

use super::{
    decode, encode, field, is_not_found, rotation_of, VaultKvConfig, DEFAULT_KEEP_VERSIONS,
    PENDING_SUFFIX,
};
use crate::vault::VaultSession;

/// The member of the staged object holding the version of `PATH` it was staged on.
const CAS_MEMBER: &str = "keyrotd_cas";

/// The `vault_kv2` store.
pub struct Kv2Store {
    config: VaultKvConfig,
    session: Arc<VaultSession>,
}

impl std::fmt::Debug for Kv2Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kv2Store")
            .field("config", &self.config)
            .finish()
    }
}

impl Kv2Store {
    /// Builds the store from a configuration whose `vault` table is filled in. No network.
    pub fn new(config: VaultKvConfig) -> Result<Self, String> {
        config.validate(true)?;
        let session = VaultSession::shared(&config.connection())?;
        Ok(Self { config, session })
    }

    fn pending_path(&self) -> String {
        format!("{}{PENDING_SUFFIX}", self.config.secret_path())
    }

    fn api_path(&self, kind: &str, path: &str) -> String {
        format!("{}/{kind}/{path}", self.config.mount())
    }

    /// The latest version of `path` and its number; `None` when there is none.
    async fn read(&self, path: &str) -> Result<Option<(Map<String, Value>, u64)>, ProviderError> {
        self.read_version(path, None).await
    }

    /// Version `version` of `path` (`None`: the latest) and its number; `None` when there is
    /// none or it is deleted.
    async fn read_version(
        &self,
        path: &str,
        version: Option<u64>,
    ) -> Result<Option<(Map<String, Value>, u64)>, ProviderError> {
        let what = format!("read {} (capability `read`)", self.api_path("data", path));
        let (mount, path) = (self.config.mount().to_owned(), path.to_owned());
        let read = self
            .session
            .call(&what, self.config.timeouts(), |client| {
                let endpoint = ReadSecretRequest::builder()
                    .mount(mount.clone())
                    .path(path.clone())
                    .version(version)
                    .build();
                async move {
                    let endpoint = endpoint.expect("mount and path are set");
                    vaultrs::api::exec_with_result(&*client, endpoint).await
                }
            })
            .await;
        match read {
            Ok(answer) => match answer.data {
                Value::Object(object) => Ok(Some((object, answer.metadata.version))),
                _ => Err(ProviderError::permanent(format!(
                    "{}: the latest version is deleted or not a JSON object",
                    self.api_path("data", &path)
                ))),
            },
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The number of `path`'s latest version even when that version is deleted (soft-deleted
    /// versions read as 404 but still count for `cas`); 0 when `path` has no versions.
    async fn latest_version(&self, path: &str) -> Result<u64, ProviderError> {
        let what = format!(
            "read {} (capability `read`)",
            self.api_path("metadata", path)
        );
        let (mount, path) = (self.config.mount().to_owned(), path.to_owned());
        let metadata = self
            .session
            .call(&what, self.config.timeouts(), |client| {
                let (mount, path) = (mount.clone(), path.clone());
                async move { vaultrs::kv2::read_metadata(&*client, &mount, &path).await }
            })
            .await;
        match metadata {
            Ok(metadata) => Ok(metadata.current_version),
            Err(e) if is_not_found(&e) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Writes `object` as the next version of `path`, accepted only if the latest is `cas`.
    async fn write(
        &self,
        path: &str,
        object: &Map<String, Value>,
        cas: u64,
    ) -> Result<(), ProviderError> {
        let api = self.api_path("data", path);
        let what = format!("write {api} with cas={cas} (capability `create` or `update`)");
        let cas = u32::try_from(cas).map_err(|_| {
            ProviderError::permanent(format!("{api}: version {cas} is beyond a cas value"))
        })?;
        let (mount, path) = (self.config.mount().to_owned(), path.to_owned());
        self.session
            .call(&what, self.config.timeouts(), |client| {
                let (mount, path) = (mount.clone(), path.clone());
                async move {
                    let options = SetSecretRequestOptions { cas };
                    vaultrs::kv2::set_with_options(&*client, &mount, &path, object, options).await
                }
            })
            .await
            .map(drop)
    }

    /// Deletes `path` with every version and its metadata (a missing path is no error).
    async fn delete_all(&self, path: &str) -> Result<(), ProviderError> {
        let what = format!(
            "delete {} (capability `delete`)",
            self.api_path("metadata", path)
        );
        let (mount, path) = (self.config.mount().to_owned(), path.to_owned());
        self.session
            .call(&what, self.config.timeouts(), |client| {
                let (mount, path) = (mount.clone(), path.clone());
                async move { vaultrs::kv2::delete_metadata(&*client, &mount, &path).await }
            })
            .await
    }

    /// The staged object, when it is `rotation`'s.
    async fn staged(
        &self,
        rotation: &str,
    ) -> Result<Option<(Map<String, Value>, u64)>, ProviderError> {
        Ok(self
            .read(&self.pending_path())
            .await?
            .filter(|(object, _)| rotation_of(object) == Some(rotation)))
    }

    fn rule(
        &self,
        kind: &str,
        path: &str,
        capabilities: &[&'static str],
        used_by: &[&'static str],
    ) -> Permission {
        Permission::vault(self.api_path(kind, path), capabilities, used_by)
    }
}

/// Whether `error` is KV v2's refusal of a `cas` that is not the latest version.
fn is_cas_mismatch(error: &ProviderError) -> bool {
    error.code.as_deref() == Some("400") && error.message.contains("check-and-set")
}

#[async_trait]
impl Store for Kv2Store {
    fn kind(&self) -> &'static str {
        "vault_kv2"
    }

    fn location(&self) -> String {
        self.config.location()
    }

    fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// Exactly the paths and capabilities of the calls above (`create` on `PATH` only matters
    /// while the secret does not exist yet).
    fn permissions(&self) -> Permissions {
        let (path, pending) = (self.config.secret_path(), self.pending_path());
        Permissions::none()
            .need(self.rule(
                "data",
                path,
                &["create", "read", "update"],
                &["current", "stage", "promote", "last_rotation"],
            ))
            .need(self.rule(
                "data",
                &pending,
                &["create", "read", "update"],
                &["stage", "pending", "promote", "discard"],
            ))
            .need(self.rule(
                "metadata",
                &pending,
                &["read", "delete"],
                &["stage", "promote", "discard", "release_previous"],
            ))
            .need(self.rule("metadata", path, &["read"], &["stage", "release_previous"]))
            .need(self.rule("destroy", path, &["update"], &["release_previous"]))
    }

    async fn current(&self, ctx: StepContext<'_>) -> Result<Option<Credential>, ProviderError> {
        let path = self.config.secret_path();
        match self.read(path).await? {
            Some((object, _)) => decode(
                &object,
                field(&self.config, &ctx),
                &self.api_path("data", path),
            )
            .map(Some),
            None => Ok(None),
        }
    }

    async fn stage(&self, ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError> {
        let path = self.config.secret_path();
        let (base, version) = match self.read(path).await? {
            Some(found) => found,
            // No value, or its latest version deleted: promote's `cas` is that version.
            None => (Map::new(), self.latest_version(path).await?),
        };
        let mut object = encode(base, field(&self.config, &ctx), new, ctx.rotation_id);
        object.insert(CAS_MEMBER.into(), Value::String(version.to_string()));
        let pending = self.pending_path();
        match self.write(&pending, &object, 0).await {
            Err(e) if is_cas_mismatch(&e) => {}
            other => return other,
        }
        // Something is staged already: this rotation's (a re-run after a crash), or a stale
        // value an interrupted rotation left, which no one will promote.
        match self.read(&pending).await? {
            Some((staged, _)) if rotation_of(&staged) == Some(ctx.rotation_id) => Ok(()),
            Some((staged, stale)) => {
                tracing::warn!(
                    credential = ctx.credential_id,
                    stale_rotation = rotation_of(&staged).unwrap_or("unknown"),
                    path = %self.api_path("data", &pending),
                    "replacing a pending value no rotation will promote"
                );
                self.write(&pending, &object, stale).await
            }
            // Deleted (or soft-deleted) in between: write over its latest version.
            None => {
                let latest = self.latest_version(&pending).await?;
                self.write(&pending, &object, latest).await
            }
        }
    }

    async fn pending(&self, ctx: StepContext<'_>) -> Result<Option<Credential>, ProviderError> {
        match self.staged(ctx.rotation_id).await? {
            Some((object, _)) => decode(
                &object,
                field(&self.config, &ctx),
                &self.api_path("data", &self.pending_path()),
            )
            .map(Some),
            None => Ok(None),
        }
    }

    async fn promote(&self, ctx: StepContext<'_>) -> Result<(), ProviderError> {
        let path = self.config.secret_path();
        let ours = ctx.rotation_id;
        let Some((mut object, _)) = self.staged(ours).await? else {
            // Promoted and cleaned up before a crash, or never staged.
            let current = self.read(path).await?;
            if current.is_some_and(|(object, _)| rotation_of(&object) == Some(ours)) {
                return Ok(());
            }
            return Err(ProviderError::permanent(format!(
                "{}: nothing is staged for rotation {ours}",
                self.api_path("data", &self.pending_path())
            )));
        };
        let base = object
            .remove(CAS_MEMBER)
            .and_then(|v| v.as_str().and_then(|v| v.parse::<u64>().ok()))
            .ok_or_else(|| {
                ProviderError::permanent(format!(
                    "{}: the staged value lacks `{CAS_MEMBER}`",
                    self.api_path("data", &self.pending_path())
                ))
            })?;
        match self.write(path, &object, base).await {
            Ok(()) => {}
            Err(e) if is_cas_mismatch(&e) => {
                let now = self.read(path).await?;
                let version = now.as_ref().map_or(0, |(_, v)| *v);
                // Ours if the latest is ours, or if the version right after the staged one is:
                // this promotion happened (before a crash or a lost answer) and someone wrote
                // after it. Rolling that back would revoke what consumers may have read.
                let ours_next = || async {
                    let next = self
                        .read_version(path, Some(base.saturating_add(1)))
                        .await?;
                    Ok::<_, ProviderError>(
                        next.is_some_and(|(object, _)| rotation_of(&object) == Some(ours)),
                    )
                };
                let latest_ours = now
                    .as_ref()
                    .is_some_and(|(object, _)| rotation_of(object) == Some(ours));
                if !latest_ours && !ours_next().await? {
                    return Err(ProviderError::conflict(format!(
                        "{}: written by someone else since the stage (version {version}, keyrotd \
                         staged on version {base}); not overwritten, the rotation is rolled back",
                        self.api_path("data", path)
                    )));
                }
                // This promotion happened before a crash or a lost answer.
            }
            Err(e) => return Err(e),
        }
        // Consumers have the new value now: the promotion stands even if the staged copy
        // cannot be deleted yet (rolling back would revoke what they read). Release deletes it.
        if let Err(e) = self.delete_all(&self.pending_path()).await {
            tracing::warn!(credential = ctx.credential_id, error = %e, "the staged copy stays until release");
        }
        Ok(())
    }

    async fn discard(&self, ctx: StepContext<'_>) -> Result<(), ProviderError> {
        if self.staged(ctx.rotation_id).await?.is_some() {
            self.delete_all(&self.pending_path()).await?;
        }
        Ok(())
    }

    /// Deletes what promote may have left at `PATH.pending` (no rotation is staged while one is
    /// being released) and destroys every version older than the newest `keep_versions`.
    async fn release_previous(&self, _ctx: StepContext<'_>) -> Result<(), ProviderError> {
        self.delete_all(&self.pending_path()).await?;
        let keep = self.config.keep_versions.unwrap_or(DEFAULT_KEEP_VERSIONS);
        let metadata_path = self.api_path("metadata", self.config.secret_path());
        let what = format!("read {metadata_path} (capability `read`)");
        let (mount, path) = (
            self.config.mount().to_owned(),
            self.config.secret_path().to_owned(),
        );
        let metadata = self
            .session
            .call(&what, self.config.timeouts(), |client| {
                let (mount, path) = (mount.clone(), path.clone());
                async move { vaultrs::kv2::read_metadata(&*client, &mount, &path).await }
            })
            .await?;
        let mut old: Vec<u64> = metadata
            .versions
            .iter()
            .filter(|(_, v)| !v.destroyed)
            .filter_map(|(n, _)| n.parse::<u64>().ok())
            .filter(|n| n + keep <= metadata.current_version)
            .collect();
        if old.is_empty() {
            return Ok(());
        }
        old.sort_unstable();
        let what = format!(
            "destroy versions {old:?} of {} (capability `update`)",
            self.api_path("destroy", &path)
        );
        self.session
            .call(&what, self.config.timeouts(), |client| {
                let (mount, path, old) = (mount.clone(), path.clone(), old.clone());
                async move { vaultrs::kv2::destroy_versions(&*client, &mount, &path, old).await }
            })
            .await
    }

    async fn last_rotation(&self, _ctx: StepContext<'_>) -> Result<Option<String>, ProviderError> {
        Ok(self
            .read(self.config.secret_path())
            .await?
            .and_then(|(object, _)| rotation_of(&object).map(str::to_owned)))
    }
}
