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
use keyrotd_rotators::aws::iam::{IamAccessKeyConfig, IamAccessKeyRotator};
use keyrotd_rotators::aws::secrets_manager::{SecretsManagerConfig, SecretsManagerStore};
use keyrotd_rotators::timeouts::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT};
use keyrotd_rotators::{
    Attrs, Credential, ErrorClass, ProviderError, Rotator, StepContext, Store, Timeouts,
};
use keyrotd_test_support::backend_env;
use secrecy::{ExposeSecret, SecretString};

use crate::aws_env;

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
    keyrotd_rotators::aws::load_sdk_config(
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
        Err(e) => {
            if let Some(code) = aws_sdk_sts::error::ProvideErrorMetadata::code(&e) {
                return Err(code.to_owned());
            }
            // moto wraps STS authentication errors in an element the SDK does not parse.
            let body = e
                .raw_response()
                .and_then(|r| r.body().bytes())
                .unwrap_or_default();
            let body = String::from_utf8_lossy(body);
            let code = body
                .split_once("<Code>")
                .and_then(|(_, rest)| rest.split_once("</Code>"));
            Err(code.map_or_else(|| format!("no code in {body}"), |(code, _)| code.to_owned()))
        }
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

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn crash_recovery_deletes_the_orphaned_key_and_reissues() {
    let admin = admin().await;
    let user = "crash-user";
    create_user(&admin, user).await;
    let current = create_key(&admin, user).await;
    // IAM dates have whole seconds: start the rotation in a later second than the current key.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let rotator = rotator(user, "10s", true);
    let rid = rotation_id("crash", 1);
    let ctx = ctx(&rid, SystemTime::now());

    let lost = rotator.issue(ctx, Some(&current)).await.unwrap();
    drop(lost); // the crash: the secret access key is gone for good
    assert_eq!(keys(&admin, user).await.len(), 2);
    rotator.abandon(ctx, None, Some(&current)).await.unwrap();
    rotator.abandon(ctx, None, Some(&current)).await.unwrap();
    assert_eq!(
        keys(&admin, user).await.into_keys().collect::<Vec<_>>(),
        vec![key_id(&current)]
    );

    let reissued = rotator.issue(ctx, Some(&current)).await.unwrap();
    rotator.verify(ctx, &reissued).await.unwrap();
    assert_eq!(keys(&admin, user).await.len(), 2);
    // abandon with the issued key known deletes exactly that key, never the current one.
    rotator
        .abandon(ctx, Some(&current.attrs), Some(&current))
        .await
        .unwrap();
    rotator
        .abandon(ctx, Some(&reissued.attrs), Some(&current))
        .await
        .unwrap();
    assert_eq!(
        keys(&admin, user).await.into_keys().collect::<Vec<_>>(),
        vec![key_id(&current)]
    );
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn crash_recovery_leaves_keys_made_before_the_rotation_alone() {
    let admin = admin().await;
    let user = "crash-oob-user";
    create_user(&admin, user).await;
    let out_of_band = create_key(&admin, user).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let rotator = rotator(user, "10s", true);
    let rid = rotation_id("crash-oob", 1);
    let ctx = ctx(&rid, SystemTime::now());

    // No current credential in the store yet (first rotation), and the issued key is lost.
    let _lost = rotator.issue(ctx, None).await.unwrap();
    rotator.abandon(ctx, None, None).await.unwrap();
    assert_eq!(
        keys(&admin, user).await.into_keys().collect::<Vec<_>>(),
        vec![key_id(&out_of_band)]
    );
}

/// A key named in the rotation's old attributes is what consumers used before it; a crash
/// cleanup must spare it even when its `CreateDate` looks later than the rotation's start (AWS's
/// clock ahead of the local one) and the store cannot say what is current.
#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn crash_recovery_never_deletes_the_key_the_rotation_replaces() {
    let admin = admin().await;
    let user = "crash-old-user";
    create_user(&admin, user).await;
    let rotator = rotator(user, "10s", true);
    let rid = rotation_id("crash-old", 1);
    // The rotation started a little before the old key's CreateDate, as a local clock behind
    // AWS's makes it look.
    let started = SystemTime::now() - Duration::from_secs(1);
    let old = create_key(&admin, user).await;
    let old_attrs = old.attrs.clone();
    let ctx = StepContext {
        old_attrs: Some(&old_attrs),
        ..ctx(&rid, started)
    };
    let _lost = rotator.issue(ctx, None).await.unwrap();
    assert_eq!(keys(&admin, user).await.len(), 2);
    rotator.abandon(ctx, None, None).await.unwrap();
    assert_eq!(
        keys(&admin, user).await.into_keys().collect::<Vec<_>>(),
        vec![key_id(&old)],
        "the orphan is gone and the replaced key is kept"
    );
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn two_keys_already_inactive_leftover_is_deleted_two_active_fail_untouched() {
    let admin = admin().await;
    let user = "two-keys-user";
    create_user(&admin, user).await;
    let current = create_key(&admin, user).await;
    let leftover = create_key(&admin, user).await;
    iam(&admin)
        .update_access_key()
        .user_name(user)
        .access_key_id(key_id(&leftover))
        .status(StatusType::Inactive)
        .send()
        .await
        .unwrap();
    // delete_after_deactivate = false leaves inactive keys behind, as here.
    let rotator = rotator(user, "10s", false);
    let rid = rotation_id("two-keys", 1);
    let ctx = ctx(&rid, SystemTime::now());

    let new = rotator.issue(ctx, Some(&current)).await.unwrap();
    let now = keys(&admin, user).await;
    assert_eq!(now.len(), 2);
    assert!(
        now.contains_key(&key_id(&current)) && now.contains_key(&key_id(&new)),
        "{now:?}"
    );
    assert!(!now.contains_key(&key_id(&leftover)));

    // Both keys active: issue refuses and touches neither.
    let err = rotator.issue(ctx, Some(&current)).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent);
    assert!(
        err.message.contains("two access keys") && err.message.contains(&key_id(&new)),
        "{err}"
    );
    assert_eq!(keys(&admin, user).await, now);

    // revoke without delete leaves the old key inactive; the next issue removes it.
    rotator.revoke(ctx, &current.attrs).await.unwrap();
    rotator.revoke(ctx, &current.attrs).await.unwrap();
    assert_eq!(
        keys(&admin, user)
            .await
            .get(&key_id(&current))
            .map(String::as_str),
        Some("Inactive")
    );
    let next = rotator.issue(ctx, Some(&new)).await.unwrap();
    let after = keys(&admin, user).await;
    assert_eq!(
        after.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([key_id(&new), key_id(&next)])
    );
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn errors_carry_the_aws_code_and_name_the_operation() {
    let admin = admin().await;
    let rid = rotation_id("errors", 1);
    let ctx = ctx(&rid, SystemTime::now());

    let missing = store("errors/no-such-secret", None);
    let err = missing.current(ctx).await.unwrap_err();
    assert_error(
        &err,
        ErrorClass::Permanent,
        "ResourceNotFoundException",
        "Secrets Manager DescribeSecret",
    );
    assert!(err.to_string().contains("errors/no-such-secret"), "{err}");
    let err = missing.stage(ctx, &cred("never-shown")).await.unwrap_err();
    assert_error(
        &err,
        ErrorClass::Permanent,
        "ResourceNotFoundException",
        "Secrets Manager",
    );
    assert!(!err.to_string().contains("never-shown"));

    let nobody = rotator("errors-no-such-user", "1s", true);
    let err = nobody.issue(ctx, None).await.unwrap_err();
    assert_error(
        &err,
        ErrorClass::Permanent,
        "NoSuchEntity",
        "IAM ListAccessKeys",
    );
    let attrs = Attrs::from([("AccessKeyId".to_owned(), "AKIAIOSFODNN7EXAMPLE".to_owned())]);
    let err = nobody.revoke(ctx, &attrs).await.unwrap_err();
    assert_error(
        &err,
        ErrorClass::Permanent,
        "NoSuchEntity",
        "IAM UpdateAccessKey",
    );

    // A JSON secret without the configured member, and a value that is not JSON.
    sm(&admin)
        .create_secret()
        .name("errors/json")
        .secret_string(r#"{"username":"app","pass":"hunter2"}"#)
        .send()
        .await
        .unwrap();
    let err = store("errors/json", Some("password"))
        .current(ctx)
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent);
    assert!(err.message.contains("no string member `password`"), "{err}");
    assert!(!err.to_string().contains("hunter2"));
    sm(&admin)
        .create_secret()
        .name("errors/plain")
        .secret_string("hunter2-plain")
        .send()
        .await
        .unwrap();
    let err = store("errors/plain", Some("password"))
        .current(ctx)
        .await
        .unwrap_err();
    assert!(
        err.message.contains("not a JSON object") && !err.to_string().contains("hunter2"),
        "{err}"
    );
    let err = store("errors/plain", Some("password"))
        .stage(ctx, &cred("x"))
        .await
        .unwrap_err();
    assert!(err.message.contains("not a JSON object"), "{err}");

    // A refused signature (a wrong secret for a real key id) is permanent and carries the code.
    create_user(&admin, "errors-user").await;
    let key = create_key(&admin, "errors-user").await;
    let wrong = Credential {
        secret: SecretString::from("not-the-secret".to_owned()),
        attrs: key.attrs.clone(),
    };
    let err = rotator("errors-user", "1s", true)
        .verify(ctx, &wrong)
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(err.code.is_some(), "{err}");
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn aws_sm_secret_references_resolve_awscurrent_against_moto() {
    use keyrotd_rotators::reference::{RefError, SecretRef};
    let admin = admin().await;
    let _endpoint = aws_env::endpoint(&moto_url()).await;
    let name = "refs/admin-dsn";
    let created = sm(&admin)
        .create_secret()
        .name(name)
        .secret_string(r#"{"username":"admin","password":"ref-pw-0","port":5432}"#)
        .send()
        .await
        .unwrap();
    let arn = created.arn().unwrap().to_owned();
    let resolve = |text: String| async move {
        let r: SecretRef = text.parse().unwrap();
        assert!(
            matches!(r.resolve(), Err(RefError::NeedsAsync(_))),
            "{text}"
        );
        r.resolve_async(Timeouts::default()).await
    };

    let field = resolve(format!("aws-sm:{name}#password")).await.unwrap();
    assert_eq!(field.expose_secret(), "ref-pw-0");
    let whole = resolve(format!("aws-sm:{name}")).await.unwrap();
    let whole: serde_json::Value = serde_json::from_str(whole.expose_secret()).unwrap();
    assert_eq!(whole["port"], 5432);
    let by_arn = resolve(format!("aws-sm:{arn}#username")).await.unwrap();
    assert_eq!(by_arn.expose_secret(), "admin");

    // A pending version is not what consumers read: AWSCURRENT is.
    sm(&admin)
        .put_secret_value()
        .secret_id(name)
        .client_request_token(rotation_id("refs", 1))
        .secret_string(r#"{"username":"admin","password":"ref-pw-pending"}"#)
        .version_stages("AWSPENDING")
        .send()
        .await
        .unwrap();
    let field = resolve(format!("aws-sm:{name}#password")).await.unwrap();
    assert_eq!(field.expose_secret(), "ref-pw-0");

    // Errors name the reference and carry the AWS code, never a value.
    let err = resolve(format!("aws-sm:{name}#pasword")).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, RefError::Aws { .. })
            && text.contains(&format!("aws-sm:{name}#pasword"))
            && text.contains("no string member `pasword`")
            && !text.contains("ref-pw"),
        "{text}"
    );
    let err = resolve("aws-sm:refs/no-such-secret#password".into())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("aws-sm:refs/no-such-secret#password")
            && text.contains("ResourceNotFoundException"),
        "{text}"
    );
    // An empty value is refused like an empty file.
    sm(&admin)
        .create_secret()
        .name("refs/empty")
        .secret_string(r#"{"password":""}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resolve("aws-sm:refs/empty#password".into())
            .await
            .unwrap_err(),
        RefError::EmptyValue("aws-sm:refs/empty#password".into())
    );
}
