//! The inventory: `config.toml` parsed once into a validated [`Inventory`].
//!
//! Invariant: nothing outside this module sees raw TOML. Every error names the file, line,
//! column and field, and loading never panics, whatever the input. Loading changes nothing on
//! disk or at any provider.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use chrono_tz::Tz;
use keyrotd_rotators::{RotatorConfig, StoreConfig};
use serde::Deserialize;
use toml::Spanned;

use crate::schedule::{parse_duration, CronSchedule, Schedule};

/// The validated inventory.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// Where it was read from.
    pub path: PathBuf,
    /// The `[daemon]` table.
    pub daemon: DaemonSettings,
    /// Every `[[credential]]`, in file order.
    pub credentials: Vec<CredentialSpec>,
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
}

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
        Self { max_attempts: 5, backoff: Duration::from_secs(30), max_backoff: Duration::from_secs(3600) }
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
            write!(f, "{}: {}: {}", self.file.display(), self.field, self.message)
        } else {
            write!(f, "{}:{}:{}: {}: {}", self.file.display(), self.line, self.column, self.field, self.message)
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default, rename = "credential")]
    credentials: Vec<RawCredential>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    state: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
    max_concurrent_rotations: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    rotate_every: Option<Spanned<String>>,
    max_age: Option<Spanned<String>>,
    grace: Option<Spanned<String>>,
    window: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    retry: Option<RawRetry>,
}

#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<Spanned<i64>>,
    backoff: Option<Spanned<String>>,
    max_backoff: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    id: Spanned<String>,
    rotator: Spanned<RotatorConfig>,
    store: Spanned<StoreConfig>,
    schedule: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    rotate_every: Option<Spanned<String>>,
    max_age: Option<Spanned<String>>,
    grace: Option<Spanned<String>>,
    window: Option<Spanned<String>>,
    retry: Option<RawRetry>,
}

/// The default config path, overridden by `--config` or `KEYROTD_CONFIG`.
pub const DEFAULT_PATH: &str = "/etc/keyrotd/config.toml";

/// Reads and validates the inventory at `path`.
pub fn load(path: &Path) -> Result<Inventory, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            field: "(file)".into(),
            message: format!("cannot read: {e}"),
        }])
    })?;
    parse(path, &text)
}

/// Parses and validates inventory text; `path` is used for messages and relative state paths.
pub fn parse(path: &Path, text: &str) -> Result<Inventory, ConfigErrors> {
    let mut v = Validator { file: path, text, errors: Vec::new() };
    let parsed = toml::Deserializer::parse(text)
        .map_err(|e| ("(document)".to_owned(), e))
        .and_then(|de| serde_path_to_error::deserialize(de).map_err(|e| (e.path().to_string(), e.into_inner())));
    let raw: RawInventory = match parsed {
        Ok(raw) => raw,
        Err((field, e)) => {
            let field = if field == "." { "(document)".to_owned() } else { field };
            v.error_at(e.span(), &field, e.message().trim());
            return Err(ConfigErrors(v.errors));
        }
    };
    let inventory = v.inventory(raw);
    if v.errors.is_empty() {
        Ok(inventory)
    } else {
        Err(ConfigErrors(v.errors))
    }
}

