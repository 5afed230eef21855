//! The validator: raw serde values into the validated types, with every problem recorded at its
//! file line, column and field (`file:line:col: field: message`). This file holds the
//! validator's state, its error plumbing and the `[daemon]`, `[defaults]` and `[alerts]`
//! tables; `credential.rs` validates one `[[credential]]`. Invariant: validation never stops at
//! the first problem and never panics.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono_tz::Tz;
use keyrotd_providers::{ProviderDefaults, VaultDefaults};
use toml::Spanned;

use super::alerts::AlertsConfig;
use super::raw::{RawDaemon, RawDefaults, RawRetry};
use super::{
    ConfigError, DaemonSettings, MetricsMode, RetryPolicy, StateUrl, DEFAULT_HISTORY_RETENTION,
    DEFAULT_SHUTDOWN_TIMEOUT,
};
use crate::fmt::human;
use crate::schedule::{parse_duration, Accepts, CronSchedule};

/// The longest accepted `daemon.shutdown_timeout`.
const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(600);

/// `[defaults]`, validated once where it is written.
pub(super) struct Defaults {
    pub(super) rotate_every: Option<Duration>,
    pub(super) max_age: Option<Duration>,
    pub(super) grace: Option<Duration>,
    pub(super) window: Option<Duration>,
    pub(super) timezone: Option<Tz>,
    pub(super) retry: RetryPolicy,
    /// The revoke policy (`revoke`, `max_revoke_delay`, ...).
    pub(super) revoke: super::revoke::RevokePolicy,
    /// The `[aws]` and `[vault]` tables.
    pub(super) providers: ProviderDefaults,
    /// Whether `[defaults]` had errors (reported already); credentials then stop quietly.
    pub(super) broken: bool,
    /// `[[defaults.hook]]`: the hooks of credentials that list none.
    pub(super) hooks: Vec<super::HookSpec>,
    /// `defaults.revoke_after_hook_failure`.
    pub(super) revoke_after_hook_failure: bool,
}

/// Validates one inventory: the head of the file, then each `[[credential]]` section in turn
/// (`text` and `first_line` say which), collecting every error.
pub(super) struct Validator<'a> {
    pub(super) file: &'a Path,
    /// The document being validated: the head of the file, or one section.
    pub(super) text: String,
    /// The file line a section's `text` starts on.
    pub(super) first_line: usize,
    /// While the head is validated: where its pieces start in `text` and their file lines (see
    /// [`super::sections::Head`]); empty for a section.
    pub(super) pieces: Vec<(usize, usize)>,
    pub(super) errors: Vec<ConfigError>,
    /// Credential ids seen so far, and the line each was defined on.
    pub(super) seen: HashMap<String, usize>,
    /// Each distinct (expression, timezone) parsed once: a parsed cron is kilobytes, and
    /// parsing computes its longest gap.
    pub(super) crons: HashMap<(String, Tz), Result<CronSchedule, String>>,
}

