//! `keyrotd policy [ID] [--json]` through the real binary, without any server: the needs of each
//! provider scoped to the configured resources, the account id from the inventory or a wildcard
//! that the output owns up to, and no secret read. (tests/integration/aws_e2e/policy.rs and
//! postgres_e2e/policy.rs prove against real servers that the printed privileges are enough and
//! each one is needed.)

use crate::support;

use std::path::{Path, PathBuf};

use support::*;

const ACCOUNT: &str = "210987654321";

/// An inventory with one credential of each provider; `aws` is the `[aws]` table's body.
fn inventory(dir: &Path, aws: &str) -> PathBuf {
    let out = dir.join("out");
    let text = format!(
        r#"[daemon]
state = "sqlite:state/state.db"

[aws]
region = "eu-west-1"
{aws}

[defaults]
rotate_every = "1d"
max_age = "2d"
grace = "1h"

[[credential]]
id = "iam"
rotator = {{ kind = "aws_iam_access_key", user_name = "ci-deployer" }}
store = {{ kind = "aws_secrets_manager", secret_id = "ci/deployer", field = "SecretAccessKey" }}

[[credential]]
id = "arn"
rotator = {{ kind = "random" }}
store = {{ kind = "aws_secrets_manager", secret_id = "arn:aws-cn:secretsmanager:cn-north-1:111122223333:secret:app/token-AbCdEf" }}

[[credential]]
id = "db"
rotator = {{ kind = "postgres_password", admin_dsn = "aws-sm:arn:aws:secretsmanager:eu-west-1:111122223333:secret:orders/admin#dsn", strategy = "alternating", roles = ["orders_a", "orders_b"] }}
store = {{ kind = "file", path = "{out}/db.json", format = "json" }}

[[credential]]
id = "api"
rotator = {{ kind = "http", auth = "env:KEYROTD_POLICY_TEST_UNSET", issue = {{ method = "POST", url = "https://api.example.com/keys" }}, secret_pointer = "/secret", id_pointer = "/id", verify = {{ method = "GET", url = "https://api.example.com/me" }}, revoke = {{ method = "DELETE", url = "https://api.example.com/keys/{{{{old_id}}}}" }} }}
store = {{ kind = "file", path = "{out}/api", owner = "0" }}

[[credential]]
id = "plain"
rotator = {{ kind = "random" }}
store = {{ kind = "file", path = "{out}/plain" }}
"#,
        out = out.display()
    );
    std::fs::create_dir_all(&out).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(&config, text).unwrap();
    config
}

