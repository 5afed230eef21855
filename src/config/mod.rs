//! The inventory: `config.toml` parsed once into a validated [`Inventory`].
//!
//! Invariant: nothing outside this module sees raw TOML. Every error names the file, line,
//! column and field, and loading never panics, whatever the input. Loading changes nothing on
//! disk or at any provider.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono_tz::Tz;
use keyrotd_rotators::{AwsDefaults, RotatorConfig, StoreConfig};
use serde::Deserialize;
use toml::Spanned;

use self::alerts::AlertsConfig;
use crate::schedule::{parse_duration, Accepts, CronSchedule, Schedule};

pub mod alerts;
mod locate;

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
}

/// The default `daemon.shutdown_timeout`: 10 s below the shipped unit's `TimeoutStopSec=30s`.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest accepted `daemon.shutdown_timeout`.
const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(600);

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default, rename = "credential")]
    credentials: Vec<RawCredential>,
    alerts: Option<Spanned<AlertsConfig>>,
    #[serde(default)]
    aws: AwsDefaults,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    state: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
    max_concurrent_rotations: Option<Spanned<i64>>,
    shutdown_timeout: Option<Spanned<String>>,
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

#[derive(Deserialize, Default)]
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
///
/// Each `[[credential]]` section is parsed on its own, so a 100,000-credential inventory never
/// exists as one TOML tree (which would take several times the file's size in memory). The rest
/// of the document is parsed with the credential sections blanked out, which keeps every line
/// and column where it was.
pub fn parse(path: &Path, text: &str) -> Result<Inventory, ConfigErrors> {
    let sections = credential_sections(text);
    let mut v = Validator {
        file: path,
        // The blanked head keeps every byte offset, so its spans index `text` too.
        text,
        first_line: 1,
        errors: Vec::new(),
        seen: HashMap::with_capacity(sections.len()),
        crons: HashMap::new(),
    };
    let head = blank_sections(text, &sections);
    let raw = v.deserialize::<RawInventory>(&head, 0);
    drop(head);
    let Some(raw) = raw else {
        return Err(ConfigErrors(v.errors));
    };
    let daemon = v.daemon(raw.daemon);
    let defaults = v.defaults(&raw.defaults, raw.aws);
    let alerts = v.alerts(raw.alerts);
    let mut credentials = Vec::with_capacity(sections.len() + raw.credentials.len());
    let mut index = 0;
    for cred in raw.credentials {
        if let Some(spec) = v.credential(&defaults, cred, index) {
            credentials.push(spec);
        }
        index += 1;
    }
    for section in &sections {
        v.text = &text[section.bytes.clone()];
        v.first_line = section.first_line;
        let parsed = v.deserialize::<OneCredential>(v.text, index);
        for cred in parsed.into_iter().flat_map(|one| one.credential) {
            if let Some(spec) = v.credential(&defaults, cred, index) {
                credentials.push(spec);
            }
        }
        index += 1;
    }
    v.errors.extend(shared_targets(path, &credentials));
    if v.errors.is_empty() {
        Ok(Inventory {
            path: path.to_owned(),
            daemon,
            credentials,
            alerts,
        })
    } else {
        Err(ConfigErrors(v.errors))
    }
}

