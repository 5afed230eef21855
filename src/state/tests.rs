//! Unit tests of the SQLite backend: one open rotation per credential, leases and claims.

use keyrotd_plugin::Attrs;

use super::*;
use crate::protocol::Trigger;

impl SqliteState {
    /// One journal line now, as the engine writes it through [`StateStore::record`].
    async fn log_step(
        &self,
        rotation_id: &str,
        step: &str,
        event: &str,
        detail: Option<&str>,
        trigger: Trigger,
    ) -> Result<(), StateError> {
        let line = JournalLine {
            at_ms: chrono::Utc::now().timestamp_millis(),
            step: step.to_owned(),
            event: event.to_owned(),
            detail: detail.map(str::to_owned),
            trigger,
        };
        self.record(rotation_id, &[line], None).await
    }
}

fn rotation(id: &str, cred: &str) -> RotationRecord {
    RotationRecord {
        id: id.into(),
        credential_id: cred.into(),
        trigger: "manual".into(),
        started_at: 1,
        phase: Phase::Issuing,
        new_attrs: None,
        old_attrs: Some(Attrs::from([("AccessKeyId".into(), "AKIA1".into())])),
        revoke_at: None,
        owner: Some("me".into()),
        lease_until: 100,
        error: None,
        finished_at: None,
    }
}

#[tokio::test]
async fn only_one_open_rotation_per_credential() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteState::open(&dir.path().join("s.db")).unwrap();
    let mut r1 = rotation("r1", "db");
    r1.owner = Some(s.owner().into());
    s.begin(&r1).await.unwrap().unwrap();
    let busy = s.begin(&rotation("r2", "db")).await.unwrap().unwrap_err();
    assert_eq!(busy.0.id, "r1");
    s.begin(&rotation("r3", "other")).await.unwrap().unwrap();

    let mut r1 = s.open_rotation("db").await.unwrap().unwrap();
    assert_eq!(r1.old_attrs.as_ref().unwrap()["AccessKeyId"], "AKIA1");
    r1.phase = Phase::Done;
    r1.finished_at = Some(5);
    s.save(&r1, &CredentialRecord::new("db")).await.unwrap();
    s.begin(&rotation("r2", "db")).await.unwrap().unwrap();
    assert_eq!(s.history(Some("db"), 10).await.unwrap().len(), 2);
}

/// `steps` gives one rotation's lines of one step, in order, and nothing of another rotation.
#[tokio::test]
async fn steps_reads_one_rotations_lines_of_one_step() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteState::open(&dir.path().join("s.db")).unwrap();
    for (id, cred) in [("r1", "db"), ("r2", "other")] {
        let mut r = rotation(id, cred);
        r.owner = Some(s.owner().into());
        s.begin(&r).await.unwrap().unwrap();
    }
    for (id, step, event) in [
        ("r1", "notify", "start"),
        ("r1", "issue", "start"),
        ("r1", "notify", "ok"),
        ("r2", "notify", "ok"),
    ] {
        s.log_step(id, step, event, Some(id), Trigger::Manual)
            .await
            .unwrap();
    }
    let lines = s.steps("r1", "notify").await.unwrap();
    let events: Vec<_> = lines
        .iter()
        .map(|l| (l.step.as_str(), l.event.as_str()))
        .collect();
    assert_eq!(events, [("notify", "start"), ("notify", "ok")]);
    assert!(s.steps("r1", "check_use").await.unwrap().is_empty());
}

/// Two handles on one database stand for two processes, each with its own liveness lock.
#[tokio::test]
async fn leases_are_taken_only_when_free_expired_or_dead() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let me = SqliteState::open(&path).unwrap();
    let you = SqliteState::open(&path).unwrap();
    let mut r1 = rotation("r1", "db");
    r1.owner = Some(me.owner().into());
    me.begin(&r1).await.unwrap().unwrap();
    assert!(
        matches!(you.claim("r1", 200, 50).await.unwrap(), Claim::Held { .. }),
        "lease held by a live owner until 100"
    );
    assert!(
        matches!(you.claim("r1", 300, 101).await.unwrap(), Claim::Taken(_)),
        "expired"
    );
    // "me" held it for a while; its writes now fail instead of overwriting "you"'s progress.
    let mut r = me.open_rotation("db").await.unwrap().unwrap();
    r.phase = Phase::Staged;
    let lost = me.save(&r, &CredentialRecord::new("db")).await;
    assert!(matches!(lost, Err(StateError::LeaseLost(_))), "{lost:?}");
    let lost = me
        .log_step("r1", "stage", "start", None, Trigger::Manual)
        .await;
    assert!(matches!(lost, Err(StateError::LeaseLost(_))), "{lost:?}");
    assert!(!me.renew("r1", 400).await.unwrap());
    assert_eq!(
        me.open_rotation("db").await.unwrap().unwrap().phase,
        Phase::Issuing
    );
    you.save(&r, &CredentialRecord::new("db")).await.unwrap();
    you.log_step("r1", "stage", "start", None, Trigger::Manual)
        .await
        .unwrap();
    assert!(you.renew("r1", 400).await.unwrap());
}

