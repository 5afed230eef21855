//! The mass-rotation bench: `cargo bench --bench mass`.
//!
//! Prints figures against the journal targets of the performance issue; it is not a pass/fail
//! test. For each `max_concurrent_rotations` in `KEYROTD_BENCH_CONCURRENCY` (default `1,4,16,64`)
//! it writes an inventory of N credentials (env `KEYROTD_BENCH_ROTATIONS`, default 5,000), each a
//! `random` rotator with a `file` store and no grace period, none ever rotated, so all are due at
//! once; spawns the release `keyrotd run` (or `KEYROTD_BENCH_BINARY`) and, once every rotation is
//! `done`, reports:
//!
//! - rotations/s: N over the span of the journal, first `start` to last `ok` (`steps.at_ms`);
//! - state commits (each one fsync) and writes per rotation, from the daemon's
//!   `keyrotd_state_commits_total` and `keyrotd_state_writes_total`;
//! - CPU per rotation: the daemon's whole utime + stime (`/proc/PID/stat`, start-up included)
//!   over N.
//!
//! First it measures the journal's fsync ceiling on the same disk: tiny SQLite transactions in
//! WAL mode with `synchronous=FULL`, one after another, for two seconds. Linux only.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

mod support;
use support::{
    clock_ticks, cpu_user_system, env_number, free_port, get, locate_binary, random_credential,
    spawn_daemon,
};

/// Rotations per second at concurrency 64.
const RATE_TARGET: f64 = 1000.0;
/// State commits (fsyncs) per rotation at concurrency 64.
const COMMITS_TARGET: f64 = 2.0;
/// CPU per rotation, in milliseconds.
const CPU_TARGET_MS: f64 = 1.0;

/// One run's figures.
struct Run {
    concurrency: usize,
    seconds: f64,
    counts: Option<(f64, f64)>,
    user_ms: f64,
    system_ms: f64,
}

fn main() {
    let n = env_number("KEYROTD_BENCH_ROTATIONS", 5_000);
    let levels: Vec<usize> = std::env::var("KEYROTD_BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,4,16,64".into())
        .split(',')
        .map(|c| {
            c.trim()
                .parse()
                .expect("KEYROTD_BENCH_CONCURRENCY: numbers")
        })
        .collect();
    let binary = locate_binary();
    println!(
        "keyrotd mass-rotation bench: {n} credentials all due at once, random rotator + file store, grace 0, binary {}",
        binary.display()
    );
    let ceiling = fsync_ceiling();
    println!("  journal fsync ceiling: {ceiling:.0} WAL commits/s (one tiny transaction each, synchronous=FULL, same disk)");
    let runs: Vec<Run> = levels
        .iter()
        .map(|&c| {
            let run = mass_rotation(&binary, n, c);
            println!(
                "  max_concurrent_rotations {c:>3}: {n} rotations in {:.2} s",
                run.seconds
            );
            run
        })
        .collect();
    print!("{}", report(n, ceiling, &runs));
}

fn report(n: usize, ceiling: f64, runs: &[Run]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nresults ({n} rotations, {} cores)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let _ = writeln!(
        out,
        "  concurrency  rotations/s  commits/rotation  writes/rotation  CPU ms/rotation (user + sys)"
    );
    for r in runs {
        let rate = n as f64 / r.seconds;
        let (commits, writes) = r.counts.map_or(("n/a".into(), "n/a".into()), |(c, w)| {
            (format!("{c:.2}"), format!("{w:.2}"))
        });
        let _ = writeln!(
            out,
            "  {:>11}  {rate:>11.0}  {commits:>16}  {writes:>15}  {:>6.3} ({:.3} + {:.3})",
            r.concurrency,
            r.user_ms + r.system_ms,
            r.user_ms,
            r.system_ms
        );
    }
    if let Some(top) = runs.iter().max_by_key(|r| r.concurrency) {
        let rate = n as f64 / top.seconds;
        let cpu = top.user_ms + top.system_ms;
        let _ = writeln!(
            out,
            "  at {}: {:.0} rotations/s {}, CPU {cpu:.3} ms/rotation {}",
            top.concurrency,
            rate,
            verdict(rate >= RATE_TARGET, ">= 1,000/s at 64"),
            verdict(cpu < CPU_TARGET_MS, "< 1 ms")
        );
        if let Some((commits, _)) = top.counts {
            let _ = writeln!(
                out,
                "  at {}: {commits:.2} commits/rotation {}; the fsync ceiling allows {:.0} rotations/s at that ratio",
                top.concurrency,
                verdict(commits <= COMMITS_TARGET, "<= 2 at 64"),
                ceiling / commits
            );
        }
    }
    out
}

