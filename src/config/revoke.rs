//! The revoke policy of a credential: revoke the old credential once the grace period ends
//! (`revoke = "after_grace"`, the default), or only once its provider says nobody uses it any
//! more (`"when_unused"`), checked every `revoke_check_every`, for at most `max_revoke_delay`
//! past the grace period, after which `on_max_revoke_delay` says what happens. Each field is
//! inherited from `[defaults]`.
//!
//! Invariant: `when_unused` is accepted only for a rotator that can check use as configured
//! (IAM keys, PostgreSQL `alternating`, `http` with a `last_used` request); otherwise the error
//! names the credential's file, line and field.

use std::time::Duration;

use keyrotd_providers::RotatorConfig;
use toml::Spanned;

use super::raw::RawDefaults;
use super::validate::Validator;
use crate::schedule::Accepts;

/// When the old credential of a promoted rotation is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeWhen {
    /// Once the grace period has passed, whether or not it is still used (the default).
    AfterGrace,
    /// Once the grace period has passed *and* the rotator says it is no longer used.
    WhenUnused,
}

/// What happens when `max_revoke_delay` passes and the old credential is still in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMaxRevokeDelay {
    /// Raise the `revoke_delayed` alert and keep waiting (the default): revoking a credential in
    /// use would cut a consumer off, which an operator should decide.
    Alert,
    /// Raise the alert and revoke anyway.
    Revoke,
}

/// A credential's revoke policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevokePolicy {
    /// `revoke`: after the grace period, or when unused.
    pub when: RevokeWhen,
    /// `max_revoke_delay`: how long past the grace period `when_unused` waits before
    /// `on_max_revoke_delay` applies.
    pub max_delay: Duration,
    /// `on_max_revoke_delay`.
    pub on_max_delay: OnMaxRevokeDelay,
    /// `revoke_check_every`: how often a credential in use is asked again.
    pub check_every: Duration,
    /// `revoke_min_quiet`: how long the old credential must have gone unused (since its last
    /// known use, and at least since the promotion) before an "unused" answer is believed; covers
    /// a provider that records uses late, as AWS does.
    pub min_quiet: Duration,
}

impl RevokePolicy {
    /// When `max_revoke_delay` passes for a rotation promoted at `promoted` (Unix seconds) with
    /// `grace`: the end of the grace period (a fraction of a second rounds up, as `revoke_at`
    /// does) plus the delay.
    pub fn deadline(&self, promoted: i64, grace: Duration) -> i64 {
        promoted
            .saturating_add(crate::schedule::secs(grace))
            .saturating_add(i64::from(grace.subsec_nanos() > 0))
            .saturating_add(crate::schedule::secs(self.max_delay))
    }
}

impl Default for RevokePolicy {
    fn default() -> Self {
        Self {
            when: RevokeWhen::AfterGrace,
            max_delay: Duration::from_secs(86_400),
            on_max_delay: OnMaxRevokeDelay::Alert,
            check_every: Duration::from_secs(60),
            min_quiet: Duration::ZERO,
        }
    }
}

/// A credential's `revoke`, `max_revoke_delay`, `on_max_revoke_delay`, `revoke_check_every` and
/// `revoke_min_quiet`, in this order.
pub(super) type RawFields<'a> = [Option<&'a Spanned<String>>; 5];

/// The revoke fields of `[defaults]` or of one credential.
struct Fields<'a> {
    revoke: Option<&'a Spanned<String>>,
    max_delay: Option<&'a Spanned<String>>,
    on_max_delay: Option<&'a Spanned<String>>,
    check_every: Option<&'a Spanned<String>>,
    min_quiet: Option<&'a Spanned<String>>,
}