fn policy_json(config: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["policy"];
    all.extend(args);
    all.push("--json");
    let out = cli(config, &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(all: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    all.as_array()
        .unwrap()
        .iter()
        .find(|c| c["credential"] == id)
        .unwrap_or_else(|| panic!("no {id} in {all}"))
}

fn resources(policy: &serde_json::Value) -> Vec<Vec<String>> {
    policy["aws_policy"]["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert_eq!(s["Effect"], "Allow", "{s}");
            s["Resource"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().to_owned())
                .collect()
        })
        .collect()
}

#[test]
fn aws_policies_name_the_user_and_the_secret_in_the_configured_account() {
    let dir = tempfile::tempdir().unwrap();
    let config = inventory(dir.path(), &format!("account_id = \"{ACCOUNT}\""));
    let all = policy_json(&config, &[]);
    assert_eq!(all.as_array().unwrap().len(), 5, "{all}");
    let iam = find(&all, "iam");
    assert_eq!(iam["aws_policy"]["Version"], "2012-10-17");
    assert_eq!(
        resources(iam),
        [
            vec![
                format!("arn:aws:iam::{ACCOUNT}:user/ci-deployer"),
                format!("arn:aws:iam::{ACCOUNT}:user/*/ci-deployer"),
            ],
            vec![format!(
                "arn:aws:secretsmanager:eu-west-1:{ACCOUNT}:secret:ci/deployer-??????"
            )],
        ]
    );
    let notes = iam["notes"].to_string();
    assert!(!notes.contains("no AWS account id"), "{notes}");
    assert!(notes.contains("kms:Decrypt"), "{notes}");
    // A complete ARN is used as it is, in its own partition; the random rotator needs nothing.
    assert_eq!(
        resources(find(&all, "arn")),
        [vec![
            "arn:aws-cn:secretsmanager:cn-north-1:111122223333:secret:app/token-AbCdEf".to_owned()
        ]]
    );
    // An `aws-sm:` reference needs GetSecretValue on its (partial) ARN.
    let db = find(&all, "db");
    assert_eq!(
        resources(db),
        [vec![
            "arn:aws:secretsmanager:eu-west-1:111122223333:secret:orders/admin-??????".to_owned()
        ]]
    );
    assert_eq!(
        db["aws_policy"]["Statement"][0]["Action"],
        serde_json::json!(["secretsmanager:GetSecretValue"])
    );
    assert!(find(&all, "plain")["aws_policy"].is_null());
}

#[test]
fn without_an_account_id_the_arns_use_a_wildcard_and_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let config = inventory(dir.path(), "");
    let iam = policy_json(&config, &["iam"]);
    assert_eq!(iam.as_array().unwrap().len(), 1, "{iam}");
    assert_eq!(
        resources(&iam[0])[0],
        [
            "arn:aws:iam::*:user/ci-deployer",
            "arn:aws:iam::*:user/*/ci-deployer"
        ]
    );
    let out = cli(&config, &["policy", "iam"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("no AWS account id is configured, so the ARNs match any account (`*`)"),
        "{text}"
    );
    // The document in the text output is the same valid JSON.
    let start = text.find('{').unwrap();
    let end = text.find("\n}\n").unwrap() + 2;
    let document: serde_json::Value = serde_json::from_str(&text[start..end]).unwrap();
    assert_eq!(document, iam[0]["aws_policy"]);
    assert!(
        text.contains("iam:UpdateAccessKey: rotator revoke"),
        "{text}"
    );
}

#[test]
fn postgres_http_and_file_needs_are_sql_and_words() {
    let dir = tempfile::tempdir().unwrap();
    let config = inventory(dir.path(), "");
    let all = policy_json(&config, &[]);
    let db = find(&all, "db");
    let sql: Vec<&str> = db["sql"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["statement"].as_str().unwrap())
        .collect();
    assert_eq!(
        sql,
        [
            r#"ALTER ROLE :"admin_role" WITH LOGIN CREATEROLE;"#,
            r#"GRANT "orders_a" TO :"admin_role" WITH ADMIN OPTION, INHERIT FALSE, SET FALSE;"#,
            r#"GRANT "orders_b" TO :"admin_role" WITH ADMIN OPTION, INHERIT FALSE, SET FALSE;"#,
        ]
    );
    let out_dir = dir.path().join("out");
    let needs = db["requirements"].to_string();
    assert!(
        needs.contains(&format!("the directory {}", out_dir.display())),
        "{needs}"
    );
    let api = find(&all, "api");
    let needs = api["requirements"].to_string();
    for part in [
        "POST https://api.example.com/keys",
        "DELETE https://api.example.com/keys/{{old_id}}",
        "CAP_CHOWN",
    ] {
        assert!(needs.contains(part), "`{part}` not in {needs}");
    }
    // `auth` names an unset variable: policy reads no secret, so it does not care.
    assert!(api["aws_policy"].is_null());

    let out = cli(&config, &["policy", "plain"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("## Also needed"), "{text}");
    assert!(!text.contains("AWS IAM policy"), "{text}");
}

#[test]
fn an_unknown_credential_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = inventory(dir.path(), "");
    let out = cli(&config, &["policy", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no credential `nope`"));
    let bad = inventory(dir.path(), "account_id = \"12345\"");
    let out = cli(&bad, &["policy"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("account_id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
