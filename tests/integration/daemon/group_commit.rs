//! Group commit under kill -9: the daemon dies while a batch of journal writes from concurrent
//! rotations is written but not yet committed.

use super::*;

const IDS: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];

/// One number from the state database.
fn count(dir: &Path, sql: &str) -> i64 {
    let db = dir.join("state/keyrotd.db");
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Eight credentials rotate at once, so their journal writes share commits. The writer hangs
/// with the first `promote ok` written into its batch but not committed, and the daemon is
/// killed there. Nothing the daemon reported may be missing from the database, and nothing of
/// the open batch may be in it: no `promote ok` line, no rotation past `verified`, no "promoted"
/// log line. A restarted daemon then completes all eight.
#[test]
fn a_kill_inside_a_group_commit_loses_only_what_was_never_reported() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut text = format!(
        "[daemon]\nstate = \"sqlite:state/keyrotd.db\"\nlisten = \"127.0.0.1:{port}\"\nmax_concurrent_rotations = 8\n"
    );
    for id in IDS {
        text += &format!(
            "\n[[credential]]\nid = \"{id}\"\nrotator = {{ kind = \"random\", length = 32 }}\n\
             store = {{ kind = \"file\", path = \"{}\", format = \"json\" }}\n\
             rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"\n",
            dir.path().join(format!("out/{id}.json")).display()
        );
    }
    let config = dir.path().join("config.toml");
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("crashed.log");
    let mut crashed = keyrotd()
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("KEYROTD_FAILPOINT", "promote:ok:uncommitted")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let reached = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("failpoint promote:ok:uncommitted reached")
    });
    // Let the other rotations queue their writes behind the open batch.
    std::thread::sleep(Duration::from_millis(300));
    crashed.kill().unwrap(); // SIGKILL
    crashed.wait().unwrap();
    let crash_log = std::fs::read_to_string(&log).unwrap();
    assert!(reached, "failpoint not reached:\n{crash_log}");

    assert!(
        count(
            dir.path(),
            "SELECT COUNT(*) FROM steps WHERE step = 'promote' AND event = 'start'"
        ) >= 1,
        "the crashed rotation's promote start was committed before its provider call"
    );
    assert_eq!(
        count(
            dir.path(),
            "SELECT COUNT(*) FROM steps WHERE step = 'promote' AND event = 'ok'"
        ),
        0,
        "the batch holding promote ok was never committed"
    );
    assert_eq!(
        count(
            dir.path(),
            "SELECT COUNT(*) FROM rotations WHERE phase IN ('promoted', 'done')"
        ),
        0,
        "no phase past verified is durable"
    );
    assert!(
        !crash_log.contains("new credential promoted"),
        "a promotion was reported that is not durable:\n{crash_log}"
    );

    let daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"), &[]);
    let all_done = || {
        count(
            dir.path(),
            "SELECT COUNT(*) FROM rotations WHERE phase = 'done'",
        ) == IDS.len() as i64
    };
    assert!(
        wait_until(Duration::from_secs(30), all_done),
        "not all resumed:\n{}",
        daemon.log_text()
    );
    assert_eq!(
        count(dir.path(), "SELECT COUNT(*) FROM rotations"),
        IDS.len() as i64,
        "resumed, not restarted"
    );
    for id in IDS {
        let text = std::fs::read_to_string(dir.path().join(format!("out/{id}.json"))).unwrap();
        assert!(text.contains("password"), "{id}: a complete value");
    }
}
