//! The rotation engine's invariants, driven through its public interface with the real SQLite
//! state store and the real file store. The rotator is the real `random` rotator wrapped so a
//! test can make one of its steps fail and see the order of calls.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keyrotd::config::{CredentialSpec, RetryPolicy};
use keyrotd::engine::{Engine, EngineMetrics, Outcome};
use keyrotd::event::{Condition, EventSink};
use keyrotd::protocol::{Phase, Trigger};
use keyrotd::schedule::Schedule;
use keyrotd::scheduler::{lock, Scheduler, SchedulerMetrics, Settings, Table};
use keyrotd::state::{SqliteState, StateStore, Status};
use keyrotd_plugin::{Attrs, Credential, ProviderError, Rotator, StepContext, Store};
use keyrotd_providers::file::{Encoding, FileConfig, FileStore};
use keyrotd_providers::random::{Alphabet, RandomConfig, RandomRotator};
use keyrotd_providers::{RotatorConfig, StoreConfig};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::support::{all_bytes, contains};

mod failures;
mod hangs;

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
            format: Encoding::Json,
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
            revoke: Default::default(),
            hooks: Vec::new(),
            revoke_after_hook_failure: false,
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