/// Rotates `n` credentials with `max_concurrent_rotations = concurrency` and measures it.
fn mass_rotation(binary: &Path, n: usize, concurrency: usize) -> Run {
    let dir = tempfile::Builder::new()
        .prefix("keyrotd-mass-")
        .tempdir()
        .expect("creating a temp dir");
    let port = free_port();
    let config = write_inventory(dir.path(), n, port, concurrency);
    let state = dir.path().join("state.db");
    let log_path = dir.path().join("daemon.log");
    let mut child = spawn_daemon(binary, &config, &log_path);
    let started = Instant::now();
    let mut done = 0;
    while done < n {
        if let Ok(Some(status)) = child.try_wait() {
            fail(&mut child, &log_path, &format!("keyrotd exited ({status})"));
        }
        if started.elapsed() > Duration::from_secs(1800) {
            fail(
                &mut child,
                &log_path,
                &format!("only {done} of {n} done after 30 min"),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
        done = query(
            &state,
            "SELECT COUNT(*) FROM rotations WHERE phase = 'done'",
        )
        .unwrap_or(0) as usize;
    }
    let (user, system) = cpu_user_system(child.id());
    let metrics = get(SocketAddr::from(([127, 0, 0, 1], port)), "/metrics")
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .unwrap_or_default();
    let first = query(&state, "SELECT MIN(at_ms) FROM steps").expect("the journal");
    let last = query(&state, "SELECT MAX(at_ms) FROM steps").expect("the journal");
    terminate(&mut child);
    let per = |ticks: u64| ticks as f64 * 1000.0 / clock_ticks() as f64 / n as f64;
    let counter = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
    };
    let counts = counter("keyrotd_state_commits_total ")
        .zip(counter("keyrotd_state_writes_total "))
        .map(|(c, w)| (c / n as f64, w / n as f64));
    Run {
        concurrency,
        seconds: ((last - first) as f64 / 1000.0).max(0.001),
        counts,
        user_ms: per(user),
        system_ms: per(system),
    }
}

/// One number from the state database, read as `keyrotd status` would, beside the daemon.
fn query(state: &Path, sql: &str) -> Option<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(state, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.busy_timeout(Duration::from_secs(5)).ok()?;
    conn.query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
        .ok()
        .flatten()
}

/// Tiny SQLite WAL commits with `synchronous=FULL` per second, for two seconds.
fn fsync_ceiling() -> f64 {
    let dir = tempfile::Builder::new()
        .prefix("keyrotd-fsync-")
        .tempdir()
        .expect("creating a temp dir");
    let conn = rusqlite::Connection::open(dir.path().join("ceiling.db")).expect("a database");
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.execute("CREATE TABLE t (x INTEGER)", []).unwrap();
    let mut insert = conn.prepare("INSERT INTO t (x) VALUES (?1)").unwrap();
    let (t, mut commits) = (Instant::now(), 0u64);
    while t.elapsed() < Duration::from_secs(2) {
        insert.execute([commits as i64]).unwrap();
        commits += 1;
    }
    commits as f64 / t.elapsed().as_secs_f64()
}

/// Writes the inventory: `n` credentials, none rotated yet, so all are due at start-up.
fn write_inventory(dir: &Path, n: usize, port: u16, concurrency: usize) -> PathBuf {
    let stores = dir.join("store");
    fs::create_dir_all(&stores).expect("creating the store dir");
    let path = dir.join("inventory.toml");
    let mut out = BufWriter::new(fs::File::create(&path).expect("creating the inventory"));
    writeln!(
        out,
        "[daemon]\nstate = \"sqlite:{}\"\nlisten = \"127.0.0.1:{port}\"\nmax_concurrent_rotations = {concurrency}\n\n\
         [defaults]\ngrace = \"0s\"\n",
        dir.join("state.db").display()
    )
    .unwrap();
    for i in 0..n {
        random_credential(&mut out, i, &stores);
        writeln!(out, "rotate_every = \"30d\"\nmax_age = \"40d\"").unwrap();
    }
    out.flush().expect("writing the inventory");
    path
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn verdict(met: bool, target: &str) -> String {
    format!("[{} target {target}]", if met { "MET" } else { "MISSED" })
}

/// Stops the daemon, shows the end of its log (the temp dir is kept for inspection) and exits.
fn fail(child: &mut Child, log: &Path, message: &str) -> ! {
    let _ = child.kill();
    let _ = child.wait();
    let tail = fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = tail.lines().rev().take(30).collect();
    eprintln!(
        "error: {message}\nlast daemon log lines:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    std::process::exit(1);
}
