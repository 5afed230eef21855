//! Helpers for tests that drive the real `keyrotd` binary: spawning it, talking HTTP to it, and
//! finding the external servers that tests/run.sh started.
#![allow(dead_code)] // each test binary uses a different subset

pub mod prometheus;
pub mod silent;
pub mod webhook;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test, logging at the most verbose level: the leak scans of every test then
/// cover what any log level could show.
pub fn keyrotd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrotd"));
    cmd.env_remove("KEYROTD_CONFIG")
        .env_remove("KEYROTD_FAILPOINT")
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

/// A variable exported by tests/run.sh. Panics (never skips) when it is missing.
pub fn backend_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the suite with tests/run.sh, which starts the test servers")
    })
}

/// A free loopback port for a server a test starts later. It is taken below the kernel's
/// ephemeral range: a port from that range can be handed to some client's outgoing connection
/// (a PostgreSQL login, say) before the server binds it, which fails the bind.
pub fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let floor = 10_000.min(low.saturating_sub(1_000));
    for _ in 0..1_000 {
        let port = rand::random_range(floor..low);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below {low}")
}

/// A running `keyrotd run`, killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub port: u16,
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
            port,
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

/// Sends a signal with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Polls `f` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Every regular file under `dir`, recursively, as bytes, except those in `except`.
pub fn all_bytes(dir: &Path, except: &[PathBuf]) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if except.contains(&path) {
            continue;
        }
        if path.is_dir() {
            out.extend(all_bytes(&path, except));
        } else if path.is_file() {
            out.extend(std::fs::read(&path).unwrap());
        }
    }
    out
}

/// `secret` and the encodings of it a log or a dump could show instead: hex (both cases) and
/// base64 (standard and URL-safe, padded or not). A leak scan looks for each.
pub fn encodings(secret: &str) -> Vec<String> {
    const STD: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = secret.as_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut b64 = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            b64.push(STD[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    let unpadded = b64.clone();
    while !b64.len().is_multiple_of(4) {
        b64.push('=');
    }
    let url = unpadded.replace('+', "-").replace('/', "_");
    vec![
        secret.to_owned(),
        hex.to_uppercase(),
        hex,
        b64,
        url,
        unpadded,
    ]
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &str) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
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
