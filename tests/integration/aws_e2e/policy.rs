//! `keyrotd policy` against moto with IAM enforced: the printed policy, attached to a fresh admin
//! user, is enough for a full IAM access key rotation stored in Secrets Manager, and without any
//! one of its actions the rotation fails with AccessDenied at the step that needs that action.
//!
//! moto checks actions but not resources: it evaluates every IAM and Secrets Manager call
//! against the resource `*`, so a statement scoped to an ARN never matches there. The admin
//! therefore gets the printed actions on `Resource: "*"`, and the printed ARNs are checked
//! separately: moto's policy validator accepts the exact document, and each ARN pattern matches
//! the user's and the secret's real ARNs and not their neighbours'.

use super::*;

/// moto's account.
const ACCOUNT: &str = "123456789012";

/// The step that fails when the admin lacks each action: its first use in a rotation that
/// starts from a current value and has no grace period (the store's reads run in `issue`).
const IAM_STEPS: [(&str, &str); 4] = [
    ("iam:ListAccessKeys", "issue"),
    ("iam:CreateAccessKey", "issue"),
    ("iam:UpdateAccessKey", "revoke"),
    ("iam:DeleteAccessKey", "revoke"),
];

/// As [`IAM_STEPS`], for the Secrets Manager store.
const SECRETS_MANAGER_STEPS: [(&str, &str); 4] = [
    ("secretsmanager:DescribeSecret", "issue"),
    ("secretsmanager:GetSecretValue", "issue"),
    ("secretsmanager:PutSecretValue", "stage"),
    ("secretsmanager:UpdateSecretVersionStage", "promote"),
];

fn policy_fixture(tag: &str) -> Fixture {
    Fixture::new(
        tag,
        &format!("grace = \"0s\"\n\n[aws]\naccount_id = \"{ACCOUNT}\"\n"),
    )
}

/// IAM's ARN wildcards: `*` any run of characters, `?` exactly one.
fn arn_matches(pattern: &str, arn: &str) -> bool {
    match pattern.chars().next() {
        None => arn.is_empty(),
        Some('*') => (0..=arn.len())
            .filter(|&i| arn.is_char_boundary(i))
            .any(|i| arn_matches(&pattern[1..], &arn[i..])),
        Some(p) => arn.chars().next().is_some_and(|a| {
            (p == '?' || p == a) && arn_matches(&pattern[p.len_utf8()..], &arn[a.len_utf8()..])
        }),
    }
}

impl Fixture {
    /// `keyrotd policy iam --json`, run with no AWS credentials at all: it calls nothing.
    fn printed(&self) -> serde_json::Value {
        let out = keyrotd()
            .arg("--config")
            .arg(self.config())
            .args(["policy", "iam", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "policy: {}", text(&out.stderr));
        let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");
        all[0].clone()
    }

    /// Makes an IAM user allowed exactly `document`, and returns its key.
    fn admin_with(&self, tag: &str, document: &serde_json::Value) -> Key {
        let admin = format!("{}-{tag}", self.user);
        self.aws.create_user(&admin);
        self.aws
            .rt
            .block_on(
                self.aws
                    .iam()
                    .put_user_policy()
                    .user_name(&admin)
                    .policy_name("keyrotd")
                    .policy_document(document.to_string())
                    .send(),
            )
            .unwrap_or_else(|e| panic!("moto refused the policy {document}: {e:?}"));
        self.aws.create_key(&admin)
    }

    /// `keyrotd rotate iam` as the admin `key`.
    fn rotate_as(&self, key: &Key) -> Output {
        let out = keyrotd()
            .arg("--config")
            .arg(self.config())
            .args(["rotate", "iam"])
            .env("AWS_ACCESS_KEY_ID", &key.id)
            .env("AWS_SECRET_ACCESS_KEY", &key.secret)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap();
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        std::fs::write(self.dir.path().join(format!("cli-{n}.log")), &out.stderr).unwrap();
        out
    }

    /// The journal's failed steps of the last rotation, with their details.
    fn failed_steps(&self) -> Vec<(String, String)> {
        self.history()
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                let (_at, step, event) = (words.next()?, words.next()?, words.next()?);
                (event == "error").then(|| (step.to_owned(), words.collect::<Vec<_>>().join(" ")))
            })
            .collect()
    }
}