/// Refuses two credentials that change the same thing (a file, a secret, a database role): each
/// would overwrite the other's value and revoke credentials the other still hands out. The error
/// is reported on the later credential and names the earlier one and its line.
///
/// Only hashes of the targets are kept for the whole inventory: at 100,000 credentials the
/// target strings themselves (a file store has three) cost tens of MiB of peak memory at load.
/// Equal hashes are confirmed by comparing the strings, so a collision never reports a clash.
fn shared_targets(file: &Path, credentials: &[CredentialSpec]) -> Vec<ConfigError> {
    const PARTS: [&str; 2] = ["rotator", "store"];
    let targets = |c: &CredentialSpec, part: usize| match part {
        0 => c.rotator.targets(),
        _ => c.store.targets(),
    };
    let hasher = std::hash::RandomState::new();
    // (hash, credential, part, position among the part's targets)
    let mut seen: Vec<(u64, usize, usize, usize)> = Vec::with_capacity(credentials.len());
    for (i, c) in credentials.iter().enumerate() {
        for part in 0..PARTS.len() {
            seen.extend(
                targets(c, part)
                    .iter()
                    .enumerate()
                    .map(|(k, t)| (hasher.hash_one(t), i, part, k)),
            );
        }
    }
    seen.sort_unstable();
    let target_of = |(_, i, part, k): (u64, usize, usize, usize)| {
        targets(&credentials[i], part).into_iter().nth(k)
    };
    // Each later credential's first clash (in the order of its own targets), in inventory order.
    let mut clashes: BTreeMap<usize, ((usize, usize), String, usize)> = BTreeMap::new();
    for run in seen.chunk_by(|a, b| a.0 == b.0).filter(|run| run.len() > 1) {
        for (k, &later) in run.iter().enumerate().skip(1) {
            let Some(target) = target_of(later) else {
                continue;
            };
            let first = run[..k].iter().find(|&&earlier| {
                earlier.1 != later.1 && target_of(earlier) == Some(target.clone())
            });
            if let Some(&(_, first, _, _)) = first {
                let clash = ((later.2, later.3), target, first);
                match clashes.entry(later.1) {
                    Entry::Occupied(mut o) if o.get().0 > clash.0 => {
                        o.insert(clash);
                    }
                    Entry::Occupied(_) => {}
                    Entry::Vacant(v) => {
                        v.insert(clash);
                    }
                }
            }
        }
    }
    clashes
        .into_iter()
        .map(|(i, ((part, _), target, first))| {
            let (c, first) = (&credentials[i], &credentials[first]);
            ConfigError {
                file: file.to_owned(),
                line: c.place.0,
                column: c.place.1,
                field: format!("credential[{}].{}", c.id, PARTS[part]),
                message: format!(
                    "{target} is also written by credential `{}` (line {}): two credentials \
                     must not share a location",
                    first.id, first.place.0
                ),
            }
        })
        .collect()
}

/// One `[[credential]]` section parsed on its own.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OneCredential {
    credential: Vec<RawCredential>,
}

/// A `[[credential]]` section: its bytes (header included) and the line it starts on.
struct Section {
    bytes: std::ops::Range<usize>,
    first_line: usize,
}

/// Finds the `[[credential]]` sections: from a `[[credential]]` header to the next header that
/// is not one of its sub-tables (`[credential.rotator]`). Headers inside multi-line strings do
/// not count.
fn credential_sections(text: &str) -> Vec<Section> {
    let mut sections: Vec<Section> = Vec::new();
    let mut open = false;
    let mut in_string: Option<&str> = None;
    let mut offset = 0;
    for (number, line) in text.split_inclusive('\n').enumerate() {
        if in_string.is_none() && line.trim_start().starts_with('[') {
            let header: String = line
                .split('#')
                .next()
                .unwrap_or_default()
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            let is_credential = header == "[[credential]]";
            let is_sub = header.starts_with("[credential.") || header.starts_with("[[credential.");
            if open && (is_credential || !is_sub) {
                sections.last_mut().expect("an open section").bytes.end = offset;
                open = false;
            }
            if is_credential {
                open = true;
                sections.push(Section {
                    bytes: offset..offset,
                    first_line: number + 1,
                });
            }
        }
        for delimiter in ["\"\"\"", "'''"] {
            if line.matches(delimiter).count() % 2 == 1 {
                in_string = match in_string {
                    None => Some(delimiter),
                    Some(d) if d == delimiter => None,
                    other => other,
                };
            }
        }
        offset += line.len();
    }
    if open {
        sections.last_mut().expect("an open section").bytes.end = offset;
    }
    sections
}

/// `text` with every byte of the sections replaced by a space, newlines kept, so every byte
/// offset and line stays where it was.
fn blank_sections(text: &str, sections: &[Section]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for section in sections {
        out.push_str(&text[at..section.bytes.start]);
        out.extend(text.as_bytes()[section.bytes.clone()].iter().map(|&b| {
            if b == b'\n' {
                '\n'
            } else {
                ' '
            }
        }));
        at = section.bytes.end;
    }
    out.push_str(&text[at..]);
    out
}

