//! Every plugin that talks to a server, against one that accepts the connection and never
//! answers (a silent network partition, `keyrotd_test_support::silent`): each call fails as a
//! transient error within the plugin's configured `timeout` (1s here) instead of hanging its step
//! for good. Every test runs under an outer guard, so a regression fails instead of hanging.

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use keyrotd_plugin::{Attrs, Credential, ErrorClass, ProviderError, Rotator, StepContext, Store};
use keyrotd_providers::{RotatorConfig, StoreConfig};
use keyrotd_test_support::silent::Silent;
use secrecy::SecretString;
use serde_json::json;

use crate::aws_env;

/// The outer guard: far past the 1s deadlines configured here, far short of a hang.
const GUARD: Duration = Duration::from_secs(10);
/// How long a call may take to give up: the 1s deadline plus the connect slack of the drivers.
const GAVE_UP_WITHIN: Duration = Duration::from_secs(4);

/// The silent server `aws-sm:` references reach through `AWS_ENDPOINT_URL` (set only by the test
/// that needs it, through [`aws_env::endpoint`]), and credentials for the standard chain. Every
/// test calls this first, so the environment is set before any test reads it.
fn setup() -> &'static Silent {
    static AWS_ENDPOINT: OnceLock<Silent> = OnceLock::new();
    aws_env::standard_chain();
    AWS_ENDPOINT.get_or_init(Silent::start)
}

fn ctx() -> StepContext<'static> {
    StepContext {
        credential_id: "silent",
        rotation_id: "0190a6f0-0000-7000-8000-000000000001",
        secret_field: "password",
        old_attrs: None,
        started_at: SystemTime::now(),
    }
}

