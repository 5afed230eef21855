//! `vault_approle_secret_id`: a rotation whose new secret-id logs in and whose old one is
//! destroyed; an orphan left by a kill -9 right after issue is destroyed when the rotation
//! resumes; a policy without a needed capability is a permanent error naming the path.

use std::process::Command;

use serde_json::Value;

use super::{error_line, stderr, Setup};
use crate::support::openbao::unique;
use crate::support::*;

const ID: &str = "app";

struct AppRole {
    s: Setup,
    mount: String,
}

impl AppRole {
    fn new() -> Self {
        let mount = unique("approle");
        let credential = format!(
            "store = {{ kind = \"file\", path = \"{{dir}}/out/secret.json\", format = \"json\" }}\n\
             rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"\n\n\
             [credential.rotator]\nkind = \"vault_approle_secret_id\"\nmount = \"{mount}\"\n\
             role_name = \"web\"\nttl = \"2h\"\nmetadata = {{ team = \"payments\" }}\n\
             cidr_list = [\"127.0.0.0/8\"]\ntimeout = \"20s\"\n"
        );
        let bao = crate::support::openbao::OpenBao::shared();
        bao.bao(&["auth", "enable", &format!("-path={mount}"), "approle"]);
        bao.bao(&[
            "write",
            &format!("auth/{mount}/role/web"),
            "token_ttl=5m",
            "token_policies=default",
        ]);
        let s = Setup::new(ID, &credential);
        Self { s, mount }
    }

    /// The store's (role-id, secret-id, accessor).
    fn current(&self) -> (String, String, String) {
        let text = std::fs::read_to_string(self.s.path("out/secret.json")).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let field = |name: &str| {
            v[name]
                .as_str()
                .unwrap_or_else(|| panic!("{name} in {v}"))
                .to_owned()
        };
        (
            field("role_id"),
            field("secret_id"),
            field("secret_id_accessor"),
        )
    }

    /// Whether a login with the role-id and `secret_id` works (as a consumer would log in).
    fn logs_in(&self, role_id: &str, secret_id: &str) -> bool {
        Command::new(self.s.bao.bin())
            .args([
                "write",
                "-field=token",
                &format!("auth/{}/login", self.mount),
                &format!("role_id={role_id}"),
                &format!("secret_id={secret_id}"),
            ])
            .env("BAO_ADDR", &self.s.bao.addr)
            .env_remove("BAO_TOKEN")
            .env_remove("VAULT_TOKEN")
            .output()
            .unwrap()
            .status
            .success()
    }

    /// The accessors of the role's secret-ids (LIST answers 404 when there are none).
    fn accessors(&self) -> Vec<String> {
        let out = Command::new(self.s.bao.bin())
            .args([
                "list",
                "-format=json",
                &format!("auth/{}/role/web/secret-id", self.mount),
            ])
            .env("BAO_ADDR", &self.s.bao.addr)
            .env("BAO_TOKEN", self.s.bao.root_token())
            .output()
            .unwrap();
        let mut keys: Vec<String> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        keys.sort();
        keys
    }

