//! Delivery hooks (`[[defaults.hook]]`, `[[credential.hook]]`): what tells consumers about a new
//! credential, validated into [`HookSpec`]s. A credential's own list replaces the default one.
//!
//! Invariant: a spec that passes runs without a shell, at an absolute path, on a valid unit name,
//! with an allowed signal, at an absolute pid file, or at a URL that follows the `http` rotator's
//! rules (HTTPS except to loopback); nothing in it is a secret value (headers that carry one are
//! secret references, read at run time).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use keyrotd_plugin::reference::SecretRef;
use toml::Spanned;

use super::raw::RawHook;
use super::validate::Validator;
use super::RetryPolicy;
use crate::fmt::human;

/// The default `timeout` of a hook.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest accepted hook `timeout`.
const MAX_HOOK_TIMEOUT: Duration = Duration::from_secs(3600);
/// The longest accepted `retry.max_backoff` of a hook: the engine waits between a hook's attempts
/// in the rotation's run, under its lease.
const MAX_HOOK_BACKOFF: Duration = Duration::from_secs(120);
/// The default `systemctl`.
const SYSTEMCTL: &str = "/usr/bin/systemctl";
/// Signals a hook may send: those consumers use to reload or re-read, never KILL or STOP.
pub const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("TERM", libc::SIGTERM),
    ("WINCH", libc::SIGWINCH),
];
/// Unit types `systemctl reload|restart` applies to.
const UNIT_SUFFIXES: &[&str] = &[
    ".service", ".socket", ".target", ".mount", ".path", ".timer",
];

/// When a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookWhen {
    /// After `stage ok`: the new value is pending beside the current one (for consumers that
    /// accept two values). A failure rolls the rotation back.
    Stage,
    /// After `promote ok` (the default): the new value is current. The revoke waits for it.
    Promote,
}

impl HookWhen {
    /// The configured and journaled name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stage => "stage",
            Self::Promote => "promote",
        }
    }
}

/// One validated hook.
#[derive(Debug, Clone, PartialEq)]
pub struct HookSpec {
    /// When it runs.
    pub when: HookWhen,
    /// What it does.
    pub action: HookAction,
    /// The longest one attempt may take (the process group is killed then).
    pub timeout: Duration,
    /// Attempts in one run and the backoff between them.
    pub retry: RetryPolicy,
}

/// What a hook does.
#[derive(Debug, Clone, PartialEq)]
pub enum HookAction {
    /// Runs `command` (absolute path, then arguments; no shell) with only `env`, the ids and the
    /// new credential's public attributes in its environment.
    Exec {
        /// The program and its arguments.
        command: Vec<String>,
        /// Extra environment variables.
        env: BTreeMap<String, String>,
    },
    /// `systemctl reload|restart UNIT`.
    Systemd {
        /// The unit.
        unit: String,
        /// `reload` or `restart`.
        action: &'static str,
        /// The `systemctl` binary (absolute).
        systemctl: PathBuf,
    },
    /// Sends `signal` to the process whose pid `pid_file` holds.
    Signal {
        /// The pid file (absolute; never followed through a symlink).
        pid_file: PathBuf,
        /// The signal's name without `SIG`.
        name: &'static str,
        /// The signal's number.
        number: i32,
    },
    /// An HTTP request; success is a 2xx answer.
    Http {
        /// The method.
        method: String,
        /// The URL (HTTPS unless loopback).
        url: String,
        /// Headers with literal values.
        headers: BTreeMap<String, String>,
        /// Headers whose values are secret references.
        secret_headers: BTreeMap<String, SecretRef>,
    },
}

impl HookAction {
    /// The kind's name, for the journal and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Exec { .. } => "exec",
            Self::Systemd { .. } => "systemd",
            Self::Signal { .. } => "signal",
            Self::Http { .. } => "http",
        }
    }
}

/// The retry policy of a hook that sets none: three attempts, 5 s then 10 s apart.
pub fn default_hook_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        backoff: Duration::from_secs(5),
        max_backoff: Duration::from_secs(60),
    }
}

/// Whether `unit` is a unit name `systemctl reload|restart` may be given: 1-255 characters of
/// `A-Z a-z 0-9 : _ . \ @ -`, not starting with `-` or `.`, no `..`, an instance after any `@`,
/// and a known suffix.
pub fn valid_unit_name(unit: &str) -> bool {
    let Some(suffix) = UNIT_SUFFIXES.iter().find(|s| unit.ends_with(*s)) else {
        return false;
    };
    let stem = &unit[..unit.len() - suffix.len()];
    (1..=255).contains(&unit.len())
        && !stem.is_empty()
        && !stem.ends_with('@')
        && !unit.starts_with(['-', '.'])
        && !unit.contains("..")
        && unit
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":_.\\@-".contains(&b))
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.starts_with("KEYROTD_")
}

