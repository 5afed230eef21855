//! The shipped Dockerfile, read as Docker reads it: every base image is pinned by digest, the
//! final stage runs as a non-root user and keeps its HEALTHCHECK, and the binary comes from a
//! release build (whose profile drops debug info). No Docker engine runs here, so the image is
//! not built; `tests/deb-check.sh` builds and installs the `.deb`.
//!
//! Each check is also run against a copy of the Dockerfile with the property removed, so a check
//! that cannot fail would fail here.

use std::path::Path;

/// The instructions of a Dockerfile: (keyword upper-cased, arguments), with line
/// continuations joined and comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, args) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((&current, ""));
                out.push((keyword.to_ascii_uppercase(), args.trim().to_owned()));
                current.clear();
            }
        }
    }
    out
}

/// What is wrong with a Dockerfile, one line per problem.
fn problems(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let all = instructions(text);
    let mut stages: Vec<String> = Vec::new();
    let mut last_stage_start = 0;
    for (i, (keyword, args)) in all.iter().enumerate() {
        if keyword != "FROM" {
            continue;
        }
        last_stage_start = i;
        let words: Vec<&str> = args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let image = words.first().copied().unwrap_or("");
        if let Some(alias) = words.iter().position(|w| w.eq_ignore_ascii_case("as")) {
            stages.push(words.get(alias + 1).unwrap_or(&"").to_string());
        }
        if stages[..stages.len().saturating_sub(1)]
            .iter()
            .any(|s| s == image)
        {
            continue; // an earlier stage of this file, not a pulled image
        }
        let pinned = image.split_once("@sha256:").is_some_and(|(_, digest)| {
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit())
        });
        if !pinned {
            problems.push(format!(
                "FROM {image} is not pinned by @sha256:<64 hex digits>"
            ));
        }
    }
    let last_stage = &all[last_stage_start..];
    match last_stage.iter().rev().find(|(k, _)| k == "USER") {
        None => problems.push("the final stage has no USER: it would run as root".into()),
        Some((_, user)) => {
            let name = user.split(':').next().unwrap_or("");
            if name.is_empty() || name == "root" || name.parse::<u32>() == Ok(0) {
                problems.push(format!("the final stage runs as USER {user}"));
            }
        }
    }
    match last_stage.iter().rev().find(|(k, _)| k == "HEALTHCHECK") {
        None => problems.push("the final stage has no HEALTHCHECK".into()),
        Some((_, args)) if args.eq_ignore_ascii_case("none") => {
            problems.push("HEALTHCHECK NONE disables the health check".into())
        }
        Some(_) => {}
    }
    let builds_release = all
        .iter()
        .any(|(k, a)| k == "RUN" && a.contains("cargo build") && a.contains("--release"));
    let copies_release = last_stage
        .iter()
        .any(|(k, a)| k == "COPY" && a.contains("target/release/keyrotd"));
    if !builds_release || !copies_release {
        problems.push("the image does not ship the release build of keyrotd".into());
    }
    problems
}

fn shipped() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap()
}

#[test]
fn dockerfile_pins_its_bases_runs_unprivileged_and_keeps_its_healthcheck() {
    let text = shipped();
    assert_eq!(problems(&text), Vec::<String>::new());
    let froms = instructions(&text)
        .into_iter()
        .filter(|(k, _)| k == "FROM")
        .count();
    assert!(froms >= 2, "a build stage and a runtime stage");
}

#[test]
fn the_release_profile_drops_debug_info() {
    let manifest: toml::Table =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
    let strip = &manifest["profile"]["release"]["strip"];
    assert!(
        ["debuginfo", "symbols"].contains(&strip.as_str().unwrap_or(""))
            || strip.as_bool() == Some(true),
        "[profile.release] strip = {strip}"
    );
}

#[test]
fn dockerfile_checks_catch_each_regression() {
    let text = shipped();
    let digest = |t: &str| -> String {
        t.lines()
            .map(|l| match l.split_once("@sha256:") {
                Some((image, rest)) if l.starts_with("FROM ") => {
                    let after = rest.split_once(' ').map_or("", |(_, a)| a);
                    format!("{image} {after}")
                }
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let without = |t: &str, keyword: &str| -> String {
        let mut skipping = false;
        t.lines()
            .filter(|l| {
                if l.starts_with(keyword) {
                    skipping = l.trim_end().ends_with('\\');
                    return false;
                }
                if skipping {
                    skipping = l.trim_end().ends_with('\\');
                    return false;
                }
                true
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let user = text
        .lines()
        .find(|l| l.starts_with("USER "))
        .expect("a USER line")
        .to_owned();
    let healthcheck = text
        .lines()
        .position(|l| l.starts_with("HEALTHCHECK "))
        .expect("a HEALTHCHECK");
    let no_healthcheck = without(&text, "HEALTHCHECK");
    let mut disabled: Vec<&str> = no_healthcheck.lines().collect();
    disabled.insert(healthcheck, "HEALTHCHECK NONE");
    let mut short = text.clone();
    short.remove(text.find("@sha256:").expect("a digest") + "@sha256:".len());
    let cases = [
        ("no digest", digest(&text), "is not pinned"),
        ("short digest", short, "is not pinned"),
        ("no USER", without(&text, "USER"), "no USER"),
        (
            "USER root",
            text.replace(&user, "USER root"),
            "runs as USER root",
        ),
        (
            "USER 0:0",
            text.replace(&user, "USER 0:0"),
            "runs as USER 0:0",
        ),
        (
            "no HEALTHCHECK",
            without(&text, "HEALTHCHECK"),
            "no HEALTHCHECK",
        ),
        ("HEALTHCHECK NONE", disabled.join("\n"), "HEALTHCHECK NONE"),
        (
            "debug build",
            text.replace("--release", "")
                .replace("target/release", "target/debug"),
            "release build",
        ),
    ];
    for (what, broken, expected) in cases {
        assert_ne!(broken, text, "{what}: the mutation changed nothing");
        let found = problems(&broken);
        assert!(
            found.iter().any(|p| p.contains(expected)),
            "{what}: expected a problem containing {expected:?}, got {found:?}"
        );
    }
}
