//! `Type=notify` through the real binary: a datagram socket stands in for systemd's
//! `NOTIFY_SOCKET`, and the tests read what `keyrotd run` tells it (readiness, status, reload,
//! stop, watchdog). Also the unit file, checked with `systemd-analyze`.

use crate::support::*;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The watchdog interval the tests give: the daemon must ping every second.
const WATCHDOG_USEC: &str = "2000000";

/// What systemd would have received: each datagram with its arrival time, and for each
/// `READY=1` whether `/readyz` answered 200 at that moment.
#[derive(Default)]
struct Received {
    datagrams: Vec<(Instant, String)>,
    readyz_at_ready: Vec<bool>,
}

/// A notify socket read by a thread until dropped.
struct NotifySocket {
    path: PathBuf,
    received: Arc<Mutex<Received>>,
    stop: Arc<AtomicBool>,
}

impl NotifySocket {
    fn bind(dir: &Path, port: u16) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let received = Arc::new(Mutex::new(Received::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (into, stopped) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                let Ok(n) = socket.recv(&mut buf) else {
                    continue;
                };
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let ready = text.lines().any(|l| l == "READY=1");
                let readyz = ready && matches!(http_get(port, "/readyz"), Some((200, _)));
                let mut r = into.lock().unwrap();
                r.datagrams.push((Instant::now(), text));
                if ready {
                    r.readyz_at_ready.push(readyz);
                }
            }
        });
        Self {
            path,
            received,
            stop,
        }
    }

    /// The datagrams so far, as text.
    fn texts(&self) -> Vec<String> {
        let r = self.received.lock().unwrap();
        r.datagrams.iter().map(|(_, t)| t.clone()).collect()
    }

    /// How many datagrams so far contain the line `line`.
    fn count(&self, line: &str) -> usize {
        self.texts()
            .iter()
            .filter(|t| t.lines().any(|l| l == line))
            .count()
    }

    /// Waits until `n` datagrams contain `line`.
    fn await_count(&self, line: &str, n: usize, within: Duration) {
        let ok = wait_until(within, || self.count(line) >= n);
        assert!(
            ok,
            "expected {n} datagrams with {line:?} within {within:?}; got {:#?}",
            self.texts()
        );
    }

    /// Arrival times of the `WATCHDOG=1` pings.
    fn pings(&self) -> Vec<Instant> {
        let r = self.received.lock().unwrap();
        r.datagrams
            .iter()
            .filter(|(_, t)| t.lines().any(|l| l == "WATCHDOG=1"))
            .map(|(at, _)| *at)
            .collect()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// An inventory with one `random` credential in a JSON file store, plus `daemon` lines.
fn inventory(dir: &Path, port: u16, daemon: &str) -> PathBuf {
    let text = format!(
        "[daemon]\nstate = \"sqlite:state/keyrotd.db\"\nlisten = \"127.0.0.1:{port}\"\n{daemon}\n\n\
         [[credential]]\nid = \"db\"\nrotate_every = \"30d\"\nmax_age = \"40d\"\n\
         rotator = {{ kind = \"random\", length = 32 }}\nstore = {{ kind = \"file\", path = \"{}\", format = \"json\" }}\n",
        dir.join("out/db.json").display()
    );
    let config = dir.join("config.toml");
    std::fs::write(&config, text).unwrap();
    config
}

/// `keyrotd run` on [`inventory`] with `daemon` lines, told to notify a fresh [`NotifySocket`];
/// `env` adds to its environment. Fields drop in order: the daemon first, the directory last.
struct Notified {
    daemon: Daemon,
    notify: NotifySocket,
    port: u16,
    config: PathBuf,
    dir: tempfile::TempDir,
}

impl Notified {
    fn start(daemon: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = inventory(dir.path(), port, daemon);
        let notify = NotifySocket::bind(dir.path(), port);
        let mut env = env.to_vec();
        env.push(("NOTIFY_SOCKET", notify.path.to_str().unwrap()));
        let daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"), &env);
        Self {
            daemon,
            notify,
            port,
            config,
            dir,
        }
    }
}

fn status_lines(texts: &[String]) -> Vec<String> {
    texts
        .iter()
        .flat_map(|t| t.lines())
        .filter_map(|l| l.strip_prefix("STATUS="))
        .map(str::to_owned)
        .collect()
}

#[test]
fn ready_status_watchdog_reload_and_stopping_reach_systemd() {
    let mut n = Notified::start("", &[("WATCHDOG_USEC", WATCHDOG_USEC)]);

    // READY=1 once, sent when /readyz already answers ready, with the status line.
    n.notify.await_count("READY=1", 1, Duration::from_secs(10));
    assert_eq!(n.notify.received.lock().unwrap().readyz_at_ready, [true]);
    let first = n.notify.texts().into_iter().find(|t| t.contains("READY=1"));
    assert!(
        first
            .as_deref()
            .is_some_and(|t| t.contains("STATUS=1 credential: ")
                && t.contains(" rotating, ")
                && t.contains(" failed")),
        "{first:?}"
    );

    // The scheduling loop pings every half WATCHDOG_USEC (1 s).
    let since = n.notify.count("WATCHDOG=1");
    n.notify
        .await_count("WATCHDOG=1", since + 4, Duration::from_secs(8));
    let pings = n.notify.pings();
    let recent = &pings[pings.len() - 4..];
    for w in recent.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            // Every 1 s; under load a ping may come late, but never past WATCHDOG_USEC.
            gap >= Duration::from_millis(500) && gap < Duration::from_millis(1900),
            "pings should come every 1 s, got a gap of {gap:?}"
        );
    }

    // A valid reload: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
    signal(n.daemon.child.id(), "HUP");
    n.notify.await_count("READY=1", 2, Duration::from_secs(15));
    let texts = n.notify.texts();
    let reloading = texts
        .iter()
        .position(|t| t.lines().any(|l| l == "RELOADING=1"))
        .expect("RELOADING=1 after SIGHUP");
    assert!(
        texts[reloading].lines().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| v.parse::<u64>().is_ok())),
        "{:?}",
        texts[reloading]
    );
    let ready_again = texts
        .iter()
        .rposition(|t| t.lines().any(|l| l == "READY=1"))
        .unwrap();
    assert!(reloading < ready_again, "{texts:#?}");

    // A refused reload: RELOADING=1, then READY=1 for the inventory still running.
    std::fs::write(&n.config, "this is not toml [").unwrap();
    signal(n.daemon.child.id(), "HUP");
    n.notify
        .await_count("RELOADING=1", 2, Duration::from_secs(10));
    n.notify.await_count("READY=1", 3, Duration::from_secs(10));
    assert!(n.daemon.log_text().contains("reload refused"));
    let last_status = status_lines(&n.notify.texts()).pop().unwrap();
    assert!(last_status.starts_with("1 credential: "), "{last_status}");

    // SIGTERM: STOPPING=1 and a clean exit.
    let status = n.daemon.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", n.daemon.log_text());
    n.notify
        .await_count("STOPPING=1", 1, Duration::from_secs(2));
    let texts = n.notify.texts();
    let stopping = texts
        .iter()
        .position(|t| t.lines().any(|l| l == "STOPPING=1"))
        .unwrap();
    assert!(ready_again < stopping, "{texts:#?}");
}

