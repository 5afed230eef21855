//! The audit trail through the real binary: `keyrotd audit verify` catches rows edited,
//! deleted or swapped behind keyrotd's back (with rusqlite, as `sqlite3` would), `audit export`
//! filters, the actor of each row (daemon or person), the daemon's append-only audit log, and
//! history pruning behind a checkpoint.

use crate::support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use support::*;

/// An inventory with `random` credentials in file stores, and its state database.
struct Env {
    dir: tempfile::TempDir,
    port: u16,
}

impl Env {
    /// Credentials `ids`, each with `schedule` (TOML lines), and `daemon` more `[daemon]` lines.
    fn new(ids: &[&str], schedule: &str, daemon: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut text = format!(
            "[daemon]\nstate = \"sqlite:state/keyrotd.db\"\nlisten = \"127.0.0.1:{port}\"\n{daemon}\n"
        );
        for id in ids {
            text += &format!(
                "\n[[credential]]\nid = \"{id}\"\nrotator = {{ kind = \"random\", length = 32 }}\n\
                 store = {{ kind = \"file\", path = \"{}\" }}\n{schedule}\n",
                dir.path().join(format!("out/{id}.pass")).display()
            );
        }
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        std::fs::write(dir.path().join("config.toml"), text).unwrap();
        Self { dir, port }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn run(&self, args: &[&str]) -> Output {
        cli(&self.path("config.toml"), args)
    }

    fn rotate(&self, id: &str, env: &[(&str, &str)]) {
        let mut cmd = keyrotd();
        cmd.arg("--config")
            .arg(self.path("config.toml"))
            .args(["rotate", id]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "rotate {id}: {}", text(&out));
    }

    /// Runs SQL on the state database behind keyrotd's back.
    fn tamper(&self, sql: &str) {
        let db = rusqlite::Connection::open(self.path("state/keyrotd.db")).unwrap();
        db.execute_batch(sql).unwrap();
    }

    fn max_seq(&self) -> i64 {
        let db = rusqlite::Connection::open(self.path("state/keyrotd.db")).unwrap();
        db.query_row("SELECT MAX(seq) FROM steps", [], |r| r.get(0))
            .unwrap()
    }

    fn export(&self, args: &[&str]) -> Vec<Value> {
        let out = self.run(&[&["audit", "export"], args].concat());
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn start(&self, log: &str) -> Daemon {
        Daemon::start(&self.path("config.toml"), self.port, &self.path(log), &[])
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A credential that rotates only by hand, with no grace: each manual rotation first finishes
/// (revokes) the one before.
const BY_HAND: &str = "rotate_every = \"365d\"\nmax_age = \"400d\"\ngrace = \"0s\"";

/// Two manual rotations of `db`: 26 journal rows, 1 to 26 (the first has nothing to revoke).
fn two_rotations() -> Env {
    let env = Env::new(&["db"], BY_HAND, "");
    env.rotate("db", &[]);
    env.rotate("db", &[]);
    assert_eq!(env.max_seq(), 26);
    env
}

/// `audit verify` fails, naming `row` in the way `what` says.
fn broken(env: &Env, what: &str) {
    let out = env.run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(what), "expected `{what}`: {}", text(&out));
}

#[test]
fn an_untouched_journal_verifies_with_its_count_and_head_hash() {
    let env = two_rotations();
    let out = env.run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let lines = env.export(&[]);
    let head = lines.last().unwrap()["hash"].as_str().unwrap().to_owned();
    assert_eq!(head.len(), 64);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "journal intact: 26 row(s), head row 26 hash {head}"
        )),
        "{stdout}"
    );
}

#[test]
fn an_edited_row_is_named() {
    let env = two_rotations();
    env.tamper("UPDATE steps SET event = 'ok' WHERE seq = 5 AND event = 'start'; UPDATE steps SET detail = 'all fine' WHERE seq = 5");
    broken(&env, "journal row 5 was edited");
}

