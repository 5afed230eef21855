//! The scheduling loop's state on a fake clock: what becomes due when, what starts, and what
//! never runs twice. No tasks, no sleeping, no state store: each test plays the loop's part by
//! hand (start what `next_run` gives, report it finished with its next wake-up).

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use keyrotd_providers::file::{Encoding, FileConfig};
use keyrotd_providers::random::{Alphabet, RandomConfig};
use keyrotd_providers::{RotatorConfig, StoreConfig};

use super::queue::Queue;
use super::table::{live_after_run, lock, Table, BUSY_RETRY};
use super::until;
use crate::config::{CredentialSpec, RetryPolicy};
use crate::engine::Outcome;
use crate::protocol::Trigger;
use crate::schedule::testing::at;
use crate::schedule::{CronSchedule, Schedule};
use crate::state::{CredentialRecord, Status};

const DAY: u64 = 86_400;

/// A credential with this schedule; the plugins are never called here.
fn spec(id: &str, schedule: Schedule) -> CredentialSpec {
    CredentialSpec {
        id: id.into(),
        rotator: RotatorConfig::Random(RandomConfig {
            length: 24,
            alphabet: Alphabet::Alphanumeric,
            field: "password".into(),
        }),
        store: StoreConfig::File(FileConfig {
            path: format!("/nonexistent/{id}").into(),
            mode: "0600".into(),
            owner: None,
            group: None,
            format: Encoding::Json,
        }),
        schedule,
        max_age: Duration::from_secs(90 * DAY),
        grace: Duration::ZERO,
        retry: RetryPolicy::default(),
        place: (1, 1),
        period: Duration::from_secs(30 * DAY),
        revoke: Default::default(),
        hooks: Vec::new(),
        revoke_after_hook_failure: false,
    }
}

/// Rotates `every` after the last success.
fn every(id: &str, every: Duration) -> CredentialSpec {
    spec(
        id,
        Schedule {
            cron: None,
            every: Some(every),
            window: None,
        },
    )
}

/// Rotates at `expression` (UTC), within `window` of each fire if given.
fn cron(id: &str, expression: &str, window: Option<Duration>) -> CredentialSpec {
    spec(
        id,
        Schedule {
            cron: Some(CronSchedule::parse(expression, Tz::UTC).unwrap()),
            every: None,
            window,
        },
    )
}

/// A credential last promoted at `issued`.
fn rotated(id: &str, issued: DateTime<Utc>) -> CredentialRecord {
    CredentialRecord {
        issued_at: Some(issued.timestamp()),
        ..CredentialRecord::new(id)
    }
}

/// The table at `now`, with these records (credentials without one were never rotated).
fn table(specs: Vec<CredentialSpec>, records: Vec<CredentialRecord>, now: DateTime<Utc>) -> Table {
    Table::new_at(specs, records, &[], now.timestamp())
}

/// Everything `next_run` starts at `now`, in order.
fn start_all(queue: &mut Queue, table: &Table, now: DateTime<Utc>) -> Vec<(usize, Trigger)> {
    std::iter::from_fn(|| queue.next_run(table, now)).collect()
}

/// The loop's sleep wake-up at `now`: due ages are dropped (no sink here), the rest queued.
fn wake(queue: &mut Queue, table: &Table, now: DateTime<Utc>) {
    queue.due_ages(now.timestamp());
    queue.enqueue_due(table, now);
}

fn hours(h: i64) -> TimeDelta {
    TimeDelta::hours(h)
}

#[test]
fn due_credentials_start_in_the_order_they_are_due() {
    let t0 = at(2026, 6, 1, 12, 0);
    let hour = Duration::from_secs(3600);
    // Last rotated 30, 50 and 10 minutes ago: due in 30, 10 and 50 minutes.
    let table = table(
        vec![every("a", hour), every("b", hour), every("c", hour)],
        vec![
            rotated("a", t0 - TimeDelta::minutes(30)),
            rotated("b", t0 - TimeDelta::minutes(50)),
            rotated("c", t0 - TimeDelta::minutes(10)),
        ],
        t0,
    );
    let mut queue = Queue::new(&table, 10, t0);
    assert_eq!(queue.pending(), 3);
    assert_eq!(
        queue.next_wake(),
        Some((t0 + TimeDelta::minutes(10)).timestamp())
    );
    wake(&mut queue, &table, t0 + TimeDelta::minutes(9));
    assert!(
        start_all(&mut queue, &table, t0).is_empty(),
        "nothing due yet"
    );
    // The loop oversleeps past two due times: both start, earliest first.
    let late = t0 + TimeDelta::minutes(40);
    wake(&mut queue, &table, late);
    assert_eq!(
        start_all(&mut queue, &table, late),
        [(1, Trigger::Interval), (0, Trigger::Interval)]
    );
    assert_eq!(
        queue.next_wake(),
        Some((t0 + TimeDelta::minutes(50)).timestamp())
    );
    let later = t0 + TimeDelta::minutes(50);
    wake(&mut queue, &table, later);
    assert_eq!(
        start_all(&mut queue, &table, later),
        [(2, Trigger::Interval)]
    );
    assert_eq!(queue.running(), 3);
    assert_eq!(queue.next_wake(), None);
}