    fn metadata(&self, accessor: &str) -> Value {
        self.s.bao.bao_json(&[
            "write",
            &format!("auth/{}/role/web/secret-id-accessor/lookup", self.mount),
            &format!("secret_id_accessor={accessor}"),
        ])["data"]["metadata"]
            .clone()
    }
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn a_rotation_issues_a_working_secret_id_and_destroys_the_old_one() {
    let a = AppRole::new();
    let hcl = a.s.policy_hcl();
    for path in [
        "role-id",
        "secret-id",
        "secret-id-accessor/lookup",
        "secret-id-accessor/destroy",
    ] {
        assert!(
            hcl.contains(&format!("path \"auth/{}/role/web/{path}\"", a.mount)),
            "{path} in:\n{hcl}"
        );
    }
    let first = a.s.rotate();
    assert!(first.status.success(), "{}", stderr(&first));
    let (role_id, secret1, accessor1) = a.current();
    assert!(a.logs_in(&role_id, &secret1), "the new secret-id logs in");
    assert_eq!(
        a.accessors(),
        std::slice::from_ref(&accessor1),
        "verify's test login used no second secret-id"
    );
    let meta = a.metadata(&accessor1);
    assert_eq!(meta["team"], "payments", "{meta}");
    assert_eq!(meta["keyrotd_credential"], ID, "{meta}");
    assert!(
        meta["keyrotd_rotation"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{meta}"
    );

    let second = a.s.rotate();
    assert!(second.status.success(), "{}", stderr(&second));
    let (role_id2, secret2, accessor2) = a.current();
    assert_eq!(role_id2, role_id);
    assert_ne!(secret2, secret1);
    assert!(a.logs_in(&role_id, &secret2));
    assert!(
        !a.logs_in(&role_id, &secret1),
        "the old secret-id is destroyed (grace 0s)"
    );
    assert_eq!(a.accessors(), [accessor2]);
    assert_eq!(a.s.status()["state"], "idle");
    assert_eq!(
        a.s.history().matches("  app  done").count(),
        2,
        "{}",
        a.s.history()
    );
    // The daemon's log and /metrics too.
    let daemon = Daemon::start(&a.s.config(), a.s.port, &a.s.path("daemon.log"), &[]);
    let metrics = http_get(a.s.port, "/metrics").unwrap().1;
    assert!(metrics.contains("vault_approle_secret_id"), "{metrics}");
    drop(daemon);
    a.s.assert_no_leak(
        &[secret1, secret2],
        &[a.s.path("out")],
        &[stderr(&first), stderr(&second), metrics],
    );
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn an_orphan_left_by_a_crash_after_issue_is_destroyed_when_the_rotation_resumes() {
    let a = AppRole::new();
    let first = a.s.rotate();
    assert!(first.status.success(), "{}", stderr(&first));
    let (role_id, secret1, accessor1) = a.current();

    // kill -9 after Vault generated a secret-id and before the journal knows it.
    let log = a.s.path("crash.log");
    crash_at(&a.s.config(), ID, "issue:done", &[], &log);
    let listed = a.accessors();
    assert_eq!(listed.len(), 2, "the orphan exists: {listed:?}");
    let orphan = listed.iter().find(|a| **a != accessor1).unwrap().clone();
    assert_eq!(
        a.current().2,
        accessor1,
        "the store still holds the first secret-id"
    );

    // The daemon, started again, resumes the rotation: the orphan goes, a new secret-id comes.
    let daemon = Daemon::start(&a.s.config(), a.s.port, &a.s.path("daemon.log"), &[]);
    let done = wait_until(std::time::Duration::from_secs(30), || {
        a.s.history().matches("  app  done").count() == 2
    });
    let log_text = daemon.log_text();
    drop(daemon);
    assert!(
        done,
        "the rotation completed after the restart:\n{log_text}"
    );
    assert!(log_text.contains("orphaned secret-id"), "{log_text}");
    let (_, secret2, accessor2) = a.current();
    assert_ne!(accessor2, orphan);
    assert_eq!(
        a.accessors(),
        [accessor2],
        "the orphan and the replaced secret-id are destroyed, the new one kept"
    );
    assert!(a.logs_in(&role_id, &secret2));
    assert!(!a.logs_in(&role_id, &secret1));
    let crash_log = std::fs::read_to_string(&log).unwrap();
    a.s.assert_no_leak(
        &[secret1, secret2],
        &[a.s.path("out")],
        &[stderr(&first), log_text, crash_log],
    );
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn a_missing_capability_is_a_permanent_error_naming_credential_step_and_path() {
    let mut a = AppRole::new();
    let full = a.s.policy_hcl();
    // The printed policy without the secret-id rule: issue cannot generate.
    let secret_id = format!("path \"auth/{}/role/web/secret-id\"", a.mount);
    let narrowed: String = full
        .split("\n}\n")
        .filter(|rule| !rule.trim().is_empty() && !rule.contains(&secret_id))
        .map(|rule| format!("{rule}\n}}\n"))
        .collect();
    assert!(
        !narrowed.contains(&secret_id) && narrowed.contains("role-id"),
        "{narrowed}"
    );
    a.s.set_policy(&narrowed);
    let out = a.s.rotate();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let line = error_line(&out);
    eprintln!("missing capability as reported: {line}");
    for want in [
        "credential `app`",
        "step issue failed",
        &format!("update on auth/{}/role/web/secret-id", a.mount),
        "permission denied",
    ] {
        assert!(line.contains(want), "want `{want}` in: {line}");
    }
    // Permanent: the engine confirms it with one retry, then stops automation.
    assert_eq!(a.s.status()["state"], "retrying");
    let again = a.s.rotate();
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    let status = a.s.status();
    assert_eq!(status["state"], "failed", "permanent: {status}");
    assert!(a.accessors().is_empty(), "nothing was generated");
}
