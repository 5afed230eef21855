//! The shared Vault session against the OpenBao dev server (tests/backends/50-openbao.sh): a
//! least-privilege token reads what its policy allows, a missing capability is a permanent
//! error naming the call, a revoked token is read again from its reference and the call
//! succeeds, and a server that is not there is a transient failure.

use std::time::Duration;

use keyrotd_plugin::reference::SecretRef;
use keyrotd_plugin::{ErrorClass, Timeouts};
use keyrotd_providers::vault::{VaultAuth, VaultConnection, VaultSession};
use keyrotd_test_support::openbao::{unique, OpenBao};

fn connection(addr: &str, token_file: &std::path::Path) -> VaultConnection {
    VaultConnection {
        address: Some(addr.to_owned()),
        auth: Some(VaultAuth::Token {
            token: SecretRef::File(token_file.to_owned()),
        }),
        request_timeout: Some(Duration::from_secs(5)),
        ..VaultConnection::default()
    }
}

fn timeouts() -> Timeouts {
    Timeouts::new(Duration::from_secs(2), Duration::from_secs(10))
}

async fn read_field(
    session: &VaultSession,
    path: &str,
) -> Result<String, keyrotd_plugin::ProviderError> {
    let what = format!("read secret/data/{path}");
    let data: serde_json::Value = session
        .call(&what, timeouts(), |client| async move {
            vaultrs::kv2::read(&*client, "secret", path).await
        })
        .await?;
    Ok(data["value"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn a_revoked_token_is_read_again_and_a_missing_capability_is_permanent() {
    let bao = OpenBao::shared();
    let path = unique("session");
    bao.bao(&[
        "kv",
        "put",
        &format!("secret/{path}"),
        "value=public-test-value",
    ]);
    let policy = unique("session-read");
    let hcl = format!("path \"secret/data/{path}\" {{ capabilities = [\"read\"] }}\n");
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, bao.token_with_policy(&policy, &hcl, "1h")).unwrap();

    let session = VaultSession::shared(&connection(&bao.addr, &token_file)).unwrap();
    assert_eq!(
        read_field(&session, &path).await.unwrap(),
        "public-test-value"
    );

    // A path outside the policy: a permanent error that names the call.
    let denied = read_field(&session, "elsewhere").await.unwrap_err();
    assert_eq!(denied.class, ErrorClass::Permanent, "{denied}");
    assert_eq!(denied.code.as_deref(), Some("403"));
    assert!(
        denied
            .message
            .contains("read secret/data/elsewhere: permission denied"),
        "{denied}"
    );

    // The token is revoked and its file replaced (as Vault Agent would): the session finds the
    // 403 is an invalid token, reads the reference again and the call succeeds.
    let old = std::fs::read_to_string(&token_file).unwrap();
    bao.bao(&["token", "revoke", old.trim()]);
    std::fs::write(&token_file, bao.token_with_policy(&policy, &hcl, "1h")).unwrap();
    assert_eq!(
        read_field(&session, &path).await.unwrap(),
        "public-test-value"
    );

    // Revoked with nothing new in the file: the login fails and says Vault refused it.
    let current = std::fs::read_to_string(&token_file).unwrap();
    bao.bao(&["token", "revoke", current.trim()]);
    let refused = read_field(&session, &path).await.unwrap_err();
    assert_eq!(refused.code.as_deref(), Some("403"), "{refused}");
    assert!(
        !refused.message.contains(current.trim()),
        "the token leaked: {refused}"
    );
}

#[tokio::test]
async fn a_server_that_is_not_there_is_transient() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s.not-a-real-token").unwrap();
    let port = keyrotd_test_support::free_port();
    let session = VaultSession::shared(&connection(
        &format!("http://127.0.0.1:{port}"),
        &token_file,
    ))
    .unwrap();
    let error = read_field(&session, "x").await.unwrap_err();
    assert_eq!(error.class, ErrorClass::Transient, "{error}");
    assert!(error.message.contains("could not reach Vault"), "{error}");
    assert!(!error.message.contains("not-a-real-token"), "{error}");
}
