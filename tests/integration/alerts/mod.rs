//! Alert delivery against real servers: an in-process HTTP receiver on 127.0.0.1 and the aiosmtpd
//! sink started by tests/run.sh (tests/backends/40-smtp.sh). Nothing is mocked: the Alerter talks
//! HTTP and SMTP over loopback exactly as in production.

use crate::support;

use std::time::{Duration, Instant};

use keyrotd::alert::{Alerter, AlertsConfig, Condition};
use prometheus::Registry;
use support::webhook::{Receiver, ReceiverState};
use tokio_util::sync::CancellationToken;

mod email;

/// A unique credential id, so that tests sharing the SMTP sink never see each other's mail.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

fn config(toml_text: &str) -> AlertsConfig {
    let config: AlertsConfig = toml::from_str(toml_text).expect("test config parses");
    config.validate().expect("test config is valid");
    config
}

fn deliveries(registry: &Registry, channel: &str, result: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "keyrotd_alert_deliveries_total")
        .flat_map(|f| f.get_metric())
        .find(|m| {
            let label = |n: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == n)
                    .map(|l| l.value().to_owned())
            };
            label("channel").as_deref() == Some(channel)
                && label("result").as_deref() == Some(result)
        })
        .map(|m| m.get_counter().get_value() as u64)
        .unwrap_or(0)
}

async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes a secret to a file and returns its `file:` reference.
fn secret_file(dir: &tempfile::TempDir, name: &str, value: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, format!("{value}\n")).unwrap();
    format!("file:{}", path.display())
}

#[tokio::test]
async fn webhook_fires_once_repeats_and_resolves() {
    let receiver = Receiver::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let token = secret_file(&dir, "token", "Bearer test-token-123");
    let config = config(&format!(
        "repeat_interval = \"1s\"\n[[channel]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\nauthorization = \"{token}\"",
        receiver.url
    ));
    let registry = Registry::new();
    let shutdown = CancellationToken::new();
    let (alerter, task) = Alerter::start(&config, &registry, shutdown.clone()).unwrap();

    alerter.raise("db-main", Condition::Stale, "age 92d exceeds max_age 90d");
    alerter.raise(
        "db-main",
        Condition::Stale,
        "age 92d exceeds max_age 90d (again)",
    );
    eventually("first firing", Duration::from_secs(5), || {
        receiver.received().len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        receiver.received().len(),
        1,
        "a repeated raise must not send anything"
    );

    let first = &receiver.received()[0];
    assert_eq!(
        first.authorization.as_deref(),
        Some("Bearer test-token-123")
    );
    let b = &first.body;
    assert!(
        !b.to_string().contains("test-token-123"),
        "no secret in the payload: {b}"
    );
    assert_eq!(b["version"], 1);
    assert_eq!(b["status"], "firing");
    assert_eq!(b["credential"], "db-main");
    assert_eq!(b["condition"], "stale");
    assert_eq!(b["severity"], "critical");
    assert_eq!(b["summary"], "age 92d exceeds max_age 90d");
    assert_eq!(b["repeat"], false);
    assert!(b["resolved_at"].is_null());
    for field in ["started_at", "sent_at"] {
        let text = b[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} missing: {b}"));
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap_or_else(|e| panic!("{field} `{text}`: {e}"));
    }

    // The repeat comes from the timer after repeat_interval, with the latest summary.
    eventually(
        "a repeat after repeat_interval",
        Duration::from_secs(3),
        || receiver.received().len() == 2,
    )
    .await;
    let repeat = &receiver.received()[1].body;
    assert_eq!(repeat["status"], "firing");
    assert_eq!(repeat["repeat"], true);
    assert_eq!(repeat["summary"], "age 92d exceeds max_age 90d (again)");
    assert_eq!(repeat["started_at"], b["started_at"]);

    alerter.clear("db-main", Condition::Stale);
    alerter.clear("db-main", Condition::Stale);
    alerter.clear("db-main", Condition::RotationFailed);
    eventually("resolved", Duration::from_secs(5), || {
        receiver.received().len() == 3
    })
    .await;
    let resolved = &receiver.received()[2].body;
    assert_eq!(resolved["status"], "resolved");
    assert!(resolved["resolved_at"].is_string());

    // Cleared: no more repeats, no second resolved.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        receiver.received().len(),
        3,
        "nothing after resolved: {:?}",
        receiver.received()
    );
    assert_eq!(deliveries(&registry, "hook", "delivered"), 3);
    assert_eq!(deliveries(&registry, "hook", "failed"), 0);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("alerter stops")
        .unwrap();
}

