//! `revoke = "when_unused"` with the `http` rotator's `last_used` request, against the key API
//! of `keyrotd_test_support::key_api` (which records each key's last whoami): the old key stays
//! while a consumer still calls with it and is revoked once it stops; a failing check is retried
//! and never leads to a revoke. The IAM and PostgreSQL cases are in `aws_e2e::in_use` and
//! `postgres_e2e::in_use`; `tests/run.sh --test integration -- in_use::` runs them all.

use crate::support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use support::key_api::{KeyApi, ADMIN_TOKEN};
use support::*;

/// One `http` credential `billing` with `revoke = "when_unused"`, its key API and a consumer.
struct Setup {
    dir: tempfile::TempDir,
    port: u16,
    api: KeyApi,
}

impl Setup {
    /// `extra` is added to the credential (revoke settings).
    fn new(extra: &str) -> Self {
        let api = KeyApi::start();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{ADMIN_TOKEN}\n")).unwrap();
        let base = api.base();
        let text = format!(
            r#"[daemon]
state = "sqlite:state/keyrotd.db"
listen = "127.0.0.1:{port}"

[[credential]]
id = "billing"
store = {{ kind = "file", path = "{out}", format = "json" }}
rotate_every = "1h"
max_age = "2h"
grace = "1s"
revoke = "when_unused"
revoke_check_every = "1s"
retry = {{ max_attempts = 10, backoff = "1s", max_backoff = "1s" }}
{extra}

[credential.rotator]
kind = "http"
auth = "file:{token}"
secret_pointer = "/key/secret"
id_pointer = "/key/id"
timeout = "5s"
max_retries = 0

[credential.rotator.issue]
url = "{base}/v1/keys"

[credential.rotator.verify]
url = "{base}/v1/whoami"

[credential.rotator.revoke]
method = "DELETE"
url = "{base}/v1/keys/{{{{old_id}}}}"

[credential.rotator.last_used]
url = "{base}/v1/keys/{{{{old_id}}}}"
pointer = "/last_used"
"#,
            out = dir.path().join("out/key.json").display(),
            token = token.display(),
        );
        std::fs::write(dir.path().join("config.toml"), text).unwrap();
        Self { dir, port, api }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        cli(&self.config(), args)
    }

    /// The store's (key id, key).
    fn current(&self) -> (String, String) {
        let text = std::fs::read_to_string(self.dir.path().join("out/key.json")).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let s = |f: &str| v[f].as_str().unwrap().to_owned();
        (s("key_id"), s("api_key"))
    }

    fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status");
        serde_json::from_slice::<Value>(&out.stdout).unwrap()[0].clone()
    }

    fn history(&self) -> String {
        String::from_utf8_lossy(&self.cli(&["history", "billing"]).stdout).into_owned()
    }

    /// Rotates twice: the first key `k1` is published, then replaced by `k2`, so `k1` is the
    /// old key that the second rotation revokes. Returns (k1 id, k1 key, k2 id).
    fn promote_second_key(&self, consumer: impl FnOnce(&str)) -> (String, String, String) {
        assert!(self.cli(&["rotate", "billing"]).status.success());
        let (k1, key1) = self.current();
        consumer(&key1);
        std::thread::sleep(Duration::from_millis(2100));
        let out = self.cli(&["rotate", "billing"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (k2, _) = self.current();
        assert_ne!(k1, k2);
        (k1, key1, k2)
    }

    fn start(&self) -> Daemon {
        Daemon::start(
            &self.config(),
            self.port,
            &self.dir.path().join("daemon.log"),
            &[],
        )
    }
}

/// A consumer calling whoami with one key every 200 ms until stopped.
struct Consumer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Consumer {
    fn start(api_port: u16, key: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, key) = (stop.clone(), key.to_owned());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let _ = http_get_with_bearer(api_port, &key);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Self { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
    }
}

fn http_get_with_bearer(port: u16, key: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /v1/whoami HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n"
    )?;
    s.read_to_end(&mut Vec::new()).map(drop)
}

