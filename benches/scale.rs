//! The scale bench: `cargo bench --bench scale`.
//!
//! Prints figures against the scale targets of the core-daemon issue; it is not a pass/fail test.
//! It generates an inventory of N credentials (env `KEYROTD_BENCH_CREDENTIALS`, default 100,000)
//! in a temporary directory, seeds the state database so that none of them is due, spawns the
//! release `keyrotd run`, and measures:
//!
//! - the wall time until `/readyz` answers 200, then until a full `/metrics` scrape has been read;
//! - the size and fetch time of that scrape;
//! - idle CPU over `KEYROTD_BENCH_IDLE_SECS` (default 30) seconds, from `/proc/PID/stat`;
//! - RSS (`VmRSS`) and peak RSS (`VmHWM`) after ready, after the scrape and after the idle period;
//! - the peak RSS of `keyrotd check` on the same inventory (`ru_maxrss`), run first;
//! - how long the daemon takes to exit after SIGTERM.
//!
//! Linux only (it reads `/proc`).

use std::fmt::Write as _;
use std::fs;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Datelike;

mod support;
use support::{
    clock_ticks, cpu_ticks, env_number, free_port, get, get_with, locate_binary, random_credential,
    spawn_daemon,
};

// Issue 13's scrape rows (gzip, compact mode), kept in their own file.
#[path = "scale/scrapes.rs"]
mod scrapes;
use scrapes::scrape_variants;

/// Ready (loaded, validated, scheduled, serving /metrics) within this long.
const READY_TARGET: Duration = Duration::from_secs(2);
/// Idle CPU, in percent of one core.
const IDLE_CPU_TARGET: f64 = 0.2;
/// Resident memory, in MiB.
const RSS_TARGET_MIB: f64 = 100.0;
/// Peak resident memory while loading (`run` and `check`), in MiB (issue 13).
const LOAD_PEAK_TARGET_MIB: f64 = 64.0;

/// Interval-based credentials cycle through these (`rotate_every`, `max_age`).
const INTERVALS: [(&str, &str); 3] = [("30d", "40d"), ("60d", "70d"), ("90d", "100d")];
/// Distinct cron schedules shared by the cron-based credentials.
const CRON_GROUPS: usize = 10;
/// Out of every 10 credentials, this many use a cron schedule; the rest an interval.
const CRON_SHARE: usize = 4;

