//! `keyrotd completions SHELL` and `keyrotd man`, run by the real binary: generated from the
//! argument definitions, so every subcommand and global flag is in them; they read no inventory,
//! so they work on a machine where none exists yet (a package build).

use crate::support::keyrotd;

/// Every subcommand and global flag, as a user types them.
const WORDS: [&str; 11] = [
    "run",
    "check",
    "status",
    "rotate",
    "adopt",
    "history",
    "policy",
    "completions",
    "man",
    "--config",
    "--log-format",
];

fn run(args: &[&str]) -> std::process::Output {
    keyrotd()
        .env("KEYROTD_CONFIG", "/nonexistent/keyrotd/config.toml")
        .args(args)
        .output()
        .expect("spawn keyrotd")
}

#[test]
fn completions_cover_every_command_for_each_shell_without_an_inventory() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {:?}", out);
        let script = String::from_utf8(out.stdout).unwrap();
        for word in WORDS {
            let bare = word.trim_start_matches('-');
            assert!(script.contains(bare), "{shell} completion lacks `{word}`");
        }
    }
    let bash = String::from_utf8(run(&["completions", "bash"]).stdout).unwrap();
    assert!(bash.contains("complete -F _keyrotd"), "{bash}");

    let unknown = run(&["completions", "tcsh"]);
    assert_eq!(
        unknown.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
    assert!(unknown.stdout.is_empty());
}

#[test]
fn the_man_page_is_roff_naming_every_command_without_an_inventory() {
    let out = run(&["man"]);
    assert!(out.status.success(), "{out:?}");
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(
        page.starts_with(".ie") || page.contains(".TH keyrotd"),
        "{page}"
    );
    assert!(page.contains(".TH keyrotd 1"), "{page}");
    for word in WORDS {
        // roff escapes a leading dash (`\-\-config`).
        let roff = word.replace('-', "\\-");
        assert!(
            page.contains(word) || page.contains(&roff),
            "man page lacks `{word}`"
        );
    }
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
