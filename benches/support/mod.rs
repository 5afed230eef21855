//! What the benches share: finding the release binary, a loopback HTTP GET, a process's CPU
//! time from `/proc`, numbers from the environment. Linux only.

// Each bench compiles this module on its own and uses a part of it.
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let (user, system) = cpu_user_system(pid);
    user + system
}

/// utime and stime of a process, in clock ticks.
pub fn cpu_user_system(pid: u32) -> (u64, u64) {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc/PID/stat");
    // The command name (field 2) is parenthesised and may contain spaces: count from after it.
    let rest = &stat[stat.rfind(')').expect("a /proc/PID/stat line") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of the line; `rest` starts at field 3.
    let ticks = |i: usize| fields[i].parse::<u64>().unwrap_or(0);
    (ticks(11), ticks(12))
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// `KEYROTD_BENCH_BINARY` (another build to compare, a saved release binary of an earlier commit
/// say), or the release `keyrotd` next to this bench (`target/release/deps/scale-*` ->
/// `target/release/`), built if missing.
pub fn locate_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KEYROTD_BENCH_BINARY") {
        return PathBuf::from(path);
    }
    if let Some(path) = option_env!("CARGO_BIN_EXE_keyrotd")
        .map(PathBuf::from)
        .filter(|p| p.exists())
    {
        return path;
    }
    let exe = std::env::current_exe().expect("the bench's own path");
    let release = exe
        .ancestors()
        .find(|d| d.file_name().is_some_and(|n| n == "release"))
        .map(Path::to_path_buf);
    let candidate = release
        .unwrap_or_else(|| {
            exe.parent()
                .and_then(Path::parent)
                .unwrap_or(Path::new("."))
                .to_path_buf()
        })
        .join("keyrotd");
    if !candidate.exists() {
        println!("building {} ...", candidate.display());
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--bin", "keyrotd"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build");
        assert!(
            status.success(),
            "cargo build --release --bin keyrotd failed"
        );
    }
    candidate
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// An HTTP response: its status and body.
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

/// A plain HTTP/1.0 GET: the server closes the connection after the body.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    get_with(addr, path, "")
}

/// [`get`] with extra header lines (each ending in `\r\n`).
pub fn get_with(addr: SocketAddr, path: &str, headers: &str) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{headers}\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    Ok(Response {
        status,
        body: raw[split + 4..].to_vec(),
    })
}

/// A number from the environment (`_` separators allowed), or `default`.
pub fn env_number(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

/// Writes the start of credential number `i` of a bench inventory (`svc-NNNNNN-token`, a
/// `random` rotator, a `file` store in `stores`), leaving its schedule to the caller, and returns
/// its id.
pub fn random_credential(out: &mut impl Write, i: usize, stores: &Path) -> String {
    let id = format!("svc-{i:06}-token");
    write!(
        out,
        "\n[[credential]]\nid = \"{id}\"\nrotator = {{ kind = \"random\", length = 32, alphabet = \"base64url\" }}\n\
         store = {{ kind = \"file\", path = \"{}\" }}\n",
        stores.join(&id).display()
    )
    .expect("writing the inventory");
    id
}

/// Starts `binary run --config CONFIG`, logging at `info` into `log`.
pub fn spawn_daemon(binary: &Path, config: &Path, log: &Path) -> Child {
    Command::new(binary)
        .args(["run", "--config"])
        .arg(config)
        .env("KEYROTD_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).expect("creating the daemon log"))
        .spawn()
        .expect("spawning keyrotd")
}
