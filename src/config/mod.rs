//! The inventory: `config.toml` parsed once into a validated [`Inventory`].
//!
//! Invariant: nothing outside this module sees raw TOML. Every error names the file, line,
//! column and field, and loading never panics, whatever the input. Loading changes nothing on
//! disk or at any provider. This module imports nothing from the crate but leaf modules
//! (`schedule`, `fmt`) and the plugin crate: every other module may use the config types.
//!
//! Files: this one holds the validated types and [`parse`], the entry point; `sections` finds
//! the `[[credential]]` sections so each is parsed on its own; `raw` holds the serde shapes of
//! the TOML; `validate` turns them into the validated types (`credential` for one
//! `[[credential]]`), and `locate` places a serde error at its line, column and field;
//! `targets` refuses two credentials that write the same location; `references` checks the
//! secrets and store locations an inventory points at; [`alerts`] holds the `[alerts]` table.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyrotd_providers::{ProviderDefaults, RotatorConfig, StoreConfig};

use self::alerts::AlertsConfig;
use self::raw::{OneCredential, RawInventory};
use self::sections::{scan, Head};
use self::targets::shared_targets;
use self::validate::Validator;
use crate::schedule::Schedule;

pub mod alerts;
mod credential;
pub mod hooks;
mod locate;
mod raw;
mod references;
mod revoke;
mod sections;
mod targets;
mod validate;

pub use self::hooks::{HookAction, HookSpec, HookWhen};
pub use self::references::{check_references, check_vault_references};
pub use self::revoke::{OnMaxRevokeDelay, RevokePolicy, RevokeWhen};
use keyrotd_plugin::backoff::Backoff;

/// The validated inventory.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// Where it was read from.
    pub path: PathBuf,
    /// The `[daemon]` table.
    pub daemon: DaemonSettings,
    /// Every `[[credential]]`, in file order.
    pub credentials: Vec<CredentialSpec>,
    /// The `[alerts]` table (no channels: alerting off).
    pub alerts: AlertsConfig,
    /// The `[vault]` table: the connection `vault:` references are read through, made current
    /// by `keyrotd_providers::resolve::set_vault_defaults` once the inventory is adopted (a
    /// daemon refuses a reload that changes it).
    pub vault: keyrotd_providers::VaultDefaults,
}

/// The `[daemon]` table.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    /// The state backend.
    pub state: StateUrl,
    /// Address of the HTTP endpoint (/metrics, /healthz, /readyz).
    pub listen: SocketAddr,
    /// How many rotations may run at once.
    pub max_concurrent_rotations: usize,
    /// How long SIGTERM and SIGHUP wait for steps in flight before interrupting them (they
    /// resume from the journal). Keep it below the service manager's stop timeout.
    pub shutdown_timeout: Duration,
    /// How long finished rotations and their journal rows are kept (the newest completed
    /// rotation of each credential is always kept); older ones are pruned behind a checkpoint.
    pub history_retention: Duration,
    /// A file the daemon appends every journal row to as a JSON line (relative paths count from
    /// the config file).
    pub audit_log: Option<PathBuf>,
    /// Which per-credential series `/metrics` exports.
    pub metrics: MetricsMode,
}

/// `daemon.metrics`: which per-credential series `/metrics` exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetricsMode {
    /// `"full"` (the default): every credential's series.
    #[default]
    Full,
    /// `"compact"`: only the series of credentials that need attention (stale, due or overdue,
    /// rotating, retrying, failed, or with failures), plus the per-state counts. For inventories
    /// so large that nine series per credential burden the Prometheus server; the shipped alert
    /// rules work unchanged.
    Compact,
}

/// The default `daemon.history_retention`: 400 days, a yearly audit plus a month.
pub const DEFAULT_HISTORY_RETENTION: Duration = Duration::from_secs(400 * 86_400);

/// The default `daemon.shutdown_timeout`: 10 s below the shipped unit's `TimeoutStopSec=30s`.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the daemon keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateUrl {
    /// `sqlite:PATH`: an embedded SQLite database (relative paths count from the config file).
    Sqlite(PathBuf),
}

/// One validated `[[credential]]`.
#[derive(Debug, Clone)]
pub struct CredentialSpec {
    /// Unique id.
    pub id: String,
    /// How it is rotated.
    pub rotator: RotatorConfig,
    /// Where consumers read it.
    pub store: StoreConfig,
    /// When it rotates.
    pub schedule: Schedule,
    /// Past this age the credential is stale.
    pub max_age: Duration,
    /// How long the old credential stays valid after promotion.
    pub grace: Duration,
    /// What happens when a rotation fails.
    pub retry: RetryPolicy,
    /// Line and column of the credential's `rotator` table, for later error messages.
    pub place: (usize, usize),
    /// The longest time the schedule lets pass between two rotations (shorter than `max_age`).
    pub period: Duration,
    /// When the old credential is revoked: after the grace period, or once unused.
    pub revoke: RevokePolicy,
    /// Delivery hooks: what tells consumers about the new credential (`[[credential.hook]]`,
    /// else `[[defaults.hook]]`).
    pub hooks: Vec<HookSpec>,
    /// Whether the revoke proceeds once a promote hook's attempts are exhausted (else it waits
    /// until every promote hook succeeded).
    pub revoke_after_hook_failure: bool,
}

