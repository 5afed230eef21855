//! The `http` rotator against the small, real key-management API of
//! `keyrotd_test_support::key_api`, served on loopback: it issues keys, answers a whoami with a
//! key, revokes keys and then rejects them. Faults (429 with Retry-After, 5xx, malformed
//! answers) are queued per server.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use keyrotd_plugin::{Credential, ErrorClass, ProviderError, Rotator, StepContext, Store};
use keyrotd_providers::file::{Encoding, FileConfig, FileStore};
use keyrotd_providers::RotatorConfig;
use keyrotd_test_support::key_api::{Fault, KeyApi, ADMIN_TOKEN};
use secrecy::ExposeSecret;
use serde_json::{json, Value};

struct Fixture {
    api: KeyApi,
    rotator: Arc<dyn Rotator>,
    _dir: tempfile::TempDir,
    store: FileStore,
}

fn config(base: &str, token_file: &std::path::Path) -> Value {
    json!({
        "kind": "http",
        "auth": format!("file:{}", token_file.display()),
        "issue": {
            "method": "POST", "url": format!("{base}/v1/keys"),
            "headers": {"X-Request-Source": "keyrotd {{credential_id}}"},
            "body": {"name": "keyrotd-{{credential_id}}", "replaces": "{{old_id}}"},
        },
        "secret_pointer": "/key/secret",
        "id_pointer": "/key/id",
        "verify": {
            "url": format!("{base}/v1/whoami"),
            "expect_status": 200, "expect_pointer": "/id", "expect_value": "{{new_id}}",
        },
        "revoke": {"method": "DELETE", "url": format!("{base}/v1/keys/{{{{old_id}}}}")},
        "max_retries": 3,
        "max_retry_after_secs": 5,
        "timeout": "5s",
    })
}

async fn fixture_with(edit: impl FnOnce(&mut Value)) -> Fixture {
    let api = KeyApi::start();
    let base = api.base();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{ADMIN_TOKEN}\n")).unwrap();
    let mut value = config(&base, &token);
    edit(&mut value);
    let config: RotatorConfig = serde_json::from_value(value).expect("config deserializes");
    assert_eq!(config.kind(), "http");
    let rotator = config.build().expect("config builds");
    let store = FileStore::new(FileConfig {
        path: dir.path().join("key.json"),
        mode: "0600".into(),
        owner: None,
        group: None,
        format: Encoding::Json,
    })
    .unwrap();
    Fixture {
        api,
        rotator,
        _dir: dir,
        store,
    }
}

async fn fixture() -> Fixture {
    fixture_with(|_| {}).await
}

fn ctx(rotation_id: &str) -> StepContext<'_> {
    StepContext {
        credential_id: "billing",
        rotation_id,
        secret_field: "api_key",
        started_at: SystemTime::now(),
        old_attrs: None,
    }
}

fn assert_clean(e: &ProviderError, forbidden: &[&str]) {
    let text = e.to_string();
    for f in forbidden {
        assert!(!text.contains(f), "error message leaks `{f}`: {text}");
    }
}

/// One whole rotation through the traits, steps repeated to prove idempotency.
async fn rotate(f: &Fixture, id: &str) -> (Credential, Option<Credential>) {
    let c = ctx(id);
    let current = f.store.current(c).await.unwrap();
    let new = f.rotator.issue(c, current.as_ref()).await.unwrap();
    f.store.stage(c, &new).await.unwrap();
    let staged = f.store.pending(c).await.unwrap().unwrap();
    for _ in 0..2 {
        f.rotator
            .activate(c, &staged, current.as_ref())
            .await
            .unwrap();
        f.rotator.verify(c, &staged).await.unwrap();
    }
    f.store.promote(c).await.unwrap();
    if let Some(old) = &current {
        for _ in 0..2 {
            f.rotator.revoke(c, &old.attrs).await.unwrap();
        }
        f.store.release_previous(c).await.unwrap();
    }
    (staged, current)
}

