//! Hooks through `keyrotd rotate`: a "systemctl reload" that really reloads the consumer, the
//! exec environment, a failing hook (the rotation stays promoted and the revoke waits, or
//! proceeds with `revoke_after_hook_failure`), a hanging hook killed with its process group, and
//! kill -9 between `promote ok` and the hooks.

use super::*;

const NOW: &str = "rotate_every = \"30d\"\nmax_age = \"40d\"\ngrace = \"0s\"";

fn ok(out: &Output) -> bool {
    out.status.success()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A fake `systemctl` that records its argv and reloads the consumer, returning once the
/// consumer holds the stored key (as `systemctl reload` returns once the unit reloaded); and an
/// exec hook that records its environment.
fn systemd_and_env(s: &Setup) -> String {
    let dir = s.dir.path().display();
    let systemctl = s.script(
        "systemctl",
        &format!(
            "echo \"$@\" >> {dir}/systemctl.argv\nkill -HUP $(cat {dir}/consumer.pid)\n\
             for i in $(seq 100); do cmp -s {dir}/out/key.json {dir}/consumer.current && exit 0; sleep 0.05; done\nexit 1"
        ),
    );
    format!(
        "[[credential.hook]]\nkind = \"systemd\"\nunit = \"consumer@blue.service\"\nsystemctl = \"{}\"\n\n\
         [[credential.hook]]\nkind = \"exec\"\ncommand = [\"/usr/bin/env\", \"-0\"]\nenv = {{ FOO = \"bar\" }}\n\n\
         [[credential.hook]]\nkind = \"exec\"\ncommand = [\"/bin/sh\", \"-c\", \"/usr/bin/env > {dir}/hook.env\", \"--\", \"a b\"]\n",
        systemctl.display()
    )
}

#[test]
fn a_systemctl_reload_hook_switches_the_consumer_before_each_revoke_without_a_failed_use() {
    let s = Setup::new(NOW, "");
    let hooks = systemd_and_env(&s);
    let text0 = std::fs::read_to_string(s.config()).unwrap();
    std::fs::write(s.config(), format!("{text0}\n{hooks}")).unwrap();
    let consumer = Consumer::start(&s);
    let mut outputs = String::new();
    for _ in 0..4 {
        let out = s.cli(&["rotate", "api"]);
        assert!(ok(&out), "{}", text(&out));
        outputs.push_str(&text(&out));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (uses, failures) = (
        consumer.uses.load(Ordering::SeqCst),
        consumer.failures.load(Ordering::SeqCst),
    );
    drop(consumer);
    assert!(uses > 5, "{uses}");
    assert_eq!(failures, 0, "no use failed in {uses}");
    assert_eq!(revokes_follow_reloads(&s), 3, "three old keys revoked");
    let argv = std::fs::read_to_string(s.path("systemctl.argv")).unwrap();
    assert_eq!(argv, "reload -- consumer@blue.service\n".repeat(4));
    // The environment: what is configured, the ids and the public attributes; nothing else.
    let env = std::fs::read_to_string(s.path("hook.env")).unwrap();
    let mut names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .filter(|k| !["PWD", "SHLVL", "_", "OLDPWD"].contains(k))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "KEYROTD_ATTR_KEY_ID",
            "KEYROTD_CREDENTIAL_ID",
            "KEYROTD_ROTATION_ID"
        ],
        "{env}"
    );
    let (id, secret) = s.current();
    assert!(
        env.contains(&format!("KEYROTD_ATTR_KEY_ID={id}\n")),
        "{env}"
    );
    assert!(env.contains("KEYROTD_CREDENTIAL_ID=api\n"), "{env}");
    assert!(
        !env.contains(&secret),
        "the secret is never in a hook's environment"
    );
    s.leak_scan(&[&outputs]);
}

/// The row of `status ID`'s hook table for the one hook.
fn hook_row(table: &str) -> String {
    let row = table
        .lines()
        .find(|l| l.starts_with("promote hook 0 (exec)"));
    row.unwrap_or_default().to_owned()
}

