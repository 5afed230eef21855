//! Helpers for tests that drive the real `keyrotd` binary: spawning it (one command, a running
//! daemon, a crash at a failpoint). Everything that does not need the binary comes from the
//! shared `keyrotd-test-support` crate, re-exported here so a module needs only
//! `use crate::support::*`. (Only an integration test of this crate knows the binary's path.)

pub use keyrotd_test_support::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test, logging at the most verbose level: the leak scans of every test then
/// cover what any log level could show. It never talks to a service manager the tests run under.
pub fn keyrotd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrotd"));
    cmd.env_remove("KEYROTD_CONFIG")
        .env_remove("KEYROTD_FAILPOINT")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env("KEYROTD_LOG", "trace");
    cmd
}

/// Runs `keyrotd --config CONFIG ARGS...` to completion.
pub fn cli(config: &Path, args: &[&str]) -> Output {
    keyrotd()
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("spawn keyrotd")
}

/// A running `keyrotd run`, killed when dropped.
pub struct Daemon {
    /// The `keyrotd run` process.
    pub child: Child,
    /// The file its stderr (the log) goes to.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `keyrotd run` and waits until /readyz answers 200.
    pub fn start(config: &Path, port: u16, log: &Path, env: &[(&str, &str)]) -> Self {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = keyrotd();
        cmd.arg("--config")
            .arg(config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(log_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn keyrotd run");
        let mut d = Self {
            child,
            log: log.to_owned(),
        };
        let ready = wait_until(Duration::from_secs(20), || {
            matches!(http_get(port, "/readyz"), Some((200, _)))
        });
        if !ready {
            let _ = d.child.kill();
            panic!("keyrotd did not become ready; log:\n{}", d.log_text());
        }
        d
    }

    /// Everything it has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, like `kill -9`.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "keyrotd did not stop within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `keyrotd rotate ID` with `KEYROTD_FAILPOINT=point`, waits until it hangs there, and
/// kills it with SIGKILL: a crash at exactly that step boundary. Its stderr goes to `log`.
pub fn crash_at(config: &Path, id: &str, point: &str, env: &[(&str, &str)], log: &Path) {
    let mut cmd = keyrotd();
    cmd.arg("--config")
        .arg(config)
        .args(["rotate", id])
        .env("KEYROTD_FAILPOINT", point)
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut crashed = cmd.spawn().expect("spawn keyrotd rotate");
    let reached = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains("failpoint")
    });
    if !reached {
        let _ = crashed.kill();
    }
    assert!(
        reached,
        "{point}: failpoint not reached:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    crashed.kill().unwrap(); // SIGKILL
    crashed.wait().unwrap();
}