#[test]
fn status_follows_a_rotation_in_flight() {
    // The credential was never rotated, so it rotates at once and hangs at the failpoint.
    let mut n = Notified::start(
        "shutdown_timeout = \"1s\"",
        &[("KEYROTD_FAILPOINT", "stage:start")],
    );
    let rotating = "1 credential: 1 rotating, 0 retrying, 0 failed";
    let ok = wait_until(Duration::from_secs(10), || {
        status_lines(&n.notify.texts())
            .iter()
            .any(|s| s == rotating)
    });
    assert!(ok, "no {rotating:?} status: {:#?}", n.notify.texts());
    // No watchdog without WATCHDOG_USEC.
    assert_eq!(n.notify.count("WATCHDOG=1"), 0);
    // Sent when it changed, not on every tick.
    std::thread::sleep(Duration::from_secs(4));
    let statuses = status_lines(&n.notify.texts());
    assert_eq!(
        statuses.iter().filter(|s| *s == rotating).count(),
        1,
        "{statuses:#?}"
    );
    n.daemon.terminate(Duration::from_secs(20));
}

/// The largest gap between consecutive instants.
fn largest_gap(pings: &[Instant]) -> Duration {
    pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

/// Holds, from this process, the write locks on the five WAL read marks of the state database's
/// `-shm` file (bytes 123 to 127, SQLite's documented WAL-index locks): no other process can
/// begin a read, and SQLite retries for about 10 s before it gives up.
fn block_readers(shm: &Path) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(shm)
        .unwrap();
    // SAFETY: a plain fcntl record lock on an open file; `lock` outlives the call.
    let rc = unsafe {
        let mut lock: libc::flock = std::mem::zeroed();
        lock.l_type = libc::F_WRLCK as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        lock.l_start = 123;
        lock.l_len = 5;
        libc::fcntl(file.as_raw_fd(), libc::F_SETLKW, &lock)
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    file
}

#[test]
fn a_stuck_scheduling_loop_stops_the_watchdog_pings() {
    let mut n = Notified::start("", &[("WATCHDOG_USEC", WATCHDOG_USEC)]);
    n.notify
        .await_count("WATCHDOG=1", 3, Duration::from_secs(10));
    // Every 2 s the loop asks the state database whether another process committed; with the
    // readers blocked, that question (and the loop with it) hangs while the rest of the daemon
    // goes on: a timer of its own would go on pinging.
    let locked = Instant::now();
    let held = block_readers(&n.dir.path().join("state/keyrotd.db-shm"));
    std::thread::sleep(Duration::from_secs(8));
    drop(held);
    let unlocked = Instant::now();
    n.notify.await_count(
        "WATCHDOG=1",
        n.notify.count("WATCHDOG=1") + 3,
        Duration::from_secs(20),
    );
    let pings = n.notify.pings();
    let during: Vec<Instant> = pings.iter().copied().filter(|at| *at >= locked).collect();
    let gap = largest_gap(&during);
    assert!(
        gap > Duration::from_secs(4),
        "a stuck loop must stop the pings for longer than WATCHDOG_USEC; largest gap {gap:?}"
    );
    // And they resume once the loop turns again.
    let after: Vec<Instant> = pings.into_iter().filter(|at| *at >= unlocked).collect();
    assert!(
        largest_gap(&after) < Duration::from_millis(1900),
        "{after:?}"
    );
    assert!(http_get(n.port, "/healthz").is_some_and(|(code, _)| code == 200));
    n.daemon.terminate(Duration::from_secs(30));
}

#[test]
fn without_notify_socket_or_for_another_pid_nothing_is_sent_and_nothing_breaks() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = inventory(dir.path(), port, "");
    let log = dir.path().join("daemon.log");
    // No NOTIFY_SOCKET: a watchdog setting alone changes nothing; reload and stop work.
    let mut daemon = Daemon::start(&config, port, &log, &[("WATCHDOG_USEC", WATCHDOG_USEC)]);
    signal(daemon.child.id(), "HUP");
    assert!(wait_until(Duration::from_secs(10), || daemon
        .log_text()
        .contains("inventory reloaded")));
    assert!(daemon.terminate(Duration::from_secs(20)).success());
    assert!(
        !daemon.log_text().contains("notifying systemd"),
        "{}",
        daemon.log_text()
    );

    // WATCHDOG_PID names another process: readiness is sent, pings are not.
    let notify = NotifySocket::bind(dir.path(), port);
    let socket = notify.path.to_str().unwrap();
    let mut daemon = Daemon::start(
        &config,
        port,
        &log,
        &[
            ("NOTIFY_SOCKET", socket),
            ("WATCHDOG_USEC", WATCHDOG_USEC),
            ("WATCHDOG_PID", "1"),
        ],
    );
    notify.await_count("READY=1", 1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(notify.count("WATCHDOG=1"), 0, "{:#?}", notify.texts());
    daemon.terminate(Duration::from_secs(20));
}

/// `systemd-analyze` on the shipped unit: `verify` is clean and the exposure score is at most
/// 2.0. The unit names `/usr/bin/keyrotd`; `verify` checks that it exists, so it runs on a copy
/// naming the binary under test.
#[test]
fn the_unit_verifies_and_its_exposure_is_at_most_2() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/keyrotd.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in ["Type=notify", "NotifyAccess=main", "WatchdogSec=60s"] {
        assert!(text.lines().any(|l| l == line), "the unit lacks {line}");
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("keyrotd.service");
    std::fs::write(
        &copy,
        text.replace("/usr/bin/keyrotd", env!("CARGO_BIN_EXE_keyrotd")),
    )
    .unwrap();
    let analyze = |args: &[&str], unit: &Path| {
        Command::new("systemd-analyze")
            .args(args)
            .arg(unit)
            .output()
            .expect("systemd-analyze is installed (tests/install-deps.sh)")
    };
    let verify = analyze(&["verify"], &copy);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(verify.status.success() && said.trim().is_empty(), "{said}");

    let security = analyze(&["security", "--offline=true"], &unit);
    let out = String::from_utf8_lossy(&security.stdout);
    let score: f64 = out
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for keyrotd.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure score: {out}{}",
                String::from_utf8_lossy(&security.stderr)
            )
        });
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{out}");
}