#[tokio::test]
async fn rotates_verifies_and_revokes_through_a_real_api() {
    let f = fixture().await;
    assert_eq!(f.rotator.secret_field(), "api_key");
    let (first, _) = rotate(&f, "r1").await;
    assert_eq!(first.attrs["key_id"], "k1");
    let (second, old) = rotate(&f, "r2").await;
    assert_eq!(old.unwrap().attrs["key_id"], "k1");
    assert_eq!(second.attrs["key_id"], "k2");
    {
        let api = f.api.lock();
        assert!(api.keys["k1"].1, "the old key is revoked");
        assert!(!api.keys["k2"].1, "the new key is live");
        assert_eq!(
            api.bodies[0],
            json!({"name": "keyrotd-billing", "replaces": ""})
        );
        assert_eq!(
            api.bodies[1],
            json!({"name": "keyrotd-billing", "replaces": "k1"})
        );
    }
    // The revoked key is rejected by the API, so verify now fails for it.
    let e = f.rotator.verify(ctx("r3"), &first).await.unwrap_err();
    assert_eq!(
        (e.class, e.code.as_deref()),
        (ErrorClass::Permanent, Some("401"))
    );

    // Abandon revokes the issued key (twice is fine) and leaves the current one alone.
    let current = f.store.current(ctx("r3")).await.unwrap().unwrap();
    let third = f.rotator.issue(ctx("r3"), Some(&current)).await.unwrap();
    for _ in 0..2 {
        f.rotator
            .abandon(ctx("r3"), Some(&third.attrs), Some(&current))
            .await
            .unwrap();
    }
    f.rotator
        .abandon(ctx("r3"), None, Some(&current))
        .await
        .unwrap();
    assert!(
        f.rotator.verify(ctx("r3"), &third).await.is_err(),
        "the abandoned key is revoked"
    );
    f.rotator
        .verify(ctx("r3"), &current)
        .await
        .expect("the current key still works");
}

#[tokio::test]
async fn verify_failure_is_permanent_and_names_the_request() {
    let f = fixture_with(|c| c["verify"]["expect_value"] = json!("someone-else")).await;
    let new = f.rotator.issue(ctx("r1"), None).await.unwrap();
    let e = f.rotator.verify(ctx("r1"), &new).await.unwrap_err();
    eprintln!("verify mismatch: {e}");
    assert_eq!(e.class, ErrorClass::Permanent);
    assert!(
        e.message.starts_with("verify:") && e.message.contains("/id"),
        "{e}"
    );
    assert_clean(&e, &[new.secret.expose_secret(), ADMIN_TOKEN]);

    f.rotator.revoke(ctx("r1"), &new.attrs).await.unwrap();
    let e = f.rotator.verify(ctx("r1"), &new).await.unwrap_err();
    eprintln!("verify with a revoked key: {e}");
    assert_eq!(
        (e.class, e.code.as_deref()),
        (ErrorClass::Permanent, Some("401"))
    );
    assert_clean(&e, &[new.secret.expose_secret(), ADMIN_TOKEN]);
}

#[tokio::test]
async fn throttling_honours_retry_after() {
    let f = fixture().await;
    f.api
        .lock()
        .issue_faults
        .push_back(Fault::Status(429, Some(1)));
    let start = Instant::now();
    let new = f
        .rotator
        .issue(ctx("r1"), None)
        .await
        .expect("issue succeeds after the throttle");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(1),
        "Retry-After: 1 was not honoured ({waited:?})"
    );
    assert_eq!(f.api.lock().issue_calls, 2);
    assert_eq!(new.attrs["key_id"], "k1");

    // A Retry-After beyond max_retry_after_secs fails at once as transient, without waiting.
    f.api
        .lock()
        .issue_faults
        .push_back(Fault::Status(429, Some(3600)));
    let start = Instant::now();
    let e = f.rotator.issue(ctx("r2"), None).await.unwrap_err();
    eprintln!("long throttle: {e}");
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(
        (e.class, e.code.as_deref()),
        (ErrorClass::Transient, Some("429"))
    );
    assert!(
        e.message.starts_with("issue:") && e.message.contains("Retry-After"),
        "{e}"
    );
}

