//! The `postgres_password` rotator's admin connection pool against the test cluster
//! (tests/backends/30-postgres.sh): credentials sharing one admin DSN share a bounded set of
//! admin connections, a connection the server killed is replaced without failing the rotation,
//! and a pool whose every connection is stuck behind a lock makes the others fail at their
//! deadline instead of waiting for good or opening more connections.
//!
//! Each test logs in as an admin role of its own (`CREATEROLE`), so its connections are told
//! apart from every other test's by `usename` in `pg_stat_activity`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use keyrotd_plugin::{Credential, ErrorClass, Rotator, StepContext};
use keyrotd_providers::RotatorConfig;
use keyrotd_test_support::backend_env;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

async fn superuser() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(
        &backend_env("KEYROTD_TEST_PG_ADMIN_DSN"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("superuser login");
    tokio::spawn(connection);
    client
}

/// Creates the admin role `admin` (CREATEROLE, not superuser) and the target `roles`, and sets
/// `env_var` to the admin's DSN.
async fn setup(admin: &str, roles: &[String], env_var: &str) -> tokio_postgres::Client {
    let su = superuser().await;
    let mut sql = format!(
        "DROP ROLE IF EXISTS {admin}; CREATE ROLE {admin} LOGIN CREATEROLE PASSWORD 'pw-{admin}';"
    );
    for role in roles {
        sql += &format!("DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN PASSWORD 'x';");
    }
    su.batch_execute(&sql).await.expect("creating the roles");
    let port = backend_env("KEYROTD_TEST_PG_PORT");
    // Each test sets a variable of its own, before any rotator of its reads it.
    std::env::set_var(
        env_var,
        format!(
            "host=127.0.0.1 port={port} user={admin} password=pw-{admin} dbname=postgres sslmode=disable"
        ),
    );
    su
}

fn rotator(env_var: &str, role: &str, extra: serde_json::Value) -> Arc<dyn Rotator> {
    let mut config = json!({
        "kind": "postgres_password", "admin_dsn": format!("env:{env_var}"),
        "strategy": "single", "role": role, "sslmode": "disable",
    });
    config
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let config: RotatorConfig = serde_json::from_value(config).expect("config deserializes");
    config.build().expect("config builds")
}

fn ctx() -> StepContext<'static> {
    StepContext {
        credential_id: "db",
        rotation_id: "0190a6f0-0000-7000-8000-000000000002",
        secret_field: "password",
        started_at: SystemTime::now(),
        old_attrs: None,
    }
}

/// Issues a new password for `r` and sets it (activate), then logs in with it (verify).
async fn rotate(r: &dyn Rotator) -> Result<Credential, keyrotd_plugin::ProviderError> {
    let new = r.issue(ctx(), None).await?;
    r.activate(ctx(), &new, None).await?;
    r.verify(ctx(), &new).await?;
    Ok(new)
}

/// The backend pids of `admin`'s sessions now.
async fn sessions(su: &tokio_postgres::Client, admin: &str) -> Vec<i32> {
    su.query(
        "SELECT pid FROM pg_stat_activity WHERE usename = $1",
        &[&admin],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| row.get(0))
    .collect()
}

