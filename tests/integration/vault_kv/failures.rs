//! A concurrent writer between stage and promote, OpenBao unreachable during stage or promote,
//! and a policy missing one capability.

use super::*;

/// Someone writes the secret while keyrotd hangs between verify and promote: the promotion
/// refuses to overwrite it and names the path, and the rotation is rolled back (nothing was
/// promoted, and no retry could succeed); the next rotation starts from the other writer's value.
fn concurrent_writer(kv: u8) {
    let fx = Fixture::new(kv, "race", "", "");
    let mut hung = fx.rotate_until("promote:start");
    let theirs = format!("written-by-someone-else-{}", unique("w"));
    fx.bao.bao(&[
        "kv",
        "put",
        &format!("-mount={}", fx.mount),
        &fx.path,
        &format!("password={theirs}"),
    ]);
    hung.kill().unwrap();
    hung.wait().unwrap();

    let out = fx.rotate();
    assert!(!out.status.success(), "the rotation fails");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("credential `app`: step promote failed: ")
            && stderr.contains("written by someone else"),
        "{stderr}"
    );
    let (password, writer, version) = fx.latest();
    assert_eq!(
        password, theirs,
        "the other writer's value is never overwritten"
    );
    assert_eq!(writer, None);
    if kv == 2 {
        assert_eq!(version, 2, "no version written after theirs");
    }
    let history = fx.history();
    let api = match kv {
        2 => format!("secret/data/{}", fx.path),
        _ => format!("{}/{}", fx.mount, fx.path),
    };
    assert!(
        history.contains(&format!("{api}: written by someone else since the stage")),
        "{history}"
    );
    assert!(history.contains("promote   error"), "{history}");
    // Rolled back: the staged value is discarded, and the rotation is over.
    assert!(history.contains("discard   ok"), "{history}");
    assert!(fx.read(".pending").is_none(), "nothing left staged");
    assert_ne!(
        fx.status()["state"],
        "failed",
        "a conflict does not stop automation"
    );

    // The next rotation replaces the other writer's value as the old one.
    let out = fx.rotate();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (fresh, writer, _) = fx.latest();
    assert!(fresh != theirs && fresh != fx.p0);
    assert!(writer.is_some(), "written by keyrotd's new rotation");
    fx.assert_no_secret_leaked(&[theirs, fresh], None);
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn kv2_a_concurrent_writer_fails_the_cas_and_is_never_overwritten() {
    concurrent_writer(2);
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn kv1_a_concurrent_writer_is_detected_before_the_write() {
    concurrent_writer(1);
}

/// OpenBao drops `line` (stage's or promote's write) while `keyrotd run` rotates: retries with
/// backoff, consumers keep P0 and nothing is released; once it is back the rotation completes.
fn unreachable_during(kv: u8, step: &str, line: impl Fn(&Fixture) -> String) {
    let fx = Fixture::new(kv, &format!("down-{step}"), "", "");
    // KV v1 has no versions: `read` reports 0.
    let (v0, v1) = if kv == 2 { (1, 2) } else { (0, 0) };
    fx.proxy.cut(Some(&line(&fx)));
    let daemon = fx.start();
    let retried = wait_until(Duration::from_secs(30), || fx.proxy.dropped() >= 3);
    assert!(
        retried,
        "{step}: retried: {}\n{}",
        fx.history(),
        daemon.log_text()
    );
    let (password, _, version) = fx.latest();
    assert_eq!(
        (password.as_str(), version),
        (fx.p0.as_str(), v0),
        "{step}: consumers keep P0"
    );
    let history = fx.history();
    assert!(history.contains(&format!("{step:<9} error")), "{history}");
    assert!(history.contains("could not reach Vault"), "{history}");
    assert!(!history.contains("release"), "nothing released: {history}");
    assert!(fx.status()["consecutive_failures"].as_u64() >= Some(1));

    fx.proxy.cut(None);
    fx.wait_done(&daemon, 1);
    let (password, writer, version) = fx.latest();
    assert!(
        password != fx.p0 && writer.is_some() && version == v1,
        "{step}"
    );
    assert!(fx.read(".pending").is_none() && fx.read(".previous").is_none());
    let metrics = http_get(fx.port, "/metrics").map(|(_, body)| body);
    fx.assert_no_secret_leaked(&[password], metrics.as_deref());
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn kv2_openbao_unreachable_during_stage_retries_and_completes() {
    unreachable_during(2, "stage", |fx| {
        format!("POST /v1/secret/data/{}.pending", fx.path)
    });
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn kv2_openbao_unreachable_during_promote_retries_and_completes() {
    unreachable_during(2, "promote", |fx| {
        format!("POST /v1/secret/data/{}", fx.path)
    });
}

/// KV v1's promote writes `PATH.previous`, then `PATH`: the second write is dropped, and the
/// re-run writes both again.
#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn kv1_openbao_unreachable_during_promote_retries_and_completes() {
    unreachable_during(1, "promote", |fx| {
        format!("POST /v1/{}/{}", fx.mount, fx.path)
    });
}

/// `hcl` with `capability` removed from the rule on `path`.
fn without(hcl: &str, path: &str, capability: &str) -> String {
    let head = format!("path \"{path}\" {{");
    let start = hcl
        .find(&head)
        .unwrap_or_else(|| panic!("no rule on {path}:\n{hcl}"));
    let end = start + hcl[start..].find('}').unwrap();
    let rule = hcl[start..end]
        .replace(&format!("\"{capability}\", "), "")
        .replace(&format!(", \"{capability}\""), "");
    assert_ne!(rule, hcl[start..end], "{capability} on {path}");
    format!("{}{rule}{}", &hcl[..start], &hcl[end..])
}

/// The printed policy without `capability` on `path`: the rotation fails at `step`, permanent,
/// naming the credential, the step, the path and the capability; consumers keep P0.
fn denied(kv: u8, step: &str, path: &str, capability: &str) {
    let fx = Fixture::without_token(kv, &format!("denied-{step}"), "", "");
    let path = path.replace("PATH", &fx.path).replace("MOUNT", &fx.mount);
    fx.use_policy(&without(&fx.printed_policy(), &path, capability));
    let out = fx.rotate();
    assert!(!out.status.success(), "{step}: the rotation fails");
    let history = fx.history();
    let names = |text: &str| {
        text.contains(&format!("{path} "))
            && text.contains(&format!("`{capability}`"))
            && text.contains("permission denied")
    };
    let line = history
        .lines()
        .find(|l| l.contains(&format!("{step:<9} error")))
        .unwrap_or_else(|| panic!("{step}: {history}"));
    assert!(names(line), "{line}");
    let stderr = text(&out.stderr);
    let named = format!("credential `app`: step {step} failed: ");
    assert!(stderr.contains(&named) && names(&stderr), "{stderr}");
    assert_eq!(fx.latest().0, fx.p0, "{step}: consumers keep P0");
    // Permanent: the engine confirms it once, then stops retrying.
    assert_eq!(fx.status()["state"], "retrying");
    assert!(!fx.rotate().status.success());
    let status = fx.status();
    assert_eq!(status["state"], "failed", "permanent: {status}");
    assert_eq!(fx.latest().0, fx.p0, "{step}: consumers keep P0");
    fx.assert_no_secret_leaked(&[], None);
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn kv2_without_create_on_the_pending_path_stage_is_denied() {
    denied(2, "stage", "secret/data/PATH.pending", "create");
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn kv2_without_update_on_the_secret_promote_is_denied() {
    denied(2, "promote", "secret/data/PATH", "update");
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn kv1_without_create_on_the_previous_path_promote_is_denied() {
    denied(1, "promote", "MOUNT/PATH.previous", "create");
}

/// The secret's latest version soft-deleted (`bao kv delete`), and a stale staged copy too: its
/// version still counts for the check-and-set, so the rotation writes over it instead of
/// failing as if someone else had written.
#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn kv2_a_soft_deleted_latest_version_is_rotated_over() {
    let fx = Fixture::new(2, "deleted", "", "");
    let mut hung = fx.rotate_until("verify:start");
    hung.kill().unwrap();
    hung.wait().unwrap();
    let mount = format!("-mount={}", fx.mount);
    fx.bao.bao(&["kv", "delete", &mount, &fx.path]);
    fx.bao
        .bao(&["kv", "delete", &mount, &format!("{}.pending", fx.path)]);
    // The interrupted rotation finds its staged value gone at verify and rolls back; the next
    // one starts from no value at all.
    let first = fx.rotate();
    assert!(!first.status.success(), "{}", text(&first.stdout));
    assert!(fx.history().contains("rollback  ok"), "{}", fx.history());
    let out = fx.rotate();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (fresh, writer, _) = fx.latest();
    assert!(fresh != fx.p0, "a new value is current");
    assert!(writer.is_some(), "written by keyrotd");
}
