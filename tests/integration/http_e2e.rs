//! The `http` rotator through the real `keyrotd` binary, against the small key API of
//! `keyrotd_test_support::key_api` served by the test itself on loopback. The API issues keys,
//! answers a whoami with a key, revokes keys and then rejects them; faults (429 with
//! Retry-After, 5xx, malformed answers, a verify that rejects every key) are queued per server.

use crate::support;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::key_api::{Fault, KeyApi, ADMIN_TOKEN};
use support::*;

/// A whoami with `key`, as a consumer of the key would make it: the HTTP status.
fn whoami_status(port: u16, key: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /v1/whoami HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// An inventory with one `http` credential `billing` in a JSON file store, and its API.
struct Setup {
    dir: tempfile::TempDir,
    port: u16,
    api: KeyApi,
    api_port: u16,
}

impl Setup {
    fn new(timing: &str) -> Self {
        let api = KeyApi::start();
        let api_port = api.port();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{ADMIN_TOKEN}\n")).unwrap();
        let base = format!("http://127.0.0.1:{api_port}");
        let text = format!(
            r#"[daemon]
state = "sqlite:state/keyrotd.db"
listen = "127.0.0.1:{port}"

[[credential]]
id = "billing"
store = {{ kind = "file", path = "{out}", format = "json" }}
{timing}

[credential.rotator]
kind = "http"
auth = "file:{token}"
secret_pointer = "/key/secret"
id_pointer = "/key/id"
max_retries = 3
max_retry_after_secs = 5
timeout = "5s"

[credential.rotator.issue]
method = "POST"
url = "{base}/v1/keys"
body = {{ name = "keyrotd-{{{{credential_id}}}}", replaces = "{{{{old_id}}}}" }}

[credential.rotator.verify]
url = "{base}/v1/whoami"
expect_status = 200
expect_pointer = "/id"
expect_value = "{{{{new_id}}}}"

[credential.rotator.revoke]
method = "DELETE"
url = "{base}/v1/keys/{{{{old_id}}}}"
"#,
            out = dir.path().join("out/key.json").display(),
            token = token.display(),
        );
        std::fs::write(dir.path().join("config.toml"), text).unwrap();
        Self {
            dir,
            port,
            api,
            api_port,
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    fn cli(&self, args: &[&str]) -> Output {
        cli(&self.config(), args)
    }

    /// The store's (key id, key).
    fn current(&self) -> Option<(String, String)> {
        let text = std::fs::read_to_string(self.out().join("key.json")).ok()?;
        let v: Value = serde_json::from_str(&text).expect("the store file is complete JSON");
        Some((
            v["key_id"].as_str().expect("a key_id field").to_owned(),
            v["api_key"].as_str().expect("an api_key field").to_owned(),
        ))
    }

    fn out_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.out())
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status: {}", stderr(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()[0].clone()
    }

    fn history(&self) -> String {
        String::from_utf8_lossy(&self.cli(&["history", "billing"]).stdout).into_owned()
    }

    fn revoked(&self, id: &str) -> bool {
        self.api.revoked(id)
    }

    /// No key the API ever issued, nor the admin token, appears in logs, the state database or
    /// the CLI's output: only in the store's own files (and the token in its file).
    fn assert_no_leak(&self, extra: &[String]) {
        let mut everything = all_bytes(
            self.dir.path(),
            &[self.out(), self.dir.path().join("token")],
        );
        everything.extend(self.history().as_bytes());
        everything.extend(self.status().to_string().as_bytes());
        for e in extra {
            everything.extend(e.as_bytes());
        }
        assert!(self.dir.path().join("state/keyrotd.db").exists());
        let secrets: Vec<String> = self
            .api
            .lock()
            .keys
            .values()
            .map(|(s, _)| s.clone())
            .collect();
        assert!(!secrets.is_empty());
        for secret in secrets.iter().map(String::as_str).chain([ADMIN_TOKEN]) {
            assert!(
                !contains(&everything, secret),
                "a key or the admin token leaked into logs, state or CLI output"
            );
        }
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn error_line(out: &Output) -> String {
    let err = stderr(out);
    err.lines()
        .rfind(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("an error line in:\n{err}"))
        .to_owned()
}

const MANUAL: &str = "rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"";

#[test]
fn rotate_issues_verifies_and_revokes_the_old_key() {
    let s = Setup::new(MANUAL);
    let first = s.cli(&["rotate", "billing"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let (id1, key1) = s.current().unwrap();
    assert_eq!(id1, "k1");
    assert_eq!(whoami_status(s.api_port, &key1), 200);

    let second = s.cli(&["rotate", "billing"]);
    assert!(second.status.success(), "{}", stderr(&second));
    let (id2, key2) = s.current().unwrap();
    assert_eq!(id2, "k2");
    assert!(s.revoked("k1"), "the old key is revoked");
    assert!(!s.revoked("k2"), "the new key is live");
    assert_eq!(
        whoami_status(s.api_port, &key1),
        401,
        "the revoked key is rejected by the API"
    );
    assert_eq!(whoami_status(s.api_port, &key2), 200);
    assert_eq!(
        s.api.lock().bodies,
        [
            json!({"name": "keyrotd-billing", "replaces": ""}),
            json!({"name": "keyrotd-billing", "replaces": "k1"})
        ]
    );
    assert_eq!(s.status()["state"], "idle");
    assert_eq!(s.history().matches("  billing  done").count(), 2);
    assert_eq!(s.out_files(), ["key.json", "key.json.keyrotd"]);
    s.assert_no_leak(&[stderr(&first), stderr(&second)]);
}

#[test]
fn verify_failure_rolls_back_revokes_the_issued_key_and_keeps_the_store() {
    let s = Setup::new(MANUAL);
    assert!(s.cli(&["rotate", "billing"]).status.success());
    let before = std::fs::read(s.out().join("key.json")).unwrap();
    let (_, key1) = s.current().unwrap();

    s.api.lock().reject_verify = true;
    let out = s.cli(&["rotate", "billing"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let line = error_line(&out);
    eprintln!("verify failure as reported: {line}");
    for want in ["credential `billing`", "step verify failed", "401"] {
        assert!(line.contains(want), "want `{want}` in: {line}");
    }
    assert!(
        s.revoked("k2"),
        "the issued key was revoked by the rollback"
    );
    assert!(!s.revoked("k1"), "the current key was left alone");
    assert_eq!(
        std::fs::read(s.out().join("key.json")).unwrap(),
        before,
        "the store is unchanged"
    );
    assert_eq!(
        s.out_files(),
        ["key.json", "key.json.keyrotd"],
        "the pending key was discarded"
    );
    assert!(
        s.history().contains("  billing  rolled_back"),
        "{}",
        s.history()
    );
    let status = s.status();
    assert_eq!(status["consecutive_failures"], 1, "{status}");
    s.api.lock().reject_verify = false;
    assert_eq!(
        whoami_status(s.api_port, &key1),
        200,
        "consumers keep working"
    );
    s.assert_no_leak(&[stderr(&out), status.to_string()]);
}

#[test]
fn throttling_and_server_errors_are_retried_then_succeed() {
    let s = Setup::new(MANUAL);
    s.api
        .lock()
        .issue_faults
        .push_back(Fault::Status(429, Some(1)));
    let started = Instant::now();
    let out = s.cli(&["rotate", "billing"]);
    let took = started.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        took >= Duration::from_secs(1),
        "Retry-After: 1 was honoured ({took:?})"
    );
    assert_eq!(s.api.lock().issue_calls, 2);
    assert_eq!(s.current().unwrap().0, "k1");

    s.api
        .lock()
        .issue_faults
        .extend([Fault::Status(503, None), Fault::Status(500, None)]);
    let out = s.cli(&["rotate", "billing"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(s.api.lock().issue_calls, 5, "two 5xx then success");
    assert_eq!(s.current().unwrap().0, "k2");
    assert!(s.revoked("k1"));

    // Throttled for longer than max_retry_after_secs: fails at once, transient, store unchanged.
    s.api
        .lock()
        .issue_faults
        .push_back(Fault::Status(429, Some(3600)));
    let before = std::fs::read(s.out().join("key.json")).unwrap();
    let out = s.cli(&["rotate", "billing"]);
    assert_eq!(out.status.code(), Some(1));
    let line = error_line(&out);
    eprintln!("long throttle as reported: {line}");
    for want in [
        "credential `billing`",
        "step issue failed",
        "Retry-After",
        "429",
    ] {
        assert!(line.contains(want), "want `{want}` in: {line}");
    }
    assert_eq!(std::fs::read(s.out().join("key.json")).unwrap(), before);
    assert_eq!(s.status()["state"], "retrying");
    s.assert_no_leak(&[]);
}

#[test]
fn malformed_answers_fail_clearly_and_change_nothing() {
    let s = Setup::new(MANUAL);
    assert!(s.cli(&["rotate", "billing"]).status.success());
    let before = std::fs::read(s.out().join("key.json")).unwrap();

    s.api
        .lock()
        .issue_faults
        .push_back(Fault::Body(r#"{"key": {"id": "ID"}}"#));
    let out = s.cli(&["rotate", "billing"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let line = error_line(&out);
    eprintln!("missing secret as reported: {line}");
    for want in [
        "credential `billing`",
        "step issue failed",
        "/key/secret",
        "malformed",
        "key k2 was revoked",
    ] {
        assert!(line.contains(want), "want `{want}` in: {line}");
    }
    assert!(s.revoked("k2"), "the unusable key was revoked");
    assert_eq!(std::fs::read(s.out().join("key.json")).unwrap(), before);

    s.api
        .lock()
        .issue_faults
        .push_back(Fault::Body("<html>oops</html>"));
    let out = s.cli(&["rotate", "billing"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let line = error_line(&out);
    eprintln!("not JSON as reported: {line}");
    for want in ["credential `billing`", "step issue failed", "not JSON"] {
        assert!(line.contains(want), "want `{want}` in: {line}");
    }
    assert!(!stderr(&out).contains("oops"), "the body is not quoted");
    assert_eq!(std::fs::read(s.out().join("key.json")).unwrap(), before);
    assert_eq!(s.out_files(), ["key.json", "key.json.keyrotd"]);
    assert!(!s.revoked("k1"), "the current key still works");
    s.assert_no_leak(&[]);
}

#[test]
fn run_rotates_on_schedule_and_revokes_each_old_key_after_grace() {
    let s = Setup::new("rotate_every = \"2s\"\nmax_age = \"10s\"\ngrace = \"1s\"");
    let log = s.dir.path().join("daemon.log");
    let mut daemon = Daemon::start(&s.config(), s.port, &log, &[]);
    let mut seen: Vec<(String, String)> = Vec::new();
    let four = wait_until(Duration::from_secs(60), || {
        if let Some(v) = s.current() {
            if seen.last() != Some(&v) {
                seen.push(v);
            }
        }
        seen.len() >= 4
    });
    assert!(four, "seen {}: {}", seen.len(), daemon.log_text());
    // Every replaced key is revoked once its grace period is over; the published one stays live.
    let n = seen.len();
    assert!(
        wait_until(Duration::from_secs(10), || seen[..n - 1]
            .iter()
            .all(|(id, _)| s.revoked(id))),
        "{:?}",
        s.api.lock().keys.keys().collect::<Vec<_>>()
    );
    let metrics = http_get(s.port, "/metrics").unwrap().1;
    let status = s.status();
    assert_eq!(daemon.terminate(Duration::from_secs(10)).code(), Some(0));
    let (id, key) = s.current().unwrap();
    assert!(!s.revoked(&id));
    assert_eq!(whoami_status(s.api_port, &key), 200);
    for (_, old) in &seen[..n - 1] {
        assert_eq!(
            whoami_status(s.api_port, old),
            401,
            "a replaced key is rejected"
        );
    }
    s.assert_no_leak(&[metrics, status.to_string()]);
}

impl Setup {
    /// Points the rotator at `silent` (a key API behind a silent partition) with a 10m plugin
    /// timeout, so its step hangs until the daemon's 2s shutdown deadline interrupts it. Returns
    /// the working inventory, to heal the partition later.
    fn hang_on(&self, silent: &support::silent::Silent) -> String {
        let working = std::fs::read_to_string(self.config()).unwrap();
        let hung = working
            .replace(
                &format!("http://127.0.0.1:{}", self.api_port),
                &silent.url(),
            )
            .replace("timeout = \"5s\"", "timeout = \"10m\"")
            .replacen("[daemon]\n", "[daemon]\nshutdown_timeout = \"2s\"\n", 1);
        std::fs::write(self.config(), hung).unwrap();
        working
    }
}

/// SIGTERM (and its wait for in-flight steps) must end within the 2s shutdown deadline plus the
/// daemon's own wind-down; the old code waited for the hung step for good.
const STOPS_WITHIN: Duration = Duration::from_secs(6);

#[test]
fn sigterm_interrupts_a_step_hung_on_a_silent_api_and_a_restart_resumes_it() {
    let s = Setup::new("rotate_every = \"1d\"\nmax_age = \"2d\"");
    let silent = support::silent::Silent::start();
    let working = s.hang_on(&silent);
    let log = s.dir.path().join("daemon.log");
    let mut daemon = Daemon::start(&s.config(), s.port, &log, &[]);
    assert!(
        wait_until(Duration::from_secs(10), || silent.accepted() >= 1),
        "the overdue rotation's issue reached the silent API: {}",
        daemon.log_text()
    );
    std::thread::sleep(Duration::from_millis(300));
    let stopping = Instant::now();
    // The outer guard: `terminate` panics instead of waiting past it.
    let status = daemon.terminate(Duration::from_secs(20));
    let took = stopping.elapsed();
    assert_eq!(status.code(), Some(0), "{}", daemon.log_text());
    assert!(
        took >= Duration::from_millis(1900) && took < STOPS_WITHIN,
        "waited for the step up to the 2s shutdown deadline, then stopped: {took:?}"
    );
    let text = daemon.log_text();
    assert!(text.contains("step interrupted"), "{text}");
    assert!(s.history().contains("interrupted"), "{}", s.history());
    assert_eq!(s.current(), None, "nothing was published");

    // The partition heals: the next start resumes the rotation from the journal and completes it.
    std::fs::write(s.config(), working).unwrap();
    let mut daemon = Daemon::start(&s.config(), s.port, &log, &[]);
    assert!(
        wait_until(Duration::from_secs(30), || s.current().is_some()),
        "{}",
        daemon.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(10), || s.status()["state"] == "grace"),
        "{}",
        s.status()
    );
    assert_eq!(daemon.terminate(Duration::from_secs(20)).code(), Some(0));
    let (id, key) = s.current().unwrap();
    assert!(!s.revoked(&id));
    assert_eq!(whoami_status(s.api_port, &key), 200);
    s.assert_no_leak(&[]);
}

#[test]
fn sighup_loads_the_new_inventory_while_a_step_hangs() {
    let s = Setup::new("rotate_every = \"1d\"\nmax_age = \"2d\"");
    let silent = support::silent::Silent::start();
    s.hang_on(&silent);
    let log = s.dir.path().join("daemon.log");
    let mut daemon = Daemon::start(&s.config(), s.port, &log, &[]);
    assert!(
        wait_until(Duration::from_secs(10), || silent.accepted() >= 1),
        "{}",
        daemon.log_text()
    );
    let text = std::fs::read_to_string(s.config()).unwrap();
    std::fs::write(
        s.config(),
        text.replace("max_age = \"2d\"", "max_age = \"3d\""),
    )
    .unwrap();
    signal(daemon.child.id(), "HUP");
    assert!(
        wait_until(STOPS_WITHIN, || daemon
            .log_text()
            .contains("inventory reloaded")),
        "the reload waited for the hung step: {}",
        daemon.log_text()
    );
    // The new generation resumes the interrupted rotation at once (and hangs on the API again).
    assert!(
        wait_until(Duration::from_secs(10), || silent.accepted() >= 2),
        "{}",
        daemon.log_text()
    );
    assert_eq!(daemon.terminate(Duration::from_secs(20)).code(), Some(0));
}
