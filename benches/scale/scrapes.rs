//! The scale bench's rows on issue 13's scrapes: `/metrics` gzip-encoded, and in compact mode.

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use super::{fail, get, get_with, mib, send_signal};

/// The report lines on issue 13's scrapes: `/metrics` as Prometheus asks for it (gzip), then with
/// `daemon.metrics = "compact"` (written into the inventory and loaded by a SIGHUP reload), next
/// to the full plain scrape `plain`. Only the series count per mode depends on the inventory.
pub(crate) fn scrape_variants(
    child: &mut Child,
    addr: SocketAddr,
    config: &Path,
    log: &Path,
    plain: &[u8],
) -> String {
    let samples = |body: &[u8]| {
        body.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty() && !l.starts_with(b"#"))
            .count()
    };
    let gzip = |child: &mut Child| {
        let t = Instant::now();
        match get_with(addr, "/metrics", "Accept-Encoding: gzip\r\n") {
            Ok(r) if r.status == 200 && r.body.starts_with(&[0x1f, 0x8b]) => (r.body, t.elapsed()),
            Ok(r) => fail(
                child,
                log,
                &format!("gzip /metrics answered {}, not gzip", r.status),
            ),
            Err(e) => fail(child, log, &format!("gzip /metrics failed: {e}")),
        }
    };
    let mut out = String::new();
    let (gz, took) = gzip(child);
    let _ = writeln!(
        out,
        "  /metrics gzip fetch     {:>8.3} s   {:.2} MiB ({:.0}x smaller), {} samples",
        took.as_secs_f64(),
        mib(gz.len() as u64),
        plain.len() as f64 / gz.len() as f64,
        samples(plain)
    );

    let text = fs::read_to_string(config).expect("reading the inventory");
    let compact = text.replacen("[daemon]\n", "[daemon]\nmetrics = \"compact\"\n", 1);
    fs::write(config, compact).expect("writing the inventory");
    let t = Instant::now();
    send_signal(child, 1); // SIGHUP
    loop {
        let body = get(addr, "/metrics").map(|r| r.body).unwrap_or_default();
        let omitted = String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix("keyrotd_credentials_series_omitted "))
            .is_some_and(|n| n != "0");
        if omitted {
            let reloaded = t.elapsed();
            let t = Instant::now();
            let body = get(addr, "/metrics").map(|r| r.body).unwrap_or_default();
            let fetch = t.elapsed();
            let (gz, _) = gzip(child);
            let _ = writeln!(
                out,
                "  /metrics compact fetch  {:>8.3} s   {:.3} MiB plain, {:.3} MiB gzip, {} samples \
                 (compact mode loaded by SIGHUP in {:.1} s)",
                fetch.as_secs_f64(),
                mib(body.len() as u64),
                mib(gz.len() as u64),
                samples(&body),
                reloaded.as_secs_f64()
            );
            return out;
        }
        if t.elapsed() > Duration::from_secs(120) {
            fail(child, log, "no compact /metrics 120 s after the SIGHUP");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
