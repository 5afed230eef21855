//! The `postgres_password` rotator against a real PostgreSQL cluster (tests/backends/30-postgres.sh),
//! driven step by step through the `Rotator` and `Store` traits with a `file` store, as the
//! engine drives it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keyrotd_plugin::{Credential, ErrorClass, ProviderError, Rotator, StepContext, Store};
use keyrotd_providers::file::{Encoding, FileConfig, FileStore};
use keyrotd_providers::RotatorConfig;
use keyrotd_test_support::backend_env;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

const ADMIN_DSN_VAR: &str = "KEYROTD_TEST_PG_ADMIN_DSN";

fn port() -> u16 {
    backend_env("KEYROTD_TEST_PG_PORT")
        .parse()
        .expect("KEYROTD_TEST_PG_PORT is a port")
}

fn rotator(config: serde_json::Value) -> Arc<dyn Rotator> {
    let config: RotatorConfig = serde_json::from_value(config).expect("config deserializes");
    assert_eq!(config.kind(), "postgres_password");
    config.build().expect("config builds")
}

fn single(role: &str) -> Arc<dyn Rotator> {
    backend_env(ADMIN_DSN_VAR);
    rotator(json!({
        "kind": "postgres_password", "admin_dsn": format!("env:{ADMIN_DSN_VAR}"),
        "strategy": "single", "role": role, "sslmode": "disable", "probe_query": "SELECT 1",
    }))
}

fn alternating(a: &str, b: &str) -> Arc<dyn Rotator> {
    backend_env(ADMIN_DSN_VAR);
    rotator(json!({
        "kind": "postgres_password", "admin_dsn": format!("env:{ADMIN_DSN_VAR}"),
        "strategy": "alternating", "roles": [a, b], "sslmode": "disable",
    }))
}

fn store(dir: &std::path::Path) -> FileStore {
    FileStore::new(FileConfig {
        path: dir.join("db.json"),
        mode: "0600".into(),
        owner: None,
        group: None,
        format: Encoding::Json,
    })
    .unwrap()
}

fn ctx(rotation_id: &str) -> StepContext<'_> {
    StepContext {
        credential_id: "db",
        rotation_id,
        secret_field: "password",
        started_at: SystemTime::now(),
        old_attrs: None,
    }
}

/// Logs in as `user` with `password` the way a consumer would.
async fn login(user: &str, password: &str) -> Result<(), tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port())
        .user(user)
        .password(password)
        .dbname("postgres");
    config.connect_timeout(Duration::from_secs(5));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.map(drop)
}

async fn admin() -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&backend_env(ADMIN_DSN_VAR), tokio_postgres::NoTls)
            .await
            .expect("admin login");
    tokio::spawn(connection);
    client
}

/// Creates a role of the test's own, so tests running in parallel never share one.
async fn fresh_role(name: &str) {
    admin()
        .await
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {name}; CREATE ROLE {name} LOGIN PASSWORD 'start-{name}'"
        ))
        .await
        .expect("create role");
}

