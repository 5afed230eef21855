//! The `postgres_password` rotator through the real `keyrotd` binary, against the throwaway
//! cluster tests/backends/30-postgres.sh starts: single and alternating rotations end to end, a
//! consumer that keeps re-reading the store under alternating rotation, kill -9 mid-rotation and
//! resume, and the admin DSN wrong, the target role missing and the database down.
//!
//! Every test makes its own roles through the admin connection, so tests run in parallel.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

mod crash;
mod failures;
mod in_use;
mod policy;

/// The variable the inventories name (`admin_dsn = "env:..."`); set on each keyrotd process only.
const DSN_VAR: &str = "KEYROTD_E2E_PG_ADMIN_DSN";

fn admin_dsn() -> String {
    backend_env("KEYROTD_TEST_PG_ADMIN_DSN")
}

fn pg_port() -> u16 {
    backend_env("KEYROTD_TEST_PG_PORT")
        .parse()
        .expect("KEYROTD_TEST_PG_PORT is a port")
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Runs SQL as the cluster's superuser.
fn admin_exec(sql: &str) {
    block_on(async {
        let config: tokio_postgres::Config = admin_dsn().parse().expect("admin DSN parses");
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .expect("admin login");
        tokio::spawn(connection);
        client.batch_execute(sql).await.expect("admin SQL");
    })
}

/// Every password verifier in the cluster (`SCRAM-SHA-256$4096:salt$StoredKey:ServerKey`), and
/// its two keys on their own: each is a password hash that keyrotd must never show.
fn verifiers() -> Vec<String> {
    let rows = block_on(async {
        let config: tokio_postgres::Config = admin_dsn().parse().expect("admin DSN parses");
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .expect("admin login");
        tokio::spawn(connection);
        client
            .query(
                "SELECT rolpassword FROM pg_authid WHERE rolpassword IS NOT NULL",
                &[],
            )
            .await
            .expect("admin reads pg_authid")
    });
    let mut out = Vec::new();
    for row in rows {
        let verifier: String = row.get(0);
        if let Some((_, keys)) = verifier.rsplit_once('$') {
            out.extend(keys.split(':').map(str::to_owned));
        }
        out.push(verifier);
    }
    out
}

/// The admin password inside the test cluster's admin DSN.
fn admin_password() -> String {
    admin_dsn()
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("password="))
        .expect("the admin DSN has a password")
        .to_owned()
}

/// Drops and re-creates `role` with a known starting password.
fn fresh_role(role: &str) {
    admin_exec(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN PASSWORD 'start-{role}'"
    ));
}

/// Logs in as a consumer would. `Err` carries the SQLSTATE, or the error text when there is none.
fn login(user: &str, password: &str) -> Result<(), String> {
    block_on(async {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(pg_port())
            .user(user)
            .password(password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5));
        match config.connect(tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                client
                    .simple_query("SELECT 1")
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e
                .code()
                .map(|c| c.code().to_owned())
                .unwrap_or_else(|| e.to_string())),
        }
    })
}

/// A consumer's view of the store: (username, password).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Value {
    username: String,
    password: String,
}

/// One inventory with one `postgres_password` credential `db` in a JSON file store.
struct Setup {
    dir: tempfile::TempDir,
    port: u16,
    dsn: String,
}

impl Setup {
    /// `rotator` is the inside of the rotator's inline table after `kind` and `admin_dsn`.
    fn new(rotator: &str, timing: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let text = format!(
            "[daemon]\nstate = \"sqlite:state/keyrotd.db\"\nlisten = \"127.0.0.1:{port}\"\n\n\
             [[credential]]\nid = \"db\"\n\
             rotator = {{ kind = \"postgres_password\", admin_dsn = \"env:{DSN_VAR}\", {rotator} }}\n\
             store = {{ kind = \"file\", path = \"{}\", format = \"json\" }}\n{timing}\n",
            dir.path().join("out/db.json").display()
        );
        std::fs::write(dir.path().join("config.toml"), text).unwrap();
        Self {
            dir,
            port,
            dsn: admin_dsn(),
        }
    }

