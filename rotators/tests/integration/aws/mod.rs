//! The AWS plugins driven through the `Rotator` and `Store` traits against a real moto server.
//!
//! Run through `tests/run.sh`, which starts moto with IAM enforced and exports
//! `KEYROTD_TEST_MOTO_URL` and an admin key. The plugins reach moto like they reach AWS: through
//! the standard credential chain (here the environment) and an `endpoint_url` override. Every
//! test uses its own IAM user and secret, so they run in parallel against one server.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use aws_sdk_iam::types::StatusType;
use aws_sdk_sts::config::Credentials;
use keyrotd_plugin::timeouts::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT};
use keyrotd_plugin::{
    Attrs, Credential, ErrorClass, ProviderError, Rotator, StepContext, Store, Timeouts,
};
use keyrotd_providers::aws::iam::{IamAccessKeyConfig, IamAccessKeyRotator};
use keyrotd_providers::aws::secrets_manager::{SecretsManagerConfig, SecretsManagerStore};
use keyrotd_test_support::backend_env;
use secrecy::{ExposeSecret, SecretString};

use crate::aws_env;

mod crash_recovery;
mod errors_and_references;

fn moto_url() -> String {
    backend_env("KEYROTD_TEST_MOTO_URL")
}

/// Points the standard AWS credential chain at the admin key `tests/backends/20-moto.sh` made.
fn admin_env() {
    backend_env("KEYROTD_TEST_AWS_ACCESS_KEY_ID");
    aws_env::standard_chain();
}

/// The SDK configuration the tests use to set up and inspect AWS behind the plugins' back.
async fn admin() -> SdkConfig {
    admin_env();
    keyrotd_providers::aws::load_sdk_config(
        Some("us-east-1"),
        Some(&moto_url()),
        Timeouts::default(),
    )
    .await
}

fn iam(config: &SdkConfig) -> aws_sdk_iam::Client {
    aws_sdk_iam::Client::new(config)
}

fn sm(config: &SdkConfig) -> aws_sdk_secretsmanager::Client {
    aws_sdk_secretsmanager::Client::new(config)
}

fn rotator(user: &str, verify_timeout: &str, delete_after_deactivate: bool) -> IamAccessKeyRotator {
    admin_env();
    IamAccessKeyRotator::new(IamAccessKeyConfig {
        user_name: user.into(),
        region: Some("us-east-1".into()),
        endpoint_url: Some(moto_url()),
        account_id: None,
        verify_timeout: verify_timeout.into(),
        delete_after_deactivate,
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        timeout: DEFAULT_TIMEOUT,
    })
    .unwrap()
}

fn store(secret_id: &str, field: Option<&str>) -> SecretsManagerStore {
    admin_env();
    SecretsManagerStore::new(SecretsManagerConfig {
        field: field.map(str::to_owned),
        region: Some("us-east-1".into()),
        endpoint_url: Some(moto_url()),
        ..SecretsManagerConfig::new(secret_id)
    })
    .unwrap()
}

/// A rotation id as the engine makes them: unique, 32 to 64 characters (AWS's token limits).
fn rotation_id(test: &str, n: u32) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{test:.20}-{n:04}-{nanos:032x}")
}

fn ctx(rotation_id: &str, started_at: SystemTime) -> StepContext<'_> {
    StepContext {
        credential_id: "test",
        rotation_id,
        secret_field: "SecretAccessKey",
        started_at,
        old_attrs: None,
    }
}

fn cred(secret: &str) -> Credential {
    Credential {
        secret: SecretString::from(secret.to_owned()),
        attrs: Attrs::new(),
    }
}

fn key_id(c: &Credential) -> String {
    c.attrs
        .get("AccessKeyId")
        .expect("credential has an AccessKeyId")
        .clone()
}

/// The user's keys: id to status.
async fn keys(config: &SdkConfig, user: &str) -> BTreeMap<String, String> {
    let out = iam(config)
        .list_access_keys()
        .user_name(user)
        .send()
        .await
        .unwrap();
    out.access_key_metadata()
        .iter()
        .map(|k| {
            (
                k.access_key_id().unwrap().to_owned(),
                k.status().unwrap().as_str().to_owned(),
            )
        })
        .collect()
}

async fn create_user(config: &SdkConfig, user: &str) {
    iam(config)
        .create_user()
        .user_name(user)
        .send()
        .await
        .unwrap();
}

