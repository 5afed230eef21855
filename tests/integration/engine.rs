//! The rotation engine's invariants, driven through its public interface with the real SQLite
//! state store and the real file store. The rotator is the real `random` rotator wrapped so a
//! test can make one of its steps fail and see the order of calls.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keyrotd::config::{CredentialSpec, RetryPolicy};
use keyrotd::engine::{Engine, EngineMetrics, Event, EventSink, Outcome, Trigger};
use keyrotd::schedule::Schedule;
use keyrotd::scheduler::{lock, Scheduler, SchedulerMetrics, Settings, Table};
use keyrotd::state::{Phase, SqliteState, StateStore, Status};
use keyrotd_rotators::file::{FileConfig, FileStore, Format};
use keyrotd_rotators::random::{Alphabet, RandomConfig, RandomRotator};
use keyrotd_rotators::{
    Attrs, Credential, ProviderError, Rotator, RotatorConfig, StepContext, Store, StoreConfig,
};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

/// The random rotator, recording calls and failing the steps named in `fail`.
struct Scripted {
    inner: RandomRotator,
    fail: Mutex<HashSet<&'static str>>,
    /// Steps in `fail` whose error is permanent rather than transient.
    permanent: Mutex<HashSet<&'static str>>,
    /// Steps that panic the next time they run (once each).
    panic: Mutex<HashSet<&'static str>>,
    calls: Mutex<Vec<String>>,
    /// Every secret it issued, rolled-back ones included, for leak scans.
    issued: Mutex<Vec<String>>,
}

impl Scripted {
    fn new() -> Arc<Self> {
        let config = RandomConfig {
            length: 24,
            alphabet: Alphabet::Alphanumeric,
            field: "password".into(),
        };
        Arc::new(Self {
            inner: RandomRotator::new(config),
            fail: Mutex::default(),
            permanent: Mutex::default(),
            panic: Mutex::default(),
            calls: Mutex::default(),
            issued: Mutex::default(),
        })
    }

    fn fail(&self, step: &'static str, on: bool) {
        let mut f = self.fail.lock().unwrap();
        if on {
            f.insert(step);
        } else {
            f.remove(step);
        }
    }

    fn fail_permanently(&self, step: &'static str) {
        self.permanent.lock().unwrap().insert(step);
        self.fail(step, true);
    }

