//! The state database lost, reset, foreign or trimmed, driven through the real binary: keyrotd
//! must notice and refuse, never silently start over; and its files stay private.

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// An inventory in a fresh directory: `db`, a `random` credential in a file store, plus
/// `extra` (more TOML appended).
struct Env {
    dir: tempfile::TempDir,
    port: u16,
}

impl Env {
    fn new(db: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let env = Self { dir, port };
        env.write_inventory(db, extra);
        env
    }

    /// Rewrites the inventory; an empty `db` leaves that credential out.
    fn write_inventory(&self, db: &str, extra: &str) {
        let mut text = format!(
            "[daemon]\nstate = \"sqlite:state/keyrotd.db\"\nlisten = \"127.0.0.1:{}\"\n",
            self.port
        );
        if !db.is_empty() {
            text += &format!(
                "\n[[credential]]\nid = \"db\"\nrotator = {{ kind = \"random\", length = 32 }}\n\
                 store = {{ kind = \"file\", path = \"{}\" }}\n{db}\n",
                self.path("out/db.pass").display()
            );
        }
        text += extra;
        std::fs::write(self.config(), text).unwrap();
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn config(&self) -> PathBuf {
        self.path("config.toml")
    }

    fn run(&self, args: &[&str]) -> Output {
        cli(&self.config(), args)
    }

    fn current(&self) -> Option<String> {
        std::fs::read_to_string(self.path("out/db.pass")).ok()
    }

    fn store_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.path("out"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// `status --json`: exit code and the row of `db`.
    fn status(&self) -> (Option<i32>, serde_json::Value) {
        let out = self.run(&["status", "--json"]);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json: {e}: {}", text(&out)));
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == "db")
            .cloned()
            .unwrap_or_default();
        (out.status.code(), row)
    }

    fn daemon(&self, env: &[(&str, &str)]) -> Daemon {
        Daemon::start(&self.config(), self.port, &self.path("daemon.log"), env)
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// The store names rotation `rotation`, unknown to the database: `status`, `rotate` and `run`
/// refuse and change nothing; `adopt` accepts it and a rotation then works.
fn assert_refused_until_adopted(env: &Env, rotation: &str) {
    let before = env.current().expect("a value in the store");
    let files = env.store_files();

    let (code, row) = env.status();
    assert_eq!(code, Some(1), "status exits 1 on lost state: {row}");
    assert_eq!(row["state_lost"], true, "{row}");
    assert_eq!(row["state"], "failed", "{row}");
    assert_eq!(row["store_rotation"], rotation, "{row}");
    let why = row["last_error"].as_str().unwrap();
    assert!(
        why.contains("state lost or foreign") && why.contains(rotation),
        "{why}"
    );

    let out = env.run(&["rotate", "db"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("state lost or foreign")
            && stderr.contains(rotation)
            && stderr.contains("keyrotd adopt db"),
        "{stderr}"
    );
    assert_eq!(env.current().unwrap(), before, "rotate issued nothing");
    assert_eq!(env.store_files(), files);

    let mut daemon = env.daemon(&[]);
    let flagged = wait_until(Duration::from_secs(10), || {
        http_get(env.port, "/metrics")
            .is_some_and(|(_, m)| m.contains("keyrotd_state_mismatch{credential=\"db\"} 1"))
    });
    assert!(flagged, "{}", daemon.log_text());
    std::thread::sleep(Duration::from_millis(1500));
    let log = daemon.log_text();
    assert!(
        log.contains("ERROR")
            && log.contains("state lost or foreign")
            && log.contains(rotation)
            && log.contains(&env.path("out/db.pass").display().to_string()),
        "{log}"
    );
    assert_eq!(env.current().unwrap(), before, "the daemon issued nothing");
    assert_eq!(env.store_files(), files);
    assert_eq!(daemon.terminate(Duration::from_secs(10)).code(), Some(0));

    let out = env.run(&["adopt", "db"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (code, row) = env.status();
    assert_eq!(code, Some(0), "{row}");
    assert_eq!(row["state_lost"], false, "{row}");
    let history = env.run(&["history", "db"]);
    let history = String::from_utf8_lossy(&history.stdout);
    assert!(
        history.contains(&format!("{rotation}  db  done  trigger=adopt")),
        "{history}"
    );

    let out = env.run(&["rotate", "db"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_ne!(env.current().unwrap(), before, "rotated after adoption");
}

/// The rotation the file store's sidecar names as current.
fn sidecar_rotation(env: &Env) -> String {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.path("out/db.pass.keyrotd")).unwrap()).unwrap();
    meta["current"].as_str().unwrap().to_owned()
}

#[test]
fn a_zero_byte_state_database_is_detected_and_refused_until_adopted() {
    let env = Env::new(
        "rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"",
        "",
    );
    let out = env.run(&["rotate", "db"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let rotation = sidecar_rotation(&env);
    let (code, row) = env.status();
    assert_eq!((code, &row["state"]), (Some(0), &"idle".into()), "{row}");

    for side in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(env.path(&format!("state/keyrotd.db{side}")));
    }
    std::fs::File::create(env.path("state/keyrotd.db")).unwrap();
    assert_refused_until_adopted(&env, &rotation);
}

#[test]
fn wal_and_shm_deleted_after_a_kill_9_mid_run_are_detected() {
    let env = Env::new(
        "rotate_every = \"2h\"\nmax_age = \"3h\"\ngrace = \"1h\"",
        "",
    );
    // The daemon's first issuance hangs just after promotion; kill -9 it there.
    let mut daemon = env.daemon(&[("KEYROTD_FAILPOINT", "promote:ok")]);
    let reached = wait_until(Duration::from_secs(20), || {
        daemon.log_text().contains("failpoint promote:ok reached")
    });
    assert!(reached, "{}", daemon.log_text());
    daemon.kill9();
    let rotation = sidecar_rotation(&env);
    for side in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(env.path(&format!("state/keyrotd.db{side}")));
    }
    assert_refused_until_adopted(&env, &rotation);
}

#[test]
fn a_database_of_another_instance_is_foreign() {
    // Two keyrotd installations whose inventories point at the same store file: the second
    // one's database never saw the first one's rotation.
    let env = Env::new(
        "rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"",
        "",
    );
    assert_eq!(env.run(&["rotate", "db"]).status.code(), Some(0));
    let rotation = sidecar_rotation(&env);
    std::fs::rename(env.path("state"), env.path("first-instance-state")).unwrap();
    let before = env.current().unwrap();

    // A daemon finds it on its own first run: the mismatch gauge is set as the run finds it, the
    // credential's status once the run has ended, so both are awaited.
    let daemon = env.daemon(&[]);
    let failed =
        "keyrotd_credential_status{credential=\"db\",rotator=\"random\",state=\"failed\"} 1";
    let mut metrics = String::new();
    let flagged = wait_until(Duration::from_secs(10), || {
        metrics = http_get(env.port, "/metrics")
            .map(|(_, m)| m)
            .unwrap_or_default();
        metrics.contains("keyrotd_state_mismatch{credential=\"db\"} 1") && metrics.contains(failed)
    });
    let log = daemon.log_text();
    assert!(flagged, "{metrics}\n{log}");
    assert!(
        log.contains("ERROR") && log.contains("state lost or foreign") && log.contains(&rotation),
        "{log}"
    );
    drop(daemon);
    assert_eq!(env.current().unwrap(), before, "nothing issued");

    let out = env.run(&["rotate", "db"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&rotation),
        "{}",
        text(&out)
    );
}

#[test]
fn state_files_are_private_whatever_the_umask() {
    let env = Env::new(
        "rotate_every = \"2h\"\nmax_age = \"3h\"\ngrace = \"1h\"",
        "",
    );
    let log = std::fs::File::create(env.path("daemon.log")).unwrap();
    let child = Command::new("sh")
        .args(["-c", "umask 000; exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_keyrotd"))
        .arg("--config")
        .arg(env.config())
        .arg("run")
        .env_remove("KEYROTD_FAILPOINT")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let daemon = Daemon {
        child,
        log: env.path("daemon.log"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !env.path("state/keyrotd.db-wal").exists() || env.current().is_none() {
        assert!(Instant::now() < deadline, "{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(mode(&env.path("state")), 0o700);
    for file in ["keyrotd.db", "keyrotd.db-wal", "keyrotd.db-shm"] {
        assert_eq!(mode(&env.path("state").join(file)), 0o600, "{file}");
    }
}

#[test]
fn removing_a_credential_in_grace_is_refused_and_its_history_stays_readable() {
    let other = "\n[[credential]]\nid = \"other\"\nrotator = { kind = \"random\" }\n\
                 store = { kind = \"file\", path = \"OTHER\" }\n\
                 rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"\n";
    let db = "rotate_every = \"2h\"\nmax_age = \"3h\"\ngrace = \"1h\"";
    let env = Env::new(db, "");
    let other = other.replace("OTHER", &env.path("out/other").display().to_string());
    env.write_inventory(db, &other);
    let out = env.run(&["rotate", "db"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(env.status().1["state"], "grace");

    // A reload that drops `db` is refused; the daemon keeps running the old inventory.
    let daemon = env.daemon(&[]);
    env.write_inventory("", &other);
    signal(daemon.child.id(), "HUP");
    let refused = wait_until(Duration::from_secs(10), || {
        http_get(env.port, "/metrics")
            .is_some_and(|(_, m)| m.contains("keyrotd_config_reloads_total{result=\"failure\"} 1"))
    });
    let log = daemon.log_text();
    assert!(refused, "{log}");
    assert!(
        log.contains("reload refused") && log.contains("credential `db` was removed"),
        "{log}"
    );
    let (_, metrics) = http_get(env.port, "/metrics").unwrap();
    assert!(metrics.contains("credential=\"db\""), "db is still run");
    drop(daemon);

    // At a restart there is no old inventory to keep: `check` and `run` refuse, exit 2.
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("credential `db` was removed from the inventory")
            && stderr.contains("grace period until"),
        "{stderr}"
    );
    let mut run = support::keyrotd()
        .arg("--config")
        .arg(env.config())
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = run.kill();
            panic!("`run` started with a removed credential in grace");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = run.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("credential `db` was removed"),
        "{}",
        text(&out)
    );

    // Its history is still there.
    let out = env.run(&["history", "db"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("  db  promoted"),
        "{}",
        text(&out)
    );
    let out = env.run(&["history", "nosuch"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // Kept in the inventory until its grace ends, all is well again.
    env.write_inventory(db, &other);
    assert_eq!(env.run(&["check"]).status.code(), Some(0));
}

/// The `AWSCURRENT` version id of `secret_id`, read as the admin.
fn aws_current_version(
    rt: &tokio::runtime::Runtime,
    sm: &aws_sdk_secretsmanager::Client,
    secret_id: &str,
) -> String {
    let out = rt
        .block_on(sm.describe_secret().secret_id(secret_id).send())
        .unwrap();
    out.version_ids_to_stages()
        .unwrap()
        .iter()
        .find(|(_, labels)| labels.iter().any(|l| l == "AWSCURRENT"))
        .map(|(v, _)| v.clone())
        .unwrap()
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn a_secrets_manager_version_unknown_to_the_database_is_detected() {
    let (url, key_id, key_secret) = (
        backend_env("KEYROTD_TEST_MOTO_URL"),
        backend_env("KEYROTD_TEST_AWS_ACCESS_KEY_ID"),
        backend_env("KEYROTD_TEST_AWS_SECRET_ACCESS_KEY"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = rt
        .block_on(keyrotd_providers::aws::load_sdk_config(
            Some("us-east-1"),
            Some(&url),
            Default::default(),
        ))
        .to_builder()
        .credentials_provider(
            aws_sdk_secretsmanager::config::SharedCredentialsProvider::new(
                aws_sdk_secretsmanager::config::Credentials::new(
                    &key_id,
                    &key_secret,
                    None,
                    None,
                    "state-loss",
                ),
            ),
        )
        .build();
    let sm = aws_sdk_secretsmanager::Client::new(&config);
    let secret_id = format!(
        "keyrotd-state-loss/{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    // Created by another tool: its version id is a random UUIDv4 and names no rotation.
    rt.block_on(
        sm.create_secret()
            .name(&secret_id)
            .secret_string("set-by-hand")
            .send(),
    )
    .unwrap();
    let env = Env::new("", "");
    env.write_inventory(
        "",
        &format!(
            "\n[[credential]]\nid = \"db\"\nrotator = {{ kind = \"random\" }}\n\
             store = {{ kind = \"aws_secrets_manager\", secret_id = \"{secret_id}\", region = \"us-east-1\", endpoint_url = \"{url}\" }}\n\
             rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"\n"
        ),
    );
    let run = |args: &[&str]| {
        support::keyrotd()
            .arg("--config")
            .arg(env.config())
            .args(args)
            .env("AWS_ACCESS_KEY_ID", &key_id)
            .env("AWS_SECRET_ACCESS_KEY", &key_secret)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap()
    };
    let out = run(&["status", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a hand-made version is no rotation: {}",
        text(&out)
    );

    let out = run(&["rotate", "db"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let rotation = aws_current_version(&rt, &sm, &secret_id);
    std::fs::remove_dir_all(env.path("state")).unwrap();

    let out = run(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&rotation),
        "{}",
        text(&out)
    );
    let out = run(&["rotate", "db"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("state lost or foreign"),
        "{}",
        text(&out)
    );
    assert_eq!(
        aws_current_version(&rt, &sm, &secret_id),
        rotation,
        "nothing staged or promoted"
    );

    let out = run(&["adopt", "db"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = run(&["rotate", "db"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_ne!(aws_current_version(&rt, &sm, &secret_id), rotation);
}