#[tokio::test]
async fn server_errors_are_retried_a_bounded_number_of_times() {
    let f = fixture().await;
    {
        let mut api = f.api.lock();
        api.issue_faults
            .extend([Fault::Status(503, None), Fault::Status(500, None)]);
    }
    f.rotator
        .issue(ctx("r1"), None)
        .await
        .expect("issue succeeds on the third attempt");
    assert_eq!(f.api.lock().issue_calls, 3);

    {
        let mut api = f.api.lock();
        api.issue_calls = 0;
        api.issue_faults
            .extend(std::iter::repeat_n(Fault::Status(502, None), 10));
    }
    let e = f.rotator.issue(ctx("r2"), None).await.unwrap_err();
    eprintln!("persistent 5xx: {e}");
    assert_eq!(
        (e.class, e.code.as_deref()),
        (ErrorClass::Transient, Some("502"))
    );
    assert!(e.message.starts_with("issue:"), "{e}");
    assert_eq!(
        f.api.lock().issue_calls,
        4,
        "one attempt plus max_retries = 3"
    );
}

#[tokio::test]
async fn malformed_answers_are_refused_and_the_orphan_key_revoked() {
    let f = fixture().await;
    f.api
        .lock()
        .issue_faults
        .push_back(Fault::Body(r#"{"key": {"id": "ID"}}"#));
    let e = f.rotator.issue(ctx("r1"), None).await.unwrap_err();
    eprintln!("missing secret: {e}");
    assert_eq!(e.class, ErrorClass::Permanent);
    assert!(
        e.message.contains("/key/secret") && e.message.contains("revoked"),
        "{e}"
    );
    assert!(f.api.lock().keys["k1"].1, "the unusable key was revoked");

    f.api
        .lock()
        .issue_faults
        .push_back(Fault::Body("<html>oops</html>"));
    let e = f.rotator.issue(ctx("r2"), None).await.unwrap_err();
    eprintln!("not JSON: {e}");
    assert_eq!(e.class, ErrorClass::Permanent);
    assert!(
        e.message.contains("not JSON") && !e.message.contains("oops"),
        "{e}"
    );

    // A connection refused (API down) is transient.
    let f = fixture_with(|c| c["issue"]["url"] = json!("http://127.0.0.1:9/v1/keys")).await;
    let e = f.rotator.issue(ctx("r3"), None).await.unwrap_err();
    eprintln!("API down: {e}");
    assert_eq!(e.class, ErrorClass::Transient);
}

#[tokio::test]
async fn configuration_is_validated_statically() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    let check = |edit: &dyn Fn(&mut Value)| {
        let mut value = config("http://127.0.0.1:8080", &token);
        edit(&mut value);
        let config: RotatorConfig = serde_json::from_value(value).map_err(|e| e.to_string())?;
        config.validate()
    };
    assert_eq!(check(&|_| {}), Ok(()));
    let err = |edit: &dyn Fn(&mut Value)| check(edit).unwrap_err();

    assert!(
        err(&|c| c["issue"]["url"] = json!("http://api.example.com/v1/keys"))
            .contains("must use https")
    );
    assert!(
        err(&|c| c["verify"]["url"] = json!("http://10.1.2.3/v1/whoami"))
            .contains("must use https")
    );
    assert_eq!(
        check(&|c| c["issue"]["url"] = json!("https://api.example.com/v1/keys")),
        Ok(())
    );
    assert_eq!(
        check(&|c| c["issue"]["url"] = json!("http://localhost:1234/v1/keys")),
        Ok(())
    );
    assert_eq!(
        check(&|c| c["issue"]["url"] = json!("http://[::1]:1234/v1/keys")),
        Ok(())
    );
    assert!(err(&|c| c["issue"]["body"]["x"] = json!("{{HOME}}"))
        .contains("unknown template variable `HOME`"));
    assert!(
        err(&|c| c["issue"]["headers"]["X-Secret"] = json!("{{new_secret}}"))
            .contains("cannot be used in the issue")
    );
    assert!(
        err(&|c| c["revoke"]["url"] = json!("http://127.0.0.1:8080/v1/keys"))
            .contains("{{old_id}}")
    );
    assert!(err(&|c| c["secret_pointer"] = json!("key.secret")).starts_with("secret_pointer:"));
    let secret_pointer = config("http://127.0.0.1:8080", &token)["secret_pointer"].clone();
    assert!(err(&|c| c["id_pointer"] = secret_pointer.clone()).starts_with("id_pointer:"));
    assert!(err(&|c| c["id_pointer"] = json!("")).starts_with("id_pointer:"));
    assert!(err(&|c| c["auth"] = json!("sk-literal-token")).contains("literal"));
    assert!(err(&|c| c["issue"]["extra"] = json!(1)).contains("unknown field"));
}