#[tokio::test]
async fn webhook_500_is_retried_until_delivered() {
    let receiver = Receiver::start(&[500, 503]).await;
    let config = config(&format!(
        "delivery_backoff = \"50ms\"\n[[channel]]\nname = \"flaky\"\nkind = \"webhook\"\nurl = \"{}\"",
        receiver.url
    ));
    let registry = Registry::new();
    let shutdown = CancellationToken::new();
    let (alerter, task) = Alerter::start(&config, &registry, shutdown.clone()).unwrap();

    alerter.raise(
        "api-key",
        Condition::RotationFailed,
        "verify failed 5 times",
    );
    eventually("delivered after two 5xx", Duration::from_secs(5), || {
        deliveries(&registry, "flaky", "delivered") == 1
    })
    .await;
    let received = receiver.received();
    assert_eq!(received.len(), 3, "two failed attempts then one success");
    assert!(received
        .iter()
        .all(|r| r.body["credential"] == "api-key" && r.body["status"] == "firing"));
    assert_eq!(deliveries(&registry, "flaky", "failed"), 0);

    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn delivery_failures_are_counted_and_never_block_the_caller() {
    let always_500 = Receiver::start(&[500; 100]).await;
    let refused_400 = Receiver::start(&[400; 100]).await;
    // A port nobody listens on: bind, note the port, close.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = config(&format!(
        "delivery_attempts = 3\ndelivery_backoff = \"20ms\"\n\
         [[channel]]\nname = \"down\"\nkind = \"webhook\"\nurl = \"{}\"\n\
         [[channel]]\nname = \"refuses\"\nkind = \"webhook\"\nurl = \"{}\"\n\
         [[channel]]\nname = \"nobody\"\nkind = \"webhook\"\nurl = \"http://{closed}/hook\"",
        always_500.url, refused_400.url
    ));
    let registry = Registry::new();
    let shutdown = CancellationToken::new();
    let (alerter, task) = Alerter::start(&config, &registry, shutdown.clone()).unwrap();

    // Every label combination exists from the start, so rate() over it works at once.
    assert_eq!(deliveries_present(&registry), 9);

    const N: u64 = 20;
    let started = Instant::now();
    for i in 0..N {
        alerter.raise(
            &format!("cred-{i}"),
            Condition::RevokeFailed,
            "revoke returned an error",
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "raise() must not wait for delivery"
    );

    eventually(
        "all notifications accounted for",
        Duration::from_secs(20),
        || {
            ["down", "refuses", "nobody"].iter().all(|c| {
                deliveries(&registry, c, "failed")
                    + deliveries(&registry, c, "dropped")
                    + deliveries(&registry, c, "delivered")
                    == N
            })
        },
    )
    .await;
    for channel in ["down", "refuses", "nobody"] {
        assert_eq!(deliveries(&registry, channel, "delivered"), 0, "{channel}");
        assert_eq!(deliveries(&registry, channel, "failed"), N, "{channel}");
    }
    // 5xx is retried (3 attempts each); 400 is permanent (1 attempt each).
    assert_eq!(always_500.received().len(), 3 * N as usize);
    assert_eq!(refused_400.received().len(), N as usize);

    shutdown.cancel();
    task.await.unwrap();
}

fn deliveries_present(registry: &Registry) -> usize {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "keyrotd_alert_deliveries_total")
        .map(|f| f.get_metric().len())
        .sum()
}

