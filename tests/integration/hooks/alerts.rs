//! A failing promote hook in the daemon: the `hook_failed` alert fires, the hook metrics record
//! the failure, the rotation stays promoted and is retried with the credential's backoff; once
//! the hook works, the alert resolves and the old key is revoked.

use super::*;

use support::webhook::Receiver;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_hook_raises_hook_failed_and_resolves_it_once_the_hook_works() {
    let receiver = Receiver::start(&[]).await;
    let s = Setup::new(
        "rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"1s\"\n\
         retry = { max_attempts = 20, backoff = \"1s\", max_backoff = \"1s\" }",
        "",
    );
    let flag = s.path("ok.flag");
    let hook = s.script("reload.sh", &format!("test -e {}", flag.display()));
    let text0 = std::fs::read_to_string(s.config()).unwrap();
    let alerts = format!(
        "[alerts]\nrepeat_interval = \"1h\"\ndelivery_backoff = \"200ms\"\n\n\
         [[alerts.channel]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\n\n",
        receiver.url
    );
    let hooks = format!(
        "[[credential.hook]]\nkind = \"exec\"\ncommand = [\"{}\"]\nretry = {{ max_attempts = 1 }}\n",
        hook.display()
    );
    let text = text0.replacen("[[credential]]", &format!("{alerts}[[credential]]"), 1);
    std::fs::write(s.config(), format!("{text}\n{hooks}")).unwrap();
    // A first key while the hook works, so the failing rotation has an old key to revoke.
    std::fs::write(&flag, "").unwrap();
    assert!(s.cli(&["rotate", "api"]).status.success());
    let (first, _) = s.current();
    std::fs::remove_file(&flag).unwrap();
    let daemon = tokio::task::block_in_place(|| {
        // Past the first rotation's grace period, so this run starts the failing one.
        std::thread::sleep(Duration::from_millis(2500));
        let out = s.cli(&["rotate", "api"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success() && err.contains("promote hook 0 (exec)"),
            "{err}"
        );
        Daemon::start(&s.config(), s.port, &s.path("daemon.log"), &[])
    });
    let notes = |status: &str| {
        receiver
            .received()
            .iter()
            .filter(|r| r.body["condition"] == "hook_failed" && r.body["status"] == status)
            .count()
    };
    let fired =
        tokio::task::block_in_place(|| wait_until(Duration::from_secs(20), || notes("firing") > 0));
    assert!(fired, "hook_failed fired; log:\n{}", daemon.log_text());
    let metrics = tokio::task::block_in_place(|| http_get(s.port, "/metrics").unwrap().1);
    assert!(
        metrics
            .contains("keyrotd_hook_runs_total{credential=\"api\",kind=\"exec\",result=\"error\"}")
            && metrics.contains(
                "keyrotd_hook_last_failure_timestamp_seconds{credential=\"api\",hook=\"promote:0\",kind=\"exec\"}"
            ),
        "{metrics}"
    );
    assert!(!s.api.revoked(&first), "the revoke waits for the hook");
    std::fs::write(&flag, "").unwrap();
    let resolved = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(20), || {
            notes("resolved") > 0 && s.api.revoked(&first)
        })
    });
    assert!(
        resolved,
        "resolved and revoked; log:\n{}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    drop(daemon);
    s.leak_scan(&[&metrics, &log]);
}