struct Validator<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn error_at(&mut self, span: Option<std::ops::Range<usize>>, field: &str, message: impl Into<String>) {
        let (line, column) = match span {
            Some(span) => line_column(self.text, span.start),
            None => (0, 0),
        };
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    fn duration(&mut self, value: &Spanned<String>, field: &str) -> Option<Duration> {
        match parse_duration(value.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.error_at(Some(value.span()), field, "must be longer than zero");
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.error_at(Some(value.span()), field, e);
                None
            }
        }
    }

    fn inventory(&mut self, raw: RawInventory) -> Inventory {
        let daemon = self.daemon(raw.daemon);
        let mut credentials = Vec::with_capacity(raw.credentials.len());
        let mut seen: HashMap<String, usize> = HashMap::with_capacity(raw.credentials.len());
        let mut gaps: HashMap<(String, Tz), Duration> = HashMap::new();
        let mut crons: HashMap<(String, Tz), Result<CronSchedule, String>> = HashMap::new();
        let now = Utc::now();
        for (index, cred) in raw.credentials.into_iter().enumerate() {
            let id = cred.id.get_ref().clone();
            let field = format!("credential[{index}]");
            if !valid_id(&id) {
                self.error_at(Some(cred.id.span()), &format!("{field}.id"), format!("`{id}` must be 1-128 characters of A-Z a-z 0-9 . _ -"));
                continue;
            }
            // Remember the offset, not the line: counting lines here for every credential made
            // loading quadratic in the inventory's size.
            if let Some(first) = seen.insert(id.clone(), cred.id.span().start) {
                let first_line = line_column(self.text, first).0;
                self.error_at(Some(cred.id.span()), &format!("{field}.id"), format!("duplicate id `{id}` (first defined on line {first_line})"));
                continue;
            }
            if let Some(spec) = self.credential(&raw.defaults, cred, &format!("credential[{id}]"), &mut gaps, &mut crons, now) {
                credentials.push(spec);
            }
        }
        Inventory { path: self.file.to_owned(), daemon, credentials }
    }

    fn daemon(&mut self, raw: RawDaemon) -> DaemonSettings {
        let state = match &raw.state {
            None => StateUrl::Sqlite(PathBuf::from("/var/lib/keyrotd/state.db")),
            Some(s) => match s.get_ref().strip_prefix("sqlite:") {
                Some(p) if !p.is_empty() => {
                    let p = Path::new(p);
                    let base = self.file.parent().unwrap_or(Path::new("."));
                    StateUrl::Sqlite(if p.is_absolute() { p.to_owned() } else { base.join(p) })
                }
                _ => {
                    self.error_at(Some(s.span()), "daemon.state", format!("`{}` is not a supported state URL (expected sqlite:PATH)", s.get_ref()));
                    StateUrl::Sqlite(PathBuf::new())
                }
            },
        };
        let listen = match &raw.listen {
            None => SocketAddr::from(([127, 0, 0, 1], 9477)),
            Some(s) => s.get_ref().parse().unwrap_or_else(|_| {
                self.error_at(Some(s.span()), "daemon.listen", format!("`{}` is not an address like 127.0.0.1:9477", s.get_ref()));
                SocketAddr::from(([127, 0, 0, 1], 9477))
            }),
        };
        let max_concurrent_rotations = match &raw.max_concurrent_rotations {
            None => 4,
            Some(n) if (1..=1024).contains(n.get_ref()) => *n.get_ref() as usize,
            Some(n) => {
                self.error_at(Some(n.span()), "daemon.max_concurrent_rotations", "must be between 1 and 1024");
                1
            }
        };
        DaemonSettings { state, listen, max_concurrent_rotations }
    }

    fn credential(
        &mut self,
        defaults: &RawDefaults,
        raw: RawCredential,
        field: &str,
        gaps: &mut HashMap<(String, Tz), Duration>,
        crons: &mut HashMap<(String, Tz), Result<CronSchedule, String>>,
        now: chrono::DateTime<Utc>,
    ) -> Option<CredentialSpec> {
        let errors_before = self.errors.len();
        let id = raw.id.into_inner();
        let (rotator_span, rotator) = (raw.rotator.span(), raw.rotator.into_inner());
        if let Err(e) = rotator.validate() {
            self.error_at(Some(rotator_span.clone()), &format!("{field}.rotator"), e);
        }
        let (store_span, store) = (raw.store.span(), raw.store.into_inner());
        if let Err(e) = store.validate() {
            self.error_at(Some(store_span), &format!("{field}.store"), e);
        }

        let tz_raw = raw.timezone.as_ref().or(defaults.timezone.as_ref());
        let timezone = match tz_raw {
            None => Tz::UTC,
            Some(tz) => tz.get_ref().parse::<Tz>().unwrap_or_else(|_| {
                self.error_at(Some(tz.span()), &format!("{field}.timezone"), format!("unknown timezone `{}` (expected an IANA name like Europe/Paris)", tz.get_ref()));
                Tz::UTC
            }),
        };
        // Credentials share a handful of schedules: parse each (expression, timezone) once and
        // share it, which keeps 100,000 credentials from costing 100,000 cron parses.
        let cron = raw.schedule.as_ref().and_then(|s| match crons.entry((s.get_ref().clone(), timezone)).or_insert_with(|| CronSchedule::parse(s.get_ref(), timezone)).clone() {
            Ok(c) => Some(c),
            Err(e) => {
                self.error_at(Some(s.span()), &format!("{field}.schedule"), e);
                None
            }
        });
        let every_raw = raw.rotate_every.as_ref().or(defaults.rotate_every.as_ref());
        let every = every_raw.and_then(|s| self.duration(s, &format!("{field}.rotate_every")));
        let window = raw.window.as_ref().or(defaults.window.as_ref()).and_then(|s| self.duration(s, &format!("{field}.window")));
        if raw.schedule.is_none() && every_raw.is_none() {
            self.error_at(Some(rotator_span.clone()), field, "needs `schedule` (cron) or `rotate_every` (here or in [defaults])");
        }

        let max_age_raw = raw.max_age.as_ref().or(defaults.max_age.as_ref());
        let max_age = match max_age_raw {
            Some(s) => self.duration(s, &format!("{field}.max_age")),
            None => {
                self.error_at(Some(rotator_span.clone()), &format!("{field}.max_age"), "is required (here or in [defaults])");
                None
            }
        };
        let grace_raw = raw.grace.as_ref().or(defaults.grace.as_ref());
        let grace = match grace_raw {
            Some(s) => match parse_duration(s.get_ref()) {
                Ok(d) => Some(d),
                Err(e) => {
                    self.error_at(Some(s.span()), &format!("{field}.grace"), e);
                    None
                }
            },
            None => Some(Duration::from_secs(3600)),
        };
        let retry = self.retry(defaults.retry.as_ref(), raw.retry.as_ref(), field);

        if self.errors.len() > errors_before {
            return None;
        }
        let (max_age, grace) = (max_age?, grace?);
        let schedule = Schedule { cron, every, window };
        // Credentials share a handful of schedules: compute each cron's period once.
        let period = match &schedule.cron {
            Some(c) => {
                let gap = *gaps.entry((c.expression.clone(), c.timezone)).or_insert_with(|| c.longest_gap(now));
                gap.min(every.unwrap_or(Duration::MAX))
            }
            None => schedule.period(now),
        };
        let max_age_span = max_age_raw.map(|s| s.span());
        if max_age <= period {
            self.error_at(
                max_age_span,
                &format!("{field}.max_age"),
                format!("{} is not longer than the rotation period ({}): the credential would go stale between rotations", human(max_age), human(period)),
            );
            return None;
        }
        if grace >= period {
            self.error_at(
                grace_raw.map(|s| s.span()).or(max_age_span),
                &format!("{field}.grace"),
                format!("{} must be shorter than the rotation period ({})", human(grace), human(period)),
            );
            return None;
        }
        Some(CredentialSpec { id, rotator, store, schedule, max_age, grace, retry })
    }

    fn retry(&mut self, defaults: Option<&RawRetry>, own: Option<&RawRetry>, field: &str) -> RetryPolicy {
        let mut policy = RetryPolicy::default();
        for raw in [defaults, own].into_iter().flatten() {
            if let Some(n) = &raw.max_attempts {
                match u32::try_from(*n.get_ref()) {
                    Ok(n @ 1..=100) => policy.max_attempts = n,
                    _ => self.error_at(Some(n.span()), &format!("{field}.retry.max_attempts"), "must be between 1 and 100"),
                }
            }
            if let Some(d) = raw.backoff.as_ref().and_then(|s| self.duration(s, &format!("{field}.retry.backoff"))) {
                policy.backoff = d;
            }
            if let Some(d) = raw.max_backoff.as_ref().and_then(|s| self.duration(s, &format!("{field}.retry.max_backoff"))) {
                policy.max_backoff = d;
            }
        }
        policy
    }
}

fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A duration in the form the config uses (`40d`, `1h30m`, `10s`).
pub fn human(d: Duration) -> String {
    if d == Duration::MAX {
        return "never".into();
    }
    let mut secs = d.as_secs();
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match parse(Path::new("inv.toml"), text) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    const GOOD: &str = r#"
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
        assert_eq!(inv.credentials[1].schedule.cron.as_ref().unwrap().expression, "0 0 3 * * 1");
        assert_eq!(inv.credentials[1].grace, Duration::from_secs(3600));
    }

    #[test]
    fn unknown_keys_name_line_column_and_field() {
        let e = errors(&GOOD.replace("length = 40", "lenght = 40"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("inv.toml:11:"), "{}", e[0]);
        assert!(e[0].contains("credential[0].rotator") && e[0].contains("lenght"), "{}", e[0]);
        let e = errors(&GOOD.replace("[daemon]", "[daemon]\nlisten_on = 1"));
        assert!(e[0].starts_with("inv.toml:3:1: daemon.listen_on: unknown field `listen_on`"), "{}", e[0]);
    }

    #[test]
    fn semantic_errors_are_all_reported_with_their_places() {
        let bad = GOOD
            .replace("rotate_every = \"30d\"", "rotate_every = \"30 parsecs\"")
            .replace("0 3 * * 1", "0 3 * *")
            .replace("id = \"weekly\"", "id = \"api-token\"");
        let e = errors(&bad);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("inv.toml:13:16: credential[api-token].rotate_every:"), "{}", e[0]);
        assert!(e[1].contains("credential[1].id: duplicate id `api-token` (first defined on line 10)"), "{}", e[1]);
    }

    #[test]
    fn max_age_must_exceed_the_rotation_period() {
        let e = errors(&GOOD.replace("max_age = \"8d\"", "max_age = \"7d\""));
        assert!(e[0].contains("credential[weekly].max_age: 7d is not longer than the rotation period (7d)"), "{e:?}");
    }

    #[test]
    fn malformed_toml_and_wrong_types_are_errors_not_panics() {
        for text in ["[[credential]\n", "daemon = 3", "[daemon]\nmax_concurrent_rotations = \"x\"", "\u{0}", "[[credential]]\nid = 1"] {
            assert!(!errors(text).is_empty(), "{text:?} should fail");
        }
        assert!(errors("[[credential]]\nid = \"a\"\nrotator = { kind = \"nope\" }\nstore = { kind = \"file\", path = \"/x\" }")[0].contains("nope"));
    }
}
