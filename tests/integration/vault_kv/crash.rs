//! kill -9 of `keyrotd rotate` at every step boundary of a rotation into KV v2 (and KV v1):
//! consumers read the old value or the new verified one, never a staged one, and `keyrotd run`
//! completes the rotation.

use super::*;

fn crash_and_resume(kv: u8, point: &str) {
    let fx = Fixture::new(kv, &format!("crash-{}", point.replace(':', "-")), "", "");
    let mut crashed = fx.rotate_until(point);
    crashed.kill().unwrap(); // SIGKILL
    crashed.wait().unwrap();

    let history = fx.history();
    let rotation = history
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let (password, writer, _) = fx.latest();
    if password == fx.p0 {
        assert_eq!(writer, None, "{point}");
    } else {
        // Promoted before the crash: the value of this rotation, verified before it.
        assert_eq!(writer.as_deref(), Some(rotation.as_str()), "{point}");
        let verify = history.find("verify    ok");
        assert!(
            verify.is_some() && verify < history.find("promote   start"),
            "{point}: {history}"
        );
    }
    let promoted = ["promote:done", "promote:ok", "revoke", "release"]
        .iter()
        .any(|p| point.starts_with(p));
    assert_eq!(
        password != fx.p0,
        promoted,
        "{point}: promoted exactly at promote"
    );

    let mut daemon = fx.start();
    fx.wait_done(&daemon, 1);
    let metrics = http_get(fx.port, "/metrics").map(|(_, body)| body);
    assert_eq!(daemon.terminate(Duration::from_secs(10)).code(), Some(0));
    assert!(
        daemon.log_text().contains("resuming rotation"),
        "{point}: {}",
        daemon.log_text()
    );
    let (password, writer, _) = fx.latest();
    assert_ne!(password, fx.p0, "{point}: completed");
    assert!(writer.is_some(), "{point}");
    assert!(
        fx.read(".pending").is_none(),
        "{point}: nothing left staged"
    );
    if kv == 1 {
        assert!(fx.read(".previous").is_none(), "{point}: released");
    }
    assert_eq!(fx.status()["consecutive_failures"], 0, "{point}");
    fx.assert_no_secret_leaked(&[password], metrics.as_deref());
}

macro_rules! kill_9_at {
    ($kv:literal: $($name:ident => $point:literal,)*) => {$(
        #[test]
        #[ignore = "needs the test backends: run tests/run.sh"]
        fn $name() {
            crash_and_resume($kv, $point);
        }
    )*};
}

kill_9_at! { 2:
    kv2_kill_9_at_issue_start => "issue:start",
    kv2_kill_9_at_issue_done => "issue:done",
    kv2_kill_9_at_issue_ok => "issue:ok",
    kv2_kill_9_at_stage_start => "stage:start",
    kv2_kill_9_at_stage_done => "stage:done",
    kv2_kill_9_at_stage_ok => "stage:ok",
    kv2_kill_9_at_activate_ok => "activate:ok",
    kv2_kill_9_at_verify_start => "verify:start",
    kv2_kill_9_at_verify_done => "verify:done",
    kv2_kill_9_at_verify_ok => "verify:ok",
    kv2_kill_9_at_promote_start => "promote:start",
    kv2_kill_9_at_promote_done => "promote:done",
    kv2_kill_9_at_promote_ok => "promote:ok",
    kv2_kill_9_at_release_start => "release:start",
    kv2_kill_9_at_release_done => "release:done",
}

kill_9_at! { 1:
    kv1_kill_9_at_stage_done => "stage:done",
    kv1_kill_9_at_verify_ok => "verify:ok",
    kv1_kill_9_at_promote_start => "promote:start",
    kv1_kill_9_at_promote_done => "promote:done",
    kv1_kill_9_at_release_start => "release:start",
}
