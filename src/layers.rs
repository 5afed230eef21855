//! The layer rule of the daemon crate, checked against the source.
//!
//! Modules are stacked: a module may use modules of lower layers only, never one of its own
//! layer or above, so dependencies point one way and there are no import cycles. The table below
//! is the rule; ARCHITECTURE.md explains it. The test reads every file under `src/` and fails on
//! any `crate::MODULE` path that breaks it, naming the file and line.

/// Each layer's modules, bottom first.
const LAYERS: &[&[&str]] = &[
    // Leaves: pure types and functions.
    &[
        "fmt", "event", "protocol", "schedule", "liveness", "logging",
    ],
    &["config"],
    &["state"],
    &["instrument", "hooks"],
    // The protocol and the notifications, side by side: neither knows the other.
    &["engine", "alert"],
    &["scheduler"],
    &["metrics"],
    // The daemon's faces to the outside: the HTTP endpoint and the service manager.
    &["http", "systemd", "audit"],
    // The entry points.
    &["daemon", "cli", "policy"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level module a file under `src/` belongs to (`engine/steps.rs` -> `engine`).
fn module_of(relative: &std::path::Path) -> String {
    let first = relative.components().next().expect("a file under src/");
    let name = first.as_os_str().to_string_lossy();
    name.strip_suffix(".rs").unwrap_or(&name).to_owned()
}

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules named by `crate::NAME` paths in one line of code (comments excluded), including
/// each member of a group `crate::{a::X, b}` that opens on this line.
fn crate_paths(line: &str) -> Vec<&str> {
    let code = line.split("//").next().unwrap_or("");
    let name = |text: &'_ str| -> usize {
        text.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(text.len())
    };
    let mut found = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => {
                // The first name of each member at the group's own depth.
                let (mut depth, mut start) = (0, Some(0));
                for (i, c) in group.char_indices() {
                    if let Some(from) = start.take() {
                        let member = group[from..].trim_start();
                        if !member.is_empty() && member.starts_with(|c: char| c != '}') {
                            found.push(&member[..name(member)]);
                        }
                    }
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => start = Some(i + 1),
                        _ => {}
                    }
                }
            }
            None => found.push(&rest[..name(rest)]),
        }
    }
    found
}

#[test]
fn every_module_is_in_a_layer_and_imports_only_from_below() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src/");
        let module = module_of(relative);
        if ["lib", "main", "layers"].contains(&module.as_str()) {
            continue;
        }
        let own = layer(&module).unwrap_or_else(|| {
            panic!(
                "src/{} is in no layer: add `{module}` to LAYERS",
                relative.display()
            )
        });
        let text = std::fs::read_to_string(file).expect("a readable source file");
        for (n, line) in text.lines().enumerate() {
            for used in crate_paths(line) {
                if used == module {
                    continue;
                }
                match layer(used) {
                    Some(l) if l < own => {}
                    _ => violations.push(format!(
                        "src/{}:{}: `{module}` uses `crate::{used}`, which is not below it",
                        relative.display(),
                        n + 1
                    )),
                }
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn crate_paths_are_found_outside_comments() {
    let found = crate_paths("use crate::engine::{Engine}; x(crate::fmt::human) // crate::cli");
    assert_eq!(found, ["engine", "fmt"]);
    let grouped = crate_paths("use crate::{config::Inventory, state, engine::{Engine, Outcome}};");
    assert_eq!(grouped, ["config", "state", "engine"]);
    assert_eq!(module_of(std::path::Path::new("engine/steps.rs")), "engine");
    assert_eq!(module_of(std::path::Path::new("fmt.rs")), "fmt");
}