#[test]
fn an_edited_credential_of_a_rotation_is_caught_at_its_first_row() {
    let env = two_rotations();
    env.tamper("UPDATE rotations SET credential_id = 'other' WHERE id = (SELECT rotation_id FROM steps WHERE seq = 1)");
    broken(&env, "journal row 1 was edited");
}

#[test]
fn a_deleted_row_is_named() {
    let env = two_rotations();
    env.tamper("DELETE FROM steps WHERE seq = 7");
    broken(&env, "journal row 7 was deleted");
    let env = two_rotations();
    env.tamper("DELETE FROM steps WHERE seq = 26");
    broken(&env, "journal row 26 was deleted");
}

#[test]
fn swapped_rows_are_named() {
    let env = two_rotations();
    env.tamper(
        "UPDATE steps SET seq = -1 WHERE seq = 9; UPDATE steps SET seq = 9 WHERE seq = 10;
         UPDATE steps SET seq = 10 WHERE seq = -1;",
    );
    broken(&env, "journal row 9 was edited or moved");
}

#[test]
fn export_filters_by_credential_and_time_and_carries_every_field() {
    let env = Env::new(&["db", "api"], BY_HAND, "");
    env.rotate("db", &[]);
    env.rotate("api", &[]);
    let all = env.export(&[]);
    assert_eq!(all.len(), 24);
    let seqs: Vec<i64> = all.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=24).collect::<Vec<_>>(), "in chain order");
    for line in &all {
        for field in [
            "time",
            "credential",
            "rotation",
            "step",
            "event",
            "actor",
            "trigger",
            "error_code",
            "error",
            "hash",
        ] {
            assert!(line.get(field).is_some(), "{field} missing: {line}");
        }
    }
    let api = env.export(&["--credential", "api"]);
    assert_eq!(api.len(), 12);
    assert!(api.iter().all(|l| l["credential"] == "api"));
    assert_eq!(api[0]["seq"], 13);
    assert_eq!(env.export(&["--since", "1h"]).len(), 24);
    assert_eq!(env.export(&["--since", "2999-01-01T00:00:00Z"]).len(), 0);
    let cut = all[12]["time"].as_str().unwrap();
    let since = env.export(&["--since", cut]);
    assert!(since.iter().all(|l| l["time"].as_str().unwrap() >= cut));
    assert!(since.len() >= 12 && since.len() < 24, "{}", since.len());
    let bad = env.run(&["audit", "export", "--since", "yesterday-ish"]);
    assert_ne!(bad.status.code(), Some(0), "{}", text(&bad));
}

/// The uid running this test.
fn uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

use std::os::unix::fs::MetadataExt;

#[test]
fn each_row_names_its_actor_and_trigger_daemon_or_person() {
    let env = Env::new(
        &["db"],
        "rotate_every = \"365d\"\nmax_age = \"400d\"\ngrace = \"1d\"",
        "",
    );
    // Never rotated: the daemon rotates it at once.
    let mut daemon = env.start("daemon.log");
    assert!(
        wait_until(Duration::from_secs(20), || env.export(&[]).len() >= 10),
        "{}",
        daemon.log_text()
    );
    daemon.terminate(Duration::from_secs(10));
    let pid = daemon.child.id();
    let lines = env.export(&[]);
    for line in &lines {
        let actor = &line["actor"];
        assert_eq!(actor["kind"], "daemon", "{line}");
        assert_eq!(actor["pid"], pid, "{line}");
        assert_eq!(actor["version"], env!("CARGO_PKG_VERSION"));
        assert!(actor["host"].as_str().is_some_and(|h| !h.is_empty()));
        assert_eq!(line["trigger"], "overdue", "never rotated: {line}");
    }

    // A person, under sudo. The grace period is not over: rotate after it by hand needs a new
    // credential with no grace.
    let env = Env::new(&["db"], BY_HAND, "");
    env.rotate("db", &[("SUDO_USER", "alice")]);
    let lines = env.export(&[]);
    assert_eq!(lines.len(), 12);
    for line in &lines {
        let actor = &line["actor"];
        assert_eq!(actor["kind"], "cli", "{line}");
        assert_eq!(actor["uid"], uid(), "{line}");
        assert_eq!(actor["sudo_user"], "alice", "{line}");
        assert!(actor.get("tty").is_some(), "{line}");
        assert_eq!(line["trigger"], "manual", "{line}");
    }
    assert!(lines[0]["actor"]["user"].is_string(), "{}", lines[0]);
    // Stored once, referred to by id.
    let db = rusqlite::Connection::open(env.path("state/keyrotd.db")).unwrap();
    let actors: i64 = db
        .query_row("SELECT COUNT(*) FROM actors", [], |r| r.get(0))
        .unwrap();
    assert_eq!(actors, 1);
    let without: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM rotations WHERE actor IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(without, 0, "the rotation records its actor too");
}