#[tokio::test]
async fn slack_format_is_a_single_text_field() {
    let receiver = Receiver::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    // The Slack URL embeds a token, so the config names it by reference.
    let url = secret_file(&dir, "slack-url", &receiver.url);
    let config = config(&format!(
        "[[channel]]\nname = \"chat\"\nkind = \"slack\"\nurl = \"{url}\""
    ));
    let registry = Registry::new();
    let shutdown = CancellationToken::new();
    let (alerter, task) = Alerter::start(&config, &registry, shutdown.clone()).unwrap();

    alerter.raise(
        "ci-token",
        Condition::AutomationStopped,
        "retries exhausted <after 5 attempts> & stopped",
    );
    alerter.clear("ci-token", Condition::AutomationStopped);
    eventually("firing and resolved", Duration::from_secs(5), || {
        receiver.received().len() == 2
    })
    .await;

    let received = receiver.received();
    for r in &received {
        let object = r.body.as_object().expect("a JSON object");
        assert_eq!(
            object.keys().collect::<Vec<_>>(),
            ["text"],
            "Slack format has only `text`: {}",
            r.body
        );
    }
    let firing = received[0].body["text"].as_str().unwrap();
    assert!(
        firing.contains("*FIRING*") && firing.contains("[critical]"),
        "{firing}"
    );
    assert!(
        firing.contains("`ci-token`") && firing.contains("automation_stopped"),
        "{firing}"
    );
    assert!(
        firing.contains("&lt;after 5 attempts&gt; &amp; stopped"),
        "Slack control characters escaped: {firing}"
    );
    let resolved = received[1].body["text"].as_str().unwrap();
    assert!(
        resolved.contains("*RESOLVED*") && resolved.contains("`ci-token`"),
        "{resolved}"
    );

    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn routes_select_channels_by_severity_and_credential() {
    let pager = Receiver::start(&[]).await;
    let chat = Receiver::start(&[]).await;
    let config = config(&format!(
        "[[channel]]\nname = \"pager\"\nkind = \"webhook\"\nurl = \"{}\"\n\
         [[channel]]\nname = \"chat\"\nkind = \"webhook\"\nurl = \"{}\"\n\
         [[route]]\nseverity = \"critical\"\nchannels = [\"pager\"]\n\
         [[route]]\ncredentials = [\"db-main\"]\nchannels = [\"chat\"]",
        pager.url, chat.url
    ));
    let registry = Registry::new();
    let shutdown = CancellationToken::new();
    let (alerter, task) = Alerter::start(&config, &registry, shutdown.clone()).unwrap();

    alerter.raise("db-main", Condition::Stale, "critical, db-main: both");
    alerter.raise("other", Condition::Stale, "critical, other: pager");
    alerter.raise("db-main", Condition::NearMaxAge, "warning, db-main: chat");
    alerter.raise("other", Condition::NearMaxAge, "warning, other: nobody");
    eventually("pager gets 2", Duration::from_secs(5), || {
        pager.received().len() == 2
    })
    .await;
    eventually("chat gets 2", Duration::from_secs(5), || {
        chat.received().len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let summaries = |r: &Receiver| {
        let mut s: Vec<String> = r
            .received()
            .iter()
            .map(|x| x.body["summary"].as_str().unwrap().to_owned())
            .collect();
        s.sort();
        s
    };
    assert_eq!(
        summaries(&pager),
        ["critical, db-main: both", "critical, other: pager"]
    );
    assert_eq!(
        summaries(&chat),
        ["critical, db-main: both", "warning, db-main: chat"]
    );

    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn shutdown_flushes_queued_notifications() {
    let receiver = Receiver::start(&[]).await;
    let config = config(&format!(
        "[[channel]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"",
        receiver.url
    ));
    let registry = Registry::new();
    let shutdown = CancellationToken::new();
    let (alerter, task) = Alerter::start(&config, &registry, shutdown.clone()).unwrap();

    alerter.raise("a", Condition::RotationFailed, "s");
    alerter.raise("b", Condition::RotationFailed, "s");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("bounded flush")
        .unwrap();
    assert_eq!(
        receiver.received().len(),
        2,
        "raised before shutdown, delivered before the task ends"
    );
    assert_eq!(deliveries(&registry, "hook", "delivered"), 2);

    // After shutdown the handle still never fails or blocks; the event is counted as dropped.
    alerter.raise("c", Condition::RotationFailed, "s");
    assert_eq!(deliveries(&registry, "hook", "dropped"), 1);
}

#[tokio::test]
async fn shutdown_flush_is_bounded_when_a_receiver_hangs() {
    let receiver = Receiver::start_with(ReceiverState {
        hang: true,
        ..Default::default()
    })
    .await;
    let config = config(&format!(
        "[[channel]]\nname = \"stuck\"\nkind = \"webhook\"\nurl = \"{}\"\ntimeout = \"60s\"",
        receiver.url
    ));
    let registry = Registry::new();
    let shutdown = CancellationToken::new();
    let (alerter, task) = Alerter::start(&config, &registry, shutdown.clone()).unwrap();

    alerter.raise("a", Condition::Stale, "s");
    alerter.raise("b", Condition::Stale, "s");
    eventually("first request in flight", Duration::from_secs(5), || {
        receiver.received().len() == 1
    })
    .await;
    let started = Instant::now();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("flush deadline ends the task")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "flush took {:?}",
        started.elapsed()
    );
    assert_eq!(
        deliveries(&registry, "stuck", "dropped"),
        2,
        "in-flight and queued notifications are counted"
    );
}

#[tokio::test]
async fn engine_events_raise_and_clear_conditions() {
    use keyrotd::event::EventSink;
    let receiver = Receiver::start(&[]).await;
    let config = config(&format!(
        "[[channel]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"",
        receiver.url
    ));
    let registry = Registry::new();
    let shutdown = CancellationToken::new();
    let (alerter, task) = Alerter::start(&config, &registry, shutdown.clone()).unwrap();
    let sink: &dyn EventSink = &alerter;

    sink.raise(
        "db",
        Condition::RotationFailed,
        "rotation failed: verify refused",
    );
    sink.raise(
        "db",
        Condition::RotationFailed,
        "rotation failed: verify refused",
    );
    sink.raise("db", Condition::AutomationStopped, "retries exhausted");
    sink.clear("db", Condition::RevokeFailed);
    sink.clear("db", Condition::AutomationStopped);
    sink.clear("db", Condition::RotationFailed);
    eventually("four notifications", Duration::from_secs(5), || {
        receiver.received().len() == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let seen: Vec<(String, String)> = receiver
        .received()
        .iter()
        .map(|r| {
            (
                r.body["condition"].as_str().unwrap().to_owned(),
                r.body["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("rotation_failed", "firing"),
        ("automation_stopped", "firing"),
        ("automation_stopped", "resolved"),
        ("rotation_failed", "resolved"),
    ];
    assert_eq!(seen, expected.map(|(c, s)| (c.to_owned(), s.to_owned())));

    shutdown.cancel();
    task.await.unwrap();
}
