//! kill -9 of `keyrotd rotate` at each step boundary of a `postgres_password` rotation, then
//! `keyrotd run` finishes or rolls back the rotation and the store's value logs in.

use super::*;

/// Rotates once so there is a current value to protect, kills a second `keyrotd rotate` with
/// kill -9 at `point`, then lets `keyrotd run` finish or roll back the rotation.
fn crash_and_resume(s: &Setup, point: &str) -> Vec<String> {
    let first = s.cli(&["rotate", "db"]);
    assert!(first.status.success(), "{point}: {}", stderr(&first));
    let v0 = s.current().unwrap();
    assert_eq!(login(&v0.username, &v0.password), Ok(()), "{point}");

    let log = s.dir.path().join(format!("crashed-{point}.log"));
    crash_at(&s.config(), "db", point, &[(DSN_VAR, s.dsn.as_str())], &log);

    let after_crash = s.current().expect("a current value survives the crash");
    if !point.starts_with("promote:") || point == "promote:start" {
        assert_eq!(
            after_crash, v0,
            "{point}: nothing was promoted before the crash"
        );
    }
    // For the record: does the consumer's value work while the rotation hangs unfinished?
    let during = login(&after_crash.username, &after_crash.password);
    eprintln!("{point}: while crashed, the store's value logs in: {during:?}");

    let log_name = format!("daemon-{point}.log");
    let mut daemon = s.start(&log_name);
    let settled = wait_until(Duration::from_secs(40), || {
        let h = s.history();
        h.lines().filter(|l| l.contains("  db  ")).count() == 2
            && h.lines()
                .filter(|l| l.contains("  db  done") || l.contains("  db  rolled_back"))
                .count()
                == 2
            && s.status()["state"] == "idle"
    });
    assert!(
        settled,
        "{point}: not resumed: {} files {:?}\n{}\n{}",
        s.status(),
        s.out_files(),
        s.history(),
        daemon.log_text()
    );
    assert_eq!(daemon.terminate(Duration::from_secs(20)).code(), Some(0));
    assert!(
        daemon.log_text().contains("resuming rotation"),
        "{point}: {}",
        daemon.log_text()
    );

    let v1 = s.current().unwrap();
    assert_eq!(
        login(&v1.username, &v1.password),
        Ok(()),
        "{point}: the store's password always logs in afterwards"
    );
    let history = s.history();
    if v1 != v0 {
        assert_eq!(
            history.matches("  db  done").count(),
            2,
            "{point}: {history}"
        );
        // Single: replaced in place. Alternating with grace 0: the old role was scrambled.
        assert_eq!(
            login(&v0.username, &v0.password).unwrap_err(),
            "28P01",
            "{point}: the old password is refused"
        );
    }
    assert_eq!(
        s.out_files(),
        ["db.json", "db.json.keyrotd"],
        "{point}: no leftovers"
    );
    eprintln!(
        "{point}: {} ({})",
        if v1 != v0 { "completed" } else { "rolled back" },
        v1.username
    );
    let mut secrets = vec![v0.password, v1.password];
    secrets.dedup();
    secrets
}

const CRASH_POINTS: [&str; 9] = [
    "issue:ok",
    "stage:ok",
    "activate:start",
    "activate:done",
    "activate:ok",
    "verify:done",
    "verify:ok",
    "promote:done",
    "promote:ok",
];

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn single_kill_9_mid_rotation_then_run_completes_and_the_store_logs_in() {
    for point in CRASH_POINTS {
        let role = format!("e2e_crash_s_{}", point.replace(':', "_"));
        let s = Setup::single(
            &role,
            "rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"",
        );
        let secrets = crash_and_resume(&s, point);
        s.assert_no_leak(&secrets, &[]);
    }
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn alternating_kill_9_mid_rotation_then_run_completes_and_the_store_logs_in() {
    for point in CRASH_POINTS {
        let tag = point.replace(':', "_");
        let s = Setup::alternating(
            &format!("e2e_crash_a_{tag}"),
            &format!("e2e_crash_b_{tag}"),
            "rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"",
        );
        let secrets = crash_and_resume(&s, point);
        s.assert_no_leak(&secrets, &[]);
    }
}