#[test]
fn each_row_says_why_its_run_started() {
    let env = Env::new(
        &["db"],
        "rotate_every = \"2s\"\nmax_age = \"1h\"\ngrace = \"0s\"",
        "",
    );
    let mut daemon = env.start("daemon.log");
    let triggers = || -> Vec<String> {
        env.export(&[])
            .iter()
            .map(|l| l["trigger"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(20), || triggers()
            .contains(&"interval".to_owned())),
        "{:?}\n{}",
        triggers(),
        daemon.log_text()
    );
    daemon.terminate(Duration::from_secs(10));
    let seen = triggers();
    assert_eq!(
        seen[0], "overdue",
        "never rotated: due when the daemon started"
    );
    assert!(
        seen.iter().all(|t| t == "overdue" || t == "interval"),
        "{seen:?}"
    );
    env.rotate("db", &[]);
    assert_eq!(triggers().last().unwrap(), "manual");
}

/// The flags of the descriptor `pid` holds open on `path`.
fn open_flags(pid: u32, path: &Path) -> Option<u32> {
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
        let fd = fd.ok()?;
        if std::fs::read_link(fd.path()).ok()? == path {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
            return u32::from_str_radix(flags.trim(), 8).ok();
        }
    }
    None
}

#[test]
fn the_daemon_appends_every_row_to_its_audit_log_opened_append_only() {
    let env = Env::new(
        &["db"],
        "rotate_every = \"365d\"\nmax_age = \"400d\"\ngrace = \"1d\"",
        "audit_log = \"audit.jsonl\"",
    );
    let log = env.path("audit.jsonl");
    // An earlier audit line (of a log that begins before the database's first row) and a wide
    // mode: kept and narrowed, never truncated.
    let earlier = "{\"seq\":0,\"note\":\"an earlier line\"}\n";
    std::fs::write(&log, earlier).unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut daemon = env.start("daemon.log");
    assert!(
        wait_until(Duration::from_secs(20), || {
            std::fs::read_to_string(&log).unwrap().lines().count() >= 11
        }),
        "{}",
        daemon.log_text()
    );
    let flags = open_flags(daemon.child.id(), &log).expect("the daemon holds the log open");
    assert_ne!(flags & 0o2000, 0, "O_APPEND: flags {flags:o}");
    daemon.terminate(Duration::from_secs(10));
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with(earlier), "{text}");
    let exported: Vec<Value> = env.export(&[]);
    let logged: Vec<Value> = text
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(logged, exported, "the same lines as `audit export`");

    // A restart continues after the last line: nothing repeated.
    let mut again = env.start("daemon2.log");
    std::thread::sleep(Duration::from_millis(2500));
    again.terminate(Duration::from_secs(10));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), text);
}