/// Checks that every secret the inventory references is there (variables set, files readable),
/// without reading any of them, and that every store's location is safe to write as it is now
/// (for a file store: no special file or symlink at its names, no directory others can write). Run by `check`, `run` and `rotate`; not by `status` and
/// `history`, which an operator may run from a shell that lacks the daemon's environment.
pub fn check_references(inventory: &Inventory) -> Result<(), ConfigErrors> {
    let error = |c: &CredentialSpec, part: &str, message: String| ConfigError {
        file: inventory.path.clone(),
        line: c.place.0,
        column: c.place.1,
        field: format!("credential[{}].{part}", c.id),
        message,
    };
    let stores = inventory.credentials.iter().filter_map(|c| {
        let e = c.store.check_location().err()?;
        Some(error(c, "store", e))
    });
    let errors: Vec<ConfigError> = inventory
        .credentials
        .iter()
        .flat_map(|c| c.rotator.secret_refs().into_iter().map(move |r| (c, r)))
        .filter_map(|(c, (field, r))| {
            let e = r.check_available().err()?;
            Some(error(
                c,
                &format!("rotator.{field}"),
                format!("secret reference `{r}`: {e}"),
            ))
        })
        .chain(stores)
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

/// `[defaults]`, validated once where it is written.
struct Defaults {
    rotate_every: Option<Duration>,
    max_age: Option<Duration>,
    grace: Option<Duration>,
    window: Option<Duration>,
    timezone: Option<Tz>,
    retry: RetryPolicy,
    /// The `[aws]` table.
    aws: AwsDefaults,
    /// Whether `[defaults]` had errors (reported already); credentials then stop quietly.
    broken: bool,
}

struct Validator<'a> {
    file: &'a Path,
    /// The document being validated: the whole file with sections blanked, or one section.
    text: &'a str,
    /// The file line `text` starts on.
    first_line: usize,
    errors: Vec<ConfigError>,
    /// Credential ids seen so far, and the line each was defined on.
    seen: HashMap<String, usize>,
    /// Each distinct (expression, timezone) parsed once: a parsed cron is kilobytes, and
    /// parsing computes its longest gap.
    crons: HashMap<(String, Tz), Result<CronSchedule, String>>,
}