/// Logs in as `role` with `password` (a consumer's view).
async fn login(role: &str, password: &SecretString) -> Result<(), tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(backend_env("KEYROTD_TEST_PG_PORT").parse().unwrap())
        .user(role)
        .password(password.expose_secret())
        .dbname("postgres");
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.map(drop)
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn credentials_sharing_an_admin_share_a_bounded_pool() {
    const ADMIN: &str = "pool_share_admin";
    const VAR: &str = "KEYROTD_TEST_POOL_SHARE_DSN";
    const POOL: usize = 3;
    let roles: Vec<String> = (0..24).map(|i| format!("pool_share_{i}")).collect();
    let su = setup(ADMIN, &roles, VAR).await;
    let rotators: Vec<_> = roles
        .iter()
        .map(|role| rotator(VAR, role, json!({"admin_connections": POOL})))
        .collect();

    // Samples the admin's sessions all along: every backend pid ever seen, and the most at once.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut seen, mut most) = (BTreeSet::new(), 0);
            while !stop.load(Ordering::Relaxed) {
                let now = sessions(&su, ADMIN).await;
                most = most.max(now.len());
                seen.extend(now);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (seen, most, su)
        }
    });
    for round in 0..3 {
        let mut tasks = tokio::task::JoinSet::new();
        for (role, r) in roles.iter().zip(&rotators) {
            let (role, r) = (role.clone(), r.clone());
            tasks.spawn(async move {
                let new = rotate(&*r).await.unwrap_or_else(|e| panic!("{role}: {e}"));
                login(&role, &new.secret)
                    .await
                    .unwrap_or_else(|e| panic!("round {round}: {role} cannot log in: {e}"));
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (seen, most, su) = sampler.await.unwrap();
    eprintln!(
        "admin sessions: {} seen, at most {most} at once",
        seen.len()
    );
    assert!(
        most <= POOL,
        "{most} admin sessions at once, pool size {POOL}"
    );
    assert!(
        (1..=POOL).contains(&seen.len()),
        "72 rotations opened {} admin sessions; the pool allows {POOL}",
        seen.len()
    );
    // The connections stay open for the next rotation.
    assert!(!sessions(&su, ADMIN).await.is_empty(), "the pool kept none");
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn an_admin_connection_killed_by_the_server_is_replaced() {
    const ADMIN: &str = "pool_kill_admin";
    const VAR: &str = "KEYROTD_TEST_POOL_KILL_DSN";
    let roles = ["pool_kill_a".to_owned(), "pool_kill_b".to_owned()];
    let su = setup(ADMIN, &roles, VAR).await;
    let a = rotator(VAR, &roles[0], json!({"admin_connections": 2}));
    let b = rotator(VAR, &roles[1], json!({"admin_connections": 2}));
    for _ in 0..3 {
        let (ra, rb) = tokio::join!(rotate(&*a), rotate(&*b));
        ra.unwrap();
        rb.unwrap();
        let before = sessions(&su, ADMIN).await;
        assert!(!before.is_empty(), "no admin connection left open to kill");
        // Killed between two rotations, with no time for the client to notice.
        for pid in &before {
            su.execute("SELECT pg_terminate_backend($1)", &[pid])
                .await
                .unwrap();
        }
        let new = rotate(&*a).await.expect("a rotation after the kill");
        login(&roles[0], &new.secret)
            .await
            .expect("the new password works");
        let after = sessions(&su, ADMIN).await;
        assert!(
            after.iter().all(|pid| !before.contains(pid)),
            "a killed connection is still listed: {before:?} {after:?}"
        );
    }
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn a_pool_stuck_behind_a_lock_fails_the_others_at_their_deadline() {
    const ADMIN: &str = "pool_stuck_admin";
    const VAR: &str = "KEYROTD_TEST_POOL_STUCK_DSN";
    let roles = ["pool_stuck_a".to_owned(), "pool_stuck_b".to_owned()];
    let su = setup(ADMIN, &roles, VAR).await;
    // a holds the pool's only connection past b's whole deadline.
    let config =
        |timeout| json!({"admin_connections": 1, "timeout": timeout, "connect_timeout": "1s"});
    let a = rotator(VAR, &roles[0], config("3s"));
    let b = rotator(VAR, &roles[1], config("1s"));
    // Another session changes role a and keeps its transaction open: an ALTER ROLE of a waits.
    let blocker = superuser().await;
    blocker
        .batch_execute(&format!(
            "BEGIN; ALTER ROLE {} CONNECTION LIMIT 5",
            roles[0]
        ))
        .await
        .unwrap();
    let started = Instant::now();
    let (ra, rb) = tokio::join!(rotate(&*a), async {
        // Let a take the pool's only connection first.
        tokio::time::sleep(Duration::from_millis(100)).await;
        rotate(&*b).await
    });
    let took = started.elapsed();
    for (what, result) in [("a (stuck)", ra), ("b (waiting)", rb)] {
        let e = result.expect_err(what);
        assert_eq!(e.class, ErrorClass::Transient, "{what}: {e}");
        assert!(!e.message.contains("pw-"), "{what}: {e}");
    }
    assert!(took < Duration::from_secs(5), "gave up after {took:?}");
    assert!(
        sessions(&su, ADMIN).await.len() <= 1,
        "the waiting rotation opened a connection past the pool's bound"
    );
    blocker.batch_execute("ROLLBACK").await.unwrap();
    // The stuck connection was closed, not returned: both rotate again.
    rotate(&*a).await.expect("a after the lock");
    rotate(&*b).await.expect("b after the lock");
}