async fn create_key(config: &SdkConfig, user: &str) -> Credential {
    let out = iam(config)
        .create_access_key()
        .user_name(user)
        .send()
        .await
        .unwrap();
    let key = out.access_key().unwrap();
    Credential {
        secret: SecretString::from(key.secret_access_key().to_owned()),
        attrs: Attrs::from([("AccessKeyId".to_owned(), key.access_key_id().to_owned())]),
    }
}

/// Calls STS `GetCallerIdentity` with `key`; the AWS error code on failure.
async fn sts_code(config: &SdkConfig, key: &Credential) -> Result<String, String> {
    let credentials = Credentials::new(key_id(key), key.secret.expose_secret(), None, None, "test");
    let sts = aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::config::Builder::from(config)
            .credentials_provider(credentials)
            .build(),
    );
    match sts.get_caller_identity().send().await {
        Ok(out) => Ok(out.arn().unwrap_or_default().to_owned()),
        Err(e) => Err(keyrotd_providers::aws::error_code(&e)
            .unwrap_or_else(|| format!("no AWS error code in {e:?}"))),
    }
}

/// Version id to sorted staging labels, from `DescribeSecret`.
async fn labels(config: &SdkConfig, secret_id: &str) -> BTreeMap<String, BTreeSet<String>> {
    let out = sm(config)
        .describe_secret()
        .secret_id(secret_id)
        .send()
        .await
        .unwrap();
    out.version_ids_to_stages()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, l)| !l.is_empty())
        .map(|(v, l)| (v, l.into_iter().collect()))
        .collect()
}

fn set(labels: &[&str]) -> BTreeSet<String> {
    labels.iter().map(|l| l.to_string()).collect()
}

async fn current_string(config: &SdkConfig, secret_id: &str) -> String {
    let out = sm(config)
        .get_secret_value()
        .secret_id(secret_id)
        .version_stage("AWSCURRENT")
        .send()
        .await
        .unwrap();
    out.secret_string().unwrap().to_owned()
}

