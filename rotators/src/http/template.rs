//! The `http` rotator's template engine: `{{name}}` placeholders in URLs, headers and JSON
//! bodies, parsed at load time and rendered per request.
//!
//! Invariant: a template may only use the variables of its request ([`RequestKind::allowed`]),
//! checked when the configuration is loaded; rendering never reads the environment or anything
//! but the [`Vars`] it is given.

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

/// Which request a template belongs to; decides the variables it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RequestKind {
    Issue,
    Verify,
    Revoke,
    LastUsed,
}

impl RequestKind {
    /// The request's name in the configuration and in error messages.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Issue => "issue",
            Self::Verify => "verify",
            Self::Revoke => "revoke",
            Self::LastUsed => "last_used",
        }
    }

    /// The variables a template of this request may use.
    pub(super) fn allowed(self) -> &'static [&'static str] {
        match self {
            Self::Issue => &["credential_id", "old_id"],
            Self::Verify => &["credential_id", "new_id", "new_secret"],
            Self::Revoke | Self::LastUsed => &["credential_id", "old_id"],
        }
    }
}

/// A piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Piece {
    Text(String),
    Var(&'static str),
}

/// Parses `text`, refusing unknown variables and variables not allowed in `kind` (any known
/// variable when `kind` is `None`: for templates already checked).
pub(super) fn parse_template(
    kind: impl Into<Option<RequestKind>>,
    field: &str,
    text: &str,
) -> Result<Vec<Piece>, String> {
    let kind = kind.into();
    const KNOWN: [&str; 4] = ["credential_id", "old_id", "new_id", "new_secret"];
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            pieces.push(Piece::Text(rest[..start].to_owned()));
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("{field}: unclosed `{{{{` in template"))?;
        let name = after[..end].trim();
        let var = KNOWN.into_iter().find(|k| *k == name).ok_or_else(|| {
            format!(
                "{field}: unknown template variable `{name}` (known: {})",
                KNOWN.join(", ")
            )
        })?;
        if let Some(kind) = kind.filter(|s| !s.allowed().contains(&var)) {
            return Err(format!(
                "{field}: `{{{{{var}}}}}` cannot be used in the {} request (allowed: {})",
                kind.name(),
                kind.allowed().join(", ")
            ));
        }
        pieces.push(Piece::Var(var));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_owned()));
    }
    Ok(pieces)
}

/// The values template variables take in one request.
#[derive(Default)]
pub(super) struct Vars<'a> {
    pub(super) credential_id: &'a str,
    pub(super) old_id: &'a str,
    pub(super) new_id: &'a str,
    pub(super) new_secret: Option<&'a SecretString>,
}

impl Vars<'_> {
    fn get(&self, name: &str) -> &str {
        match name {
            "credential_id" => self.credential_id,
            "old_id" => self.old_id,
            "new_id" => self.new_id,
            "new_secret" => self
                .new_secret
                .map(|s| s.expose_secret())
                .unwrap_or_default(),
            _ => unreachable!("templates are checked at load time"),
        }
    }
}

/// Renders `pieces`, each variable's value passed through `encode`.
pub(super) fn render(pieces: &[Piece], vars: &Vars<'_>, encode: fn(&str) -> String) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Text(t) => t.clone(),
            Piece::Var(v) => encode(vars.get(v)),
        })
        .collect()
}

/// The identity encoding: for headers and bodies.
pub(super) fn verbatim(s: &str) -> String {
    s.to_owned()
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so a value stays one segment.
pub(super) fn url_component(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Whether any string in a JSON body refers to the variable `piece`.
pub(super) fn body_uses(value: &Value, piece: &Piece) -> bool {
    match value {
        Value::String(s) => parse_template(None, "", s).is_ok_and(|p| p.contains(piece)),
        Value::Array(items) => items.iter().any(|v| body_uses(v, piece)),
        Value::Object(map) => map.values().any(|v| body_uses(v, piece)),
        _ => false,
    }
}

/// Checks every string in a JSON body as a template of `kind`'s request.
pub(super) fn check_body(kind: RequestKind, field: &str, value: &Value) -> Result<(), String> {
    match value {
        Value::String(s) => parse_template(kind, field, s).map(drop),
        Value::Array(items) => items.iter().try_for_each(|v| check_body(kind, field, v)),
        Value::Object(map) => map.values().try_for_each(|v| check_body(kind, field, v)),
        _ => Ok(()),
    }
}

/// Renders every string in a JSON body; its templates were checked at load time.
pub(super) fn render_body(value: &Value, vars: &Vars<'_>) -> Value {
    match value {
        Value::String(s) => {
            let pieces = parse_template(None, "", s).expect("checked at load time");
            Value::String(render(&pieces, vars, verbatim))
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| render_body(v, vars)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), render_body(v, vars)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_accept_only_known_variables_in_their_request() {
        assert_eq!(
            parse_template(RequestKind::Revoke, "f", "/keys/{{old_id}}").unwrap(),
            vec![Piece::Text("/keys/".into()), Piece::Var("old_id")]
        );
        assert!(parse_template(RequestKind::Issue, "f", "{{HOME}}")
            .unwrap_err()
            .contains("unknown template variable `HOME`"));
        assert!(parse_template(RequestKind::Issue, "f", "{{new_secret}}")
            .unwrap_err()
            .contains("cannot be used in the issue"));
        assert!(parse_template(RequestKind::Verify, "f", "{{new_secret}}").is_ok());
        assert!(parse_template(RequestKind::Issue, "f", "{{old_id")
            .unwrap_err()
            .contains("unclosed"));
    }

    #[test]
    fn url_values_are_encoded_as_one_component() {
        assert_eq!(url_component("a/b c?d"), "a%2Fb%20c%3Fd");
    }
}
