//! A panicking rotation and a store that never answers: reported, released, retried, and
//! shutdown never hangs.

use super::*;

/// Every condition raised or cleared, as `(credential, condition, raised, summary)`.
#[derive(Default)]
struct Events(Mutex<Vec<(String, Condition, bool, String)>>);

impl EventSink for Events {
    fn raise(&self, credential: &str, condition: Condition, summary: &str) {
        self.0
            .lock()
            .unwrap()
            .push((credential.into(), condition, true, summary.into()));
    }

    fn clear(&self, credential: &str, condition: Condition) {
        self.0
            .lock()
            .unwrap()
            .push((credential.into(), condition, false, String::new()));
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
        heartbeat: None,
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
        matches!(&events[0], (id, Condition::RotationFailed, true, summary) if id == "db" && summary.contains("panicked")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|(_, c, raised, _)| *c == Condition::RotationFailed && !raised),
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
