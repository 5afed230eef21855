//! Names the field a failed inventory deserialization really failed on.
//!
//! serde reports where it was when it failed, in its own terms: a credential by its position
//! (`credential[0]`), `toml::Spanned`'s private wrapper field, and, for a `kind`-tagged rotator or
//! store, the whole table, because serde buffers an internally tagged enum before it reads the
//! variant and loses the path inside it. This module turns that into what the operator wrote:
//! `credential[db].rotator.length`, at the value's own line and column. It runs only after a
//! failure, so loading a good inventory pays nothing for it.

use std::ops::Range;

use keyrotd_providers::{RotatorConfig, StoreConfig};
use serde_path_to_error::Segment;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

/// Where an error is and what it says.
pub(super) struct Located {
    /// The field's path, like `credential[db].rotator.length`.
    pub field: String,
    /// Byte range in the text that was deserialized.
    pub span: Option<Range<usize>>,
    /// What is wrong.
    pub message: String,
}

/// Locates the error of a failed deserialization of `text` at `path`. `first_index` is the
/// position in the file of the text's first credential (a lone `[[credential]]` section is
/// deserialized on its own, as `credential[0]`).
pub(super) fn locate(
    text: &str,
    path: &serde_path_to_error::Path,
    error: &toml::de::Error,
    first_index: usize,
) -> Located {
    // `$__serde_spanned_private_value` and its kin are serde plumbing, not fields.
    let segments: Vec<&Segment> = path
        .iter()
        .filter(|s| match s {
            Segment::Map { key } => !key.starts_with("$__"),
            Segment::Unknown => false,
            _ => true,
        })
        .collect();
    let mut located = Located {
        field: render(&segments),
        span: error.span(),
        message: error.message().trim().to_owned(),
    };
    if let [Segment::Map { key }, Segment::Seq { index }, rest @ ..] = &segments[..] {
        if key == "credential" {
            let doc = DeTable::parse(text).ok();
            let credential = doc
                .as_ref()
                .and_then(|d| nth_credential(d.get_ref(), *index));
            let label = match credential
                .and_then(|c| string(c, "id"))
                .filter(|id| super::credential::valid_id(id))
            {
                Some(id) => format!("credential[{id}]"),
                None => format!("credential[{}]", first_index + index),
            };
            located.field = join(&label, &render(rest));
            // A failure inside a plugin table, or at its `kind` (serde names the tag when the
            // kind is unknown: check_fields then says whether it was left out of the build).
            let plugin = match rest {
                [Segment::Map { key }] => Some(key),
                [Segment::Map { key }, Segment::Map { key: tag }] if tag == "kind" => Some(key),
                _ => None,
            };
            if let (Some(credential), Some(key)) = (credential, plugin) {
                if let Some(inner) = locate_in_variant(credential, key) {
                    located = Located {
                        field: join(&join(&label, key), &inner.field),
                        ..inner
                    };
                }
            }
        }
    }
    // serde reports a missing or unknown field at the table that lacks or has it.
    for prefix in ["missing field `", "unknown field `"] {
        let named = located
            .message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name.to_owned());
        if let Some(name) = named {
            if !located.field.ends_with(&format!(".{name}")) {
                located.field = join(&located.field, &name);
            }
        }
    }
    if located.field.is_empty() {
        located.field = "(document)".into();
    }
    located
}

/// Deserializes the `rotator` or `store` table of `credential` again, as its kind's own
/// struct under a path-tracking deserializer, to find the field inside it that failed.
fn locate_in_variant(credential: &DeTable<'_>, which: &str) -> Option<Located> {
    let value = get(credential, which)?;
    let DeValue::Table(table) = value.get_ref() else {
        return None;
    };
    let kind = string(table, "kind")?;
    let mut fields = DeTable::new();
    for (k, v) in table.iter().filter(|(k, _)| k.get_ref() != "kind") {
        fields.insert(k.clone(), v.clone());
    }
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(
        ValueDeserializer::from(Spanned::new(value.span(), DeValue::Table(fields))),
        &mut track,
    );
    let result = match which {
        "rotator" => RotatorConfig::check_fields(kind, de),
        "store" => StoreConfig::check_fields(kind, de),
        _ => return None,
    };
    let error = result.err()?;
    let path = track.path();
    let segments: Vec<&Segment> = path.iter().collect();
    let field = match render(&segments) {
        // Only the kind itself is checked at the table's top level.
        top if top.is_empty() && error.message().starts_with("unknown variant") => "kind".into(),
        field => field,
    };
    Some(Located {
        field,
        span: error.span().or_else(|| Some(value.span())),
        message: error.message().trim().to_owned(),
    })
}

