//! Helpers shared by the integration tests of both workspace crates (`tests/integration/` and
//! `rotators/tests/integration/`): free loopback ports, small servers the tests start on loopback
//! (a silent partition, a key-management API, a webhook receiver, a real Prometheus), the OpenBao
//! server's set-up, polling,
//! plain HTTP, leak scans, and the variables of the test servers that `tests/run.sh` starts.
//!
//! Invariants: nothing here skips a test. A test that needs a backend is `#[ignore]`d with
//! [`NEEDS_BACKENDS`] (so a plain `cargo test` reports it as ignored, never as passed), and
//! [`backend_env`] panics when a variable of a backend is missing. Helpers that spawn the
//! `keyrotd` binary live in the daemon's test binary (`tests/integration/support.rs`), which is
//! the only place Cargo tells the binary's path.

#![warn(missing_docs)]

pub mod key_api;
pub mod openbao;
pub mod prometheus;
pub mod silent;
pub mod webhook;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The reason every test that needs the test servers is `#[ignore]`d with; `tests/run.sh` runs
/// them with `--include-ignored`. (An attribute needs a literal: keep the two in step.)
pub const NEEDS_BACKENDS: &str = "needs the test backends: run tests/run.sh";

/// A variable exported by tests/run.sh (one of a backend's `KEYROTD_TEST_*`). Panics (never
/// skips) when it is missing, saying whether the test was run without tests/run.sh or a backend
/// script failed to export it.
#[track_caller]
pub fn backend_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) => value,
        Err(_) if std::env::var_os("KEYROTD_BACKENDS").is_some() => panic!(
            "{name} is not set although KEYROTD_BACKENDS is: a script in tests/backends/ did not export it"
        ),
        Err(_) => panic!(
            "{name} is not set: this test {NEEDS_BACKENDS} (it starts the test servers and sets KEYROTD_BACKENDS=1)"
        ),
    }
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
