//! Every command that writes to stdout, run by the real binary into a pipe whose reader is gone
//! (`keyrotd history | head -1`): it ends quietly, with status 0 or killed by SIGPIPE as `cat`
//! is, never with a panic, a backtrace or exit status 101.

use crate::support;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;

use support::*;

/// An inventory of `n` random credentials in file stores, each rotated once so that `status`
/// and `history` have rows to print.
fn inventory(dir: &Path, n: usize) -> std::path::PathBuf {
    let mut text = String::from("[daemon]\nstate = \"sqlite:state.db\"\n\n");
    for i in 0..n {
        text.push_str(&format!(
            "[[credential]]\nid = \"c{i}\"\nrotator = {{ kind = \"random\" }}\n\
             store = {{ kind = \"file\", path = \"{}\" }}\nrotate_every = \"30d\"\nmax_age = \"40d\"\n\n",
            dir.join(format!("out/c{i}")).display()
        ));
    }
    let config = dir.join("config.toml");
    std::fs::write(&config, text).unwrap();
    for i in 0..3 {
        let out = cli(&config, &["rotate", &format!("c{i}")]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    config
}

/// Runs `keyrotd --config CONFIG ARGS...` with its stdout a pipe that is closed before it writes.
fn into_closed_pipe(config: &Path, args: &[&str]) -> std::process::Output {
    let mut child = keyrotd()
        .arg("--config")
        .arg(config)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyrotd");
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

#[test]
fn commands_writing_to_a_closed_pipe_end_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let config = inventory(dir.path(), 200);
    for args in [
        &["check"][..],
        &["status"],
        &["status", "--json"],
        &["history"],
        &["history", "c0"],
        &["rotate", "c5"],
        &["rotate", "c6", "--dry-run"],
        &["completions", "bash"],
        &["man"],
    ] {
        let out = into_closed_pipe(&config, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let quiet_end = out.status.success() || out.status.signal() == Some(libc::SIGPIPE);
        assert!(quiet_end, "{args:?}: ended with {:?}: {stderr}", out.status);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
    }
    // The rotation run into a closed pipe did happen, and reported nothing as failed.
    assert!(dir.path().join("out/c5").exists());
}