#[test]
fn a_credential_is_queued_or_running_at_most_once() {
    let t0 = at(2026, 6, 1, 2, 0);
    // Both never rotated (due at once) and in one cron group firing at 03:00.
    let table = table(
        vec![cron("a", "0 3 * * *", None), cron("b", "0 3 * * *", None)],
        vec![rotated("b", t0 - hours(1))],
        t0,
    );
    let mut queue = Queue::new(&table, 1, t0);
    wake(&mut queue, &table, t0);
    assert_eq!(start_all(&mut queue, &table, t0), [(0, Trigger::Overdue)]);
    // `a` is running when the cron fires: only `b` is queued.
    let fire = at(2026, 6, 1, 3, 0);
    wake(&mut queue, &table, fire);
    assert_eq!(queue.busy(), [true, true]);
    assert!(
        start_all(&mut queue, &table, fire).is_empty(),
        "the only place is taken"
    );
    // A replaced wake-up of a busy credential (another process's change, say) does not queue it
    // again either.
    queue.reschedule(1, Some(fire.timestamp()));
    wake(&mut queue, &table, fire);
    queue.finished(0, None);
    assert_eq!(
        start_all(&mut queue, &table, fire),
        [(1, Trigger::Schedule)]
    );
    queue.finished(1, None);
    wake(&mut queue, &table, fire + hours(1));
    assert!(start_all(&mut queue, &table, fire + hours(1)).is_empty());
    assert_eq!(queue.busy(), [false, false]);
}

#[test]
fn no_more_than_the_concurrency_limit_run_at_once() {
    let t0 = at(2026, 6, 1, 12, 0);
    let specs = (0..5)
        .map(|i| every(&format!("c{i}"), Duration::from_secs(DAY)))
        .collect();
    let table = table(specs, vec![], t0);
    let mut queue = Queue::new(&table, 2, t0);
    wake(&mut queue, &table, t0);
    assert_eq!(
        start_all(&mut queue, &table, t0),
        [(0, Trigger::Overdue), (1, Trigger::Overdue)]
    );
    assert_eq!(queue.running(), 2);
    queue.finished(1, Some((t0 + hours(24)).timestamp()));
    assert_eq!(start_all(&mut queue, &table, t0), [(2, Trigger::Overdue)]);
    queue.finished(0, None);
    queue.finished(2, None);
    assert_eq!(
        start_all(&mut queue, &table, t0),
        [(3, Trigger::Overdue), (4, Trigger::Overdue)]
    );
    assert_eq!(queue.running(), 2);
}

#[test]
fn a_credential_another_process_holds_is_looked_at_again_later() {
    let t0 = at(2026, 6, 1, 12, 0);
    let table = table(vec![every("a", Duration::from_secs(DAY))], vec![], t0);
    let mut queue = Queue::new(&table, 1, t0);
    wake(&mut queue, &table, t0);
    assert_eq!(start_all(&mut queue, &table, t0), [(0, Trigger::Overdue)]);
    let busy = Outcome::Busy {
        rotation: "r1".into(),
        owner: "other:1:n".into(),
    };
    let now = t0.timestamp();
    let live = live_after_run(table.slot(0).spec, &busy, &CredentialRecord::new("a"), now);
    assert_eq!(live.wake, Some(now + BUSY_RETRY));
    *lock(table.slot(0).live) = live;
    queue.finished(0, live.wake);
    let just_before = t0 + TimeDelta::seconds(BUSY_RETRY - 1);
    wake(&mut queue, &table, just_before);
    assert!(start_all(&mut queue, &table, just_before).is_empty());
    let then = t0 + TimeDelta::seconds(BUSY_RETRY);
    wake(&mut queue, &table, then);
    assert_eq!(
        start_all(&mut queue, &table, then),
        [(0, Trigger::Interval)]
    );
}

