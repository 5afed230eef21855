//! The daemon's logs as a service manager or a log shipper sees them, through the real binary:
//! no colour codes when stderr is a file, `--log-format json` (or `KEYROTD_LOG_FORMAT=json`) one
//! JSON object per line with no secret in it, and other crates' INFO chatter hidden at the
//! default level while keyrotd's own INFO lines stay.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::*;

/// An inventory with one `random` credential `k` in a file store, revoked at once after
/// promotion (`grace = "0s"`) so that it can be rotated again straight away.
fn file_inventory(dir: &Path) -> PathBuf {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstate = \"sqlite:state/state.db\"\n\n[[credential]]\nid = \"k\"\n\
             rotator = {{ kind = \"random\", length = 40 }}\n\
             store = {{ kind = \"file\", path = \"{}\" }}\n\
             rotate_every = \"30d\"\nmax_age = \"40d\"\ngrace = \"0s\"\n",
            dir.join("out/k").display()
        ),
    )
    .unwrap();
    config
}

/// Runs `cmd` with its stderr written to `dir/NAME.log` (a regular file, as under journald's
/// `StandardError=file:` or a shell redirection) and returns the output and that file's text.
fn run_logging_to_file(mut cmd: Command, dir: &Path, name: &str) -> (Output, String) {
    let log = dir.join(format!("{name}.log"));
    let out = cmd
        .stderr(std::fs::File::create(&log).unwrap())
        .output()
        .expect("spawn keyrotd");
    (out, std::fs::read_to_string(&log).unwrap())
}

#[test]
fn text_logs_to_a_file_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let config = file_inventory(dir.path());
    let mut cmd = keyrotd();
    // NO_COLOR would hide a colour bug: the test must see what a plain service gets.
    cmd.env_remove("NO_COLOR")
        .arg("--config")
        .arg(&config)
        .args(["rotate", "k"]);
    let (out, log) = run_logging_to_file(cmd, dir.path(), "text");
    assert!(out.status.success(), "{log}");
    assert!(log.contains("rotation started"), "{log}");
    assert!(
        !log.contains("\x1b["),
        "colour codes in a log file:\n{log:?}"
    );
    assert!(
        log.contains(" INFO keyrotd::engine::lease: rotation started credential=k"),
        "{log}"
    );
}

/// Parses every line of `log` as a JSON object and checks the fields a shipper indexes on.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    assert!(!log.is_empty());
    log.lines()
        .map(|line| {
            let event: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            assert!(event["level"].is_string(), "{line}");
            assert!(event["target"].is_string(), "{line}");
            assert!(event["timestamp"].is_string(), "{line}");
            assert!(event["fields"]["message"].is_string(), "{line}");
            event
        })
        .collect()
}

#[test]
fn json_logs_are_one_object_per_line_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let config = file_inventory(dir.path());
    let mut secrets = Vec::new();
    let mut logs = String::new();
    // The flag and its environment variable; the second rotation also revokes the first's value.
    for (name, flag, env) in [
        ("flag", Some("--log-format=json"), None),
        ("env", None, Some(("KEYROTD_LOG_FORMAT", "json"))),
    ] {
        let mut cmd = keyrotd();
        cmd.env_remove("NO_COLOR").env_remove("KEYROTD_LOG_FORMAT");
        cmd.args(flag).arg("--config").arg(&config);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        cmd.args(["rotate", "k"]);
        let (out, log) = run_logging_to_file(cmd, dir.path(), name);
        assert!(out.status.success(), "{log}");
        let events = json_lines(&log);
        let started = events
            .iter()
            .find(|e| e["fields"]["message"] == "rotation started")
            .unwrap_or_else(|| panic!("{name}: no `rotation started` event:\n{log}"));
        assert_eq!(started["level"], "INFO", "{started}");
        assert_eq!(started["target"], "keyrotd::engine::lease", "{started}");
        assert_eq!(started["fields"]["credential"], "k", "{started}");
        assert_eq!(started["fields"]["trigger"], "manual", "{started}");
        secrets.push(std::fs::read_to_string(dir.path().join("out/k")).unwrap());
        logs.push_str(&log);
    }
    assert_ne!(secrets[0], secrets[1]);
    for secret in &secrets {
        for encoded in encodings(secret) {
            assert!(!logs.contains(&encoded), "a secret in the JSON logs");
        }
    }

    // An error of the command itself is a JSON line too, so a shipper reads nothing else.
    let mut cmd = keyrotd();
    cmd.args(["--log-format", "json", "--config"])
        .arg(&config)
        .args(["rotate", "no-such-credential"]);
    let (out, log) = run_logging_to_file(cmd, dir.path(), "error");
    assert_eq!(out.status.code(), Some(2), "{log}");
    let events = json_lines(&log);
    assert_eq!(events.len(), 1, "{log}");
    assert_eq!(events[0]["level"], "ERROR", "{log}");
    assert!(
        events[0]["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("no credential `no-such-credential`"),
        "{log}"
    );
}

