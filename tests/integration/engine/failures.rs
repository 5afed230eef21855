//! The engine after failures: permanent errors, rollbacks that fail too, failed store reads and
//! revokes, each journaled under its step, and the old key always revocable.

use super::*;

#[tokio::test]
async fn a_permanent_error_stops_automation_after_one_confirmation_retry() {
    let f = Fixture::new(Duration::ZERO, 10);
    f.rotator.fail_permanently("issue");
    assert!(matches!(
        f.run(Trigger::Schedule).await,
        Outcome::Failed { .. }
    ));
    let record = f.state.credential("db").await.unwrap().unwrap();
    assert_eq!(record.status, Status::Retrying, "one confirmation retry");
    assert!(matches!(
        f.run(Trigger::Retry).await,
        Outcome::Failed { .. }
    ));
    let record = f.state.credential("db").await.unwrap().unwrap();
    assert_eq!(record.status, Status::Failed, "not 10 attempts of backoff");
    assert_eq!(f.run(Trigger::Retry).await, Outcome::Stopped);
}

#[tokio::test]
async fn a_manual_rotation_after_the_grace_period_revokes_and_then_rotates() {
    let f = Fixture::new(Duration::from_millis(300), 3);
    let Outcome::Promoted { revoke_at, .. } = f.run(Trigger::Schedule).await else {
        panic!("first issuance")
    };
    sleep_until_unix(revoke_at).await;
    assert!(matches!(
        f.run(Trigger::Schedule).await,
        Outcome::Completed { .. }
    ));
    let Outcome::Promoted { revoke_at, .. } = f.run(Trigger::Schedule).await else {
        panic!("second rotation")
    };
    let first = f.current().unwrap();
    // The daemon is down: nobody revoked at `revoke_at`.
    sleep_until_unix(revoke_at).await;
    let outcome = f.run(Trigger::Manual).await;
    assert!(matches!(outcome, Outcome::Promoted { .. }), "{outcome:?}");
    assert_ne!(f.current().unwrap(), first, "a new credential, as asked");
    let steps: Vec<String> = f
        .rotator
        .calls()
        .iter()
        .map(|c| c.split(' ').next().unwrap().to_owned())
        .collect();
    assert_eq!(
        steps,
        [
            "issue", "activate", "verify", "issue", "activate", "verify", "revoke", "issue",
            "activate", "verify"
        ]
    );
}

#[tokio::test]
async fn the_failure_that_caused_a_rollback_is_kept_when_the_rollback_fails_too() {
    let f = Fixture::new(Duration::ZERO, 5);
    f.rotator.fail("verify", true);
    f.rotator.fail("abandon", true);
    let Outcome::Failed { error, .. } = f.run(Trigger::Schedule).await else {
        panic!("verify fails")
    };
    assert!(error.contains("step verify failed"), "{error}");
    // The retry resumes the rollback, which fails again: still the verify failure.
    let Outcome::Failed { error, .. } = f.run(Trigger::Retry).await else {
        panic!("the rollback fails")
    };
    assert!(error.contains("step verify failed"), "{error}");
    let (rotation, steps) = f.state.history(Some("db"), 1).await.unwrap().remove(0);
    assert!(
        rotation
            .error
            .as_deref()
            .unwrap()
            .contains("step verify failed"),
        "{rotation:?}"
    );
    let record = f.state.credential("db").await.unwrap().unwrap();
    assert!(record.last_error.unwrap().contains("step verify failed"));
    let rollback_errors = steps
        .iter()
        .filter(|s| s.step == "rollback" && s.event == "error")
        .count();
    assert_eq!(rollback_errors, 2, "each rollback attempt is journaled");
    f.rotator.fail("abandon", false);
    f.rotator.fail("verify", false);
    assert!(matches!(
        f.run(Trigger::Retry).await,
        Outcome::Completed { .. }
    ));
}

#[tokio::test]
async fn a_failed_store_read_is_journaled_under_the_step_that_needed_it() {
    let f = Fixture::new(Duration::ZERO, 3);
    // The store cannot read its current value: the path is a directory.
    std::fs::create_dir(f.dir.path().join("secret")).unwrap();
    assert!(matches!(
        f.run(Trigger::Schedule).await,
        Outcome::Failed { .. }
    ));
    let (_, steps) = f.state.history(Some("db"), 1).await.unwrap().remove(0);
    let journal: Vec<(&str, &str)> = steps
        .iter()
        .map(|s| (s.step.as_str(), s.event.as_str()))
        .collect();
    assert_eq!(
        &journal[..2],
        [("issue", "start"), ("issue", "error")],
        "{journal:?}"
    );
}

#[tokio::test]
async fn revoke_and_release_are_journaled_as_separate_steps() {
    let f = Fixture::new(Duration::ZERO, 3);
    assert!(matches!(
        f.run(Trigger::Schedule).await,
        Outcome::Completed { .. }
    ));
    assert!(matches!(
        f.run(Trigger::Schedule).await,
        Outcome::Completed { .. }
    ));
    let (_, steps) = f.state.history(Some("db"), 1).await.unwrap().remove(0);
    let tail: Vec<String> = steps[steps.len() - 4..]
        .iter()
        .map(|s| format!("{} {}", s.step, s.event))
        .collect();
    assert_eq!(
        tail,
        ["revoke start", "revoke ok", "release start", "release ok"]
    );
}

#[tokio::test]
async fn the_old_key_stays_revocable_after_many_rollbacks_in_a_row() {
    let f = Fixture::new(Duration::ZERO, 20);
    assert!(matches!(
        f.run(Trigger::Schedule).await,
        Outcome::Completed { .. }
    ));
    let Outcome::Completed { rotation } = f.run(Trigger::Schedule).await else {
        panic!("second rotation")
    };
    // More rolled-back rotations than any history window holds.
    f.rotator.fail("verify", true);
    for _ in 0..7 {
        assert!(matches!(
            f.run(Trigger::Retry).await,
            Outcome::Failed { .. }
        ));
    }
    f.rotator.fail("verify", false);
    assert!(matches!(
        f.run(Trigger::Retry).await,
        Outcome::Completed { .. }
    ));
    assert_eq!(
        f.rotator.calls().last().unwrap(),
        &format!("revoke key-{rotation}"),
        "the current key is on the credential's record, not looked up in the history"
    );
}
