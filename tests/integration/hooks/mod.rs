//! Delivery hooks through the real binary: a consumer process that reads the `http` rotator's key
//! from a file store and reloads it on SIGHUP (a `signal` hook) or when a "systemctl reload"
//! script tells it to (an `exec` hook), used continuously against the test key API: no use
//! fails across rotations, and each old key is revoked only after the consumer reloaded. Then
//! failing, hanging and crashed hooks, and hostile pid files and configurations (`hostile.rs`).

use crate::support;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::key_api::{KeyApi, ADMIN_TOKEN};
use support::*;

mod alerts;
mod failures;
mod hostile;
mod kinds;

/// An inventory with one `http` credential `api` in a JSON file store, its key API, and the
/// hook tables given.
pub(super) struct Setup {
    pub(super) dir: tempfile::TempDir,
    pub(super) port: u16,
    pub(super) api: KeyApi,
}

impl Setup {
    pub(super) fn new(timing: &str, hooks: &str) -> Self {
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
id = "api"
store = {{ kind = "file", path = "{out}", format = "json" }}
{timing}

[credential.rotator]
kind = "http"
auth = "file:{token}"
secret_pointer = "/key/secret"
id_pointer = "/key/id"
timeout = "5s"

[credential.rotator.issue]
url = "{base}/v1/keys"

[credential.rotator.verify]
url = "{base}/v1/whoami"

[credential.rotator.revoke]
method = "DELETE"
url = "{base}/v1/keys/{{{{old_id}}}}"

{hooks}
"#,
            out = dir.path().join("out/key.json").display(),
            token = token.display(),
        );
        std::fs::write(dir.path().join("config.toml"), text).unwrap();
        Self { dir, port, api }
    }

    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(super) fn config(&self) -> PathBuf {
        self.path("config.toml")
    }

    pub(super) fn cli(&self, args: &[&str]) -> Output {
        cli(&self.config(), args)
    }

    /// Writes an executable script.
    pub(super) fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// The store's (key id, key).
    pub(super) fn current(&self) -> (String, String) {
        key_of(&self.path("out/key.json")).expect("a stored key")
    }

    /// Every journal line: (at_ms, step, event, detail), in order.
    pub(super) fn journal(&self) -> Vec<(i64, String, String, String)> {
        let db = rusqlite::Connection::open(self.path("state/keyrotd.db")).unwrap();
        let mut stmt = db
            .prepare("SELECT at_ms, step, event, COALESCE(detail, '') FROM steps ORDER BY seq")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    /// The journal's `step event` pairs, in order, for lines of `step`s in `steps`.
    pub(super) fn events(&self, steps: &[&str]) -> Vec<String> {
        self.journal()
            .into_iter()
            .filter(|(_, s, _, _)| steps.contains(&s.as_str()))
            .map(|(_, s, e, _)| format!("{s} {e}"))
            .collect()
    }

    /// Checks that no secret the API ever issued is in the state, the logs, the outputs given or
    /// anything else in the directory but the store and the consumer's copy of it.
    pub(super) fn leak_scan(&self, extra: &[&str]) {
        let except = [self.path("out"), self.path("consumer.current")];
        let mut all = all_bytes(self.dir.path(), &except);
        all.extend(extra.iter().flat_map(|e| e.bytes()));
        let all = String::from_utf8_lossy(&all);
        for (_, (secret, _)) in self.api.lock().keys.iter() {
            for e in encodings(secret) {
                assert!(!all.contains(&e), "a key leaked");
            }
        }
    }
}

fn key_of(path: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    Some((
        v["key_id"].as_str()?.to_owned(),
        v["api_key"].as_str()?.to_owned(),
    ))
}

/// GET /v1/whoami with `key`: whether the API accepted it.
fn works(api_port: u16, key: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", api_port)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let request = format!(
        "GET /v1/whoami HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n"
    );
    let mut answer = String::new();
    s.write_all(request.as_bytes()).unwrap();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
}

/// A consumer process: copies the store's file to `consumer.current` at start and on SIGHUP,
/// logging `reload MS` to `consumer.log`; its pid is in `consumer.pid`. A thread in the test
/// uses the consumer's copy against the API continuously and counts the failures.
pub(super) struct Consumer {
    child: Child,
    stop: Arc<AtomicBool>,
    pub(super) failures: Arc<AtomicU32>,
    pub(super) uses: Arc<AtomicU32>,
    user: Option<std::thread::JoinHandle<()>>,
}