impl Validator<'_> {
    pub(super) fn error_at(
        &mut self,
        span: Option<std::ops::Range<usize>>,
        field: &str,
        message: impl Into<String>,
    ) {
        let (line, column) = span.map_or((0, 0), |span| self.place(span.start));
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// The file line and column of `offset` in the document being validated.
    pub(super) fn place(&self, offset: usize) -> (usize, usize) {
        let (start, first_line) =
            super::sections::piece_of(&self.pieces, offset).unwrap_or((0, self.first_line));
        let (line, column) = line_column(&self.text[start..], offset - start);
        (line + first_line - 1, column)
    }

    /// Deserializes `self.text`, recording the error with the field it is about. `first_index`
    /// is the position in the file of the text's first credential.
    pub(super) fn deserialize<T: serde::de::DeserializeOwned>(
        &mut self,
        first_index: usize,
    ) -> Option<T> {
        // The fast path tracks no field path (it costs an allocation per key); only a failure
        // is parsed again to find where it happened.
        if let Ok(raw) = toml::from_str(&self.text) {
            return Some(raw);
        }
        let text = self.text.clone();
        let text = text.as_str();
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
                let at = super::locate::locate(text, e.path(), e.inner(), first_index);
                self.error_at(at.span, &at.field, at.message);
                None
            }
        }
    }

    /// Parses a positive duration in whole seconds (see [`Accepts::SECONDS`]).
    pub(super) fn duration(&mut self, value: &Spanned<String>, field: &str) -> Option<Duration> {
        self.duration_accepting(value, field, Accepts::SECONDS)
    }

    /// Parses a duration within the bounds every duration respects, plus those of `accepts`.
    pub(super) fn duration_accepting(
        &mut self,
        value: &Spanned<String>,
        field: &str,
        accepts: Accepts,
    ) -> Option<Duration> {
        parse_duration(value.get_ref(), accepts)
            .map_err(|e| self.error_at(Some(value.span()), field, e))
            .ok()
    }

    pub(super) fn timezone(&mut self, value: &Spanned<String>, field: &str) -> Option<Tz> {
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

    pub(super) fn defaults(&mut self, raw: &RawDefaults, providers: ProviderDefaults) -> Defaults {
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
            revoke: self.revoke_defaults(raw),
            providers,
            broken: false,
            hooks: Vec::new(),
            revoke_after_hook_failure: raw
                .revoke_after_hook_failure
                .as_ref()
                .is_some_and(|b| *b.get_ref()),
        };
        d.hooks = self.hooks(raw.hook.as_deref().unwrap_or_default(), "defaults");
        // Validated here once: a credential starts from the result, so an error in
        // [defaults] is reported once, at its own place.
        d.retry = self.retry(d.retry, raw.retry.as_ref(), "defaults");
        d.broken = self.errors.len() > before;
        d
    }

    pub(super) fn alerts(&mut self, raw: Option<Spanned<AlertsConfig>>) -> AlertsConfig {
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

    /// The `[vault]` table, checked where it is written whether or not a credential uses it.
    /// The error is placed at the field it names (`vault.auth.role`), else at the table.
    pub(super) fn vault(&mut self, raw: Option<Spanned<VaultDefaults>>) -> VaultDefaults {
        let Some(vault) = raw else {
            return VaultDefaults::default();
        };
        let span = vault.span();
        let vault = vault.into_inner();
        if let Err(e) = vault.validate_fields() {
            let (field, message) = e.split_once(": ").unwrap_or(("vault", &e));
            let at = super::locate::key_span(&self.text, field).unwrap_or(span);
            self.error_at(Some(at), field, message);
        }
        vault
    }

    pub(super) fn daemon(&mut self, raw: RawDaemon) -> DaemonSettings {
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
        let history_retention = raw
            .history_retention
            .as_ref()
            .and_then(|v| self.duration(v, "daemon.history_retention"))
            .unwrap_or(DEFAULT_HISTORY_RETENTION);
        let base = self.file.parent().unwrap_or(Path::new(".")).to_owned();
        let audit_log = raw.audit_log.as_ref().map(|p| base.join(p.get_ref()));
        let metrics = match raw.metrics.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "full")) => MetricsMode::Full,
            Some((_, "compact")) => MetricsMode::Compact,
            Some((m, other)) => {
                self.error_at(
                    Some(m.span()),
                    "daemon.metrics",
                    format!("`{other}` is not a metrics mode (expected \"full\" or \"compact\")"),
                );
                MetricsMode::Full
            }
        };
        DaemonSettings {
            state,
            listen,
            max_concurrent_rotations,
            shutdown_timeout,
            history_retention,
            audit_log,
            metrics,
        }
    }

    /// `inherited` with the settings of `own` applied.
    pub(super) fn retry(
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

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use crate::config::parse;
    use crate::config::tests::{errors, GOOD};

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
    }
}
