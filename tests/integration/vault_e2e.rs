//! `vault:` references and the `[vault]` login through the real binary, against the OpenBao
//! dev server (tests/backends/50-openbao.sh) and the test's own key API: the `http` rotator's
//! admin token is `vault:secret/PATH#token`, read through an AppRole login. `check` reads the
//! reference and reports one it cannot read; the cache saves Vault requests (counted with a
//! use-limited token); `[vault]` mistakes are reported at their line; nothing secret (the
//! role-id, the secret-id, the JWT, any Vault token, the referenced admin token) reaches the
//! output or the state.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Output;

use keyrotd_test_support::openbao::{unique, JwtKey, OpenBao};
use support::key_api::{KeyApi, ADMIN_TOKEN};
use support::*;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes an inventory: `vault` is the `[vault]` table's body, `auth` the rotator's reference.
fn inventory(dir: &Path, api: &KeyApi, vault: &str, auth: &str) -> PathBuf {
    let base = format!("http://127.0.0.1:{}", api.port());
    let text = format!(
        r#"[daemon]
state = "sqlite:state/keyrotd.db"

[vault]
{vault}

[[credential]]
id = "billing"
store = {{ kind = "file", path = "{out}", format = "json" }}
rotate_every = "1h"
max_age = "2h"
grace = "0s"

[credential.rotator]
kind = "http"
auth = "{auth}"
secret_pointer = "/key/secret"
id_pointer = "/key/id"
timeout = "5s"

[credential.rotator.issue]
method = "POST"
url = "{base}/v1/keys"
body = {{ name = "keyrotd-billing" }}

[credential.rotator.verify]
url = "{base}/v1/whoami"
expect_status = 200

[credential.rotator.revoke]
method = "DELETE"
url = "{base}/v1/keys/{{{{old_id}}}}"
"#,
        out = dir.join("out/key.json").display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Whether `text` holds something shaped like an OpenBao service token (`s.` + 24 characters).
fn holds_a_token(text: &str) -> bool {
    text.match_indices("s.").any(|(at, _)| {
        let rest = &text[at + 2..];
        rest.len() >= 24 && rest[..24].chars().all(|c| c.is_ascii_alphanumeric())
    })
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn a_vault_reference_logs_in_with_approle_is_checked_and_leaks_nothing() {
    let bao = OpenBao::shared();
    let api = KeyApi::start();
    let dir = tempfile::tempdir().unwrap();
    let (path, policy) = admin_token_in_vault(&bao, "e2e");
    let mount = unique("approle");
    bao.bao(&["auth", "enable", &format!("-path={mount}"), "approle"]);
    let role = format!("auth/{mount}/role/keyrotd");
    bao.bao(&[
        "write",
        &role,
        &format!("token_policies={policy}"),
        "token_ttl=1h",
    ]);
    let role_id = bao.bao(&["read", "-field=role_id", &format!("{role}/role-id")]);
    let secret_id = bao.bao(&[
        "write",
        "-f",
        "-field=secret_id",
        &format!("{role}/secret-id"),
    ]);
    std::fs::write(dir.path().join("role-id"), role_id.trim()).unwrap();
    std::fs::write(dir.path().join("secret-id"), secret_id.trim()).unwrap();
    let vault = format!(
        "address = \"{}\"\nauth = {{ method = \"approle\", mount = \"{mount}\", role_id = \"file:{}\", secret_id = \"file:{}\" }}",
        bao.addr,
        dir.path().join("role-id").display(),
        dir.path().join("secret-id").display(),
    );
    let reference = format!("vault:secret/{path}#token");
    let config = inventory(dir.path(), &api, &vault, &reference);
    let mut outputs = Vec::new();

    let check = cli(&config, &["check"]);
    assert!(check.status.success(), "{}", stderr(&check));
    // `keyrotd policy` names what reading the reference needs.
    let policy_out = String::from_utf8(cli(&config, &["policy"]).stdout).unwrap();
    assert!(
        policy_out.contains(&format!("path \"secret/data/{path}\" {{"))
            && policy_out.contains("capabilities = [\"read\"]"),
        "{policy_out}"
    );
    for _ in 0..2 {
        let out = cli(&config, &["rotate", "billing"]);
        assert!(out.status.success(), "{}", stderr(&out));
        outputs.push(out);
    }
    assert!(
        api.revoked("k1"),
        "the revoke used the admin token read from Vault"
    );

    // The value in Vault is what the rotator uses: a wrong one there fails the rotation.
    bao.bao(&[
        "kv",
        "put",
        &format!("secret/{path}"),
        "token=not-the-admin-token",
    ]);
    let out = cli(&config, &["rotate", "billing"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    outputs.push(out);
    bao.bao(&[
        "kv",
        "put",
        &format!("secret/{path}"),
        &format!("token={ADMIN_TOKEN}"),
    ]);

    // `check` reads the reference: one outside the policy is reported at its field.
    let denied = inventory(dir.path(), &api, &vault, "vault:secret/elsewhere#token");
    let out = cli(&denied, &["check"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("credential[billing].rotator.auth")
            && err.contains("vault:secret/elsewhere#token")
            && err.contains("permission denied"),
        "{err}"
    );
    outputs.push(out);
    outputs.push(check);

    assert_no_leak(
        dir.path(),
        &outputs,
        &[role_id.trim(), secret_id.trim(), ADMIN_TOKEN],
    );
}

/// No secret, nor anything shaped like a Vault token, in the outputs or the files of `dir` but
/// the store's and the auth references' own files.
fn assert_no_leak(dir: &Path, outputs: &[Output], secrets: &[&str]) {
    let except: Vec<PathBuf> = ["out", "role-id", "secret-id", "jwt"]
        .iter()
        .map(|f| dir.join(f))
        .collect();
    let mut everything = all_bytes(dir, &except);
    for out in outputs {
        everything.extend(&out.stdout);
        everything.extend(&out.stderr);
    }
    for secret in secrets {
        assert!(!contains(&everything, secret), "a secret leaked");
    }
    assert!(
        !holds_a_token(&String::from_utf8_lossy(&everything)),
        "a Vault token leaked"
    );
}

/// A `secret/PATH` holding the key API's admin token as `token`, and a policy that may read it.
fn admin_token_in_vault(bao: &OpenBao, prefix: &str) -> (String, String) {
    let path = unique(prefix);
    bao.bao(&[
        "kv",
        "put",
        &format!("secret/{path}"),
        &format!("token={ADMIN_TOKEN}"),
    ]);
    let policy = unique(&format!("{prefix}-read"));
    let hcl = format!("path \"secret/data/{path}\" {{ capabilities = [\"read\"] }}\n");
    bao.bao_stdin(&["policy", "write", &policy, "-"], &hcl);
    (path, policy)
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn jwt_login_reads_the_reference_and_leaks_neither_jwt_nor_token() {
    let bao = OpenBao::shared();
    let api = KeyApi::start();
    let dir = tempfile::tempdir().unwrap();
    let (path, policy) = admin_token_in_vault(&bao, "jwt-e2e");
    let key = JwtKey::new(dir.path());
    let (mount, role) = bao.jwt_role(&key, &policy);
    let jwt = key.sign("system:serviceaccount:ops:keyrotd", "keyrotd");
    std::fs::write(dir.path().join("jwt"), &jwt).unwrap();
    let vault = format!(
        "address = \"{}\"\nauth = {{ method = \"jwt\", mount = \"{mount}\", role = \"{role}\", jwt = \"file:{}\" }}",
        bao.addr,
        dir.path().join("jwt").display(),
    );
    let config = inventory(
        dir.path(),
        &api,
        &vault,
        &format!("vault:secret/{path}#token"),
    );
    let out = cli(&config, &["rotate", "billing"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_no_leak(dir.path(), &[out], &[&jwt, ADMIN_TOKEN]);
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn the_reference_cache_saves_vault_requests_within_one_run() {
    let bao = OpenBao::shared();
    let api = KeyApi::start();
    let (path, policy) = admin_token_in_vault(&bao, "cache");
    // Vault requests made with a token = the uses it lost (`default` allows its lookup-self).
    let used = |cache: &str| {
        let dir = tempfile::tempdir().unwrap();
        let answer = bao.bao_json(&[
            "token",
            "create",
            &format!("-policy={policy}"),
            "-use-limit=50",
            "-ttl=1h",
        ]);
        let token = answer["auth"]["client_token"].as_str().unwrap().to_owned();
        let accessor = answer["auth"]["accessor"].as_str().unwrap().to_owned();
        std::fs::write(dir.path().join("token"), &token).unwrap();
        let vault = format!(
            "address = \"{}\"\nreference_cache = \"{cache}\"\nauth = {{ method = \"token\", token = \"file:{}\" }}",
            bao.addr,
            dir.path().join("token").display()
        );
        let config = inventory(
            dir.path(),
            &api,
            &vault,
            &format!("vault:secret/{path}#token"),
        );
        // The second rotation reads the admin token twice: to issue, and to revoke the first key.
        for _ in 0..2 {
            let before = bao.bao_json(&["token", "lookup", "-accessor", &accessor])["data"]
                ["num_uses"]
                .as_u64()
                .unwrap();
            let out = cli(&config, &["rotate", "billing"]);
            assert!(out.status.success(), "{}", stderr(&out));
            let after = bao.bao_json(&["token", "lookup", "-accessor", &accessor])["data"]
                ["num_uses"]
                .as_u64()
                .unwrap();
            if before == 50 {
                continue;
            }
            return before - after;
        }
        unreachable!()
    };
    let uncached = used("0s");
    let cached = used("30s");
    // Cached: the login's lookup-self and one read. Uncached: one read per use of the token.
    assert_eq!(cached, 2, "uncached {uncached}");
    assert!(uncached > cached, "uncached {uncached}, cached {cached}");
}

#[test]
fn a_vault_table_mistake_is_reported_at_its_line_even_unused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[daemon]\nstate = \"sqlite:state/keyrotd.db\"\n\n[vault]\naddress = \"https://vault.example:8200\"\n\
         auth = { method = \"jwt\", role = \"a/b\", jwt = \"file:/var/run/secrets/token\" }\n\n\
         [[credential]]\nid = \"x\"\nrotator = { kind = \"random\" }\nstore = { kind = \"file\", path = \"/tmp/keyrotd-unused/x\" }\n\
         rotate_every = \"1h\"\nmax_age = \"2h\"\n",
    )
    .unwrap();
    let out = cli(&config, &["check"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}:6:", config.display())) && err.contains("vault.auth.role"),
        "{err}"
    );
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("https://vault.example:8200", "http://vault.example:8200")
            .replace("a/b", "keyrotd"),
    )
    .unwrap();
    let err = stderr(&cli(&config, &["check"]));
    assert!(
        err.contains(&format!("{}:5:", config.display()))
            && err.contains("vault.address")
            && err.contains("must use https"),
        "{err}"
    );
}
