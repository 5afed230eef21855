//! Validation of one `[[credential]]` into a [`CredentialSpec`]: its id, plugins, schedule,
//! ages and retry policy, with `[defaults]` applied. Invariant: a credential with any error
//! yields no spec, and errors about inherited values point at the credential.

use std::time::Duration;

use chrono_tz::Tz;

use super::raw::RawCredential;
use super::validate::{Defaults, Validator};
use super::CredentialSpec;
use crate::fmt::human;
use crate::schedule::{Accepts, CronSchedule, Schedule};

impl Validator<'_> {
    pub(super) fn credential(
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
        let line = self.place(raw.id.span().start).0;
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
        rotator.inherit(&defaults.providers);
        if let Err(e) = rotator.validate() {
            let (inner, message) = split_field(&e);
            self.error_at(
                Some(rotator_span.clone()),
                &format!("{field}.rotator{inner}"),
                message,
            );
        }
        let (store_span, mut store) = (raw.store.span(), raw.store.into_inner());
        store.inherit(&defaults.providers);
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
        let revoke_fields = [
            raw.revoke.as_ref(),
            raw.max_revoke_delay.as_ref(),
            raw.on_max_revoke_delay.as_ref(),
            raw.revoke_check_every.as_ref(),
            raw.revoke_min_quiet.as_ref(),
        ];
        let revoke = self.revoke_policy(
            defaults.revoke,
            revoke_fields,
            &rotator,
            rotator_span.clone(),
            &field,
        );
        // A credential's own list replaces the default one (an empty list: no hooks).
        let hooks = match raw.hook.as_deref() {
            Some(own) => self.hooks(own, &field),
            None => defaults.hooks.clone(),
        };
        let revoke_after_hook_failure = raw
            .revoke_after_hook_failure
            .as_ref()
            .map_or(defaults.revoke_after_hook_failure, |b| *b.get_ref());
        if self.errors.len() > errors_before || defaults.broken {
            return None;
        }
        let (max_age, grace, revoke) = (max_age?, grace?, revoke?);
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
        let place = self.place(rotator_span.start);
        Some(CredentialSpec {
            id,
            rotator,
            store,
            schedule,
            max_age,
            grace,
            retry,
            place,
            period,
            revoke,
            hooks,
            revoke_after_hook_failure,
        })
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

/// Whether `id` is a valid credential id: 1-128 characters of A-Z a-z 0-9 . _ -
pub(super) fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{errors, GOOD};

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
}