fn main() {
    let n = env_number("KEYROTD_BENCH_CREDENTIALS", 100_000);
    let idle_secs = env_number("KEYROTD_BENCH_IDLE_SECS", 30) as u64;
    let binary = locate_binary();
    let dir = tempfile::Builder::new()
        .prefix("keyrotd-scale-")
        .tempdir()
        .expect("creating a temp dir");
    let port = free_port();

    println!(
        "keyrotd scale bench: {n} credentials, binary {}",
        binary.display()
    );
    let t = Instant::now();
    let (config, ids) = write_inventory(dir.path(), n, port);
    let config_bytes = fs::metadata(&config).map(|m| m.len()).unwrap_or(0);
    println!(
        "  inventory: {} ({:.1} MiB) written in {:.2} s",
        config.display(),
        mib(config_bytes),
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    seed_state(&dir.path().join("state.db"), &ids);
    println!(
        "  state: {} credential records seeded (none due) in {:.2} s",
        ids.len(),
        t.elapsed().as_secs_f64()
    );

    // `keyrotd check` first, while it is the only child: RUSAGE_CHILDREN then reports its peak.
    let t = Instant::now();
    let checked = Command::new(&binary)
        .args(["check", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running keyrotd check");
    let check_time = t.elapsed();
    assert!(checked.success(), "keyrotd check failed: {checked}");
    let check_peak_kib = children_peak_kib();

    let log_path = dir.path().join("daemon.log");
    let started = Instant::now();
    let mut child = spawn_daemon(&binary, &config, &log_path);
    let pid = child.id();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));

    // Ready: /readyz answers 200.
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            fail(
                &mut child,
                &log_path,
                &format!("keyrotd exited during start-up ({status})"),
            );
        }
        if started.elapsed() > Duration::from_secs(300) {
            fail(&mut child, &log_path, "keyrotd was not ready after 300 s");
        }
        if get(addr, "/readyz").is_ok_and(|r| r.status == 200) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let ready = started.elapsed();
    let rss_ready = memory(pid);

    // Serving: a full /metrics scrape.
    let t = Instant::now();
    let scrape = match get(addr, "/metrics") {
        Ok(scrape) => scrape,
        Err(e) => fail(&mut child, &log_path, &format!("GET /metrics failed: {e}")),
    };
    let fetch = t.elapsed();
    let scraped = started.elapsed();
    if scrape.status != 200 {
        fail(
            &mut child,
            &log_path,
            &format!("GET /metrics answered {}", scrape.status),
        );
    }
    let body = String::from_utf8_lossy(&scrape.body);
    let series = body
        .lines()
        .filter(|l| l.starts_with("keyrotd_credential_max_age_seconds{"))
        .count();
    let lines = body.lines().count();
    let rss_scrape = memory(pid);

    // Idle: let the start-up and the scrape settle, then count CPU ticks.
    std::thread::sleep(Duration::from_secs(1));
    let tck = clock_ticks();
    let (ticks_before, t) = (cpu_ticks(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(idle_secs));
    let (ticks_after, window) = (cpu_ticks(pid), t.elapsed());
    let idle_cpu = (ticks_after - ticks_before) as f64 / tck as f64 / window.as_secs_f64() * 100.0;
    let rss_idle = memory(pid);
    let threads = proc_status_field(pid, "Threads:").unwrap_or_default();
    let scrape_variants = scrape_variants(&mut child, addr, &config, &log_path, &scrape.body);

    // Shutdown on SIGTERM.
    let t = Instant::now();
    terminate(&child);
    let exit = wait_for_exit(&mut child, Duration::from_secs(60));
    let shutdown = t.elapsed();

    let daemon_ready_ms = fs::read_to_string(&log_path).ok().and_then(|log| {
        log.lines()
            .find(|l| l.contains("keyrotd ready"))
            .and_then(|l| field_after(l, "ready_ms="))
            .map(str::to_owned)
    });

    let peak = [rss_ready, rss_scrape, rss_idle]
        .iter()
        .map(|m| m.hwm_kib)
        .max()
        .unwrap_or(0);
    let mut report = String::new();
    let _ = writeln!(
        report,
        "\nresults ({n} credentials, {} cron groups, {} cores)",
        CRON_GROUPS,
        cores()
    );
    let _ = writeln!(
        report,
        "  /readyz 200 after        {:>8.3} s   {}",
        ready.as_secs_f64(),
        verdict(ready <= READY_TARGET, "< 2 s")
    );
    if let Some(ms) = daemon_ready_ms {
        let _ = writeln!(report, "    (daemon's own ready_ms {ms}: run() start to ready; inventory loading comes before it)");
    }
    let _ = writeln!(
        report,
        "  first full /metrics at  {:>8.3} s   {}",
        scraped.as_secs_f64(),
        verdict(scraped <= READY_TARGET, "< 2 s")
    );
    let _ = writeln!(
        report,
        "  /metrics fetch          {:>8.3} s   {:.1} MiB, {lines} lines, {series} credentials in max_age family",
        fetch.as_secs_f64(),
        mib(scrape.body.len() as u64)
    );
    let _ = writeln!(
        report,
        "  idle CPU                {:>8.3} %   of one core over {:.1} s ({} ticks at {tck} Hz) {}",
        idle_cpu,
        window.as_secs_f64(),
        ticks_after - ticks_before,
        verdict(idle_cpu < IDLE_CPU_TARGET, "< 0.2 %")
    );
    for (label, m) in [
        ("RSS after ready", rss_ready),
        ("RSS after /metrics", rss_scrape),
        ("RSS after idle", rss_idle),
    ] {
        let _ = writeln!(
            report,
            "  {label:<23} {:>8.1} MiB (VmHWM peak {:.1} MiB) {}",
            m.rss_kib as f64 / 1024.0,
            m.hwm_kib as f64 / 1024.0,
            verdict((m.rss_kib as f64 / 1024.0) < RSS_TARGET_MIB, "< 100 MB")
        );
    }
    let _ = writeln!(
        report,
        "  peak RSS (VmHWM)        {:>8.1} MiB     {}",
        peak as f64 / 1024.0,
        verdict((peak as f64 / 1024.0) < RSS_TARGET_MIB, "< 100 MB")
    );
    let _ = writeln!(
        report,
        "  loading peak (run)      {:>8.1} MiB     {}",
        peak as f64 / 1024.0,
        verdict((peak as f64 / 1024.0) < LOAD_PEAK_TARGET_MIB, "< 64 MiB")
    );
    let _ = writeln!(
        report,
        "  `keyrotd check` peak    {:>8.1} MiB     {} (in {:.2} s)",
        check_peak_kib as f64 / 1024.0,
        verdict(
            (check_peak_kib as f64 / 1024.0) < LOAD_PEAK_TARGET_MIB,
            "< 64 MiB"
        ),
        check_time.as_secs_f64()
    );
    report.push_str(&scrape_variants);
    let _ = writeln!(report, "  threads                 {threads:>8}");
    let _ = writeln!(
        report,
        "  SIGTERM to exit         {:>8.3} s   ({exit})",
        shutdown.as_secs_f64()
    );
    print!("{report}");
}

/// The largest peak RSS among the waited-for children so far, in KiB (`ru_maxrss`).
fn children_peak_kib() -> u64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_CHILDREN is a valid `who`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(rc, 0, "getrusage failed");
    usage.ru_maxrss as u64
}

