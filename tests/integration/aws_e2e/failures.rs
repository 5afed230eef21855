//! IAM rotations that fail (a key deleted out of band, an unknown user, a missing secret, a bad
//! ARN, denied calls): the error names the step and AWS's code, and nothing changes.

use super::*;

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn verify_failure_after_out_of_band_delete_rolls_back_and_keeps_the_current_key() {
    let fx = Fixture::new("verify", "grace = \"0s\"");
    let mut crashed = fx.rotate_until("verify:start");
    crashed.kill().unwrap();
    crashed.wait().unwrap();
    let pending = fx.aws.labelled(&fx.secret_id, PENDING).expect("staged");
    let new = fx.aws.key_in(&fx.secret_id, None, Some(&pending));
    // The new key is the user's key that AWSCURRENT does not hold.
    let keys = fx.keys();
    assert_eq!(keys, BTreeSet::from([fx.k0.id.clone(), new.id.clone()]));
    fx.aws.delete_key(&fx.user, &new.id);

    let mut daemon = fx.start();
    let retrying = wait_until(Duration::from_secs(30), || {
        fx.status()["state"] == "retrying"
    });
    assert!(retrying, "{}\n{}", fx.status(), daemon.log_text());
    let status = fx.status();
    assert_eq!(status["consecutive_failures"], 1, "{status}");
    assert_eq!(daemon.terminate(Duration::from_secs(10)).code(), Some(0));

    // Rolled back: AWSPENDING removed, AWSCURRENT is still K0's version, and K0 works.
    let labels = fx.labels();
    assert_eq!(
        labels,
        BTreeMap::from([(fx.k0_version.clone(), set(&[CURRENT]))]),
        "{labels:?}"
    );
    assert_eq!(fx.current(), fx.k0);
    assert_eq!(fx.keys(), BTreeSet::from([fx.k0.id.clone()]));
    fx.assert_works(&fx.k0, "K0 after the rollback");
    fx.assert_refused(&new, "the deleted key");

    let history = fx.history();
    assert!(
        history.contains(&format!("{pending}  iam  rolled_back")),
        "{history}"
    );
    let error = history
        .lines()
        .find(|l| l.trim_start().starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {history}"));
    for part in ["credential `iam`", "step verify", "InvalidClientTokenId"] {
        assert!(error.contains(part), "`{part}` not in `{error}`");
    }
    let last_error = status["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains("step verify") && last_error.contains("InvalidClientTokenId"),
        "{status}"
    );
    fx.assert_no_secret_leaked(&[&new]);
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn unknown_iam_user_fails_the_rotation_with_the_aws_code_and_changes_nothing() {
    let fx = Fixture::build("nouser", "grace = \"0s\"", false, true);
    let before = fx.labels();
    let out = fx.cli(&["rotate", "iam"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    for part in ["credential `iam`", "step issue", "NoSuchEntity", &fx.user] {
        assert!(error.contains(part), "`{part}` not in `{error}`");
    }
    assert_eq!(fx.labels(), before, "the secret is untouched");
    assert_eq!(fx.current(), fx.k0);
    assert_eq!(fx.aws.all_keys_in(&fx.secret_id).len(), 1, "nothing staged");
    assert_eq!(fx.status()["state"], "retrying");
    fx.assert_no_secret_leaked(&[]);
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn missing_secret_fails_the_rotation_with_the_aws_code_and_changes_nothing() {
    let fx = Fixture::build("nosecret", "grace = \"0s\"", true, false);
    let out = fx.cli(&["rotate", "iam"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    for part in [
        "credential `iam`",
        "step issue",
        "ResourceNotFoundException",
        &fx.secret_id,
    ] {
        assert!(error.contains(part), "`{part}` not in `{error}`");
    }
    // No key was created (or it was removed again): the user still has only K0, and it works.
    assert_eq!(fx.keys(), BTreeSet::from([fx.k0.id.clone()]));
    fx.assert_works(&fx.k0, "K0");
    // --dry-run reports the same without a rotation.
    let dry = fx.cli(&["rotate", "iam", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(1));
    assert!(
        text(&dry.stderr).contains("ResourceNotFoundException"),
        "{}",
        text(&dry.stderr)
    );
    fx.assert_no_secret_leaked(&[]);
}

#[test]
fn malformed_secret_arn_is_a_check_error_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let text_ = "[daemon]\nstate = \"sqlite:state/keyrotd.db\"\n\n[[credential]]\nid = \"iam\"\n\
        rotator = { kind = \"aws_iam_access_key\", user_name = \"app\" }\n\
        store = { kind = \"aws_secrets_manager\", secret_id = \"arn:aws:secretsmanager:eu-west-1:1234:secret:app\", field = \"SecretAccessKey\" }\n\
        rotate_every = \"30d\"\nmax_age = \"40d\"\n";
    std::fs::write(&config, text_).unwrap();
    let out = cli(&config, &["check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let want = format!(
        "{}:7:9: credential[iam].store.secret_id: ",
        config.display()
    );
    assert!(stderr.contains(&want), "want `{want}` in:\n{stderr}");
    assert!(stderr.contains("account id must be 12 digits"), "{stderr}");
    assert!(!dir.path().join("state").exists(), "check writes nothing");
}

/// The daemon's own AWS identity lacks permissions: the error names the credential, the step
/// and AWS's code, and nothing changes. The region and endpoint come from `[aws]` defaults.
#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn access_denied_names_the_step_and_code_and_aws_defaults_apply() {
    let fx = Fixture::new("denied", "grace = \"0s\"");
    let url = moto_url();
    let config = std::fs::read_to_string(fx.config()).unwrap();
    let config = config
        .replace(
            &format!(", region = \"us-east-1\", endpoint_url = \"{url}\""),
            "",
        )
        .replacen(
            "[[credential]]",
            &format!("[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{url}\"\n\n[[credential]]"),
            1,
        );
    assert!(
        !config.contains("region = \"us-east-1\", endpoint_url"),
        "{config}"
    );
    std::fs::write(fx.config(), config).unwrap();
    let check = fx.cli(&["check"]);
    assert!(check.status.success(), "{}", text(&check.stderr));

    // A user with a key and no policy at all: moto enforces IAM, so every call is refused.
    let nobody = unique("nobody");
    fx.aws.create_user(&nobody);
    let weak = fx.aws.create_key(&nobody);
    let before = (fx.labels(), fx.keys());
    let out = keyrotd()
        .arg("--config")
        .arg(fx.config())
        .args(["rotate", "iam"])
        .envs(daemon_env())
        .env("AWS_ACCESS_KEY_ID", &weak.id)
        .env("AWS_SECRET_ACCESS_KEY", &weak.secret)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    for part in ["credential `iam`", "step issue", "AccessDenied"] {
        assert!(error.contains(part), "`{part}` not in `{error}`");
    }
    assert!(!stderr.contains(&weak.secret) && !stderr.contains(&fx.k0.secret));
    assert_eq!((fx.labels(), fx.keys()), before, "nothing changed");
    fx.assert_works(&fx.current(), "the current key after a refused rotation");
}
