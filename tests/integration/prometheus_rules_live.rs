//! The shipped rules in a real Prometheus server: it scrapes a real HTTP exposition of the
//! contract metrics (served in-process here, with the metric names and labels `keyrotd run`
//! exports) and the test asserts through Prometheus's HTTP API that the alerts fire for the
//! broken credentials only, and go away once the metrics recover.
//!
//! tests/alerts_e2e.rs runs the same rules against a spawned `keyrotd run` (with the SMTP sink and
//! a webhook receiver); this test covers what a live daemon cannot easily show, such as an overdue
//! rotation and a target that is down while another one is up.
//!
//! The rules' `for:` durations (marked `# TUNE`) are rewritten to 0s in a copy, so the test takes
//! seconds; everything else is the shipped file. Needs `prometheus` (Debian package).

use crate::support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{GaugeVec, IntGaugeVec, Opts, Registry, TextEncoder};
use support::free_port;
use support::prometheus::PrometheusServer;

/// The contract gauges, per credential.
struct Exposition {
    registry: Registry,
    issued: GaugeVec,
    max_age: GaugeVec,
    next: GaugeVec,
    status: IntGaugeVec,
    failures: IntGaugeVec,
}

const LABELS: &[&str] = &["credential", "rotator"];

impl Exposition {
    fn new() -> Self {
        let registry = Registry::new();
        let gauge = |name: &str| {
            let g = GaugeVec::new(Opts::new(name, "test"), LABELS).unwrap();
            registry.register(Box::new(g.clone())).unwrap();
            g
        };
        let issued = gauge("keyrotd_credential_issued_timestamp_seconds");
        let max_age = gauge("keyrotd_credential_max_age_seconds");
        let next = gauge("keyrotd_credential_next_rotation_timestamp_seconds");
        let status = IntGaugeVec::new(
            Opts::new("keyrotd_credential_status", "test"),
            &["credential", "rotator", "state"],
        )
        .unwrap();
        registry.register(Box::new(status.clone())).unwrap();
        let failures = IntGaugeVec::new(
            Opts::new("keyrotd_credential_consecutive_failures", "test"),
            LABELS,
        )
        .unwrap();
        registry.register(Box::new(failures.clone())).unwrap();
        Self {
            registry,
            issued,
            max_age,
            next,
            status,
            failures,
        }
    }

    /// Sets one credential's series: issued `age` seconds ago, next rotation at `next_in` seconds
    /// from now (negative: in the past), in `state`, after `failures` consecutive failures.
    fn set(&self, credential: &str, age: f64, next_in: f64, state: &str, failures: i64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let l = [credential, "random"];
        self.issued.with_label_values(&l).set(now - age);
        self.max_age.with_label_values(&l).set(3600.0);
        self.next.with_label_values(&l).set(now + next_in);
        for s in ["idle", "rotating", "grace", "retrying", "failed"] {
            self.status
                .with_label_values(&[credential, "random", s])
                .set(i64::from(s == state));
        }
        self.failures.with_label_values(&l).set(failures);
    }
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn shipped_rules_fire_and_resolve_in_a_real_prometheus() {
    let exposition = Arc::new(Exposition::new());
    exposition.set("healthy", 600.0, 3000.0, "idle", 0);
    exposition.set("db", 7200.0, -7200.0, "idle", 0); // stale and overdue
    exposition.set("api", 600.0, 3000.0, "failed", 3); // failed, failing

    let served = Arc::clone(&exposition);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let served = Arc::clone(&served);
            async move {
                TextEncoder::new()
                    .encode_to_string(&served.registry.gather())
                    .unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    // A second keyrotd target nobody serves: up == 0.
    let down = format!("127.0.0.1:{}", free_port());

    let prometheus = PrometheusServer::start(&[target, down.clone()]).await;
    prometheus
        .wait_for_firing(
            &[
                ("KeyrotdAbsent", &down),
                ("KeyrotdCredentialFailed", "api"),
                ("KeyrotdCredentialStale", "db"),
                ("KeyrotdRotationFailing", "api"),
                ("KeyrotdRotationOverdue", "db"),
            ],
            "broken credentials",
            Duration::from_secs(60),
        )
        .await;

    // Recovery: db rotated, api fixed by hand. Only the missing target still alerts.
    exposition.set("db", 5.0, 3600.0, "idle", 0);
    exposition.set("api", 5.0, 3600.0, "idle", 0);
    prometheus
        .wait_for_firing(
            &[("KeyrotdAbsent", &down)],
            "after recovery",
            Duration::from_secs(60),
        )
        .await;
}