impl Validator<'_> {
    fn error_at(
        &mut self,
        span: Option<std::ops::Range<usize>>,
        field: &str,
        message: impl Into<String>,
    ) {
        let (line, column) = match span {
            Some(span) => {
                let (line, column) = line_column(self.text, span.start);
                (line + self.first_line - 1, column)
            }
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

    /// Deserializes `text`, recording the error with the field it is about. `first_index` is
    /// the position in the file of the text's first credential.
    fn deserialize<T: serde::de::DeserializeOwned>(
        &mut self,
        text: &str,
        first_index: usize,
    ) -> Option<T> {
        // The fast path tracks no field path (it costs an allocation per key); only a failure
        // is parsed again to find where it happened.
        if let Ok(raw) = toml::from_str(text) {
            return Some(raw);
        }
        let de = match toml::Deserializer::parse(text) {
            Ok(de) => de,
            Err(e) => {
                self.error_at(e.span(), "(document)", e.message().trim());
                return None;
            }
        };
        match serde_path_to_error::deserialize(de) {
            Ok(raw) => Some(raw),
            Err(e) => {
                let at = locate::locate(text, e.path(), e.inner(), first_index);
                self.error_at(at.span, &at.field, at.message);
                None
            }
        }
    }

    /// Parses a positive duration in whole seconds (see [`Accepts::SECONDS`]).
    fn duration(&mut self, value: &Spanned<String>, field: &str) -> Option<Duration> {
        self.duration_accepting(value, field, Accepts::SECONDS)
    }

    /// Parses a duration within the bounds every duration respects, plus those of `accepts`.
    fn duration_accepting(
        &mut self,
        value: &Spanned<String>,
        field: &str,
        accepts: Accepts,
    ) -> Option<Duration> {
        parse_duration(value.get_ref(), accepts)
            .map_err(|e| self.error_at(Some(value.span()), field, e))
            .ok()
    }

    fn timezone(&mut self, value: &Spanned<String>, field: &str) -> Option<Tz> {
        let tz = value.get_ref().parse::<Tz>().ok();
        if tz.is_none() {
            self.error_at(
                Some(value.span()),
                field,
                format!(
                    "unknown timezone `{}` (expected an IANA name like Europe/Paris)",
                    value.get_ref()
                ),
            );
        }
        tz
    }

    fn defaults(&mut self, raw: &RawDefaults, aws: AwsDefaults) -> Defaults {
        let before = self.errors.len();
        let mut d = Defaults {
            rotate_every: raw
                .rotate_every
                .as_ref()
                .and_then(|s| self.duration(s, "defaults.rotate_every")),
            max_age: raw
                .max_age
                .as_ref()
                .and_then(|s| self.duration(s, "defaults.max_age")),
            grace: raw
                .grace
                .as_ref()
                .and_then(|s| self.duration_accepting(s, "defaults.grace", Accepts::GRACE)),
            window: raw
                .window
                .as_ref()
                .and_then(|s| self.duration(s, "defaults.window")),
            timezone: raw
                .timezone
                .as_ref()
                .and_then(|s| self.timezone(s, "defaults.timezone")),
            retry: RetryPolicy::default(),
            aws,
            broken: false,
        };
        // Validated here once: a credential starts from the result, so an error in
        // [defaults] is reported once, at its own place.
        d.retry = self.retry(d.retry, raw.retry.as_ref(), "defaults");
        d.broken = self.errors.len() > before;
        d
    }

    fn alerts(&mut self, raw: Option<Spanned<AlertsConfig>>) -> AlertsConfig {
        let Some(alerts) = raw else {
            return AlertsConfig::default();
        };
        let span = alerts.span();
        let alerts = alerts.into_inner();
        if let Err(e) = alerts.validate() {
            self.error_at(Some(span), "alerts", e);
        }
        alerts
    }

    fn daemon(&mut self, raw: RawDaemon) -> DaemonSettings {
        let state = match &raw.state {
            None => StateUrl::Sqlite(PathBuf::from("/var/lib/keyrotd/state.db")),
            Some(s) => match s.get_ref().strip_prefix("sqlite:") {
                Some(p) if !p.is_empty() => {
                    let p = Path::new(p);
                    let base = self.file.parent().unwrap_or(Path::new("."));
                    StateUrl::Sqlite(if p.is_absolute() {
                        p.to_owned()
                    } else {
                        base.join(p)
                    })
                }
                _ => {
                    self.error_at(
                        Some(s.span()),
                        "daemon.state",
                        format!(
                            "`{}` is not a supported state URL (expected sqlite:PATH)",
                            s.get_ref()
                        ),
                    );
                    StateUrl::Sqlite(PathBuf::new())
                }
            },
        };
        let listen = match &raw.listen {
            None => SocketAddr::from(([127, 0, 0, 1], 9477)),
            Some(s) => s.get_ref().parse().unwrap_or_else(|_| {
                self.error_at(
                    Some(s.span()),
                    "daemon.listen",
                    format!("`{}` is not an address like 127.0.0.1:9477", s.get_ref()),
                );
                SocketAddr::from(([127, 0, 0, 1], 9477))
            }),
        };
        let max_concurrent_rotations = match &raw.max_concurrent_rotations {
            None => 4,
            Some(n) if (1..=1024).contains(n.get_ref()) => *n.get_ref() as usize,
            Some(n) => {
                self.error_at(
                    Some(n.span()),
                    "daemon.max_concurrent_rotations",
                    "must be between 1 and 1024",
                );
                1
            }
        };
        let shutdown_timeout = match &raw.shutdown_timeout {
            None => DEFAULT_SHUTDOWN_TIMEOUT,
            Some(value) => match self.duration(value, "daemon.shutdown_timeout") {
                Some(d) if d <= MAX_SHUTDOWN_TIMEOUT => d,
                Some(_) => {
                    self.error_at(
                        Some(value.span()),
                        "daemon.shutdown_timeout",
                        format!("must be at most {}", human(MAX_SHUTDOWN_TIMEOUT)),
                    );
                    DEFAULT_SHUTDOWN_TIMEOUT
                }
                None => DEFAULT_SHUTDOWN_TIMEOUT,
            },
        };
        DaemonSettings {
            state,
            listen,
            max_concurrent_rotations,
            shutdown_timeout,
        }
    }

    fn credential(
        &mut self,
        defaults: &Defaults,
        raw: RawCredential,
        index: usize,
    ) -> Option<CredentialSpec> {
        let id = raw.id.get_ref().clone();
        if !valid_id(&id) {
            self.error_at(
                Some(raw.id.span()),
                &format!("credential[{index}].id"),
                format!("`{id}` must be 1-128 characters of A-Z a-z 0-9 . _ -"),
            );
            return None;
        }
        let line = line_column(self.text, raw.id.span().start).0 + self.first_line - 1;
        if let Some(first_line) = self.seen.insert(id.clone(), line) {
            self.error_at(
                Some(raw.id.span()),
                &format!("credential[{index}].id"),
                format!("duplicate id `{id}` (first defined on line {first_line})"),
            );
            return None;
        }
        let field = format!("credential[{id}]");
        let errors_before = self.errors.len();
        let (rotator_span, mut rotator) = (raw.rotator.span(), raw.rotator.into_inner());
        rotator.inherit_aws(&defaults.aws);
        if let Err(e) = rotator.validate() {
            let (inner, message) = split_field(&e);
            self.error_at(
                Some(rotator_span.clone()),
                &format!("{field}.rotator{inner}"),
                message,
            );
        }
        let (store_span, mut store) = (raw.store.span(), raw.store.into_inner());
        store.inherit_aws(&defaults.aws);
        if let Err(e) = store.validate() {
            let (inner, message) = split_field(&e);
            self.error_at(Some(store_span), &format!("{field}.store{inner}"), message);
        }
        let timezone = match &raw.timezone {
            Some(tz) => self
                .timezone(tz, &format!("{field}.timezone"))
                .unwrap_or(Tz::UTC),
            None => defaults.timezone.unwrap_or(Tz::UTC),
        };
        let cron = raw.schedule.as_ref().and_then(|s| {
            let parsed = self
                .crons
                .entry((s.get_ref().clone(), timezone))
                .or_insert_with(|| CronSchedule::parse(s.get_ref(), timezone))
                .clone();
            parsed
                .map_err(|e| self.error_at(Some(s.span()), &format!("{field}.schedule"), e))
                .ok()
        });
        let every = match &raw.rotate_every {
            Some(s) => self.duration(s, &format!("{field}.rotate_every")),
            None => defaults.rotate_every,
        };
        let window = match &raw.window {
            Some(s) => self.duration(s, &format!("{field}.window")),
            None => defaults.window,
        };
        let has_schedule = raw.schedule.is_some() || raw.rotate_every.is_some();
        if !has_schedule && defaults.rotate_every.is_none() && !defaults.broken {
            self.error_at(
                Some(rotator_span.clone()),
                &field,
                "needs `schedule` (cron) or `rotate_every` (here or in [defaults])",
            );
        }
        let max_age = match &raw.max_age {
            Some(s) => self.duration(s, &format!("{field}.max_age")),
            None if defaults.max_age.is_none() && !defaults.broken => {
                self.error_at(
                    Some(rotator_span.clone()),
                    &format!("{field}.max_age"),
                    "is required (here or in [defaults])",
                );
                None
            }
            None => defaults.max_age,
        };
        let grace = match &raw.grace {
            Some(s) => self.duration_accepting(s, &format!("{field}.grace"), Accepts::GRACE),
            None => Some(defaults.grace.unwrap_or(Duration::from_secs(3600))),
        };
        let retry = self.retry(defaults.retry, raw.retry.as_ref(), &field);
        if self.errors.len() > errors_before || defaults.broken {
            return None;
        }
        let (max_age, grace) = (max_age?, grace?);
        let schedule = Schedule {
            cron,
            every,
            window,
        };
        let period = schedule.period();
        // Errors about values inherited from [defaults] point at the credential.
        let max_age_span = raw
            .max_age
            .as_ref()
            .map_or(rotator_span.clone(), |s| s.span());
        if max_age <= period {
            self.error_at(
                Some(max_age_span),
                &format!("{field}.max_age"),
                format!(
                    "{} is not longer than the rotation period ({}): the credential would go stale between rotations",
                    human(max_age),
                    human(period)
                ),
            );
            return None;
        }
        if grace >= period {
            let span = raw
                .grace
                .as_ref()
                .map_or(rotator_span.clone(), |s| s.span());
            self.error_at(
                Some(span),
                &format!("{field}.grace"),
                format!(
                    "{} must be shorter than the rotation period ({})",
                    human(grace),
                    human(period)
                ),
            );
            return None;
        }
        let place = line_column(self.text, rotator_span.start);
        Some(CredentialSpec {
            id,
            rotator,
            store,
            schedule,
            max_age,
            grace,
            retry,
            place: (place.0 + self.first_line - 1, place.1),
            period,
        })
    }

    /// `inherited` with the settings of `own` applied.
    fn retry(
        &mut self,
        inherited: RetryPolicy,
        own: Option<&RawRetry>,
        field: &str,
    ) -> RetryPolicy {
        let mut policy = inherited;
        if let Some(raw) = own {
            if let Some(n) = &raw.max_attempts {
                match u32::try_from(*n.get_ref()) {
                    Ok(n @ 1..=100) => policy.max_attempts = n,
                    _ => self.error_at(
                        Some(n.span()),
                        &format!("{field}.retry.max_attempts"),
                        "must be between 1 and 100",
                    ),
                }
            }
            if let Some(d) = raw
                .backoff
                .as_ref()
                .and_then(|s| self.duration(s, &format!("{field}.retry.backoff")))
            {
                policy.backoff = d;
            }
            if let Some(d) = raw
                .max_backoff
                .as_ref()
                .and_then(|s| self.duration(s, &format!("{field}.retry.max_backoff")))
            {
                policy.max_backoff = d;
            }
        }
        policy
    }
}

/// Splits a plugin's validation error, which starts with the field it is about
/// (`length: must be between 16 and 4096`), into `.length` and the rest.
fn split_field(message: &str) -> (String, &str) {
    match message.split_once(": ") {
        Some((field, rest))
            if !field.is_empty()
                && field.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b"_./".contains(&b)
                }) =>
        {
            (format!(".{field}"), rest)
        }
        _ => (String::new(), message),
    }
}

fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A duration in the form the config uses (`40d`, `1h30m`, `10s`, `500ms`).
pub fn human(d: Duration) -> String {
    if d == Duration::MAX {
        return "never".into();
    }
    if d.is_zero() {
        return "0s".into();
    }
    let mut secs = d.as_secs();
    let mut out = String::new();
    for (unit, size) in [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    // A grace period may keep a fraction of a second; show it rather than round it away.
    let nanos = d.subsec_nanos();
    match nanos {
        0 => {}
        n if n % 1_000_000 == 0 => out.push_str(&format!("{}ms", n / 1_000_000)),
        n if n % 1_000 == 0 => out.push_str(&format!("{}us", n / 1_000)),
        n => out.push_str(&format!("{n}ns")),
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
    fn semantic_errors_are_all_reported_with_their_places() {
        let bad = GOOD
            .replace("rotate_every = \"30d\"", "rotate_every = \"30 parsecs\"")
            .replace("0 3 * * 1", "0 3 * *")
            .replace("id = \"weekly\"", "id = \"api-token\"");
        let e = errors(&bad);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with("inv.toml:13:16: credential[api-token].rotate_every:"),
            "{}",
            e[0]
        );
        assert!(
            e[1].contains("credential[1].id: duplicate id `api-token` (first defined on line 10)"),
            "{}",
            e[1]
        );
    }

    #[test]
    fn max_age_must_exceed_the_rotation_period() {
        let e = errors(&GOOD.replace("max_age = \"8d\"", "max_age = \"7d\""));
        assert!(
            e[0].contains(
                "credential[weekly].max_age: 7d is not longer than the rotation period (7d)"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn every_duration_is_bounded_with_its_place_and_field() {
        // (replaced in GOOD, by, the place of the only error, its field and message). Fields of
        // the [alerts] table are matched by their last part only.
        let cases = [
            (
                "rotate_every = \"30d\"",
                "rotate_every = \"99999999999d\"",
                "inv.toml:13:16:", "credential[api-token].rotate_every: `99999999999d` is too long: at most 100y",
            ),
            (
                "rotate_every = \"30d\"",
                "rotate_every = \"300000y\"",
                "inv.toml:13:16:", "credential[api-token].rotate_every: `300000y` is too long: at most 100y",
            ),
            (
                "rotate_every = \"30d\"",
                "rotate_every = \"0s\"",
                "inv.toml:13:16:", "credential[api-token].rotate_every: must be longer than zero",
            ),
            (
                "rotate_every = \"30d\"",
                "rotate_every = \"1ns\"",
                "inv.toml:13:16:", "credential[api-token].rotate_every: `1ns` must be a whole number of seconds",
            ),
            (
                "max_age = \"40d\"",
                "max_age = \"300000y\"",
                "inv.toml:6:11:", "defaults.max_age: `300000y` is too long",
            ),
            (
                "max_age = \"8d\"",
                "max_age = \"8d500ms\"",
                "inv.toml:18:11:", "credential[weekly].max_age: `8d500ms` must be a whole number of seconds",
            ),
            (
                "grace = \"1h\"",
                "grace = \"101y\"",
                "inv.toml:7:9:", "defaults.grace: `101y` is too long",
            ),
            (
                "schedule = \"0 3 * * 1\"",
                "schedule = \"0 3 * * 1\"\nwindow = \"99999999999d\"",
                "inv.toml:18:10:", "credential[weekly].window: `99999999999d` is too long",
            ),
            (
                "grace = \"1h\"",
                "grace = \"1h\"\nretry = { backoff = \"1ns\" }",
                "inv.toml:8:21:", "defaults.retry.backoff: `1ns` must be a whole number of seconds",
            ),
            (
                "grace = \"1h\"",
                "grace = \"1h\"\nretry = { max_backoff = \"300000y\" }",
                "inv.toml:8:25:", "defaults.retry.max_backoff: `300000y` is too long",
            ),
            (
                "[defaults]",
                "[alerts]\nrepeat_interval = \"300000y\"\n\n[defaults]",
                "inv.toml:6:19:", "repeat_interval: `300000y` is too long",
            ),
            (
                "[defaults]",
                "[alerts]\nwarn_before = \"1500ms\"\n\n[defaults]",
                "inv.toml:6:15:", "warn_before: `1500ms` must be a whole number of seconds",
            ),
            (
                "[defaults]",
                "[alerts]\ndelivery_backoff = \"0s\"\n\n[defaults]",
                "inv.toml:6:20:", "delivery_backoff: must be longer than zero",
            ),
            (
                "[defaults]",
                "[alerts]\n[[alerts.channel]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"https://h.example\"\ntimeout = \"300000y\"\n\n[defaults]",
                // serde buffers a `kind`-tagged table, so the place is the [alerts] table's.
                "inv.toml:6:1:",
                "channel[0]: `300000y` is too long",
            ),
        ];
        for (from, to, place, want) in cases {
            let text = GOOD.replacen(from, to, 1);
            let e = errors(&text);
            assert_eq!(e.len(), 1, "{to}: {e:?}");
            assert!(
                e[0].starts_with(place) && e[0].contains(want),
                "{to}:\n{}\nwant {place} ... {want}",
                e[0]
            );
        }
        // A grace period keeps its precision: the engine rounds revocation times up.
        let inv = parse(
            Path::new("inv.toml"),
            &GOOD.replace("grace = \"1h\"", "grace = \"1ns\""),
        )
        .unwrap();
        assert_eq!(inv.credentials[0].grace, Duration::from_nanos(1));
        assert_eq!(human(Duration::from_millis(2500)), "2s500ms");
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
    fn sections_allow_sub_tables_tables_after_credentials_and_headers_in_strings() {
        let text = r#"
[[credential]]
id = "a"
rotate_every = "1d"
max_age = "2d"
[credential.rotator]
kind = "random"
[credential.store]
kind = "file"
path = "/tmp/x/a"

[defaults]
grace = "1h"

[[credential]]
id = "b"
rotator = { kind = "random" }
store = { kind = "file", path = "/tmp/x/b" }
rotate_every = "1d"
max_age = "2d"
"#;
        let inv = parse(Path::new("inv.toml"), text).unwrap();
        let ids: Vec<&str> = inv.credentials.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(inv.credentials[1].place, (17, 11));

        // A header inside a multi-line string does not start a section.
        let with_note = text.replace("id = \"b\"", "id = \"b\"\nnote = '''\n[[credential]]\n'''");
        let e = errors(&with_note);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("inv.toml:17:1: credential[b].note: unknown field"),
            "{}",
            e[0]
        );
        let late = text.replace(
            "rotate_every = \"1d\"\nmax_age = \"2d\"\n",
            "rotate_every = \"1d\"\nmax_age = \"2 fortnights\"\n",
        );
        let e = errors(&late);
        assert!(
            e.iter()
                .any(|e| e.starts_with("inv.toml:20:11: credential[b].max_age:")),
            "{e:?}"
        );
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