/// Starts `keyrotd run`, which must exit 1 at once; its stderr.
fn refused_start(env: &Env) -> String {
    let mut child = keyrotd()
        .arg("--config")
        .arg(env.path("config.toml"))
        .arg("run")
        .stderr(std::fs::File::create(env.path("refused.log")).unwrap())
        .spawn()
        .unwrap();
    let exited = wait_until(Duration::from_secs(20), || {
        child.try_wait().unwrap().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let log = std::fs::read_to_string(env.path("refused.log")).unwrap();
    assert!(exited, "keyrotd run started: {log}");
    assert_eq!(child.wait().unwrap().code(), Some(1), "{log}");
    log
}

#[test]
fn an_audit_log_that_is_a_symlink_or_not_a_file_is_refused() {
    let env = Env::new(&["db"], BY_HAND, "audit_log = \"audit.jsonl\"");
    let target = env.path("elsewhere.txt");
    std::fs::write(&target, "untouched\n").unwrap();
    std::os::unix::fs::symlink(&target, env.path("audit.jsonl")).unwrap();
    let out = refused_start(&env);
    assert!(out.contains("symbolic link"), "{out}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched\n");

    std::fs::remove_file(env.path("audit.jsonl")).unwrap();
    let fifo = std::ffi::CString::new(env.path("audit.jsonl").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    assert!(std::fs::metadata(env.path("audit.jsonl"))
        .unwrap()
        .file_type()
        .is_fifo());
    let out = refused_start(&env);
    assert!(out.contains("not a regular file"), "{out}");
}

#[test]
fn an_audit_log_naming_another_file_is_refused_and_that_file_left_untouched() {
    // The state database itself, and a credential's secret file shared with its consumers.
    let env = Env::new(&["db"], BY_HAND, "audit_log = \"state/keyrotd.db\"");
    env.rotate("db", &[]);
    let out = refused_start(&env);
    assert!(out.contains("not a keyrotd audit log"), "{out}");
    assert!(out.contains("state/keyrotd.db"), "{out}");
    // Nothing was appended to the database: it still opens and its chain verifies.
    let verified = env.run(&["audit", "verify"]);
    assert!(verified.status.success(), "{}", text(&verified));

    let secret = env.path("out/db.pass");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
    let value = std::fs::read(&secret).unwrap();
    let config = std::fs::read_to_string(env.path("config.toml")).unwrap();
    let config = config.replace(
        "\"state/keyrotd.db\"",
        &format!("{:?}", secret.display().to_string()),
    );
    std::fs::write(env.path("config.toml"), config).unwrap();
    let out = refused_start(&env);
    assert!(out.contains("not a keyrotd audit log"), "{out}");
    assert!(
        std::fs::read(&secret).unwrap() == value,
        "the secret file changed"
    );
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o640,
        "the consumers' access to the secret file was changed"
    );
}

#[test]
fn pruning_keeps_a_checkpoint_that_verify_checks() {
    let env = Env::new(&["db"], BY_HAND, "history_retention = \"30d\"");
    for _ in 0..3 {
        env.rotate("db", &[]);
    }
    assert_eq!(env.max_seq(), 40);
    // All three (rows 1 to 12, 13 to 26, 27 to 40) finished 100 days ago; the newest is kept.
    env.tamper("UPDATE rotations SET started_at = started_at - 8640000, finished_at = finished_at - 8640000 WHERE finished_at IS NOT NULL");
    let mut daemon = env.start("daemon.log");
    assert!(
        wait_until(Duration::from_secs(20), || daemon
            .log_text()
            .contains("pruned history")),
        "{}",
        daemon.log_text()
    );
    daemon.terminate(Duration::from_secs(10));
    let out = env.run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("26 older row(s) pruned, checkpoint at row 26"),
        "{stdout}"
    );
    let first = env.export(&[]);
    assert_eq!(first[0]["seq"], 27, "rows 1 to 26 are gone");
    let history = String::from_utf8(env.run(&["history", "db"]).stdout).unwrap();
    assert_eq!(
        history.matches("trigger=").count(),
        1,
        "one rotation kept: {history}"
    );
    assert!(
        history.contains(first[0]["rotation"].as_str().unwrap()),
        "{history}"
    );

    env.tamper("DELETE FROM steps WHERE seq = 27");
    broken(
        &env,
        "journal row 27 was deleted: the chain jumps from row 26 to row 28",
    );
}
