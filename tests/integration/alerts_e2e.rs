//! Issue 5's end-to-end test: a real Prometheus scrapes a real `keyrotd run`, the shipped alert
//! rules fire and resolve, and the daemon's own notifications reach the aiosmtpd sink (started by
//! tests/run.sh) and a webhook receiver served by this test, exactly once each.
//!
//! The inventory has three credentials:
//! - `healthy`: rotates at start-up and stays fine; nothing may alert about it;
//! - `stale`: a yearly cron schedule (`0 0 1 1 *`, window 1h, max_age 400d) whose last rotation is
//!   backdated to 401 days ago in the state database before the daemon starts, as if the daemon had
//!   been down through its last cron fire: the missed fire's window is long closed, so the daemon
//!   waits for next 1 January and the credential is stale right away. (max_age must exceed the
//!   rotation period, so a credential whose schedule keeps running cannot go stale by waiting; the
//!   backdating is the honest shortcut.)
//! - `failing`: a `file` store below a dangling symbolic link, so reading the current value finds
//!   nothing (ENOENT) but staging cannot create the directory (EEXIST): every attempt fails at
//!   `stage` and rolls back cleanly. With `max_attempts = 2` and a 1 s backoff it is marked failed
//!   within seconds.
//!
//! Recovery: the symbolic link is replaced by a directory and both credentials are rotated with
//! `keyrotd rotate` while the daemon runs; the daemon notices the other process's commits within
//! seconds (it watches SQLite's `data_version`), updates its metrics and sends the resolved
//! notifications. Finally the daemon is killed and KeyrotdAbsent fires.
//!
//! The rules' `for:` durations (marked `# TUNE`) are rewritten to 0s in a copy; everything else is
//! the shipped file. Needs `prometheus` (Debian package) and tests/run.sh's SMTP sink.

use crate::support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::prometheus::PrometheusServer;
use support::webhook::Receiver;
use support::{backend_env, cli, free_port, Daemon};

/// (credential, condition, status) of every webhook notification, in arrival order.
fn notifications(receiver: &Receiver) -> Vec<Note> {
    receiver
        .received()
        .iter()
        .map(|r| {
            let b = &r.body;
            assert_eq!(b["repeat"], false, "no repeat within repeat_interval: {b}");
            let s = |f: &str| b[f].as_str().unwrap_or_default().to_owned();
            (s("credential"), s("condition"), s("status"))
        })
        .collect()
}

type Note = (String, String, String);

/// (credential, condition, status) of every mail in the SMTP sink whose body mentions `tag`.
fn mails(tag: &str) -> Vec<Note> {
    let dir = backend_env("KEYROTD_TEST_SMTP_DIR");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read SMTP sink folder {dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap().replace("=\r\n", ""))
        .filter(|m| m.contains(tag))
        .map(|m| {
            assert!(
                !m.contains("(still active)"),
                "no repeat within repeat_interval:\n{m}"
            );
            let field = |name: &str| {
                m.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.split_whitespace().next())
                    .unwrap_or_else(|| panic!("no `{name}` line in mail:\n{m}"))
                    .to_owned()
            };
            (
                field("credential: "),
                field("condition: "),
                field("status: "),
            )
        })
        .collect()
}

fn note(credential: &str, condition: &str, status: &str) -> Note {
    (credential.into(), condition.into(), status.into())
}

fn set(notes: &[Note]) -> BTreeSet<Note> {
    notes.iter().cloned().collect()
}

