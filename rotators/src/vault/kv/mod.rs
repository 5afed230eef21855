//! The `vault_kv2` and `vault_kv1` stores: consumers read the credential from a Vault (OpenBao)
//! KV secret, a JSON object whose member `field` holds it.
//!
//! Both stores keep consumers away from unverified values the same way: the new value is
//! staged at a sibling path, `PATH.pending`, which no consumer reads, and reaches `PATH` only
//! at promote. Every object keyrotd writes at `PATH` carries the member `keyrotd_rotation` (the
//! rotation id, which is what [`Store::last_rotation`](keyrotd_plugin::Store::last_rotation)
//! reads); every other member of the current object (`host`, `port`, ...) is kept, and the
//! credential's public attributes are written as members too.
//!
//! - [`v2`]: KV version 2. Promote writes `PATH` with `cas` = the version read at stage time,
//!   so a concurrent writer is detected and never overwritten; the previous value stays as the
//!   version before it, and release destroys the versions beyond `keep_versions`.
//! - [`v1`]: KV version 1 has neither versions nor `cas`. Stage records a SHA-256 fingerprint of
//!   the object it read; promote compares `PATH` with it, then copies it to `PATH.previous`
//!   (for rollback) and writes the new object. A writer that lands between that read and the
//!   write is not detected: KV v1 offers no atomic check.
//!
//! *Invariant:* `PATH` only ever holds the value consumers had before the rotation or the
//! verified new one; the secret appears in no error, only paths and version numbers do.

pub mod v1;
pub mod v2;

use std::time::Duration;

use keyrotd_plugin::{Attrs, Credential, ProviderError, StepContext, Timeouts};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::calls::check_path;
use super::VaultConnection;
use crate::timeouts;

/// The member of the object at `PATH` naming the rotation that wrote it.
pub const ROTATION_MEMBER: &str = "keyrotd_rotation";

/// The suffix of the sibling path holding the staged value.
pub const PENDING_SUFFIX: &str = ".pending";

/// The configuration of both KV stores (`store = { kind = "vault_kv2", mount = "secret",
/// path = "app/db", field = "password" }`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultKvConfig {
    /// Where the KV engine is mounted (`secret`, `kv/team`).
    pub mount: String,
    /// The secret's path inside the mount (`app/db`).
    pub path: String,
    /// The member holding the credential; the rotator's own field name (`password`) when unset.
    pub field: Option<String>,
    /// This store's Vault connection; unset fields come from the `[vault]` table.
    pub vault: Option<VaultConnection>,
    /// The longest one step may take (`"60s"`).
    #[serde(
        default = "timeouts::default_call",
        deserialize_with = "timeouts::duration"
    )]
    pub timeout: Duration,
    /// `vault_kv2` only: how many versions of the secret release keeps (the new one counts);
    /// older versions are destroyed. Default [`DEFAULT_KEEP_VERSIONS`]: the new value and the
    /// one it replaced, so an operator can still roll back by hand.
    pub keep_versions: Option<u64>,
}

/// The default of [`VaultKvConfig::keep_versions`].
pub const DEFAULT_KEEP_VERSIONS: u64 = 2;

impl VaultKvConfig {
    /// Checks the fields after the `[vault]` table was inherited; errors start with the field.
    /// `versioned` is false for KV v1, which has no `keep_versions`.
    pub fn validate(&self, versioned: bool) -> Result<(), String> {
        check_path("mount", self.mount(), "a mount path")?;
        let path = self.path.trim_matches('/');
        check_path("path", path, "a secret path")?;
        if path.ends_with(PENDING_SUFFIX) || path.ends_with(v1::PREVIOUS_SUFFIX) {
            return Err(format!(
                "path: `{path}` ends like keyrotd's own sibling paths (`{PENDING_SUFFIX}`, `{}`)",
                v1::PREVIOUS_SUFFIX
            ));
        }
        if let Some(field) = &self.field {
            if field.is_empty() || field == ROTATION_MEMBER || field.starts_with("keyrotd_") {
                return Err(format!(
                    "field: `{field}` is empty or one of keyrotd's own members (`keyrotd_*`)"
                ));
            }
        }
        match (versioned, self.keep_versions) {
            (false, Some(_)) => {
                return Err("keep_versions: KV version 1 keeps no versions".into());
            }
            (true, Some(0)) => {
                return Err("keep_versions: must be at least 1 (the current version)".into());
            }
            _ => {}
        }
        timeouts::validate(timeouts::DEFAULT_CONNECT_TIMEOUT, self.timeout)
            .map_err(|e| format!("timeout: {e}"))?;
        self.connection().validate()
    }