/// The printed policy with `without` left out and every resource `*` (see the module doc).
fn on_any_resource(policy: &serde_json::Value, without: Option<&str>) -> serde_json::Value {
    let statements: Vec<serde_json::Value> = policy["aws_policy"]["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| {
            let actions: Vec<&serde_json::Value> = s["Action"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| Some(a.as_str().unwrap()) != without)
                .collect();
            (!actions.is_empty()).then(|| {
                serde_json::json!({"Sid": s["Sid"], "Effect": "Allow", "Action": actions, "Resource": "*"})
            })
        })
        .collect();
    serde_json::json!({"Version": "2012-10-17", "Statement": statements})
}

/// The printed actions, in order.
fn actions(policy: &serde_json::Value) -> Vec<String> {
    policy["aws_policy"]["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["Action"].as_array().unwrap().iter())
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn arn_wildcards_follow_iam() {
    assert!(arn_matches("a:*:user/x", "a:123:user/x"));
    assert!(arn_matches("a:*:user/*/x", "a:1:user/p/q/x"));
    assert!(!arn_matches("a:*:user/*/x", "a:1:user/x"));
    assert!(arn_matches("s:n-??????", "s:n-AbCdEf"));
    assert!(!arn_matches("s:n-??????", "s:n-x-AbCdEf"));
    assert!(!arn_matches("s:n-??????", "s:n-AbCdE"));
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn the_printed_policy_is_enough_for_a_full_rotation_and_names_exactly_the_resources() {
    let fx = policy_fixture("policy-full");
    let printed = fx.printed();
    let mut expected: Vec<&str> = IAM_STEPS.iter().map(|(a, _)| *a).collect();
    expected.extend(SECRETS_MANAGER_STEPS.iter().map(|(a, _)| *a));
    let mut got = actions(&printed);
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "{printed}");

    // The ARNs: the user's and the secret's real ones match, their neighbours' do not.
    let user_arn = fx
        .aws
        .rt
        .block_on(fx.aws.iam().get_user().user_name(&fx.user).send())
        .unwrap()
        .user()
        .unwrap()
        .arn()
        .to_owned();
    let secret_arn = fx
        .aws
        .rt
        .block_on(
            fx.aws
                .sm()
                .describe_secret()
                .secret_id(&fx.secret_id)
                .send(),
        )
        .unwrap()
        .arn()
        .unwrap()
        .to_owned();
    let statements = printed["aws_policy"]["Statement"].as_array().unwrap();
    let resources = |sid: &str| -> Vec<String> {
        let s = statements.iter().find(|s| s["Sid"] == sid).unwrap();
        s["Resource"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect()
    };
    let matched = |patterns: &[String], arn: &str| patterns.iter().any(|p| arn_matches(p, arn));
    let iam = resources("KeyrotdIamAccessKeys");
    assert!(matched(&iam, &user_arn), "{iam:?} vs {user_arn}");
    assert!(
        matched(&iam, &user_arn.replace(":user/", ":user/ci/")),
        "{iam:?}"
    );
    for other in [
        format!("{user_arn}2"),
        user_arn.replace(ACCOUNT, "210987654321"),
    ] {
        assert!(!matched(&iam, &other), "{iam:?} matches {other}");
    }
    let sm = resources("KeyrotdSecretsManagerStore");
    assert!(matched(&sm, &secret_arn), "{sm:?} vs {secret_arn}");
    let (name_part, suffix) = secret_arn.rsplit_once('-').unwrap();
    for other in [
        format!("{name_part}2-{suffix}"),
        format!("{name_part}-x-{suffix}"),
        secret_arn.replace("us-east-1", "eu-west-1"),
    ] {
        assert!(!matched(&sm, &other), "{sm:?} matches {other}");
    }

    // moto's validator accepts the exact document (it grants nothing there: see the module doc).
    fx.admin_with("syntax", &printed["aws_policy"]);

    let admin = fx.admin_with("admin", &on_any_resource(&printed, None));
    let out = fx.rotate_as(&admin);
    assert!(out.status.success(), "rotate: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("complete"),
        "{}",
        text(&out.stdout)
    );
    let k1 = fx.current();
    assert_ne!(k1, fx.k0);
    assert_eq!(fx.keys(), BTreeSet::from([k1.id.clone()]), "K0 revoked");
    fx.assert_works(&k1, "the new key");
    assert!(fx.failed_steps().is_empty(), "{}", fx.history());
    fx.assert_no_secret_leaked(&[&k1, &admin]);
}

/// For each action: a fresh user, secret and admin allowed every printed action but that one;
/// the rotation fails at `step` with AccessDenied.
fn each_action_is_needed(steps: &[(&str, &str)]) {
    for (action, step) in steps {
        let tag = action.split(':').nth(1).unwrap().to_lowercase();
        let fx = policy_fixture(&format!("p-{}", &tag[..tag.len().min(12)]));
        let printed = fx.printed();
        assert!(actions(&printed).iter().any(|a| a == action), "{printed}");
        let used_by = printed["aws_actions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["action"] == *action)
            .unwrap();
        let admin = fx.admin_with("admin", &on_any_resource(&printed, Some(action)));
        let out = fx.rotate_as(&admin);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{action}: {}",
            text(&out.stderr)
        );
        let failed = fx.failed_steps();
        let (first, detail) = failed
            .first()
            .unwrap_or_else(|| panic!("{action}: no failed step\n{}", fx.history()));
        assert_eq!(first, step, "{action}: {}", fx.history());
        assert!(
            detail.contains("AccessDenied"),
            "{action}: {detail}\n{}",
            fx.history()
        );
        // The printed policy says which calls need the action; the step that failed makes one.
        let plugin_methods: &[&str] = match *step {
            "issue" => &["issue", "current"],
            "stage" => &["stage"],
            "promote" => &["promote"],
            "revoke" => &["revoke"],
            other => panic!("unexpected step {other}"),
        };
        assert!(
            used_by["used_by"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| plugin_methods.contains(&m.as_str().unwrap())),
            "{action}: {used_by}"
        );
        fx.assert_no_secret_leaked(&[&admin]);
    }
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn without_any_one_iam_action_the_rotation_fails_at_the_step_that_needs_it() {
    each_action_is_needed(&IAM_STEPS);
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn without_any_one_secrets_manager_action_the_rotation_fails_at_the_step_that_needs_it() {
    each_action_is_needed(&SECRETS_MANAGER_STEPS);
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn a_revoke_of_a_key_already_gone_needs_no_action_beyond_the_printed_ones() {
    // Revoking a key deleted out of band answers NoSuchEntity; telling that from a deleted user
    // must not need an action the policy lacks (it once asked `GetUser`).
    let fx = Fixture::new(
        "policy-gone",
        &format!("grace = \"2s\"\n\n[aws]\naccount_id = \"{ACCOUNT}\"\n"),
    );
    let admin = fx.admin_with("admin", &on_any_resource(&fx.printed(), None));
    let out = fx.rotate_as(&admin);
    assert!(out.status.success(), "rotate: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("promoted"),
        "{}",
        text(&out.stdout)
    );
    fx.aws.delete_key(&fx.user, &fx.k0.id);
    // `revoke_at` is whole seconds, rounded up: 2 s of grace end at most 3 s after promotion.
    std::thread::sleep(Duration::from_millis(3200));
    // After the grace period a manual rotation first finishes the revoke, then rotates again.
    let out = fx.rotate_as(&admin);
    assert!(out.status.success(), "rotate: {}", text(&out.stderr));
    assert!(fx.failed_steps().is_empty(), "{}", fx.history());
    assert_eq!(
        fx.history().matches("  iam  done").count(),
        1,
        "{}",
        fx.history()
    );
    assert_eq!(fx.keys().len(), 2, "the two rotations' keys");
}