#[tokio::test]
async fn a_claim_returns_the_rotation_as_it_is_now_and_a_dead_owner_loses_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let me = SqliteState::open(&path).unwrap();
    let gone = SqliteState::open(&path).unwrap();
    let mut r = rotation("r1", "db");
    r.owner = Some(gone.owner().into());
    r.lease_until = i64::MAX;
    gone.begin(&r).await.unwrap().unwrap();
    r.phase = Phase::Promoted;
    gone.save(&r, &CredentialRecord::new("db")).await.unwrap();
    drop(gone);
    let Claim::Taken(fresh) = me.claim("r1", 200, 50).await.unwrap() else {
        panic!("the owner's lock is free: it is gone");
    };
    assert_eq!(fresh.phase, Phase::Promoted);
    assert_eq!(fresh.owner.as_deref(), Some(me.owner()));
    let mut done = *fresh;
    done.finished_at = Some(60);
    done.owner = None;
    me.save(&done, &CredentialRecord::new("db")).await.unwrap();
    assert!(matches!(
        me.claim("r1", 200, 50).await.unwrap(),
        Claim::Finished
    ));
    // Released: not even the last holder may write to it any more.
    let late = me.save(&done, &CredentialRecord::new("db")).await;
    assert!(matches!(late, Err(StateError::LeaseLost(_))), "{late:?}");
}

/// Writes queued together share one commit (group commit), and a write that fails (here a lost
/// lease) fails alone: every other write of its batch is committed and visible.
#[tokio::test]
async fn concurrent_writes_share_commits_and_a_failing_write_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteState::open(&dir.path().join("s.db")).unwrap();
    let mut ours = rotation("ours", "db");
    ours.owner = Some(s.owner().into());
    s.begin(&ours).await.unwrap().unwrap();
    s.begin(&rotation("theirs", "other"))
        .await
        .unwrap()
        .unwrap();
    let before = s.commit_counts();
    let writes = (0..200).map(|i| {
        let id = if i % 10 == 0 { "theirs" } else { "ours" };
        let detail = i.to_string();
        let s = &s;
        async move {
            s.log_step(id, "issue", "start", Some(&detail), Trigger::Manual)
                .await
        }
    });
    let results = futures_util::future::join_all(writes).await;
    for (i, result) in results.iter().enumerate() {
        match result {
            Err(StateError::LeaseLost(id)) if i % 10 == 0 => assert_eq!(id, "theirs"),
            Ok(()) if i % 10 != 0 => {}
            other => panic!("write {i}: {other:?}"),
        }
    }
    let after = s.commit_counts();
    assert_eq!(after.writes - before.writes, 200);
    assert!(
        after.commits - before.commits <= 20,
        "200 writes queued at once took {} commits",
        after.commits - before.commits
    );
    let (_, steps) = s.history(Some("db"), 1).await.unwrap().pop().unwrap();
    assert_eq!(steps.len(), 180, "every write that succeeded is durable");
    assert!(s.history(Some("other"), 1).await.unwrap()[0].1.is_empty());
}