/// The access key id and secret of the shared credentials file in [`aws_profile_rotation`].
const PROFILE_KEY_ID: &str = "AKIALOGGINGTESTKEY01";
const PROFILE_SECRET: &str = "logging-test-profile-secret-0123456789ab";

/// `keyrotd rotate k` of a Secrets Manager credential whose endpoint nobody listens on, with the
/// daemon's own AWS credentials in a shared credentials file (`~/.aws/credentials`, the common
/// setup). The AWS SDK logs at INFO as it builds its credential provider from that file; the
/// rotation fails (connection refused). `log_filter` is `KEYROTD_LOG`, unset when `None`.
fn aws_profile_rotation(dir: &Path, log_filter: Option<&str>) -> String {
    let aws = dir.join("aws");
    std::fs::create_dir_all(&aws).unwrap();
    std::fs::write(
        aws.join("credentials"),
        format!(
            "[default]\naws_access_key_id = {PROFILE_KEY_ID}\n\
             aws_secret_access_key = {PROFILE_SECRET}\n"
        ),
    )
    .unwrap();
    std::fs::write(aws.join("config"), "[default]\nregion = us-east-1\n").unwrap();
    let config = dir.join("aws.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstate = \"sqlite:aws-state/state.db\"\n\n[[credential]]\nid = \"k\"\n\
             rotator = {{ kind = \"random\" }}\n\
             store = {{ kind = \"aws_secrets_manager\", secret_id = \"s\", region = \"us-east-1\", \
             endpoint_url = \"http://127.0.0.1:{}\", connect_timeout = \"1s\", timeout = \"1s\" }}\n\
             rotate_every = \"30d\"\nmax_age = \"40d\"\n",
            free_port()
        ),
    )
    .unwrap();
    let mut cmd = keyrotd();
    for var in [
        "KEYROTD_LOG",
        "KEYROTD_LOG_FORMAT",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ] {
        cmd.env_remove(var);
    }
    if let Some(filter) = log_filter {
        cmd.env("KEYROTD_LOG", filter);
    }
    cmd.env("AWS_SHARED_CREDENTIALS_FILE", aws.join("credentials"))
        .env("AWS_CONFIG_FILE", aws.join("config"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .arg("--config")
        .arg(&config)
        .args(["rotate", "k"]);
    let (out, log) = run_logging_to_file(
        cmd,
        dir,
        &format!("aws-{}", log_filter.unwrap_or("default")),
    );
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        !log.contains(PROFILE_SECRET),
        "the profile's secret in the log"
    );
    log
}

#[test]
fn the_default_level_hides_other_crates_info_chatter() {
    // Asked for, the SDK's INFO lines are there: the setup really produces them.
    let dir = tempfile::tempdir().unwrap();
    let chatty = aws_profile_rotation(dir.path(), Some("info"));
    assert!(
        chatty.contains("INFO aws_config::profile::credentials: constructed abstract provider"),
        "{chatty}"
    );

    let dir = tempfile::tempdir().unwrap();
    let log = aws_profile_rotation(dir.path(), None);
    assert!(!log.contains("aws_config"), "{log}");
    assert!(!log.contains(PROFILE_KEY_ID), "{log}");
    // keyrotd's own INFO and WARN lines stay.
    assert!(
        log.contains(" INFO keyrotd::state::sqlite: state database schema migrated"),
        "{log}"
    );
    assert!(
        log.contains(" INFO keyrotd::engine::lease: rotation started"),
        "{log}"
    );
    assert!(
        log.contains(" WARN keyrotd::engine::failure: rotation step failed"),
        "{log}"
    );
}