impl Validator<'_> {
    /// `[defaults]`' revoke fields over the built-in defaults.
    pub(super) fn revoke_defaults(&mut self, raw: &RawDefaults) -> RevokePolicy {
        let fields = Fields {
            revoke: raw.revoke.as_ref(),
            max_delay: raw.max_revoke_delay.as_ref(),
            on_max_delay: raw.on_max_revoke_delay.as_ref(),
            check_every: raw.revoke_check_every.as_ref(),
            min_quiet: raw.revoke_min_quiet.as_ref(),
        };
        self.revoke_fields(RevokePolicy::default(), &fields, "defaults")
    }

    /// One credential's revoke policy over `inherited`; `None` (reported) when it asks for
    /// `when_unused` from a rotator that cannot check use.
    pub(super) fn revoke_policy(
        &mut self,
        inherited: RevokePolicy,
        raw: RawFields<'_>,
        rotator: &RotatorConfig,
        rotator_span: std::ops::Range<usize>,
        field: &str,
    ) -> Option<RevokePolicy> {
        let [revoke, max_delay, on_max_delay, check_every, min_quiet] = raw;
        let fields = Fields {
            revoke,
            max_delay,
            on_max_delay,
            check_every,
            min_quiet,
        };
        let policy = self.revoke_fields(inherited, &fields, field);
        if policy.when == RevokeWhen::WhenUnused && !rotator.checks_use() {
            // Inherited from [defaults]: the error points at the credential.
            let span = fields.revoke.map_or(rotator_span, |s| s.span());
            self.error_at(
                Some(span),
                &format!("{field}.revoke"),
                format!(
                    "\"when_unused\" needs a rotator that can tell whether the old credential is \
                     in use, and `{}` as configured cannot (IAM keys, PostgreSQL `alternating` \
                     and `http` with a `last_used` request can); use \"after_grace\"",
                    rotator.kind()
                ),
            );
            return None;
        }
        Some(policy)
    }

    fn revoke_fields(&mut self, mut p: RevokePolicy, f: &Fields<'_>, field: &str) -> RevokePolicy {
        if let Some(s) = f.revoke {
            match s.get_ref().as_str() {
                "after_grace" => p.when = RevokeWhen::AfterGrace,
                "when_unused" => p.when = RevokeWhen::WhenUnused,
                other => self.error_at(
                    Some(s.span()),
                    &format!("{field}.revoke"),
                    format!("`{other}` is not one of \"after_grace\", \"when_unused\""),
                ),
            }
        }
        if let Some(s) = f.on_max_delay {
            match s.get_ref().as_str() {
                "alert" => p.on_max_delay = OnMaxRevokeDelay::Alert,
                "revoke" => p.on_max_delay = OnMaxRevokeDelay::Revoke,
                other => self.error_at(
                    Some(s.span()),
                    &format!("{field}.on_max_revoke_delay"),
                    format!("`{other}` is not one of \"alert\", \"revoke\""),
                ),
            }
        }
        let mut duration = |value: Option<&Spanned<String>>, name: &str, accepts, into: &mut _| {
            if let Some(s) = value {
                if let Some(d) = self.duration_accepting(s, &format!("{field}.{name}"), accepts) {
                    *into = d;
                }
            }
        };
        duration(
            f.max_delay,
            "max_revoke_delay",
            Accepts::SECONDS,
            &mut p.max_delay,
        );
        duration(
            f.check_every,
            "revoke_check_every",
            Accepts::SECONDS,
            &mut p.check_every,
        );
        duration(
            f.min_quiet,
            "revoke_min_quiet",
            Accepts::SECONDS_OR_ZERO,
            &mut p.min_quiet,
        );
        p
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{errors, GOOD};

    fn with(fields: &str) -> String {
        GOOD.replace("[defaults]\n", &format!("[defaults]\n{fields}\n"))
    }

    #[test]
    fn durations_are_bounded_and_names_checked() {
        for (fields, expected) in [
            (
                "max_revoke_delay = \"0s\"",
                "defaults.max_revoke_delay: must be longer than zero",
            ),
            (
                "max_revoke_delay = \"1500ms\"",
                "defaults.max_revoke_delay: `1500ms` must be a whole number",
            ),
            (
                "max_revoke_delay = \"999999y\"",
                "defaults.max_revoke_delay: `999999y` is too long",
            ),
            (
                "revoke_check_every = \"0s\"",
                "defaults.revoke_check_every: must be longer than zero",
            ),
            ("revoke_min_quiet = \"0.5s\"", "defaults.revoke_min_quiet:"),
            (
                "revoke = \"never\"",
                "defaults.revoke: `never` is not one of",
            ),
            (
                "on_max_revoke_delay = \"panic\"",
                "defaults.on_max_revoke_delay: `panic` is not one of",
            ),
        ] {
            let e = errors(&with(fields));
            assert!(e.iter().any(|e| e.contains(expected)), "{fields}: {e:?}");
        }
    }

    #[test]
    fn when_unused_on_a_rotator_that_cannot_check_names_the_credential() {
        // GOOD's credentials use the `random` rotator, which cannot check use.
        let e = errors(&with("revoke = \"when_unused\""));
        assert!(!e.is_empty());
        assert!(
            e.iter()
                .all(|e| e.contains(".revoke: \"when_unused\" needs a rotator")),
            "{e:?}"
        );
        assert!(e[0].starts_with("inv.toml:"), "{e:?}");
    }
}
