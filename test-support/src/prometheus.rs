//! A real Prometheus server for tests, loaded with the shipped alert rules
//! (`prometheus/keyrotd.rules.yml` at the workspace root) with every `for:` set to 0s.
//!
//! Needs `prometheus` on the PATH (Debian package `prometheus`): a test using it is
//! `#[ignore]`d with [`crate::NEEDS_BACKENDS`], and a missing binary fails it.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::free_port;

/// A real Prometheus server; killed on drop.
pub struct PrometheusServer {
    /// `http://127.0.0.1:PORT`, its web UI and API.
    pub url: String,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl PrometheusServer {
    /// Starts Prometheus with the shipped rules (every `for:` set to 0s), scraping `targets` as
    /// job `keyrotd` every second.
    pub async fn start(targets: &[String]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../prometheus/keyrotd.rules.yml");
        let rules = std::fs::read_to_string(shipped).unwrap();
        let tuned = rules.matches("# TUNE").count();
        let fast: String = rules
            .lines()
            .map(|l| match l.split_once("for: ") {
                Some((indent, rest)) if rest.contains("# TUNE") => format!("{indent}for: 0s"),
                _ => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            fast.matches("for: 0s").count(),
            fast.matches("- alert: ").count(),
            "every alert's `for:` is marked # TUNE ({tuned} markers)"
        );
        std::fs::write(dir.path().join("rules.yml"), fast).unwrap();
        let targets = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files: ['rules.yml']\n\
                 scrape_configs:\n  - job_name: keyrotd\n    static_configs:\n      - targets: [{targets}]\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = tokio::process::Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start prometheus ({e}); install it: apt-get install -y prometheus")
            });
        let server = Self {
            url: format!("http://127.0.0.1:{port}"),
            _child: child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = reqwest::get(format!("{}/-/ready", server.url)).await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not become ready; log:\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        server
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Firing alerts as (alertname, credential or instance), sorted, without duplicates.
    pub async fn firing(&self) -> Vec<(String, String)> {
        let body: Value = reqwest::get(format!("{}/api/v1/alerts", self.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut out: Vec<(String, String)> = body["data"]["alerts"]
            .as_array()
            .expect("alerts array")
            .iter()
            .filter(|a| a["state"] == "firing")
            .map(|a| {
                let l = &a["labels"];
                let who = l["credential"]
                    .as_str()
                    .or(l["instance"].as_str())
                    .unwrap_or("")
                    .to_owned();
                (l["alertname"].as_str().unwrap().to_owned(), who)
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Waits until exactly `expected` is firing.
    pub async fn wait_for_firing(&self, expected: &[(&str, &str)], what: &str, timeout: Duration) {
        let mut expected: Vec<(String, String)> = expected
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect();
        expected.sort();
        let deadline = Instant::now() + timeout;
        loop {
            let firing = self.firing().await;
            if firing == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: expected firing {expected:?}, Prometheus has {firing:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