    fn single(role: &str, timing: &str) -> Self {
        fresh_role(role);
        Self::new(
            &format!(
                "strategy = \"single\", role = \"{role}\", sslmode = \"disable\", probe_query = \"SELECT 1\""
            ),
            timing,
        )
    }

    fn alternating(a: &str, b: &str, timing: &str) -> Self {
        fresh_role(a);
        fresh_role(b);
        Self::new(
            &format!(
                "strategy = \"alternating\", roles = [\"{a}\", \"{b}\"], sslmode = \"disable\""
            ),
            timing,
        )
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// `keyrotd --config CONFIG ARGS...` with the admin DSN in its environment.
    fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_dsn(&self.dsn, args)
    }

    fn cli_with_dsn(&self, dsn: &str, args: &[&str]) -> Output {
        keyrotd()
            .arg("--config")
            .arg(self.config())
            .args(args)
            .env(DSN_VAR, dsn)
            .output()
            .expect("spawn keyrotd")
    }

    fn start(&self, log: &str) -> Daemon {
        Daemon::start(
            &self.config(),
            self.port,
            &self.dir.path().join(log),
            &[(DSN_VAR, &self.dsn)],
        )
    }

    fn current(&self) -> Option<Value> {
        read_store(&self.out().join("db.json"))
    }

    fn out_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.out())
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status: {}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()[0].clone()
    }

    fn history(&self) -> String {
        String::from_utf8_lossy(&self.cli(&["history", "db"]).stdout).into_owned()
    }

    /// Asserts that no generated password appears in logs, the state database, the CLI's
    /// output or the server's statement log: only in the store's own files.
    fn assert_no_leak(&self, secrets: &[String], extra: &[String]) {
        let mut everything = all_bytes(self.dir.path(), &[self.out()]);
        everything.extend(self.history().as_bytes());
        everything.extend(self.status().to_string().as_bytes());
        for e in extra {
            everything.extend(e.as_bytes());
        }
        assert!(
            self.dir.path().join("state/keyrotd.db").exists(),
            "the state database was scanned"
        );
        let server_log = std::fs::read(backend_env("KEYROTD_TEST_PG_LOG")).unwrap_or_default();
        assert!(!server_log.is_empty(), "the server log was scanned");
        assert!(
            !contains(&everything, "SCRAM-SHA-256$"),
            "a SCRAM verifier (a password hash) leaked into logs, state or CLI output"
        );
        let mut hashes = verifiers();
        assert!(!hashes.is_empty(), "the verifiers were read");
        hashes.extend(encodings(&admin_password()));
        for needle in &hashes {
            assert!(
                !contains(&everything, needle),
                "a password verifier or the admin password leaked into logs, state or CLI output"
            );
        }
        for secret in secrets {
            for encoded in encodings(secret) {
                assert!(
                    !contains(&everything, &encoded),
                    "a generated password (or its hex or base64) leaked into logs, state or CLI output"
                );
            }
            assert!(
                !contains(&server_log, secret),
                "a generated password is in PostgreSQL's statement log"
            );
        }
    }
}

