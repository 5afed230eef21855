//! `stage` hooks (after `stage ok`; a failure rolls the rotation back) and `http` hooks (a
//! request to a loopback reload endpoint with a header read from a secret reference).

use super::*;

use std::net::TcpListener;
use std::sync::Mutex;

#[test]
fn stage_hooks_run_after_stage_and_a_failing_one_rolls_the_rotation_back() {
    let s = Setup::new(
        "rotate_every = \"30d\"\nmax_age = \"40d\"\ngrace = \"0s\"",
        "",
    );
    let dir = s.dir.path().display();
    let record = s.script(
        "record.sh",
        &format!("echo \"$1 $KEYROTD_ROTATION_ID\" >> {dir}/runs"),
    );
    let flag = s.path("stage.flag");
    let stage = s.script(
        "stage.sh",
        &format!("test -e {} && {} stage", flag.display(), record.display()),
    );
    let text0 = std::fs::read_to_string(s.config()).unwrap();
    let hooks = format!(
        "[[credential.hook]]\nkind = \"exec\"\ncommand = [\"{}\", \"promote\"]\n\n\
         [[credential.hook]]\nwhen = \"stage\"\nkind = \"exec\"\ncommand = [\"{}\"]\nretry = {{ max_attempts = 1 }}\n",
        record.display(),
        stage.display()
    );
    std::fs::write(s.config(), format!("{text0}\n{hooks}")).unwrap();
    std::fs::write(&flag, "").unwrap();
    assert!(s.cli(&["rotate", "api"]).status.success());
    let journal: Vec<String> = s
        .journal()
        .into_iter()
        .filter(|(_, _, e, _)| e == "ok")
        .map(|(_, step, _, d)| format!("{step} {d}").trim().to_owned())
        .collect();
    assert_eq!(
        journal,
        [
            "issue",
            "stage",
            "notify stage hook 1 (exec)",
            "activate",
            "verify",
            "promote",
            "notify promote hook 0 (exec)",
            "release"
        ],
    );
    let runs = std::fs::read_to_string(s.path("runs")).unwrap();
    let kinds: Vec<&str> = runs.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(kinds, ["stage", "promote"]);
    // A failing stage hook: nothing is promoted yet, so the rotation rolls back.
    let before = s.current();
    std::fs::remove_file(&flag).unwrap();
    let out = s.cli(&["rotate", "api"]);
    assert!(!out.status.success());
    assert_eq!(s.current(), before, "the current key is unchanged");
    let tail = s.events(&["notify", "rollback", "discard", "promote"]);
    assert_eq!(
        &tail[tail.len() - 6..],
        [
            "notify start",
            "notify error",
            "rollback start",
            "rollback ok",
            "discard start",
            "discard ok"
        ],
    );
    let issued: Vec<String> = s.api.lock().keys.keys().cloned().collect();
    let abandoned = issued.last().unwrap();
    assert!(
        s.api.revoked(abandoned),
        "the key issued for it is abandoned"
    );
}

/// A loopback reload endpoint: records each request's head, answers `status`.
fn endpoint(status: u16) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = [0u8; 8192];
            let n = stream.read(&mut buf).unwrap_or(0);
            log.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (port, seen)
}

#[test]
fn an_http_hook_calls_the_reload_endpoint_with_a_secret_header_and_fails_on_non_2xx() {
    for (status, succeeds) in [(204, true), (500, false)] {
        let s = Setup::new(
            "rotate_every = \"30d\"\nmax_age = \"40d\"\ngrace = \"0s\"",
            "",
        );
        let (port, seen) = endpoint(status);
        let token = "reload-token-7f3a9c0d1e2b";
        std::fs::write(s.path("reload.token"), token).unwrap();
        let text0 = std::fs::read_to_string(s.config()).unwrap();
        let hooks = format!(
            "[[credential.hook]]\nkind = \"http\"\nmethod = \"PUT\"\nurl = \"http://127.0.0.1:{port}/-/reload\"\n\
             headers = {{ X-Reason = \"rotation\" }}\nsecret_headers = {{ X-Token = \"file:{}\" }}\n\
             timeout = \"5s\"\nretry = {{ max_attempts = 1 }}\n",
            s.path("reload.token").display()
        );
        std::fs::write(s.config(), format!("{text0}\n{hooks}")).unwrap();
        let out = s.cli(&["rotate", "api"]);
        assert_eq!(out.status.success(), succeeds, "{status}");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        let head = seen[0].to_ascii_lowercase();
        assert!(head.starts_with("put /-/reload http/1.1"), "{head}");
        assert!(
            head.contains("x-reason: rotation") && head.contains(&format!("x-token: {token}")),
            "{head}"
        );
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !succeeds {
            assert!(all.contains("promote hook 0 (http): answered 500"), "{all}");
        }
        assert!(!all.contains(token), "the header's secret is never logged");
        let db = std::fs::read(s.path("state/keyrotd.db")).unwrap();
        assert!(!String::from_utf8_lossy(&db).contains(token));
        s.leak_scan(&[&all]);
    }
}

#[test]
fn a_hook_that_prints_the_secret_it_read_is_never_logged_verbatim() {
    let s = Setup::new(
        "rotate_every = \"30d\"\nmax_age = \"40d\"\ngrace = \"0s\"",
        "",
    );
    let store = s.path("out/key.json");
    let hook = s.script(
        "leaky.sh",
        &format!("cat {0}\ncat {0} >&2\nexit 3", store.display()),
    );
    let text0 = std::fs::read_to_string(s.config()).unwrap();
    let hooks = format!(
        "[[credential.hook]]\nkind = \"exec\"\ncommand = [\"{}\"]\nretry = {{ max_attempts = 1 }}\n",
        hook.display()
    );
    std::fs::write(s.config(), format!("{text0}\n{hooks}")).unwrap();
    let out = s.cli(&["rotate", "api"]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success());
    let size = std::fs::metadata(&store).unwrap().len();
    assert!(
        all.contains(&format!(
            "exited with status 3; {size} bytes on stdout, {size} on stderr (not logged)"
        )),
        "{all}"
    );
    let status = s.cli(&["status", "--json", "api"]);
    s.leak_scan(&[&all, &String::from_utf8_lossy(&status.stdout)]);
}

#[test]
fn after_a_crash_past_promote_the_daemon_runs_the_hooks_at_once_not_after_the_grace_period() {
    let s = Setup::new(
        "rotate_every = \"30d\"\nmax_age = \"40d\"\ngrace = \"1h\"",
        "",
    );
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
    crash_at(&s.config(), "api", "promote:ok", &[], &s.path("crash.log"));
    assert!(!s.path("runs").exists(), "the crash came before the hook");
    let status = s.cli(&["status", "--json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        status[0]["revoke_at"],
        Value::Null,
        "no revoke time while hooks are pending"
    );
    let daemon = Daemon::start(&s.config(), s.port, &s.path("daemon.log"), &[]);
    let ran = wait_until(Duration::from_secs(15), || s.path("runs").exists());
    assert!(ran, "the hook ran at start; log:\n{}", daemon.log_text());
    let status = s.cli(&["status", "--json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let revoke_at: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(status[0]["revoke_at"].clone()).unwrap();
    let last: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(status[0]["last_rotation"].clone()).unwrap();
    assert!(revoke_at - last >= chrono::Duration::hours(1), "{status}");
    assert_eq!(
        std::fs::read_to_string(s.path("runs"))
            .unwrap()
            .lines()
            .count(),
        1
    );
}
