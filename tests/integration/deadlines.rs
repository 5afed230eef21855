//! Deadlines the daemon enforces itself, against a server that accepts the connection and never
//! answers (`keyrotd_test_support::silent`): the engine bounds every step even for a plugin that forgets its
//! own timeouts, an abort interrupts a hung step so shutdown never waits for it, and alert
//! delivery gives up and retries without holding up a rotation. Every test runs under an outer
//! guard, so a regression fails instead of hanging the suite.

use crate::support;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use keyrotd::alert::{Alerter, AlertsConfig};
use keyrotd::config::CredentialSpec;
use keyrotd::engine::{Engine, EngineMetrics, Outcome};
use keyrotd::event::EventSink;
use keyrotd::protocol::{Phase, Trigger};
use keyrotd::state::{SqliteState, StateStore, Status};
use keyrotd_plugin::{Attrs, Credential, ProviderError, Rotator, StepContext, Store};
use keyrotd_providers::RotatorConfig;
use prometheus::Registry;
use support::silent::Silent;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

const GUARD: Duration = Duration::from_secs(20);

async fn guarded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: still hanging after {GUARD:?}"))
}

/// A rotator that forgets its own timeouts: its issue waits for the server's answer however
/// long that takes. Once `heal`ed, it issues like the `random` rotator.
struct Forgetful {
    server: SocketAddr,
    timeout: Duration,
    healed: AtomicBool,
    random: Arc<dyn Rotator>,
}

impl Forgetful {
    fn new(server: SocketAddr, timeout: Duration) -> Arc<Self> {
        let random: RotatorConfig =
            serde_json::from_value(serde_json::json!({"kind": "random", "field": "password"}))
                .unwrap();
        Arc::new(Self {
            server,
            timeout,
            healed: AtomicBool::new(false),
            random: random.build().unwrap(),
        })
    }

