//! Rotations that fail at the server (wrong admin DSN, missing role, database down): the error
//! names the credential, the step and the SQLSTATE, nothing changes, and a fix recovers.

use super::*;

/// A first successful rotation, then one with admin DSN `dsn` that fails; the failure names the
/// credential, the step and the SQLSTATE or error kind, and the store keeps a working value.
fn failing_rotation(s: &Setup, dsn: &str, expect: &[&str], current_still_logs_in: bool) {
    let first = s.cli(&["rotate", "db"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let v0 = s.current().unwrap();
    let before = std::fs::read(s.out().join("db.json")).unwrap();

    let out = s.cli_with_dsn(dsn, &["rotate", "db"]);
    let err = stderr(&out);
    eprintln!("failure as reported: {}", err.lines().last().unwrap_or(""));
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err
        .lines()
        .rfind(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("an error line in:\n{err}"));
    for want in ["credential `db`", "step activate failed"]
        .iter()
        .chain(expect)
    {
        assert!(last.contains(want), "want `{want}` in: {last}");
    }
    assert!(
        !err.contains(
            dsn.split("password=")
                .nth(1)
                .unwrap_or("\0")
                .split(' ')
                .next()
                .unwrap()
        ),
        "the admin password is not in the output"
    );
    assert_eq!(
        std::fs::read(s.out().join("db.json")).unwrap(),
        before,
        "the store's current value is unchanged"
    );
    let files = s.out_files();
    eprintln!("store files after the failure: {files:?}");
    if current_still_logs_in {
        assert_eq!(login(&v0.username, &v0.password), Ok(()));
    }
    let status = s.status();
    assert_eq!(status["consecutive_failures"], 1, "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| expect.iter().all(|w| e.contains(w))),
        "{status}"
    );
    let mut secrets = vec![v0.password.clone()];
    // A pending value the failed rotation left behind is a generated password too.
    for f in files.iter().filter(|f| f.contains(".pending.")) {
        if let Some(v) = read_store(&s.out().join(f)) {
            secrets.push(v.password);
        }
    }
    s.assert_no_leak(&secrets, &[err.clone(), status.to_string()]);
    recovers_once_fixed(s, &v0);
}

/// With the admin DSN fixed, manual rotations finish the interrupted rollback (removing its
/// pending value) and then rotate; the store's value logs in throughout.
fn recovers_once_fixed(s: &Setup, v0: &Value) {
    let out = s.cli(&["rotate", "db"]);
    eprintln!(
        "rotate after the fix: {:?}: {}",
        out.status.code(),
        error_or_ok(&out)
    );
    assert!(
        out.status.success(),
        "one manual rotation finishes the old rollback and rotates: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("finished the earlier rotation"),
        "{}",
        stderr(&out)
    );
    let v1 = s.current().unwrap();
    assert_ne!(v1.password, v0.password);
    assert_eq!(login(&v1.username, &v1.password), Ok(()));
    assert_eq!(
        s.out_files(),
        ["db.json", "db.json.keyrotd"],
        "no leftovers"
    );
    assert_eq!(s.status()["state"], "idle");
}

fn error_or_ok(out: &Output) -> String {
    stderr(out)
        .lines()
        .rfind(|l| l.starts_with("error:"))
        .map_or_else(
            || String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            str::to_owned,
        )
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn wrong_admin_dsn_fails_with_28p01_and_changes_nothing() {
    let s = Setup::single(
        "e2e_bad_admin",
        "rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"",
    );
    let wrong = format!(
        "host=127.0.0.1 port={} user=admin password=not-the-admin-password dbname=postgres sslmode=disable",
        pg_port()
    );
    failing_rotation(&s, &wrong, &["admin login", "28P01"], true);
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn missing_target_role_fails_with_42704_and_changes_nothing() {
    let s = Setup::single(
        "e2e_gone",
        "rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"",
    );
    let first = s.cli(&["rotate", "db"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let v0 = s.current().unwrap();
    admin_exec("DROP ROLE e2e_gone");
    let before = std::fs::read(s.out().join("db.json")).unwrap();
    let out = s.cli(&["rotate", "db"]);
    let err = stderr(&out);
    eprintln!("failure as reported: {}", err.lines().last().unwrap_or(""));
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.lines().rfind(|l| l.starts_with("error:")).unwrap();
    for want in [
        "credential `db`",
        "step activate failed",
        "e2e_gone",
        "42704",
    ] {
        assert!(last.contains(want), "want `{want}` in: {last}");
    }
    assert_eq!(std::fs::read(s.out().join("db.json")).unwrap(), before);
    eprintln!("store files after the failure: {:?}", s.out_files());
    let status = s.status();
    assert!(
        status["last_error"].as_str().unwrap().contains("42704"),
        "{status}"
    );
    s.assert_no_leak(
        std::slice::from_ref(&v0.password),
        &[err.clone(), status.to_string()],
    );
    // Re-create the role (with a password keyrotd does not know): the next rotation recovers.
    fresh_role("e2e_gone");
    recovers_once_fixed(&s, &v0);
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn database_down_fails_with_connection_refused_and_changes_nothing() {
    let s = Setup::single(
        "e2e_down",
        "rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"",
    );
    // A closed port: the admin login and (by default) the target login both go there.
    let closed = free_port();
    let down = format!(
        "host=127.0.0.1 port={closed} user=admin password=whatever dbname=postgres sslmode=disable connect_timeout=2"
    );
    failing_rotation(&s, &down, &["admin login", "ConnectionRefused"], true);
}