#[test]
fn in_use_http_last_used_keeps_the_old_key_until_the_consumer_stops() {
    let s = Setup::new("");
    let mut consumer = None;
    let (k1, key1, k2) = s.promote_second_key(|key| {
        consumer = Some(Consumer::start(s.api.port(), key));
    });
    let mut daemon = s.start();
    let waiting = wait_until(Duration::from_secs(20), || {
        s.status()["state"] == "revoke_delayed"
    });
    assert!(waiting, "{}\n{}", s.status(), daemon.log_text());
    let why = s.status()["waiting"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        why.starts_with(&format!("waiting: in use: old key {k1} used since")),
        "{why}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(!s.api.revoked(&k1), "{}", daemon.log_text());

    consumer.unwrap().stop();
    let revoked = wait_until(Duration::from_secs(20), || {
        s.status()["state"] == "idle" && s.api.revoked(&k1)
    });
    assert!(revoked, "{}\n{}", s.status(), daemon.log_text());
    assert!(!s.api.revoked(&k2));
    let metrics = http_get(s.port, "/metrics").unwrap().1;
    assert!(metrics.contains("keyrotd_credential_status{credential=\"billing\""));
    assert_eq!(daemon.terminate(Duration::from_secs(10)).code(), Some(0));
    let history = s.history();
    assert!(
        history.contains(&format!("unused: old key {k1} not used since")),
        "{history}"
    );
    // Everything but the store and the admin token's own file.
    let except = [s.dir.path().join("out"), s.dir.path().join("token")];
    let mut everything = all_bytes(s.dir.path(), &except);
    assert!(everything.len() > 1000, "logs and state were scanned");
    everything.extend(history.as_bytes());
    everything.extend(metrics.as_bytes());
    // Every key the API issued (the old one, the new one), and the admin token.
    let issued: Vec<String> = s.api.lock().keys.values().map(|(k, _)| k.clone()).collect();
    assert!(issued.contains(&key1), "the scan covers the old key");
    for secret in issued.into_iter().chain([ADMIN_TOKEN.to_owned()]) {
        assert!(!contains(&everything, &secret), "a secret leaked");
    }
}

#[test]
fn in_use_http_a_failing_check_is_retried_and_never_revokes() {
    let s = Setup::new("");
    let (k1, _, _) = s.promote_second_key(|_| {});
    s.api.lock().fail_key_info = true;
    let mut daemon = s.start();
    let retried = wait_until(Duration::from_secs(20), || {
        s.status()["consecutive_failures"].as_u64() >= Some(2)
    });
    assert!(retried, "{}\n{}", s.status(), daemon.log_text());
    let status = s.status();
    assert_eq!(status["state"], "retrying", "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("check_use"),
        "{status}"
    );
    assert!(!s.api.revoked(&k1), "no revoke after a failed check");
    assert!(s.history().contains("check_use error"), "{}", s.history());

    // The check works again: the old key, never used, is revoked.
    s.api.lock().fail_key_info = false;
    let revoked = wait_until(Duration::from_secs(20), || s.api.revoked(&k1));
    assert!(revoked, "{}\n{}", s.status(), daemon.log_text());
    assert_eq!(daemon.terminate(Duration::from_secs(10)).code(), Some(0));
    let history = s.history();
    assert!(
        history.contains(&format!("unused: old key {k1} ")),
        "{history}"
    );
}

/// A check that fails, then one that answers "in use": the answer is a success, so the failure
/// before it no longer counts towards `max_attempts` (else scattered provider errors during a
/// long wait would mark the credential failed) and its alert resolves.
#[test]
fn in_use_http_an_answered_check_resets_earlier_check_failures() {
    let s = Setup::new("");
    let mut consumer = None;
    let (k1, _, _) =
        s.promote_second_key(|key| consumer = Some(Consumer::start(s.api.port(), key)));
    let mut daemon = s.start();
    let waiting = |s: &Setup| s.status()["state"] == "revoke_delayed";
    assert!(
        wait_until(Duration::from_secs(20), || waiting(&s)),
        "{}",
        s.status()
    );
    s.api.lock().fail_key_info = true;
    let failed = wait_until(Duration::from_secs(20), || {
        s.status()["consecutive_failures"].as_u64() >= Some(1)
    });
    assert!(failed, "{}\n{}", s.status(), daemon.log_text());
    s.api.lock().fail_key_info = false;
    let answered = wait_until(Duration::from_secs(20), || {
        let status = s.status();
        waiting(&s) && status["consecutive_failures"].as_u64() == Some(0)
    });
    assert!(answered, "{}\n{}", s.status(), daemon.log_text());
    assert!(s.status()["last_error"].is_null(), "{}", s.status());
    assert!(!s.api.revoked(&k1), "still in use: not revoked");
    consumer.take().unwrap().stop();
    assert_eq!(daemon.terminate(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn in_use_http_on_max_revoke_delay_revoke_revokes_a_key_still_in_use() {
    let s = Setup::new("max_revoke_delay = \"2s\"\non_max_revoke_delay = \"revoke\"");
    let mut consumer = None;
    let (k1, _, _) = s.promote_second_key(|key| {
        consumer = Some(Consumer::start(s.api.port(), key));
    });
    let mut daemon = s.start();
    // In use throughout, yet revoked once max_revoke_delay has passed, as configured.
    let revoked = wait_until(Duration::from_secs(20), || s.api.revoked(&k1));
    assert!(revoked, "{}\n{}", s.status(), daemon.log_text());
    consumer.unwrap().stop();
    assert_eq!(daemon.terminate(Duration::from_secs(10)).code(), Some(0));
    let history = s.history();
    assert!(history.contains("in use: old key"), "{history}");
    assert!(history.contains("revoking anyway"), "{history}");
}

#[test]
fn in_use_http_min_quiet_waits_after_the_last_use_seen() {
    let s = Setup::new("revoke_min_quiet = \"4s\"");
    let mut consumer = None;
    let (k1, _, _) = s.promote_second_key(|key| {
        consumer = Some(Consumer::start(s.api.port(), key));
    });
    let mut daemon = s.start();
    let waiting = wait_until(Duration::from_secs(20), || {
        s.status()["state"] == "revoke_delayed"
    });
    assert!(waiting, "{}\n{}", s.status(), daemon.log_text());
    consumer.unwrap().stop();
    let stopped = std::time::Instant::now();
    let revoked = wait_until(Duration::from_secs(20), || s.api.revoked(&k1));
    assert!(revoked, "{}\n{}", s.status(), daemon.log_text());
    // The last check that saw a use began before the consumer stopped: at least 4 s minus one
    // check interval and the second the journal rounds to.
    assert!(
        stopped.elapsed() >= Duration::from_secs(2),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(daemon.terminate(Duration::from_secs(10)).code(), Some(0));
    let history = s.history();
    assert!(history.contains("unused, but quiet for only"), "{history}");
}

#[test]
fn in_use_when_unused_on_a_rotator_that_cannot_check_is_a_config_error_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstate = \"sqlite:state.db\"\n\n[defaults]\nrevoke = \"when_unused\"\n\n\
             [[credential]]\nid = \"db\"\n\
             rotator = {{ kind = \"postgres_password\", admin_dsn = \"env:UNSET\", strategy = \"single\", role = \"app\" }}\n\
             store = {{ kind = \"file\", path = \"{}\", format = \"json\" }}\n\
             rotate_every = \"1d\"\nmax_age = \"2d\"\n",
            dir.path().join("db.json").display()
        ),
    )
    .unwrap();
    let out = cli(&config, &["check"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:9:11: credential[db].revoke: \"when_unused\" needs a rotator",
            config.display()
        )),
        "{err}"
    );
    // The same credential with after_grace (the default) loads.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("when_unused", "after_grace")).unwrap();
    let out = cli(&config, &["policy"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