fn nth_credential<'a>(doc: &'a DeTable<'a>, index: usize) -> Option<&'a DeTable<'a>> {
    let DeValue::Array(array) = get(doc, "credential")?.get_ref() else {
        return None;
    };
    match array.get(index)?.get_ref() {
        DeValue::Table(table) => Some(table),
        _ => None,
    }
}

/// The span of the value at the dotted path `field` (`vault.auth.role`) in `text`, or of its
/// deepest part that is there: where a check made after deserialization puts its error.
pub(super) fn key_span(text: &str, field: &str) -> Option<Range<usize>> {
    let doc = DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut span = None;
    for key in field.split('.') {
        let Some(value) = get(table, key) else { break };
        span = Some(value.span());
        match value.get_ref() {
            DeValue::Table(inner) => table = inner,
            _ => break,
        }
    }
    span
}

fn get<'a>(table: &'a DeTable<'a>, key: &str) -> Option<&'a Spanned<DeValue<'a>>> {
    table
        .iter()
        .find(|(k, _)| k.get_ref() == key)
        .map(|(_, v)| v)
}

fn string<'a>(table: &'a DeTable<'a>, key: &str) -> Option<&'a str> {
    match get(table, key)?.get_ref() {
        DeValue::String(s) => Some(s),
        _ => None,
    }
}

/// `a.b[0].c` from path segments.
fn render(segments: &[&Segment]) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => out = join(&out, key),
            Segment::Enum { variant } => out = join(&out, variant),
            Segment::Unknown => {}
        }
    }
    out
}

