//! kill -9 of `keyrotd rotate` at each step boundary of an IAM rotation into Secrets Manager,
//! then `keyrotd run` finishes the job against moto.

use super::*;

/// kill -9 of `keyrotd rotate` at `point`, then `keyrotd run` finishes the job: the rotation is
/// done, the user's only key is AWSCURRENT's, it works, K0 is refused and no AWSPENDING is left.
fn crash_and_resume(point: &str) {
    let fx = Fixture::new(&point.replace(':', "-"), "grace = \"0s\"");
    let mut crashed = fx.rotate_until(point);
    let at_crash = fx.keys();
    assert!(
        !at_crash.is_empty() && at_crash.len() <= 2,
        "{point}: {at_crash:?}"
    );
    crashed.kill().unwrap(); // SIGKILL
    crashed.wait().unwrap();

    // Consumers still read a complete, working key: K0 unless the promotion happened.
    let after_crash = fx.current();
    let promoted = point.starts_with("promote:done")
        || point.starts_with("promote:ok")
        || point.starts_with("revoke");
    if !promoted {
        assert_eq!(
            after_crash, fx.k0,
            "{point}: nothing promoted before the crash"
        );
    }
    fx.assert_works(&after_crash, point);
    let keys = fx.keys();
    assert!(
        keys.len() <= 2 && keys.contains(&after_crash.id),
        "{point}: {keys:?}"
    );

    let watch = KeyWatch::start(&fx.user);
    let mut daemon = fx.start();
    let finished = wait_until(Duration::from_secs(30), || {
        let history = fx.history();
        fx.status()["state"] == "idle"
            && history.matches("  iam  ").count() == 1
            && history.contains("  iam  done  ")
    });
    assert!(
        finished,
        "{point}: not finished: {}\n{}\nkeys {:?} labels {:?}\n{}",
        fx.status(),
        fx.history(),
        fx.keys(),
        fx.labels(),
        daemon.log_text()
    );
    assert_eq!(daemon.terminate(Duration::from_secs(10)).code(), Some(0));
    assert!(watch.finish() <= 2, "{point}: never more than two keys");
    assert!(
        daemon.log_text().contains("resuming rotation"),
        "{point}: {}",
        daemon.log_text()
    );

    let current = fx.current();
    assert_ne!(current.id, fx.k0.id, "{point}: the rotation was completed");
    // No orphan: the user's only key is the one consumers read.
    assert_eq!(
        fx.keys(),
        BTreeSet::from([current.id.clone()]),
        "{point}: orphaned or unrevoked key"
    );
    fx.assert_works(&current, point);
    fx.assert_refused(&fx.k0, point);
    let labels = fx.labels();
    assert!(
        labels.values().all(|l| !l.contains(PENDING)),
        "{point}: {labels:?}"
    );
    assert_eq!(
        labels.values().filter(|l| l.contains(CURRENT)).count(),
        1,
        "{point}: {labels:?}"
    );
    assert_eq!(
        labels.get(&fx.k0_version),
        Some(&set(&[PREVIOUS])),
        "{point}: {labels:?}"
    );
    let status = fx.status();
    assert_eq!(status["consecutive_failures"], 0, "{point}: {status}");
    fx.assert_no_secret_leaked(&[&current]);
}

macro_rules! kill_9_at {
    ($($name:ident => $point:literal,)*) => {$(
        #[test]
        #[ignore = "needs the test backends: run tests/run.sh"]
        fn $name() {
            crash_and_resume($point);
        }
    )*};
}

kill_9_at! {
    kill_9_at_issue_start => "issue:start",
    kill_9_at_issue_done => "issue:done",
    kill_9_at_issue_ok => "issue:ok",
    kill_9_at_stage_start => "stage:start",
    kill_9_at_stage_done => "stage:done",
    kill_9_at_stage_ok => "stage:ok",
    kill_9_at_activate_ok => "activate:ok",
    kill_9_at_verify_start => "verify:start",
    kill_9_at_verify_done => "verify:done",
    kill_9_at_verify_ok => "verify:ok",
    kill_9_at_promote_start => "promote:start",
    kill_9_at_promote_done => "promote:done",
    kill_9_at_promote_ok => "promote:ok",
    kill_9_at_revoke_start => "revoke:start",
    kill_9_at_revoke_done => "revoke:done",
}

/// issue:done is the dangerous one: the key exists in IAM, its secret only in the dead process.
#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn kill_9_after_create_access_key_leaves_an_orphan_that_the_restart_deletes() {
    let fx = Fixture::new("orphan", "grace = \"0s\"");
    let mut crashed = fx.rotate_until("issue:done");
    let keys = fx.keys();
    assert_eq!(keys.len(), 2, "CreateAccessKey ran: {keys:?}");
    let orphan = keys.iter().find(|k| **k != fx.k0.id).unwrap().clone();
    crashed.kill().unwrap();
    crashed.wait().unwrap();
    assert!(
        fx.aws
            .all_keys_in(&fx.secret_id)
            .iter()
            .all(|k| k.id != orphan),
        "the orphan was never staged"
    );

    let mut daemon = fx.start();
    let finished = wait_until(Duration::from_secs(30), || {
        fx.status()["state"] == "idle" && fx.history().contains("  iam  done  ")
    });
    assert!(finished, "{}\n{}", fx.status(), daemon.log_text());
    assert_eq!(daemon.terminate(Duration::from_secs(10)).code(), Some(0));
    let log = daemon.log_text();
    assert!(
        log.contains("deleting orphaned IAM access key") && log.contains(&orphan),
        "{log}"
    );
    let current = fx.current();
    assert!(current.id != orphan && current.id != fx.k0.id);
    assert_eq!(fx.keys(), BTreeSet::from([current.id.clone()]));
    fx.assert_works(&current, "re-issued key");
    let history = fx.history();
    assert!(
        history.contains("rollback  ok"),
        "abandon journaled: {history}"
    );
}
