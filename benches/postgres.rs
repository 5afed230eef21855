//! The PostgreSQL cost bench: `tests/run.sh --exec cargo bench --bench postgres`.
//!
//! What one `postgres_password` rotation costs, in the daemon and in PostgreSQL. It needs the
//! test cluster of tests/backends/30-postgres.sh (`KEYROTD_TEST_PG_ADMIN_DSN`,
//! `KEYROTD_TEST_PG_PORT`; `tests/run.sh --exec` starts it and runs the command). It creates N
//! roles (env `KEYROTD_BENCH_PG_CREDENTIALS`, default 1,000), writes an inventory with one
//! `single` credential per role sharing the admin DSN, all due at once
//! (`max_concurrent_rotations` from `KEYROTD_BENCH_PG_CONCURRENCY`, default 16), runs the release
//! `keyrotd run` (or `KEYROTD_BENCH_BINARY`) until every store file is written, and reports:
//!
//! - the daemon's CPU seconds (`/proc/PID/stat` utime + stime);
//! - the PostgreSQL server's CPU seconds: the postmaster's own and reaped children's times plus
//!   those of its live children, before and after;
//! - the sessions opened (`pg_stat_database.sessions`, the bench's own one excluded);
//! - the wall time, so the rotations per second.
//!
//! Linux only (it reads `/proc`).

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::{clock_ticks, cpu_ticks, env_number};

const DSN_VAR: &str = "KEYROTD_BENCH_PG_DSN";

fn main() {
    let (Ok(dsn), Ok(_)) = (
        std::env::var("KEYROTD_TEST_PG_ADMIN_DSN"),
        std::env::var("KEYROTD_TEST_PG_PORT"),
    ) else {
        eprintln!(
            "needs the test PostgreSQL: run `tests/run.sh --exec cargo bench --bench postgres`"
        );
        std::process::exit(2);
    };
    let n = env_number("KEYROTD_BENCH_PG_CREDENTIALS", 1_000);
    let concurrency = env_number("KEYROTD_BENCH_PG_CONCURRENCY", 16);
    let binary = std::env::var_os("KEYROTD_BENCH_BINARY")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_BIN_EXE_keyrotd").map(PathBuf::from))
        .expect("KEYROTD_BENCH_BINARY, or the keyrotd that cargo bench builds");
    let dir = tempfile::Builder::new()
        .prefix("keyrotd-pg-bench-")
        .tempdir()
        .expect("a temp dir");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let client = runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .expect("superuser login");
        tokio::spawn(connection);
        client
    });
    let sql = |q: String| {
        runtime
            .block_on(client.simple_query(&q))
            .unwrap_or_else(|e| panic!("{q:.80}: {e}"))
    };
    let mut roles = String::new();
    for i in 0..n {
        roles += &format!("DROP ROLE IF EXISTS bench_pg_{i}; CREATE ROLE bench_pg_{i} LOGIN;");
    }
    sql(roles);
    let postmaster = postmaster_pid(&sql);
    let sessions = || -> i64 {
        let rows = sql("SELECT sum(sessions) FROM pg_stat_database".into());
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
                _ => None,
            })
            .unwrap_or(0)
    };
    let config = write_inventory(dir.path(), n, concurrency);
    println!(
        "keyrotd PostgreSQL bench: {n} single-role credentials sharing one admin, concurrency {concurrency}, binary {}",
        binary.display()
    );

    let (pg_before, sessions_before) = (server_ticks(postmaster), sessions());
    let started = Instant::now();
    let mut child = Command::new(&binary)
        .args(["run", "--config"])
        .arg(&config)
        .env(DSN_VAR, &dsn)
        .env("KEYROTD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.path().join("daemon.log")).expect("the log"))
        .spawn()
        .expect("spawning keyrotd");
    let stores = dir.path().join("store");
    loop {
        // Temporary files of the store's atomic writes have a suffix: count final names only.
        let written = fs::read_dir(&stores).map_or(0, |d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_prefix("pg-"))
                        .is_some_and(|i| i.bytes().all(|b| b.is_ascii_digit()))
                })
                .count()
        });
        if written >= n {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("keyrotd exited ({status}); see {}", dir.keep().display());
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "not done after 30 min: {written}/{n} written"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = started.elapsed();
    // The last promotions' journal rows settle; nothing else is due.
    std::thread::sleep(Duration::from_millis(500));
    let daemon = cpu_ticks(child.id());
    let _ = child.kill();
    let _ = child.wait();
    // This bench's own connection counts one session at most; the daemon's are all closed now.
    let (pg_after, sessions_after) = (server_ticks(postmaster), sessions());
    let hz = clock_ticks() as f64;
    let pg = (pg_after - pg_before) as f64 / hz;
    let daemon = daemon as f64 / hz;
    let opened = sessions_after - sessions_before;
    println!("\nresults ({n} rotations)");
    println!(
        "  wall time               {:>8.2} s    {:.0} rotations/s",
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64()
    );
    println!(
        "  daemon CPU              {daemon:>8.2} s    {:.2} ms per rotation",
        daemon * 1000.0 / n as f64
    );
    println!(
        "  PostgreSQL CPU          {pg:>8.2} s    {:.2} ms per rotation",
        pg * 1000.0 / n as f64
    );
    println!(
        "  sessions opened         {opened:>8}      {:.2} per rotation (one is verify's login as the role)",
        opened as f64 / n as f64
    );
    let mut drop = String::new();
    for i in 0..n {
        drop += &format!("DROP ROLE IF EXISTS bench_pg_{i};");
    }
    sql(drop);
}