fn assert_error(err: &ProviderError, class: ErrorClass, code: &str, operation: &str) {
    assert_eq!(err.class, class, "{err}");
    assert_eq!(err.code.as_deref(), Some(code), "{err}");
    assert!(
        err.message.contains(operation),
        "`{err}` should name {operation}"
    );
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn iam_rotation_into_secrets_manager_end_to_end() {
    let admin = admin().await;
    let (user, secret_id) = ("e2e-user", "e2e/iam-key");
    create_user(&admin, user).await;
    let old = create_key(&admin, user).await;
    let old_id = key_id(&old);
    let initial = serde_json::json!({
        "AccessKeyId": old_id, "SecretAccessKey": old.secret.expose_secret(), "region": "us-east-1", "port": 443
    });
    sm(&admin)
        .create_secret()
        .name(secret_id)
        .secret_string(initial.to_string())
        .send()
        .await
        .unwrap();
    let initial_version = labels(&admin, secret_id).await.into_keys().next().unwrap();

    let (rotator, store) = (
        rotator(user, "10s", true),
        store(secret_id, Some("SecretAccessKey")),
    );
    let rid = rotation_id("e2e", 1);
    let ctx = ctx(&rid, SystemTime::now());
    assert_eq!(store.location(), "aws-sm:e2e/iam-key#SecretAccessKey");

    let current = store
        .current(ctx)
        .await
        .unwrap()
        .expect("the secret has a current value");
    assert_eq!(key_id(&current), old_id);
    assert_eq!(current.secret.expose_secret(), old.secret.expose_secret());

    // issue: a second key; the user never has more than two.
    let new = rotator.issue(ctx, Some(&current)).await.unwrap();
    let new_id = key_id(&new);
    assert_ne!(new_id, old_id);
    assert_eq!(keys(&admin, user).await.len(), 2);
    assert!(
        !format!("{new:?}").contains(new.secret.expose_secret()),
        "Debug must not print the secret"
    );

    // stage: AWSPENDING on the rotation's version, AWSCURRENT untouched; re-staging is a no-op.
    store.stage(ctx, &new).await.unwrap();
    store.stage(ctx, &new).await.unwrap();
    let after_stage = labels(&admin, secret_id).await;
    assert_eq!(
        after_stage.get(&rid),
        Some(&set(&["AWSPENDING"])),
        "{after_stage:?}"
    );
    assert_eq!(
        after_stage.get(&initial_version),
        Some(&set(&["AWSCURRENT"])),
        "{after_stage:?}"
    );
    assert_eq!(
        store.current(ctx).await.unwrap().map(|c| key_id(&c)),
        Some(old_id.clone())
    );
    let pending = store
        .pending(ctx)
        .await
        .unwrap()
        .expect("staged value is pending");
    assert_eq!(pending.secret.expose_secret(), new.secret.expose_secret());
    assert_eq!(key_id(&pending), new_id);
    assert_eq!(
        pending.attrs["region"], "us-east-1",
        "other members are kept"
    );

    // activate and verify: the new key works with STS as the user; re-running changes nothing.
    rotator.activate(ctx, &new, Some(&current)).await.unwrap();
    rotator.verify(ctx, &new).await.unwrap();
    rotator.verify(ctx, &new).await.unwrap();

    // promote: AWSCURRENT moves, AWS sets AWSPREVIOUS, AWSPENDING is gone.
    store.promote(ctx).await.unwrap();
    store.promote(ctx).await.unwrap();
    let after_promote = labels(&admin, secret_id).await;
    assert_eq!(
        after_promote.get(&rid),
        Some(&set(&["AWSCURRENT"])),
        "{after_promote:?}"
    );
    assert_eq!(
        after_promote.get(&initial_version),
        Some(&set(&["AWSPREVIOUS"])),
        "{after_promote:?}"
    );
    let promoted: serde_json::Value =
        serde_json::from_str(&current_string(&admin, secret_id).await).unwrap();
    assert_eq!(promoted["AccessKeyId"], new_id.as_str());
    assert_eq!(promoted["SecretAccessKey"], new.secret.expose_secret());
    assert_eq!(promoted["port"], 443, "non-string members are kept too");
    assert!(store.pending(ctx).await.unwrap().is_none());
    assert_eq!(
        store.current(ctx).await.unwrap().map(|c| key_id(&c)),
        Some(new_id.clone())
    );

    // revoke: the old key is deactivated and deleted, then refused by STS; re-running is fine.
    assert!(
        sts_code(&admin, &old).await.is_ok(),
        "the old key works until revoked"
    );
    rotator.revoke(ctx, &current.attrs).await.unwrap();
    rotator.revoke(ctx, &current.attrs).await.unwrap();
    assert_eq!(
        keys(&admin, user).await,
        BTreeMap::from([(new_id.clone(), "Active".to_owned())])
    );
    assert_eq!(
        sts_code(&admin, &old).await,
        Err("InvalidClientTokenId".to_owned())
    );
    assert!(sts_code(&admin, &new)
        .await
        .unwrap()
        .ends_with("user/e2e-user"));

    store.release_previous(ctx).await.unwrap();
    store.release_previous(ctx).await.unwrap();

    // A second rotation: AWSPREVIOUS follows AWSCURRENT.
    let rid2 = rotation_id("e2e", 2);
    let ctx2 = self::ctx(&rid2, SystemTime::now());
    let current2 = store.current(ctx2).await.unwrap().unwrap();
    let newer = rotator.issue(ctx2, Some(&current2)).await.unwrap();
    store.stage(ctx2, &newer).await.unwrap();
    rotator.verify(ctx2, &newer).await.unwrap();
    store.promote(ctx2).await.unwrap();
    rotator.revoke(ctx2, &current2.attrs).await.unwrap();
    let after_second = labels(&admin, secret_id).await;
    assert_eq!(
        after_second.get(&rid2),
        Some(&set(&["AWSCURRENT"])),
        "{after_second:?}"
    );
    assert_eq!(
        after_second.get(&rid),
        Some(&set(&["AWSPREVIOUS"])),
        "{after_second:?}"
    );
    assert!(
        !after_second.contains_key(&initial_version),
        "{after_second:?}"
    );
    assert_eq!(
        keys(&admin, user).await.into_keys().collect::<Vec<_>>(),
        vec![key_id(&newer)]
    );
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn secrets_manager_whole_string_labels_discard_and_rotation_in_progress() {
    let admin = admin().await;
    let secret_id = "labels/db-password";
    sm(&admin)
        .create_secret()
        .name(secret_id)
        .secret_string("v0")
        .send()
        .await
        .unwrap();
    let store = store(secret_id, None);
    let started = SystemTime::now();
    let (r1, r2) = (rotation_id("labels", 1), rotation_id("labels", 2));

    assert_eq!(
        store
            .current(ctx(&r1, started))
            .await
            .unwrap()
            .unwrap()
            .secret
            .expose_secret(),
        "v0"
    );
    store.stage(ctx(&r1, started), &cred("v1")).await.unwrap();
    store
        .stage(ctx(&r1, started), &cred("ignored: r1 is already staged"))
        .await
        .unwrap();
    assert_eq!(
        store
            .pending(ctx(&r1, started))
            .await
            .unwrap()
            .unwrap()
            .secret
            .expose_secret(),
        "v1"
    );
    assert!(store.pending(ctx(&r2, started)).await.unwrap().is_none());

    // A rotation id AWS cannot take as a version id is refused before anything is written.
    let err = store
        .stage(ctx("short", started), &cred("v9"))
        .await
        .unwrap_err();
    assert!(err.message.contains("32 to 64 characters"), "{err}");

    // Another rotation must not clobber r1's pending version.
    let err = store
        .stage(ctx(&r2, started), &cred("v2"))
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent);
    assert!(
        err.message.contains("in progress") && err.message.contains(&r1),
        "{err}"
    );
    assert!(!err.to_string().contains("v2"));

    // discard: AWSPENDING is gone, the current value untouched; re-running is fine.
    store.discard(ctx(&r1, started)).await.unwrap();
    store.discard(ctx(&r1, started)).await.unwrap();
    let after_discard = labels(&admin, secret_id).await;
    assert!(
        after_discard.values().all(|l| !l.contains("AWSPENDING")),
        "{after_discard:?}"
    );
    assert!(store.pending(ctx(&r1, started)).await.unwrap().is_none());
    assert_eq!(current_string(&admin, secret_id).await, "v0");

    // Now r2 may rotate.
    store.stage(ctx(&r2, started), &cred("v2")).await.unwrap();
    assert_eq!(
        labels(&admin, secret_id).await.get(&r2),
        Some(&set(&["AWSPENDING"]))
    );
    store.promote(ctx(&r2, started)).await.unwrap();
    assert_eq!(current_string(&admin, secret_id).await, "v2");
    let after_promote = labels(&admin, secret_id).await;
    assert_eq!(
        after_promote.get(&r2),
        Some(&set(&["AWSCURRENT"])),
        "{after_promote:?}"
    );
    assert_eq!(
        after_promote
            .values()
            .filter(|l| l.contains("AWSPREVIOUS"))
            .count(),
        1,
        "{after_promote:?}"
    );
    // Discarding a promoted rotation does not demote it.
    store.discard(ctx(&r2, started)).await.unwrap();
    assert_eq!(current_string(&admin, secret_id).await, "v2");
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn secrets_manager_secret_without_a_value_gets_its_first_one() {
    let admin = admin().await;
    let secret_id = "first/value";
    sm(&admin)
        .create_secret()
        .name(secret_id)
        .send()
        .await
        .unwrap();
    let store = store(secret_id, Some("password"));
    let rid = rotation_id("first", 1);
    let ctx = StepContext {
        credential_id: "db",
        rotation_id: &rid,
        secret_field: "password",
        started_at: SystemTime::now(),
        old_attrs: None,
    };
    assert!(store.current(ctx).await.unwrap().is_none());
    let mut new = cred("s3cret-first");
    new.attrs.insert("username".into(), "app".into());
    store.stage(ctx, &new).await.unwrap();
    store.promote(ctx).await.unwrap();
    store.promote(ctx).await.unwrap();
    let current = store.current(ctx).await.unwrap().unwrap();
    assert_eq!(current.secret.expose_secret(), "s3cret-first");
    assert_eq!(current.attrs["username"], "app");
    assert_eq!(
        labels(&admin, secret_id).await.get(&rid),
        Some(&set(&["AWSCURRENT"]))
    );
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn verify_fails_when_the_new_key_is_deleted_out_of_band() {
    let admin = admin().await;
    let user = "verify-fail-user";
    create_user(&admin, user).await;
    let rotator = rotator(user, "2s", true);
    let rid = rotation_id("verify", 1);
    let ctx = ctx(&rid, SystemTime::now());

    let new = rotator.issue(ctx, None).await.unwrap();
    iam(&admin)
        .delete_access_key()
        .user_name(user)
        .access_key_id(key_id(&new))
        .send()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = rotator.verify(ctx, &new).await.unwrap_err();
    assert_error(
        &err,
        ErrorClass::Permanent,
        "InvalidClientTokenId",
        "STS GetCallerIdentity",
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "verify retries for verify_timeout"
    );
    assert!(
        !err.to_string().contains(new.secret.expose_secret()),
        "the error must not contain the secret"
    );
    // The engine then abandons: the key is already gone, which is fine.
    rotator.abandon(ctx, Some(&new.attrs), None).await.unwrap();
    assert!(keys(&admin, user).await.is_empty());
}