#[test]
fn a_retrying_credential_runs_as_a_retry_at_its_backoff_and_not_at_cron_fires() {
    let t0 = at(2026, 6, 1, 2, 0);
    let retry_at = at(2026, 6, 1, 4, 0);
    let record = CredentialRecord {
        status: Status::Retrying,
        consecutive_failures: 1,
        next_attempt_at: Some(retry_at.timestamp()),
        ..rotated("a", t0 - hours(20))
    };
    let table = table(vec![cron("a", "0 3 * * *", None)], vec![record], t0);
    let mut queue = Queue::new(&table, 1, t0);
    let fire = at(2026, 6, 1, 3, 0);
    wake(&mut queue, &table, fire);
    assert!(
        start_all(&mut queue, &table, fire).is_empty(),
        "the cron fire waits for the backoff"
    );
    wake(&mut queue, &table, retry_at);
    assert_eq!(
        start_all(&mut queue, &table, retry_at),
        [(0, Trigger::Retry)]
    );
}

#[test]
fn a_cron_fire_queues_each_idle_member_of_its_group_once() {
    let t0 = at(2026, 6, 1, 12, 0);
    let failed = CredentialRecord {
        status: Status::Failed,
        ..rotated("c", t0 - hours(1))
    };
    let table = table(
        vec![
            cron("a", "0 3 * * *", None),
            cron("b", "0 3 * * *", None),
            cron("c", "0 3 * * *", None),
            cron("d", "0 4 * * *", None),
        ],
        vec![
            rotated("a", t0 - hours(1)),
            rotated("b", t0 - hours(1)),
            failed,
            rotated("d", t0 - hours(1)),
        ],
        t0,
    );
    assert_eq!(table.groups.len(), 2);
    assert_eq!(table.groups[0].members, [0, 1, 2]);
    let mut queue = Queue::new(&table, 10, t0);
    assert_eq!(
        queue.pending(),
        0,
        "cron credentials wait for their fire, not a wake-up"
    );
    let fire = at(2026, 6, 2, 3, 0);
    assert_eq!(queue.next_wake(), Some(fire.timestamp()));
    wake(&mut queue, &table, fire);
    // The failed member stays stopped; the other group has not fired.
    assert_eq!(
        start_all(&mut queue, &table, fire),
        [(0, Trigger::Schedule), (1, Trigger::Schedule)]
    );
    // Waking again at the same instant fires nothing more.
    wake(&mut queue, &table, fire);
    assert!(start_all(&mut queue, &table, fire).is_empty());
    assert_eq!(queue.next_wake(), Some(at(2026, 6, 2, 4, 0).timestamp()));
}

#[test]
fn a_cron_run_outside_its_window_waits_for_the_next_fire() {
    let t0 = at(2026, 6, 1, 12, 0);
    let window = Some(Duration::from_secs(600));
    let table = table(
        vec![cron("a", "0 3 * * *", window)],
        vec![rotated("a", t0 - hours(1))],
        t0,
    );
    // Fired at 03:00, but the loop only gets to start it at 03:11.
    let mut queue = Queue::new(&table, 1, t0);
    let fire = at(2026, 6, 2, 3, 0);
    wake(&mut queue, &table, fire);
    assert!(queue
        .next_run(&table, fire + TimeDelta::minutes(11))
        .is_none());
    assert_eq!(queue.busy(), [false], "released, not stuck");
    let next = at(2026, 6, 3, 3, 0);
    assert_eq!(queue.next_wake(), Some(next.timestamp()));
    wake(&mut queue, &table, next);
    assert_eq!(
        queue.next_run(&table, next + TimeDelta::minutes(10)),
        Some((0, Trigger::Schedule))
    );
}

#[test]
fn a_clock_jump_forward_fires_once_and_a_jump_back_does_not_fire_again() {
    let t0 = at(2026, 6, 1, 12, 0);
    let table = table(
        vec![cron("a", "0 3 * * *", None)],
        vec![rotated("a", t0 - hours(1))],
        t0,
    );
    let mut queue = Queue::new(&table, 1, t0);
    // The wall clock jumps forward past four fire times: one run.
    let jumped = at(2026, 6, 5, 10, 0);
    wake(&mut queue, &table, jumped);
    assert_eq!(
        start_all(&mut queue, &table, jumped),
        [(0, Trigger::Schedule)]
    );
    queue.finished(0, None);
    wake(&mut queue, &table, jumped);
    assert!(start_all(&mut queue, &table, jumped).is_empty());
    assert_eq!(queue.next_wake(), Some(at(2026, 6, 6, 3, 0).timestamp()));
    // It jumps back two days: the fires of 4 and 5 June are not fired (again).
    for back in [
        at(2026, 6, 3, 10, 0),
        at(2026, 6, 4, 3, 0),
        at(2026, 6, 5, 3, 0),
    ] {
        wake(&mut queue, &table, back);
        assert!(start_all(&mut queue, &table, back).is_empty(), "{back}");
    }
    let next = at(2026, 6, 6, 3, 0);
    wake(&mut queue, &table, next);
    assert_eq!(
        start_all(&mut queue, &table, next),
        [(0, Trigger::Schedule)]
    );
}