    fn call(&self, step: &'static str, detail: String) -> Result<(), ProviderError> {
        self.calls.lock().unwrap().push(format!("{step}{detail}"));
        if self.panic.lock().unwrap().remove(step) {
            panic!("{step} panicked in the test plugin");
        }
        if self.fail.lock().unwrap().contains(step) {
            let message = format!("{step} refused by the test");
            let err = if self.permanent.lock().unwrap().contains(step) {
                ProviderError::permanent(message)
            } else {
                ProviderError::transient(message)
            };
            return Err(err.with_code("TestRefused"));
        }
        Ok(())
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl Rotator for Scripted {
    fn kind(&self) -> &'static str {
        "random"
    }
    fn secret_field(&self) -> &str {
        "password"
    }
    async fn issue(
        &self,
        ctx: StepContext<'_>,
        current: Option<&Credential>,
    ) -> Result<Credential, ProviderError> {
        self.call("issue", String::new())?;
        let mut c = self.inner.issue(ctx, current).await?;
        self.issued
            .lock()
            .unwrap()
            .push(c.secret.expose_secret().to_owned());
        c.attrs
            .insert("key_id".into(), format!("key-{}", ctx.rotation_id));
        Ok(c)
    }
    async fn activate(
        &self,
        _: StepContext<'_>,
        _: &Credential,
        _: Option<&Credential>,
    ) -> Result<(), ProviderError> {
        self.call("activate", String::new())
    }
    async fn verify(&self, ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError> {
        self.call("verify", String::new())?;
        self.inner.verify(ctx, new).await
    }
    async fn abandon(
        &self,
        _: StepContext<'_>,
        issued: Option<&Attrs>,
        _: Option<&Credential>,
    ) -> Result<(), ProviderError> {
        self.call(
            "abandon",
            format!(
                " {}",
                issued
                    .and_then(|a| a.get("key_id"))
                    .cloned()
                    .unwrap_or_default()
            ),
        )
    }
    async fn revoke(&self, _: StepContext<'_>, old: &Attrs) -> Result<(), ProviderError> {
        self.call(
            "revoke",
            format!(" {}", old.get("key_id").cloned().unwrap_or_default()),
        )
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    state: Arc<SqliteState>,
    rotator: Arc<Scripted>,
    store: Arc<FileStore>,
    spec: CredentialSpec,
}

impl Fixture {
    fn new(grace: Duration, max_attempts: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(SqliteState::open(&dir.path().join("state.db")).unwrap());
        let file = FileConfig {
            path: dir.path().join("secret"),
            mode: "0600".into(),
            owner: None,
            group: None,
            format: Format::Json,
        };
        let store = Arc::new(FileStore::new(file.clone()).unwrap());
        let spec = CredentialSpec {
            id: "db".into(),
            rotator: RotatorConfig::Random(RandomConfig {
                length: 24,
                alphabet: Alphabet::Alphanumeric,
                field: "password".into(),
            }),
            store: StoreConfig::File(file),
            schedule: Schedule {
                cron: None,
                every: Some(Duration::from_secs(86400)),
                window: None,
            },
            max_age: Duration::from_secs(2 * 86400),
            grace,
            retry: RetryPolicy {
                max_attempts,
                backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(2),
            },
            place: (1, 1),
            period: Duration::from_secs(86400),
        };
        Self {
            dir,
            state,
            rotator: Scripted::new(),
            store,
            spec,
        }
    }

    fn engine(&self, shutdown: CancellationToken) -> Engine {
        let metrics = EngineMetrics::register(&prometheus::Registry::new()).unwrap();
        Engine::new(self.state.clone(), metrics, None, shutdown)
    }

    async fn run(&self, trigger: Trigger) -> Outcome {
        self.run_on(&self.engine(CancellationToken::new()), trigger)
            .await
    }

    async fn run_on(&self, engine: &Engine, trigger: Trigger) -> Outcome {
        let (outcome, _) = engine
            .run_with(
                &self.spec,
                self.rotator.clone(),
                self.store.clone(),
                trigger,
            )
            .await
            .unwrap();
        outcome
    }

    fn current(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join("secret")).ok()
    }

    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

/// Every file under `dir` as bytes, for secret scanning.
fn all_bytes(dir: &Path, except: &[PathBuf]) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if !except.contains(&path) && path.is_file() {
            out.extend(std::fs::read(&path).unwrap());
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Sleeps until the wall clock reaches `at` (Unix seconds), plus a little.
async fn sleep_until_unix(at: i64) {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let wait = (at * 1000 - now_ms).max(0) as u64 + 50;
    tokio::time::sleep(Duration::from_millis(wait)).await;
}

#[tokio::test]
async fn old_credential_is_revoked_only_after_promotion_and_grace() {
    let f = Fixture::new(Duration::from_secs(2), 3);
    let Outcome::Promoted { revoke_at, .. } = f.run(Trigger::Schedule).await else {
        panic!("first issuance")
    };
    let first = f
        .current()
        .expect("a current value after the first rotation");
    // Still in grace: running again does nothing.
    assert!(matches!(
        f.run(Trigger::Schedule).await,
        Outcome::InGrace { .. }
    ));
    assert!(f.rotator.calls().iter().all(|c| !c.starts_with("revoke")));
    sleep_until_unix(revoke_at).await;
    assert!(matches!(
        f.run(Trigger::Schedule).await,
        Outcome::Completed { .. }
    ));

    let Outcome::Promoted {
        rotation,
        revoke_at,
    } = f.run(Trigger::Schedule).await
    else {
        panic!("second rotation")
    };
    let second = f.current().unwrap();
    assert_ne!(first, second);
    assert!(
        f.files().contains(&"secret.previous".to_string()),
        "the old value stays readable during grace"
    );
    sleep_until_unix(revoke_at).await;
    assert!(matches!(
        f.run(Trigger::Schedule).await,
        Outcome::Completed { .. }
    ));
    assert!(!f.files().contains(&"secret.previous".to_string()));

    let calls = f.rotator.calls();
    let promote_order: Vec<&str> = calls.iter().map(|c| c.split(' ').next().unwrap()).collect();
    assert_eq!(
        promote_order,
        ["issue", "activate", "verify", "issue", "activate", "verify", "revoke"],
        "{calls:?}"
    );
    // The revoked key is the first rotation's, found through the journal although the current
    // credential's attributes are replaced.
    assert!(
        calls.last().unwrap().starts_with("revoke key-")
            && !calls.last().unwrap().ends_with(&rotation),
        "{calls:?}"
    );
}

#[tokio::test]
async fn a_failed_verify_discards_the_pending_value_and_keeps_the_current_one() {
    let f = Fixture::new(Duration::ZERO, 3);
    assert!(matches!(
        f.run(Trigger::Schedule).await,
        Outcome::Completed { .. }
    ));
    let before = f.current().unwrap();
    f.rotator.fail("verify", true);
    let Outcome::Failed { error, .. } = f.run(Trigger::Schedule).await else {
        panic!("verify must fail")
    };
    assert!(
        error.contains("credential `db`")
            && error.contains("step verify")
            && error.contains("TestRefused"),
        "{error}"
    );
    assert_eq!(
        f.current().unwrap(),
        before,
        "consumers keep the working value"
    );
    assert!(
        f.files().iter().all(|n| !n.contains(".pending.")),
        "pending discarded: {:?}",
        f.files()
    );
    assert!(
        f.rotator
            .calls()
            .iter()
            .any(|c| c.starts_with("abandon key-")),
        "the rotator undid its issue"
    );
    let record = f.state.credential("db").await.unwrap().unwrap();
    assert_eq!(
        (record.status, record.consecutive_failures),
        (Status::Retrying, 1)
    );
    assert!(record.next_attempt_at.is_some());
    let history = f.state.history(Some("db"), 1).await.unwrap();
    assert_eq!(history[0].0.phase, Phase::RolledBack);

    f.rotator.fail("verify", false);
    assert!(matches!(
        f.run(Trigger::Retry).await,
        Outcome::Completed { .. }
    ));
    assert_ne!(f.current().unwrap(), before);
    let record = f.state.credential("db").await.unwrap().unwrap();
    assert_eq!(
        (record.status, record.consecutive_failures),
        (Status::Idle, 0)
    );
}

#[tokio::test]
async fn exhausted_retries_stop_automation_until_a_manual_rotation() {
    let f = Fixture::new(Duration::ZERO, 2);
    f.rotator.fail("issue", true);
    assert!(matches!(
        f.run(Trigger::Schedule).await,
        Outcome::Failed { .. }
    ));
    assert!(matches!(
        f.run(Trigger::Retry).await,
        Outcome::Failed { .. }
    ));
    assert_eq!(
        f.state.credential("db").await.unwrap().unwrap().status,
        Status::Failed
    );
    assert_eq!(f.run(Trigger::Schedule).await, Outcome::Stopped);
    assert_eq!(f.run(Trigger::Retry).await, Outcome::Stopped);
    f.rotator.fail("issue", false);
    assert!(matches!(
        f.run(Trigger::Manual).await,
        Outcome::Completed { .. }
    ));
    assert_eq!(
        f.state.credential("db").await.unwrap().unwrap().status,
        Status::Idle
    );
}

#[tokio::test]
async fn a_failed_revoke_is_retried_without_touching_the_new_credential() {
    let f = Fixture::new(Duration::ZERO, 5);
    assert!(matches!(
        f.run(Trigger::Schedule).await,
        Outcome::Completed { .. }
    ));
    f.rotator.fail("revoke", true);
    assert!(matches!(
        f.run(Trigger::Schedule).await,
        Outcome::Failed { .. }
    ));
    let promoted = f.current().unwrap();
    let open = f
        .state
        .open_rotation("db")
        .await
        .unwrap()
        .expect("the rotation stays open");
    assert_eq!(open.phase, Phase::Promoted);
    assert_eq!(
        f.state.credential("db").await.unwrap().unwrap().status,
        Status::Retrying
    );
    f.rotator.fail("revoke", false);
    assert!(matches!(
        f.run(Trigger::Retry).await,
        Outcome::Completed { .. }
    ));
    assert_eq!(
        f.current().unwrap(),
        promoted,
        "a revoke retry never rolls back the promoted value"
    );
    assert!(f.state.open_rotation("db").await.unwrap().is_none());
}

#[tokio::test]
async fn shutdown_parks_a_rotation_that_the_next_process_resumes() {
    let f = Fixture::new(Duration::ZERO, 3);
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    assert!(matches!(
        f.run_on(&f.engine(shutdown), Trigger::Schedule).await,
        Outcome::Parked { .. }
    ));
    let open = f.state.open_rotation("db").await.unwrap().unwrap();
    assert_eq!((open.phase, open.owner.as_deref()), (Phase::Issuing, None));
    assert!(matches!(
        f.run(Trigger::Schedule).await,
        Outcome::Completed { .. }
    ));
    let history = f.state.history(Some("db"), 10).await.unwrap();
    assert_eq!(history.len(), 1, "resumed, not restarted");
}

#[tokio::test]
async fn a_second_engine_cannot_start_a_rotation_while_one_is_open() {
    let f = Fixture::new(Duration::from_secs(3600), 3);
    assert!(matches!(
        f.run(Trigger::Schedule).await,
        Outcome::Promoted { .. }
    ));
    assert!(matches!(
        f.run(Trigger::Manual).await,
        Outcome::InGrace { .. }
    ));
    assert_eq!(f.state.history(Some("db"), 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn no_secret_value_reaches_the_state_database() {
    let f = Fixture::new(Duration::ZERO, 3);
    // A value put there before keyrotd managed it, with another secret member beside ours: only
    // attributes the rotator declares public may be journaled.
    let other = "other-member-that-is-secret-too-7f3a9c";
    std::fs::write(
        f.dir.path().join("secret"),
        format!(r#"{{"password":"adopted-value-5b1e","api_token":"{other}"}}"#),
    )
    .unwrap();
    for _ in 0..3 {
        f.run(Trigger::Schedule).await;
    }
    f.rotator.fail("verify", true);
    assert!(matches!(
        f.run(Trigger::Schedule).await,
        Outcome::Failed { .. }
    ));
    let mut secrets = f.rotator.issued.lock().unwrap().clone();
    assert_eq!(secrets.len(), 4, "three promoted and one rolled back");
    secrets.extend(["adopted-value-5b1e".to_owned(), other.to_owned()]);
    let db = all_bytes(
        f.dir.path(),
        &[
            f.dir.path().join("secret"),
            f.dir.path().join("secret.previous"),
        ],
    );
    assert!(db.len() > 1000, "the state database was written");
    for s in &secrets {
        assert!(
            !contains(&db, s),
            "a secret value leaked into the state database"
        );
    }
}

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

/// Every event raised or cleared, as `(credential, event, summary)`.
#[derive(Default)]
struct Events(Mutex<Vec<(String, Event, String)>>);

impl EventSink for Events {
    fn event(&self, credential: &str, event: Event, summary: &str) {
        self.0
            .lock()
            .unwrap()
            .push((credential.into(), event, summary.into()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_rotation_is_reported_released_and_retried_and_shutdown_does_not_hang() {
    let f = Fixture::new(Duration::ZERO, 5);
    f.rotator.panic.lock().unwrap().insert("issue");
    let shutdown = CancellationToken::new();
    let registry = prometheus::Registry::new();
    let engine = Arc::new(Engine::new(
        f.state.clone(),
        EngineMetrics::register(&registry).unwrap(),
        None,
        shutdown.clone(),
    ));
    let events = Arc::new(Events::default());
    let metrics = SchedulerMetrics::register(&registry).unwrap();
    let table = Arc::new(Table::new(vec![f.spec.clone()], vec![], &[]));
    let (rotator, store) = (f.rotator.clone(), f.store.clone());
    let settings = Settings {
        max_concurrent: 1,
        events: Some(events.clone()),
        warn_before: Duration::from_secs(3600),
        data_version: f.state.external_version().await.unwrap(),
        metrics: metrics.clone(),
    };
    let scheduler = Scheduler::new(table.clone(), engine, settings, shutdown.clone()).with_plugins(
        Arc::new(move |_| {
            (
                rotator.clone() as Arc<dyn Rotator>,
                store.clone() as Arc<dyn Store>,
            )
        }),
    );
    let run = tokio::spawn(scheduler.run());

    // The credential was never rotated: due at once. Its first run panics in `issue`; the retry
    // (after a backoff of at most a second) resumes the rotation and completes it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while f.current().is_none() || lock(table.slot(0).live).status == Status::Rotating {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the credential was never rotated after the panic: {:?}",
            f.rotator.calls()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metrics.panics.get(), 1);
    let calls = f.rotator.calls();
    assert_eq!(
        calls.iter().filter(|c| *c == "issue").count(),
        2,
        "{calls:?}"
    );
    let events = events.0.lock().unwrap().clone();
    assert!(
        matches!(&events[0], (id, Event::RotationFailed(true), summary) if id == "db" && summary.contains("panicked")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|(_, e, _)| *e == Event::RotationFailed(false)),
        "the failure alert is cleared by the successful retry: {events:?}"
    );
    let (rotation, steps) = f.state.history(Some("db"), 1).await.unwrap().remove(0);
    assert!(
        matches!(rotation.phase, Phase::Promoted | Phase::Done),
        "{rotation:?}"
    );
    assert!(
        steps.iter().any(|s| s.step == "promote" && s.event == "ok"),
        "{steps:?}"
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("shutdown must not hang after a panicked run")
        .unwrap();
}

/// A file store whose `last_rotation` never answers, with a 1 s timeout.
struct SilentBookkeeping(Arc<FileStore>);

#[async_trait]
impl Store for SilentBookkeeping {
    fn kind(&self) -> &'static str {
        "silent"
    }
    fn location(&self) -> String {
        self.0.location()
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs(1)
    }
    async fn current(&self, ctx: StepContext<'_>) -> Result<Option<Credential>, ProviderError> {
        self.0.current(ctx).await
    }
    async fn stage(&self, ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError> {
        self.0.stage(ctx, new).await
    }
    async fn pending(&self, ctx: StepContext<'_>) -> Result<Option<Credential>, ProviderError> {
        self.0.pending(ctx).await
    }
    async fn promote(&self, ctx: StepContext<'_>) -> Result<(), ProviderError> {
        self.0.promote(ctx).await
    }
    async fn discard(&self, ctx: StepContext<'_>) -> Result<(), ProviderError> {
        self.0.discard(ctx).await
    }
    async fn release_previous(&self, ctx: StepContext<'_>) -> Result<(), ProviderError> {
        self.0.release_previous(ctx).await
    }
    async fn last_rotation(&self, _: StepContext<'_>) -> Result<Option<String>, ProviderError> {
        std::future::pending().await
    }
}

#[tokio::test]
async fn a_store_that_never_says_which_rotation_wrote_it_does_not_hang_the_run() {
    let f = Fixture::new(Duration::ZERO, 3);
    let engine = f.engine(CancellationToken::new());
    let store = Arc::new(SilentBookkeeping(f.store.clone()));
    let run = engine.run_with(&f.spec, f.rotator.clone(), store, Trigger::Schedule);
    let (outcome, _) = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the lookup is bounded by the store's timeout")
        .unwrap();
    assert!(matches!(outcome, Outcome::Completed { .. }), "{outcome:?}");
}
