//! The serde shapes of the inventory's TOML, before validation. Every value a person writes is
//! `Spanned`, so the validator can name its line and column; nothing outside `config` sees
//! these types.

use keyrotd_providers::{AwsDefaults, RotatorConfig, StoreConfig, VaultDefaults};
use serde::Deserialize;
use toml::Spanned;

use super::alerts::AlertsConfig;

/// The whole document (the `[[credential]]` sections are usually blanked out and parsed one by
/// one as [`OneCredential`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInventory {
    #[serde(default)]
    pub(super) daemon: RawDaemon,
    #[serde(default)]
    pub(super) defaults: RawDefaults,
    #[serde(default, rename = "credential")]
    pub(super) credentials: Vec<RawCredential>,
    pub(super) alerts: Option<Spanned<AlertsConfig>>,
    #[serde(default)]
    pub(super) aws: AwsDefaults,
    pub(super) vault: Option<Spanned<VaultDefaults>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDaemon {
    pub(super) state: Option<Spanned<String>>,
    pub(super) listen: Option<Spanned<String>>,
    pub(super) max_concurrent_rotations: Option<Spanned<i64>>,
    pub(super) shutdown_timeout: Option<Spanned<String>>,
    pub(super) history_retention: Option<Spanned<String>>,
    pub(super) audit_log: Option<Spanned<String>>,
    pub(super) metrics: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    pub(super) rotate_every: Option<Spanned<String>>,
    pub(super) max_age: Option<Spanned<String>>,
    pub(super) grace: Option<Spanned<String>>,
    pub(super) window: Option<Spanned<String>>,
    pub(super) timezone: Option<Spanned<String>>,
    pub(super) retry: Option<RawRetry>,
    pub(super) revoke: Option<Spanned<String>>,
    pub(super) max_revoke_delay: Option<Spanned<String>>,
    pub(super) on_max_revoke_delay: Option<Spanned<String>>,
    pub(super) revoke_check_every: Option<Spanned<String>>,
    pub(super) revoke_min_quiet: Option<Spanned<String>>,
    pub(super) hook: Option<Vec<RawHook>>,
    pub(super) revoke_after_hook_failure: Option<Spanned<bool>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    pub(super) max_attempts: Option<Spanned<i64>>,
    pub(super) backoff: Option<Spanned<String>>,
    pub(super) max_backoff: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredential {
    pub(super) id: Spanned<String>,
    pub(super) rotator: Spanned<RotatorConfig>,
    pub(super) store: Spanned<StoreConfig>,
    pub(super) schedule: Option<Spanned<String>>,
    pub(super) timezone: Option<Spanned<String>>,
    pub(super) rotate_every: Option<Spanned<String>>,
    pub(super) max_age: Option<Spanned<String>>,
    pub(super) grace: Option<Spanned<String>>,
    pub(super) window: Option<Spanned<String>>,
    pub(super) retry: Option<RawRetry>,
    pub(super) revoke: Option<Spanned<String>>,
    pub(super) max_revoke_delay: Option<Spanned<String>>,
    pub(super) on_max_revoke_delay: Option<Spanned<String>>,
    pub(super) revoke_check_every: Option<Spanned<String>>,
    pub(super) revoke_min_quiet: Option<Spanned<String>>,
    pub(super) hook: Option<Vec<RawHook>>,
    pub(super) revoke_after_hook_failure: Option<Spanned<bool>>,
}

/// One `[[credential]]` section parsed on its own.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OneCredential {
    pub(super) credential: Vec<RawCredential>,
}

/// One `[[defaults.hook]]` or `[[credential.hook]]`: every field of every kind, each checked
/// against the kind by the validator (`hooks.rs`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHook {
    pub(super) kind: Spanned<String>,
    pub(super) when: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) retry: Option<RawRetry>,
    pub(super) command: Option<Spanned<Vec<String>>>,
    pub(super) env: Option<Spanned<std::collections::BTreeMap<String, String>>>,
    pub(super) unit: Option<Spanned<String>>,
    pub(super) action: Option<Spanned<String>>,
    pub(super) systemctl: Option<Spanned<String>>,
    pub(super) pid_file: Option<Spanned<String>>,
    pub(super) signal: Option<Spanned<String>>,
    pub(super) method: Option<Spanned<String>>,
    pub(super) url: Option<Spanned<String>>,
    pub(super) headers: Option<Spanned<std::collections::BTreeMap<String, String>>>,
    pub(super) secret_headers: Option<Spanned<std::collections::BTreeMap<String, String>>>,
}