/// Retries with exponential backoff and jitter; after `max_attempts` consecutive failures the
/// credential is marked failed and automation stops until an operator rotates it by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Consecutive failed attempts before the credential is marked failed.
    pub max_attempts: u32,
    /// Delay before the first retry; doubled for each later one.
    pub backoff: Duration,
    /// Upper bound of the delay.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(3600),
        }
    }
}

impl RetryPolicy {
    /// The delays between failed attempts: `backoff` doubling up to `max_backoff`, jittered.
    pub fn delays(&self) -> Backoff {
        Backoff::new(self.backoff, self.max_backoff)
    }
}

/// One problem in the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line, 0 when the problem has no place in the file (it cannot be read).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The field's path, like `credential[db].schedule`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.field,
                self.message
            )
        } else {
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.field,
                self.message
            )
        }
    }
}

/// All problems found in one inventory.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The default config path, overridden by `--config` or `KEYROTD_CONFIG`.
pub const DEFAULT_PATH: &str = "/etc/keyrotd/config.toml";

/// Reads and validates the inventory at `path`.
pub fn load(path: &Path) -> Result<Inventory, ConfigErrors> {
    // A pipe (`--config <(generate-inventory)`, `/dev/stdin`) can be read only once: it is read
    // whole and both passes read the copy. A regular file is read twice, never held whole.
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        let mut bytes = Vec::new();
        let read = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut bytes));
        // On error (a directory, say), the regular path below reports it.
        if read.is_ok() {
            return parse_from(path, || Ok(bytes.as_slice()));
        }
    }
    parse_from(path, || {
        std::fs::File::open(path).map(std::io::BufReader::new)
    })
}

/// Parses and validates inventory text; `path` is used for messages and relative state paths.
pub fn parse(path: &Path, text: &str) -> Result<Inventory, ConfigErrors> {
    parse_from(path, || Ok(text.as_bytes()))
}

