//! Email alerts through the aiosmtpd sink that tests/run.sh starts (tests/backends/40-smtp.sh):
//! delivery, retries, and STARTTLS never downgraded.

use super::*;

/// Reads the SMTP sink's folder: (recipients header, raw message) of every message mentioning `needle`.
fn sink_messages(needle: &str) -> Vec<String> {
    let dir = support::backend_env("KEYROTD_TEST_SMTP_DIR");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read SMTP sink folder {dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .filter(|m| m.contains(needle))
        .collect()
}

fn smtp_port() -> u16 {
    support::backend_env("KEYROTD_TEST_SMTP_PORT")
        .parse()
        .expect("KEYROTD_TEST_SMTP_PORT is a port number")
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn email_goes_through_a_real_smtp_server() {
    let port = smtp_port();
    let credential = unique("mail");
    let config = config(&format!(
        "repeat_interval = \"1s\"\n[[channel]]\nname = \"mail\"\nkind = \"email\"\nhost = \"127.0.0.1\"\nport = {port}\n\
         tls = \"none\"\nfrom = \"keyrotd <keyrotd@example.test>\"\nto = [\"ops@example.test\", \"oncall@example.test\"]"
    ));
    let registry = Registry::new();
    let shutdown = CancellationToken::new();
    let (alerter, task) = Alerter::start(&config, &registry, shutdown.clone()).unwrap();

    alerter.raise(&credential, Condition::Stale, "age 92d exceeds max_age 90d");
    alerter.raise(&credential, Condition::Stale, "age 92d exceeds max_age 90d");
    eventually("first mail", Duration::from_secs(10), || {
        sink_messages(&credential).len() == 1
    })
    .await;
    eventually("repeat mail", Duration::from_secs(5), || {
        sink_messages(&credential).len() == 2
    })
    .await;
    alerter.clear(&credential, Condition::Stale);
    eventually("resolved mail", Duration::from_secs(10), || {
        sink_messages(&credential).len() == 3
    })
    .await;

    let mails = sink_messages(&credential);
    assert!(
        mails[0].contains("X-Sink-Rcpt: ops@example.test, oncall@example.test"),
        "{}",
        mails[0]
    );
    assert!(
        mails[0].contains(&format!(
            "Subject: [keyrotd] FIRING critical: {credential} stale"
        )),
        "{}",
        mails[0]
    );
    assert!(
        mails[0].contains("summary: age 92d exceeds max_age 90d"),
        "{}",
        mails[0]
    );
    assert!(
        mails[0].contains("From: keyrotd <keyrotd@example.test>"),
        "{}",
        mails[0]
    );
    assert!(mails[1].contains("(still active)"), "{}", mails[1]);
    assert!(
        mails[2].contains(&format!("Subject: [keyrotd] RESOLVED: {credential} stale")),
        "{}",
        mails[2]
    );
    assert!(mails[2].contains("resolved_at: "), "{}", mails[2]);
    // The sink has the message before the SMTP session ends and the delivery is counted.
    eventually("three deliveries counted", Duration::from_secs(5), || {
        deliveries(&registry, "mail", "delivered") == 3
    })
    .await;
    assert_eq!(deliveries(&registry, "mail", "delivered"), 3);

    shutdown.cancel();
    task.await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        sink_messages(&credential).len(),
        3,
        "no repeat after shutdown"
    );
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn email_failure_is_retried_and_counted() {
    // Port of the real sink plus a closed port: only the closed one fails.
    let port = smtp_port();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let credential = unique("mailfail");
    let email = "kind = \"email\"\nhost = \"127.0.0.1\"\ntls = \"none\"\nfrom = \"k@example.test\"\nto = [\"o@example.test\"]\n";
    let config = config(&format!(
        "delivery_attempts = 2\ndelivery_backoff = \"50ms\"\n\
         [[channel]]\nname = \"good\"\nport = {port}\n{email}\
         [[channel]]\nname = \"bad\"\nport = {closed}\n{email}"
    ));
    let registry = Registry::new();
    let shutdown = CancellationToken::new();
    let (alerter, task) = Alerter::start(&config, &registry, shutdown.clone()).unwrap();

    alerter.raise(&credential, Condition::RotationFailed, "verify failed");
    eventually("bad channel fails", Duration::from_secs(10), || {
        deliveries(&registry, "bad", "failed") == 1
    })
    .await;
    eventually("good channel delivers", Duration::from_secs(10), || {
        deliveries(&registry, "good", "delivered") == 1
    })
    .await;
    assert_eq!(sink_messages(&credential).len(), 1);

    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn starttls_is_required_never_downgraded() {
    // The sink offers no STARTTLS: a `starttls` channel must fail rather than send in plain text.
    let port = smtp_port();
    let credential = unique("starttls");
    let config = config(&format!(
        "delivery_attempts = 1\n[[channel]]\nname = \"tls\"\nkind = \"email\"\nhost = \"127.0.0.1\"\nport = {port}\n\
         tls = \"starttls\"\nfrom = \"k@example.test\"\nto = [\"o@example.test\"]"
    ));
    let registry = Registry::new();
    let shutdown = CancellationToken::new();
    let (alerter, task) = Alerter::start(&config, &registry, shutdown.clone()).unwrap();

    alerter.raise(&credential, Condition::Stale, "s");
    eventually("delivery fails", Duration::from_secs(10), || {
        deliveries(&registry, "tls", "failed") == 1
    })
    .await;
    assert!(
        sink_messages(&credential).is_empty(),
        "nothing may reach a server without STARTTLS"
    );

    shutdown.cancel();
    task.await.unwrap();
}
