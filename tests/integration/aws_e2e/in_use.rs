//! `revoke = "when_unused"` with the IAM rotator on moto: a consumer keeps signing requests with
//! the old key after the promotion, and the old key stays until the consumer switches to the new
//! one, across a kill -9 of the daemon during the wait. Run with `in_use::` as the filter.
//!
//! moto (5.2, started by tests/backends/20-moto.sh with `INITIAL_NO_AUTH_ACTION_COUNT`, so IAM
//! is enforced) records a key's last use at once and to the microsecond for every request
//! signed with it; the first test checks that before relying on it. Real AWS records it late.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// A consumer that calls STS with one key every 200 ms until it is stopped.
struct Consumer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Consumer {
    fn start(key: Key) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let aws = Aws::new();
            let mut calls = 0;
            while !flag.load(Ordering::Relaxed) {
                let _ = aws.sts(&key);
                calls += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            calls
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops using the key (the consumer switched); returns how many calls it made.
    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Aws {
    /// moto's (or IAM's) `LastUsedDate` of a key, in Unix seconds.
    fn last_used(&self, id: &str) -> Option<f64> {
        let out = self
            .rt
            .block_on(
                self.iam()
                    .get_access_key_last_used()
                    .access_key_id(id)
                    .send(),
            )
            .unwrap();
        let date = out.access_key_last_used()?.last_used_date()?;
        Some(date.as_secs_f64())
    }
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn in_use_iam_old_key_stays_until_the_consumer_switches_even_across_kill9() {
    let fx = Fixture::new(
        "inuse",
        "grace = \"1s\"\nrevoke = \"when_unused\"\nrevoke_check_every = \"1s\"",
    );
    // moto records uses of a key even with IAM enforced: a new key has none, a call sets it.
    assert_eq!(fx.aws.last_used(&fx.k0.id), None, "a fresh key has no use");
    let consumer = Consumer::start(fx.k0.clone());
    assert!(
        wait_until(Duration::from_secs(10), || fx
            .aws
            .last_used(&fx.k0.id)
            .is_some()),
        "moto records the consumer's use of K0"
    );

    let out = fx.cli(&["rotate", "iam"]);
    assert!(out.status.success(), "rotate: {}", text(&out.stderr));
    let k1 = fx.current();
    assert_ne!(k1.id, fx.k0.id);
    let mut daemon = fx.start();
    let waiting = wait_until(Duration::from_secs(20), || {
        fx.status()["state"] == "revoke_delayed"
    });
    assert!(waiting, "{}\n{}", fx.status(), daemon.log_text());
    let status = fx.status();
    let why = status["waiting"].as_str().unwrap_or_default().to_owned();
    assert!(
        why.starts_with(&format!("waiting: in use: old key {} used since", fx.k0.id)),
        "{status}"
    );
    let metrics = http_get(fx.port, "/metrics").unwrap().1;
    assert!(
        metrics.contains("keyrotd_credential_status{credential=\"iam\",rotator=\"aws_iam_access_key\",state=\"revoke_delayed\"} 1"),
        "{metrics}"
    );
    let gauge = "keyrotd_credential_old_last_used_timestamp_seconds{credential=\"iam\",rotator=\"aws_iam_access_key\"} ";
    let last_used: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(gauge))
        .unwrap_or_else(|| panic!("no last-used gauge:\n{metrics}"))
        .parse()
        .unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!(
        (now - 30..=now).contains(&last_used),
        "{last_used} vs {now}"
    );
    assert!(
        metrics.contains("keyrotd_credential_revoke_deadline_timestamp_seconds{credential=\"iam\"")
    );

    // Several checks later the old key is still there and works: the consumer still uses it.
    std::thread::sleep(Duration::from_secs(4));
    assert!(fx.keys().contains(&fx.k0.id), "{}", daemon.log_text());
    fx.assert_works(&fx.k0, "the old key while a consumer uses it");

    // kill -9 during the wait: the restarted daemon resumes waiting, never revokes in use.
    daemon.kill9();
    let mut daemon = fx.start();
    std::thread::sleep(Duration::from_secs(4));
    assert!(fx.keys().contains(&fx.k0.id), "{}", daemon.log_text());
    assert_eq!(fx.status()["state"], "revoke_delayed");

    // The consumer switches to the new key: the next checks find K0 unused and revoke it.
    let calls = consumer.stop();
    assert!(calls > 20, "the consumer kept calling: {calls}");
    let revoked = wait_until(Duration::from_secs(20), || {
        fx.status()["state"] == "idle" && fx.keys() == BTreeSet::from([k1.id.clone()])
    });
    assert!(revoked, "{}\n{}", fx.status(), daemon.log_text());
    assert_eq!(daemon.terminate(Duration::from_secs(10)).code(), Some(0));
    fx.assert_refused(&fx.k0, "the old key after revoke");
    fx.assert_works(&k1, "the new key");
    let history = fx.history();
    assert!(history.contains("check_use ok"), "{history}");
    assert!(history.contains("in use: old key"), "{history}");
    assert!(history.contains("unused: old key"), "{history}");
    let metrics_after = fx.status();
    assert!(metrics_after["waiting"].is_null(), "{metrics_after}");
    fx.assert_no_secret_leaked(&[&k1]);
}
