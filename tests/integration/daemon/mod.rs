//! The `keyrotd` binary, driven as an operator would: real processes, real signals, kill -9.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

mod concurrency;
mod group_commit;

/// An inventory in a fresh directory with one `random` credential `db` in a JSON file store.
struct Setup {
    dir: tempfile::TempDir,
    port: u16,
}

impl Setup {
    fn new(credential: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let text = format!(
            "[daemon]\nstate = \"sqlite:state/keyrotd.db\"\nlisten = \"127.0.0.1:{port}\"\n\n[[credential]]\nid = \"db\"\n\
             rotator = {{ kind = \"random\", length = 32 }}\nstore = {{ kind = \"file\", path = \"{}\", format = \"json\" }}\n{credential}\n",
            dir.path().join("out/db.json").display()
        );
        std::fs::write(dir.path().join("config.toml"), text).unwrap();
        Self { dir, port }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    fn current(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.path().join("out/db.json")).ok()?;
        let v: serde_json::Value =
            serde_json::from_str(&text).expect("the store file is always complete JSON");
        Some(v["password"].as_str().expect("a password field").to_owned())
    }

    fn out_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path().join("out"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn status(&self) -> serde_json::Value {
        let out = cli(&self.config(), &["status", "--json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()[0].clone()
    }

    fn start(&self, env: &[(&str, &str)]) -> Daemon {
        Daemon::start(&self.config(), self.port, &self.log(), env)
    }
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn check_names_file_line_column_and_field_and_exits_2() {
    let s = Setup::new("rotate_every = \"30d\"\nmax_age = \"40d\"");
    let ok = cli(&s.config(), &["check"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        stdout.contains("db  rotator=random") && stdout.matches("Z").count() >= 3,
        "next three times: {stdout}"
    );

    let cases = [
        ("rotate_every = \"30d\"\nmax_age = \"40d\"\nlenght = 3", ":11:1: credential[db].lenght: unknown field `lenght`"),
        ("schedule = \"0 3 * *\"\nmax_age = \"40d\"", ":9:12: credential[db].schedule: expected 5 fields"),
        ("rotate_every = \"30 days please\"\nmax_age = \"40d\"", ":9:16: credential[db].rotate_every:"),
        ("rotate_every = \"30d\"\nmax_age = \"20d\"", ":10:11: credential[db].max_age: 20d is not longer than the rotation period (30d)"),
        ("rotate_every = \"30d\"\nmax_age = \"40d\"\ntimezone = \"Mars/Olympus\"", ":11:12: credential[db].timezone: unknown timezone"),
        ("rotate_every = \"30d\"\nmax_age = \"40d\"\n[[credential]]\nid = \"db\"\nrotator = { kind = \"random\" }\nstore = { kind = \"file\", path = \"/tmp/x\" }\nrotate_every = \"1d\"\nmax_age = \"2d\"",
         ":12:6: credential[1].id: duplicate id `db` (first defined on line 6)"),
    ];
    for (extra, expected) in cases {
        let s = Setup::new(extra);
        let out = cli(&s.config(), &["check"]);
        assert_eq!(out.status.code(), Some(2), "{extra}: {}", stderr(&out));
        let want = format!("{}{expected}", s.config().display());
        assert!(
            stderr(&out).contains(&want),
            "want `{want}` in:\n{}",
            stderr(&out)
        );
        assert!(
            !s.dir.path().join("state").exists(),
            "check with a bad config changes nothing"
        );
    }
}

#[test]
fn check_refuses_out_of_bound_durations_without_panicking() {
    for (value, message) in [
        ("99999999999d", "`99999999999d` is too long: at most 100y"),
        ("300000y", "`300000y` is too long: at most 100y"),
        ("0s", "must be longer than zero"),
        ("1ns", "`1ns` must be a whole number of seconds"),
    ] {
        let s = Setup::new(&format!("rotate_every = \"{value}\"\nmax_age = \"40d\""));
        let out = cli(&s.config(), &["check"]);
        assert_eq!(out.status.code(), Some(2), "{value}: {}", stderr(&out));
        let want = format!(
            "{}:9:16: credential[db].rotate_every: {message}",
            s.config().display()
        );
        assert!(
            stderr(&out).contains(&want),
            "want `{want}` in:\n{}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
}

#[test]
fn check_never_panics_on_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let inputs: [&[u8]; 6] = [b"", b"\xff\xfe\x00garbage", b"[[credential]]\nid = \"x\"", b"[daemon\n", b"credential = 5", b"[[credential]]\nid=\"a\"\nrotator={kind=\"random\",length=-1}\nstore={kind=\"file\",path=\"rel\"}\nrotate_every=\"1d\"\nmax_age=\"0s\""];
    for input in inputs {
        std::fs::write(&path, input).unwrap();
        let out = cli(&path, &["check"]);
        let code = out.status.code();
        // An empty inventory is valid; anything else must be a clean exit 2, never a panic (101).
        assert!(
            code == Some(2) || (code == Some(0) && input.is_empty()),
            "{input:?}: {code:?} {}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
    let out = cli(&dir.path().join("missing.toml"), &["check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("missing.toml: (file): cannot read"),
        "{}",
        stderr(&out)
    );
    let out = cli(&path, &["rotate", "nope"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn run_rotates_on_schedule_exports_metrics_and_leaks_no_secret() {
    let s = Setup::new("rotate_every = \"2s\"\nmax_age = \"5s\"\ngrace = \"1s\"");
    let mut daemon = s.start(&[]);
    let mut seen: Vec<String> = Vec::new();
    let rotated_thrice = wait_until(Duration::from_secs(20), || {
        if let Some(v) = s.current() {
            if seen.last() != Some(&v) {
                seen.push(v);
            }
        }
        seen.len() >= 3
    });
    assert!(
        rotated_thrice,
        "values seen: {}; log:\n{}",
        seen.len(),
        daemon.log_text()
    );
    // The previous value is released once the grace period is over. (With a 2 s period and a
    // 1 s grace, rounded up to whole seconds, the next rotation may write a new `.previous`
    // within milliseconds of the release: the journal, not the directory, is the witness.)
    assert!(wait_until(Duration::from_secs(5), || {
        let history = cli(&s.config(), &["history", "db"]);
        String::from_utf8_lossy(&history.stdout)
            .lines()
            .filter(|l| l.contains("  db  done"))
            .count()
            >= 2
    }));
    let history =
        String::from_utf8_lossy(&cli(&s.config(), &["history", "db"]).stdout).into_owned();
    assert!(history.contains("release   ok"), "{history}");

    let (code, metrics) = http_get(s.port, "/metrics").unwrap();
    assert_eq!(code, 200);
    for name in [
        "keyrotd_credential_issued_timestamp_seconds{credential=\"db\",rotator=\"random\"}",
        "keyrotd_credential_max_age_seconds{credential=\"db\",rotator=\"random\"} 5",
        "keyrotd_credential_next_rotation_timestamp_seconds{credential=\"db\",rotator=\"random\"}",
        "keyrotd_credential_status{credential=\"db\",rotator=\"random\",state=\"failed\"} 0",
        "keyrotd_rotations_total{result=\"success\"}",
        "keyrotd_rotation_step_duration_seconds_bucket{step=\"verify\"",
        "keyrotd_build_info{version=",
        "keyrotd_provider_call_duration_seconds_count{operation=\"issue\",rotator=\"random\"}",
        "keyrotd_provider_call_duration_seconds_bucket{operation=\"verify\",rotator=\"random\"",
        "keyrotd_store_call_duration_seconds_count{operation=\"promote\",store=\"file\"}",
        "keyrotd_store_call_duration_seconds_count{operation=\"release_previous\",store=\"file\"}",
        "keyrotd_state_store_up 1",
        "keyrotd_state_store_errors_total 0",
        "keyrotd_state_commits_total ",
        "keyrotd_state_writes_total ",
        "keyrotd_config_last_reload_success_timestamp_seconds ",
        "keyrotd_config_last_reload_successful 1",
        "keyrotd_config_reloads_total{result=\"failure\"} 0",
    ] {
        assert!(metrics.contains(name), "missing {name} in:\n{metrics}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool is required (apt-get install prometheus); the suite does not skip without it",
        );
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), metrics.as_bytes()).unwrap();
    let lint = promtool.wait_with_output().unwrap();
    assert!(
        lint.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    let history = cli(&s.config(), &["history", "db"]);
    let history = String::from_utf8_lossy(&history.stdout).into_owned();
    let status = s.status();
    assert_eq!(
        daemon.terminate(Duration::from_secs(10)).code(),
        Some(0),
        "SIGTERM exits cleanly"
    );
    assert!(daemon.log_text().contains("keyrotd stopped"));

    // No generated value anywhere but in the store's own files.
    let store_files: Vec<PathBuf> = ["db.json", "db.json.previous"]
        .iter()
        .map(|f| s.dir.path().join("out").join(f))
        .collect();
    let mut everything = all_bytes(s.dir.path(), &store_files);
    everything.extend(metrics.as_bytes());
    everything.extend(history.as_bytes());
    everything.extend(status.to_string().as_bytes());
    assert!(
        everything.len() > 10_000,
        "logs, state and metrics were scanned"
    );
    for encoded in seen.iter().flat_map(|secret| encodings(secret)) {
        assert!(
            !contains(&everything, &encoded),
            "a secret value (or its hex or base64) leaked into logs, state, metrics or CLI output"
        );
    }
}

/// Rotates once by hand so there is a current value to protect, then crashes a second rotation
/// with kill -9 at `point` and lets a freshly started daemon finish the job.
fn crash_and_resume(point: &str) {
    let s = Setup::new("rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"");
    let first = cli(&s.config(), &["rotate", "db"]);
    assert!(first.status.success(), "{point}: {}", stderr(&first));
    let v0 = s.current().unwrap();

    let log = s.dir.path().join("crashed.log");
    crash_at(&s.config(), "db", point, &[], &log);

    // Consumers always find a complete, working value: the old one, or the promoted new one.
    let after_crash = s.current().expect("a current value survives the crash");
    if !point.starts_with("promote:done")
        && !point.starts_with("promote:ok")
        && !point.starts_with("revoke")
    {
        assert_eq!(
            after_crash, v0,
            "{point}: nothing was promoted before the crash"
        );
    }

    let mut daemon = s.start(&[]);
    let done_twice = || {
        String::from_utf8_lossy(&cli(&s.config(), &["history", "db"]).stdout)
            .matches("  db  done")
            .count()
            == 2
    };
    let finished = wait_until(Duration::from_secs(20), || {
        done_twice() && s.status()["state"] == "idle"
    });
    assert!(
        finished,
        "{point}: not resumed: {} files {:?}\n{}",
        s.status(),
        s.out_files(),
        daemon.log_text()
    );
    assert_eq!(daemon.terminate(Duration::from_secs(10)).code(), Some(0));

    let v1 = s.current().unwrap();
    assert_ne!(v1, v0, "{point}: the interrupted rotation was completed");
    let history =
        String::from_utf8_lossy(&cli(&s.config(), &["history", "db"]).stdout).into_owned();
    assert_eq!(
        history.lines().filter(|l| l.contains("  db  ")).count(),
        2,
        "{point}: resumed, not restarted:\n{history}"
    );
    assert_eq!(
        history.lines().filter(|l| l.contains("  db  done")).count(),
        2,
        "{point}:\n{history}"
    );
    assert!(
        daemon.log_text().contains("resuming rotation"),
        "{point}: {}",
        daemon.log_text()
    );
    assert_eq!(
        s.out_files(),
        ["db.json", "db.json.keyrotd"],
        "{point}: no leftovers"
    );
}

#[test]
fn kill_9_at_every_step_boundary_then_restart_completes_the_rotation() {
    for point in [
        "issue:start",
        "issue:done",
        "issue:ok",
        "stage:start",
        "stage:done",
        "stage:ok",
        "activate:ok",
        "verify:start",
        "verify:done",
        "verify:ok",
        "promote:start",
        "promote:done",
        "promote:ok",
        "revoke:start",
        "revoke:done",
        // Inside the state store's group commit: the line is in a batch not yet committed.
        "issue:start:uncommitted",
        "stage:ok:uncommitted",
        "verify:ok:uncommitted",
        "promote:ok:uncommitted",
        "revoke:ok:uncommitted",
    ] {
        crash_and_resume(point);
    }
}

#[test]
fn manual_rotate_is_safe_alongside_a_running_daemon() {
    let s = Setup::new("rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"30m\"");
    let daemon = s.start(&[]);
    assert!(
        wait_until(Duration::from_secs(10), || s.status()["state"] == "grace"),
        "{}",
        daemon.log_text()
    );
    let v = s.current().unwrap();
    let out = cli(&s.config(), &["rotate", "db"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is in its grace period until"),
        "{}",
        stderr(&out)
    );
    assert_eq!(s.current().unwrap(), v);
    let dry = cli(&s.config(), &["rotate", "db", "--dry-run"]);
    assert!(
        dry.status.success()
            && String::from_utf8_lossy(&dry.stdout).contains("current value: present")
    );
    assert_eq!(s.current().unwrap(), v, "--dry-run changes nothing");
}

#[test]
fn a_credential_overdue_at_startup_rotates_promptly() {
    let s = Setup::new("rotate_every = \"1s\"\nmax_age = \"1h\"\ngrace = \"0s\"");
    assert!(cli(&s.config(), &["rotate", "db"]).status.success());
    let v0 = s.current().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let daemon = s.start(&[]);
    assert!(
        wait_until(Duration::from_secs(5), || s
            .current()
            .is_some_and(|v| v != v0)),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = keyrotd().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = keyrotd()
        .args(["--config", "/nonexistent/k.toml", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(Path::new(env!("CARGO_BIN_EXE_keyrotd")).exists());
}

#[test]
fn revocation_is_durable_across_a_restart_during_grace() {
    let s = Setup::new("rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"6s\"");
    let started = std::time::Instant::now();
    assert!(cli(&s.config(), &["rotate", "db"]).status.success());
    assert_eq!(s.status()["state"], "grace");
    // The first rotation promoted; no daemon ran during grace. Start one after a kill -9.
    let mut daemon = s.start(&[]);
    daemon.kill9();
    let daemon = s.start(&[]);
    // Revoke times are rounded *up* to whole seconds: never a moment before the 6 s are over.
    if started.elapsed() < Duration::from_secs(5) {
        assert_eq!(
            s.status()["state"],
            "grace",
            "not revoked before the grace period ends"
        );
    }
    let revoked = wait_until(Duration::from_secs(10), || s.status()["state"] == "idle");
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "revoked after grace, not before"
    );
    assert!(revoked, "{}\n{}", s.status(), daemon.log_text());
    let history =
        String::from_utf8_lossy(&cli(&s.config(), &["history", "db"]).stdout).into_owned();
    let finished = history
        .lines()
        .find(|l| l.contains("  db  done"))
        .expect("a finished rotation");
    assert!(finished.contains("trigger=manual"), "{history}");
    assert!(!s.out_files().contains(&"db.json.previous".to_string()));
}

#[test]
fn sighup_reloads_a_valid_inventory_and_keeps_running_on_an_invalid_one() {
    let s = Setup::new("rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"");
    let daemon = s.start(&[]);
    assert!(
        wait_until(Duration::from_secs(10), || s.current().is_some()),
        "{}",
        daemon.log_text()
    );
    let reloads = |result: &str| {
        let (_, metrics) = http_get(s.port, "/metrics").unwrap();
        let line = format!("keyrotd_config_reloads_total{{result=\"{result}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line).map(str::to_owned))
            .unwrap_or_default()
    };

    // A second credential appears: it is issued without a restart.
    let original = std::fs::read_to_string(s.config()).unwrap();
    let second = s.dir.path().join("out/second");
    let added = format!(
        "{original}\n[[credential]]\nid = \"second\"\nrotator = {{ kind = \"random\" }}\nstore = {{ kind = \"file\", path = \"{}\" }}\nrotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"\n",
        second.display()
    );
    std::fs::write(s.config(), &added).unwrap();
    signal(daemon.child.id(), "HUP");
    assert!(
        wait_until(Duration::from_secs(10), || second.exists()),
        "{}",
        daemon.log_text()
    );
    assert_eq!(reloads("success"), "1");

    // An invalid inventory is refused; the daemon keeps the running one and its port.
    std::fs::write(
        s.config(),
        added.replace("rotate_every = \"1h\"", "rotate_every = \"soon\""),
    )
    .unwrap();
    signal(daemon.child.id(), "HUP");
    assert!(
        wait_until(Duration::from_secs(10), || reloads("failure") == "1"),
        "{}",
        daemon.log_text()
    );
    assert!(
        daemon.log_text().contains("reload refused"),
        "{}",
        daemon.log_text()
    );
    let (code, metrics) = http_get(s.port, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("keyrotd_config_last_reload_successful 0"));
    assert!(
        metrics.contains("credential=\"second\""),
        "the running inventory is kept"
    );
}