impl Validator<'_> {
    /// Validates a list of hooks; `field` is `defaults` or `credential[ID]`.
    pub(super) fn hooks(&mut self, raw: &[RawHook], field: &str) -> Vec<HookSpec> {
        raw.iter()
            .enumerate()
            .filter_map(|(i, hook)| self.hook(hook, &format!("{field}.hook[{i}]")))
            .collect()
    }

    fn hook(&mut self, raw: &RawHook, field: &str) -> Option<HookSpec> {
        let before = self.errors.len();
        let when = match raw.when.as_ref().map(|w| (w, w.get_ref().as_str())) {
            None | Some((_, "promote")) => HookWhen::Promote,
            Some((_, "stage")) => HookWhen::Stage,
            Some((w, other)) => {
                let message =
                    format!("`{other}` is not a hook time (expected \"promote\" or \"stage\")");
                self.error_at(Some(w.span()), &format!("{field}.when"), message);
                HookWhen::Promote
            }
        };
        let timeout = match &raw.timeout {
            None => DEFAULT_HOOK_TIMEOUT,
            Some(t) => match self.duration(t, &format!("{field}.timeout")) {
                Some(d) if d <= MAX_HOOK_TIMEOUT => d,
                Some(_) => {
                    let message = format!("must be at most {}", human(MAX_HOOK_TIMEOUT));
                    self.error_at(Some(t.span()), &format!("{field}.timeout"), message);
                    DEFAULT_HOOK_TIMEOUT
                }
                None => DEFAULT_HOOK_TIMEOUT,
            },
        };
        let retry = self.retry(default_hook_retry(), raw.retry.as_ref(), field);
        if retry.max_attempts > 10 || retry.max_backoff > MAX_HOOK_BACKOFF {
            let span = raw.kind.span();
            let message = format!(
                "a hook's retry allows at most 10 attempts and a max_backoff of {} (the engine waits between them in the rotation's run)",
                human(MAX_HOOK_BACKOFF)
            );
            self.error_at(Some(span), &format!("{field}.retry"), message);
        }
        let kind = raw.kind.get_ref().as_str();
        let used: &[&str] = match kind {
            "exec" => &["command", "env"],
            "systemd" => &["unit", "action", "systemctl"],
            "signal" => &["pid_file", "signal"],
            "http" => &["method", "url", "headers", "secret_headers"],
            other => {
                let message = format!(
                    "`{other}` is not a hook kind (expected \"exec\", \"systemd\", \"signal\" or \"http\")"
                );
                self.error_at(Some(raw.kind.span()), &format!("{field}.kind"), message);
                return None;
            }
        };
        for (name, span) in present(raw) {
            if !used.contains(&name) {
                let message = format!("is not a field of a `{kind}` hook");
                self.error_at(Some(span), &format!("{field}.{name}"), message);
            }
        }
        let action = match kind {
            "exec" => self.exec(raw, field),
            "systemd" => self.systemd(raw, field),
            "signal" => self.signal(raw, field),
            _ => self.http(raw, field),
        };
        if self.errors.len() > before {
            return None;
        }
        Some(HookSpec {
            when,
            action: action?,
            timeout,
            retry,
        })
    }

    fn required<'r, T>(
        &mut self,
        value: &'r Option<Spanned<T>>,
        raw: &RawHook,
        field: &str,
    ) -> Option<&'r Spanned<T>> {
        if value.is_none() {
            let kind = raw.kind.get_ref();
            self.error_at(
                Some(raw.kind.span()),
                field,
                format!("is required by a `{kind}` hook"),
            );
        }
        value.as_ref()
    }

    fn absolute(&mut self, value: &Spanned<String>, field: &str) -> Option<PathBuf> {
        let path = PathBuf::from(value.get_ref());
        if path.is_absolute() && !value.get_ref().split('/').any(|c| c == "..") {
            return Some(path);
        }
        let message = format!(
            "`{}` must be an absolute path without `..`",
            value.get_ref()
        );
        self.error_at(Some(value.span()), field, message);
        None
    }

    fn exec(&mut self, raw: &RawHook, field: &str) -> Option<HookAction> {
        let command = self.required(&raw.command, raw, &format!("{field}.command"))?;
        let program = command.get_ref().first().cloned().unwrap_or_default();
        let program = Spanned::new(command.span(), program);
        self.absolute(&program, &format!("{field}.command"))?;
        let env = raw
            .env
            .as_ref()
            .map(|e| e.get_ref().clone())
            .unwrap_or_default();
        if let Some(bad) = env.keys().find(|k| !valid_env_name(k)) {
            let span = raw.env.as_ref().map(Spanned::span);
            let message = format!(
                "`{bad}` is not a variable name (A-Z a-z 0-9 _, not starting with a digit or KEYROTD_)"
            );
            self.error_at(span, &format!("{field}.env"), message);
            return None;
        }
        Some(HookAction::Exec {
            command: command.get_ref().clone(),
            env,
        })
    }

    fn systemd(&mut self, raw: &RawHook, field: &str) -> Option<HookAction> {
        let unit = self.required(&raw.unit, raw, &format!("{field}.unit"))?;
        if !valid_unit_name(unit.get_ref()) {
            let message = format!(
                "`{}` is not a unit name (A-Z a-z 0-9 : _ . \\ @ -, no `..`, ending in one of {})",
                unit.get_ref(),
                UNIT_SUFFIXES.join(" ")
            );
            self.error_at(Some(unit.span()), &format!("{field}.unit"), message);
            return None;
        }
        let action = match raw.action.as_ref().map(|a| (a, a.get_ref().as_str())) {
            None | Some((_, "reload")) => "reload",
            Some((_, "restart")) => "restart",
            Some((a, other)) => {
                let message = format!(
                    "`{other}` is not a systemd action (expected \"reload\" or \"restart\")"
                );
                self.error_at(Some(a.span()), &format!("{field}.action"), message);
                return None;
            }
        };
        let systemctl = match &raw.systemctl {
            None => PathBuf::from(SYSTEMCTL),
            Some(s) => self.absolute(s, &format!("{field}.systemctl"))?,
        };
        Some(HookAction::Systemd {
            unit: unit.get_ref().clone(),
            action,
            systemctl,
        })
    }

    fn signal(&mut self, raw: &RawHook, field: &str) -> Option<HookAction> {
        let pid_file = self.required(&raw.pid_file, raw, &format!("{field}.pid_file"))?;
        let pid_file = self.absolute(pid_file, &format!("{field}.pid_file"))?;
        let signal = self.required(&raw.signal, raw, &format!("{field}.signal"))?;
        let wanted = signal.get_ref().to_ascii_uppercase();
        let wanted = wanted.strip_prefix("SIG").unwrap_or(&wanted);
        let Some(&(name, number)) = SIGNALS.iter().find(|(n, _)| *n == wanted) else {
            let names: Vec<_> = SIGNALS.iter().map(|(n, _)| *n).collect();
            let message = format!(
                "`{}` is not an allowed signal (one of {})",
                signal.get_ref(),
                names.join(" ")
            );
            self.error_at(Some(signal.span()), &format!("{field}.signal"), message);
            return None;
        };
        Some(HookAction::Signal {
            pid_file,
            name,
            number,
        })
    }

    fn http(&mut self, raw: &RawHook, field: &str) -> Option<HookAction> {
        let url = self.required(&raw.url, raw, &format!("{field}.url"))?;
        if let Err(e) = check_url(&format!("{field}.url"), url.get_ref()) {
            let message = e.split_once(": ").map_or(e.as_str(), |(_, m)| m).to_owned();
            self.error_at(Some(url.span()), &format!("{field}.url"), message);
            return None;
        }
        let method = raw
            .method
            .as_ref()
            .map_or("POST".to_owned(), |m| m.get_ref().to_ascii_uppercase());
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            let span = raw.method.as_ref().map(Spanned::span);
            self.error_at(
                span,
                &format!("{field}.method"),
                format!("`{method}` is not an HTTP method"),
            );
            return None;
        }
        let headers = raw
            .headers
            .as_ref()
            .map(|h| h.get_ref().clone())
            .unwrap_or_default();
        let mut secret_headers = BTreeMap::new();
        for (name, reference) in raw.secret_headers.iter().flat_map(|h| h.get_ref()) {
            match reference.parse::<SecretRef>() {
                Ok(r) => {
                    secret_headers.insert(name.clone(), r);
                }
                Err(e) => {
                    let span = raw.secret_headers.as_ref().map(Spanned::span);
                    self.error_at(
                        span,
                        &format!("{field}.secret_headers.{name}"),
                        e.to_string(),
                    );
                    return None;
                }
            }
        }
        let names = headers.keys().chain(secret_headers.keys());
        if let Some(bad) = names
            .into_iter()
            .find(|n| reqwest::header::HeaderName::from_bytes(n.as_bytes()).is_err())
        {
            let span = raw
                .headers
                .as_ref()
                .or(raw.secret_headers.as_ref())
                .map(Spanned::span);
            self.error_at(
                span,
                &format!("{field}.headers"),
                format!("`{bad}` is not a header name"),
            );
            return None;
        }
        Some(HookAction::Http {
            method,
            url: url.get_ref().clone(),
            headers,
            secret_headers,
        })
    }
}