/// Resident memory of a process, in KiB.
#[derive(Clone, Copy, Default)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

fn memory(pid: u32) -> Memory {
    let kib = |field| {
        proc_status_field(pid, field)
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    }
}

fn proc_status_field(pid: u32, field: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_owned())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Writes the inventory and returns its path and the credential ids.
fn write_inventory(dir: &Path, n: usize, port: u16) -> (PathBuf, Vec<String>) {
    let stores = dir.join("store");
    fs::create_dir_all(&stores).expect("creating the store dir");
    // Monthly schedules on days other than today and tomorrow, so none fires during the bench.
    let today = chrono::Utc::now().day();
    let days: Vec<u32> = (1..=28)
        .filter(|d| *d != today && *d != today % 28 + 1)
        .take(CRON_GROUPS)
        .collect();
    let path = dir.join("inventory.toml");
    let mut out = BufWriter::new(fs::File::create(&path).expect("creating the inventory"));
    let mut ids = Vec::with_capacity(n);
    writeln!(
        out,
        "[daemon]\nstate = \"sqlite:{}\"\nlisten = \"127.0.0.1:{port}\"\nmax_concurrent_rotations = 4\n\n\
         [defaults]\ngrace = \"1h\"\nretry = {{ max_attempts = 5, backoff = \"30s\", max_backoff = \"1h\" }}\n",
        dir.join("state.db").display()
    )
    .unwrap();
    for i in 0..n {
        let id = random_credential(&mut out, i, &stores);
        if i % 10 < CRON_SHARE {
            let day = days[(i / 10) % days.len()];
            writeln!(out, "schedule = \"17 2 {day} * *\"\nmax_age = \"35d\"").unwrap();
        } else {
            let (every, max_age) = INTERVALS[i % INTERVALS.len()];
            writeln!(out, "rotate_every = \"{every}\"\nmax_age = \"{max_age}\"").unwrap();
        }
        ids.push(id);
    }
    out.flush().expect("writing the inventory");
    (path, ids)
}

/// Creates the state database with the daemon's own schema and records every credential as
/// rotated within the last day, in one transaction, so nothing is due at start-up.
fn seed_state(path: &Path, ids: &[String]) {
    drop(keyrotd::state::SqliteState::open(path).expect("creating the state database"));
    let mut conn = rusqlite::Connection::open(path).expect("opening the state database");
    let now = chrono::Utc::now().timestamp();
    let tx = conn.transaction().expect("a transaction");
    {
        let mut insert = tx
            .prepare("INSERT INTO credentials (id, status, issued_at) VALUES (?1, 'idle', ?2)")
            .expect("preparing");
        for (i, id) in ids.iter().enumerate() {
            insert
                .execute(rusqlite::params![id, now - (i as i64 % 86_400)])
                .expect("inserting a credential");
        }
    }
    tx.commit().expect("committing the seed");
}

fn terminate(child: &Child) {
    const SIGTERM: i32 = 15;
    send_signal(child, SIGTERM);
}

fn send_signal(child: &Child, sig: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child, not yet reaped.
    let rc = unsafe { kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill({sig}) failed");
}

fn wait_for_exit(child: &mut Child, limit: Duration) -> String {
    let t = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.to_string(),
            Ok(None) if t.elapsed() < limit => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return format!("did not exit within {} s; killed", limit.as_secs());
            }
        }
    }
}

fn field_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split_whitespace().next()
}

fn verdict(met: bool, target: &str) -> String {
    format!("[{} target {target}]", if met { "MET" } else { "MISSED" })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Stops the daemon, shows the end of its log (the temp dir is kept for inspection) and exits.
fn fail(child: &mut Child, log: &Path, message: &str) -> ! {
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "error: {message} (inventory and log kept in {})",
        log.parent().unwrap_or(log).display()
    );
    if let Ok(text) = fs::read_to_string(log) {
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        eprintln!(
            "last daemon log lines:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    std::process::exit(1);
}
