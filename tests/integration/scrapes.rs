//! Issue 13's scrapes, through the real `keyrotd run`: `/metrics` is gzip-encoded exactly when
//! the request's `Accept-Encoding` allows gzip, and `daemon.metrics = "compact"` exports
//! per-credential series only for the credentials that need attention (here one stale and one
//! failed out of N + 2), while a real Prometheus with the shipped rules still fires the stale,
//! failing and failed alerts, and resolves them once the series go away.

use crate::support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::prometheus::PrometheusServer;
use support::{cli, free_port, signal, wait_until, Daemon};

/// One HTTP/1.0 answer: status, lower-cased headers, raw body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text, gunzipped if the answer says it is gzip-encoded.
    fn text(&self) -> String {
        if self.header("content-encoding") == Some("gzip") {
            let mut out = String::new();
            flate2::read::GzDecoder::new(&self.body[..])
                .read_to_string(&mut out)
                .expect("a valid gzip body");
            out
        } else {
            String::from_utf8(self.body.clone()).expect("a UTF-8 body")
        }
    }
}

/// `GET /metrics`, with `Accept-Encoding: accept` if given.
fn scrape(port: u16, accept: Option<&str>) -> Answer {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let extra = accept.map_or(String::new(), |a| format!("Accept-Encoding: {a}\r\n"));
    write!(s, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n{extra}\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// The per-credential sample lines (`keyrotd_credential_*{credential=...}`).
fn credential_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.starts_with("keyrotd_credential_") && l.contains("{credential=\""))
        .collect()
}

/// The credentials that have per-credential series.
fn exported(text: &str) -> BTreeSet<String> {
    credential_lines(text)
        .iter()
        .filter_map(|l| l.split("credential=\"").nth(1)?.split('"').next())
        .map(str::to_owned)
        .collect()
}

/// The value of an unlabelled or fully written sample `name`.
fn sample(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(str::to_owned)
}

#[test]
fn metrics_are_gzipped_exactly_when_the_scraper_accepts_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("config.toml");
    let mut text =
        format!("[daemon]\nstate = \"sqlite:state/keyrotd.db\"\nlisten = \"127.0.0.1:{port}\"\n");
    for i in 0..50 {
        text.push_str(&format!(
            "\n[[credential]]\nid = \"svc-{i}\"\nrotator = {{ kind = \"random\", length = 32 }}\n\
             store = {{ kind = \"file\", path = \"{}\" }}\nrotate_every = \"30d\"\nmax_age = \"40d\"\ngrace = \"1h\"\n",
            dir.path().join(format!("out/svc-{i}")).display()
        ));
    }
    std::fs::write(&config, text).unwrap();
    let _daemon = Daemon::start(&config, port, &dir.path().join("daemon.log"), &[]);

    let plain = scrape(port, None);
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("content-encoding"), None);
    let plain_text = plain.text();
    assert_eq!(exported(&plain_text).len(), 50, "{plain_text}");

    let max_age = |t: &str| -> BTreeSet<String> {
        t.lines()
            .filter(|l| l.starts_with("keyrotd_credential_max_age_seconds{"))
            .map(str::to_owned)
            .collect()
    };
    for accept in [
        "gzip",
        "deflate, gzip;q=0.5",
        "GZIP",
        "br;q=1.0, gzip;q=0.8, *;q=0.1",
    ] {
        let gz = scrape(port, Some(accept));
        assert_eq!(gz.status, 200);
        assert_eq!(
            gz.header("content-encoding"),
            Some("gzip"),
            "Accept-Encoding: {accept}"
        );
        assert!(
            gz.header("vary")
                .is_some_and(|v| v.to_ascii_lowercase().contains("accept-encoding")),
            "a cache must not serve gzip to a client that did not ask: {:?}",
            gz.headers
        );
        assert!(gz.body.starts_with(&[0x1f, 0x8b]), "a gzip stream");
        let text = gz.text();
        assert_eq!(max_age(&text), max_age(&plain_text));
        assert!(
            gz.body.len() * 5 < text.len(),
            "compressed {} of {} bytes",
            gz.body.len(),
            text.len()
        );
    }
    // Not acceptable: identity.
    for accept in ["gzip;q=0", "br", "identity", "deflate;q=1, gzip;q=0.000"] {
        let answer = scrape(port, Some(accept));
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.header("content-encoding"),
            None,
            "Accept-Encoding: {accept}"
        );
        assert_eq!(max_age(&answer.text()), max_age(&plain_text));
    }
}