/// The `http` rotator's URL rule: absolute, HTTPS unless the host is loopback.
#[cfg(feature = "http")]
fn check_url(field: &str, url: &str) -> Result<(), String> {
    keyrotd_providers::http::check_fixed_url(field, url)
}

#[cfg(not(feature = "http"))]
fn check_url(field: &str, _url: &str) -> Result<(), String> {
    Err(format!(
        "{field}: http hooks need keyrotd built with the `http` feature"
    ))
}

/// The fields a raw hook sets, with their places.
fn present(raw: &RawHook) -> Vec<(&'static str, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    let mut add = |name, span: Option<std::ops::Range<usize>>| out.extend(span.map(|s| (name, s)));
    add("command", raw.command.as_ref().map(Spanned::span));
    add("env", raw.env.as_ref().map(Spanned::span));
    add("unit", raw.unit.as_ref().map(Spanned::span));
    add("action", raw.action.as_ref().map(Spanned::span));
    add("systemctl", raw.systemctl.as_ref().map(Spanned::span));
    add("pid_file", raw.pid_file.as_ref().map(Spanned::span));
    add("signal", raw.signal.as_ref().map(Spanned::span));
    add("method", raw.method.as_ref().map(Spanned::span));
    add("url", raw.url.as_ref().map(Spanned::span));
    add("headers", raw.headers.as_ref().map(Spanned::span));
    add(
        "secret_headers",
        raw.secret_headers.as_ref().map(Spanned::span),
    );
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse;
    use crate::config::tests::{errors, GOOD};

    #[test]
    fn unit_names_need_a_suffix_and_safe_characters() {
        for good in [
            "nginx.service",
            "getty@tty1.service",
            "a-b_c:d.socket",
            "x\\x2d.mount",
        ] {
            assert!(valid_unit_name(good), "{good}");
        }
        let long = format!("{}.service", "a".repeat(250));
        for bad in [
            "nginx",
            ".service",
            "-x.service",
            "../x.service",
            "a/b.service",
            "a..b.service",
            "x@.service",
            "x y.service",
            "x.device",
            "x.service\n",
            &long,
            "",
        ] {
            assert!(!valid_unit_name(bad), "{bad}");
        }
    }

    #[test]
    fn defaults_hooks_are_inherited_and_a_credential_list_replaces_them() {
        let text = GOOD.replace(
            "[defaults]",
            "[[defaults.hook]]\nkind = \"signal\"\npid_file = \"/run/a.pid\"\nsignal = \"sighup\"\n\n[defaults]\nrevoke_after_hook_failure = true",
        )
        .replace(
            "rotate_every = \"30d\"",
            "rotate_every = \"30d\"\nhook = []\nrevoke_after_hook_failure = false",
        )
;
        // The last credential's own list.
        let text = format!(
            "{text}[[credential.hook]]\nkind = \"exec\"\nwhen = \"stage\"\ncommand = [\"/bin/true\", \"x\"]\n"
        );
        let inv = parse(Path::new("inv.toml"), &text).unwrap();
        let (api, weekly) = (&inv.credentials[0], &inv.credentials[1]);
        assert!(api.hooks.is_empty() && !api.revoke_after_hook_failure);
        assert!(weekly.revoke_after_hook_failure, "inherited");
        assert_eq!(
            weekly.hooks.len(),
            1,
            "its own list replaces the default one"
        );
        assert_eq!(weekly.hooks[0].when, HookWhen::Stage);
        assert_eq!(weekly.hooks[0].timeout, DEFAULT_HOOK_TIMEOUT);
        assert_eq!(weekly.hooks[0].retry, default_hook_retry());
        let only_defaults = GOOD.replace(
            "[defaults]",
            "[[defaults.hook]]\nkind = \"signal\"\npid_file = \"/run/a.pid\"\nsignal = \"sighup\"\n\n[defaults]",
        );
        let inv = parse(Path::new("inv.toml"), &only_defaults).unwrap();
        for c in &inv.credentials {
            assert_eq!(
                c.hooks[0].action,
                HookAction::Signal {
                    pid_file: "/run/a.pid".into(),
                    name: "HUP",
                    number: libc::SIGHUP
                }
            );
        }
    }

    #[test]
    fn a_missing_field_is_named_at_the_hook() {
        let e = errors(&format!("{GOOD}[[credential.hook]]\nkind = \"systemd\"\n"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("inv.toml:22:8: credential[weekly].hook[0].unit: is required"),
            "{e:?}"
        );
    }
}