/// Waits until both channels got exactly `expected` (in any order, no duplicates), then checks
/// that nothing more arrives for a moment.
async fn wait_for_notifications(receiver: &Receiver, tag: &str, expected: &[Note], what: &str) {
    let want = set(expected);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (hook, mail) = (notifications(receiver), mails(tag));
        if set(&hook) == want && set(&mail) == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: expected {want:#?}\nwebhook got {hook:#?}\nSMTP sink got {mail:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (hook, mail) = (notifications(receiver), mails(tag));
    assert_eq!(
        hook.len(),
        expected.len(),
        "{what}: webhook duplicates: {hook:#?}"
    );
    assert_eq!(
        mail.len(),
        expected.len(),
        "{what}: mail duplicates: {mail:#?}"
    );
    assert_eq!(set(&hook), want, "{what}: webhook");
    assert_eq!(set(&mail), want, "{what}: mail");
}

/// Runs a blocking helper (the support module is synchronous) on this multi-threaded runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn prometheus_and_notifications_follow_a_stale_and_a_failing_credential() {
    let started = Instant::now();
    let smtp_port = backend_env("KEYROTD_TEST_SMTP_PORT");
    let receiver = Receiver::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Unique ids: the SMTP sink is shared by every test of the run.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let tag = format!("e2e{}x{nanos}", std::process::id());
    let (healthy, stale, failing) = (
        format!("healthy-{tag}"),
        format!("stale-{tag}"),
        format!("failing-{tag}"),
    );
    std::fs::create_dir(root.join("out")).unwrap();
    // A dangling symbolic link where the failing store's directory should be.
    let blocked = root.join("blocked");
    std::os::unix::fs::symlink(root.join("nowhere/at/all"), &blocked).unwrap();

    let port = free_port();
    let config = root.join("config.toml");
    let random = "rotator = { kind = \"random\", length = 32 }";
    std::fs::write(
        &config,
        format!(
            r#"[daemon]
state = "sqlite:state/keyrotd.db"
listen = "127.0.0.1:{port}"

[alerts]
repeat_interval = "1h"
warn_before = "1m"
delivery_backoff = "200ms"

[[alerts.channel]]
name = "mail"
kind = "email"
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
from = "keyrotd <keyrotd@example.test>"
to = ["ops@example.test"]

[[alerts.channel]]
name = "hook"
kind = "webhook"
url = "{hook}"

[[credential]]
id = "{healthy}"
{random}
store = {{ kind = "file", path = "{out}/healthy" }}
rotate_every = "1h"
max_age = "2h"
grace = "1s"

[[credential]]
id = "{stale}"
{random}
store = {{ kind = "file", path = "{out}/stale" }}
schedule = "0 0 1 1 *"
window = "1h"
max_age = "400d"
grace = "1s"

[[credential]]
id = "{failing}"
{random}
store = {{ kind = "file", path = "{blocked}/secret" }}
rotate_every = "1h"
max_age = "2h"
grace = "1s"
retry = {{ max_attempts = 2, backoff = "1s", max_backoff = "1s" }}
"#,
            hook = receiver.url,
            out = root.join("out").display(),
            blocked = blocked.display(),
        ),
    )
    .unwrap();
    let check = blocking(|| cli(&config, &["check"]));
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Backdate `stale`'s last rotation: 401 days ago, past its 400-day max age.
    {
        use keyrotd::state::{CredentialRecord, SqliteState, StateStore};
        let state = SqliteState::open(&root.join("state/keyrotd.db")).unwrap();
        let mut record = CredentialRecord::new(&stale);
        record.issued_at = Some(chrono::Utc::now().timestamp() - 401 * 86400);
        state.put_credential(&record).await.unwrap();
    }

    let log = root.join("daemon.log");
    let mut daemon = blocking(|| Daemon::start(&config, port, &log, &[]));
    let target = format!("127.0.0.1:{port}");
    let prometheus = PrometheusServer::start(std::slice::from_ref(&target)).await;

    // 1. The shipped rules fire for the broken credentials, and only for them.
    prometheus
        .wait_for_firing(
            &[
                ("KeyrotdCredentialStale", &stale),
                ("KeyrotdRotationFailing", &failing),
                ("KeyrotdCredentialFailed", &failing),
            ],
            "broken credentials",
            Duration::from_secs(30),
        )
        .await;
    let firing = [
        note(&stale, "stale", "firing"),
        note(&failing, "rotation_failed", "firing"),
        note(&failing, "automation_stopped", "firing"),
    ];
    wait_for_notifications(&receiver, &tag, &firing, "firing").await;
    let failing_status = blocking(|| cli(&config, &["status", "--json"]));
    let rows: Value = serde_json::from_slice(&failing_status.stdout).unwrap();
    let row = |id: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(row(&failing)["state"], "failed", "{rows:#}");
    assert_eq!(row(&failing)["consecutive_failures"], 2, "{rows:#}");
    assert_eq!(row(&stale)["stale"], true, "{rows:#}");
    assert_eq!(row(&healthy)["stale"], false, "{rows:#}");

    // 2. Recovery by hand, while the daemon runs: fix the store, rotate both.
    std::fs::remove_file(&blocked).unwrap();
    std::fs::create_dir(&blocked).unwrap();
    for id in [&stale, &failing] {
        let out = blocking(|| cli(&config, &["rotate", id]));
        assert!(
            out.status.success(),
            "keyrotd rotate {id}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let recovered = Instant::now();
    prometheus
        .wait_for_firing(&[], "after recovery", Duration::from_secs(20))
        .await;
    let resolve_seconds = recovered.elapsed().as_secs_f64();
    let mut all = firing.to_vec();
    all.extend([
        note(&stale, "stale", "resolved"),
        note(&failing, "rotation_failed", "resolved"),
        note(&failing, "automation_stopped", "resolved"),
    ]);
    wait_for_notifications(&receiver, &tag, &all, "resolved").await;
    assert!(
        all.iter().all(|(c, _, _)| c != &healthy),
        "nothing about the healthy credential"
    );
    // The daemon revokes the old credentials of the manual rotations after their grace period.
    let daemon_log = root.join("daemon.log");
    assert!(
        support::wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(&daemon_log)
                .unwrap_or_default()
                .matches("old credential revoked; rotation complete")
                .count()
                >= 3
        }),
        "the daemon completes the manual rotations (healthy's start-up rotation counts as one):\n{}",
        daemon.log_text()
    );

    // 3. The daemon dies: KeyrotdAbsent fires, and the credential alerts go with its series.
    blocking(|| daemon.kill9());
    prometheus
        .wait_for_firing(
            &[("KeyrotdAbsent", &target)],
            "daemon killed",
            Duration::from_secs(20),
        )
        .await;
    eprintln!(
        "alerts e2e: {:.1}s in all, alerts resolved {resolve_seconds:.1}s after the manual rotations",
        started.elapsed().as_secs_f64()
    );
}