/// An inventory of `n` healthy credentials (seeded as rotated an hour ago), `stale` (a yearly
/// cron schedule whose last rotation is backdated past its max age) and `failing` (a file store
/// below a dangling symbolic link: every attempt fails at `stage`; failed after 2 attempts).
struct Inventory {
    dir: tempfile::TempDir,
    config: PathBuf,
    port: u16,
}

impl Inventory {
    async fn new(n: usize, metrics: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let inventory = Self {
            config: dir.path().join("config.toml"),
            dir,
            port,
        };
        let root = inventory.root();
        std::os::unix::fs::symlink(root.join("nowhere/at/all"), root.join("blocked")).unwrap();
        inventory.write(metrics, n);
        use keyrotd::state::{CredentialRecord, SqliteState, StateStore};
        let state = SqliteState::open(&root.join("state/keyrotd.db")).unwrap();
        let now = chrono::Utc::now().timestamp();
        for i in 0..n {
            let mut record = CredentialRecord::new(&format!("svc-{i}"));
            record.issued_at = Some(now - 3600);
            state.put_credential(&record).await.unwrap();
        }
        let mut record = CredentialRecord::new("stale");
        record.issued_at = Some(now - 401 * 86400);
        state.put_credential(&record).await.unwrap();
        inventory
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Writes the inventory with `metrics = "MODE"` (none if empty).
    fn write(&self, metrics: &str, n: usize) {
        let root = self.root();
        let mode = if metrics.is_empty() {
            String::new()
        } else {
            format!("metrics = \"{metrics}\"\n")
        };
        let mut text = format!(
            "[daemon]\nstate = \"sqlite:state/keyrotd.db\"\nlisten = \"127.0.0.1:{}\"\n{mode}\n\
             [defaults]\ngrace = \"1s\"\n",
            self.port
        );
        let text_of = |id: &str, path: &Path, timing: &str| {
            format!(
                "\n[[credential]]\nid = \"{id}\"\nrotator = {{ kind = \"random\", length = 32 }}\n\
                 store = {{ kind = \"file\", path = \"{}\" }}\n{timing}\n",
                path.display()
            )
        };
        for i in 0..n {
            text.push_str(&text_of(
                &format!("svc-{i}"),
                &root.join(format!("out/svc-{i}")),
                "rotate_every = \"30d\"\nmax_age = \"40d\"",
            ));
        }
        text.push_str(&text_of(
            "stale",
            &root.join("out/stale"),
            "schedule = \"0 0 1 1 *\"\nwindow = \"1h\"\nmax_age = \"400d\"",
        ));
        text.push_str(&text_of(
            "failing",
            &root.join("blocked/secret"),
            "rotate_every = \"1h\"\nmax_age = \"2h\"\n\
             retry = { max_attempts = 2, backoff = \"1s\", max_backoff = \"1s\" }",
        ));
        std::fs::write(&self.config, text).unwrap();
    }

    fn start(&self) -> Daemon {
        let daemon = Daemon::start(
            &self.config,
            self.port,
            &self.root().join("daemon.log"),
            &[],
        );
        let failed = wait_until(Duration::from_secs(30), || {
            sample(
                &scrape(self.port, None).text(),
                "keyrotd_credentials{state=\"failed\"}",
            )
            .as_deref()
                == Some("1")
        });
        assert!(failed, "`failing` not failed; log:\n{}", daemon.log_text());
        daemon
    }
}

const N: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_mode_exports_only_the_credentials_that_need_attention() {
    let inventory = Inventory::new(N, "compact").await;
    let daemon = tokio::task::block_in_place(|| inventory.start());

    let compact = scrape(inventory.port, Some("gzip")).text();
    assert_eq!(
        exported(&compact),
        BTreeSet::from(["failing".to_owned(), "stale".to_owned()]),
        "{compact}"
    );
    let compact_lines = credential_lines(&compact).len();
    assert!(compact_lines <= 2 * 9, "{compact_lines} lines:\n{compact}");
    // The stale credential keeps every input of the stale rule; the failed one the failed and
    // failing rules' inputs.
    for line in [
        "keyrotd_credential_issued_timestamp_seconds{credential=\"stale\",rotator=\"random\"}",
        "keyrotd_credential_max_age_seconds{credential=\"stale\",rotator=\"random\"} 34560000",
        "keyrotd_credential_status{credential=\"failing\",rotator=\"random\",state=\"failed\"} 1",
        "keyrotd_credential_consecutive_failures{credential=\"failing\",rotator=\"random\"} 2",
    ] {
        assert!(compact.contains(line), "{line} missing:\n{compact}");
    }
    assert_eq!(
        sample(&compact, "keyrotd_credentials_series_omitted").as_deref(),
        Some(N.to_string().as_str())
    );
    assert_eq!(
        sample(&compact, "keyrotd_credentials{state=\"idle\"}").as_deref(),
        Some((N + 1).to_string().as_str())
    );
    assert_eq!(
        sample(&compact, "keyrotd_credentials_stale").as_deref(),
        Some("1")
    );

    // The same daemon reloaded without the option: every credential's series again.
    inventory.write("", N);
    signal(daemon.child.id(), "HUP");
    let full_again = wait_until(Duration::from_secs(30), || {
        sample(
            &scrape(inventory.port, None).text(),
            "keyrotd_credentials_series_omitted",
        )
        .as_deref()
            == Some("0")
    });
    assert!(
        full_again,
        "reload to full mode; log:\n{}",
        daemon.log_text()
    );
    let full = scrape(inventory.port, None).text();
    assert_eq!(exported(&full).len(), N + 2);
    let full_lines = credential_lines(&full).len();
    assert!(full_lines >= 9 * N, "{full_lines} lines");
    println!(
        "{N} + 2 credentials: {full_lines} per-credential series in full mode ({} bytes), \
         {compact_lines} in compact mode ({} bytes)",
        full.len(),
        compact.len()
    );
}

#[test]
fn an_unknown_metrics_mode_is_refused_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[daemon]\nmetrics = \"tiny\"\n").unwrap();
    let out = cli(&config, &["check"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("config.toml:2:11: daemon.metrics: `tiny` is not a metrics mode"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the test backends: run tests/run.sh"]
async fn compact_mode_keeps_the_shipped_alerts_firing_and_resolving() {
    let inventory = Inventory::new(N, "compact").await;
    let _daemon = tokio::task::block_in_place(|| inventory.start());
    let target = format!("127.0.0.1:{}", inventory.port);
    let prometheus = PrometheusServer::start(std::slice::from_ref(&target)).await;
    prometheus
        .wait_for_firing(
            &[
                ("KeyrotdCredentialFailed", "failing"),
                ("KeyrotdCredentialStale", "stale"),
                ("KeyrotdRotationFailing", "failing"),
            ],
            "compact mode, broken credentials",
            Duration::from_secs(30),
        )
        .await;

    // Recovery by hand: the series of both leave the exposition, and the alerts resolve.
    let root = inventory.root();
    std::fs::remove_file(root.join("blocked")).unwrap();
    std::fs::create_dir(root.join("blocked")).unwrap();
    for id in ["stale", "failing"] {
        let out = tokio::task::block_in_place(|| cli(&inventory.config, &["rotate", id]));
        assert!(
            out.status.success(),
            "keyrotd rotate {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    prometheus
        .wait_for_firing(&[], "compact mode, after recovery", Duration::from_secs(30))
        .await;
    // Once their old values are revoked (grace 1s), nothing needs attention any more.
    let quiet = wait_until(Duration::from_secs(20), || {
        exported(&scrape(inventory.port, Some("gzip")).text()).is_empty()
    });
    assert!(quiet, "{}", scrape(inventory.port, None).text());
}
