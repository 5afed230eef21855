//! The `[[credential]]` section scanner: reads the inventory line by line and hands each
//! section's text over once it is complete, so that each is parsed on its own and neither the
//! file nor one TOML tree of it is ever held whole. The rest of the file, the head, is kept with
//! the file line of each of its pieces. Invariant: every offset in the head maps back to its
//! line and column in the file.

use std::io::BufRead;

/// What a line is, given the lines before it.
enum Line {
    /// Outside any section.
    Head,
    /// A `[[credential]]` header: a new section starts here.
    Starts,
    /// Inside the current section.
    Section,
}

/// Tells, line by line, where the `[[credential]]` sections are: from a `[[credential]]`
/// header to the next header that is not one of its sub-tables (`[credential.rotator]`).
/// Headers inside multi-line strings do not count.
#[derive(Default)]
struct Scanner {
    open: bool,
    in_string: Option<&'static str>,
}

impl Scanner {
    fn line(&mut self, line: &str) -> Line {
        let mut kind = if self.open { Line::Section } else { Line::Head };
        if self.in_string.is_none() && line.trim_start().starts_with('[') {
            let header: String = line
                .split('#')
                .next()
                .unwrap_or_default()
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            let is_credential = header == "[[credential]]";
            let is_sub = header.starts_with("[credential.") || header.starts_with("[[credential.");
            if self.open && (is_credential || !is_sub) {
                self.open = false;
                kind = Line::Head;
            }
            if is_credential {
                self.open = true;
                kind = Line::Starts;
            }
        }
        for delimiter in ["\"\"\"", "'''"] {
            if line.matches(delimiter).count() % 2 == 1 {
                self.in_string = match self.in_string {
                    None => Some(delimiter),
                    Some(d) if d == delimiter => None,
                    other => other,
                };
            }
        }
        kind
    }
}

/// Reads `reader` line by line: each head line goes to `head` with its line number (from 1),
/// each complete section to `section` with the line it starts on. Only the current line and
/// the current section are in memory.
pub(super) fn scan(
    mut reader: impl BufRead,
    mut head: impl FnMut(&str, usize),
    mut section: impl FnMut(&str, usize),
) -> std::io::Result<()> {
    let mut scanner = Scanner::default();
    let (mut line, mut current, mut first_line) = (String::new(), String::new(), 0);
    let mut number = 0;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        number += 1;
        let kind = scanner.line(&line);
        if !matches!(kind, Line::Section) && !current.is_empty() {
            section(&current, first_line);
            current.clear();
        }
        match kind {
            Line::Head => head(&line, number),
            Line::Starts => {
                first_line = number;
                current.push_str(&line);
            }
            Line::Section => current.push_str(&line),
        }
    }
    if !current.is_empty() {
        section(&current, first_line);
    }
    Ok(())
}

/// The head of an inventory: its lines outside the sections, and where each run of them starts
/// (head offset, file line).
#[derive(Default)]
pub(super) struct Head {
    pub(super) text: String,
    pub(super) pieces: Vec<(usize, usize)>,
    last_line: usize,
}

impl Head {
    /// Appends line `number` of the file.
    pub(super) fn push(&mut self, line: &str, number: usize) {
        if self.pieces.is_empty() || self.last_line + 1 != number {
            self.pieces.push((self.text.len(), number));
        }
        self.last_line = number;
        self.text.push_str(line);
    }
}

/// The piece of a head (`pieces` as in [`Head`]) that holds `offset`: its start and file line.
pub(super) fn piece_of(pieces: &[(usize, usize)], offset: usize) -> Option<(usize, usize)> {
    match pieces.partition_point(|(start, _)| *start <= offset) {
        0 => None,
        i => Some(pieces[i - 1]),
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