    /// The connection in force (the `vault` table after [`VaultConnection::fill`]).
    pub fn connection(&self) -> VaultConnection {
        self.vault.clone().unwrap_or_default()
    }

    /// The mount without surrounding slashes.
    pub fn mount(&self) -> &str {
        self.mount.trim_matches('/')
    }

    /// The secret's path without surrounding slashes.
    pub fn secret_path(&self) -> &str {
        self.path.trim_matches('/')
    }

    /// The store's location for status output (`vault:secret/app/db`).
    pub fn location(&self) -> String {
        format!("vault:{}/{}", self.mount(), self.secret_path())
    }

    /// What a credential writing here collides with (`Vault KV secret/app/db at ADDRESS`).
    pub fn target(&self) -> String {
        let connection = self.connection();
        format!(
            "Vault KV {}/{} at {}{}",
            self.mount(),
            self.secret_path(),
            connection.address.as_deref().unwrap_or("?"),
            connection
                .namespace
                .map(|n| format!(" namespace {n}"))
                .unwrap_or_default()
        )
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts::new(timeouts::DEFAULT_CONNECT_TIMEOUT, self.timeout)
    }
}

/// The field in force for a step: the configured one, else the rotator's.
fn field<'a>(config: &'a VaultKvConfig, ctx: &StepContext<'a>) -> &'a str {
    config.field.as_deref().unwrap_or(ctx.secret_field)
}

/// The object to stage for `new`: `base` (the current object, without keyrotd's bookkeeping
/// members) with the credential's attributes, its secret in `field` and the rotation id.
fn encode(
    mut base: Map<String, Value>,
    field: &str,
    new: &Credential,
    rotation: &str,
) -> Map<String, Value> {
    base.retain(|k, _| !k.starts_with("keyrotd_"));
    for (key, value) in &new.attrs {
        if !key.starts_with("keyrotd_") {
            base.insert(key.clone(), Value::String(value.clone()));
        }
    }
    base.insert(
        field.to_owned(),
        Value::String(new.secret.expose_secret().to_owned()),
    );
    base.insert(ROTATION_MEMBER.into(), Value::String(rotation.to_owned()));
    base
}

/// The credential in `object`: its string member `field` and, as attributes, its other string
/// members (the engine keeps only the rotator's public ones).
fn decode(
    object: &Map<String, Value>,
    field: &str,
    location: &str,
) -> Result<Credential, ProviderError> {
    let Some(Value::String(secret)) = object.get(field) else {
        return Err(ProviderError::permanent(format!(
            "{location} has no string member `{field}`"
        )));
    };
    let attrs: Attrs = object
        .iter()
        .filter(|(k, _)| *k != field && !k.starts_with("keyrotd_"))
        .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
        .collect();
    Ok(Credential {
        secret: SecretString::from(secret.clone()),
        attrs,
    })
}

/// The rotation named by `object`'s [`ROTATION_MEMBER`].
fn rotation_of(object: &Map<String, Value>) -> Option<&str> {
    object.get(ROTATION_MEMBER).and_then(Value::as_str)
}