impl Consumer {
    pub(super) fn start(s: &Setup) -> Self {
        let script = s.script(
            "consumer.sh",
            &format!(
                "cd {dir}\nload() {{ cp out/key.json consumer.tmp 2>/dev/null && mv consumer.tmp consumer.current && echo \"reload $(date +%s%3N)\" >> consumer.log; }}\n\
                 trap load HUP\nload\necho $$ > consumer.pid.tmp && mv consumer.pid.tmp consumer.pid\n\
                 while :; do sleep 0.05 & wait $!; done",
                dir = s.dir.path().display()
            ),
        );
        let mut command = Command::new(script);
        // A shell cannot trap a signal that was ignored when it started, and the test may run
        // under `nohup` (SIGHUP ignored, inherited): the consumer gets SIGHUP's default back.
        // SAFETY: pre_exec runs in the forked child; signal() is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::signal(libc::SIGHUP, libc::SIG_DFL);
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        assert!(wait_until(Duration::from_secs(5), || s
            .path("consumer.pid")
            .exists()));
        let (stop, failures, uses) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU32::new(0)),
            Arc::new(AtomicU32::new(0)),
        );
        let (port, current) = (s.api.port(), s.path("consumer.current"));
        let (st, fa, us) = (stop.clone(), failures.clone(), uses.clone());
        let user = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                if let Some((_, key)) = key_of(&current) {
                    us.fetch_add(1, Ordering::SeqCst);
                    if !works(port, &key) {
                        fa.fetch_add(1, Ordering::SeqCst);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            child,
            stop,
            failures,
            uses,
            user: Some(user),
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(user) = self.user.take() {
            let _ = user.join();
        }
    }
}

/// The consumer's reload times (Unix ms).
fn reloads(s: &Setup) -> Vec<i64> {
    std::fs::read_to_string(s.path("consumer.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("reload ")?.parse().ok())
        .collect()
}

/// Every `revoke ok` comes after a consumer reload that followed the `notify ok` of its
/// rotation: (for each revoke) the last reload before it is later than the last `promote ok`.
fn revokes_follow_reloads(s: &Setup) -> usize {
    let journal = s.journal();
    let reloads = reloads(s);
    let mut promoted = 0;
    let mut revokes = 0;
    for (at, step, event, _) in &journal {
        match (step.as_str(), event.as_str()) {
            ("promote", "ok") => promoted = *at,
            ("revoke", "start") => {
                revokes += 1;
                assert!(
                    reloads.iter().any(|&r| r > promoted && r < *at),
                    "revoke at {at} with no consumer reload since the promotion at {promoted}: {reloads:?}\n{journal:?}"
                );
            }
            _ => {}
        }
    }
    revokes
}

#[test]
fn a_signal_hook_reloads_the_consumer_before_each_revoke_and_no_use_fails() {
    let s = Setup::new(
        "rotate_every = \"3s\"\nmax_age = \"1h\"\ngrace = \"1s\"",
        "[[credential.hook]]\nkind = \"signal\"\npid_file = \"PID\"\nsignal = \"HUP\"\ntimeout = \"5s\"",
    );
    let text = std::fs::read_to_string(s.config()).unwrap();
    let pid_file = s.path("consumer.pid").display().to_string();
    std::fs::write(s.config(), text.replace("PID", &pid_file)).unwrap();
    // Started before the first key exists: it loads the key on the first hook's SIGHUP.
    let consumer = Consumer::start(&s);
    let daemon = Daemon::start(&s.config(), s.port, &s.path("daemon.log"), &[]);
    assert!(
        wait_until(Duration::from_secs(40), || revokes_follow_reloads(&s) >= 3),
        "three revocations; log:\n{}",
        daemon.log_text()
    );
    let metrics = http_get(s.port, "/metrics").unwrap().1;
    let (uses, failures) = (
        consumer.uses.load(Ordering::SeqCst),
        consumer.failures.load(Ordering::SeqCst),
    );
    drop(daemon);
    drop(consumer);
    assert!(uses > 50, "the consumer was used continuously: {uses}");
    assert_eq!(failures, 0, "no use failed in {uses}");
    let revokes = revokes_follow_reloads(&s) as u64;
    let ok: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "keyrotd_hook_runs_total{credential=\"api\",kind=\"signal\",result=\"ok\"} ",
            )
        })
        .expect("the hook counter")
        .parse()
        .unwrap();
    assert!(
        ok > revokes,
        "one hook run per promotion: {ok} runs, {revokes} revokes"
    );
    let details: Vec<String> = s
        .journal()
        .into_iter()
        .filter(|(_, step, event, _)| step == "notify" && event == "ok")
        .map(|(_, _, _, d)| d)
        .collect();
    assert!(
        details.iter().all(|d| d == "promote hook 0 (signal)"),
        "{details:?}"
    );
    s.leak_scan(&[&metrics]);
}
