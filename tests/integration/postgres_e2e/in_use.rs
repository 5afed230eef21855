//! `revoke = "when_unused"` with the `alternating` strategy: a session held open on the old role
//! delays its revoke (the scramble of its password) until it disconnects, `max_revoke_delay`
//! then raises the `revoke_delayed` alert (to a webhook), and `keyrotd policy` prints the grant
//! the check needs. Run with `in_use::` as the filter.

use support::webhook::Receiver;

use super::*;

/// The timing and revoke policy of the test credential, then an `[alerts]` webhook to `hook`.
fn when_unused(hook: &str) -> String {
    format!(
        "rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"1s\"\nrevoke = \"when_unused\"\n\
         revoke_check_every = \"1s\"\nmax_revoke_delay = \"3s\"\n\n\
         [alerts]\nrepeat_interval = \"1h\"\ndelivery_backoff = \"200ms\"\n\
         [[alerts.channel]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{hook}\"\n"
    )
}

/// (condition, status) of every notification about credential `db`.
fn notes(receiver: &Receiver) -> Vec<(String, String)> {
    receiver
        .received()
        .iter()
        .filter(|r| r.body["credential"] == "db")
        .map(|r| {
            let s = |f: &str| r.body[f].as_str().unwrap_or_default().to_owned();
            (s("condition"), s("status"))
        })
        .collect()
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn in_use_postgres_session_on_the_old_role_delays_the_revoke_and_alerts_past_max_delay() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let receiver = rt.block_on(Receiver::start(&[]));
    let (a, b) = ("e2e_inuse_a", "e2e_inuse_b");
    let s = Setup::alternating(a, b, &when_unused(&receiver.url));
    // The first rotation publishes role a (nothing to check: no old credential).
    assert!(s.cli(&["rotate", "db"]).status.success());
    let old = s.current().unwrap();
    assert_eq!(old.username, a, "{}", s.history());
    // A consumer holds a session on role a; the rotation then publishes role b.
    let session = rt.block_on(async {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(pg_port())
            .user(a)
            .password(old.password.as_str())
            .dbname("postgres");
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    });
    std::thread::sleep(Duration::from_millis(2100));
    let out = s.cli(&["rotate", "db"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let new = s.current().unwrap();
    assert_eq!(new.username, b);

    let mut daemon = s.start("daemon.log");
    let waiting = wait_until(Duration::from_secs(20), || {
        s.status()["state"] == "revoke_delayed"
    });
    assert!(waiting, "{}\n{}", s.status(), daemon.log_text());
    let why = s.status()["waiting"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        why.starts_with(&format!(
            "waiting: in use: 1 session of role \"{a}\" connected"
        )),
        "{why}"
    );
    // max_revoke_delay (3 s after the grace period) passes: the alert fires, the revoke waits.
    let alerted = wait_until(Duration::from_secs(20), || {
        notes(&receiver).contains(&("revoke_delayed".into(), "firing".into()))
    });
    assert!(alerted, "{:?}\n{}", receiver.received(), daemon.log_text());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(login(a, &old.password), Ok(()), "role a still logs in");
    assert!(
        rt.block_on(session.simple_query("SELECT 1")).is_ok(),
        "the session lives"
    );

    // The consumer disconnects: the next check finds no session and the revoke scrambles a.
    drop(session);
    let revoked = wait_until(Duration::from_secs(20), || s.status()["state"] == "idle");
    assert!(revoked, "{}\n{}", s.status(), daemon.log_text());
    assert!(
        login(a, &old.password).is_err(),
        "role a's password is scrambled"
    );
    assert_eq!(login(b, &new.password), Ok(()));
    let resolved = wait_until(Duration::from_secs(10), || {
        notes(&receiver).contains(&("revoke_delayed".into(), "resolved".into()))
    });
    assert!(resolved, "{:?}", receiver.received());
    // Raised at every check past the deadline, notified once (and resolved once).
    let fired = notes(&receiver)
        .iter()
        .filter(|n| n.0 == "revoke_delayed" && n.1 == "firing")
        .count();
    assert_eq!(fired, 1, "{:?}", receiver.received());
    assert_eq!(daemon.terminate(Duration::from_secs(10)).code(), Some(0));
    let history = s.history();
    assert!(history.contains("no session of role"), "{history}");
    s.assert_no_leak(&[old.password, new.password], &[daemon.log_text()]);
}

#[test]
fn in_use_policy_grants_pg_read_all_stats_only_for_when_unused() {
    let policy = |revoke: &str| {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[daemon]\nstate = \"sqlite:state.db\"\n[[credential]]\nid = \"db\"\n\
                 rotator = {{ kind = \"postgres_password\", admin_dsn = \"env:UNSET_DSN\", \
                 strategy = \"alternating\", roles = [\"a\", \"b\"] }}\n\
                 store = {{ kind = \"file\", path = \"{}\", format = \"json\" }}\n\
                 rotate_every = \"1d\"\nmax_age = \"2d\"\nrevoke = \"{revoke}\"\n",
                dir.path().join("db.json").display()
            ),
        )
        .unwrap();
        let out = cli(&config, &["policy"]);
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let grant = "GRANT pg_read_all_stats TO :\"admin_role\";";
    assert!(policy("when_unused").contains(grant));
    assert!(!policy("after_grace").contains(grant));
}