fn read_store(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value =
        serde_json::from_str(&text).expect("the store file is always complete JSON");
    Some(Value {
        username: v["username"].as_str().expect("a username field").to_owned(),
        password: v["password"].as_str().expect("a password field").to_owned(),
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn single_rotate_sets_a_password_that_logs_in_and_refuses_the_old_one() {
    let s = Setup::single(
        "e2e_single",
        "rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"",
    );
    let first = s.cli(&["rotate", "db"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let v1 = s.current().expect("the store holds the first password");
    assert_eq!(v1.username, "e2e_single");
    assert_eq!(login("e2e_single", &v1.password), Ok(()));
    assert_eq!(
        login("e2e_single", "start-e2e_single").unwrap_err(),
        "28P01",
        "the starting password is refused"
    );

    let second = s.cli(&["rotate", "db"]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(String::from_utf8_lossy(&second.stdout).contains("complete"));
    let v2 = s.current().unwrap();
    assert_ne!(v2.password, v1.password);
    assert_eq!(login("e2e_single", &v2.password), Ok(()));
    assert_eq!(
        login("e2e_single", &v1.password).unwrap_err(),
        "28P01",
        "the old password is refused with invalid_password"
    );
    assert_eq!(s.status()["state"], "idle");
    assert_eq!(
        s.out_files(),
        ["db.json", "db.json.keyrotd"],
        "no leftovers"
    );
    let history = s.history();
    assert_eq!(history.matches("  db  done").count(), 2, "{history}");

    s.assert_no_leak(
        &[v1.password, v2.password],
        &[stderr(&first), stderr(&second)],
    );
}

#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn single_rotate_over_tls_with_the_test_ca() {
    fresh_role("e2e_tls");
    let s = Setup::new(
        &format!(
            "strategy = \"single\", role = \"e2e_tls\", sslmode = \"require\", sslrootcert = \"{}\"",
            backend_env("KEYROTD_TEST_PG_CA")
        ),
        "rotate_every = \"1h\"\nmax_age = \"2h\"\ngrace = \"0s\"",
    );
    let out = s.cli(&["rotate", "db"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = s.current().unwrap();
    assert_eq!(login("e2e_tls", &v.password), Ok(()));
}

/// `keyrotd run` rotating every 2 s with a 1 s grace, while a consumer keeps re-reading the store
/// and logging in with what it finds. The target is zero failed connection attempts.
#[test]
#[ignore = "needs the test backends: run tests/run.sh"]
fn alternating_run_never_cuts_a_rereading_consumer_off() {
    let s = Setup::alternating(
        "e2e_alt_a",
        "e2e_alt_b",
        "rotate_every = \"2s\"\nmax_age = \"10s\"\ngrace = \"1s\"",
    );
    let mut daemon = s.start("daemon.log");

    let stop = Arc::new(AtomicBool::new(false));
    // (attempts, failures with what was used and the error)
    let results: Arc<Mutex<(u32, Vec<String>)>> = Arc::default();
    let client = {
        let (stop, results, store) = (stop.clone(), results.clone(), s.out().join("db.json"));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Some(v) = read_store(&store) else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let started = Instant::now();
                let result = login(&v.username, &v.password);
                let mut r = results.lock().unwrap();
                r.0 += 1;
                if let Err(e) = result {
                    r.1.push(format!(
                        "{} failed after {:?}: {e}",
                        v.username,
                        started.elapsed()
                    ));
                }
            }
        })
    };

    let mut seen: Vec<Value> = Vec::new();
    let started = Instant::now();
    let six_values = wait_until(Duration::from_secs(120), || {
        if let Some(v) = s.current() {
            if seen.last() != Some(&v) {
                seen.push(v);
            }
        }
        seen.len() >= 6
    });
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    assert!(
        six_values,
        "values seen: {}; log:\n{}",
        seen.len(),
        daemon.log_text()
    );
    let (attempts, failures) = results.lock().unwrap().clone();
    eprintln!(
        "alternating via the binary: {} rotations in {elapsed:?}, {attempts} connection attempts, {} failed: {failures:?}",
        seen.len() - 1,
        failures.len()
    );
    assert!(attempts >= 10, "the consumer kept connecting: {attempts}");
    assert!(
        failures.is_empty(),
        "{} of {attempts} connection attempts failed: {failures:?}",
        failures.len()
    );
    // The published role alternates.
    for pair in seen.windows(2) {
        assert_ne!(pair[0].username, pair[1].username, "roles alternate");
    }
    let status = s.status();
    let metrics = http_get(s.port, "/metrics")
        .map(|(_, m)| m)
        .unwrap_or_default();
    assert_eq!(daemon.terminate(Duration::from_secs(20)).code(), Some(0));

    // The last value works; every value replaced by a later activation of its role, or scrambled
    // at revoke, is refused.
    let n = seen.len();
    assert_eq!(login(&seen[n - 1].username, &seen[n - 1].password), Ok(()));
    for old in &seen[..n - 2] {
        assert_eq!(
            login(&old.username, &old.password).unwrap_err(),
            "28P01",
            "an old password of {} is refused",
            old.username
        );
    }
    let secrets: Vec<String> = seen.iter().map(|v| v.password.clone()).collect();
    s.assert_no_leak(&secrets, &[status.to_string(), metrics]);
}