/// Parses and validates the inventory that `open` reads, in two passes over it.
///
/// Neither the file nor one TOML tree of it is ever held whole: a 100,000-credential inventory
/// would take its size again, and several times that as a tree, on top of the validated specs.
/// The first pass keeps only the head (everything outside the `[[credential]]` sections: the
/// daemon, defaults and alerts tables), which the sections need validated first; the second
/// hands each section, as soon as it is read, to the TOML parser and the validator, so only
/// its compact [`CredentialSpec`] stays. A file whose head or section count changed between
/// the passes is refused.
fn parse_from<R: std::io::BufRead>(
    path: &Path,
    mut open: impl FnMut() -> std::io::Result<R>,
) -> Result<Inventory, ConfigErrors> {
    let file_error = |message: String| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            field: "(file)".into(),
            message,
        }])
    };
    let unreadable = |e: std::io::Error| file_error(format!("cannot read: {e}"));
    let mut head = Head::default();
    let mut sections = 0;
    open()
        .and_then(|r| scan(r, |line, n| head.push(line, n), |_, _| sections += 1))
        .map_err(unreadable)?;
    let mut v = Validator {
        file: path,
        text: head.text,
        first_line: 1,
        pieces: head.pieces,
        errors: Vec::new(),
        seen: HashMap::with_capacity(sections),
        crons: HashMap::new(),
    };
    let raw = v.deserialize::<RawInventory>(0);
    let Some(raw) = raw else {
        return Err(ConfigErrors(v.errors));
    };
    let daemon = v.daemon(raw.daemon);
    let providers = ProviderDefaults {
        aws: raw.aws,
        vault: v.vault(raw.vault),
    };
    let vault = providers.vault.clone();
    let defaults = v.defaults(&raw.defaults, providers);
    let alerts = v.alerts(raw.alerts);
    let mut credentials = Vec::with_capacity(sections + raw.credentials.len());
    let mut index = 0;
    for cred in raw.credentials {
        if let Some(spec) = v.credential(&defaults, cred, index) {
            credentials.push(spec);
        }
        index += 1;
    }
    let head = std::mem::take(&mut v.text);
    v.pieces = Vec::new();
    let (mut at, mut changed, mut read) = (0, false, 0);
    open()
        .and_then(|r| {
            scan(
                r,
                |line, _| {
                    changed |= head.get(at..at + line.len()) != Some(line);
                    at += line.len();
                },
                |text, first_line| {
                    read += 1;
                    v.text.clear();
                    v.text.push_str(text);
                    v.first_line = first_line;
                    let parsed = v.deserialize::<OneCredential>(index);
                    for cred in parsed.into_iter().flat_map(|one| one.credential) {
                        if let Some(spec) = v.credential(&defaults, cred, index) {
                            credentials.push(spec);
                        }
                    }
                    index += 1;
                },
            )
        })
        .map_err(unreadable)?;
    if changed || at != head.len() || read != sections {
        return Err(file_error(
            "the file changed while it was read; load it again".into(),
        ));
    }
    v.errors.extend(shared_targets(path, &credentials));
    if v.errors.is_empty() {
        Ok(Inventory {
            path: path.to_owned(),
            daemon,
            credentials,
            alerts,
            vault,
        })
    } else {
        Err(ConfigErrors(v.errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn errors(text: &str) -> Vec<String> {
        match parse(Path::new("inv.toml"), text) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    pub(super) const GOOD: &str = r#"
[daemon]
state = "sqlite:state.db"

[defaults]
max_age = "40d"
grace = "1h"

[[credential]]
id = "api-token"
rotator = { kind = "random", length = 40 }
store = { kind = "file", path = "/tmp/x/api-token" }
rotate_every = "30d"

[[credential]]
id = "weekly"
schedule = "0 3 * * 1"
max_age = "8d"
rotator = { kind = "random" }
store = { kind = "file", path = "/tmp/x/weekly" }
"#;

    #[test]
    fn a_good_inventory_loads_with_defaults_applied() {
        let inv = parse(Path::new("/etc/k/inv.toml"), GOOD).unwrap();
        assert_eq!(inv.daemon.state, StateUrl::Sqlite("/etc/k/state.db".into()));
        assert_eq!(inv.credentials.len(), 2);
        assert_eq!(inv.credentials[0].max_age, Duration::from_secs(40 * 86400));
        assert_eq!(
            inv.credentials[1]
                .schedule
                .cron
                .as_ref()
                .unwrap()
                .expression,
            "0 0 3 * * 1"
        );
        assert_eq!(inv.credentials[1].grace, Duration::from_secs(3600));
    }

    #[test]
    fn a_file_that_changes_between_the_two_passes_is_refused() {
        let more = format!("{GOOD}\n[[credential]]\nid = \"c\"\n");
        for second in [GOOD.replace("grace = \"1h\"", "grace = \"2h\""), more] {
            let mut texts = [GOOD.to_owned(), second].into_iter();
            let e = parse_from(Path::new("inv.toml"), || {
                Ok(std::io::Cursor::new(texts.next().expect("two passes")))
            })
            .unwrap_err();
            assert!(e.to_string().contains("changed while it was read"), "{e}");
        }
    }

    #[test]
    fn unknown_keys_name_line_column_and_field() {
        let e = errors(&GOOD.replace("length = 40", "lenght = 40"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("inv.toml:11:"), "{}", e[0]);
        assert!(
            e[0].contains("credential[api-token].rotator.lenght: unknown field `lenght`"),
            "{}",
            e[0]
        );
        let e = errors(&GOOD.replace("[daemon]", "[daemon]\nlisten_on = 1"));
        assert!(
            e[0].starts_with("inv.toml:3:1: daemon.listen_on: unknown field `listen_on`"),
            "{}",
            e[0]
        );
    }

    #[test]
    fn malformed_toml_and_wrong_types_are_errors_not_panics() {
        for text in [
            "[[credential]\n",
            "daemon = 3",
            "[daemon]\nmax_concurrent_rotations = \"x\"",
            "\u{0}",
            "[[credential]]\nid = 1",
        ] {
            assert!(!errors(text).is_empty(), "{text:?} should fail");
        }
        assert!(errors("[[credential]]\nid = \"a\"\nrotator = { kind = \"nope\" }\nstore = { kind = \"file\", path = \"/x\" }")[0].contains("nope"));
    }

    #[test]
    fn no_prefix_or_byte_flip_of_the_example_inventory_panics() {
        let example = include_str!("../../config.toml");
        for end in (0..example.len()).filter(|i| example.is_char_boundary(*i)) {
            let _ = parse(Path::new("config.toml"), &example[..end]);
        }
        let bytes = example.as_bytes();
        for (i, replacement) in (0..bytes.len())
            .step_by(3)
            .zip([b'"', b'[', b'=', b'\n', b'0', b'#', b']'].iter().cycle())
        {
            let mut mutated = bytes.to_vec();
            mutated[i] = *replacement;
            if let Ok(text) = std::str::from_utf8(&mutated) {
                let _ = parse(Path::new("config.toml"), text);
            }
        }
        assert!(
            parse(Path::new("config.toml"), example).is_ok(),
            "the shipped example is valid"
        );
    }
}
