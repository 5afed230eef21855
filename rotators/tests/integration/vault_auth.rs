//! Vault login methods and token lifetime against the OpenBao dev server
//! (tests/backends/50-openbao.sh): AppRole with role-id and secret-id references, a
//! response-wrapped secret-id that unwraps once, JWT login with a JWT signed here, renewal before
//! expiry and a new login past the max TTL or after a revocation, and `vault:` references with
//! their cache. Every secret of the test is checked absent from every error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keyrotd_plugin::reference::SecretRef;
use keyrotd_plugin::{ErrorClass, ProviderError, Timeouts};
use keyrotd_providers::resolve::Resolve;
use keyrotd_providers::vault::{reference, VaultAuth, VaultConnection, VaultSession};
use keyrotd_test_support::openbao::{unique, JwtKey, OpenBao};
use secrecy::ExposeSecret;

pub(crate) fn timeouts() -> Timeouts {
    Timeouts::new(Duration::from_secs(2), Duration::from_secs(10))
}

fn write(dir: &Path, name: &str, value: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, value).unwrap();
    path
}

/// An AppRole mount with one role whose tokens carry `policy` and `default`.
pub(crate) struct AppRole {
    pub mount: String,
    pub role: String,
    pub role_id: String,
}

impl AppRole {
    pub(crate) fn new(bao: &OpenBao, policy: &str, ttl: &str, max_ttl: &str) -> Self {
        let mount = unique("approle");
        let role = unique("keyrotd");
        bao.bao(&["auth", "enable", &format!("-path={mount}"), "approle"]);
        bao.bao(&[
            "write",
            &format!("auth/{mount}/role/{role}"),
            &format!("token_policies={policy},default"),
            &format!("token_ttl={ttl}"),
            &format!("token_max_ttl={max_ttl}"),
        ]);
        let role_id = bao
            .bao(&[
                "read",
                "-field=role_id",
                &format!("auth/{mount}/role/{role}/role-id"),
            ])
            .trim()
            .to_owned();
        Self {
            mount,
            role,
            role_id,
        }
    }

    pub(crate) fn secret_id(&self, bao: &OpenBao) -> String {
        bao.bao(&[
            "write",
            "-f",
            "-field=secret_id",
            &format!("auth/{}/role/{}/secret-id", self.mount, self.role),
        ])
        .trim()
        .to_owned()
    }

    fn wrapped_secret_id(&self, bao: &OpenBao) -> String {
        let answer = bao.bao_json(&[
            "write",
            "-wrap-ttl=5m",
            "-f",
            &format!("auth/{}/role/{}/secret-id", self.mount, self.role),
        ]);
        answer["wrap_info"]["token"].as_str().unwrap().to_owned()
    }

    /// A connection logging in with this role, the ids in files of `dir`.
    pub(crate) fn connection(
        &self,
        bao: &OpenBao,
        dir: &Path,
        secret_id: &str,
        wrapped: bool,
    ) -> VaultConnection {
        VaultConnection {
            address: Some(bao.addr.clone()),
            auth: Some(VaultAuth::Approle {
                mount: self.mount.clone(),
                role_id: SecretRef::File(write(dir, "role-id", &self.role_id)),
                secret_id: SecretRef::File(write(dir, "secret-id", secret_id)),
                secret_id_wrapped: wrapped,
            }),
            request_timeout: Some(Duration::from_secs(5)),
            ..VaultConnection::default()
        }
    }
}

/// A KV v2 secret `value=VALUE` and a policy that may read it. Returns (path, policy).
fn readable_secret(bao: &OpenBao, value: &str) -> (String, String) {
    let path = unique("auth");
    bao.bao(&[
        "kv",
        "put",
        &format!("secret/{path}"),
        &format!("value={value}"),
    ]);
    let policy = unique("auth-read");
    let hcl = format!("path \"secret/data/{path}\" {{ capabilities = [\"read\"] }}\n");
    bao.bao_stdin(&["policy", "write", &policy, "-"], &hcl);
    (path, policy)
}

async fn read_value(session: &VaultSession, path: &str) -> Result<String, ProviderError> {
    let data: serde_json::Value = session
        .call(
            &format!("read secret/data/{path}"),
            timeouts(),
            |c| async move { vaultrs::kv2::read(&*c, "secret", path).await },
        )
        .await?;
    Ok(data["value"].as_str().unwrap_or_default().to_owned())
}

/// The accessor of the session's current token (each login has a new one).
async fn accessor(session: &VaultSession) -> String {
    session
        .call("lookup-self", timeouts(), |c| async move {
            vaultrs::token::lookup_self(&*c).await
        })
        .await
        .unwrap()
        .accessor
}