    fn heal(&self) {
        self.healed.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl Rotator for Forgetful {
    fn kind(&self) -> &'static str {
        "forgetful"
    }
    fn secret_field(&self) -> &str {
        "password"
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    async fn issue(
        &self,
        ctx: StepContext<'_>,
        current: Option<&Credential>,
    ) -> Result<Credential, ProviderError> {
        if !self.healed.load(Ordering::SeqCst) {
            let mut socket = tokio::net::TcpStream::connect(self.server)
                .await
                .map_err(|e| ProviderError::io("connecting", &e))?;
            let mut answer = [0u8; 1];
            socket
                .read(&mut answer)
                .await
                .map_err(|e| ProviderError::io("reading the answer", &e))?;
        }
        self.random.issue(ctx, current).await
    }
    async fn verify(&self, ctx: StepContext<'_>, new: &Credential) -> Result<(), ProviderError> {
        self.random.verify(ctx, new).await
    }
    async fn abandon(
        &self,
        _: StepContext<'_>,
        _: Option<&Attrs>,
        _: Option<&Credential>,
    ) -> Result<(), ProviderError> {
        Ok(())
    }
    async fn revoke(&self, _: StepContext<'_>, _: &Attrs) -> Result<(), ProviderError> {
        Ok(())
    }
}

/// One credential `db` with a file store, loaded from an inventory as the daemon loads it.
struct Fixture {
    dir: tempfile::TempDir,
    state: Arc<SqliteState>,
    spec: CredentialSpec,
    store: Arc<dyn Store>,
}

impl Fixture {
    fn new(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[daemon]\nstate = \"sqlite:state.db\"\n{extra}\n[[credential]]\nid = \"db\"\n\
             rotator = {{ kind = \"random\", field = \"password\" }}\n\
             store = {{ kind = \"file\", path = \"{}\", format = \"json\" }}\n\
             rotate_every = \"1d\"\nmax_age = \"2d\"\ngrace = \"1h\"\n\
             retry = {{ max_attempts = 5, backoff = \"1s\", max_backoff = \"2s\" }}\n",
            dir.path().join("db.json").display()
        );
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        let mut inventory = keyrotd::config::load(&path).expect("the inventory loads");
        let spec = inventory.credentials.remove(0);
        let state = Arc::new(SqliteState::open(&dir.path().join("state.db")).unwrap());
        let store = spec.store.build().unwrap();
        Self {
            dir,
            state,
            spec,
            store,
        }
    }

    fn engine(&self, registry: &Registry, events: Option<Arc<dyn EventSink>>) -> Engine {
        let metrics = EngineMetrics::register(registry).unwrap();
        Engine::new(
            self.state.clone(),
            metrics,
            events,
            CancellationToken::new(),
        )
    }

    async fn run(&self, engine: &Engine, rotator: &Arc<Forgetful>, trigger: Trigger) -> Outcome {
        let rotator: Arc<dyn Rotator> = rotator.clone();
        let run = engine.run_with(&self.spec, rotator, self.store.clone(), trigger);
        guarded("the rotation", run).await.unwrap().0
    }

    /// The journal of the latest rotation: `step event detail` lines.
    async fn journal(&self) -> Vec<String> {
        let history = self.state.history(Some("db"), 1).await.unwrap();
        let (_, steps) = history.into_iter().next().expect("a rotation");
        steps
            .into_iter()
            .map(|s| format!("{} {} {}", s.step, s.event, s.detail.unwrap_or_default()))
            .collect()
    }
}

fn counter(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .find(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| m.get_counter().get_value() as u64)
        .unwrap_or(0)
}

#[tokio::test]
async fn a_step_past_its_plugins_timeout_fails_as_transient_and_the_retry_succeeds() {
    let server = Silent::start();
    let f = Fixture::new("");
    let registry = Registry::new();
    let engine = f.engine(&registry, None);
    let rotator = Forgetful::new(server.addr, Duration::from_secs(1));

    let started = Instant::now();
    let Outcome::Failed { error, .. } = f.run(&engine, &rotator, Trigger::Schedule).await else {
        panic!("a step without an answer must fail")
    };
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        error.contains("credential `db`")
            && error.contains("step issue")
            && error.contains("no answer within 1s"),
        "{error}"
    );
    let record = f.state.credential("db").await.unwrap().unwrap();
    assert_eq!(
        record.status,
        Status::Retrying,
        "transient: retried with backoff"
    );
    assert_eq!(record.consecutive_failures, 1);
    assert!(record.next_attempt_at.is_some());
    assert_eq!(
        counter(
            &registry,
            "keyrotd_rotations_total",
            &[("result", "failed")]
        ),
        1
    );
    let journal = f.journal().await;
    assert!(
        journal
            .iter()
            .any(|l| l.starts_with("issue error") && l.contains("no answer within 1s")),
        "{journal:?}"
    );

    rotator.heal();
    let outcome = f.run(&engine, &rotator, Trigger::Retry).await;
    assert!(matches!(outcome, Outcome::Promoted { .. }), "{outcome:?}");
    let record = f.state.credential("db").await.unwrap().unwrap();
    assert_eq!(record.consecutive_failures, 0);
}

#[tokio::test]
async fn an_abort_interrupts_a_hung_step_and_the_rotation_resumes_from_the_journal() {
    let server = Silent::start();
    let f = Fixture::new("");
    let registry = Registry::new();
    // The plugin's own deadline is far away: only the abort can end the step.
    let rotator = Forgetful::new(server.addr, Duration::from_secs(3600));
    let (shutdown, abort) = (CancellationToken::new(), CancellationToken::new());
    let engine = Engine::new(
        f.state.clone(),
        EngineMetrics::register(&registry).unwrap(),
        None,
        shutdown.clone(),
    )
    .abort_steps_on(abort.clone());
    let stop = async {
        while server.accepted() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(300)).await;
        abort.cancel();
    };
    let (outcome, ()) = tokio::join!(f.run(&engine, &rotator, Trigger::Schedule), stop);
    assert!(matches!(outcome, Outcome::Parked { .. }), "{outcome:?}");
    let journal = f.journal().await;
    assert!(
        journal.iter().any(|l| l.starts_with("issue interrupted")),
        "{journal:?}"
    );
    let open = f
        .state
        .open_rotation("db")
        .await
        .unwrap()
        .expect("still open");
    assert_eq!(
        open.owner, None,
        "parked: the next run takes it over at once"
    );
    assert_eq!(open.phase, Phase::Issuing);

    rotator.heal();
    let engine = f.engine(&Registry::new(), None);
    let outcome = f.run(&engine, &rotator, Trigger::Schedule).await;
    assert!(matches!(outcome, Outcome::Promoted { .. }), "{outcome:?}");
    assert!(std::fs::read_to_string(f.dir.path().join("db.json")).is_ok());
}