/// Whether `error` is Vault's 404 (nothing at the path).
fn is_not_found(error: &ProviderError) -> bool {
    error.code.as_deref() == Some("404")
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyrotd_plugin::permissions::Permission;
    use keyrotd_plugin::Store;

    fn config(text: &str) -> VaultKvConfig {
        toml::from_str(&format!(
            "{text}\nvault = {{ address = \"http://127.0.0.1:8200\", auth = {{ method = \"token\", token = \"env:T\" }} }}"
        ))
        .unwrap()
    }

    #[test]
    fn refuses_odd_paths_fields_and_retention() {
        for (text, versioned, field) in [
            ("mount = \"\"\npath = \"a\"", true, "mount: "),
            ("mount = \"secret\"\npath = \"a/../b\"", true, "path: "),
            ("mount = \"secret\"\npath = \"a*\"", true, "path: "),
            ("mount = \"secret\"\npath = \"a.pending\"", true, "path: "),
            (
                "mount = \"secret\"\npath = \"a\"\nfield = \"keyrotd_rotation\"",
                true,
                "field: ",
            ),
            (
                "mount = \"secret\"\npath = \"a\"\nkeep_versions = 0",
                true,
                "keep_versions: ",
            ),
            (
                "mount = \"kv\"\npath = \"a\"\nkeep_versions = 3",
                false,
                "keep_versions: ",
            ),
        ] {
            let err = config(text).validate(versioned).unwrap_err();
            assert!(err.starts_with(field), "{text}: {err}");
        }
        config("mount = \"/secret/\"\npath = \"team/app-db\"\nfield = \"password\"")
            .validate(true)
            .unwrap();
    }

    /// Every path a store calls, with its capabilities: what `keyrotd policy` prints.
    fn rules(store: &dyn Store) -> Vec<(String, Vec<&'static str>)> {
        store
            .permissions()
            .needs
            .into_iter()
            .map(|need| match need {
                Permission::Vault(rule) => (rule.path, rule.capabilities),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn policies_name_exactly_the_paths_called() {
        let v2 = v2::Kv2Store::new(config("mount = \"kv/team/\"\npath = \"/app/db\"")).unwrap();
        assert_eq!(v2.location(), "vault:kv/team/app/db");
        assert_eq!(
            rules(&v2),
            vec![
                (
                    "kv/team/data/app/db".into(),
                    vec!["create", "read", "update"]
                ),
                (
                    "kv/team/data/app/db.pending".into(),
                    vec!["create", "read", "update"]
                ),
                (
                    "kv/team/metadata/app/db.pending".into(),
                    vec!["read", "delete"]
                ),
                ("kv/team/metadata/app/db".into(), vec!["read"]),
                ("kv/team/destroy/app/db".into(), vec!["update"]),
            ]
        );
        let v1 = v1::Kv1Store::new(config("mount = \"kv\"\npath = \"app\"")).unwrap();
        assert_eq!(
            rules(&v1),
            vec![
                ("kv/app".into(), vec!["create", "read", "update"]),
                (
                    "kv/app.pending".into(),
                    vec!["create", "delete", "read", "update"]
                ),
                ("kv/app.previous".into(), vec!["create", "delete", "update"]),
            ]
        );
    }

    #[test]
    fn encode_keeps_other_members_and_drops_stale_bookkeeping() {
        let mut base = Map::new();
        base.insert("host".into(), Value::String("db".into()));
        base.insert("keyrotd_cas".into(), Value::String("3".into()));
        let new = Credential {
            secret: SecretString::from("s3cret".to_owned()),
            attrs: Attrs::from([("user".to_owned(), "app".to_owned())]),
        };
        let object = encode(base, "password", &new, "r1");
        assert_eq!(object["host"], "db");
        assert_eq!(object["user"], "app");
        assert_eq!(object["password"], "s3cret");
        assert_eq!(rotation_of(&object), Some("r1"));
        assert!(!object.contains_key("keyrotd_cas"));
        let back = decode(&object, "password", "x").unwrap();
        assert_eq!(back.secret.expose_secret(), "s3cret");
        assert!(!back.attrs.contains_key(ROTATION_MEMBER));
        let err = decode(&object, "missing", "secret/app").unwrap_err();
        assert!(!err.message.contains("s3cret"));
    }
}