/// A step's `ok`, the phase it reached and the next step's `start` go out in one write, all or
/// nothing.
#[tokio::test]
async fn a_record_writes_lines_and_a_save_together_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteState::open(&dir.path().join("s.db")).unwrap();
    let mut r = rotation("r1", "db");
    r.owner = Some(s.owner().into());
    s.begin(&r).await.unwrap().unwrap();
    let line = |step: &str, event: &str| JournalLine {
        at_ms: 7,
        step: step.into(),
        event: event.into(),
        detail: None,
        trigger: Trigger::Schedule,
    };
    let lines = [line("issue", "ok"), line("stage", "start")];
    r.phase = Phase::Issued;
    let before = s.commit_counts();
    s.record("r1", &lines, Some((&r, &CredentialRecord::new("db"))))
        .await
        .unwrap();
    assert_eq!(s.commit_counts().commits - before.commits, 1);
    let (saved, steps) = s.history(Some("db"), 1).await.unwrap().pop().unwrap();
    assert_eq!(saved.phase, Phase::Issued);
    let events: Vec<_> = steps.iter().map(|l| (&*l.step, &*l.event)).collect();
    assert_eq!(events, [("issue", "ok"), ("stage", "start")]);

    // Released by another save: the next record writes neither its lines nor its save.
    r.owner = None;
    s.save(&r, &CredentialRecord::new("db")).await.unwrap();
    r.phase = Phase::Staged;
    let lost = s
        .record(
            "r1",
            &[line("stage", "ok")],
            Some((&r, &CredentialRecord::new("db"))),
        )
        .await;
    assert!(matches!(lost, Err(StateError::LeaseLost(_))), "{lost:?}");
    let (saved, steps) = s.history(Some("db"), 1).await.unwrap().pop().unwrap();
    assert_eq!((saved.phase, steps.len()), (Phase::Issued, 2));
}

/// A rotation of `cred` begun, journaled and finished at `finished` by `s`.
async fn finished_rotation(s: &SqliteState, id: &str, cred: &str, started: i64, finished: i64) {
    let mut r = rotation(id, cred);
    r.owner = Some(s.owner().into());
    r.started_at = started;
    s.begin(&r).await.unwrap().unwrap();
    for step in ["issue", "promote"] {
        s.log_step(id, step, "ok", None, Trigger::Schedule)
            .await
            .unwrap();
    }
    let denied = "not authorized (provider code AccessDenied)";
    s.log_step(id, "revoke", "error", Some(denied), Trigger::Retry)
        .await
        .unwrap();
    r.phase = Phase::Done;
    r.finished_at = Some(finished);
    s.save(&r, &CredentialRecord::new(cred)).await.unwrap();
}

#[tokio::test]
async fn the_journal_is_chained_with_its_actor_and_pruned_behind_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let s = SqliteState::open_as(&path, &Actor::daemon()).unwrap();
    finished_rotation(&s, "r1", "db", 10, 20).await;
    finished_rotation(&s, "r2", "other", 30, 40).await;
    finished_rotation(&s, "r3", "db", 50, 60).await;
    let intact = s.verify_journal().await.unwrap().unwrap();
    assert_eq!((intact.rows, intact.head_seq), (9, 9));
    let lines = s
        .audit_lines(&audit::AuditFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(lines.len(), 9);
    assert_eq!(lines[0].actor.as_ref().unwrap()["kind"], "daemon");
    assert_eq!(lines[0].trigger, "schedule");
    assert_eq!(lines[8].hash, chain::hex(&intact.head));
    let error = &lines[2];
    assert_eq!(
        (error.event.as_str(), error.trigger.as_str()),
        ("error", "retry")
    );
    assert_eq!(
        error.error.as_deref(),
        Some("not authorized (provider code AccessDenied)")
    );
    assert_eq!(error.error_code.as_deref(), Some("AccessDenied"));
    assert_eq!(
        (lines[0].error_code.as_deref(), lines[0].error.as_deref()),
        (None, None)
    );

    // r1 is superseded by r3 and old; r2 is its credential's newest: kept, and so is r3 after it.
    let pruned = s.prune(45).await.unwrap();
    assert_eq!(
        (pruned.rotations, pruned.rows, pruned.checkpoint.seq),
        (1, 3, 3)
    );
    let after = s.verify_journal().await.unwrap().unwrap();
    assert_eq!(
        (after.rows, after.head, after.checkpoint.pruned),
        (6, intact.head, 3)
    );
    assert!(s.knows_rotation("other", "r2").await.unwrap());
    assert!(!s.knows_rotation("db", "r1").await.unwrap());
    // Nothing more is prunable: r2 blocks the prefix.
    assert_eq!(s.prune(45).await.unwrap().rows, 0);
    // New rows chain to the head after pruning.
    finished_rotation(&s, "r4", "db", 70, 80).await;
    assert_eq!(s.verify_journal().await.unwrap().unwrap().head_seq, 12);
}
