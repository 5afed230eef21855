//! The `vault_kv2` and `vault_kv1` stores against the OpenBao dev server, method by method:
//! every method re-run is a no-op, a stale staged value of another rotation is replaced, the
//! staged value is never at the secret's own path before promote, a concurrent writer is refused,
//! and a server that is not there is a transient failure.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keyrotd_plugin::{Attrs, Credential, ErrorClass, StepContext, Store};
use keyrotd_providers::StoreConfig;
use keyrotd_test_support::openbao::{unique, OpenBao};
use secrecy::{ExposeSecret, SecretString};

/// A `vault_kv{kv}` store on `mount`/`path` talking to `addr` with the token in `dir`.
fn store(kv: u8, addr: &str, mount: &str, path: &str, dir: &std::path::Path) -> Arc<dyn Store> {
    let token = dir.join("token");
    let config: StoreConfig = serde_json::from_value(serde_json::json!({
        "kind": format!("vault_kv{kv}"), "mount": mount, "path": path, "timeout": "10s",
        "vault": {
            "address": addr, "request_timeout": "3s",
            "auth": { "method": "token", "token": format!("file:{}", token.display()) },
        },
    }))
    .unwrap();
    config.validate().unwrap();
    config.build().unwrap()
}

fn ctx(rotation: &str) -> StepContext<'_> {
    StepContext {
        credential_id: "app",
        rotation_id: rotation,
        secret_field: "password",
        started_at: SystemTime::now(),
        old_attrs: None,
    }
}

fn credential(secret: &str) -> Credential {
    Credential {
        secret: SecretString::from(secret.to_owned()),
        attrs: Attrs::new(),
    }
}

async fn current(store: &dyn Store) -> String {
    let c = store.current(ctx("any")).await.unwrap().unwrap();
    c.secret.expose_secret().to_owned()
}

/// Root can do everything keyrotd's policy allows; the policy itself is tested through the
/// binary (tests/integration/vault_kv/).
fn setup(kv: u8) -> (OpenBao, String, String, tempfile::TempDir) {
    let bao = OpenBao::shared();
    let mount = bao.kv_mount(kv);
    let path = unique("store");
    bao.bao(&[
        "kv",
        "put",
        &format!("-mount={mount}"),
        &path,
        "password=old",
        "host=db",
    ]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), bao.root_token()).unwrap();
    (bao, mount, path, dir)
}

async fn every_step_twice(kv: u8) {
    let (bao, mount, path, dir) = setup(kv);
    let store = store(kv, &bao.addr, &mount, &path, dir.path());
    assert_eq!(current(&*store).await, "old");
    assert_eq!(store.last_rotation(ctx("r1")).await.unwrap(), None);

    // A stale staged value of an interrupted rotation is replaced.
    store.stage(ctx("r0"), &credential("stale")).await.unwrap();
    store.stage(ctx("r1"), &credential("new")).await.unwrap();
    store
        .stage(ctx("r1"), &credential("ignored"))
        .await
        .unwrap();
    assert!(store.pending(ctx("r0")).await.unwrap().is_none());
    let pending = store.pending(ctx("r1")).await.unwrap().unwrap();
    assert_eq!(pending.secret.expose_secret(), "new");
    assert_eq!(current(&*store).await, "old", "staged, not current");

    store.promote(ctx("r1")).await.unwrap();
    store.promote(ctx("r1")).await.unwrap();
    assert_eq!(current(&*store).await, "new");
    let with_host = store.current(ctx("r1")).await.unwrap().unwrap();
    assert_eq!(with_host.attrs.get("host").map(String::as_str), Some("db"));
    assert_eq!(
        store.last_rotation(ctx("r1")).await.unwrap().as_deref(),
        Some("r1")
    );
    assert!(store.pending(ctx("r1")).await.unwrap().is_none());
    store.discard(ctx("r1")).await.unwrap();
    assert_eq!(
        current(&*store).await,
        "new",
        "discard after promote is a no-op"
    );
    store.release_previous(ctx("r1")).await.unwrap();
    store.release_previous(ctx("r1")).await.unwrap();

    // Staged, then discarded twice: the current value is untouched.
    store.stage(ctx("r2"), &credential("newer")).await.unwrap();
    store.discard(ctx("r2")).await.unwrap();
    store.discard(ctx("r2")).await.unwrap();
    assert!(store.pending(ctx("r2")).await.unwrap().is_none());
    let err = store.promote(ctx("r2")).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(
        err.message.contains("nothing is staged for rotation r2"),
        "{err}"
    );
    assert_eq!(current(&*store).await, "new");

    // A writer between stage and promote is never overwritten.
    store
        .stage(ctx("r3"), &credential("s3cret-r3"))
        .await
        .unwrap();
    bao.bao(&[
        "kv",
        "put",
        &format!("-mount={mount}"),
        &path,
        "password=theirs",
    ]);
    let err = store.promote(ctx("r3")).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(err.message.contains("written by someone else"), "{err}");
    assert!(
        !err.message.contains("s3cret") && !err.message.contains("theirs"),
        "{err}"
    );
    assert_eq!(current(&*store).await, "theirs");
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn kv2_every_step_is_idempotent_and_a_concurrent_writer_is_refused() {
    every_step_twice(2).await;
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn kv1_every_step_is_idempotent_and_a_concurrent_writer_is_refused() {
    every_step_twice(1).await;
}

#[tokio::test]
async fn a_server_that_is_not_there_is_transient() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "s.not-a-real-token").unwrap();
    let addr = format!("http://127.0.0.1:{}", keyrotd_test_support::free_port());
    for kv in [1, 2] {
        let store = store(kv, &addr, "secret", "app", dir.path());
        let started = std::time::Instant::now();
        let err = store
            .stage(ctx("r1"), &credential("s3cret"))
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Transient, "{err}");
        assert!(err.message.contains("could not reach Vault"), "{err}");
        assert!(!err.message.contains("s3cret") && !err.message.contains("not-a-real"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

/// A promotion that happened, then a crash before its staged copy was deleted, then someone
/// else's write: re-running promote finds its own value in the version after the staged one and
/// stands, rather than calling it a conflict (which would roll back, revoking what consumers may
/// have read).
#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn kv2_a_rerun_promote_after_a_later_foreign_write_is_not_a_conflict() {
    let (bao, mount, path, dir) = setup(2);
    let store = store(2, &bao.addr, &mount, &path, dir.path());
    store.stage(ctx("r1"), &credential("new")).await.unwrap();
    let pending = format!("{path}.pending");
    let staged = bao.bao_json(&["kv", "get", &format!("-mount={mount}"), &pending]);
    store.promote(ctx("r1")).await.unwrap();
    // As if the crash came before the staged copy was deleted; then someone writes.
    let fields: Vec<String> = staged["data"]["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
        .collect();
    let mut args = vec!["kv", "put"];
    let mount_arg = format!("-mount={mount}");
    args.push(&mount_arg);
    args.push(&pending);
    args.extend(fields.iter().map(String::as_str));
    bao.bao(&args);
    bao.bao(&["kv", "put", &mount_arg, &path, "password=theirs"]);
    store
        .promote(ctx("r1"))
        .await
        .expect("the promotion stands");
    assert_eq!(current(&*store).await, "theirs", "never overwritten");
    // A rotation that never promoted is a conflict.
    store.stage(ctx("r2"), &credential("newer")).await.unwrap();
    bao.bao(&["kv", "put", &mount_arg, &path, "password=again"]);
    let error = store.promote(ctx("r2")).await.unwrap_err();
    assert!(error.is_conflict(), "{error}");
}
