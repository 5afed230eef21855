//! The Vault credential rotators at the provider level, against the OpenBao dev server with a
//! root-free token: every step re-run is a no-op (revoking twice, an abandon that finds the
//! issued value current), verify refuses what does not work (a destroyed secret-id, a key that
//! is not the certificate's), and no error carries the secret.

use std::time::{Duration, SystemTime};

use keyrotd_plugin::reference::SecretRef;
use keyrotd_plugin::{Attrs, Credential, ErrorClass, Rotator, StepContext};
use keyrotd_providers::vault::approle::{ApproleSecretIdConfig, ApproleSecretIdRotator};
use keyrotd_providers::vault::pki::{PkiCertificateConfig, PkiCertificateRotator};
use keyrotd_providers::vault::{VaultAuth, VaultConnection};
use keyrotd_test_support::openbao::{unique, OpenBao};
use secrecy::ExposeSecret;

fn ctx(rotation: &str) -> StepContext<'_> {
    StepContext {
        credential_id: "c",
        rotation_id: rotation,
        secret_field: "s",
        started_at: SystemTime::now() - Duration::from_secs(5),
        old_attrs: None,
    }
}

/// A connection with a token carrying `hcl` only.
fn connection(bao: &OpenBao, dir: &std::path::Path, hcl: &str) -> VaultConnection {
    let token = dir.join("token");
    std::fs::write(&token, bao.token_with_policy(&unique("creds"), hcl, "1h")).unwrap();
    VaultConnection {
        address: Some(bao.addr.clone()),
        auth: Some(VaultAuth::Token {
            token: SecretRef::File(token),
        }),
        ..VaultConnection::default()
    }
}

/// The HCL of a rotator's needs.
fn hcl(rotator: &dyn Rotator) -> String {
    rotator
        .permissions()
        .needs
        .iter()
        .map(|need| match need {
            keyrotd_plugin::permissions::Permission::Vault(rule) => format!(
                "path \"{}\" {{ capabilities = {:?} }}\n",
                rule.path, rule.capabilities
            ),
            other => panic!("not a Vault rule: {other:?}"),
        })
        .collect()
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn approle_steps_are_idempotent_and_a_destroyed_secret_id_fails_verify() {
    let bao = OpenBao::shared();
    let mount = unique("approle");
    bao.bao(&["auth", "enable", &format!("-path={mount}"), "approle"]);
    bao.bao(&[
        "write",
        &format!("auth/{mount}/role/r"),
        "token_policies=default",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let mut config: ApproleSecretIdConfig =
        toml::from_str(&format!("mount = \"{mount}\"\nrole_name = \"r\"")).unwrap();
    config.vault = VaultConnection {
        address: Some(bao.addr.clone()),
        auth: Some(VaultAuth::Token {
            token: SecretRef::Env("UNUSED".into()),
        }),
        ..VaultConnection::default()
    };
    let policy = hcl(&ApproleSecretIdRotator::new(config.clone()).unwrap());
    config.vault = connection(&bao, dir.path(), &policy);
    let rotator = ApproleSecretIdRotator::new(config).unwrap();

    let new = rotator.issue(ctx("r1"), None).await.unwrap();
    rotator.verify(ctx("r1"), &new).await.unwrap();
    // Verify twice: each login's token is revoked, the secret-id still works.
    rotator.verify(ctx("r1"), &new).await.unwrap();
    // An abandon that finds the issued secret-id current leaves it alone.
    rotator
        .abandon(ctx("r1"), Some(&new.attrs), Some(&new))
        .await
        .unwrap();
    rotator.verify(ctx("r1"), &new).await.unwrap();

    rotator.revoke(ctx("r2"), &new.attrs).await.unwrap();
    // Revoking again: Vault answers 500 for the unknown accessor; lookup settles it.
    rotator.revoke(ctx("r2"), &new.attrs).await.unwrap();
    let refused = rotator.verify(ctx("r2"), &new).await.unwrap_err();
    assert_eq!(refused.class, ErrorClass::Permanent, "{refused}");
    assert!(refused.message.contains("log in at auth/"), "{refused}");
    assert!(!refused.message.contains(new.secret.expose_secret()));
    // No secret-id at all: LIST answers 404, the orphan search finds nothing.
    rotator.abandon(ctx("r3"), None, None).await.unwrap();
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn pki_verify_refuses_a_foreign_key_and_revoking_twice_is_fine() {
    let bao = OpenBao::shared();
    let mount = unique("pki");
    bao.bao(&["secrets", "enable", &format!("-path={mount}"), "pki"]);
    let root = bao.bao(&[
        "write",
        "-field=certificate",
        &format!("{mount}/root/generate/internal"),
        "common_name=root.test",
        "ttl=100h",
    ]);
    bao.bao(&[
        "write",
        &format!("{mount}/roles/r"),
        "allowed_domains=example.test",
        "allow_subdomains=true",
        "key_type=ec",
        "key_bits=256",
    ]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("root.pem"), root).unwrap();
    let mut config: PkiCertificateConfig = toml::from_str(&format!(
        "mount = \"{mount}\"\nrole = \"r\"\ncommon_name = \"a.example.test\"\nttl = \"1h\"\n\
         alt_names = [\"*.svc.example.test\"]\n\
         ca_cert = \"{}\"",
        dir.path().join("root.pem").display()
    ))
    .unwrap();
    config.vault = connection(
        &bao,
        dir.path(),
        &format!(
            "path \"{mount}/issue/r\" {{ capabilities = [\"update\"] }}\n\
             path \"{mount}/revoke\" {{ capabilities = [\"update\"] }}\n"
        ),
    );
    let rotator = PkiCertificateRotator::new(config).unwrap();
    let a = rotator.issue(ctx("r1"), None).await.unwrap();
    rotator.verify(ctx("r1"), &a).await.unwrap();
    let b = rotator.issue(ctx("r1"), None).await.unwrap();
    let swapped = Credential {
        secret: b.secret.clone(),
        attrs: a.attrs.clone(),
    };
    let err = rotator.verify(ctx("r1"), &swapped).await.unwrap_err();
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(
        err.message.contains("does not belong to the certificate"),
        "{err}"
    );
    assert!(!err.message.contains("PRIVATE KEY"), "{err}");

    rotator.revoke(ctx("r2"), &a.attrs).await.unwrap();
    rotator.revoke(ctx("r2"), &a.attrs).await.unwrap();
    let read = bao.bao_json(&[
        "read",
        &format!("{mount}/cert/{}", a.attrs["serial_number"]),
    ]);
    assert!(read["data"]["revocation_time"].as_i64().unwrap() > 0);
    // An abandon naming the current certificate leaves it alone.
    rotator
        .abandon(ctx("r3"), Some(&b.attrs), Some(&b))
        .await
        .unwrap();
    let read = bao.bao_json(&[
        "read",
        &format!("{mount}/cert/{}", b.attrs["serial_number"]),
    ]);
    assert_eq!(read["data"]["revocation_time"].as_i64(), Some(0));
    // An expired old certificate is not revoked (nothing to call).
    let mut expired: Attrs = b.attrs.clone();
    expired.insert("not_after".into(), "2000-01-01T00:00:00Z".into());
    rotator.revoke(ctx("r4"), &expired).await.unwrap();
    let read = bao.bao_json(&[
        "read",
        &format!("{mount}/cert/{}", b.attrs["serial_number"]),
    ]);
    assert_eq!(read["data"]["revocation_time"].as_i64(), Some(0));
}