fn credential(attrs: &[(&str, &str)]) -> Credential {
    Credential {
        secret: SecretString::from("a-new-secret-value".to_owned()),
        attrs: attrs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

/// Runs one plugin call under the guard and checks it gave up in time, as transient.
async fn gives_up<T>(what: &str, call: impl Future<Output = Result<T, ProviderError>>) {
    let started = Instant::now();
    let result = tokio::time::timeout(GUARD, call)
        .await
        .unwrap_or_else(|_| panic!("{what}: still waiting for the silent server after {GUARD:?}"));
    let took = started.elapsed();
    let Err(e) = result else {
        panic!("{what}: succeeded against a server that never answers")
    };
    eprintln!("{what} gave up after {took:?}: {e}");
    assert_eq!(e.class, ErrorClass::Transient, "{what}: {e}");
    assert!(took < GAVE_UP_WITHIN, "{what}: gave up after {took:?}: {e}");
}

fn rotator(config: serde_json::Value) -> std::sync::Arc<dyn Rotator> {
    let config: RotatorConfig = serde_json::from_value(config).expect("config deserializes");
    config.build().expect("config builds")
}

fn store(config: serde_json::Value) -> std::sync::Arc<dyn Store> {
    let config: StoreConfig = serde_json::from_value(config).expect("config deserializes");
    config.validate().expect("config is valid");
    config.build().expect("config builds")
}

#[tokio::test]
async fn iam_rotator_gives_up_on_a_silent_endpoint() {
    setup();
    let server = Silent::start();
    let r = rotator(json!({
        "kind": "aws_iam_access_key", "user_name": "app", "region": "us-east-1",
        "endpoint_url": server.url(), "verify_timeout": "1s",
        "connect_timeout": "1s", "timeout": "1s",
    }));
    let key = Attrs::from([("AccessKeyId".to_owned(), "AKIAOLDKEY".to_owned())]);
    let new = credential(&[("AccessKeyId", "AKIANEWKEY")]);
    gives_up("issue", r.issue(ctx(), None)).await;
    gives_up("verify", r.verify(ctx(), &new)).await;
    gives_up("abandon", r.abandon(ctx(), Some(&key), None)).await;
    gives_up("revoke", r.revoke(ctx(), &key)).await;
    assert!(server.accepted() >= 4, "every call reached the server");
}

#[tokio::test]
async fn secrets_manager_store_gives_up_on_a_silent_endpoint() {
    setup();
    let server = Silent::start();
    let s = store(json!({
        "kind": "aws_secrets_manager", "secret_id": "app/db", "field": "password",
        "region": "us-east-1", "endpoint_url": server.url(),
        "connect_timeout": "1s", "timeout": "1s",
    }));
    gives_up("current", s.current(ctx())).await;
    gives_up("stage", s.stage(ctx(), &credential(&[]))).await;
    gives_up("pending", s.pending(ctx())).await;
    gives_up("promote", s.promote(ctx())).await;
    gives_up("discard", s.discard(ctx())).await;
}

/// A `file:` reference to an admin DSN for `host:port`.
fn dsn_file(dir: &tempfile::TempDir, port: u16) -> String {
    let path = dir.path().join("admin-dsn");
    std::fs::write(
        &path,
        format!(
            "host=127.0.0.1 port={port} user=admin password=unused dbname=postgres sslmode=disable"
        ),
    )
    .unwrap();
    format!("file:{}", path.display())
}

#[tokio::test]
async fn postgres_rotator_gives_up_on_a_silent_server() {
    setup();
    let server = Silent::start();
    let dir = tempfile::tempdir().unwrap();
    let r = rotator(json!({
        "kind": "postgres_password", "admin_dsn": dsn_file(&dir, server.addr.port()),
        "strategy": "single", "role": "app", "sslmode": "disable",
        "connect_timeout": "1s", "timeout": "1s",
    }));
    let new = credential(&[("username", "app")]);
    let current = credential(&[("username", "app")]);
    gives_up("activate", r.activate(ctx(), &new, Some(&current))).await;
    gives_up("verify", r.verify(ctx(), &new)).await;
    gives_up("abandon", r.abandon(ctx(), None, Some(&current))).await;
}

#[tokio::test]
async fn postgres_admin_dsn_from_a_silent_aws_sm_gives_up() {
    let aws = setup();
    let _endpoint = aws_env::endpoint(&aws.url()).await;
    let before = aws.accepted();
    let r = rotator(json!({
        "kind": "postgres_password", "admin_dsn": "aws-sm:deadline/admin#dsn",
        "strategy": "single", "role": "app", "sslmode": "disable",
        "connect_timeout": "1s", "timeout": "1s",
    }));
    let new = credential(&[("username", "app")]);
    gives_up("activate", r.activate(ctx(), &new, None)).await;
    assert!(
        aws.accepted() > before,
        "the reference was looked up in AWS"
    );
}

#[tokio::test]
async fn http_rotator_gives_up_on_a_silent_api() {
    setup();
    let server = Silent::start();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "admin-token").unwrap();
    let base = server.url();
    let r = rotator(json!({
        "kind": "http", "auth": format!("file:{}", token.display()),
        "issue": {"url": format!("{base}/v1/keys")},
        "secret_pointer": "/secret", "id_pointer": "/id",
        "verify": {"url": format!("{base}/v1/whoami")},
        "revoke": {"method": "DELETE", "url": format!("{base}/v1/keys/{{{{old_id}}}}")},
        "connect_timeout": "1s", "timeout": "1s",
    }));
    let old = Attrs::from([("key_id".to_owned(), "k-old".to_owned())]);
    gives_up("issue", r.issue(ctx(), None)).await;
    gives_up(
        "verify",
        r.verify(ctx(), &credential(&[("key_id", "k-new")])),
    )
    .await;
    gives_up("revoke", r.revoke(ctx(), &old)).await;
    let e = tokio::time::timeout(GUARD, r.issue(ctx(), None))
        .await
        .expect("guard")
        .unwrap_err();
    assert!(
        e.message.contains("no answer within 1s"),
        "the error says what happened: {e}"
    );
}

#[tokio::test]
async fn plugins_report_and_validate_their_timeouts() {
    setup();
    let r = rotator(json!({
        "kind": "aws_iam_access_key", "user_name": "app", "timeout": "20s", "verify_timeout": "30s",
    }));
    assert_eq!(
        r.timeout(),
        Duration::from_secs(50),
        "verify may wait verify_timeout more"
    );
    let s = store(json!({"kind": "aws_secrets_manager", "secret_id": "x"}));
    assert_eq!(s.timeout(), Duration::from_secs(60), "the default");
    let bad = [
        (
            json!({"kind": "postgres_password", "admin_dsn": "env:X", "strategy": "single",
                   "role": "a", "connect_timeout": "10m"}),
            "connect_timeout: must be between 1s and 300s, got 600s",
        ),
        (
            json!({"kind": "aws_iam_access_key", "user_name": "a", "timeout": "2h"}),
            "timeout: must be between 1s and 3600s, got 7200s",
        ),
        (
            json!({"kind": "postgres_password", "admin_dsn": "env:X", "strategy": "single",
                   "role": "a", "timeout": "0s"}),
            "timeout: must be between 1s and 3600s, got 0s",
        ),
    ];
    for (config, want) in bad {
        let config: RotatorConfig = serde_json::from_value(config).unwrap();
        let error = config.validate().unwrap_err();
        assert!(error.starts_with(want), "{error}");
    }
    let unparsable = serde_json::from_value::<RotatorConfig>(
        json!({"kind": "aws_iam_access_key", "user_name": "a", "timeout": "soon"}),
    )
    .unwrap_err()
    .to_string();
    assert!(
        unparsable.contains("`soon` is not a duration"),
        "{unparsable}"
    );
}

/// A statement stuck behind a lock at a real PostgreSQL server (tests/backends/30-postgres.sh):
/// the step gives up at its deadline, and the server cancels the statement too, so the password
/// never changes after keyrotd gave up (and maybe rolled back).
#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn postgres_statement_stuck_behind_a_lock_is_cancelled_at_the_deadline() {
    setup();
    const DSN_VAR: &str = "KEYROTD_TEST_PG_ADMIN_DSN";
    let dsn = keyrotd_test_support::backend_env(DSN_VAR);
    let connect = |dsn: String| async move {
        let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .expect("admin login");
        tokio::spawn(connection);
        client
    };
    let admin = connect(dsn.clone()).await;
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS deadline_locked; \
             CREATE ROLE deadline_locked LOGIN PASSWORD 'start-deadline-locked'",
        )
        .await
        .unwrap();
    // Another session changes the role and keeps its transaction open: a second ALTER ROLE waits.
    let blocker = connect(dsn).await;
    blocker
        .batch_execute("BEGIN; ALTER ROLE deadline_locked CONNECTION LIMIT 5")
        .await
        .unwrap();

    let verifier = || async {
        admin
            .query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = 'deadline_locked'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, Option<String>>(0)
    };
    let before = verifier().await;

    let r = rotator(json!({
        "kind": "postgres_password", "admin_dsn": format!("env:{DSN_VAR}"),
        "strategy": "single", "role": "deadline_locked", "sslmode": "disable",
        "timeout": "1s",
    }));
    let new = credential(&[("username", "deadline_locked")]);
    gives_up("activate", r.activate(ctx(), &new, None)).await;

    blocker.batch_execute("ROLLBACK").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        verifier().await,
        before,
        "a statement still queued at the server set the password after keyrotd gave up"
    );
}
