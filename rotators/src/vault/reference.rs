//! `vault:MOUNT/PATH#field` secret references, read through the inventory's `[vault]`
//! connection ([`set_default`], called once when the inventory is loaded, as `aws-sm:` uses the
//! default AWS chain) and its shared [`VaultSession`].
//!
//! A mount is read as KV version 2 (`MOUNT/data/PATH`) unless `[vault] reference_kv1_mounts`
//! names it (`MOUNT/PATH`): stated, not detected, so no `sys/mounts` read is needed. A value is
//! reused for `[vault] reference_cache` (30 s by default, `"0s"` for none); the cache holds at
//! most [`MAX_CACHED`] values and lives in memory only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use keyrotd_plugin::permissions::Permission;
use keyrotd_plugin::{Permissions, ProviderError, Timeouts};
use secrecy::SecretString;

use super::{VaultConnection, VaultSession};

/// The most values the reference cache holds; a full cache drops its oldest entry.
pub const MAX_CACHED: usize = 256;

/// Where `vault:` references are read: the `[vault]` connection's session and the cache.
struct Source {
    session: Arc<VaultSession>,
    ttl: Duration,
    kv1_mounts: Vec<String>,
    /// By reference text: when it was read, and the value.
    cache: Mutex<HashMap<String, (Instant, SecretString)>>,
}

static DEFAULT: RwLock<Option<Arc<Source>>> = RwLock::new(None);

/// Makes `connection` (the `[vault]` table) the one `vault:` references are read through, and
/// empties the cache. A table without an address or auth method leaves none: a `vault:`
/// reference then fails, saying so.
pub fn set_default(connection: &VaultConnection) {
    let source = VaultSession::shared(connection).ok().map(|session| {
        Arc::new(Source {
            session,
            ttl: connection.reference_cache(),
            kv1_mounts: connection.reference_kv1_mounts.clone().unwrap_or_default(),
            cache: Mutex::new(HashMap::new()),
        })
    });
    *DEFAULT.write().unwrap_or_else(|e| e.into_inner()) = source;
}

fn source() -> Option<Arc<Source>> {
    DEFAULT.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The API path of a reference's secret.
fn data_path(kv1: bool, mount: &str, path: &str) -> String {
    if kv1 {
        format!("{mount}/{path}")
    } else {
        format!("{mount}/data/{path}")
    }
}

fn is_kv1(mount: &str) -> bool {
    source().is_some_and(|s| s.kv1_mounts.iter().any(|m| m == mount))
}

/// Reads `field` of the secret at `mount`/`path`, from the cache when it is fresh there.
pub async fn read(
    mount: &str,
    path: &str,
    field: &str,
    timeouts: Timeouts,
) -> Result<SecretString, ProviderError> {
    let Some(source) = source() else {
        return Err(ProviderError::permanent(
            "a `vault:` reference needs the inventory's [vault] table with an address and an \
             auth method",
        ));
    };
    let key = format!("{mount}/{path}#{field}");
    if let Some((at, value)) = source
        .cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
    {
        if at.elapsed() < source.ttl {
            return Ok(value.clone());
        }
    }
    let kv1 = source.kv1_mounts.iter().any(|m| m == mount);
    let what = format!("read {}", data_path(kv1, mount, path));
    let data: HashMap<String, serde_json::Value> = source
        .session
        .call(&what, timeouts, |client| async move {
            if kv1 {
                vaultrs::kv1::get(&*client, mount, path).await
            } else {
                vaultrs::kv2::read(&*client, mount, path).await
            }
        })
        .await?;
    let value = match data.get(field) {
        Some(serde_json::Value::String(s)) => SecretString::from(s.clone()),
        Some(_) => {
            return Err(ProviderError::permanent(format!(
                "{what}: the field `{field}` is not a string"
            )))
        }
        None => {
            return Err(ProviderError::permanent(format!(
                "{what}: the secret has no field `{field}`"
            )))
        }
    };
    drop(data);
    if !source.ttl.is_zero() {
        let mut cache = source.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, (at, _)| at.elapsed() < source.ttl);
        if cache.len() >= MAX_CACHED {
            let oldest = cache
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone());
            oldest.map(|k| cache.remove(&k));
        }
        cache.insert(key, (Instant::now(), value.clone()));
    }
    Ok(value)
}

/// What reading a `vault:` reference needs: `read` on its secret's data path. `used_by` names
/// the plugin field that holds the reference.
pub fn read_permissions(mount: &str, path: &str, used_by: &'static [&'static str]) -> Permissions {
    Permissions::none().need(Permission::vault(
        data_path(is_kv1(mount), mount, path),
        &["read"],
        used_by,
    ))
}
