//! The `[[credential]]` section scanner: finds each section's bytes in the file text, so that
//! each is parsed on its own and a large inventory never exists as one TOML tree. Invariant:
//! every offset in the [`head`] maps back to its byte in the file.

/// A `[[credential]]` section: its bytes (header included) and the line it starts on.
pub(super) struct Section {
    pub(super) bytes: std::ops::Range<usize>,
    pub(super) first_line: usize,
}

/// Finds the `[[credential]]` sections: from a `[[credential]]` header to the next header that
/// is not one of its sub-tables (`[credential.rotator]`). Headers inside multi-line strings do
/// not count.
pub(super) fn credential_sections(text: &str) -> Vec<Section> {
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

/// The head: `text` without its sections, and where each of its pieces starts in `text` (head
/// offset, text offset), so a span in the head maps back to the file (see [`to_text_offset`]).
/// Only the bytes outside the sections are copied: the head of a 100,000-credential inventory
/// is a few hundred bytes, not a second copy of the file.
pub(super) fn head(text: &str, sections: &[Section]) -> (String, Vec<(usize, usize)>) {
    let mut out = String::new();
    let mut map = Vec::new();
    let mut at = 0;
    for section in sections {
        push_piece(&mut out, &mut map, text, at..section.bytes.start);
        at = section.bytes.end;
    }
    push_piece(&mut out, &mut map, text, at..text.len());
    (out, map)
}

fn push_piece(
    out: &mut String,
    map: &mut Vec<(usize, usize)>,
    text: &str,
    piece: std::ops::Range<usize>,
) {
    if !piece.is_empty() {
        map.push((out.len(), piece.start));
        out.push_str(&text[piece]);
    }
}

/// The offset in the file of `offset` in the head described by `map` (see [`head`]).
pub(super) fn to_text_offset(map: &[(usize, usize)], offset: usize) -> usize {
    match map.partition_point(|(head, _)| *head <= offset) {
        0 => offset,
        i => map[i - 1].1 + (offset - map[i - 1].0),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::parse;
    use crate::config::tests::errors;

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
        // The head is parsed without the sections, yet its errors keep the file's places.
        let e = errors(&text.replace("grace = \"1h\"", "grace = \"1 fortnight\""));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("inv.toml:13:9: defaults.grace:"),
            "{}",
            e[0]
        );
        let e = errors(&text.replace("[defaults]", "[defaults]\nnope = 1"));
        assert!(
            e[0].starts_with("inv.toml:13:1: defaults.nope: unknown field"),
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
}