#[test]
fn a_failing_hook_keeps_the_rotation_promoted_and_the_revoke_waits_until_it_succeeds() {
    let s = Setup::new(NOW, "");
    let flag = s.path("ok.flag");
    let hook = s.script("reload.sh", &format!("test -e {}", flag.display()));
    let text0 = std::fs::read_to_string(s.config()).unwrap();
    let hooks = format!(
        "[[credential.hook]]\nkind = \"exec\"\ncommand = [\"{}\"]\nretry = {{ max_attempts = 2, backoff = \"1s\", max_backoff = \"1s\" }}\n",
        hook.display()
    );
    std::fs::write(s.config(), format!("{text0}\n{hooks}")).unwrap();
    std::fs::write(&flag, "").unwrap();
    assert!(ok(&s.cli(&["rotate", "api"])));
    let (first, _) = s.current();
    std::fs::remove_file(&flag).unwrap();
    let out = s.cli(&["rotate", "api"]);
    assert!(!ok(&out), "{}", text(&out));
    assert!(
        text(&out).contains("promote hook 0 (exec)"),
        "{}",
        text(&out)
    );
    let (second, _) = s.current();
    assert_ne!(first, second, "the new key stays promoted");
    assert!(
        !s.api.revoked(&first),
        "the old key is not revoked while the hook fails"
    );
    let tail: Vec<String> = s.events(&["promote", "notify", "revoke"]);
    assert_eq!(
        &tail[tail.len() - 5..],
        [
            "promote ok",
            "notify start",
            "notify error",
            "notify start",
            "notify error"
        ],
        "two attempts, no revoke: {tail:?}"
    );
    let status = s.cli(&["status", "--json", "api"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status[0]["state"], "retrying", "{status}");
    let hook = &status[0]["hooks"][0];
    assert_eq!(hook["hook"], "promote hook 0 (exec)", "{status}");
    assert_eq!(hook["result"], "error", "{status}");
    assert!(
        hook["detail"]
            .as_str()
            .unwrap()
            .contains("exited with status 1"),
        "{status}"
    );
    let table = String::from_utf8(s.cli(&["status", "api"]).stdout).unwrap();
    assert!(hook_row(&table).contains(" error "), "{table}");
    assert!(s
        .cli(&["status", "--json"])
        .stdout
        .windows(7)
        .all(|w| w != b"\"hooks\""));
    // The hook heals: the retry runs it, then revokes.
    std::fs::write(&flag, "").unwrap();
    let out = s.cli(&["rotate", "api"]);
    assert!(ok(&out), "{}", text(&out));
    assert!(s.api.revoked(&first));
    let events = s.events(&["notify", "revoke"]);
    let revoke = events.iter().position(|e| e == "revoke start").unwrap();
    assert_eq!(events[revoke - 1], "notify ok", "{events:?}");
    let table = String::from_utf8(s.cli(&["status", "api"]).stdout).unwrap();
    assert!(hook_row(&table).contains(" ok "), "{table}");
}

#[test]
fn with_revoke_after_hook_failure_the_revoke_proceeds_once_the_attempts_are_exhausted() {
    let s = Setup::new(&format!("{NOW}\nrevoke_after_hook_failure = true"), "");
    let text0 = std::fs::read_to_string(s.config()).unwrap();
    let hooks = "[[credential.hook]]\nkind = \"exec\"\ncommand = [\"/bin/false\"]\nretry = { max_attempts = 2, backoff = \"1s\", max_backoff = \"1s\" }\n";
    std::fs::write(s.config(), format!("{text0}\n{hooks}")).unwrap();
    assert!(ok(&s.cli(&["rotate", "api"])));
    let (first, _) = s.current();
    let out = s.cli(&["rotate", "api"]);
    assert!(ok(&out), "{}", text(&out));
    assert!(s.api.revoked(&first), "revoked after the hook gave up");
    let events = s.events(&["notify", "revoke"]);
    assert_eq!(
        &events[events.len() - 7..],
        [
            "notify start",
            "notify error",
            "notify start",
            "notify error",
            "notify skip",
            "revoke start",
            "revoke ok"
        ],
    );
}

#[test]
fn a_hanging_hook_is_killed_at_its_timeout_with_its_process_group() {
    let s = Setup::new(NOW, "");
    let dir = s.dir.path().display();
    let hook = s.script(
        "hang.sh",
        &format!("sleep 300 &\necho $! > {dir}/child.pid\nsleep 300"),
    );
    let text0 = std::fs::read_to_string(s.config()).unwrap();
    let hooks = format!(
        "[[credential.hook]]\nkind = \"exec\"\ncommand = [\"{}\"]\ntimeout = \"1s\"\nretry = {{ max_attempts = 1 }}\n",
        hook.display()
    );
    std::fs::write(s.config(), format!("{text0}\n{hooks}")).unwrap();
    let started = std::time::Instant::now();
    let out = s.cli(&["rotate", "api"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(!ok(&out));
    assert!(text(&out).contains("timed out after 1s"), "{}", text(&out));
    let child: u32 = std::fs::read_to_string(s.path("child.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let gone = || {
        std::fs::read_to_string(format!("/proc/{child}/stat"))
            .map_or(true, |stat| stat.contains(") Z "))
    };
    assert!(
        wait_until(Duration::from_secs(5), gone),
        "the hook's child {child} still runs"
    );
}

#[test]
fn kill_9_between_promote_and_the_hooks_runs_them_on_restart_and_the_revoke_waits_for_them() {
    // (failpoint, how many times the hook ran for the crashed rotation in all)
    for (point, runs) in [("promote:ok", 1), ("notify:start", 1), ("notify:done", 2)] {
        let s = Setup::new(NOW, "");
        let dir = s.dir.path().display();
        let hook = s.script(
            "record.sh",
            &format!("echo $KEYROTD_ROTATION_ID >> {dir}/runs"),
        );
        let text0 = std::fs::read_to_string(s.config()).unwrap();
        let hooks = format!(
            "[[credential.hook]]\nkind = \"exec\"\ncommand = [\"{}\"]\n",
            hook.display()
        );
        std::fs::write(s.config(), format!("{text0}\n{hooks}")).unwrap();
        assert!(ok(&s.cli(&["rotate", "api"])));
        let (first, _) = s.current();
        crash_at(&s.config(), "api", point, &[], &s.path("crash.log"));
        let (second, _) = s.current();
        assert_ne!(first, second, "{point}: promoted before the crash");
        assert!(
            !s.api.revoked(&first),
            "{point}: not revoked before the hook ran"
        );
        let crashed: String = s
            .journal()
            .iter()
            .rev()
            .find(|(_, step, event, _)| step == "promote" && event == "ok")
            .map(|_| ())
            .and_then(|()| {
                let db = rusqlite::Connection::open(s.path("state/keyrotd.db")).unwrap();
                db.query_row(
                    "SELECT id FROM rotations ORDER BY started_at DESC, id DESC LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .ok()
            })
            .unwrap();
        let out = s.cli(&["rotate", "api"]);
        assert!(ok(&out), "{point}: {}", text(&out));
        assert!(s.api.revoked(&first), "{point}");
        let all = std::fs::read_to_string(s.path("runs")).unwrap();
        assert_eq!(
            all.lines().filter(|l| *l == crashed).count(),
            runs,
            "{point}: {all}"
        );
        // The resumed rotation's revoke came after its hook's `ok`.
        let events = s.events(&["notify", "revoke"]);
        let revoke = events.iter().position(|e| e == "revoke start").unwrap();
        assert_eq!(events[revoke - 1], "notify ok", "{point}: {events:?}");
    }
}

#[test]
fn sigterm_while_a_hook_hangs_kills_its_process_group_and_the_hook_runs_again_at_the_next_start() {
    let s = Setup::new(
        "rotate_every = \"30d\"\nmax_age = \"40d\"\ngrace = \"1h\"",
        "",
    );
    let dir = s.dir.path().display();
    let flag = s.path("hang.flag");
    let hook = s.script(
        "hang.sh",
        &format!(
            "echo start >> {dir}/starts\ntest -e {} || exit 0\nsleep 300 &\necho $! > {dir}/child.pid\nwait",
            flag.display()
        ),
    );
    let text0 = std::fs::read_to_string(s.config()).unwrap();
    let text0 = text0.replace("listen = ", "shutdown_timeout = \"1s\"\nlisten = ");
    let hooks = format!(
        "[[credential.hook]]\nkind = \"exec\"\ncommand = [\"{}\"]\ntimeout = \"10m\"\n",
        hook.display()
    );
    std::fs::write(s.config(), format!("{text0}\n{hooks}")).unwrap();
    std::fs::write(&flag, "").unwrap();
    let mut daemon = Daemon::start(&s.config(), s.port, &s.path("daemon.log"), &[]);
    assert!(wait_until(Duration::from_secs(15), || s
        .path("child.pid")
        .exists()));
    let status = daemon.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {}", daemon.log_text());
    let child: u32 = std::fs::read_to_string(s.path("child.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let gone = || {
        std::fs::read_to_string(format!("/proc/{child}/stat"))
            .map_or(true, |stat| stat.contains(") Z "))
    };
    assert!(
        wait_until(Duration::from_secs(5), gone),
        "the hook's child {child} still runs"
    );
    let events = s.events(&["notify"]);
    assert_eq!(events.last().unwrap(), "notify interrupted", "{events:?}");
    // The next start runs it again (this time it returns at once).
    std::fs::remove_file(&flag).unwrap();
    let daemon = Daemon::start(&s.config(), s.port, &s.path("daemon2.log"), &[]);
    let again = wait_until(Duration::from_secs(15), || {
        s.events(&["notify"])
            .last()
            .is_some_and(|e| e == "notify ok")
    });
    assert!(again, "{:?}\n{}", s.events(&["notify"]), daemon.log_text());
    let starts = std::fs::read_to_string(s.path("starts")).unwrap();
    assert_eq!(starts.lines().count(), 2);
}
