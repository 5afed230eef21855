//! TLS to Vault: an OpenBao server of the test's own with a listener that requires a client
//! certificate, signed by a CA the test makes with openssl. The right CA and client identity
//! work; a wrong CA, a missing client certificate or a key others may read fail.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyrotd_plugin::reference::SecretRef;
use keyrotd_plugin::{ErrorClass, ProviderError};
use keyrotd_providers::vault::{VaultAuth, VaultConnection, VaultSession};
use keyrotd_test_support::{backend_env, free_port};

use super::vault_auth::timeouts;

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA `NAME.crt`/`NAME.key` and, signed by it, `LEAF.crt`/`LEAF.key` for `usage`.
fn certificates(dir: &Path) {
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    sh(
        dir,
        &format!(
            "openssl req -x509 {ec} -days 2 -subj '/CN=keyrotd test CA' -keyout ca.key -out ca.crt
             openssl req -x509 {ec} -days 2 -subj '/CN=keyrotd test CA' -keyout other.key -out other.crt
             openssl req {ec} -subj /CN=127.0.0.1 -keyout server.key -out server.csr
             printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > server.ext
             openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext -out server.crt
             openssl req {ec} -subj /CN=keyrotd -keyout client.key -out client.csr
             printf 'extendedKeyUsage=clientAuth\\n' > client.ext
             openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile client.ext -out client.crt
             chmod 600 client.key server.key"
        ),
    );
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn the_ca_bundle_and_the_client_certificate_are_used_and_a_wrong_ca_fails() {
    let bao = backend_env("KEYROTD_TEST_BAO");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certificates(d);
    let (plain, tls) = (free_port(), free_port());
    std::fs::write(
        d.join("listener.hcl"),
        format!(
            "listener \"tcp\" {{\n  address = \"127.0.0.1:{tls}\"\n  tls_cert_file = \"{0}/server.crt\"\n  \
             tls_key_file = \"{0}/server.key\"\n  tls_require_and_verify_client_cert = true\n  \
             tls_client_ca_file = \"{0}/ca.crt\"\n}}\n",
            d.display()
        ),
    )
    .unwrap();
    let _server = Server(
        Command::new(&bao)
            .args(["server", "-dev", "-dev-root-token-id=root-tls"])
            .arg(format!("-dev-listen-address=127.0.0.1:{plain}"))
            .arg(format!("-config={}", d.join("listener.hcl").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // A token with only the `default` policy (lookup-self), made over the plain listener.
    let deadline = Instant::now() + Duration::from_secs(20);
    let token = loop {
        let out = Command::new(&bao)
            .args(["token", "create", "-policy=default", "-field=token"])
            .env("BAO_ADDR", format!("http://127.0.0.1:{plain}"))
            .env("BAO_TOKEN", "root-tls")
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the OpenBao TLS server did not start"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    std::fs::write(d.join("token"), token.trim()).unwrap();
    let connection = |n: u64, ca: &str, client: bool| VaultConnection {
        address: Some(format!("https://127.0.0.1:{tls}")),
        auth: Some(VaultAuth::Token {
            token: SecretRef::File(d.join("token")),
        }),
        ca_cert: Some(d.join(ca)),
        client_cert: client.then(|| d.join("client.crt")),
        client_key: client.then(|| d.join("client.key")),
        // A distinct session per case.
        request_timeout: Some(Duration::from_secs(5 + n)),
        ..VaultConnection::default()
    };
    let lookup = |c: VaultConnection| async move {
        let session = VaultSession::shared(&c).unwrap();
        session
            .call("lookup-self", timeouts(), |c| async move {
                vaultrs::token::lookup_self(&*c).await
            })
            .await
            .map(drop)
    };
    lookup(connection(0, "ca.crt", true)).await.unwrap();

    let unreachable = |e: ProviderError| {
        assert_eq!(e.class, ErrorClass::Transient, "{e}");
        assert!(e.message.contains("could not reach Vault"), "{e}");
        assert!(!e.message.contains(token.trim()), "{e}");
    };
    unreachable(lookup(connection(1, "other.crt", true)).await.unwrap_err());
    unreachable(lookup(connection(2, "ca.crt", false)).await.unwrap_err());

    use std::os::unix::fs::PermissionsExt;
    let key = d.join("client.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = lookup(connection(3, "ca.crt", true)).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    assert!(e.message.contains("readable by its group or others"), "{e}");
}