/// `a.b`, or whichever of the two is not empty.
fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_owned(),
        (_, true) => a.to_owned(),
        _ => format!("{a}.{b}"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    const HEAD: &str = r#"
[defaults]
max_age = "40d"
rotate_every = "30d"

[[credential]]
id = "good"
rotator = { kind = "random" }
store = { kind = "file", path = "/tmp/x/good" }

[[credential]]
id = "bad"
"#;
    const RANDOM: &str = r#"rotator = { kind = "random" }"#;
    const FILE: &str = r#"store = { kind = "file", path = "/tmp/x/bad" }"#;
    const PG: &str = r#"kind = "postgres_password", admin_dsn = "env:PG_DSN""#;
    const HTTP: &str = r#"kind = "http", auth = "env:TOKEN", secret_pointer = "/k", id_pointer = "/id", issue = { url = "https://api.example.com/keys" }, verify = { url = "https://api.example.com/me" }, revoke = { url = "https://api.example.com/keys/{{old_id}}" }"#;

    /// (credential body after `id = "bad"`, the field the error must name).
    fn cases() -> Vec<(String, &'static str)> {
        let rotator = |fields: &str| format!("rotator = {{ {fields} }}\n{FILE}");
        let store = |fields: &str| format!("{RANDOM}\nstore = {{ {fields} }}");
        vec![
            (
                rotator(r#"kind = "random", length = "32""#),
                "rotator.length",
            ),
            (rotator(r#"kind = "random", lenght = 32"#), "rotator.lenght"),
            (
                rotator(r#"kind = "random", alphabet = "klingon""#),
                "rotator.alphabet",
            ),
            (rotator(r#"kind = "random", length = 8"#), "rotator.length"),
            (
                rotator(
                    r#"kind = "postgres_password", admin_dsn = "postgres://u:S3cr3tPw@h/db", strategy = "single", role = "a""#,
                ),
                "rotator.admin_dsn",
            ),
            (
                rotator(
                    r#"kind = "postgres_password", admin_dsn = "env:PGPASS=S3cr3tPw", strategy = "single", role = "a""#,
                ),
                "rotator.admin_dsn",
            ),
            (rotator(&format!(r#"{PG}, role = "a""#)), "rotator.strategy"),
            (
                rotator(&format!(
                    r#"{PG}, strategy = "single", role = "a", port = "5432""#
                )),
                "rotator.port",
            ),
            (
                rotator(&format!(
                    r#"{PG}, strategy = "single", role = "a", sslmode = "sometimes""#
                )),
                "rotator.sslmode",
            ),
            (
                rotator(&format!(r#"{PG}, strategy = "alternating", roles = "a""#)),
                "rotator.roles",
            ),
            (
                rotator(&format!(
                    r#"{PG}, strategy = "alternating", roles = ["a", 2]"#
                )),
                "rotator.roles[1]",
            ),
            (
                rotator(&format!(r#"{PG}, strategy = "single""#)),
                "rotator.role",
            ),
            (
                rotator(r#"kind = "aws_iam_access_key", user_name = 5"#),
                "rotator.user_name",
            ),
            (
                rotator(
                    r#"kind = "aws_iam_access_key", user_name = "u", delete_after_deactivate = "yes""#,
                ),
                "rotator.delete_after_deactivate",
            ),
            (
                rotator(r#"kind = "aws_iam_access_key""#),
                "rotator.user_name",
            ),
            (
                rotator(&HTTP.replace(r#"auth = "env:TOKEN""#, r#"auth = "file:S3cr3tPw""#)),
                "rotator.auth",
            ),
            (
                rotator(&HTTP.replace(r#"issue = { url = "https://api.example.com/keys" }, "#, "")),
                "rotator.issue",
            ),
            (
                rotator(&HTTP.replace(
                    r#"{ url = "https://api.example.com/keys" }"#,
                    r#"{ method = "POST" }"#,
                )),
                "rotator.issue.url",
            ),
            (
                rotator(&HTTP.replace(r#"secret_pointer = "/k""#, "secret_pointer = 1")),
                "rotator.secret_pointer",
            ),
            (rotator(r#"kind = "vault""#), "rotator.kind"),
            (
                store(r#"kind = "file", path = "/tmp/x/bad", mode = 640"#),
                "store.mode",
            ),
            (
                store(r#"kind = "file", path = "/tmp/x/bad", format = "yaml""#),
                "store.format",
            ),
            (store(r#"kind = "file""#), "store.path"),
            (
                store(r#"kind = "aws_secrets_manager", secret_id = 7"#),
                "store.secret_id",
            ),
            (
                store(r#"kind = "aws_secrets_manager", secret_id = "a b""#),
                "store.secret_id",
            ),
            (store(r#"kind = "s3", bucket = "b""#), "store.kind"),
            (FILE.to_owned(), "rotator"),
            (format!("{RANDOM}\n{FILE}\nmax_age = 40"), "max_age"),
            (
                format!("{RANDOM}\n{FILE}\nretry = {{ max_attempts = \"5\" }}"),
                "retry.max_attempts",
            ),
            (
                format!("{FILE}\n[credential.rotator]\nkind = \"random\"\nlength = \"x\""),
                "rotator.length",
            ),
        ]
    }

    #[test]
    fn every_error_names_the_credential_and_the_real_field() {
        // The line of the bad credential's `[[credential]]` header.
        let first_bad_line = HEAD.lines().count() - 1;
        for (body, field) in cases() {
            let text = format!("{HEAD}{body}\n");
            let errors = match super::super::parse(Path::new("inv.toml"), &text) {
                Ok(_) => panic!("accepted:\n{body}"),
                Err(e) => e.0,
            };
            assert_eq!(errors.len(), 1, "{body}: {errors:?}");
            let e = &errors[0];
            let shown = e.to_string();
            assert_eq!(
                e.field,
                format!("credential[bad].{field}"),
                "{body}: {shown}"
            );
            assert!(
                e.line >= first_bad_line && e.column > 0,
                "{body}: the place is not in the credential: {shown}"
            );
            assert!(
                shown.starts_with(&format!("inv.toml:{}:", e.line)),
                "{shown}"
            );
            for internal in ["$__", "credential[0]", "credential[1]"] {
                assert!(!shown.contains(internal), "{body}: {shown}");
            }
            assert!(!shown.contains("S3cr3t"), "{body}: {shown}");
        }
    }

    #[test]
    fn a_wrong_value_is_placed_at_the_value() {
        let text = format!("{HEAD}{FILE}\nrotator = {{ kind = \"random\", length = \"32\" }}\n");
        let e = &super::super::parse(Path::new("inv.toml"), &text)
            .unwrap_err()
            .0[0];
        let line = HEAD.lines().count() + 2;
        assert_eq!(
            e.to_string(),
            format!(
                "inv.toml:{line}:39: credential[bad].rotator.length: invalid type: string \"32\", expected usize"
            )
        );
    }

    #[test]
    fn an_unset_reference_is_reported_at_its_field() {
        let text =
            format!("{HEAD}rotator = {{ {PG}, strategy = \"single\", role = \"a\" }}\n{FILE}\n")
                .replace("env:PG_DSN", "env:KEYROTD_TEST_NEVER_SET_VARIABLE");
        let inventory = super::super::parse(Path::new("inv.toml"), &text).unwrap();
        let errors = super::super::check_references(&inventory).unwrap_err().0;
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "credential[bad].rotator.admin_dsn");
        assert!(
            errors[0]
                .to_string()
                .contains("KEYROTD_TEST_NEVER_SET_VARIABLE` is not set"),
            "{}",
            errors[0]
        );
    }
}