/// Runs a whole rotation as the engine would, every step twice to prove idempotency; returns the
/// credential it published and the one it replaced.
async fn rotate(r: &dyn Rotator, s: &dyn Store, id: &str) -> (Credential, Option<Credential>) {
    let c = ctx(id);
    let current = s.current(c).await.unwrap();
    let new = r.issue(c, current.as_ref()).await.unwrap();
    s.stage(c, &new).await.unwrap();
    s.stage(c, &new).await.unwrap();
    let staged = s.pending(c).await.unwrap().expect("staged");
    for _ in 0..2 {
        r.activate(c, &staged, current.as_ref()).await.unwrap();
        r.verify(c, &staged).await.unwrap();
    }
    s.promote(c).await.unwrap();
    s.promote(c).await.unwrap();
    (staged, current)
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn single_rotation_replaces_the_password_in_place() {
    fresh_role("app").await;
    let dir = tempfile::tempdir().unwrap();
    let (r, s) = (single("app"), store(dir.path()));
    assert_eq!(r.secret_field(), "password");

    let (first, _) = rotate(&*r, &s, "r1").await;
    assert_eq!(first.attrs["username"], "app");
    login("app", first.secret.expose_secret())
        .await
        .expect("the new password works");
    let e = login("app", "start-app")
        .await
        .expect_err("the starting password is refused");
    assert_eq!(sqlstate(&e), Some("28P01"));

    let (second, old) = rotate(&*r, &s, "r2").await;
    assert_eq!(
        old.unwrap().secret.expose_secret(),
        first.secret.expose_secret()
    );
    login("app", second.secret.expose_secret())
        .await
        .expect("the newest password works");
    let e = login("app", first.secret.expose_secret())
        .await
        .expect_err("old password refused after rotation");
    assert_eq!(sqlstate(&e), Some("28P01"));

    // Revoking a single role's old password has nothing left to do, and may be repeated.
    r.revoke(ctx("r2"), &first.attrs).await.unwrap();
    r.revoke(ctx("r2"), &first.attrs).await.unwrap();
    s.release_previous(ctx("r2")).await.unwrap();
    login("app", second.secret.expose_secret())
        .await
        .expect("still works after revoke");

    // The server saw a SCRAM verifier, never the plain password.
    let log =
        std::fs::read_to_string(backend_env("KEYROTD_TEST_PG_LOG")).expect("server log readable");
    assert!(
        log.contains("SCRAM-SHA-256$"),
        "log_statement=ddl logs the ALTER ROLE"
    );
    for secret in [&first.secret, &second.secret] {
        assert!(
            !log.contains(secret.expose_secret()),
            "a plain password reached the server log"
        );
    }
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn abandon_restores_the_current_password() {
    fresh_role("app_abandon").await;
    let dir = tempfile::tempdir().unwrap();
    let (r, s) = (single("app_abandon"), store(dir.path()));
    let (current, _) = rotate(&*r, &s, "r1").await;

    // A second rotation gets as far as activate, then is abandoned.
    let c = ctx("r2");
    let new = r.issue(c, Some(&current)).await.unwrap();
    s.stage(c, &new).await.unwrap();
    r.activate(c, &new, Some(&current)).await.unwrap();
    login("app_abandon", current.secret.expose_secret())
        .await
        .expect_err("activate replaced the password");
    for _ in 0..2 {
        r.abandon(c, Some(&new.attrs), Some(&current))
            .await
            .unwrap();
    }
    s.discard(c).await.unwrap();
    login("app_abandon", current.secret.expose_secret())
        .await
        .expect("abandon put the current password back");
    let e = login("app_abandon", new.secret.expose_secret())
        .await
        .expect_err("the abandoned password is refused");
    assert_eq!(sqlstate(&e), Some("28P01"));
    let published = s.current(c).await.unwrap().unwrap();
    assert_eq!(
        published.secret.expose_secret(),
        current.secret.expose_secret()
    );

    // A crash lost the issued attributes: abandon still restores `current`.
    r.activate(c, &new, Some(&current)).await.unwrap();
    r.abandon(c, None, Some(&current)).await.unwrap();
    login("app_abandon", current.secret.expose_secret())
        .await
        .expect("restored without the issued attrs");
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn alternating_rotations_never_cut_a_consumer_off() {
    fresh_role("app_a").await;
    fresh_role("app_b").await;
    let dir = tempfile::tempdir().unwrap();
    let (r, s) = (alternating("app_a", "app_b"), Arc::new(store(dir.path())));
    let (first, _) = rotate(&*r, &*s, "r0").await;
    assert_eq!(
        first.attrs["username"], "app_a",
        "the first role is used when nothing is published"
    );

    // A consumer re-reads the store before every connection, as long as the rotations run.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let consumer = {
        let (s, stop, ok, failed) = (s.clone(), stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let cred = s
                    .current(ctx("consumer"))
                    .await
                    .unwrap()
                    .expect("a published credential");
                match login(&cred.attrs["username"], cred.secret.expose_secret()).await {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!(
                            "consumer failed as {}: {:?}",
                            cred.attrs["username"],
                            sqlstate(&e)
                        );
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };

    let mut previous = first;
    for i in 1..=6 {
        let id = format!("r{i}");
        let (new, old) = rotate(&*r, &*s, &id).await;
        let old = old.expect("something was published");
        assert_eq!(old.secret.expose_secret(), previous.secret.expose_secret());
        assert_ne!(
            new.attrs["username"], old.attrs["username"],
            "rotation {i} must switch roles"
        );
        // Grace period: consumers that read the old value just before promotion finish with it.
        tokio::time::sleep(Duration::from_millis(400)).await;
        for _ in 0..2 {
            r.revoke(ctx(&id), &old.attrs).await.unwrap();
        }
        s.release_previous(ctx(&id)).await.unwrap();
        let e = login(&old.attrs["username"], old.secret.expose_secret())
            .await
            .expect_err("revoke scrambles the idle role");
        assert_eq!(sqlstate(&e), Some("28P01"));
        previous = new;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    consumer.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "alternating: {ok} successful and {failed} failed consumer connections over 6 rotations"
    );
    assert!(ok > 20, "the consumer connected only {ok} times");
    assert_eq!(
        failed, 0,
        "consumer connections failed during alternating rotation"
    );
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn alternating_abandon_scrambles_only_the_idle_role() {
    fresh_role("alt_c").await;
    fresh_role("alt_d").await;
    let dir = tempfile::tempdir().unwrap();
    let (r, s) = (alternating("alt_c", "alt_d"), store(dir.path()));
    let (current, _) = rotate(&*r, &s, "r1").await;
    let c = ctx("r2");
    let new = r.issue(c, Some(&current)).await.unwrap();
    assert_eq!(new.attrs["username"], "alt_d");
    r.activate(c, &new, Some(&current)).await.unwrap();
    login("alt_d", new.secret.expose_secret()).await.unwrap();
    r.abandon(c, Some(&new.attrs), Some(&current))
        .await
        .unwrap();
    r.abandon(c, None, Some(&current)).await.unwrap();
    login("alt_d", new.secret.expose_secret())
        .await
        .expect_err("the abandoned role is scrambled");
    login("alt_c", current.secret.expose_secret())
        .await
        .expect("the published role is untouched");

    // Activating the published role is refused rather than cutting its consumers off.
    let e = r.activate(c, &current, Some(&current)).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
}

fn assert_clean(e: &ProviderError, forbidden: &[&str]) {
    let text = e.to_string();
    for f in forbidden {
        assert!(!text.contains(f), "error message leaks `{f}`: {text}");
    }
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn failures_are_classified_with_their_sqlstate() {
    let dir = tempfile::tempdir().unwrap();
    let dsn = backend_env(ADMIN_DSN_VAR);
    let admin_password = dsn
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("password="))
        .unwrap()
        .to_owned();
    let new = Credential {
        secret: SecretString::from("a-fresh-password-0123456789".to_owned()),
        attrs: [("username".to_owned(), "app_errors".to_owned())].into(),
    };
    fresh_role("app_errors").await;

    // Wrong admin password in the DSN.
    let bad_dsn = dir.path().join("bad-dsn");
    std::fs::write(
        &bad_dsn,
        dsn.replace(&admin_password, "wrong-admin-password"),
    )
    .unwrap();
    let r = rotator(json!({
        "kind": "postgres_password", "admin_dsn": format!("file:{}", bad_dsn.display()),
        "strategy": "single", "role": "app_errors", "sslmode": "disable",
    }));
    let e = r.activate(ctx("r1"), &new, None).await.unwrap_err();
    eprintln!("wrong admin DSN: {e}");
    assert_eq!(
        (e.class, e.code.as_deref()),
        (ErrorClass::Permanent, Some("28P01"))
    );
    assert!(
        e.message.contains("activate") && e.message.contains("app_errors"),
        "{e}"
    );
    assert_clean(
        &e,
        &[
            "wrong-admin-password",
            &admin_password,
            new.secret.expose_secret(),
        ],
    );

    // Target role missing.
    let r = single("no_such_role");
    let missing = Credential {
        secret: new.secret.clone(),
        attrs: [("username".to_owned(), "no_such_role".to_owned())].into(),
    };
    let e = r.activate(ctx("r1"), &missing, None).await.unwrap_err();
    eprintln!("missing role: {e}");
    assert_eq!(
        (e.class, e.code.as_deref()),
        (ErrorClass::Permanent, Some("42704"))
    );
    assert!(e.message.contains("no_such_role"), "{e}");
    assert_clean(&e, &[&admin_password, new.secret.expose_secret()]);

    // Verify with a password the server does not know.
    let r = single("app_errors");
    let e = r.verify(ctx("r1"), &new).await.unwrap_err();
    eprintln!("verify with a wrong password: {e}");
    assert_eq!(
        (e.class, e.code.as_deref()),
        (ErrorClass::Permanent, Some("28P01"))
    );
    assert!(e.message.contains("verify"), "{e}");
    assert_clean(&e, &[&admin_password, new.secret.expose_secret()]);

    // Database down: nothing listens on the port.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down_dsn = dir.path().join("down-dsn");
    std::fs::write(
        &down_dsn,
        dsn.replace(&format!("port={}", port()), &format!("port={closed_port}")),
    )
    .unwrap();
    let r = rotator(json!({
        "kind": "postgres_password", "admin_dsn": format!("file:{}", down_dsn.display()),
        "strategy": "single", "role": "app_errors", "sslmode": "disable",
    }));
    for e in [
        r.activate(ctx("r1"), &new, None).await.unwrap_err(),
        r.verify(ctx("r1"), &new).await.unwrap_err(),
    ] {
        eprintln!("database down: {e}");
        assert_eq!(e.class, ErrorClass::Transient, "{e}");
        assert!(
            e.message.contains("app_errors") && e.message.to_lowercase().contains("refused"),
            "{e}"
        );
        assert_clean(&e, &[&admin_password, new.secret.expose_secret()]);
    }

    // Literal DSNs never get past deserialization.
    let literal: Result<RotatorConfig, _> = serde_json::from_value(json!({
        "kind": "postgres_password", "admin_dsn": dsn, "strategy": "single", "role": "app",
    }));
    let e = literal.unwrap_err().to_string();
    assert!(!e.contains(&admin_password), "{e}");
}

/// Fails unless the session it runs in came over TLS.
const REQUIRE_TLS_PROBE: &str =
    "DO $$ BEGIN IF NOT (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()) \
     THEN RAISE EXCEPTION 'this session is not encrypted'; END IF; END $$";

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn sslmode_is_honoured_by_verify() {
    fresh_role("app_tls").await;
    let ca = backend_env("KEYROTD_TEST_PG_CA");
    let with = |sslmode: &str, rootcert: Option<&str>| {
        let mut config = json!({
            "kind": "postgres_password", "admin_dsn": format!("env:{ADMIN_DSN_VAR}"),
            "strategy": "single", "role": "app_tls", "sslmode": sslmode, "probe_query": REQUIRE_TLS_PROBE,
        });
        if let Some(path) = rootcert {
            config["sslrootcert"] = json!(path);
        }
        rotator(config)
    };
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let (cred, _) = rotate(&*with("require", Some(&ca)), &s, "r1").await;

    with("prefer", Some(&ca))
        .verify(ctx("r2"), &cred)
        .await
        .expect("prefer uses the offered TLS");

    let e = with("require", None)
        .verify(ctx("r2"), &cred)
        .await
        .unwrap_err();
    eprintln!("require with an unknown CA: {e}");
    assert_eq!(
        e.class,
        ErrorClass::Permanent,
        "an untrusted certificate needs an operator: {e}"
    );
    assert!(
        e.message.contains("verify") && e.message.contains("app_tls"),
        "{e}"
    );

    let e = with("disable", None)
        .verify(ctx("r2"), &cred)
        .await
        .unwrap_err();
    eprintln!("disable, probe demanding TLS: {e}");
    assert_eq!(
        e.code.as_deref(),
        Some("P0001"),
        "the probe saw a plain connection: {e}"
    );
}