fn assert_hidden(error: &ProviderError, secrets: &[&str]) {
    for secret in secrets {
        assert!(!error.message.contains(secret), "a secret leaked: {error}");
    }
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn approle_logs_in_and_logs_in_again_after_its_token_is_revoked() {
    let bao = OpenBao::shared();
    let (path, policy) = readable_secret(&bao, "approle-visible");
    let approle = AppRole::new(&bao, &policy, "1h", "2h");
    let dir = tempfile::tempdir().unwrap();
    let secret_id = approle.secret_id(&bao);
    let session =
        VaultSession::shared(&approle.connection(&bao, dir.path(), &secret_id, false)).unwrap();
    assert_eq!(
        read_value(&session, &path).await.unwrap(),
        "approle-visible"
    );
    let first = accessor(&session).await;
    bao.bao(&["token", "revoke", "-accessor", &first]);
    assert_eq!(
        read_value(&session, &path).await.unwrap(),
        "approle-visible"
    );
    assert_ne!(accessor(&session).await, first, "a new login");

    // A secret-id Vault does not know: a permanent login error that shows neither id.
    let dir = tempfile::tempdir().unwrap();
    let wrong = "0b7f1c2e-8d40-4a8b-9d59-3c2f7e0a1b2c";
    let session =
        VaultSession::shared(&approle.connection(&bao, dir.path(), wrong, false)).unwrap();
    let error = read_value(&session, &path).await.unwrap_err();
    assert_eq!(error.class, ErrorClass::Permanent, "{error}");
    assert!(error.message.contains("Vault login (AppRole"), "{error}");
    assert_hidden(&error, &[wrong, &approle.role_id, &secret_id]);
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn a_wrapped_secret_id_is_unwrapped_once_and_kept_for_later_logins() {
    let bao = OpenBao::shared();
    let (path, policy) = readable_secret(&bao, "wrapped-visible");
    let approle = AppRole::new(&bao, &policy, "1h", "2h");
    let dir = tempfile::tempdir().unwrap();
    let wrapping = approle.wrapped_secret_id(&bao);
    let connection = approle.connection(&bao, dir.path(), &wrapping, true);
    let session = VaultSession::shared(&connection).unwrap();
    assert_eq!(
        read_value(&session, &path).await.unwrap(),
        "wrapped-visible"
    );
    // A new login after a revocation uses the kept secret-id: the wrapping token is spent.
    let first = accessor(&session).await;
    bao.bao(&["token", "revoke", "-accessor", &first]);
    assert_eq!(
        read_value(&session, &path).await.unwrap(),
        "wrapped-visible"
    );
    assert_ne!(accessor(&session).await, first);

    // A restarted daemon (a session of its own) cannot unwrap the same token again.
    let restarted = VaultConnection {
        request_timeout: Some(Duration::from_secs(6)),
        ..connection.clone()
    };
    let again = VaultSession::shared(&restarted).unwrap();
    let error = read_value(&again, &path).await.unwrap_err();
    assert_eq!(error.class, ErrorClass::Permanent, "{error}");
    assert!(
        error.message.contains("already unwrapped or has expired")
            && error.message.contains("write a fresh wrapping token"),
        "{error}"
    );
    assert_hidden(&error, &[&wrapping, &approle.role_id]);

    // Handed a fresh wrapping token, the restarted daemon logs in.
    let fresh = approle.wrapped_secret_id(&bao);
    std::fs::write(dir.path().join("secret-id"), &fresh).unwrap();
    assert_eq!(read_value(&again, &path).await.unwrap(), "wrapped-visible");
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn jwt_login_with_a_locally_signed_token_reread_at_each_login() {
    let bao = OpenBao::shared();
    let (path, policy) = readable_secret(&bao, "jwt-visible");
    let dir = tempfile::tempdir().unwrap();
    let key = JwtKey::new(dir.path());
    let (mount, role) = bao.jwt_role(&key, &policy);
    let jwt = key.sign("system:serviceaccount:ops:keyrotd", "keyrotd");
    let jwt_file = write(dir.path(), "jwt", &jwt);
    let connection = VaultConnection {
        address: Some(bao.addr.clone()),
        auth: Some(VaultAuth::Jwt {
            mount: mount.clone(),
            role: role.clone(),
            jwt: SecretRef::File(jwt_file.clone()),
        }),
        ..VaultConnection::default()
    };
    let session = VaultSession::shared(&connection).unwrap();
    assert_eq!(read_value(&session, &path).await.unwrap(), "jwt-visible");

    // The file rotates (a new projected token); a revoked login reads it again.
    let first = accessor(&session).await;
    let rotated = key.sign("system:serviceaccount:ops:keyrotd", "keyrotd");
    std::fs::write(&jwt_file, &rotated).unwrap();
    bao.bao(&["token", "revoke", "-accessor", &first]);
    assert_eq!(read_value(&session, &path).await.unwrap(), "jwt-visible");

    // A JWT for another audience is refused, permanently, without showing it. The same session
    // reads the file again at its next login: a session that kept the first JWT in memory
    // would log in again with it and succeed.
    let other = key.sign("system:serviceaccount:ops:keyrotd", "someone-else");
    std::fs::write(&jwt_file, &other).unwrap();
    let second = accessor(&session).await;
    bao.bao(&["token", "revoke", "-accessor", &second]);
    let error = read_value(&session, &path).await.unwrap_err();
    assert_eq!(error.class, ErrorClass::Permanent, "{error}");
    assert!(error.message.contains("Vault login (JWT role"), "{error}");
    assert_hidden(&error, &[&other, &jwt, &rotated]);
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn the_token_is_renewed_before_expiry_and_replaced_past_its_max_ttl() {
    let bao = OpenBao::shared();
    let (path, policy) = readable_secret(&bao, "renewed-visible");
    let approle = AppRole::new(&bao, &policy, "3s", "8s");
    let dir = tempfile::tempdir().unwrap();
    let secret_id = approle.secret_id(&bao);
    let session =
        VaultSession::shared(&approle.connection(&bao, dir.path(), &secret_id, false)).unwrap();
    let start = std::time::Instant::now();
    let first = accessor(&session).await;
    // Calls 2/3 into each TTL renew the token: past the first TTL (3 s) it is the same token.
    for at in [2200, 4400] {
        tokio::time::sleep_until((start + Duration::from_millis(at)).into()).await;
        assert_eq!(
            read_value(&session, &path).await.unwrap(),
            "renewed-visible"
        );
        assert_eq!(
            accessor(&session).await,
            first,
            "renewed, not replaced, at {at} ms"
        );
    }
    // Past the max TTL (8 s) no renewal helps: the session logs in again, the call succeeds.
    tokio::time::sleep_until((start + Duration::from_millis(9000)).into()).await;
    assert_eq!(
        read_value(&session, &path).await.unwrap(),
        "renewed-visible"
    );
    assert_ne!(accessor(&session).await, first);
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn vault_references_read_kv2_and_kv1_and_are_cached_for_the_configured_time() {
    let bao = OpenBao::shared();
    let (path, policy) = readable_secret(&bao, "first-value");
    let kv1 = unique("kv1");
    bao.bao(&[
        "secrets",
        "enable",
        &format!("-path={kv1}"),
        "-version=1",
        "kv",
    ]);
    bao.bao(&["write", &format!("{kv1}/app"), "password=kv1-value"]);
    let kv1_policy = unique("kv1-read");
    let hcl = format!("path \"{kv1}/app\" {{ capabilities = [\"read\"] }}\n");
    bao.bao_stdin(&["policy", "write", &kv1_policy, "-"], &hcl);
    let approle = AppRole::new(&bao, &format!("{policy},{kv1_policy}"), "1h", "2h");
    let dir = tempfile::tempdir().unwrap();
    let secret_id = approle.secret_id(&bao);
    let mut connection = approle.connection(&bao, dir.path(), &secret_id, false);
    connection.reference_cache = Some(Duration::from_secs(5));
    connection.reference_kv1_mounts = Some(vec![kv1.clone()]);
    reference::set_default(&connection);

    let r: SecretRef = format!("vault:secret/{path}#value").parse().unwrap();
    let read = |r: SecretRef| async move { r.resolve_async(timeouts()).await };
    // The cache window starts at the first read: timed from there, not from after the slow
    // `bao` command below.
    let start = std::time::Instant::now();
    assert_eq!(
        read(r.clone()).await.unwrap().expose_secret(),
        "first-value"
    );
    bao.bao(&["kv", "put", &format!("secret/{path}"), "value=second-value"]);
    assert!(
        start.elapsed() < Duration::from_millis(4500),
        "the update came too late to test the cache"
    );
    assert_eq!(
        read(r.clone()).await.unwrap().expose_secret(),
        "first-value",
        "cached"
    );
    tokio::time::sleep_until((start + Duration::from_millis(5200)).into()).await;
    assert_eq!(
        read(r.clone()).await.unwrap().expose_secret(),
        "second-value"
    );

    let v1: SecretRef = format!("vault:{kv1}/app#password").parse().unwrap();
    assert_eq!(read(v1).await.unwrap().expose_secret(), "kv1-value");

    // Outside the policy, a missing field: permanent errors naming the reference.
    let denied: SecretRef = "vault:secret/elsewhere#value".parse().unwrap();
    let error = read(denied).await.unwrap_err();
    assert_eq!(error.class(), ErrorClass::Permanent, "{error}");
    assert!(
        error.to_string().contains("vault:secret/elsewhere#value")
            && error.to_string().contains("permission denied"),
        "{error}"
    );
    let missing: SecretRef = format!("vault:secret/{path}#nope").parse().unwrap();
    let error = read(missing).await.unwrap_err();
    assert!(error.to_string().contains("no field `nope`"), "{error}");
    assert!(!error.to_string().contains("second-value"), "{error}");
}