/// An alerter whose only channel is `channel` (TOML), retrying after 1s.
fn alerter(channel: &str, registry: &Registry) -> (Alerter, CancellationToken) {
    let config: AlertsConfig = toml::from_str(&format!(
        "delivery_attempts = 2\ndelivery_backoff = \"1s\"\n[[channel]]\n{channel}"
    ))
    .unwrap();
    config.validate().unwrap();
    let shutdown = CancellationToken::new();
    let (alerter, _task) = Alerter::start(&config, registry, shutdown.clone()).unwrap();
    (alerter, shutdown)
}

/// A rotation that fails (its provider is silent) raises an alert on a silent channel: the
/// rotation is not held up, and delivery gives up on each attempt, retries, then counts a failure.
async fn delivery_gives_up_and_retries_without_blocking(
    channel: &str,
    name: &str,
    server: &Silent,
) {
    let registry = Registry::new();
    let (alerter, shutdown) = alerter(channel, &registry);
    let f = Fixture::new("");
    let engine = f.engine(&Registry::new(), Some(Arc::new(alerter)));
    let provider = Silent::start();
    let rotator = Forgetful::new(provider.addr, Duration::from_secs(1));
    let started = Instant::now();
    let outcome = f.run(&engine, &rotator, Trigger::Schedule).await;
    assert!(matches!(outcome, Outcome::Failed { .. }), "{outcome:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the rotation waited for alert delivery: {:?}",
        started.elapsed()
    );
    let failed = || {
        counter(
            &registry,
            "keyrotd_alert_deliveries_total",
            &[("channel", name), ("result", "failed")],
        )
    };
    guarded("alert delivery giving up", async {
        while failed() == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        server.accepted() >= 2,
        "each attempt reached the server and was retried: {}",
        server.accepted()
    );
    shutdown.cancel();
}

#[tokio::test]
async fn webhook_delivery_to_a_silent_receiver_gives_up_and_retries() {
    let server = Silent::start();
    let channel = format!(
        "name = \"hook\"\nkind = \"webhook\"\nurl = \"{}/hook\"\ntimeout = \"1s\"",
        server.url()
    );
    delivery_gives_up_and_retries_without_blocking(&channel, "hook", &server).await;
}

#[tokio::test]
async fn smtp_delivery_to_a_silent_server_gives_up_and_retries() {
    let server = Silent::start();
    let channel = format!(
        "name = \"mail\"\nkind = \"email\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         from = \"keyrotd <keyrotd@example.com>\"\nto = [\"ops@example.com\"]\ntimeout = \"1s\"",
        server.addr.port()
    );
    delivery_gives_up_and_retries_without_blocking(&channel, "mail", &server).await;
}

#[test]
fn shutdown_timeout_is_read_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let load = |daemon: &str| {
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            format!(
                "[daemon]\n{daemon}\n[[credential]]\nid = \"a\"\nrotator = {{ kind = \"random\" }}\n\
                 store = {{ kind = \"file\", path = \"/tmp/x/a\" }}\nrotate_every = \"1d\"\nmax_age = \"2d\"\n"
            ),
        )
        .unwrap();
        keyrotd::config::load(Path::new(&path))
    };
    let default = load("").unwrap();
    assert_eq!(default.daemon.shutdown_timeout, Duration::from_secs(20));
    let set = load("shutdown_timeout = \"5s\"").unwrap();
    assert_eq!(set.daemon.shutdown_timeout, Duration::from_secs(5));
    for (bad, why) in [
        ("shutdown_timeout = \"2h\"", "must be at most"),
        ("shutdown_timeout = \"0s\"", "longer than zero"),
        ("shutdown_timeout = \"soon\"", "daemon.shutdown_timeout"),
    ] {
        let errors = load(bad).unwrap_err().to_string();
        assert!(
            errors.contains("daemon.shutdown_timeout") && errors.contains(why),
            "{bad}: {errors}"
        );
    }
}