#[test]
fn a_replaced_or_removed_wake_up_never_fires() {
    let t0 = at(2026, 6, 1, 12, 0);
    let day = Duration::from_secs(DAY);
    let table1 = table(
        vec![every("a", day), every("b", day)],
        vec![rotated("a", t0 - hours(23)), rotated("b", t0 - hours(23))],
        t0,
    );
    let mut queue = Queue::new(&table1, 10, t0);
    // Another process rotated `a`: its wake-up moves a day later; the old entry is stale.
    queue.reschedule(0, Some((t0 + hours(24)).timestamp()));
    // `b` was marked failed elsewhere: no wake-up at all.
    queue.reschedule(1, None);
    let due = t0 + hours(1);
    wake(&mut queue, &table1, due);
    assert!(start_all(&mut queue, &table1, due).is_empty());
    assert_eq!(queue.next_wake(), Some((t0 + hours(24)).timestamp()));
    // A reload that drops `a` builds a new table and queue: only `b` is left, and runs.
    let table2 = table(
        vec![every("b", day)],
        vec![rotated("b", t0 - hours(23))],
        due,
    );
    let mut queue = Queue::new(&table2, 10, due);
    wake(&mut queue, &table2, due);
    assert_eq!(start_all(&mut queue, &table2, due), [(0, Trigger::Overdue)]);
    assert_eq!(table2.slot(0).spec.id, "b");
    assert_eq!(queue.next_wake(), None);
}

#[test]
fn shutdown_releases_what_was_queued_and_not_started() {
    let t0 = at(2026, 6, 1, 12, 0);
    let specs = (0..3)
        .map(|i| every(&format!("c{i}"), Duration::from_secs(DAY)))
        .collect();
    let table = table(specs, vec![], t0);
    let mut queue = Queue::new(&table, 1, t0);
    wake(&mut queue, &table, t0);
    assert_eq!(start_all(&mut queue, &table, t0), [(0, Trigger::Overdue)]);
    queue.drop_queued();
    assert_eq!(queue.busy(), [true, false, false]);
    queue.finished(0, None);
    assert!(start_all(&mut queue, &table, t0).is_empty());
}

#[test]
fn the_sleep_is_capped_and_never_negative() {
    let now_ms = 1_000_000;
    assert_eq!(until(Some(1_005), now_ms), Duration::from_secs(5));
    assert_eq!(until(Some(999), now_ms), Duration::ZERO);
    assert_eq!(until(Some(i64::MAX), now_ms), super::MAX_SLEEP);
    assert_eq!(until(None, now_ms), super::MAX_SLEEP);
}

#[test]
fn a_credential_with_a_not_after_is_stale_at_it_and_due_before_it() {
    let spec = every("tls", Duration::from_secs(30 * DAY));
    let issued = at(2026, 1, 1, 0, 0);
    let live = |expiry: Option<&str>| {
        let mut record = rotated("tls", issued);
        record.current_attrs = expiry.map(|t| {
            [("not_after".to_owned(), t.to_owned())]
                .into_iter()
                .collect()
        });
        super::live_view(&spec, &record, None, issued.timestamp())
    };
    let day = DAY as i64;
    // No expiry: max_age (90 d) and rotate_every (30 d) as configured.
    let plain = live(None);
    assert_eq!(plain.stale_at(&spec), Some(issued.timestamp() + 90 * day));
    assert_eq!(plain.wake, Some(issued.timestamp() + 30 * day));
    // Expires after 70 d: stale then, due 60 d (the slack) earlier, capped at a third of its
    // life: at 70 - 70/3 d.
    let long = live(Some("2026-03-12T00:00:00Z"));
    assert_eq!(long.stale_at(&spec), Some(issued.timestamp() + 70 * day));
    assert_eq!(long.max_age_secs(&spec), 70 * day);
    assert_eq!(long.wake, Some(issued.timestamp() + 30 * day));
    // Expires after 3 d: due at 2 d, not at 30 d, and not again and again at once.
    let short = live(Some("2026-01-04T00:00:00Z"));
    assert_eq!(short.stale_at(&spec), Some(issued.timestamp() + 3 * day));
    assert_eq!(short.wake, Some(issued.timestamp() + 2 * day));
    // An unreadable not_after is no expiry.
    assert_eq!(live(Some("soon")).wake, plain.wake);
}