/// The postmaster: the parent of this bench's own backend.
fn postmaster_pid(sql: &impl Fn(String) -> Vec<tokio_postgres::SimpleQueryMessage>) -> u32 {
    let backend: u32 = sql("SELECT pg_backend_pid()".into())
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .expect("a pid");
    let status = fs::read_to_string(format!("/proc/{backend}/status"))
        .expect("the server runs on this machine");
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a parent pid")
}

/// `/proc/PID/stat` fields 14.. (utime, stime, cutime, cstime), after the command name.
fn stat_times(pid: u32) -> [u64; 4] {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    [0, 1, 2, 3].map(|i| fields.get(i).copied().unwrap_or(0))
}

/// The server's CPU so far: the postmaster's own and its reaped children's, and its live children's.
fn server_ticks(postmaster: u32) -> u64 {
    let [u, s, cu, cs] = stat_times(postmaster);
    let children: u64 =
        fs::read_to_string(format!("/proc/{postmaster}/task/{postmaster}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .map(|p| {
                let [u, s, ..] = stat_times(p);
                u + s
            })
            .sum();
    u + s + cu + cs + children
}

fn write_inventory(dir: &Path, n: usize, concurrency: usize) -> PathBuf {
    let stores = dir.join("store");
    fs::create_dir_all(&stores).expect("the store dir");
    let path = dir.join("inventory.toml");
    let mut out = BufWriter::new(fs::File::create(&path).expect("the inventory"));
    writeln!(
        out,
        "[daemon]\nstate = \"sqlite:{}\"\nlisten = \"127.0.0.1:{}\"\nmax_concurrent_rotations = {concurrency}\n",
        dir.join("state.db").display(),
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    )
    .unwrap();
    for i in 0..n {
        writeln!(
            out,
            "[[credential]]\nid = \"pg-{i}\"\nrotate_every = \"30d\"\nmax_age = \"40d\"\n\
             rotator = {{ kind = \"postgres_password\", admin_dsn = \"env:{DSN_VAR}\", strategy = \"single\", role = \"bench_pg_{i}\", sslmode = \"disable\" }}\n\
             store = {{ kind = \"file\", path = \"{}\" }}\n",
            stores.join(format!("pg-{i}")).display()
        )
        .unwrap();
    }
    out.flush().expect("writing the inventory");
    path
}
